"""FedProx: FedAvg aggregation with a proximal term in each party's local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020. The party's local loop adds (mu / 2) · ||w − w_global||² to its
loss; the coordinator only sends ``mu`` and averages as FedAvg does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.fedavg import MeanAggregation

__all__ = ["FedProx"]


class FedProx(Strategy):
    """FedAvg plus a proximal coefficient ``mu`` (≥ 0) sent to every party."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    def configure_train(self, round: int, config: Mapping[str, Any]) -> dict[str, Any]:
        return {**config, "mu": self.mu}

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return MeanAggregation(current)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu!r})"
