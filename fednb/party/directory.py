"""A party's directory: where its approvals, pending requests and audit log live.

::

    PARTY_DIR/                 mode 0700: it holds the code coordinators sent
      approvals.json           the owner's decisions by code hash (written atomically)
      pending/HASH.json        requests waiting for the owner (policy review)
      audit.jsonl, audit.head  the hash-chained log of every request
      party.log                the party's own log (``fednb party``), full tracebacks included
      .lock                    serializes read-modify-write between the party and ``fednb approve``

Files are the interface between the party process and the owner's tools, so a decision made
while the party is down is there when it starts, and another process can see what waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fednb.atomic import write_atomic
from fednb.errors import GateError

MAX_FILE = 16 * 1024 * 1024  # bytes of one JSON file this package reads back


def default_directory(name: str) -> Path:
    """``~/.fednb/NAME``: where ``fednb party --name NAME`` keeps its state unless told otherwise."""
    return Path("~/.fednb").expanduser() / name


def open_directory(path: str | os.PathLike[str], *, create: bool) -> Path:
    """The party directory at ``path``, made (mode 0700) when ``create``; refuse one others can use."""
    directory = Path(path).expanduser()
    if create:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / "pending").mkdir(exist_ok=True, mode=0o700)
    if not directory.is_dir():
        raise GateError(f"{directory} is not a party directory (start the party with --dir {directory} first)")
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise GateError(f"{directory} can be written by other users (mode {stat.filemode(info.st_mode)}); "
                        f"run: chmod 700 {directory}")
    return directory


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's lock: one read-modify-write at a time across processes."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` atomically (:func:`fednb.atomic.write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n")


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; GateError naming the file when it is unreadable or malformed."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE + 1)
    except OSError as exc:
        raise GateError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise GateError(f"{path} is larger than {MAX_FILE} bytes")
    try:
        return json.loads(data, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise GateError(f"{path} is not valid JSON: {exc}") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when ``path`` is replaced or written: (inode, size, mtime in ns); None if absent."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)
