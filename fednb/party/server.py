"""The party server: a ROUTER socket loop that authenticates, validates, gates and answers.

::

    coordinator DEALER ──CURVE/ZAP──> ROUTER (socket thread) ──gate.admit──> jobs ──> job thread
                       <──replies, heartbeats, status──┘                               │
                                          <──gate.release (egress guard)── sandbox worker process

The socket thread never runs coordinator code, so heartbeats keep flowing while a long cell
runs, and a malformed message, or one the party fails on, is answered with an error while the
party goes on serving. What happens to a request between the socket and the worker (replay
memory, waiting for the owner, the job thread) is :mod:`fednb.party.admission`'s. Coordinator
code runs in a worker process per coordinator (:mod:`fednb.party.sandbox`); a request whose
code the owner has not approved waits (policy review) or is refused (allowlist), and every
request ends in one line of the audit log (:mod:`fednb.party.gate`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from fednb import __version__
from fednb.party.admission import Admission, Outgoing, internal_error
from fednb.party.datasets import Datasets
from fednb.party.egress import EgressRules
from fednb.party.gate import Gate, Ticket, who
from fednb.party.inprocess import InProcess
from fednb.party.listening import Listening
from fednb.party.keep import Keep, Variates
from fednb.party.keep_vertical import KeptParts
from fednb.party.reach import check_start
from fednb.party.replay import Replays
from fednb.party.policy import POLICIES, check_policy
from fednb.party.sandbox import DEFAULT_MEMORY_LIMIT, DEFAULT_TIME_LIMIT, Sandbox
from fednb.privacy.ledger import check_budget
from fednb.transport import AllowList, Authenticator, Keypair
from fednb.transport.channel import Received, receive
from fednb.transport.sockets import send_frames
from fednb.wire import DEFAULT_LIMITS, Limits, Message, encode
from fednb.wire.limits import GiB

log = logging.getLogger(__name__)

__all__ = ["MAX_MESSAGE_BYTES", "POLICIES", "PartyServer", "serve"]

WORK = frozenset({"train", "secagg", "evaluate", "run", "vertical"})
#: The largest message a party accepts by default (``fednb party --max-message-bytes``): a model
#: of up to 256M float32 parameters (1 GiB of weights) with its header, as the default worker
#: memory limit (4 GiB: weights, gradients and optimizer state) can train.
MAX_MESSAGE_BYTES = 1 * GiB


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


class PartyServer:
    """Serves one party's kernel on one endpoint until :meth:`stop`.

    ``keypair`` makes the socket a CURVE server, and then ``allow`` (the authorized
    coordinator keys) is required: the ZAP handler admits only those keys. ``policy`` is
    ``review`` or ``allowlist`` (both need ``directory``, where approvals, pending requests and
    the audit log live), ``open`` (warns loudly), or ``simulation``. Each request runs in a
    worker process limited to ``time_limit`` seconds and to allocating ``memory_limit`` more
    bytes; ``egress`` sets the guard's limits. A simulation may pass ``contained=False`` to
    run requests in this process instead (:mod:`fednb.party.inprocess`). ``max_message_bytes``
    (default :data:`MAX_MESSAGE_BYTES`) bounds one message's tensors and each frame (ZeroMQ's
    ``MAXMSGSIZE`` drops a peer that sends a larger frame); ``max_held_bytes`` (default twice
    that) bounds the requests held while they wait for the owner, queue or run.

    Workers are contained (:mod:`fednb.party.containment`): no network, nothing but their
    datasets; ``devices`` are bound in (GPUs), ``private_paths`` (key files, the party
    directory is always included) are what the start-up probe checks no worker can read.
    Where the kernel refuses namespaces, policies ``review`` and ``allowlist`` refuse to
    start unless ``allow_weak_containment``.
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
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_held_bytes: int | None = None,
        contained: bool = True,
        allow_weak_containment: bool = False,
        devices: tuple[str, ...] = (),
        private_paths: tuple[str, ...] = (),
        require_secure_aggregation: bool = False,
        min_aggregate: int = 3,
        dp_epsilon: float | None = None,
        dp_delta: float = 1e-5,
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
        if dp_epsilon is not None:
            if directory is None:
                raise ValueError("a privacy budget needs a party directory (directory=...) for its ledger")
            check_budget(dp_epsilon, dp_delta)  # ValueError for a budget that cannot be one
        # the owner's ε budget (at δ) over the training data's lifetime, kept in the directory's ledger
        self.dp_budget = (float(dp_epsilon), float(dp_delta)) if dp_epsilon is not None else None
        self.name = name
        self.endpoint = endpoint
        self.datasets = datasets
        self.keypair = keypair
        self.allow = allow
        self.policy = policy
        # secure aggregation, enforced by this party's gate: plain train requests refused, and no
        # secure round of fewer than min_aggregate parties
        self.require_secure_aggregation = require_secure_aggregation
        self.min_aggregate = min_aggregate
        self.directory = directory
        self.egress = egress or EgressRules()
        self.heartbeat = heartbeat
        self.timeout = timeout
        # no frame (header or buffer) may be larger than a whole message: MAXMSGSIZE follows.
        # Limits refuses a max_message_bytes that is not a positive int.
        self.limits = dataclasses.replace(limits, max_message_bytes=max_message_bytes,
                                          max_buffer_bytes=min(limits.max_buffer_bytes, max_message_bytes),
                                          max_header_bytes=min(limits.max_header_bytes, max_message_bytes))
        self.max_held_bytes = max_held_bytes if max_held_bytes is not None else 2 * max_message_bytes
        self.allow_weak_containment = allow_weak_containment
        self.sandbox: Sandbox | InProcess
        if contained:
            # the probe also tries to read the party's own files from a worker: none may be readable
            check = tuple(str(p) for p in (directory, *private_paths) if p)
            self.sandbox = Sandbox(name, datasets, time_limit=time_limit, memory_limit=memory_limit, threads=threads,
                                   limits=self.limits, devices=tuple(devices), check_paths=check,
                                   min_aggregate=min_aggregate)
        else:
            self.sandbox = InProcess(name, datasets, threads=threads, min_aggregate=min_aggregate)
        self.gate: Gate | None = None
        self.admission: Admission | None = None
        self.state = State.NEW
        self._stop = threading.Event()
        #: Set once the server has stopped serving (for watchers such as the approvals widget).
        self.stopped = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sessions: dict[bytes, _Session] = {}
        #: Counters for monitoring and tests: messages received, malformed ones refused, requests run,
        #: messages the party itself failed on.
        self.stats = {"received": 0, "malformed": 0, "requests": 0, "failed": 0, "bytes_in": 0, "bytes_out": 0}

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
        """Open the gate (a broken audit log stops here), then start the worker zygote and admission.

        The zygote forks now, before any thread, when that is safe.
        """
        if self.gate is not None:
            return
        # read before anything starts: a party that cannot read which rounds it trained does not serve
        replays = Replays(directory=Path(self.directory) if self.directory else None)
        gate = Gate(self.name, self.policy, self.datasets, directory=self.directory, rules=self.egress,
                    require_secure_aggregation=self.require_secure_aggregation, min_aggregate=self.min_aggregate,
                    dp_budget=self.dp_budget)
        try:
            self.datasets = self.sandbox.start()
            # the guard reads the shared copy the workers see; the caller's copy can then be freed
            gate.guard.datasets = self.datasets
            self._check_containment()
        except BaseException:
            self.sandbox.stop()
            gate.close()
            raise
        self.gate = gate
        hint = f"fednb approve {self.directory}" if self.directory is not None else "the owner's approval"
        # SCAFFOLD's c_i and the parts of vertical runs, kept by this process for each coordinator, advance when a
        # reply's end is recorded
        keep = Keep(gate.directory)
        runner = KeptParts(Variates(self.sandbox, keep), keep)
        gate.on_recorded = runner.settle
        self.admission = Admission(self.name, gate, runner, approve_hint=hint,
                                   max_held_bytes=self.max_held_bytes, replays=replays)

    def _check_containment(self) -> None:
        check_start(self.name, self.policy, self.sandbox.containment, allow_weak=self.allow_weak_containment)

    @property
    def containment(self) -> str:
        """How coordinator code is contained here: full, weak or none (it runs in this process)."""
        return self.sandbox.containment.level

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
        assert self.gate is not None and self.admission is not None
        listening: Listening | None = None
        try:
            listening = Listening(self.endpoint, self.keypair, self.allow, limits=self.limits,
                                  heartbeat=self.heartbeat, timeout=self.timeout)
            self.admission.start(listening.context, listening.wake_address)
            self.endpoint = listening.endpoint
            log.info("party %s serving on %s (policy %s)", self.name, self.endpoint, self.policy)
            self._ready.set()
            if on_ready is not None:
                on_ready(self.endpoint)
            self._loop(listening.router, listening.wake, listening.authenticator)
        finally:
            self.admission.stop()
            self.sandbox.stop()  # ends a running request, so the job thread can see the end of the queue
            if listening is not None:
                listening.close(self.admission.join)
            self.admission.abandon("the party stopped")
            self.gate.close()

    def _loop(self, router: zmq.Socket, wake: zmq.Socket, authenticator: Authenticator | None) -> None:
        assert self.gate is not None and self.admission is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=min(100, int(self.heartbeat * 1000))))
            if wake in events:
                while wake.poll(0):
                    wake.recv()
                self._send(router, self.admission.finished())
            if router in events:
                for _ in range(256):
                    try:
                        received = receive(router, router=True, limits=self.limits)
                    except zmq.Again:
                        break
                    self._handle(router, received)
            if self.admission.waiting and self.gate.changed():
                self._send(router, self.admission.recheck())
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat
                self._beat(router, now, authenticator)

    def _handle(self, router: zmq.Socket, received: Received) -> None:
        """Handle one message; whatever goes wrong costs that message an error reply, never the party."""
        try:
            self._dispatch(router, received)
        except Exception:  # a bug of ours, or input no check foresaw: logged with its traceback, answered
            self.stats["failed"] += 1
            request = received.message
            log.exception("the party failed on %s from %s", f"{request.type} {request.id[:8]}" if request else
                          "a malformed message", received.user or "local")
            self._reply(router, received.routing or b"", internal_error(request))

    def _dispatch(self, router: zmq.Socket, received: Received) -> None:
        assert self.admission is not None
        routing = received.routing or b""
        identity = received.user or "local"
        session = self._sessions.get(routing)
        if session is None:
            session = self._sessions[routing] = _Session(routing, identity)
            log.info("coordinator %s connected", self._who(identity))
        session.last_seen = time.monotonic()
        self.stats["received"] += 1
        self.stats["bytes_in"] += received.nbytes
        message = received.message
        if message is None:
            self.stats["malformed"] += 1
            log.warning("refused a malformed message from %s: %s", self._who(identity), received.error)
            self._reply(router, routing, Message("error", {"error_type": "WireError", "message": str(received.error)}))
            return
        if message.type == "heartbeat":
            return
        if message.type == "hello":
            self._reply(router, routing, message.reply("welcome", {
                "party": self.name, "version": __version__, "policy": self.policy,
                "datasets": self.datasets.describe(), "containment": self.containment,
                **({"privacy": self.gate.budget.summary()} if self.gate and self.gate.budget else {}),
            }))
        elif message.type in WORK:
            self.stats["requests"] += 1
            ticket = Ticket(identity, message, received.nbytes, self._label(identity))
            self._send(router, self.admission.admit(routing, ticket))
        elif message.type == "cancel":
            self.admission.cancel(message.content["target"], finish=bool(message.content.get("finish")))
        else:
            self._reply(router, routing, message.reply("error", {
                "error_type": "ProtocolError", "message": f"a party does not accept {message.type!r} messages"}))

    def _label(self, identity: str) -> str:
        return (self.allow.label(identity.encode()) or "") if self.allow is not None else ""

    def _who(self, identity: str) -> str:
        return who(identity, self._label(identity))

    # -- replies ----------------------------------------------------------------------------------

    def _send(self, router: zmq.Socket, outgoing: list[Outgoing]) -> None:
        """Send what admission handed over; a request's end is sealed (recorded, then encoded once) first."""
        assert self.admission is not None
        for out in outgoing:
            try:
                if out.ticket is None:
                    self._reply(router, out.routing, out.message)
                    continue
                kind, frames = self.admission.seal(out, self.limits)
                if not self._send_frames(router, out.routing, frames, kind):
                    self.admission.undelivered(out.ticket)
            except Exception:  # as in _handle: one reply lost to a bug of ours, answered, never the party
                self.stats["failed"] += 1
                log.exception("the party failed on its reply to %s", out.message.reply_to)
                self._reply(router, out.routing, internal_error(out.ticket.message if out.ticket else None))

    def _reply(self, router: zmq.Socket, routing: bytes, message: Message) -> int:
        return self._send_frames(router, routing, encode(message, self.limits), message.type)

    def _send_frames(self, router: zmq.Socket, routing: bytes, frames: list[Any], kind: str) -> int:
        try:
            sent = send_frames(router, frames, routing=routing, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the coordinator went away: the normal end of a session
                session = self._sessions.get(routing)
                log.info("coordinator %s disconnected", self._who(session.identity) if session else routing.hex()[:8])
                self._drop_session(routing, "the coordinator is gone")
            else:  # EAGAIN: it stopped reading; its loss, not ours, but worth the owner's eye
                log.warning("could not send %s to %s: %s", kind, routing.hex()[:8], exc.strerror)
            return 0
        self.stats["bytes_out"] += sent
        return sent

    def _drop_session(self, routing: bytes, why: str) -> None:
        assert self.admission is not None
        self._sessions.pop(routing, None)
        self.admission.drop(routing, why)

    def _beat(self, router: zmq.Socket, now: float, authenticator: Authenticator | None) -> None:
        revoked = authenticator.revoked() if authenticator is not None else set()
        beat = encode(Message("heartbeat"), self.limits)  # one encoding for every session this beat
        for routing, session in list(self._sessions.items()):
            if session.identity.encode() in revoked:
                log.warning("dropping the session of %s: its key was removed", self._who(session.identity))
                self._reply(router, routing, Message("error", {"error_type": "AuthError", "message": "access revoked"}))
                self._drop_session(routing, "access revoked")
            elif now - session.last_seen > self.timeout:
                log.info("coordinator %s went silent; dropping its session", self._who(session.identity))
                self._drop_session(routing, "the coordinator went silent")
            else:
                self._send_frames(router, routing, beat, "heartbeat")


def serve(name: str, endpoint: str, datasets: Datasets, **options: Any) -> PartyServer:
    """Start a party on a background thread and return its server (``.stop()`` ends it)."""
    server = PartyServer(name, endpoint, datasets, **options)
    server.start()
    return server
