"""CURVE keypairs on disk: creation with safe permissions, loading with checks.

Files use pyzmq's certificate format, so ``zmq.auth`` tools read them too:
``PATH.key`` holds the public key (give it to peers: coordinators pin a party's key in their
parties.toml, parties list a coordinator's key in their authorized keys, see
:mod:`fednb.transport.auth`), ``PATH.key_secret`` the secret (mode 0600; a secret file that
group or others can read is refused, as ssh refuses such keys).
"""

from __future__ import annotations

import datetime
import difflib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from fednb.errors import KeyFileError

Z85_KEY_LENGTH = 40

_BANNER = """#   ****  Generated on {date} by fednb  ****
#   ZeroMQ CURVE {kind} Certificate
#   {advice}

metadata
curve
"""


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair as Z85 text; ``secret`` is None for a peer's public key alone."""

    public: bytes
    secret: bytes | None = None

    def __repr__(self) -> str:  # never print a secret key
        return f"Keypair(public={self.public.decode()!r}, secret={'<hidden>' if self.secret else None})"


def require_curve() -> None:
    """Refuse to go on without a libzmq that has CURVE and the ZAP fix of CVE-2019-13132."""
    if not zmq.has("curve"):
        raise KeyFileError("this libzmq was built without CURVE; fednb cannot secure its sockets")
    if zmq.zmq_version_info() < (4, 3, 2):
        raise KeyFileError(f"libzmq {zmq.zmq_version()} is older than 4.3.2 (CVE-2019-13132); upgrade pyzmq")


def generate() -> Keypair:
    """A fresh keypair in memory."""
    require_curve()
    public, secret = zmq.curve_keypair()
    return Keypair(public, secret)


def key_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(PATH.key, PATH.key_secret)`` for a key's base path (a trailing .key is dropped)."""
    base = Path(path).expanduser()
    if base.suffix in (".key", ".key_secret"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".key"), base.with_name(base.name + ".key_secret")


def write_keypair(path: str | os.PathLike[str], keypair: Keypair | None = None, *, overwrite: bool = False) -> Keypair:
    """Write ``PATH.key`` (0644) and ``PATH.key_secret`` (0600, created with that mode)."""
    keypair = keypair or generate()
    if keypair.secret is None:
        raise ValueError("write_keypair needs a keypair with its secret key")
    public_path, secret_path = key_paths(path)
    public_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    body = f'    public-key = "{keypair.public.decode()}"\n'
    secret_text = _BANNER.format(date=date, kind="**Secret**", advice="Keep this file private (mode 0600).")
    public_text = _BANNER.format(date=date, kind="Public", advice="Share this file with the peers that must trust you.")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    for target, text, mode in (
        (secret_path, secret_text + body + f'    secret-key = "{keypair.secret.decode()}"\n', 0o600),
        (public_path, public_text + body, 0o644),
    ):
        try:
            fd = os.open(target, flags, mode)
        except FileExistsError:
            raise KeyFileError(f"{target} exists already; refusing to overwrite a key") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
    return keypair


def load_keypair(path: str | os.PathLike[str]) -> Keypair:
    """Load our own keypair from ``PATH.key_secret``; refuse one that others can read."""
    public_path, secret_path = key_paths(path)
    if not secret_path.exists():
        if public_path.exists():
            raise KeyFileError(f"{secret_path} does not exist: {public_path} is a public key alone, and this needs "
                               "its own keypair (the one `fednb keys new` wrote, with its .key_secret)")
        raise KeyFileError(_missing(secret_path, create=True))
    mode = secret_path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{secret_path} is accessible by group or others (mode {stat.filemode(mode)}); run: chmod 600 {secret_path}"
        )
    public, secret = _read_certificate(secret_path)
    if secret is None:
        raise KeyFileError(f"{secret_path} holds no secret key")
    return Keypair(public, secret)


def load_public_key(spec: str | bytes | os.PathLike[str]) -> bytes:
    """A peer's public key from its Z85 text or from the path of its ``.key`` file."""
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", errors="replace")
    text = str(spec).strip()
    if len(text) == Z85_KEY_LENGTH and not os.path.exists(text):
        return check_z85(text)
    path = Path(text).expanduser()
    if not path.exists() and path.suffix != ".key":
        path = path.with_name(path.name + ".key")
    if not path.exists():
        raise KeyFileError(f"{spec!s} is neither a 40-character Z85 key nor a key file: {_missing(path)}")
    public, _ = _read_certificate(path)
    return public


def _missing(path: Path, *, create: bool = False) -> str:
    """Why a key file is missing, naming the key files beside it that may have been meant.

    ``fednb keys new BASE`` is suggested only where it is right: our own keypair (``create``)
    in a directory that exists and holds no keypair yet; a peer's key is the peer's to make.
    """
    suffix = ".key_secret" if path.name.endswith(".key_secret") else ".key"
    base = path.with_name(path.name[: -len(suffix)] if path.name.endswith(suffix) else path.name)
    folder = base.parent
    if not folder.is_dir():
        return f"{path} does not exist, nor does the directory {folder}"
    names = sorted(entry.name[: -len(suffix)] for entry in folder.glob(f"*{suffix}"))
    if not names:
        if create:
            return f"{path} does not exist; to make a keypair there: fednb keys new {base}"
        return f"{path} does not exist, and {folder} holds no {suffix} file"
    close = difflib.get_close_matches(base.name, names, n=3, cutoff=0.6)
    if close:
        return f"{path} does not exist; did you mean {' or '.join(str(folder / name) for name in close)}?"
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"{path} does not exist; the {suffix} files in {folder}: {listed}"


def check_z85(text: str | bytes) -> bytes:
    """Validate a Z85-encoded 32-byte key and return it as bytes."""
    raw = text.encode("ascii", errors="replace") if isinstance(text, str) else text
    try:
        if len(raw) != Z85_KEY_LENGTH or len(zmq.utils.z85.decode(raw)) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{raw[:60]!r} is not a Z85-encoded CURVE key (40 characters)") from None
    return raw


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc}") from None
    return check_z85(public), (check_z85(secret) if secret else None)
