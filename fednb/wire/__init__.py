"""The wire: a JSON header plus raw tensor buffers, validated before anything is allocated.

This layer knows nothing of sockets or torch; the transport moves its frames.
"""

from __future__ import annotations

from fednb.wire.codec import DTYPES, BufferDescriptor, decode_array, encode_array, wire_dtype
from fednb.wire.envelope import MESSAGE_TYPES, PROTOCOL_VERSION, Message, decode, encode, new_id
from fednb.wire.limits import DEFAULT_LIMITS, MAX_METRICS, Limits
from fednb.wire.messages import check_content, check_evaluation, check_metrics

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "MAX_METRICS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "BufferDescriptor",
    "Limits",
    "Message",
    "check_content",
    "check_evaluation",
    "check_metrics",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
    "new_id",
    "wire_dtype",
]
