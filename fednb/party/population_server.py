"""A shared endpoint: one ROUTER socket serving every party of a :class:`~fednb.party.population.Population`.

::

    coordinator DEALER ──[party][header][buffers…]──> ROUTER ──members.get(party).admit──> shared job thread
                       <──[party][reply…]───────────────┘   <──gate.release (each party's egress guard)──┘

Every message after the routing id carries an address frame: the virtual party it is for or
from, or ``b""`` for the endpoint itself (``hello``, ``welcome``, ``heartbeat``). So the
coordinator keeps one socket and one heartbeat per endpoint, not per party, and a round costs
what its sampled parties cost. A request goes through the same admission, gate and kernel as
at a process-per-party simulation's party (:mod:`fednb.party.server`); one job thread runs the
requests of all the endpoint's parties, one at a time, while the socket thread keeps
answering. An endpoint is a simulation's: policy ``simulation``, code run in this process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from fednb import __version__
from fednb.party.admission import Admission, Jobs, Outgoing, internal_error
from fednb.party.gate import Ticket
from fednb.party.listening import Listening
from fednb.party.population import MEMBERS, Members, Population
from fednb.transport import AllowList, Keypair
from fednb.transport.channel import Received, address_frame, receive
from fednb.wire import DEFAULT_LIMITS, Limits, Message, encode

log = logging.getLogger(__name__)

WORK = frozenset({"train", "secagg", "evaluate", "run"})


class PopulationServer:
    """Serves a population's parties on one endpoint until :meth:`stop` (see the module docstring)."""

    def __init__(self, name: str, endpoint: str, population: Population, *, keypair: Keypair | None = None,
                 allow: AllowList | None = None, heartbeat: float = 1.0, timeout: float = 10.0,
                 limits: Limits = DEFAULT_LIMITS, members: int = MEMBERS, max_held_bytes: int = 2**31,
                 require_secure_aggregation: bool = False, min_aggregate: int = 3,
                 directory: str | os.PathLike[str] | None = None) -> None:
        if keypair is not None and allow is None:
            raise ValueError("a CURVE endpoint needs its authorized keys (the allow-list)")
        if not 0 < heartbeat < timeout:
            raise ValueError("need 0 < heartbeat < timeout")
        self.name = name
        self.endpoint = endpoint
        self.population = population
        self.keypair = keypair
        self.allow = allow
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.limits = limits
        #: the bytes of requests all parties here may hold at once (each party's admission has the same bound)
        self.max_held_bytes = max_held_bytes
        self.jobs = Jobs(name)
        self.members = Members(population, self.jobs, members=members, max_held_bytes=max_held_bytes,
                               require_secure_aggregation=require_secure_aggregation, min_aggregate=min_aggregate,
                               directory=Path(directory) if directory is not None else None)
        self._stop = threading.Event()
        self._sessions: dict[bytes, float] = {}  # coordinator routing id -> last heard
        self.stats = {"received": 0, "malformed": 0, "requests": 0, "failed": 0}

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Bind and serve in this thread until :meth:`stop` (e.g. from a signal handler)."""
        listening: Listening | None = None
        try:
            # no queue limit: one coordinator's pipe carries the requests and replies of all these parties
            listening = Listening(self.endpoint, self.keypair, self.allow, limits=self.limits,
                                  heartbeat=self.heartbeat, timeout=self.timeout, queue=0)
            self.jobs.start(listening.context, listening.wake_address)
            self.endpoint = listening.endpoint
            log.info("population %s: %d parties serving on %s", self.name, len(self.population), self.endpoint)
            if on_ready is not None:
                on_ready(self.endpoint)
            self._loop(listening.router, listening.wake)
        finally:
            self.jobs.stop()
            if listening is not None:
                listening.close(self.jobs.join)
            for admission in self.members:
                admission.abandon("the party stopped")
                admission.gate.close()

    def _loop(self, router: zmq.Socket, wake: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=min(100, int(self.heartbeat * 1000))))
            if wake in events:
                while wake.poll(0):
                    wake.recv()
                for admission, out in self.jobs.finished():
                    admission.done(out)
                    self._send(router, admission, [out])
                self.members.trim()
            if router in events:
                for _ in range(256):
                    try:
                        received = receive(router, router=True, limits=self.limits, addressed=True)
                    except zmq.Again:
                        break
                    self._handle(router, received)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat
                self._beat(router, now)

    def _handle(self, router: zmq.Socket, received: Received) -> None:
        """Handle one message; whatever goes wrong costs that message an error reply, never the endpoint."""
        try:
            self._dispatch(router, received)
        except Exception:  # a bug of ours, or input no check foresaw: logged with its traceback, answered
            self.stats["failed"] += 1
            log.exception("population %s failed on a message for %r", self.name, received.party)
            self._reply(router, received.routing or b"", received.party or "", internal_error(received.message))

    def _dispatch(self, router: zmq.Socket, received: Received) -> None:
        routing, party = received.routing or b"", received.party or ""
        if routing not in self._sessions:
            log.info("coordinator %s connected", (received.user or "local")[:12])
        self._sessions[routing] = time.monotonic()
        self.stats["received"] += 1
        message = received.message
        if message is None:
            self.stats["malformed"] += 1
            log.warning("refused a malformed message for %r: %s", party, received.error)
            self._reply(router, routing, party, Message("error", {"error_type": "WireError",
                                                                   "message": str(received.error)}))
            return
        if message.type == "heartbeat":
            return
        if message.type == "hello" and not party:
            pool, counts = self.population.describe()
            self._reply(router, routing, "", message.reply("welcome", {
                "party": self.name, "version": __version__, "policy": "simulation", "containment": "none",
                "datasets": {}, "pool": pool}, counts))
            return
        if party not in self.population:
            self._reply(router, routing, party, message.reply("error", {
                "error_type": "ProtocolError", "message": f"no party {party!r} is served at {self.endpoint}"}))
            return
        if message.type in WORK:
            self.stats["requests"] += 1
            held = self.members.held_bytes()
            if held + received.nbytes > self.max_held_bytes:  # one budget for the endpoint, not one per party
                self._reply(router, routing, party, message.reply("error", {
                    "error_type": "PolicyRefused", "message": f"{self.name} holds {held:,} bytes of requests and "
                    f"this one has {received.nbytes:,}: over its budget of {self.max_held_bytes:,} bytes for "
                    "requests waiting or queued; try again later"}))
                return
            admission = self.members.get(party)
            ticket = Ticket(received.user or "local", message, received.nbytes, "")
            self._send(router, admission, admission.admit(routing, ticket))
        elif message.type == "cancel":
            self.members.get(party).cancel(message.content["target"], finish=bool(message.content.get("finish")))
        else:
            self._reply(router, routing, party, message.reply("error", {
                "error_type": "ProtocolError", "message": f"a party does not accept {message.type!r} messages"}))

    def _send(self, router: zmq.Socket, admission: Admission, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            try:
                if out.ticket is None:
                    self._reply(router, out.routing, admission.name, out.message)
                    continue
                kind, frames = admission.seal(out, self.limits)
                if not self._send_frames(router, out.routing, admission.name, frames, kind):
                    admission.undelivered(out.ticket)
            except Exception:  # as in _handle: one reply lost to a bug of ours, answered, never the endpoint
                self.stats["failed"] += 1
                log.exception("population %s failed on its reply to %s", self.name, out.message.reply_to)
                self._reply(router, out.routing, admission.name,
                            internal_error(out.ticket.message if out.ticket else None))

    def _reply(self, router: zmq.Socket, routing: bytes, party: str, message: Message) -> bool:
        return self._send_frames(router, routing, party, encode(message, self.limits), message.type)

    def _send_frames(self, router: zmq.Socket, routing: bytes, party: str, frames: list[Any], kind: str) -> bool:
        try:
            address = address_frame(party)
        except ValueError:
            address = b""  # a malformed address was refused above: the error goes to the endpoint
        try:
            router.send_multipart([routing, address, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the coordinator went away: the normal end of a session
                self._sessions.pop(routing, None)
            else:
                log.warning("could not send %s to %s: %s", kind, routing.hex()[:8], exc.strerror)
            return False
        return True

    def _beat(self, router: zmq.Socket, now: float) -> None:
        beat = encode(Message("heartbeat"), self.limits)
        for routing, last in list(self._sessions.items()):
            if now - last > self.timeout:
                log.info("a coordinator went silent; dropping its session")
                del self._sessions[routing]
                for admission in self.members:
                    admission.drop(routing, "the coordinator went silent")
            else:
                self._send_frames(router, routing, "", beat, "heartbeat")

