"""The arithmetic of aggregation: weighted means of updates and of metrics.

Pure functions and one streaming accumulator, checked by tests against closed-form
values. Updates are ``dict[str, np.ndarray]`` in state_dict order; they often arrive as
read-only views over received frames, so nothing here writes into an input or mutates
an input mapping.

``RunningMean`` folds updates in one at a time as parties reply, so a round holds one
float64 accumulator per tensor instead of every party's update. Contiguous float64 tensors
are accumulated with BLAS ``daxpy`` (``acc += w · x`` in place, one pass over memory); the
rest (float32 updates, the common case) slice by slice through a cache-sized scratch, which
reads the update once and the accumulator once, where a whole-tensor
``np.multiply(x, w, out=scratch); np.add(acc, scratch, out=acc)`` passes over three times
the memory and first-touches a fresh tensor-sized scratch every round.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from fednb.tensors import check_update

__all__ = ["RunningMean", "weighted_mean", "weighted_metrics"]

# below this many elements the BLAS call's overhead (and importing scipy.linalg, ≈ 0.3 s
# once) is not worth it
_BLAS_MIN_SIZE = 4096
# BLAS takes the element count as a 32-bit int
_BLAS_MAX_SIZE = 2**31 - 1
# values per slice of the accumulation and the final division: 256 KiB of float64, held by a core's L2 cache
_SLICE = 1 << 15

_blas_axpy: dict[np.dtype[Any], Callable[..., np.ndarray]] | None = None


def _axpy_for(dtype: np.dtype[Any]) -> Callable[..., np.ndarray] | None:
    """``saxpy``/``daxpy`` for ``dtype``, importing scipy's BLAS on first use."""
    global _blas_axpy
    if _blas_axpy is None:
        try:
            from scipy.linalg import blas
        except ImportError:  # pragma: no cover - scipy ships with scikit-learn
            _blas_axpy = {}
        else:
            _blas_axpy = {np.dtype(np.float32): blas.saxpy, np.dtype(np.float64): blas.daxpy}
    return _blas_axpy.get(dtype)


_blas_threads: Any = None


def _one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread: an axpy is bound by memory, and BLAS's own
    threads then only contend with the party processes for the cores (on 2 cores: ≈ 0.9 ms
    against ≈ 0.15 ms per 1M float32, measured while the parties ran)."""
    global _blas_threads
    if _blas_threads is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            _blas_threads = False
        else:
            _blas_threads = ThreadpoolController()
    return _blas_threads.limit(limits=1, user_api="blas") if _blas_threads else contextlib.nullcontext()


def _check_weight(weight: float, what: str) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {weight!r}") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"{what} must be finite and > 0, got {weight!r}")
    return w


def _accumulator_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Everything accumulates in float64: an example count times a float32 value is exact there, so the
    sum hardly depends on the order the parties replied in (and a round's mean is the same, to the last
    float32 bit, whoever was first: a resumed run matches an uninterrupted one)."""
    if dtype.kind in "fbiu":
        return np.dtype(np.float64)
    raise ValueError(f"cannot average arrays of dtype {dtype}")


def _finish(total: np.ndarray, weight: float, dtype: np.dtype[Any]) -> np.ndarray:
    """Divide an accumulated sum by the total weight and cast back to ``dtype``.

    Slice by slice through a cache-sized buffer: no float64 copy of the whole tensor is made.
    """
    out = np.empty(total.shape, dtype)
    flat, source = out.reshape(-1), total.reshape(-1)
    scratch = np.empty(min(source.size, _SLICE), total.dtype)
    divisor = total.dtype.type(weight)
    for start in range(0, source.size, _SLICE):
        part = scratch[:min(_SLICE, source.size - start)]
        np.divide(source[start:start + part.size], divisor, out=part)
        if dtype.kind in "biu":
            # integer tensors (BatchNorm's num_batches_tracked): round to nearest
            np.rint(part, out=part)
        flat[start:start + part.size] = part
    return out


_Spec = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


def _spec_of(arrays: Mapping[str, np.ndarray]) -> _Spec:
    """Key order, shapes and dtypes of ``arrays``; unsupported dtypes are refused by key."""
    spec: _Spec = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        try:
            _accumulator_dtype(arr.dtype)
        except ValueError as exc:
            raise ValueError(f"tensor {key!r}: {exc}") from None
        spec[key] = (arr.shape, arr.dtype)
    return spec


def _conform(update: Mapping[str, np.ndarray], spec: _Spec) -> dict[str, np.ndarray]:
    """``update`` as arrays in ``spec``'s key order, or ValueError naming the first problem.

    The checks are :func:`fednb.tensors.check_update`'s, the one that every update passes.
    """
    problem = check_update({key: (shape, dtype.name) for key, (shape, dtype) in spec.items()}, update)
    if problem:
        raise ValueError(f"update {problem}" if problem.startswith(("missing", "unexpected")) else problem)
    return {key: np.asarray(update[key]) for key in spec}


def _by_blas(x: np.ndarray, acc: np.ndarray) -> bool:
    """Whether ``acc += w·x`` goes to BLAS's axpy: a large contiguous tensor of the accumulator's dtype."""
    return x.dtype == acc.dtype and x.flags.c_contiguous and _BLAS_MIN_SIZE <= x.size <= _BLAS_MAX_SIZE


class RunningMean:
    """Streaming weighted mean of updates with the same keys, shapes and dtypes.

    ``template`` (any mapping of arrays, e.g. the current global weights) fixes what
    every update must look like; without it the first update does.
    """

    def __init__(self, template: Mapping[str, np.ndarray] | None = None) -> None:
        self._spec: _Spec | None = None if template is None else _spec_of(template)
        self._acc: dict[str, np.ndarray] = {}
        # the first update, held (only read) until a second one comes: a mean of one update (a secure
        # round's pre-summed mean) is then one copy, with no accumulator to first-touch and divide
        self._first: tuple[dict[str, np.ndarray], float] | None = None
        self._scratch: np.ndarray | None = None  # one slice of float64, shared by every tensor
        self.count = 0
        self.total_weight = 0.0

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold ``update`` in with ``weight`` (> 0); the update itself is only read (the first one is held
        until a second one comes or the mean is taken, so it must not change before then)."""
        w = _check_weight(weight, "weight")
        if self._spec is None:
            # validate the whole update before touching any accumulator
            spec = _spec_of(update) if isinstance(update, Mapping) else {}
            arrays = _conform(update, spec)
            self._spec = spec
        else:
            arrays = _conform(update, self._spec)
        if self.count == 0:
            self._first = (arrays, w)
        else:
            if self._first is not None:
                self._fold(*self._first)
                self._first = None
            self._fold(arrays, w)
        self.count += 1
        self.total_weight += w

    def _fold(self, arrays: dict[str, np.ndarray], w: float) -> None:
        assert self._spec is not None
        if not self._acc:
            self._acc = {k: np.zeros(shape, _accumulator_dtype(dtype)) for k, (shape, dtype) in self._spec.items()}
        # absolute weights (example counts): w·x is exact in float64 for float32 updates, and the sum is
        # the same in any order but for float64 rounding
        # BLAS's thread limit costs a threadpoolctl round trip: only where a tensor goes to BLAS
        blas = any(_by_blas(x, self._acc[key]) for key, x in arrays.items())
        with _one_blas_thread() if blas else contextlib.nullcontext():
            for key, x in arrays.items():
                self._accumulate(key, x, w)

    def _accumulate(self, key: str, x: np.ndarray, w: float) -> None:
        acc = self._acc[key]
        if _by_blas(x, acc):
            axpy = _axpy_for(acc.dtype)
            if axpy is not None:
                # acc and x are contiguous with matching dtype, so f2py hands BLAS the
                # buffers themselves: acc is updated in place, x is only read
                flat = acc.reshape(-1)
                out = axpy(x.reshape(-1), flat, a=w)
                if out is not flat:  # pragma: no cover - f2py made a copy after all
                    np.copyto(acc, out.reshape(acc.shape))
                return
        # slice by slice through a scratch that stays in the cache: x is read once, acc read and
        # written once, and no tensor-sized scratch is allocated (and first touched) per round
        flat, source = acc.reshape(-1), x.reshape(-1)
        if self._scratch is None:
            self._scratch = np.empty(_SLICE, np.float64)
        for start in range(0, flat.size, _SLICE):
            target = flat[start:start + _SLICE]
            product = self._scratch[:target.size]
            np.multiply(source[start:start + target.size], w, out=product, dtype=acc.dtype)
            np.add(target, product, out=target)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean so far, as new arrays in the updates' dtypes and key order."""
        if self.count == 0 or self._spec is None:
            raise ValueError("no updates to average: add() was never called")
        if self._first is not None:  # the mean of one update is that update, exactly
            return {k: np.array(self._first[0][k], dtype=dtype, order="C") for k, (_, dtype) in self._spec.items()}
        return {k: _finish(self._acc[k], self.total_weight, dtype) for k, (_, dtype) in self._spec.items()}


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Reference weighted mean of ``updates``: stacked, in float64, then cast back.

    Integer tensors are rounded to nearest. Validates as :class:`RunningMean` does.
    """
    if len(updates) == 0:
        raise ValueError("no updates to average")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    ws = np.array([_check_weight(w, "weight") for w in weights], dtype=np.float64)
    if not isinstance(updates[0], Mapping):
        raise ValueError(f"an update must be a mapping of name -> array, got {type(updates[0]).__name__}")
    spec = _spec_of(updates[0])
    arrays = [_conform(u, spec) for u in updates]
    result: dict[str, np.ndarray] = {}
    for key, first in arrays[0].items():
        stacked = np.stack([a[key].astype(np.float64) for a in arrays])
        mean = np.tensordot(ws, stacked, axes=1) / ws.sum()
        result[key] = np.asarray(np.rint(mean) if first.dtype.kind in "biu" else mean).astype(first.dtype)
    return result


def weighted_metrics(results: Sequence[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Example-weighted mean of each metric over the results that report it.

    ``results`` holds ``(examples, metrics)`` pairs. Non-finite metric values are left
    out, and so are results with zero examples; a metric with nothing left is omitted.
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for examples, metrics in results:
        try:
            n = float(examples)
        except (TypeError, ValueError):
            raise ValueError(f"example count must be a number, got {examples!r}") from None
        if not math.isfinite(n) or n < 0:
            raise ValueError(f"example count must be finite and >= 0, got {examples!r}")
        if n == 0:
            continue
        for name, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
            if not math.isfinite(v):
                continue
            sums[name] = sums.get(name, 0.0) + n * v
            totals[name] = totals.get(name, 0.0) + n
    return {name: sums[name] / totals[name] for name in sums}
