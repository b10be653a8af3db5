"""Size limits that every decoder checks before it allocates."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Scalar metrics one reply may carry: the wire, the worker's ``report()`` and the egress guard
#: all check this one number (16 floats a round is already 1024 bits a coordinator sees).
MAX_METRICS = 16


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one message; a frame over any of them is refused unread.

    The defaults admit models of a few hundred million float32 parameters while keeping a
    malformed header from making a peer allocate more than ``max_message_bytes``.
    """

    max_header_bytes: int = 4 * MiB
    max_buffers: int = 4096
    max_buffer_bytes: int = 2 * GiB
    max_message_bytes: int = 4 * GiB
    max_name_length: int = 256
    max_ndim: int = 16
    max_json_depth: int = 32

    def __post_init__(self) -> None:
        for field, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{field} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()
