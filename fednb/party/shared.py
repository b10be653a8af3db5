"""A party's datasets in sealed, read-only shared memory, handed to its worker processes.

Each array is copied once into a ``memfd`` that is then sealed against writes and mapped
read-only. Workers map the same pages: no copy per worker, and coordinator code that writes
to a dataset tensor faults (its worker dies and is restarted) instead of changing the data.

A split travels as its parts: ``x``, ``y`` (absent at a feature party, which holds no label)
and ``ids`` (the row ids of a vertical federation's table, an ``S<k>`` bytes array).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any

import numpy as np

from fednb.errors import DataError
from fednb.party.datasets import Datasets, Split

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
#: The parts of a split and the dtype kinds each may have: numbers, and ids as bytes.
PARTS = {"x": "biuf", "y": "biuf", "ids": "S"}
NUMBERS = PARTS["x"]


def share_array(name: str, array: np.ndarray, kinds: str = NUMBERS) -> dict[str, Any]:
    """Copy ``array`` into a sealed memfd; returns ``{"fd", "dtype", "shape"}`` (the fd stays open).

    ``kinds`` are the dtype kinds allowed (numbers by default).
    """
    if array.dtype.kind not in kinds:
        what = "numbers" if kinds == NUMBERS else f"dtype kinds {kinds!r}"
        raise DataError(f"dataset array {name} has dtype {array.dtype}; it may hold {what} only")
    data = np.ascontiguousarray(array)
    fd = os.memfd_create(f"fednb-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data.reshape(-1).view(np.uint8).data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:written + (64 << 20)])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return {"fd": fd, "dtype": data.dtype.str, "shape": [int(n) for n in data.shape]}


def map_array(spec: dict[str, Any], kinds: str = NUMBERS) -> np.ndarray:
    """The read-only array a :func:`share_array` spec describes (validated: this crosses processes)."""
    if not isinstance(spec, dict):
        raise DataError(f"malformed shared array spec {spec!r}")
    fd, shape = spec.get("fd"), spec.get("shape")
    try:
        dtype = np.dtype(str(spec.get("dtype")))
    except TypeError:
        raise DataError(f"malformed shared array spec {spec!r}") from None
    if dtype.kind not in kinds or dtype.itemsize == 0 or not isinstance(fd, int) or not isinstance(shape, list) or \
            not all(isinstance(n, int) and n >= 0 for n in shape):
        raise DataError(f"malformed shared array spec {spec!r}")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.fstat(fd).st_size != size:
        raise DataError(f"shared array has {os.fstat(fd).st_size} bytes, expected {size}")
    if size == 0:
        empty = np.empty(shape, dtype)
        empty.flags.writeable = False
        return empty
    region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    return np.frombuffer(region, dtype=dtype).reshape(shape)


def share_datasets(datasets: Datasets) -> dict[str, dict[str, dict[str, Any]]]:
    """Specs for every split's x, y and ids, those it has (their fds must stay open while workers may start)."""
    specs: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for split_name, split in datasets.splits.items():
            parts: dict[str, dict[str, Any]] = {}
            specs[split_name] = parts
            for part, kinds in PARTS.items():
                array = getattr(split, part)
                if array is not None:
                    parts[part] = share_array(f"{split_name}-{part}", array, kinds)
    except BaseException:
        close_specs(specs)
        raise
    return specs


def map_datasets(specs: dict[str, Any]) -> Datasets:
    """The read-only :class:`Datasets` the specs describe (as shared: a held-out split is not re-split)."""
    if not isinstance(specs, dict) or "train" not in specs:
        raise DataError("shared datasets need a train split")
    splits: dict[str, Split] = {}
    for name, parts in specs.items():
        if not isinstance(parts, dict) or "x" not in parts or not set(parts) <= set(PARTS):
            held = sorted(parts) if isinstance(parts, dict) else parts
            raise DataError(f"malformed shared split {name!r}: parts {held!r}")
        arrays = {part: map_array(spec, PARTS[part]) for part, spec in parts.items()}
        try:
            splits[name] = Split(arrays["x"], arrays.get("y"), arrays.get("ids"))
        except ValueError as exc:
            raise DataError(f"shared split {name!r}: {exc}") from exc
    return Datasets(splits)


def spec_fds(specs: dict[str, dict[str, dict[str, Any]]]) -> list[int]:
    return [part["fd"] for split in specs.values() for part in split.values()]


def close_specs(specs: dict[str, dict[str, dict[str, Any]]]) -> None:
    for fd in spec_fds(specs):
        try:
            os.close(fd)
        except OSError:
            continue
