"""Federated strategies: how a round is configured and how updates become new weights.

Numpy only; nothing here imports torch. ``get_strategy("fedprox", mu=0.1)`` is how the
magics and the CLI pick one by name.
"""

from __future__ import annotations

import inspect
from typing import Any

from fednb.strategies.aggregate import RunningMean, weighted_mean, weighted_metrics
from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.fedavg import FedAvg, MeanAggregation
from fednb.strategies.fedavgm import FedAvgM
from fednb.strategies.fedprox import FedProx

__all__ = [
    "STRATEGIES",
    "Aggregation",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "MeanAggregation",
    "RunningMean",
    "Strategy",
    "get_strategy",
    "weighted_mean",
    "weighted_metrics",
]

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedAvgM)}


def get_strategy(name_or_instance: str | Strategy, **kwargs: Any) -> Strategy:
    """The strategy named ``name_or_instance`` built with ``kwargs``; an instance passes through.

    Keyword arguments set to ``None`` mean "not given" and are dropped, so a caller can
    forward every option it has (``mu=None`` to FedAvg is fine). A non-``None`` keyword the
    strategy does not take raises ``ValueError``, as does an unknown name.
    """
    given = {k: v for k, v in kwargs.items() if v is not None}
    if isinstance(name_or_instance, Strategy):
        if given:
            raise ValueError(
                f"options {', '.join(sorted(given))} cannot be applied to an existing "
                f"{type(name_or_instance).__name__} instance; pass the strategy's name instead"
            )
        return name_or_instance
    if not isinstance(name_or_instance, str):
        raise ValueError(f"strategy must be a name or a Strategy instance, got {type(name_or_instance).__name__}")
    cls = STRATEGIES.get(name_or_instance.strip().lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name_or_instance!r}; known strategies: {', '.join(STRATEGIES)}")
    accepted = {
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(given) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise ValueError(f"strategy {cls.name!r} does not take {', '.join(unknown)} (it takes: {takes})")
    return cls(**given)
