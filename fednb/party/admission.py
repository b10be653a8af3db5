"""Admission: what happens to a request between the socket loop and the worker.

::

    request ──replay memory──gate.admit──> run: the job queue ──> job thread ──> worker ──gate.release──┐
                                      └──> wait: held for the owner (bounded count and bytes)         │
                                      └──> refuse                                                     │
    socket loop <── Outgoing (reply, and the ticket whose audit line it ends) <────────────────────────┘

Everything here but the job thread runs on the socket thread; the job thread runs one request
at a time and hands its reply back through a queue, waking the socket thread over an inproc pair.
A request's end is sealed here too (:meth:`Admission.seal`): its audit line is written before
its reply, encoded once, leaves. Memory a peer could pin is bounded: requests held (waiting for the owner, queued or running)
by ``max_held`` and ``max_held_bytes``, the replay memory by :mod:`fednb.party.replay`, and a
cancel is remembered only for a request that is queued right now.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from fednb.errors import FednbError
from fednb.party.gate import Gate, Ticket
from fednb.party.policy import Decision, Verdict, request_code
from fednb.party.replay import Replays
from fednb.wire import Limits, Message, encode

log = logging.getLogger(__name__)

MAX_WAITING = 64  # requests held for the owner at once
MAX_HELD = 256  # requests held at once: waiting for the owner, queued for the job thread, or running


class Runner(Protocol):
    """What admission needs of a sandbox: run one request, cancel the running one."""

    def run(self, identity: str, request: Message) -> Message: ...

    def cancel(self, message_id: str) -> bool: ...


@dataclass(frozen=True)
class Outgoing:
    """A message for the socket loop to send; with a ticket it ends that request (an audit line first)."""

    routing: bytes
    message: Message
    ticket: Ticket | None = None
    outcome: str = ""


@dataclass(frozen=True)
class _Job:
    routing: bytes
    ticket: Ticket
    admission: Admission


class Admission:
    """The requests of one party from admission to reply; see the module docstring."""

    def __init__(self, name: str, gate: Gate, runner: Runner, *, approve_hint: str, max_held_bytes: int,
                 replays: Replays | None = None, jobs: Jobs | None = None) -> None:
        if max_held_bytes < 1:
            raise ValueError("max_held_bytes must be positive")
        self.name = name
        self.gate = gate
        self.runner = runner
        self.approve_hint = approve_hint
        self.max_held_bytes = max_held_bytes
        self.replays = replays or Replays()
        self.waiting: dict[str, tuple[bytes, Ticket]] = {}
        self._held: dict[str, int] = {}  # request id -> bytes, from admission to reply
        # a party's own job thread, or one shared by the virtual parties of a population
        self.jobs = jobs if jobs is not None else Jobs(name)
        self._owns_jobs = jobs is None
        self._lock = threading.Lock()  # guards _queued and _cancelled, shared with the job thread
        self._queued: set[str] = set()
        self._cancelled: set[str] = set()

    @property
    def held_bytes(self) -> int:
        return sum(self._held.values())

    def holds(self) -> bool:
        """Whether a request of this party waits, is queued or runs (it has no reply yet)."""
        return bool(self._held)

    # -- the socket thread ------------------------------------------------------------------------

    def admit(self, routing: bytes, ticket: Ticket) -> list[Outgoing]:
        """Decide on one request: queue it, hold it for the owner, or answer it with a refusal."""
        message = ticket.message
        replay = self.replays.check(ticket.identity, message)
        if replay is not None:
            ticket.decision = Decision(Verdict.REFUSE, replay)
            log.warning("refused %s request %s from %s: %s", message.type, message.id[:8], ticket.who, replay)
            error = message.reply("error", {"error_type": "ReplayError", "message": f"{self.name}: {replay}"})
            return [Outgoing(routing, error, ticket, f"refused: {replay}")]
        full = self._full(ticket)  # before the gate, which may spend one of an approval's rounds
        if full:
            if message.type != "secagg":  # a secure stage carries no code: its audit line has none
                ticket.code = request_code(message.type, message.content)  # for the audit line
            ticket.decision = decision = Decision(Verdict.REFUSE, full)
        else:
            decision = self.gate.admit(ticket)
        if decision.verdict is Verdict.WAIT and len(self.waiting) >= MAX_WAITING:
            ticket.decision = decision = Decision(Verdict.REFUSE, f"{MAX_WAITING} requests already wait for the "
                                                                  f"owner of {self.name}; try again later")
        if decision.verdict is Verdict.RUN:
            self._queue(routing, ticket)
            return []
        if decision.verdict is Verdict.REFUSE:
            log.warning("refused %s request %s from %s: %s", message.type, message.id[:8], ticket.who,
                        decision.reason)
            return [Outgoing(routing, self.gate.refusal(ticket), ticket, "refused")]
        log.warning("%s request %s from %s is %s; decide with `%s`", message.type, message.id[:8], ticket.who,
                    decision.reason, self.approve_hint)
        self.waiting[message.id] = (routing, ticket)
        self._held[message.id] = ticket.bytes_in
        return [Outgoing(routing, message.reply("status", {"state": "awaiting approval", "detail": decision.reason}))]

    def _full(self, ticket: Ticket) -> str:
        """Why this request cannot be held now ('' when it can): a bounded count and bytes, refused at once."""
        if len(self._held) >= MAX_HELD:
            return f"{self.name} holds {MAX_HELD} requests already; try again later"
        held = self.held_bytes
        if held + ticket.bytes_in > self.max_held_bytes:
            return (f"{self.name} holds {held:,} bytes of requests and this one has {ticket.bytes_in:,}: over its "
                    f"budget of {self.max_held_bytes:,} bytes for requests waiting or queued; try again later")
        return ""

    def _queue(self, routing: bytes, ticket: Ticket) -> None:
        self._held[ticket.message.id] = ticket.bytes_in
        with self._lock:
            self._queued.add(ticket.message.id)
        self.jobs.put(_Job(routing, ticket, self))

    def recheck(self) -> list[Outgoing]:
        """The owner decided something: run or refuse what waited for it."""
        out: list[Outgoing] = []
        for message_id, (routing, ticket) in list(self.waiting.items()):
            decision = self.gate.admit(ticket, again=True)
            if decision.verdict is Verdict.WAIT:
                continue
            del self.waiting[message_id]
            ticket.notes.append("waited for the owner")
            if decision.verdict is Verdict.RUN:
                log.info("%s request %s approved; running it", ticket.message.type, message_id[:8])
                out.append(Outgoing(routing, ticket.message.reply("status", {
                    "state": "running", "detail": f"approved at {self.name}"})))
                self._queue(routing, ticket)
            else:
                self._held.pop(message_id, None)
                out.append(Outgoing(routing, self.gate.refusal(ticket), ticket, "refused"))
        return out

    def cancel(self, target: str, finish: bool = False) -> None:
        """Cancel a request waiting, queued or running (with ``finish``, one running goes on to its end);
        an id that is none of these is not remembered."""
        waiting = self.waiting.pop(target, None)
        if waiting is not None:
            self._held.pop(target, None)
            self._record(waiting[1], "cancelled while awaiting approval")
            return
        with self._lock:
            if target in self._queued:
                self._cancelled.add(target)
                return
        if finish:
            log.info("the coordinator stopped waiting for %s; if it runs, it runs to its end (its reply will be late)",
                     target[:8])
            return
        if not self.runner.cancel(target):
            log.info("a cancel for %s found no such request waiting, queued or running", target[:8])

    def finished(self) -> list[Outgoing]:
        """Replies of requests the job thread finished since the last look (a party's own job thread)."""
        out = []
        for admission, done in self.jobs.finished():
            admission.done(done)
            out.append(done)
        return out

    def done(self, out: Outgoing) -> None:
        """``out`` ends a request this admission queued: it no longer counts as held."""
        if out.ticket is not None:
            self._held.pop(out.ticket.message.id, None)

    def seal(self, out: Outgoing, limits: Limits) -> tuple[str, list[Any]]:
        """The type and frames that end ``out.ticket``'s request, recorded in the audit log before they leave.

        The reply is encoded once, measured for the log, and those frames are what is sent. When the
        log cannot be written a result is withheld (the log fails closed); an error still goes.
        """
        assert out.ticket is not None
        ticket, reply, outcome = out.ticket, out.message, out.outcome
        try:
            frames = encode(reply, limits)
        except ValueError as exc:
            log.warning("the reply to %s cannot be encoded: %s", reply.reply_to, exc)
            reply = ticket.message.reply("error", {"error_type": "WireError",
                                                   "message": f"the reply cannot be sent: {exc}"})
            outcome = f"error: the reply cannot be sent ({exc})"
            frames = encode(reply, limits)
        try:
            self.gate.record(ticket, outcome, sum(memoryview(frame).nbytes for frame in frames))
        except FednbError as exc:
            log.error("could not record %s request %s: %s", ticket.message.type, ticket.message.id[:8], exc)
            if reply.type != "error":  # a refusal or failure carries nothing of the data: it may still go
                reply = ticket.message.reply("error", {"error_type": "GateError", "message":
                                                       f"{self.name} could not write its audit log, so the reply "
                                                       "is withheld; its owner will find why in its log"})
                frames = encode(reply, limits)
        return reply.type, frames

    def undelivered(self, ticket: Ticket) -> None:
        self._record(ticket, "the reply above was not delivered")

    def drop(self, routing: bytes, why: str) -> None:
        """A coordinator is gone: what waited for the owner on its behalf is abandoned."""
        for message_id, (waiting_routing, ticket) in list(self.waiting.items()):
            if waiting_routing == routing:
                del self.waiting[message_id]
                self._held.pop(message_id, None)
                self._record(ticket, f"abandoned: {why}")

    def abandon(self, why: str) -> None:
        """The party stops: record every request still waiting."""
        for _, ticket in self.waiting.values():
            self._record(ticket, f"abandoned: {why}")
        self.waiting.clear()

    def _record(self, ticket: Ticket, outcome: str) -> None:
        """The end of a request that sends nothing: a log that cannot be written already refuses all work."""
        try:
            self.gate.record(ticket, outcome)
        except FednbError as exc:
            log.error("could not record %s request %s (%s): %s", ticket.message.type, ticket.message.id[:8], outcome,
                      exc)

    # -- the job thread ---------------------------------------------------------------------------

    def start(self, context: zmq.Context, wake_address: str) -> None:
        if self._owns_jobs:
            self.jobs.start(context, wake_address)

    def stop(self) -> None:
        """Let the job thread leave after the request it runs (the caller stops the sandbox)."""
        if self._owns_jobs:
            self.jobs.stop()

    def join(self, timeout: float) -> bool:
        """Wait for the job thread; True when it has ended."""
        return self.jobs.join(timeout) if self._owns_jobs else True

    def execute(self, job: _Job) -> Outgoing:
        """Run one queued job on the job thread (unless it was cancelled while queued)."""
        ticket, request = job.ticket, job.ticket.message
        with self._lock:
            self._queued.discard(request.id)
            cancelled = request.id in self._cancelled
            self._cancelled.discard(request.id)
        if cancelled:
            reply = request.reply("error", {"error_type": "Cancelled", "message": "cancelled before it ran"})
            outcome = "cancelled before it ran"
        else:
            reply, outcome = self._run(ticket)
        return Outgoing(job.routing, reply, ticket, outcome)

    def _run(self, ticket: Ticket) -> tuple[Message, str]:
        """Run one admitted request in its worker and pass the reply through the gate."""
        try:
            return self.gate.release(ticket, self.runner.run(ticket.identity, ticket.message))
        # a bug of ours must cost one request, not the party: logged, answered; so must a cell's SystemExit
        # in process (a simulation, a pool worker's job thread), which would end the thread of every party
        except (Exception, SystemExit):
            log.exception("%s request %s failed inside the party", ticket.message.type, ticket.message.id[:8])
            return internal_error(ticket.message), "error: internal (see the party's log)"


class Jobs:
    """The job thread: runs admitted requests one at a time, in order, and hands their replies back.

    A party has its own; the virtual parties of a population share one (their admissions are
    separate: replay memory, held bytes, cancels). Replies wait in a queue, and the socket
    thread is woken over an inproc pair.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._results: queue.Queue[tuple[Admission, Outgoing]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def put(self, job: _Job) -> None:
        self._jobs.put(job)

    def finished(self) -> list[tuple[Admission, Outgoing]]:
        """Each reply finished since the last look, with the admission whose request it ends."""
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def start(self, context: zmq.Context, wake_address: str) -> None:
        self._thread = threading.Thread(target=self._work, args=(context, wake_address),
                                        name=f"fednb-kernel-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _work(self, context: zmq.Context, wake_address: str) -> None:
        wake = context.socket(zmq.PAIR)
        wake.connect(wake_address)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                self._results.put((job.admission, job.admission.execute(job)))
                wake.send(b"")
        finally:
            wake.close(linger=0)


def internal_error(request: Message | None) -> Message:
    """The reply to a request (or a message that was none) the party itself failed on; the why stays in its log."""
    content = {"error_type": "InternalError", "message": "the party failed on this request; its owner will find "
                                                         "why in its log"}
    return request.reply("error", content) if request is not None else Message("error", content)
