"""The pool's frames: values tagged and length-prefixed in fednb's own encoding (no pickle), over a stream socket.

A value is bytes, a string, an int of any size or None, or one level of list or tuple of those;
a frame is its length (8 bytes) and its body. :mod:`fednb.privacy.pool` sends a task's name and
arguments this way, and reads the result or the error back.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, TypeAlias

_U64, _U32 = struct.Struct(">Q"), struct.Struct(">I")

Scalar: TypeAlias = "bytes | str | int | None"
Value: TypeAlias = "Scalar | list[Scalar] | tuple[Scalar, ...]"


def _encode(value: object, parts: list[bytes], nested: bool = False) -> None:
    """Append the tagged encoding of ``value`` to ``parts``; TypeError for what frames cannot carry."""
    if value is None:
        parts.append(b"N")
    elif isinstance(value, bytes):
        parts += (b"B", _U64.pack(len(value)), value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        parts += (b"S", _U64.pack(len(data)), data)
    elif isinstance(value, int) and not isinstance(value, bool):  # a bool would come back as an int
        data = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        parts += (b"I", _U64.pack(len(data)), data)
    elif isinstance(value, (list, tuple)) and not nested:
        parts += (b"L" if isinstance(value, list) else b"T", _U32.pack(len(value)))
        for item in value:
            _encode(item, parts, nested=True)
    else:
        also = "" if nested else ", or a list or tuple of those"
        raise TypeError(f"a {type(value).__name__} cannot cross the pool: only bytes, str, int and None{also}")


class _Reader:
    """Reads the tagged values of one frame back, in order."""

    def __init__(self, frame: bytearray) -> None:
        self._view, self._at = memoryview(frame), 0

    def take(self, size: int) -> memoryview:
        if self._at + size > len(self._view):
            raise ValueError("a truncated pool frame")
        self._at += size
        return self._view[self._at - size:self._at]

    def count(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def value(self, nested: bool = False) -> Value:
        tag = bytes(self.take(1))
        if tag == b"N":
            return None
        if tag in (b"L", b"T") and not nested:
            items: list[Any] = [self.value(nested=True) for _ in range(self.count())]
            return items if tag == b"L" else tuple(items)
        if tag not in (b"B", b"S", b"I"):
            raise ValueError(f"unknown tag {tag!r} in a pool frame")
        data = self.take(_U64.unpack(self.take(8))[0])
        if tag == b"B":
            return bytes(data)
        return str(data, "utf-8") if tag == b"S" else int.from_bytes(data, "big", signed=True)

    def text(self) -> str:
        value = self.value()
        if not isinstance(value, str):
            raise ValueError("a pool frame without the text it should hold")
        return value


def _send(sock: socket.socket, body: bytes) -> None:
    sock.sendall(_U64.pack(len(body)), socket.MSG_NOSIGNAL)
    sock.sendall(body, socket.MSG_NOSIGNAL)


def _read_exact(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        read = sock.recv_into(view[got:])
        if read == 0:
            return None
        got += read
    return buffer


def _read_frame(sock: socket.socket) -> bytearray | None:
    """The next frame's body, or None once the other end has closed."""
    header = _read_exact(sock, _U64.size)
    return None if header is None else _read_exact(sock, _U64.unpack(header)[0])
