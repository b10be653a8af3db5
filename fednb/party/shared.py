"""A party's datasets in sealed, read-only shared memory, handed to its worker processes.

Each array is copied once into a ``memfd`` that is then sealed against writes and mapped
read-only. Workers map the same pages: no copy per worker, and coordinator code that writes
to a dataset tensor faults (its worker dies and is restarted) instead of changing the data.
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


def share_array(name: str, array: np.ndarray) -> dict[str, Any]:
    """Copy ``array`` into a sealed memfd; returns ``{"fd", "dtype", "shape"}`` (the fd stays open)."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"dataset array {name} has dtype {array.dtype}; parties hold numbers only")
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


def map_array(spec: dict[str, Any]) -> np.ndarray:
    """The read-only array a :func:`share_array` spec describes (validated: this crosses processes)."""
    fd, shape = spec.get("fd"), spec.get("shape")
    dtype = np.dtype(str(spec.get("dtype")))
    if dtype.kind not in "biuf" or not isinstance(fd, int) or not isinstance(shape, list) or \
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
    """Specs for every split's x and y (their fds must stay open while workers may start)."""
    specs: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for split_name, split in datasets.splits.items():
            specs[split_name] = {part: share_array(f"{split_name}-{part}", getattr(split, part)) for part in ("x", "y")}
    except BaseException:
        close_specs(specs)
        raise
    return specs


def map_datasets(specs: dict[str, Any]) -> Datasets:
    """The read-only :class:`Datasets` the specs describe (``test`` is present, so nothing is re-split)."""
    if not isinstance(specs, dict) or "train" not in specs:
        raise DataError("shared datasets need a train split")
    return Datasets({name: Split(map_array(parts["x"]), map_array(parts["y"])) for name, parts in specs.items()})


def spec_fds(specs: dict[str, dict[str, dict[str, Any]]]) -> list[int]:
    return [part["fd"] for split in specs.values() for part in split.values()]


def close_specs(specs: dict[str, dict[str, dict[str, Any]]]) -> None:
    for fd in spec_fds(specs):
        try:
            os.close(fd)
        except OSError:
            continue
