"""Replacing a file atomically: what every ledger, approval and head file of a party is written with."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: a temporary file in the same directory, fsync, rename, fsync of the
    directory (without the last, a crash could bring back the old directory entry, and the old file).
    A crash leaves the old file or the new one, never half of either. ``durable=False`` skips both
    fsyncs (a simulation's temporary files: a process that dies still leaves one file or the other)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
