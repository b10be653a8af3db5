"""What a simulation can be, and the checks that refuse one that cannot start.

The limits of :func:`fednb.simulate` (how many parties, which backends) and the ValueError
(DataError for a party's file that is not there) for arguments, ``data=``, a privacy budget or
a pool simulation that cannot start, raised before anything is started.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from fednb.data import DATASETS, PARTITIONS
from fednb.errors import DataError
from fednb.wire.messages import PARTY_NAME  # names a party's socket and directory too

MAX_PARTIES = 512
#: Virtual parties of one pool simulation (backend "pool" or "ray").
MAX_POOL_PARTIES = 100_000
#: ``process``: one process per party; ``pool``: worker processes serving virtual parties on shared
#: endpoints (:mod:`fednb.party.population_server`); ``ray``: those workers as Ray actors.
BACKENDS = ("process", "pool", "ray")
#: What a party of ``simulate(data=...)`` serves: a .npz or .csv file, or arrays {"x", "y", "ids"}.
PartyData = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def check_arguments(n: int | None, dataset: str, partition: str, alpha: float, *, dp_epsilon: float | None = None,
                    dp_delta: float = 1e-5, backend: str = "process") -> None:
    """ValueError for a simulation that cannot start, before anything is started."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    most = MAX_PARTIES if backend == "process" else MAX_POOL_PARTIES
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most:
        raise ValueError(f"n must be an integer between 1 and {most}" +
                         (" (the pool backend simulates more: backend='pool')" if backend == "process" else ""))
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; bundled: {', '.join(DATASETS)}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; known: {', '.join(PARTITIONS)}")
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    check_budget(dp_epsilon, dp_delta)


def check_data(data: Mapping[str, PartyData], *, id_column: str | None = None, label: str | None = None) -> None:
    """ValueError (DataError for a file that is not there) for a ``data=`` that cannot start a simulation."""
    if not isinstance(data, Mapping) or not 1 <= len(data) <= MAX_PARTIES:
        raise ValueError(f"data must be a dict of 1 to {MAX_PARTIES} entries, {{party name: file or arrays}}")
    for what, value in (("id_column", id_column), ("label", label)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{what} must be a column name, got {value!r}")
    if label is not None and label == id_column:
        raise ValueError(f"the label and the id column are both {label!r}; they must be different columns")
    for name, source in data.items():
        if not isinstance(name, str) or not PARTY_NAME.fullmatch(name):
            raise ValueError(f"party name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit")
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.suffix.lower() not in (".npz", ".csv"):
                raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r} for party {name!r}; "
                                "use .npz or .csv")
            if not path.is_file():
                raise DataError(f"{path}: no such file (the data of party {name!r})")
        elif isinstance(source, Mapping):
            if "x" not in source:
                raise ValueError(f"data[{name!r}] needs an array 'x' (and 'y', 'ids' as it has them)")
            known = {"x", "y", "ids", *([label] if label is not None else [])}
            for key in source:
                if key not in known:
                    raise ValueError(f"data[{name!r}]: unknown array {key!r}; a party's arrays are "
                                     f"{', '.join(map(repr, sorted(known)))}")
        else:
            raise ValueError(f"data[{name!r}] must be a path to a .npz or .csv file, or a dict of arrays "
                             f"{{'x': ..., 'y': ..., 'ids': ...}}; got {type(source).__name__}")


def check_budget(dp_epsilon: float | None, dp_delta: float) -> None:
    """ValueError for a privacy budget no party can have."""
    if dp_epsilon is not None:
        if isinstance(dp_epsilon, bool) or not isinstance(dp_epsilon, (int, float)) \
                or not (math.isfinite(dp_epsilon) and dp_epsilon > 0):
            raise ValueError(f"dp_epsilon must be a finite number > 0 (or None: no budget), got {dp_epsilon!r}")
        if isinstance(dp_delta, bool) or not isinstance(dp_delta, (int, float)) or not 0 < dp_delta < 1:
            raise ValueError(f"dp_delta must be a number in (0, 1), got {dp_delta!r}")



def check_pool(*, data: Any, contained: bool, dp_epsilon: float | None, workers: int,
               examples_per_party: int | None, members: int, partition: str | None) -> None:
    """ValueError for what a pool simulation does not do (before anything starts)."""
    if data is not None:
        raise ValueError("the pool backends simulate parties of a bundled dataset; data=... starts one process "
                         "per party (backend='process')")
    if contained:
        raise ValueError("the pool backends run party code in their worker processes; contained=True needs "
                         "backend='process'")
    if dp_epsilon is not None:
        raise ValueError("a privacy budget keeps a ledger in each party's own directory; dp_epsilon needs "
                         "backend='process'")
    for what, value in (("workers", workers), ("members", members)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if examples_per_party is not None and (isinstance(examples_per_party, bool) or
                                           not isinstance(examples_per_party, int) or examples_per_party < 1):
        raise ValueError(f"examples_per_party must be a positive integer, got {examples_per_party!r}")
    if examples_per_party is not None and partition not in (None, "dirichlet"):
        raise ValueError(f"examples_per_party draws each party's rows under Dirichlet label skew (alpha=...); "
                         f"partition={partition!r} partitions the dataset instead: leave out one of the two")
