"""FedAvgM: FedAvg with momentum applied on the coordinator.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019. Each round the averaged update defines a pseudo-gradient
``d = current − mean(updates)``; the coordinator keeps a velocity ``v = momentum · v + d``
across rounds and steps ``new = current − server_lr · v``. With ``server_lr = 1`` and
``momentum = 0`` this is FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.fedavg import MeanAggregation

__all__ = ["FedAvgM"]


def _float_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype momentum is kept in: float32, or float64 for float64 weights."""
    return np.dtype(np.float64) if dtype.itemsize > 4 else np.dtype(np.float32)


class FedAvgM(Strategy):
    """Server momentum over the averaged update; the velocity lives on this instance.

    Integer tensors (such as BatchNorm's ``num_batches_tracked``) are averaged as in
    FedAvg, without momentum. When the model's names or shapes change, the velocity
    starts again from zero.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if isinstance(server_lr, bool) or not isinstance(server_lr, (int, float)):
            raise ValueError(f"server_lr must be a number, got {server_lr!r}")
        if not math.isfinite(server_lr) or server_lr <= 0:
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise ValueError(f"momentum must be a number, got {momentum!r}")
        if not (0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self._velocity: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        """Forget the velocity, as before the first round."""
        self._velocity = {}

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return _MomentumAggregation(self, current)

    def _step(self, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Apply one momentum step; updates the velocity, returns the new weights."""
        floats = [k for k, w in current.items() if w.dtype.kind == "f"]
        same_model = set(self._velocity) == set(floats) and all(
            self._velocity[k].shape == current[k].shape for k in floats
        )
        velocity = self._velocity if same_model else {}
        new: dict[str, np.ndarray] = {}
        updated: dict[str, np.ndarray] = {}
        for key, w in current.items():
            if w.dtype.kind != "f":
                new[key] = mean[key]
                continue
            dtype = _float_dtype(w.dtype)
            w_acc = w.astype(dtype, copy=False)
            d = np.subtract(w_acc, mean[key], dtype=dtype)
            if key in velocity:
                v = np.multiply(velocity[key], dtype.type(self.momentum))
                v += d
            else:
                v = d
            updated[key] = v
            step = np.multiply(v, dtype.type(self.server_lr))
            new[key] = np.subtract(w_acc, step).astype(w.dtype, copy=False)
        self._velocity = updated
        return new

    def __repr__(self) -> str:
        return f"FedAvgM(server_lr={self.server_lr!r}, momentum={self.momentum!r})"


class _MomentumAggregation(Aggregation):
    """FedAvg's streaming mean, then one momentum step when the result is taken."""

    def __init__(self, strategy: FedAvgM, current: Mapping[str, np.ndarray]) -> None:
        self._strategy = strategy
        # a private copy: the caller may load the weights into a model and change them
        self._current = {k: np.array(v, copy=True) for k, v in current.items()}
        self._mean = MeanAggregation(self._current)
        self._result: dict[str, np.ndarray] | None = None

    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        if self._result is not None:
            raise ValueError("this round's result was already taken; start a new round")
        self._mean.add(update, examples)

    def result(self) -> dict[str, np.ndarray]:
        # the momentum step changes the strategy's state, so it runs once per round
        if self._result is None:
            self._result = self._strategy._step(self._current, self._mean.result())
        return {k: v.copy() for k, v in self._result.items()}
