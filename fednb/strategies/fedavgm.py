"""FedAvgM: FedAvg with momentum applied on the coordinator.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019. Each round the averaged update defines a pseudo-gradient
``d = current − mean(updates)``; the coordinator keeps a velocity
``v = server_momentum · v + d`` across rounds and steps ``new = current − server_lr · v``.
With ``server_lr = 1`` and ``server_momentum = 0`` this is FedAvg. The option is named
``server_momentum`` so that it never meets the local optimizer's ``momentum`` in ``train()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.server_step import (ServerStepAggregation, check_number, float_dtype, pack_state, same_model,
                                          unpack_state)

__all__ = ["FedAvgM"]


def momentum_step(w: np.ndarray, mean: np.ndarray, velocity: np.ndarray | None, server_lr: float,
                  server_momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """One FedAvgM step for one float tensor: ``(new weights, new velocity)``, inputs untouched."""
    dtype = float_dtype(w.dtype)
    w_acc = w.astype(dtype, copy=False)
    d = np.subtract(w_acc, mean, dtype=dtype)
    if velocity is None:
        v = d
    else:
        v = np.multiply(velocity.astype(dtype, copy=False), dtype.type(server_momentum))
        v += d
    new = np.subtract(w_acc, np.multiply(v, dtype.type(server_lr))).astype(w.dtype, copy=False)
    return new, v


class FedAvgM(Strategy):
    """Server momentum over the averaged update; the velocity lives on this instance.

    Integer tensors (such as BatchNorm's ``num_batches_tracked``) are averaged as in
    FedAvg, without momentum. When the model's names or shapes change, the velocity
    starts again from zero. :meth:`state` and :meth:`load_state` carry the velocity
    through a checkpoint.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9) -> None:
        self.server_lr = check_number("server_lr", server_lr, 0.0, low_open=True)
        self.server_momentum = check_number("server_momentum", server_momentum, 0.0, 1.0)
        self._velocity: dict[str, np.ndarray] = {}
        self._steps = 0

    def reset(self) -> None:
        """Forget the velocity, as before the first round."""
        self._velocity = {}
        self._steps = 0

    def state(self) -> dict[str, Any]:
        """The velocity as ``{"velocity/<tensor>": array, "steps": n}``: numpy arrays and an int."""
        return pack_state({"velocity": self._velocity}, self._steps)

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (e.g. read back from a checkpoint)."""
        slots, steps = unpack_state(state, ("velocity",))
        self._velocity, self._steps = slots["velocity"], steps

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return ServerStepAggregation(current, self._step)

    def _step(self, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Apply one momentum step; updates the velocity, returns the new weights."""
        velocity = self._velocity if same_model(self._velocity, current) else {}
        new: dict[str, np.ndarray] = {}
        updated: dict[str, np.ndarray] = {}
        for key, w in current.items():
            if w.dtype.kind != "f":
                new[key] = mean[key]
                continue
            new[key], updated[key] = momentum_step(w, mean[key], velocity.get(key), self.server_lr,
                                                   self.server_momentum)
        self._velocity = updated
        self._steps = self._steps + 1 if velocity else 1
        return new

    def __repr__(self) -> str:
        return f"FedAvgM(server_lr={self.server_lr!r}, server_momentum={self.server_momentum!r})"
