"""Messages between a party and its worker processes: wire frames in a sealed memfd, passed by descriptor.

Each message is one ``SOCK_SEQPACKET`` record, ``[count: u32][size: u64 × count]``, carrying one
file descriptor: a ``memfd`` holding the frames of the wire envelope (``fednb.wire.encode``)
back to back, sealed against any further change. The receiver checks the record, the seals
and the sizes against its limits, maps the memfd read-only and decodes the frames in place:
tensors cross with one copy (into the memfd) and no socket round trips, and a worker that
runs coordinator code cannot change a reply after the party has checked it. No pickle.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import stat
import struct
import time
from typing import Any

from fednb.errors import WireError
from fednb.wire import DEFAULT_LIMITS, Limits, Message, decode, encode

_COUNT = struct.Struct("<I")
_SIZE = struct.Struct("<Q")
_SEALED = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_CHUNK = 64 << 20


class PipeClosed(EOFError):
    """The other end closed the socket."""


def send_message(sock: socket.socket, message: Message, *, limits: Limits = DEFAULT_LIMITS,
                 deadline: float | None = None) -> int:
    """Send ``message``; returns the bytes of its frames. ``socket.timeout`` past ``deadline``."""
    frames = encode(message, limits)
    views = [memoryview(frame).cast("B") for frame in frames]
    sizes = [view.nbytes for view in views]
    fd = os.memfd_create("fednb-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        offset = 0
        for view in views:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:done + _CHUNK], offset + done)
            offset += done
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALED | fcntl.F_SEAL_SEAL)
        record = _COUNT.pack(len(sizes)) + b"".join(_SIZE.pack(n) for n in sizes)
        _wait(sock, deadline, write=True)
        socket.send_fds(sock, [record], [fd])
    finally:
        os.close(fd)
    return sum(sizes)


def receive_message(sock: socket.socket, *, limits: Limits = DEFAULT_LIMITS,
                    deadline: float | None = None) -> tuple[Message, int]:
    """The next message and its size; PipeClosed at end of stream, WireError when malformed,
    ``socket.timeout`` past ``deadline`` (a monotonic time)."""
    _wait(sock, deadline, write=False)
    record, fds, flags, _ = socket.recv_fds(sock, _COUNT.size + _SIZE.size * (limits.max_buffers + 1), 1)
    try:
        if not record and not fds:
            raise PipeClosed("end of stream")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 1:
            raise WireError("a local message must carry exactly one descriptor")
        sizes = _sizes(record, limits)
        region = _map(fds[0], sum(sizes))
    finally:
        for fd in fds:
            os.close(fd)
    frames: list[Any] = []
    offset = 0
    whole = memoryview(region) if region is not None else memoryview(b"")
    for size in sizes:
        frames.append(whole[offset:offset + size])
        offset += size
    return decode(frames, limits), sum(sizes)


def _sizes(record: bytes, limits: Limits) -> list[int]:
    if len(record) < _COUNT.size:
        raise WireError("a local message record is too short")
    count = _COUNT.unpack_from(record)[0]
    if not 1 <= count <= limits.max_buffers + 1 or len(record) != _COUNT.size + _SIZE.size * count:
        raise WireError(f"a local message record of {len(record)} bytes does not describe {count} frames")
    sizes = [_SIZE.unpack_from(record, _COUNT.size + i * _SIZE.size)[0] for i in range(count)]
    if sizes[0] > limits.max_header_bytes:
        raise WireError(f"a local message header of {sizes[0]} bytes is over the limit")
    if any(n > limits.max_buffer_bytes for n in sizes[1:]) or sum(sizes[1:]) > limits.max_message_bytes:
        raise WireError("a local message is over the size limits")
    return sizes


def _map(fd: int, size: int) -> mmap.mmap | None:
    """Map a sealed memfd of exactly ``size`` bytes read-only; nobody can change it any more."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        raise WireError(f"a local message holds {info.st_size} bytes, its record says {size}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise WireError("a local message must come in a sealed memfd") from None
    if seals & _SEALED != _SEALED:
        raise WireError("a local message must be sealed against writes")
    if size == 0:
        return None
    # MAP_POPULATE maps every page at once: one call instead of a fault per 4 KiB page
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)


def _wait(sock: socket.socket, deadline: float | None, *, write: bool) -> None:
    timeout = None if deadline is None else deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
        raise socket.timeout("past the deadline")
    ready = select.select([], [sock], [], timeout) if write else select.select([sock], [], [], timeout)
    if not (ready[1] if write else ready[0]):
        raise socket.timeout("past the deadline")
