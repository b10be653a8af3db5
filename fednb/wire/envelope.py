"""The envelope: one JSON header frame followed by raw tensor buffer frames.

::

    [routing…] [header] [buffer 0] [buffer 1] …
    header = {"v": 1, "id": "…", "type": "train", "round": 3, "reply_to": null,
              "content": {…}, "buffers": [{"name", "dtype", "shape", "nbytes"}, …]}

``encode`` returns the frames without copying tensor bytes; ``decode`` checks the header
(version, known type, id, round, limits, every descriptor against its frame) before it
builds any array, and raises :class:`~fednb.errors.WireError` for anything wrong.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from fednb.errors import WireError
from fednb.wire.codec import BufferDescriptor, check_descriptor, decode_array, encode_array
from fednb.wire.limits import DEFAULT_LIMITS, Limits

PROTOCOL_VERSION = 1

MessageType = Literal[
    # coordinator -> party
    "hello", "train", "secagg", "vertical", "evaluate", "run", "cancel", "heartbeat",
    # party -> coordinator
    "welcome", "result", "error", "status",
]
MESSAGE_TYPES: frozenset[str] = frozenset(get_args(MessageType))

_HEADER_KEYS = frozenset({"v", "id", "type", "round", "reply_to", "content", "buffers"})
_ID = re.compile(r"[0-9a-f]{32}")
_MAX_ROUND = 2**31 - 1


def new_id() -> str:
    """A fresh message id: 128 random bits as 32 hex digits."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Message:
    """One decoded (or to-be-encoded) message.

    ``arrays`` maps buffer names to numpy arrays; decoded arrays are read-only views on
    the received frames, so whoever keeps one keeps its frame alive.
    """

    type: str
    content: Mapping[str, Any] = field(default_factory=dict)
    round: int | None = None
    id: str = field(default_factory=new_id)
    reply_to: str | None = None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def reply(self, type: str, content: Mapping[str, Any] | None = None, arrays: Mapping[str, np.ndarray] | None = None) -> Message:
        """A message answering this one: same round, ``reply_to`` set to this id."""
        return Message(type=type, content=dict(content or {}), round=self.round, reply_to=self.id, arrays=dict(arrays or {}))


def encode(message: Message, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """Frames for ``message``: the header as bytes, then one zero-copy view per array.

    Raises ValueError for a message this side should never have built (unknown type,
    content that is not JSON, a disallowed dtype, a limit exceeded).
    """
    if message.type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {message.type!r}")
    descriptors: list[BufferDescriptor] = []
    views: list[memoryview] = []
    total = 0
    for name, array in message.arrays.items():
        descriptor, view = encode_array(name, array)
        total += descriptor["nbytes"]
        descriptors.append(descriptor)
        views.append(view)
    if len(views) > limits.max_buffers or total > limits.max_message_bytes:
        raise ValueError(f"message too large: {len(views)} buffers, {total} bytes")
    header = {
        "v": PROTOCOL_VERSION,
        "id": message.id,
        "type": message.type,
        "round": message.round,
        "reply_to": message.reply_to,
        "content": dict(message.content),
        "buffers": descriptors,
    }
    try:
        # ensure_ascii=False: the strict UTF-8 encode refuses a lone surrogate here, as the peer would
        raw = json.dumps(header, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("message content holds a string that is not valid Unicode (a lone surrogate)") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"message content is not plain JSON: {exc}") from None
    if len(raw) > limits.max_header_bytes:
        raise ValueError(f"message header of {len(raw)} bytes exceeds {limits.max_header_bytes}")
    return [raw, *views]


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate and decode ``[header, *buffers]`` (bytes, memoryviews or zmq frames)."""
    if not frames:
        raise WireError("empty message")
    header = _parse_header(_as_bytes(frames[0], limits.max_header_bytes), limits)
    descriptors = header["buffers"]
    if len(descriptors) != len(frames) - 1:
        raise WireError(f"header lists {len(descriptors)} buffers but {len(frames) - 1} frames follow")
    arrays: dict[str, np.ndarray] = {}
    for descriptor, frame in zip(descriptors, frames[1:]):
        arrays[descriptor["name"]] = decode_array(descriptor, _buffer_of(frame))
    return Message(
        type=header["type"],
        content=header["content"],
        round=header["round"],
        id=header["id"],
        reply_to=header["reply_to"],
        arrays=arrays,
    )


def _buffer_of(frame: Any) -> Any:
    buffer = getattr(frame, "buffer", None)  # zmq.Frame: its zero-copy memoryview
    return frame if buffer is None else buffer


def _as_bytes(frame: Any, limit: int) -> bytes:
    try:
        view = memoryview(_buffer_of(frame))
    except TypeError:
        raise WireError(f"frame of type {type(frame).__name__} is not a buffer") from None
    if view.nbytes > limit:
        raise WireError(f"header of {view.nbytes} bytes exceeds the limit of {limit}")
    return view.tobytes()


def _reject_constant(name: str) -> Any:
    raise WireError(f"header contains the non-JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise WireError("header repeats a key in one object")
    return result


def _check_values(header: Any, limit: int) -> None:
    """Fail when the decoded header nests deeper than ``limit`` or holds a string UTF-8 cannot encode.

    JSON's ``\\ud800`` escapes decode to lone surrogates, which every later ``str.encode``
    (a code hash, a log line, the reply) would raise on; they are refused here, in the one walk
    that also bounds the nesting. The header's own object is level 0, so ``content`` is level 1.
    """
    stack: list[tuple[Any, int]] = [(header, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise WireError(f"header nests deeper than {limit} levels")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                _check_text(key)
                stack.append((value, depth + 1))
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise WireError("header holds a string that is not valid Unicode (a lone surrogate escape such as "
                            "\\ud800)") from None


def _parse_header(raw: bytes, limits: Limits) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except WireError:
        raise
    except RecursionError:
        raise WireError(f"header nests deeper than {limits.max_json_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise WireError(f"header must be an object with exactly the keys: {', '.join(sorted(_HEADER_KEYS))}")
    if header["v"] != PROTOCOL_VERSION or isinstance(header["v"], bool):
        raise WireError(f"protocol version {header['v']!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    if not isinstance(header["id"], str) or not _ID.fullmatch(header["id"]):
        raise WireError("message id must be 32 lowercase hex digits")
    if header["type"] not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {header['type']!r}")
    round_ = header["round"]
    if round_ is not None and (not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ <= _MAX_ROUND):
        raise WireError("round must be null or an integer in 0..2^31-1")
    reply_to = header["reply_to"]
    if reply_to is not None and (not isinstance(reply_to, str) or not _ID.fullmatch(reply_to)):
        raise WireError("reply_to must be null or a message id")
    if not isinstance(header["content"], dict):
        raise WireError("content must be a JSON object")
    _check_values(header, limits.max_json_depth)
    buffers = header["buffers"]
    if not isinstance(buffers, list) or len(buffers) > limits.max_buffers:
        raise WireError(f"buffers must be a list of at most {limits.max_buffers} descriptors")
    descriptors = [check_descriptor(raw_descriptor, limits) for raw_descriptor in buffers]
    names = [descriptor["name"] for descriptor in descriptors]
    if len(set(names)) != len(names):
        raise WireError("buffer names must be unique")
    total = sum(descriptor["nbytes"] for descriptor in descriptors)
    if total > limits.max_message_bytes:
        raise WireError(f"buffers total {total} bytes, over the limit of {limits.max_message_bytes}")
    header["buffers"] = descriptors
    return header
