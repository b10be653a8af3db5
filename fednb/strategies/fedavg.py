"""FedAvg: the example-weighted mean of the parties' updates.

McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fednb.strategies.aggregate import RunningMean
from fednb.strategies.base import Aggregation, Strategy

__all__ = ["FedAvg", "MeanAggregation"]


def check_examples(examples: int) -> int:
    """An update's example count: a positive integer, or ValueError."""
    if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)) or examples <= 0:
        raise ValueError(f"examples must be a positive integer, got {examples!r}")
    return int(examples)


class MeanAggregation(Aggregation):
    """Streams updates into an example-weighted mean shaped like ``template``."""

    def __init__(self, template: Mapping[str, np.ndarray] | None = None) -> None:
        self._mean = RunningMean(template)

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._mean.count

    @property
    def examples(self) -> int:
        """Total examples behind the updates added so far."""
        return int(self._mean.total_weight)

    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        self._mean.add(update, check_examples(examples))

    def result(self) -> dict[str, np.ndarray]:
        return self._mean.result()


class FedAvg(Strategy):
    """Federated averaging: new weights are the example-weighted mean of the updates."""

    name = "fedavg"

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        # every update must match the current model's names, shapes and dtypes
        return MeanAggregation(current)
