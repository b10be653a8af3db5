"""Running coordinator code inside the party process itself: the simulation's fast path.

In a simulation the coordinator and every party are the same local user, so the worker
process of :mod:`fednb.party.sandbox` protects nobody's data; it costs two extra copies of
every tensor per request (into and out of a sealed memfd). :class:`InProcess` has the
sandbox's interface and hands requests straight to the :class:`~fednb.party.kernel.Kernel`
on the party's job thread. It has no time or memory limit and cannot stop a running
cell: a cell that never ends keeps that party busy until it is restarted. Real parties
(``fednb party``, ``%fed_serve``) always use the sandbox.
"""

from __future__ import annotations

from typing import Any

from fednb.party.datasets import Datasets
from fednb.party.reach import Report
from fednb.wire import Message


class InProcess:
    """Answers requests with a kernel in this process (see the module docstring)."""

    def __init__(self, name: str, datasets: Datasets, *, threads: int = 0, min_aggregate: int = 3, **_: Any) -> None:
        self.name = name
        self.min_aggregate = min_aggregate
        self._datasets = datasets
        self._threads = threads
        self._kernel: Any = None
        #: Coordinator code runs in this process: nothing contains it (a simulation only).
        self.containment = Report("none", "a simulation runs party code in the party process")

    def start(self) -> Datasets:
        from fednb.party.kernel import Kernel

        if self._threads:
            import torch

            torch.set_num_threads(self._threads)
        self._kernel = Kernel(self.name, self._datasets, min_aggregate=self.min_aggregate)
        return self._datasets

    def run(self, identity: str, request: Message) -> Message:
        """The kernel's reply; the party's one job thread calls this, one request at a time."""
        return self._kernel.handle(identity, request)

    def cancel(self, message_id: str) -> bool:
        """A running cell cannot be stopped in process; queued requests are dropped by the server."""
        return False

    def stop(self) -> None:
        """Nothing to stop: the kernel lives and dies with the party process."""
