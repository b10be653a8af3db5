"""A server optimizer's plumbing: the round's mean, then one step from the current weights.

FedAvgM and the adaptive strategies (FedAdam, FedYogi, FedAdagrad) share it. The round streams
the updates into FedAvg's example-weighted mean; when the result is taken, the strategy's step
turns ``(current, mean)`` into the new weights, once per round. What such a strategy keeps
between rounds is a few arrays per float tensor ("slots": FedAvgM's velocity, Adam's m and v),
which :func:`pack_state` flattens into ``{"<slot>/<tensor>": array, "steps": n}`` (plain numpy
arrays and numbers, so a checkpoint saves it as an ``.npz``, without pickle) and
:func:`unpack_state` checks on the way back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from fednb.strategies.base import Aggregation
from fednb.strategies.fedavg import MeanAggregation

__all__ = ["ServerStepAggregation", "check_number", "float_dtype", "pack_state", "same_model", "unpack_state"]

#: ``step(current, mean) -> new weights``; it may update the strategy's state.
Step = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], dict[str, np.ndarray]]

Slots = dict[str, dict[str, np.ndarray]]


def float_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype a server step computes and keeps its state in: float32, or float64 for float64 weights."""
    return np.dtype(np.float64) if dtype.itemsize > 4 else np.dtype(np.float32)


def check_number(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = True) -> float:
    """``value`` as a float, or ValueError naming ``name=`` and the interval it must lie in."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    interval = f"{lo}{low:g}, {'∞' if high is None else f'{high:g}'}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}= must be a number in {interval}, got {value!r}")
    v = float(value)
    above = v > low if low_open else v >= low
    below = True if high is None else (v < high if high_open else v <= high)
    if not (math.isfinite(v) and above and below):
        raise ValueError(f"{name}= must be a number in {interval}, got {value!r}")
    return v


def same_model(slot: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> bool:
    """Whether ``slot`` holds one array for each float tensor of ``current``, shaped alike."""
    floats = [k for k, w in current.items() if w.dtype.kind == "f"]
    return set(slot) == set(floats) and all(slot[k].shape == current[k].shape for k in floats)


def pack_state(slots: Mapping[str, Mapping[str, np.ndarray]], steps: int) -> dict[str, Any]:
    """``{"<slot>/<tensor>": a copy of the array, ..., "steps": steps}``."""
    state: dict[str, Any] = {f"{slot}/{key}": np.array(value, copy=True)
                             for slot, arrays in slots.items() for key, value in arrays.items()}
    state["steps"] = int(steps)
    return state


def unpack_state(state: Mapping[str, Any], names: tuple[str, ...]) -> tuple[Slots, int]:
    """:func:`pack_state`'s output back as ``({slot: {tensor: array}}, steps)``; ValueError on
    anything else: an unknown entry, a non-float or non-finite array, slots that disagree."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a strategy state must be a mapping, got {type(state).__name__}")
    slots: Slots = {name: {} for name in names}
    steps_value = state.get("steps", 0)
    if isinstance(steps_value, np.ndarray) and steps_value.shape == ():
        steps_value = steps_value.item()  # as np.load gives it back
    if isinstance(steps_value, bool) or not isinstance(steps_value, (int, np.integer)) or steps_value < 0:
        raise ValueError(f"state entry 'steps' must be an integer >= 0, got {steps_value!r}")
    for entry, value in state.items():
        if entry == "steps":
            continue
        slot, sep, key = str(entry).partition("/")
        if not sep or slot not in slots or not key:
            expected = ", ".join(f"'{n}/<tensor>'" for n in names)
            raise ValueError(f"unexpected state entry {entry!r} (expected {expected} and 'steps')")
        array = np.asarray(value)
        if array.dtype.kind != "f" or not np.isfinite(array).all():
            raise ValueError(f"state entry {entry!r} must be a finite float array")
        slots[slot][key] = np.array(array, copy=True)
    first = slots[names[0]]
    for name in names[1:]:
        if set(slots[name]) != set(first) or any(slots[name][k].shape != first[k].shape for k in first):
            raise ValueError(f"state slots {names[0]!r} and {name!r} do not cover the same tensors and shapes")
    return slots, int(steps_value)


class ServerStepAggregation(Aggregation):
    """FedAvg's streaming mean, then one server ``step(current, mean)`` when the result is taken."""

    def __init__(self, current: Mapping[str, np.ndarray], step: Step) -> None:
        # a private copy: the caller may load the weights into a model and change them
        self._current = {k: np.array(v, copy=True) for k, v in current.items()}
        self._mean = MeanAggregation(self._current)
        self._step = step
        self._result: dict[str, np.ndarray] | None = None

    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        if self._result is not None:
            raise ValueError("this round's result was already taken; start a new round")
        self._mean.add(update, examples)

    def result(self) -> dict[str, np.ndarray]:
        # the step changes the strategy's state, so it runs once per round
        if self._result is None:
            self._result = self._step(self._current, self._mean.result())
        return {k: v.copy() for k, v in self._result.items()}
