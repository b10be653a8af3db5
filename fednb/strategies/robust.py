"""Robust aggregation strategies: they bound what a few Byzantine parties can do to a round.

Each needs every party's update, so they say ``individual_updates = True``: the round keeps all
n updates (n × the model in memory) and ``train()`` refuses them under secure aggregation, which
hides the updates. They are unweighted: an example count is a party's own claim, and a Byzantine
party could claim any. The rules and their papers are in :mod:`fednb.strategies.robust_aggregate`;
``min_updates`` is the fewest updates a round needs for the strategy's options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, ClassVar

import numpy as np

from fednb.strategies.aggregate import _conform, _spec_of
from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.fedavg import check_examples
from fednb.strategies.robust_aggregate import (Updates, bulyan, check_byzantine, check_trim, coordinate_median,
                                               multi_krum, trimmed_mean)

__all__ = ["Bulyan", "CollectedAggregation", "Krum", "Median", "MultiKrum", "TrimmedMean"]


class CollectedAggregation(Aggregation):
    """Keeps a copy of every update of the round, then applies ``rule`` to them all."""

    def __init__(self, current: Mapping[str, np.ndarray], rule: Callable[[Updates], dict[str, np.ndarray]]) -> None:
        self._spec = _spec_of(current)
        self._rule = rule
        self._updates: list[dict[str, np.ndarray]] = []

    @property
    def count(self) -> int:
        """How many updates were added."""
        return len(self._updates)

    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        check_examples(examples)  # checked, but the rules do not weigh by it
        # a copy: the rule runs after every party replied, and a caller may reuse its buffers
        self._updates.append({k: np.array(v, copy=True) for k, v in _conform(update, self._spec).items()})

    def result(self) -> dict[str, np.ndarray]:
        if not self._updates:
            raise ValueError("no updates to aggregate: add() was never called")
        return self._rule(self._updates)


class Median(Strategy):
    """Coordinate-wise median of the parties' updates (Yin et al. 2018)."""

    name = "median"
    individual_updates: ClassVar[bool] = True
    min_updates = 1

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return CollectedAggregation(current, coordinate_median)


class TrimmedMean(Strategy):
    """Coordinate-wise mean without the ⌊trim·n⌋ largest and smallest values (Yin et al. 2018)."""

    name = "trimmed-mean"
    individual_updates: ClassVar[bool] = True
    min_updates = 1

    def __init__(self, trim: float = 0.2) -> None:
        self.trim = check_trim(trim)

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return CollectedAggregation(current, lambda updates: trimmed_mean(updates, self.trim))

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim!r})"


class Krum(Strategy):
    """The one update closest to its n − f − 2 nearest others (Blanchard et al. 2017)."""

    name = "krum"
    individual_updates: ClassVar[bool] = True

    def __init__(self, byzantine: int = 1) -> None:
        self.byzantine = check_byzantine(byzantine)
        self.min_updates = 2 * self.byzantine + 3

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return CollectedAggregation(current, lambda updates: multi_krum(updates, self.byzantine, 1)[0])

    def __repr__(self) -> str:
        return f"Krum(byzantine={self.byzantine!r})"


class MultiKrum(Strategy):
    """The mean of the m updates with the lowest Krum scores; m = n − f unless ``select`` says
    (Blanchard et al. 2017)."""

    name = "multi-krum"
    individual_updates: ClassVar[bool] = True

    def __init__(self, byzantine: int = 1, select: int | None = None) -> None:
        self.byzantine = check_byzantine(byzantine)
        if select is not None and (isinstance(select, bool) or not isinstance(select, (int, np.integer))
                                   or select < 1):
            raise ValueError(f"select= (m, the updates Multi-Krum averages) must be an integer >= 1, got {select!r}")
        self.select = None if select is None else int(select)
        self.min_updates = max(2 * self.byzantine + 3, self.select or 1)

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return CollectedAggregation(current, lambda updates: multi_krum(updates, self.byzantine, self.select)[0])

    def __repr__(self) -> str:
        return f"MultiKrum(byzantine={self.byzantine!r}, select={self.select!r})"


class Bulyan(Strategy):
    """Krum's selection of n − 2f updates, then a trimmed mean around each coordinate's median
    (El Mhamdi et al. 2018)."""

    name = "bulyan"
    individual_updates: ClassVar[bool] = True

    def __init__(self, byzantine: int = 1) -> None:
        self.byzantine = check_byzantine(byzantine)
        self.min_updates = 4 * self.byzantine + 3

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return CollectedAggregation(current, lambda updates: bulyan(updates, self.byzantine)[0])

    def __repr__(self) -> str:
        return f"Bulyan(byzantine={self.byzantine!r})"
