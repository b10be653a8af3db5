"""The small abstract base every federated strategy implements.

Before a run's first round the coordinator calls ``strategy.configure_run(parties)`` with the
number of parties of the run; then one round, as the coordinator drives it::

    config  = strategy.configure_train(round, config)     # a new dict: e.g. FedProx adds "mu"
    extra   = strategy.train_request(round, current)      # besides the weights: SCAFFOLD's c
    agg     = strategy.start_round(round, current)        # current = global weights
    for each party reply, in arrival order:
        agg.add(update, examples)                          # streamed; no update is kept
    new     = agg.result()                                 # next global weights
    metrics = strategy.aggregate_metrics(round, [(examples, metrics), ...])

Strategies hold the arithmetic's state between rounds (FedAvgM's server momentum) and
nothing else; privacy and clipping are wrappers that take a strategy, not subclasses.
Concrete strategies derive from :class:`Strategy` directly (one level, no deeper).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fednb.strategies.aggregate import weighted_metrics

__all__ = ["Aggregation", "Strategy"]


class Aggregation(ABC):
    """One round's aggregation: updates go in as parties reply, new weights come out."""

    @abstractmethod
    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        """Fold in one party's update, weighted by its number of training examples."""

    @abstractmethod
    def result(self) -> dict[str, np.ndarray]:
        """The new global weights; ``ValueError`` when nothing was added."""


class Strategy(ABC):
    """How the coordinator configures a round and turns updates into new weights."""

    name: ClassVar[str]
    #: True where a round exchanges more than the weights (SCAFFOLD's control variates), which secure
    #: aggregation and DP do not carry yet: ``train()`` refuses both for such a strategy.
    plain_rounds_only: ClassVar[bool] = False

    def configure_train(self, round: int, config: Mapping[str, Any]) -> dict[str, Any]:
        """Settings sent to every party for this round: a new dict, ``config`` untouched."""
        return dict(config)

    def configure_run(self, parties: int) -> None:
        """A run of ``parties`` parties starts (every party chosen for it, whether online, offline or
        sampled in a round or not): SCAFFOLD's N. Nothing by default."""

    def train_request(self, round: int,
                      current: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What this round's train request carries besides the weights and the config: content fields
        and arrays (SCAFFOLD's server control variate). Nothing by default; called before :meth:`start_round`."""
        return {}, {}

    @abstractmethod
    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        """Begin aggregating ``round``, whose parties started from ``current`` weights."""

    def aggregate_metrics(
        self, round: int, results: Sequence[tuple[int, Mapping[str, float]]]
    ) -> dict[str, float]:
        """Combine the parties' ``(examples, metrics)``: example-weighted means."""
        return weighted_metrics(results)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
