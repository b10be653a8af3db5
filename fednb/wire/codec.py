"""Tensor codec: numpy arrays to (descriptor, raw little-endian buffer) and back.

Decoding validates the descriptor against the allow-list and the frame's length before it
builds an array, and never copies: the array is a read-only view on the received frame.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from fednb.errors import WireError
from fednb.wire.limits import DEFAULT_LIMITS, Limits

#: Wire dtype names and their little-endian numpy dtypes. Nothing else crosses the wire.
DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    # secure aggregation's masked inputs: integers mod 2^32 (2^64 above 32 bits)
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}

_BY_CODE = {dtype.str[1:]: name for name, dtype in DTYPES.items()}


class BufferDescriptor(TypedDict):
    """What the header says about one buffer frame."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int


def wire_dtype(dtype: np.dtype[Any]) -> str:
    """The wire name of a numpy dtype, or ValueError when it may not travel."""
    try:
        return _BY_CODE[dtype.str[1:]]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}") from None


def encode_array(name: str, array: np.ndarray) -> tuple[BufferDescriptor, memoryview]:
    """Describe ``array`` and expose its bytes without copying when it is contiguous."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"buffer {name!r} must be a numpy array, got {type(array).__name__}")
    kind = wire_dtype(array.dtype)
    target = DTYPES[kind]
    if array.dtype != target or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=target)
    descriptor: BufferDescriptor = {
        "name": name,
        "dtype": kind,
        "shape": [int(n) for n in array.shape],
        "nbytes": int(array.nbytes),
    }
    return descriptor, array.reshape(-1).view(np.uint8).data


def check_descriptor(raw: Any, limits: Limits = DEFAULT_LIMITS) -> BufferDescriptor:
    """Validate one buffer descriptor from a decoded header."""
    if not isinstance(raw, dict) or set(raw) != {"name", "dtype", "shape", "nbytes"}:
        raise WireError("buffer descriptor must have exactly: name, dtype, shape, nbytes")
    name, kind, shape, nbytes = raw["name"], raw["dtype"], raw["shape"], raw["nbytes"]
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_length:
        raise WireError(f"buffer name must be a string of 1..{limits.max_name_length} characters")
    if not isinstance(kind, str) or kind not in DTYPES:
        raise WireError(f"buffer {name!r}: dtype {kind!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError(f"buffer {name!r}: shape must be a list of at most {limits.max_ndim} sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError(f"buffer {name!r}: shape entries must be non-negative integers")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise WireError(f"buffer {name!r}: nbytes must be a non-negative integer")
    if nbytes > limits.max_buffer_bytes:
        raise WireError(f"buffer {name!r}: {nbytes} bytes exceeds the limit of {limits.max_buffer_bytes}")
    count = 1
    for n in shape:
        count *= n
    if count * DTYPES[kind].itemsize != nbytes:
        raise WireError(f"buffer {name!r}: shape {shape} of {kind} does not make {nbytes} bytes")
    if any(n > limits.max_buffer_bytes for n in shape):  # an empty buffer with dimensions numpy cannot hold
        raise WireError(f"buffer {name!r}: a dimension of shape {shape} exceeds the limit of {limits.max_buffer_bytes}")
    return {"name": name, "dtype": kind, "shape": list(shape), "nbytes": nbytes}


def decode_array(descriptor: BufferDescriptor, frame: Any) -> np.ndarray:
    """A read-only array viewing ``frame`` (any buffer), after checking its length."""
    view = memoryview(frame)
    if view.nbytes != descriptor["nbytes"]:
        raise WireError(
            f"buffer {descriptor['name']!r}: frame has {view.nbytes} bytes, header says {descriptor['nbytes']}"
        )
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    array = np.frombuffer(view, dtype=DTYPES[descriptor["dtype"]])
    try:
        array = array.reshape(descriptor["shape"])
    except ValueError as exc:  # an empty buffer with dimensions numpy cannot index (their product overflows)
        raise WireError(f"buffer {descriptor['name']!r}: shape {descriptor['shape']} cannot be built ({exc})") from None
    array.flags.writeable = False
    return array
