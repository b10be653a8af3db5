"""A message inside a message: small JSON and named arrays as one byte string, for payloads sealed party to party.

The same header and buffer rules as the wire (:mod:`fednb.wire.envelope`): the bundle is the
frames of a ``vertical`` message, each prefixed by its length, and decoding validates it as the
wire does (after the seal has been opened, so only the sending party could have written it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.errors import WireError
from fednb.wire.envelope import Message, decode, encode
from fednb.wire.limits import Limits

LENGTH = 8
LIMITS = Limits(max_header_bytes=1024 * 1024, max_buffers=4096)


def pack(content: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """``content`` (plain JSON) and ``arrays`` as one byte string."""
    frames = encode(Message("vertical", dict(content), arrays=dict(arrays)), LIMITS)
    return b"".join(len(memoryview(f).cast("B")).to_bytes(LENGTH, "little") + bytes(f) for f in frames)


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What :func:`pack` wrote; WireError for anything else."""
    frames: list[bytes] = []
    at = 0
    while at < len(data):
        if at + LENGTH > len(data) or len(frames) > LIMITS.max_buffers:
            raise WireError("a bundle is cut short")
        size = int.from_bytes(data[at:at + LENGTH], "little")
        at += LENGTH
        if at + size > len(data):
            raise WireError("a bundle is cut short")
        frames.append(data[at:at + size])
        at += size
    message = decode(frames, LIMITS)
    return dict(message.content), {name: np.asarray(a) for name, a in message.arrays.items()}
