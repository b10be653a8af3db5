"""What a party keeps for each coordinator between requests: named bundles of arrays, such as SCAFFOLD's c_i.

The party process keeps them, never its workers: a worker cannot write a file, and a crash, a
cancel or a time limit ends its session. :class:`Keep` holds them in memory and, where the party
has a directory, in ``PARTY_DIR/keep/<coordinator>/<name>.bundle``, where ``<coordinator>`` is
the first 32 hex digits of the SHA-256 of the coordinator's identity (its ZAP User-Id, as the
kernel's sessions are keyed). A file is written atomically (:func:`fednb.atomic.write_atomic`),
mode 0600 in directories of mode 0700 (a bundle may hold a secret key), and read back as the wire
reads a bundle (:mod:`fednb.wire.bundle`: validated before anything is allocated); one that does
not read back raises :class:`KeepError` naming it, and stays for the owner to restore or remove.

Two runners keep bundles: :class:`Variates` below (``scaffold``), and
:class:`fednb.party.keep_vertical.KeptParts` (``vertical``: a party's parts of vertical training runs).

:class:`Variates` is SCAFFOLD's use of it (Karimireddy et al., ICML 2020; see
:mod:`fednb.strategies.scaffold`): the :class:`~fednb.party.admission.Runner` around the sandbox
(or the in-process kernel) that, for a train request asking for SCAFFOLD, hands the worker the
``c_i`` kept for its coordinator (``scaffold.ci/<tensor>``, zeros at first), takes the worker's
``c_i⁺`` out of its reply before the gate sees the reply (so ``c_i`` never leaves the party), and
keeps ``c_i⁺`` only once that reply's end is recorded as released (:meth:`Variates.settle`, called
by the gate): a refused, blocked or failed reply leaves ``c_i`` as it was. A kept ``c_i`` belongs to
one training run: a new run starts from zeros, as the coordinator's ``c`` does. It is kept with the
``c_i`` its round started from, so that a resumed run training that round again (its coordinator
crashed before checkpointing it) starts from the same ``c_i`` as the checkpoint's ``c``.

Keeping ``c_i`` here is for the algorithm's sake and for restarts, not secrecy: under option II the
coordinator could compute it from what it sees (x, c, the update, and the steps and learning rate it set).

A reply released but then lost on its way, or discarded by the coordinator as late, leaves
``c_i`` advanced while the coordinator's ``c`` never took that ``Δc_i``: ``c`` then differs from the
mean of the ``c_i`` by ``Δc_i / N``, as in any deployment of the algorithm that loses a message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fednb.atomic import write_atomic
from fednb.errors import GateError, WireError
from fednb.party.admission import Runner
from fednb.party.gate import Ticket
from fednb.strategies.scaffold import C, CI, prefixed, split
from fednb.tensors import Template, check_update, template_of
from fednb.wire import Message
from fednb.wire import bundle

log = logging.getLogger(__name__)

MAX_IDENTITIES = 256  # coordinators whose bundles stay in memory (with a directory, the others stay on disk)
MAX_PENDING = 8  # replies whose kept arrays wait for their end to be recorded
SCAFFOLD = "scaffold"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_AFTER, _BEFORE = "after/", "before/"


class KeepError(GateError):
    """A kept file that cannot be read back: corrupt, cut short, or not the bundle it should be."""


@dataclass(frozen=True)
class Kept:
    """One kept bundle: plain JSON ``content`` and named ``arrays``."""

    content: dict[str, Any]
    arrays: dict[str, np.ndarray]


def coordinator_key(identity: str) -> str:
    """The name a coordinator's bundles are filed under: no identity text in a path."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class Keep:
    """Named bundles per coordinator identity: in memory, and in ``directory/keep`` when there is one."""

    def __init__(self, directory: Path | None, *, identities: int = MAX_IDENTITIES, durable: bool = True) -> None:
        """``durable=False``: files written without fsync (a simulation's, in its temporary directory)."""
        if identities < 1:
            raise ValueError("identities must be at least 1")
        self.durable = durable
        self.directory = Path(directory) / "keep" if directory is not None else None
        self.identities = identities
        self._memory: OrderedDict[str, dict[str, Kept]] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, identity: str, name: str) -> Path | None:
        """Where ``name`` of this coordinator is written (None without a directory)."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"a kept bundle's name must be a short lowercase word, got {name!r}")
        return None if self.directory is None else self.directory / coordinator_key(identity) / f"{name}.bundle"

    def get(self, identity: str, name: str) -> Kept | None:
        """The bundle kept as ``name`` for this coordinator, or None; KeepError when its file is unreadable."""
        path = self.path(identity, name)
        with self._lock:
            kept = self._memory.get(identity, {}).get(name)
            if kept is not None:
                self._memory.move_to_end(identity)
                return kept
        if path is None or not path.exists():
            return None
        kept = self._read(path, identity, name)
        self._remember(identity, name, kept)
        return kept

    def put(self, identity: str, name: str, kept: Kept) -> None:
        """Keep ``kept`` as ``name`` for this coordinator: in memory at once, then on disk (OSError when the
        file cannot be written; this process still has the new bundle)."""
        path = self.path(identity, name)
        # packed first: a bundle that cannot be one (ValueError) changes nothing, in memory or on disk
        data = bundle.pack({**kept.content, "keep": {"name": name, "coordinator": coordinator_key(identity)}},
                           kept.arrays) if path is not None else b""
        self._remember(identity, name, kept)
        if path is None:
            return
        for directory in (path.parent.parent, path.parent):  # the party's own, as its directory is
            directory.mkdir(mode=0o700, exist_ok=True)
            if stat.S_IMODE(directory.stat().st_mode) != 0o700:
                log.warning("%s was mode %o; it is now 0700 (what is kept there may be a secret key)", directory,
                            stat.S_IMODE(directory.stat().st_mode))
                directory.chmod(0o700)
        write_atomic(path, data, durable=self.durable)  # mode 0600, as mkstemp makes its file

    def _remember(self, identity: str, name: str, kept: Kept) -> None:
        with self._lock:
            self._memory.setdefault(identity, {})[name] = kept
            self._memory.move_to_end(identity)
            while len(self._memory) > self.identities:
                forgotten, _ = self._memory.popitem(last=False)
                if self.directory is None:
                    log.warning("forgot the bundles kept for coordinator %s: more than %d coordinators",
                                forgotten[:12], self.identities)

    @staticmethod
    def _read(path: Path, identity: str, name: str) -> Kept:
        try:
            content, arrays = bundle.unpack(path.read_bytes())
        except (OSError, WireError) as exc:
            raise KeepError(f"{path} cannot be read ({exc}); restore it, or remove it to start this coordinator's "
                            f"{name} afresh") from None
        label = content.pop("keep", None)
        if label != {"name": name, "coordinator": coordinator_key(identity)}:
            raise KeepError(f"{path} is not the {name} kept for this coordinator; restore it, or remove it to start "
                            "afresh")
        return Kept(content, arrays)


class Variates:
    """SCAFFOLD's ``c_i`` at a party: a runner around another (see the module docstring)."""

    def __init__(self, runner: Runner, keep: Keep) -> None:
        self.runner = runner
        self.keep = keep
        self._pending: OrderedDict[str, tuple[str, Kept]] = OrderedDict()  # request id -> (identity, c_i⁺ kept)
        self._lock = threading.Lock()

    def cancel(self, message_id: str) -> bool:
        return self.runner.cancel(message_id)

    def run(self, identity: str, request: Message) -> Message:
        """The worker's reply to ``request``, ``c_i`` handed in and taken out when it asks for SCAFFOLD."""
        if not (request.type == "train" and request.content.get("scaffold") is True):
            return _without_ci(request, self.runner.run(identity, request))
        if any(name.startswith(CI) for name in request.arrays):
            return _refused(request, "ValueError", "a train request may not carry scaffold.ci/ arrays: a party's "
                                                   "control variate never travels")
        template = template_of(split(request.arrays, C)[1])  # the worker checks c against the model
        try:
            ci = self._ci_for(identity, request, template)
        except KeepError as exc:
            log.error("%s", exc)
            return _refused(request, "GateError", "the party cannot read the SCAFFOLD control variate it keeps for "
                                                  "this coordinator; its owner will find why in its log")
        reply = self.runner.run(identity, dataclasses.replace(request, arrays={**request.arrays, **prefixed(CI, ci)}))
        if reply.type != "result":
            return _without_ci(request, reply)
        rest, new = split(reply.arrays, CI)
        problem = check_update(template, new) if new else "the worker's reply has no new control variate"
        if problem:
            log.warning("train request %s: no usable new control variate: %s", request.id[:8], problem)
            return _refused(request, "ValueError", f"the training produced no usable SCAFFOLD control variate "
                                                   f"({problem})")
        kept = Kept({"run": request.content["run"], "round": request.round or 0},
                    {**{_AFTER + k: np.array(v, copy=True) for k, v in new.items()},
                     **{_BEFORE + k: np.array(v, copy=True) for k, v in ci.items()}})
        with self._lock:
            self._pending[request.id] = (identity, kept)
            while len(self._pending) > MAX_PENDING:
                stale, _ = self._pending.popitem(last=False)
                log.warning("train request %s never ended; its new control variate is not kept", stale[:8])
        return dataclasses.replace(reply, arrays=rest)

    def settle(self, ticket: Ticket, released: bool) -> None:
        """The end of ``ticket``'s request is recorded: keep its ``c_i⁺`` if its result left, else forget it."""
        with self._lock:
            pending = self._pending.pop(ticket.message.id, None)
        if pending is None:
            return
        identity, kept = pending
        if not released:
            log.info("round %s's reply did not leave: the SCAFFOLD control variate stays as it was",
                     kept.content["round"])
            return
        try:
            self.keep.put(identity, SCAFFOLD, kept)
        except OSError as exc:
            log.error("could not write the SCAFFOLD control variate of round %s (%s): this process goes on with it, "
                      "a restart would bring back the one of before", kept.content["round"], exc)
        except ValueError as exc:  # more tensors than one bundle holds: the reply has left, c_i stays as it was
            log.error("could not keep the SCAFFOLD control variate of round %s (%s): it stays as it was",
                      kept.content["round"], exc)

    def _ci_for(self, identity: str, request: Message, template: Template) -> dict[str, np.ndarray]:
        """The ``c_i`` this round starts from: the one kept for this run (see the module docstring), else zeros."""
        zeros = {name: np.zeros(shape, dtype) for name, (shape, dtype) in template.items()}
        kept = self.keep.get(identity, SCAFFOLD)
        if kept is None:
            return zeros
        run, round_ = kept.content.get("run"), kept.content.get("round")
        where = self.keep.path(identity, SCAFFOLD) or "memory"
        if not isinstance(run, str) or isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise KeepError(f"the SCAFFOLD control variate kept in {where} names no run and round; remove it to "
                            "start afresh")
        if run != request.content["run"]:
            log.info("a new run from coordinator %s: its SCAFFOLD control variate starts from zeros", identity[:12])
            return zeros
        after, before = split(kept.arrays, _AFTER)[1], split(kept.arrays, _BEFORE)[1]
        this = request.round or 0
        if this < round_:
            log.warning("round %d comes after round %d of the same run: its SCAFFOLD control variate is the one "
                        "after round %d", this, round_, round_)
        chosen = before if this == round_ else after
        problem = check_update(template, chosen)
        if problem and template_of(chosen) != template:
            log.warning("the model changed within run %s: its SCAFFOLD control variate starts from zeros (%s)",
                        run[:8], problem)
            return zeros
        if problem:
            raise KeepError(f"the SCAFFOLD control variate kept in {where} is unusable ({problem}); remove it to "
                            "start afresh")
        return {name: np.asarray(chosen[name]) for name in template}


def _refused(request: Message, error_type: str, message: str) -> Message:
    return request.reply("error", {"error_type": error_type, "message": message, "origin": "party"})


def _without_ci(request: Message, reply: Message) -> Message:
    """A reply with no ``scaffold.ci/`` array: a party's control variate never leaves it."""
    rest, taken = split(reply.arrays, CI)
    if not taken:
        return reply
    log.warning("the worker's reply to %s %s carried scaffold.ci/ arrays; they were removed", request.type,
                request.id[:8])
    return dataclasses.replace(reply, arrays=rest)
