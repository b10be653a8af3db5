"""A party's parts of vertical training runs, kept by the party process so that they survive its restart.

A vertical run's parts (:mod:`fednb.vertical.parts`: hetero LR's weights and optimizer state,
SecureBoost's trees, margins and thresholds, and the label party's Paillier key pair) live in the
coordinator's kernel session, inside a worker, which cannot write a file and ends with a crash, a
time limit or the party's restart. :class:`KeptParts` is the :class:`~fednb.party.admission.Runner`
around the others (as :class:`fednb.party.keep.Variates` is) that keeps them in the party process:

- a worker's reply to a step that kept a snapshot carries its run's snapshots packed (``keep/vertical``,
  :data:`fednb.vertical.parts.PACKED`); every ``keep/`` array is taken out of every reply before the
  gate sees it (it never leaves; the egress guard would block it too), the packed parts are checked
  (they must read back as parts), and kept (:class:`~fednb.party.keep.Keep`, as ``vertical``) only once
  the reply's end is recorded as released (:meth:`KeptParts.settle`, called by the gate): a reply that
  did not leave leaves the parts kept as they were;
- a resuming ``lr.start`` / ``sb.start`` (``resume`` set) is handed the parts kept for its run, and the
  worker's session reads them when it lacks that run (:meth:`fednb.vertical.parts.Parts.attach`:
  validated, then the run id, the settings and the alignment checked as for the session's own);
- a request that carries a ``keep/`` array is refused: what a party keeps never travels.

One ``vertical`` bundle per coordinator holds the runs most recently stepped (as many as a session
keeps, :data:`fednb.vertical.parts.MAX_RUNS`), each as its worker packed it. A label party's holds
its Paillier secret key: with a directory, ``PARTY_DIR/keep/<coordinator>/vertical.bundle`` is
written 0600 in 0700 directories. A party without a directory (a simulation) keeps them in memory:
they outlive a worker, not the party. A file that does not read back refuses the resume, named in the
party's log; it stays for the owner to restore or remove, and the party serves on.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from fednb.errors import WireError
from fednb.party.admission import Runner
from fednb.party.gate import Ticket
from fednb.party.keep import MAX_PENDING, Keep, KeepError, Kept
from fednb.vertical.parts import KEPT, MAX_RUNS, PACKED, Parts
from fednb.wire import Message

log = logging.getLogger(__name__)

VERTICAL = "vertical"
STARTS = ("lr.start", "sb.start")
_RUN = re.compile(r"[0-9a-f]{32}")


class KeptParts:
    """The parts of vertical runs at a party: a runner around another (see the module docstring)."""

    def __init__(self, runner: Runner, keep: Keep, *, runs: int = MAX_RUNS) -> None:
        if runs < 1:
            raise ValueError("runs must be at least 1")
        self.runner = runner
        self.keep = keep
        self.runs = runs
        settle = getattr(runner, "settle", None)  # the runner inside may keep something of its own (Variates)
        self._inner: Callable[[Ticket, bool], None] | None = settle if callable(settle) else None
        self._pending: OrderedDict[str, tuple[str, str, np.ndarray]] = OrderedDict()  # request id → identity, run, parts
        self._lock = threading.Lock()

    def cancel(self, message_id: str) -> bool:
        return self.runner.cancel(message_id)

    def run(self, identity: str, request: Message) -> Message:
        """The worker's reply to ``request``: kept parts handed in to a resuming start, packed parts taken out."""
        if any(name.startswith(KEPT) for name in request.arrays):
            return _refused(request, "ValueError", f"a request may not carry {KEPT} arrays: what a party keeps "
                                                   "never travels")
        training = _resuming(request)
        if training is not None:
            try:
                packed = self._kept(identity).get(training)
            except KeepError as exc:
                log.error("%s", exc)
                return _refused(request, "GateError", "the party cannot read the parts of vertical runs it keeps for "
                                                      "this coordinator; its owner will find why in its log")
            if packed is not None:
                request = dataclasses.replace(request, arrays={**request.arrays, PACKED: packed})
        reply = self.runner.run(identity, request)
        rest = {name: a for name, a in reply.arrays.items() if not name.startswith(KEPT)}
        if len(rest) == len(reply.arrays):
            return reply
        out = dataclasses.replace(reply, arrays=rest)
        packed = reply.arrays.get(PACKED)
        if request.type != "vertical" or reply.type != "result" or len(reply.arrays) - len(rest) != 1 \
                or packed is None or packed.dtype != np.uint8 or packed.ndim != 1:
            log.warning("the worker's reply to %s %s carried %s arrays it may not; they were removed", request.type,
                        request.id[:8], KEPT)
            return out
        try:
            run = Parts().unpack(packed.tobytes())
        except (ValueError, WireError) as exc:
            log.warning("vertical step %s: the worker's packed parts do not read back (%s); they are not kept",
                        request.content.get("step"), exc)
            return out
        with self._lock:
            self._pending[request.id] = (identity, run, np.array(packed, copy=True))
            while len(self._pending) > MAX_PENDING:
                stale, _ = self._pending.popitem(last=False)
                log.warning("vertical request %s never ended; its parts are not kept", stale[:8])
        return out

    def settle(self, ticket: Ticket, released: bool) -> None:
        """The end of ``ticket``'s request is recorded: keep its run's parts if its result left, else forget them."""
        if self._inner is not None:
            self._inner(ticket, released)
        with self._lock:
            pending = self._pending.pop(ticket.message.id, None)
        if pending is None:
            return
        identity, run, packed = pending
        if not released:
            log.info("the reply to vertical step %s did not leave: the parts kept of run %s stay as they were",
                     ticket.message.content.get("step"), run[:8])
            return
        with self._lock:  # one read-modify-write of the bundle at a time
            try:
                runs = self._kept(identity)
            except KeepError as exc:
                log.error("%s; the parts of vertical run %s are not written: the worker goes on with them, a restart "
                          "would lose them", exc, run[:8])
                return
            runs.pop(run, None)
            runs[run] = packed
            while len(runs) > self.runs:
                runs.popitem(last=False)
            try:
                self.keep.put(identity, VERTICAL, Kept({"runs": list(runs)}, dict(runs)))
            except (OSError, ValueError) as exc:  # a full disk, or more than a bundle holds
                log.error("could not write the parts of vertical run %s (%s): the worker goes on with them, a "
                          "restart would bring back the ones of before", run[:8], exc)

    def _kept(self, identity: str) -> OrderedDict[str, np.ndarray]:
        """The packed parts kept for this coordinator, by run (the least recently stepped first)."""
        kept = self.keep.get(identity, VERTICAL)
        if kept is None:
            return OrderedDict()
        runs = kept.content.get("runs")
        if not isinstance(runs, list) or not all(isinstance(r, str) and _RUN.fullmatch(r) for r in runs) \
                or len(set(runs)) != len(runs) or set(runs) != set(kept.arrays) or not all(
                    a.dtype == np.uint8 and a.ndim == 1 for a in kept.arrays.values()):
            where = self.keep.path(identity, VERTICAL) or "memory"
            raise KeepError(f"the parts of vertical runs kept in {where} are not runs' packed parts; restore it, or "
                            "remove it to start those runs afresh")
        return OrderedDict((run, kept.arrays[run]) for run in runs)


def _resuming(request: Message) -> str | None:
    """The vertical run id of a start step that resumes it, else None."""
    asked = request.content.get("request")
    if request.type != "vertical" or request.content.get("step") not in STARTS or not isinstance(asked, Mapping) \
            or asked.get("resume") is None:
        return None
    training = asked.get("training")
    return training if isinstance(training, str) and _RUN.fullmatch(training) else None


def _refused(request: Message, error_type: str, message: str) -> Message:
    return request.reply("error", {"error_type": error_type, "message": message, "origin": "party"})
