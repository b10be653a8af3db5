"""Federated strategies: how a round is configured and how updates become new weights.

Numpy only; nothing here imports torch. ``get_strategy("fedprox", mu=0.1)`` is how the
magics and the CLI pick one by name: fedavg, fedprox and fedavgm; the adaptive server
optimizers fedadam, fedyogi and fedadagrad (:mod:`~fednb.strategies.adaptive`); the robust
rules median, trimmed-mean, krum, multi-krum and bulyan (:mod:`~fednb.strategies.robust`),
which need every party's update (``individual_updates``) and so refuse secure aggregation;
and scaffold (:mod:`~fednb.strategies.scaffold`), whose control variates travel beside the
weights (``plain_rounds_only``: no secure aggregation, no DP).
"""

from __future__ import annotations

import inspect
from typing import Any

from fednb.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from fednb.strategies.aggregate import RunningMean, weighted_mean, weighted_metrics
from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.fedavg import FedAvg, MeanAggregation
from fednb.strategies.fedavgm import FedAvgM
from fednb.strategies.fedprox import FedProx
from fednb.strategies.robust import Bulyan, Krum, Median, MultiKrum, TrimmedMean
from fednb.strategies.scaffold import Scaffold

__all__ = [
    "STRATEGIES",
    "Aggregation",
    "Bulyan",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "MeanAggregation",
    "Median",
    "MultiKrum",
    "RunningMean",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "get_strategy",
    "summable",
    "weighted_mean",
    "weighted_metrics",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean, Krum, MultiKrum, Bulyan,
                Scaffold)
}


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
    cls = STRATEGIES.get(name_or_instance.strip().lower().replace("_", "-"))  # trimmed_mean too
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


def summable() -> list[str]:
    """The strategies that work on the mean alone (so under secure aggregation and DP-FedAvg's noised sum)."""
    return [name for name, cls in STRATEGIES.items()
            if not getattr(cls, "individual_updates", False) and not cls.plain_rounds_only]
