"""Plain values as JSON plus arrays: what a ``run`` request may return.

Allowed: None, booleans, integers, floats (NaN and infinities included), strings of at most
1 KiB, numpy arrays and scalars, and lists, tuples and dicts (string or integer keys) of those. Arrays
travel as buffers; the JSON refers to them as ``{"$array": name}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.errors import WireError

MAX_STRING = 1024
MAX_ITEMS = 100_000
MAX_DEPTH = 16


def pack_value(value: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """JSON-able form of ``value`` and the arrays it refers to; ValueError if not allowed."""
    arrays: dict[str, np.ndarray] = {}
    budget = [MAX_ITEMS]

    def pack(item: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"the value has more than {MAX_ITEMS} items")
        if depth > MAX_DEPTH:
            raise ValueError(f"the value nests deeper than {MAX_DEPTH} levels")
        if item is None or isinstance(item, (bool, int)):
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
                return float(item)
            return item
        if isinstance(item, float):
            return item if math.isfinite(item) else {"$float": repr(item)}
        if isinstance(item, str):
            if len(item.encode()) > MAX_STRING:
                raise ValueError(f"a string of {len(item.encode())} bytes is longer than {MAX_STRING}")
            return item
        if isinstance(item, np.generic):
            return pack(item.item(), depth)
        if isinstance(item, np.ndarray):
            name = f"v{len(arrays)}"
            arrays[name] = item
            return {"$array": name}
        if isinstance(item, (list, tuple)):
            return [pack(element, depth + 1) for element in item]
        if isinstance(item, Mapping):
            if all(isinstance(key, str) for key in item):
                packed = {key: pack(element, depth + 1) for key, element in item.items()}
                return {"$dict": packed} if any(k.startswith("$") for k in packed) or not packed else packed
            if all(isinstance(key, (str, int, np.integer)) and not isinstance(key, bool) for key in item):
                return {"$items": [[pack(key, depth + 1), pack(element, depth + 1)] for key, element in item.items()]}
            raise ValueError("dict keys must be strings or integers")
        raise ValueError(f"a {type(item).__name__} cannot be returned; return numbers, short strings, arrays or lists/dicts of them")

    return pack(value, 0), arrays


def unpack_value(packed: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The value :func:`pack_value` packed; WireError when the JSON does not fit its shape."""
    budget = [MAX_ITEMS]

    def unpack(item: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_DEPTH:
            raise WireError("returned value is too large or too deep")
        if item is None or isinstance(item, (bool, int, float)):
            return item
        if isinstance(item, str):
            if len(item.encode()) > MAX_STRING:
                raise WireError("returned string is longer than 1 KiB")
            return item
        if isinstance(item, list):
            return [unpack(element, depth + 1) for element in item]
        if isinstance(item, dict):
            if set(item) == {"$array"}:
                name = item["$array"]
                if not isinstance(name, str) or name not in arrays:
                    raise WireError(f"returned value refers to a missing array {name!r}")
                return arrays[name]
            if set(item) == {"$float"}:
                if item["$float"] not in ("nan", "inf", "-inf"):
                    raise WireError("returned value has a malformed float")
                return float(item["$float"])
            if set(item) == {"$items"} and isinstance(item["$items"], list):
                pairs = item["$items"]
                if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) and not isinstance(p[0], bool)
                           for p in pairs):
                    raise WireError("returned value has malformed dict items")
                return {key: unpack(element, depth + 1) for key, element in pairs}
            if set(item) == {"$dict"} and isinstance(item["$dict"], dict):
                item = item["$dict"]
            elif any(key.startswith("$") for key in item):
                raise WireError("returned value has an unknown $-key")
            return {key: unpack(element, depth + 1) for key, element in item.items()}
        raise WireError(f"returned value has an unexpected {type(item).__name__}")

    return unpack(packed, 0)
