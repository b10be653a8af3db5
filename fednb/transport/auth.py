"""Who may connect: the authorized-keys allow-list and the ZAP authenticator that enforces it.

The allow-list fails closed: a missing or unreadable list stops the party from starting,
an empty one lets nobody in. It is either a directory of ``*.key`` files (each labelled by
its file name) or a file in the format of :data:`AUTHORIZED_KEYS_FORMAT`, as in ssh's
``authorized_keys``::

    # coordinators allowed to connect to clinic-a
    6U:afnnRP+-q/<u.BMx=}y&J3RdL!xjzS/Cez2O+ alice@lab
    -tZ%84uS=d<vQ.4xJs^bNGPmZSH.eQkPYn[bHhq/

The file is read again when it changes, so a key added or removed takes effect at the next
handshake; sessions already open with a removed key are reported through
:meth:`Authenticator.revoked` so that the party can drop them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from fednb.errors import KeyFileError
from fednb.transport.keys import _read_certificate, check_z85, require_curve

log = logging.getLogger(__name__)

ZAP_DOMAIN = "fednb"

AUTHORIZED_KEYS_FORMAT = (
    "one coordinator per line: its 40-character public key (what `fednb keys show PATH` prints), "
    "then optionally a space and a label for the logs and the audit; lines starting with # are comments; "
    "the content of a .key file that `fednb keys new` wrote may be pasted as it is"
)

# A pasted certificate (pyzmq's format, as PATH.key holds it): section names, ``name = "value"`` lines.
_CERTIFICATE_SECTION = re.compile(r"(metadata|curve)")
_CERTIFICATE_ENTRY = re.compile(r'([\w-]+)\s*=\s*"(.*)"')


def read_authorized_keys(path: str | os.PathLike[str]) -> dict[bytes, str]:
    """Public keys (Z85) allowed to connect, each with a label, from a file or directory."""
    source = Path(path).expanduser()
    if not source.exists():
        raise KeyFileError(f"authorized keys {source} do not exist; refusing to start without an allow-list")
    keys: dict[bytes, str] = {}
    try:
        if source.is_dir():
            for cert in sorted(source.glob("*.key")):
                public, _ = _read_certificate(cert)
                keys[public] = cert.stem
            return keys
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read authorized keys {source}: {exc}") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#") or _CERTIFICATE_SECTION.fullmatch(text):
            continue  # '#' is a Z85 digit, but no CURVE key starts with it (its first digit is at most '%')
        words = text.split(maxsplit=1)
        if _is_key(words[0]):
            keys[words[0].encode()] = words[1] if len(words) > 1 else words[0][:8]
            continue
        entry = _CERTIFICATE_ENTRY.fullmatch(text)
        if entry is not None and entry.group(1) == "secret-key":
            raise KeyFileError(f"{source}:{number}: a secret key; list public keys only (the .key file, never "
                               ".key_secret), and treat that secret key as exposed")
        if entry is not None and entry.group(1) == "public-key" and _is_key(entry.group(2)):
            keys[entry.group(2).encode()] = entry.group(2)[:8]
        elif entry is None or entry.group(1) == "public-key":  # other entries: a pasted certificate's metadata
            raise KeyFileError(f"{source}:{number}: not a public key: {text[:50]!r}; expected "
                               f"{AUTHORIZED_KEYS_FORMAT}")
    return keys


def _is_key(word: str) -> bool:
    try:
        check_z85(word)
    except KeyFileError:
        return False
    return True


class AllowList:
    """The current allow-list, reloaded from its file when the file changes."""

    def __init__(self, path: str | os.PathLike[str] | None = None, keys: dict[bytes, str] | None = None) -> None:
        if (path is None) == (keys is None):
            raise ValueError("AllowList needs exactly one of path or keys")
        self._path = Path(path).expanduser() if path is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._keys: dict[bytes, str] = dict(keys or {})
        if self._path is not None:
            self._keys = read_authorized_keys(self._path)
            self._stamp = self._current_stamp()
        if not self._keys:
            log.warning("the allow-list is empty: no coordinator can connect")

    def _current_stamp(self) -> tuple[float, int] | None:
        if self._path is None:
            return None
        try:
            if self._path.is_dir():
                stamps = [p.stat() for p in self._path.glob("*.key")]
                return (max((s.st_mtime for s in stamps), default=0.0), len(stamps))
            info = self._path.stat()
            return (info.st_mtime, info.st_size)
        except OSError:
            return None

    def refresh(self) -> set[bytes]:
        """Re-read the list if its file changed; return the keys that were removed.

        A list that became unreadable keeps nobody in (fail closed).
        """
        with self._lock:
            stamp = self._current_stamp()
            if self._path is None or stamp == self._stamp:
                return set()
            before = set(self._keys)
            try:
                self._keys = read_authorized_keys(self._path)
            except KeyFileError as exc:
                log.error("%s; allowing no one until it is fixed", exc)
                self._keys = {}
            self._stamp = stamp
            return before - set(self._keys)

    def label(self, key: bytes) -> str | None:
        """The label of an allowed key, or None when it is not allowed."""
        self.refresh()
        with self._lock:
            return self._keys.get(key)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials callback: allow only listed keys in fednb's domain."""
        allowed = domain == ZAP_DOMAIN and self.label(key) is not None
        if not allowed:
            log.warning("refused a CURVE handshake from key %s (domain %r)", key[:12].decode(errors="replace"), domain)
        return allowed


class Authenticator:
    """A ZAP handler thread for one context, enforcing an :class:`AllowList`.

    Start it before binding a CURVE server socket: without a ZAP handler libzmq accepts any
    client that knows the server key.
    """

    def __init__(self, context: zmq.Context, allow: AllowList) -> None:
        require_curve()
        self.allow = allow
        self._thread = ThreadAuthenticator(context, log=logging.getLogger("fednb.zap"))

    def start(self) -> None:
        self._thread.start()
        self._thread.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allow)

    def stop(self) -> None:
        self._thread.stop()

    def revoked(self) -> set[bytes]:
        """Keys removed from the list since the last call; their open sessions should end."""
        return self.allow.refresh()
