"""The party server: a ROUTER socket loop that authenticates, validates, gates and answers.

::

    coordinator DEALER ──CURVE/ZAP──> ROUTER (socket thread) ──gate.admit──> jobs ──> job thread
                       <──replies, heartbeats, status──┘                               │
                                          <──gate.release (egress guard)── sandbox worker process

The socket thread never runs coordinator code, so heartbeats keep flowing while a long cell
runs, and a malformed message is answered with an error while the party goes on serving.
Coordinator code runs in a worker process per coordinator (:mod:`fednb.party.sandbox`); a
request whose code the owner has not approved waits (policy review) or is refused
(allowlist), and every request ends in one line of the audit log (:mod:`fednb.party.gate`).
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from fednb import __version__
from fednb.party.datasets import Datasets
from fednb.party.egress import EgressRules
from fednb.party.gate import Gate, Ticket
from fednb.party.policy import POLICIES, Decision, Verdict, check_policy
from fednb.party.inprocess import InProcess
from fednb.party.sandbox import DEFAULT_MEMORY_LIMIT, DEFAULT_TIME_LIMIT, Sandbox
from fednb.transport import AllowList, Authenticator, Keypair, bound_endpoint, server_socket
from fednb.transport.channel import Received, receive, send
from fednb.wire import DEFAULT_LIMITS, Limits, Message, encode

log = logging.getLogger(__name__)

__all__ = ["POLICIES", "PartyServer", "serve"]

WORK = frozenset({"train", "evaluate", "run"})
MAX_WAITING = 64  # requests held for the owner at once (each may hold a model's weights)


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class _Session:
    """One connected coordinator, by ROUTER routing id."""

    routing: bytes
    identity: str
    last_seen: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Job:
    routing: bytes
    ticket: Ticket


class PartyServer:
    """Serves one party's kernel on one endpoint until :meth:`stop`.

    ``keypair`` makes the socket a CURVE server, and then ``allow`` (the authorized
    coordinator keys) is required: the ZAP handler admits only those keys. ``policy`` is
    ``review`` or ``allowlist`` (both need ``directory``, where approvals, pending requests and
    the audit log live), ``open`` (warns loudly), or ``simulation``. Each request runs in a
    worker process limited to ``time_limit`` seconds and to allocating ``memory_limit`` more
    bytes; ``egress`` sets the guard's limits. A simulation may pass ``contained=False`` to
    run requests in this process instead (:mod:`fednb.party.inprocess`).
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        datasets: Datasets,
        *,
        keypair: Keypair | None = None,
        allow: AllowList | None = None,
        policy: str = "open",
        directory: str | os.PathLike[str] | None = None,
        egress: EgressRules | None = None,
        time_limit: float = DEFAULT_TIME_LIMIT,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        threads: int = 0,
        heartbeat: float = 1.0,
        timeout: float = 10.0,
        limits: Limits = DEFAULT_LIMITS,
        contained: bool = True,
    ) -> None:
        check_policy(policy)
        if not contained and policy != "simulation":
            raise ValueError("only a simulation may run coordinator code outside a worker process")
        if keypair is not None and allow is None:
            raise ValueError("a CURVE party needs its authorized keys (the allow-list)")
        if not 0 < heartbeat < timeout:
            raise ValueError("need 0 < heartbeat < timeout")
        if policy not in ("open", "simulation") and directory is None:
            raise ValueError(f"policy {policy} needs a party directory (directory=...) for approvals and the audit log")
        self.name = name
        self.endpoint = endpoint
        self.datasets = datasets
        self.keypair = keypair
        self.allow = allow
        self.policy = policy
        self.directory = directory
        self.egress = egress or EgressRules()
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.limits = limits
        runner = Sandbox if contained else InProcess
        self.sandbox = runner(name, datasets, time_limit=time_limit, memory_limit=memory_limit, threads=threads,
                              limits=limits)
        self.gate: Gate | None = None
        self.state = State.NEW
        self._stop = threading.Event()
        #: Set once the server has stopped serving (for watchers such as the approvals widget).
        self.stopped = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._results: queue.Queue[tuple[bytes, Ticket, Message, str]] = queue.Queue()
        self._cancelled: set[str] = set()
        self._waiting: dict[str, tuple[bytes, Ticket]] = {}
        self._sessions: dict[bytes, _Session] = {}
        #: Counters for monitoring and tests: messages received, malformed ones refused, requests run.
        self.stats = {"received": 0, "malformed": 0, "requests": 0, "bytes_in": 0, "bytes_out": 0}
        self._wake_address = f"inproc://fednb-party-{uuid.uuid4().hex}"

    # -- lifecycle ----------------------------------------------------------------------------

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Bind and serve in this thread until :meth:`stop` (e.g. from a signal handler)."""
        if self.state is not State.NEW:
            raise RuntimeError("a PartyServer serves once; make a new one")
        self._prepare()
        self.state = State.RUNNING
        try:
            self._serve(on_ready)
        finally:
            self.state = State.STOPPED
            self.stopped.set()

    def _prepare(self) -> None:
        """Start the worker zygote (forked now, before any thread, when that is safe) and the gate."""
        if self.gate is not None:
            return
        try:
            self.datasets = self.sandbox.start()
            self.gate = Gate(self.name, self.policy, self.datasets, directory=self.directory, rules=self.egress)
        except BaseException:
            self.sandbox.stop()
            raise

    def start(self, timeout: float = 30.0) -> str:
        """Serve on a background thread; return the bound endpoint once it listens."""
        self._prepare()
        self._thread = threading.Thread(target=self._serve_in_thread, name=f"fednb-party-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"party {self.name} did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.endpoint

    def _serve_in_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._error = exc
            log.exception("party %s stopped on an error", self.name)
            self._ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; waits for the socket thread when serving in the background."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the socket thread ----------------------------------------------------------------------

    def _serve(self, on_ready: Callable[[str], None] | None) -> None:
        context = zmq.Context()
        authenticator = None
        sockets: list[zmq.Socket] = []
        worker = threading.Thread(target=self._work, args=(context,), name=f"fednb-kernel-{self.name}", daemon=True)
        try:
            if self.keypair is not None and self.allow is not None:
                authenticator = Authenticator(context, self.allow)
                authenticator.start()
            router = server_socket(context, self.endpoint, self.keypair, limits=self.limits,
                                   heartbeat_ms=int(self.heartbeat * 1000), timeout_ms=int(self.timeout * 1000))
            sockets.append(router)
            wake = context.socket(zmq.PAIR)
            sockets.append(wake)
            wake.bind(self._wake_address)
            worker.start()
            self.endpoint = bound_endpoint(router)
            log.info("party %s serving on %s (policy %s)", self.name, self.endpoint, self.policy)
            self._ready.set()
            if on_ready is not None:
                on_ready(self.endpoint)
            self._loop(router, wake, authenticator)
        finally:
            self._jobs.put(None)
            self.sandbox.stop()  # ends a running request, so the job thread can see the end of the queue
            for sock in sockets:
                sock.close(linger=0)
            if authenticator is not None:
                authenticator.stop()
            if worker.is_alive():
                worker.join(timeout=0.5)
            if worker.is_alive():  # a cell still running: its socket stays open, so don't wait for it
                context.destroy(linger=0)
            else:
                context.term()
            if self.gate is not None:
                for _, ticket in self._waiting.values():
                    self.gate.record(ticket, "abandoned: the party stopped")
                self.gate.close()

    def _loop(self, router: zmq.Socket, wake: zmq.Socket, authenticator: Authenticator | None) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=min(100, int(self.heartbeat * 1000))))
            if wake in events:
                while wake.poll(0):
                    wake.recv()
                self._send_results(router)
            if router in events:
                for _ in range(256):
                    try:
                        received = receive(router, router=True, limits=self.limits)
                    except zmq.Again:
                        break
                    self._dispatch(router, received)
            assert self.gate is not None
            if self._waiting and self.gate.changed():
                self._recheck(router)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat
                self._beat(router, now, authenticator)

    def _dispatch(self, router: zmq.Socket, received: Received) -> None:
        routing = received.routing or b""
        identity = received.user or "local"
        session = self._sessions.get(routing)
        if session is None:
            session = self._sessions[routing] = _Session(routing, identity)
            log.info("coordinator %s connected", identity[:12])
        session.last_seen = time.monotonic()
        self.stats["received"] += 1
        self.stats["bytes_in"] += received.nbytes
        message = received.message
        if message is None:
            self.stats["malformed"] += 1
            log.warning("refused a malformed message from %s: %s", identity[:12], received.error)
            self._reply(router, routing, Message("error", {"error_type": "WireError", "message": str(received.error)}))
            return
        if message.type == "heartbeat":
            return
        if message.type == "hello":
            self._reply(router, routing, message.reply("welcome", {
                "party": self.name, "version": __version__, "policy": self.policy,
                "datasets": self.datasets.describe(),
            }))
        elif message.type in WORK:
            self.stats["requests"] += 1
            label = (self.allow.label(identity.encode()) or "") if self.allow is not None else ""
            self._admit(router, routing, Ticket(identity, message, received.nbytes, label))
        elif message.type == "cancel":
            self._cancel(message.content["target"])
        else:
            self._reply(router, routing, message.reply("error", {
                "error_type": "ProtocolError", "message": f"a party does not accept {message.type!r} messages"}))

    # -- the gate ------------------------------------------------------------------------------

    def _admit(self, router: zmq.Socket, routing: bytes, ticket: Ticket) -> None:
        assert self.gate is not None
        decision = self.gate.admit(ticket)
        message = ticket.message
        if decision.verdict is Verdict.WAIT and len(self._waiting) >= MAX_WAITING:
            ticket.decision = decision = Decision(Verdict.REFUSE, f"{MAX_WAITING} requests already wait for the owner "
                                                                  f"of {self.name}; try again later")
        if decision.verdict is Verdict.RUN:
            self._jobs.put(_Job(routing, ticket))
        elif decision.verdict is Verdict.REFUSE:
            log.warning("refused %s request %s from %s: %s", message.type, message.id[:8], ticket.identity[:12],
                        decision.reason)
            self._answer(router, routing, ticket, self.gate.refusal(ticket), "refused")
        else:
            log.warning("%s request %s from %s is %s; decide with `fednb approve %s`", message.type, message.id[:8],
                        ticket.identity[:12], decision.reason, self.directory)
            self._waiting[message.id] = (routing, ticket)
            status = {"state": "awaiting approval", "detail": decision.reason}
            self._reply(router, routing, message.reply("status", status))

    def _recheck(self, router: zmq.Socket) -> None:
        """The owner decided something: run or refuse what waited for it."""
        assert self.gate is not None
        for message_id, (routing, ticket) in list(self._waiting.items()):
            decision = self.gate.admit(ticket, again=True)
            if decision.verdict is Verdict.WAIT:
                continue
            del self._waiting[message_id]
            ticket.notes.append("waited for the owner")
            if decision.verdict is Verdict.RUN:
                log.info("%s request %s approved; running it", ticket.message.type, message_id[:8])
                self._reply(router, routing, ticket.message.reply("status", {"state": "running",
                                                                             "detail": f"approved at {self.name}"}))
                self._jobs.put(_Job(routing, ticket))
            else:
                self._answer(router, routing, ticket, self.gate.refusal(ticket), "refused")

    def _cancel(self, target: str) -> None:
        waiting = self._waiting.pop(target, None)
        if waiting is not None:
            assert self.gate is not None
            self.gate.record(waiting[1], "cancelled while awaiting approval")
        elif not self.sandbox.cancel(target):  # not running now: maybe queued
            self._cancelled.add(target)

    def _answer(self, router: zmq.Socket, routing: bytes, ticket: Ticket, reply: Message, outcome: str) -> None:
        """Record a request's end in the audit log, then send its reply: the log is never behind."""
        assert self.gate is not None
        try:
            size = sum(memoryview(frame).nbytes for frame in encode(reply, self.limits))
        except ValueError as exc:
            log.warning("the reply to %s cannot be encoded: %s", reply.reply_to, exc)
            reply, outcome = (ticket.message.reply("error", {"error_type": "WireError",
                                                             "message": f"the reply cannot be sent: {exc}"}),
                              f"error: the reply cannot be sent ({exc})")
            size = 0
        self.gate.record(ticket, outcome, size)
        if not self._reply(router, routing, reply):
            self.gate.record(ticket, "the reply above was not delivered")

    def _reply(self, router: zmq.Socket, routing: bytes, message: Message) -> int:
        try:
            sent = send(router, message, routing=routing, limits=self.limits, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the coordinator is gone; EAGAIN: it stopped reading. Its loss, not ours.
            log.warning("could not send %s to %s: %s", message.type, routing.hex()[:8], exc.strerror)
            if exc.errno == zmq.EHOSTUNREACH:
                self._drop_session(routing, "the coordinator is gone")
            return 0
        self.stats["bytes_out"] += sent
        return sent

    def _drop_session(self, routing: bytes, why: str) -> None:
        self._sessions.pop(routing, None)
        for message_id, (waiting_routing, ticket) in list(self._waiting.items()):
            if waiting_routing == routing:
                del self._waiting[message_id]
                assert self.gate is not None
                self.gate.record(ticket, f"abandoned: {why}")

    def _send_results(self, router: zmq.Socket) -> None:
        while True:
            try:
                routing, ticket, reply, outcome = self._results.get_nowait()
            except queue.Empty:
                return
            self._answer(router, routing, ticket, reply, outcome)

    def _beat(self, router: zmq.Socket, now: float, authenticator: Authenticator | None) -> None:
        revoked = authenticator.revoked() if authenticator is not None else set()
        for routing, session in list(self._sessions.items()):
            if session.identity.encode() in revoked:
                log.warning("dropping the session of %s: its key was removed", session.identity[:12])
                self._reply(router, routing, Message("error", {"error_type": "AuthError", "message": "access revoked"}))
                self._drop_session(routing, "access revoked")
            elif now - session.last_seen > self.timeout:
                log.info("coordinator %s went silent; dropping its session", session.identity[:12])
                self._drop_session(routing, "the coordinator went silent")
            else:
                self._reply(router, routing, Message("heartbeat"))

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self, ticket: Ticket) -> tuple[Message, str]:
        """Run one admitted request in its worker and pass the reply through the gate."""
        assert self.gate is not None
        try:
            return self.gate.release(ticket, self.sandbox.run(ticket.identity, ticket.message))
        except Exception:  # a bug of ours must cost one request, not the party: logged, answered
            log.exception("%s request %s failed inside the party", ticket.message.type, ticket.message.id[:8])
            return _internal_error(ticket.message), "error: internal (see the party's log)"

    def _work(self, context: zmq.Context) -> None:
        wake = context.socket(zmq.PAIR)
        wake.connect(self._wake_address)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                ticket, request = job.ticket, job.ticket.message
                if request.id in self._cancelled:
                    self._cancelled.discard(request.id)
                    reply = request.reply("error", {"error_type": "Cancelled", "message": "cancelled before it ran"})
                    outcome = "cancelled before it ran"
                else:
                    reply, outcome = self._run(ticket)
                self._results.put((job.routing, ticket, reply, outcome))
                wake.send(b"")
        finally:
            wake.close(linger=0)


def _internal_error(request: Message) -> Message:
    return request.reply("error", {"error_type": "InternalError", "message": "the party failed on this request; "
                                                                             "its owner will find why in its log"})


def serve(name: str, endpoint: str, datasets: Datasets, **options: Any) -> PartyServer:
    """Start a party on a background thread and return its server (``.stop()`` ends it)."""
    server = PartyServer(name, endpoint, datasets, **options)
    server.start()
    return server
