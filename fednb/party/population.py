"""A population: many virtual parties over one dataset, served by one process.

Cross-device simulations have thousands of parties of a hundred examples each, of which a
round samples a few. One process per party does not reach there, so a population keeps
every party as two index arrays (its train and test rows) into one shared dataset, and
builds what the party code needs only for the parties a round asks: their :class:`Datasets`
(cached within ``cache_bytes``), and their *member*: the same gate (egress guard), admission
(replay memory, held bytes, cancels) and :class:`~fednb.party.kernel.Kernel` a process-per-party
simulation runs (kept for the ``members`` most recently used). A member evicted from that
cache is built afresh when asked again, like a party that restarted between rounds: the
built-in loop does not depend on it (the weights come with every request); a custom cell's
namespace starts empty again. Its replay memory is kept for every party ever asked, and what it
keeps between rounds (SCAFFOLD's control variate, :mod:`fednb.party.keep`) in its own directory
of the simulation's private one, read back when the member is built again.

Memory is O(members × model + data), not O(parties × model).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fednb.party.admission import Admission, Jobs
from fednb.party.datasets import Datasets, Split
from fednb.party.gate import Gate
from fednb.party.keep import Keep, Variates
from fednb.party.keep_vertical import KeptParts
from fednb.party.replay import Replays
from fednb.wire import Message
from fednb.wire.limits import MiB

log = logging.getLogger(__name__)

#: Requests a virtual party's replay memory keeps the ids of (a party is asked a few times a run).
MEMBER_IDS = 256
CACHE_BYTES = 256 * MiB
MEMBERS = 64


@dataclass(frozen=True)
class Rows:
    """One virtual party: its name and its train and test rows of the shared dataset."""

    name: str
    train: np.ndarray
    test: np.ndarray


class Population:
    """The parties one process serves and the data they share; see the module docstring."""

    def __init__(self, x: np.ndarray, y: np.ndarray, parties: Sequence[Rows], *, cache_bytes: int = CACHE_BYTES) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        names = [rows.name for rows in parties]
        if len(set(names)) != len(names):
            raise ValueError("the parties of a population need distinct names")
        for rows in parties:
            for part in (rows.train, rows.test):
                if part.ndim != 1 or part.dtype.kind not in "iu" or (part.size and not 0 <= part.min() <= part.max() < len(x)):
                    raise ValueError(f"party {rows.name}: its rows must be indices into the {len(x)} rows")
        self.x, self.y = x, y
        self.parties = {rows.name: rows for rows in parties}
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, Datasets] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return len(self.parties)

    def __contains__(self, name: object) -> bool:
        return name in self.parties

    def shard(self, index: int, count: int) -> Population:
        """Every ``count``-th party from ``index`` on, sharing this population's arrays."""
        return Population(self.x, self.y, list(self.parties.values())[index::count], cache_bytes=self.cache_bytes)

    def datasets(self, name: str) -> Datasets:
        """Party ``name``'s train and test splits, copied out of the shared arrays on first use."""
        cached = self._cache.get(name)
        if cached is not None:
            self._cache.move_to_end(name)
            return cached
        rows = self.parties[name]
        datasets = Datasets({"train": Split(self.x[rows.train], self.y[rows.train]),
                             "test": Split(self.x[rows.test], self.y[rows.test])})
        self._cache[name] = datasets
        self._cached += _nbytes(datasets)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached -= _nbytes(evicted)
        return datasets

    def describe(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a shared endpoint's welcome says of its parties: their names, the shape of their
        data (the same for all), and each one's example counts as arrays."""
        first = next(iter(self.parties.values()), None)
        sample = self.datasets(first.name).describe() if first is not None else {}
        shape = {split: {k: v for k, v in info.items() if k != "examples"} for split, info in sample.items()}
        counts = {f"pool.{split}": np.array([len(getattr(rows, split)) for rows in self.parties.values()], np.int64)
                  for split in ("train", "test")}
        return {"parties": list(self.parties), "datasets": shape}, counts


def _nbytes(datasets: Datasets) -> int:
    return sum(split.x.nbytes + (split.y.nbytes if split.y is not None else 0) for split in datasets.splits.values())


class _Member:
    """Runs one virtual party's requests on its kernel (the :class:`~fednb.party.admission.Runner` of its admission)."""

    def __init__(self, name: str, datasets: Datasets, min_aggregate: int) -> None:
        from fednb.party.kernel import Kernel  # torch: imported where parties run, not by the coordinator

        self.kernel = Kernel(name, datasets, min_aggregate=min_aggregate)

    def run(self, identity: str, request: Message) -> Message:
        return self.kernel.handle(identity, request)

    def cancel(self, message_id: str) -> bool:
        """A running request cannot be stopped in process (as :class:`~fednb.party.inprocess.InProcess`)."""
        return False


class Members:
    """The admissions of a population's parties, built on demand, sharing one job thread."""

    def __init__(self, population: Population, jobs: Jobs, *, members: int = MEMBERS, max_held_bytes: int,
                 require_secure_aggregation: bool = False, min_aggregate: int = 3,
                 directory: Path | None = None) -> None:
        """``directory`` (private, 0700): where each party keeps what outlives its member, such as
        SCAFFOLD's control variate (``directory/<party>/keep``); without one it is kept in memory."""
        if members < 1:
            raise ValueError("a population keeps at least one member")
        self.population = population
        self.jobs = jobs
        self.limit = members
        self.max_held_bytes = max_held_bytes
        self.require_secure_aggregation = require_secure_aggregation
        self.min_aggregate = min_aggregate
        self._live: OrderedDict[str, Admission] = OrderedDict()
        self._replays: dict[str, Replays] = {}
        self.directory = directory
        self._keeps: dict[str, Keep] = {}  # without a directory: what each party keeps, in memory

    def __iter__(self) -> Any:
        return iter(list(self._live.values()))

    def get(self, name: str) -> Admission:
        """Party ``name``'s admission (KeyError for a party this population does not hold)."""
        admission = self._live.get(name)
        if admission is not None:
            self._live.move_to_end(name)
            return admission
        if name not in self.population:
            raise KeyError(name)
        datasets = self.population.datasets(name)
        gate = Gate(name, "simulation", datasets, require_secure_aggregation=self.require_secure_aggregation,
                    min_aggregate=self.min_aggregate)
        replays = self._replays.setdefault(name, Replays(ids=MEMBER_IDS))
        # as a party's server does: what a party keeps (SCAFFOLD's c_i, vertical parts) advances when a reply's
        # end is recorded
        keep = self._keep(name)
        runner = KeptParts(Variates(_Member(name, datasets, self.min_aggregate), keep), keep)
        gate.on_recorded = runner.settle
        admission = Admission(name, gate, runner, approve_hint="", max_held_bytes=self.max_held_bytes,
                              replays=replays, jobs=self.jobs)
        self._live[name] = admission
        self._evict()
        return admission

    def held_bytes(self) -> int:
        """The bytes of every request the population's parties hold now (waiting, queued or running)."""
        return sum(admission.held_bytes for admission in self._live.values())

    def trim(self) -> None:
        """Forget members beyond the limit now (after a reply: its member may have been the one held)."""
        self._evict(keep_last=False)

    def _keep(self, name: str) -> Keep:
        """Party ``name``'s keep: files in its own directory (read back by a member built again), else memory."""
        if self.directory is None:
            return self._keeps.setdefault(name, Keep(None, identities=4))
        own = self.directory / name
        own.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Keep(own, identities=1, durable=False)  # a simulation's temporary directory: no fsync

    def _evict(self, keep_last: bool = True) -> None:
        """Forget the least recently used members beyond the limit, never one holding a request or in the
        middle of a secure round (its grant and the round's secrets live in the member until unmasking)."""
        names = list(self._live)
        for name in names[:-1] if keep_last else names:  # never the member just asked for (the last)
            if len(self._live) <= self.limit:
                return
            admission = self._live[name]
            if admission.holds() or admission.gate.secure:  # mid-request, or between a secure round's stages
                continue
            del self._live[name]
            admission.gate.close()
