"""Per-party train/test data for a simulated federation, and their pooled union.

``federated_split`` is what ``fednb sim`` / ``%fed_sim`` hands each local party;
``pooled`` puts the pieces back together for the centralized baseline a federated run
is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fednb.data.datasets import Dataset
from fednb.data.partition import partition, train_test_split

__all__ = ["PartyData", "federated_indices", "federated_split", "pooled"]


@dataclass(frozen=True)
class PartyData:
    """One party's private share of a dataset, already split into train and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def federated_split(
    dataset: Dataset,
    n: int,
    method: str = "dirichlet",
    *,
    alpha: float = 0.5,
    shards_per_party: int = 2,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_size: int = 10,
) -> list[PartyData]:
    """Partition ``dataset`` among ``n`` parties named ``party-0`` … ``party-{n-1}``.

    ``method``, ``alpha``, ``shards_per_party`` and ``min_size`` are as in
    :func:`fednb.data.partition`; each party's share is then split into train and test
    (stratified where possible) with ``test_fraction`` held out.
    """
    return [PartyData(f"party-{k}", dataset.x[train], dataset.y[train], dataset.x[test], dataset.y[test])
            for k, (train, test) in enumerate(federated_indices(dataset.y, n, method, alpha=alpha,
                                                                 shards_per_party=shards_per_party, seed=seed,
                                                                 test_fraction=test_fraction, min_size=min_size))]


def federated_indices(
    y: np.ndarray,
    n: int,
    method: str = "dirichlet",
    *,
    alpha: float = 0.5,
    shards_per_party: int = 2,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_size: int = 10,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row indices of each party of :func:`federated_split`, without copying rows."""
    parts = partition(y, n, method, alpha=alpha, shards_per_party=shards_per_party, seed=seed, min_size=min_size)
    # one independent, reproducible stream per party, derived from (seed, party)
    states = [np.random.SeedSequence([seed, k]).generate_state(1)[0] for k in range(len(parts))]
    return [train_test_split(idx, y, test_fraction=test_fraction, seed=int(state))
            for idx, state in zip(parts, states)]


def pooled(parts: Sequence[PartyData]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate every party's data: ``(x_train, y_train, x_test, y_test)``."""
    if not parts:
        raise ValueError("pooled() needs at least one PartyData")
    return (
        np.concatenate([p.x_train for p in parts]),
        np.concatenate([p.y_train for p in parts]),
        np.concatenate([p.x_test for p in parts]),
        np.concatenate([p.y_test for p in parts]),
    )
