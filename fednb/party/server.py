"""The party server: a ROUTER socket loop that authenticates, validates and answers.

::

    coordinator DEALER ──CURVE/ZAP──> ROUTER (socket thread) ──jobs──> kernel (worker thread)
                       <──replies, heartbeats──┘        <──results + wake-up (inproc)──┘

The socket thread never runs coordinator code, so heartbeats keep flowing while a long cell
runs, and a malformed message is answered with an error while the party goes on serving.
"""

from __future__ import annotations

import enum
import logging
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
from fednb.party.kernel import Kernel
from fednb.transport import AllowList, Authenticator, Keypair, bound_endpoint, server_socket
from fednb.transport.channel import Received, receive, send
from fednb.wire import DEFAULT_LIMITS, Limits, Message

log = logging.getLogger(__name__)

POLICIES = ("open",)
WORK = frozenset({"train", "evaluate", "run"})


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
    identity: str
    message: Message


class PartyServer:
    """Serves one party's kernel on one endpoint until :meth:`stop`.

    ``keypair`` makes the socket a CURVE server, and then ``allow`` (the authorized
    coordinator keys) is required: the ZAP handler admits only those keys.
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
        heartbeat: float = 1.0,
        timeout: float = 10.0,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        if keypair is not None and allow is None:
            raise ValueError("a CURVE party needs its authorized keys (the allow-list)")
        if not 0 < heartbeat < timeout:
            raise ValueError("need 0 < heartbeat < timeout")
        self.name = name
        self.endpoint = endpoint
        self.kernel = Kernel(name, datasets)
        self.datasets = datasets
        self.keypair = keypair
        self.allow = allow
        self.policy = policy
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.limits = limits
        self.state = State.NEW
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._results: queue.Queue[tuple[bytes, Message]] = queue.Queue()
        self._cancelled: set[str] = set()
        self._sessions: dict[bytes, _Session] = {}
        #: Counters for monitoring and tests: messages received, malformed ones refused, requests run.
        self.stats = {"received": 0, "malformed": 0, "requests": 0, "bytes_in": 0, "bytes_out": 0}
        self._wake_address = f"inproc://fednb-party-{uuid.uuid4().hex}"

    # -- lifecycle ----------------------------------------------------------------------------

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Bind and serve in this thread until :meth:`stop` (e.g. from a signal handler)."""
        if self.state is not State.NEW:
            raise RuntimeError("a PartyServer serves once; make a new one")
        self.state = State.RUNNING
        try:
            self._serve(on_ready)
        finally:
            self.state = State.STOPPED

    def start(self, timeout: float = 30.0) -> str:
        """Serve on a background thread; return the bound endpoint once it listens."""
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
            self._jobs.put(_Job(routing, identity, message))
        elif message.type == "cancel":
            self._cancelled.add(message.content["target"])
        else:
            self._reply(router, routing, message.reply("error", {
                "error_type": "ProtocolError", "message": f"a party does not accept {message.type!r} messages"}))

    def _reply(self, router: zmq.Socket, routing: bytes, message: Message) -> None:
        try:
            self.stats["bytes_out"] += send(router, message, routing=routing, limits=self.limits, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the coordinator is gone; EAGAIN: it stopped reading. Its loss, not ours.
            log.warning("could not send %s to %s: %s", message.type, routing.hex()[:8], exc.strerror)
            if exc.errno == zmq.EHOSTUNREACH:
                self._sessions.pop(routing, None)

    def _send_results(self, router: zmq.Socket) -> None:
        while True:
            try:
                routing, reply = self._results.get_nowait()
            except queue.Empty:
                return
            self._reply(router, routing, reply)

    def _beat(self, router: zmq.Socket, now: float, authenticator: Authenticator | None) -> None:
        revoked = authenticator.revoked() if authenticator is not None else set()
        for routing, session in list(self._sessions.items()):
            if session.identity.encode() in revoked:
                log.warning("dropping the session of %s: its key was removed", session.identity[:12])
                self._reply(router, routing, Message("error", {"error_type": "AuthError", "message": "access revoked"}))
                del self._sessions[routing]
            elif now - session.last_seen > self.timeout:
                log.info("coordinator %s went silent; dropping its session", session.identity[:12])
                del self._sessions[routing]
            else:
                self._reply(router, routing, Message("heartbeat"))

    # -- the worker thread ----------------------------------------------------------------------

    def _work(self, context: zmq.Context) -> None:
        wake = context.socket(zmq.PAIR)
        wake.connect(self._wake_address)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                if job.message.id in self._cancelled:
                    self._cancelled.discard(job.message.id)
                    reply = job.message.reply("error", {"error_type": "Cancelled", "message": "cancelled before it ran"})
                else:
                    reply = self.kernel.handle(job.identity, job.message)
                self._results.put((job.routing, reply))
                wake.send(b"")
        finally:
            wake.close(linger=0)


def serve(name: str, endpoint: str, datasets: Datasets, **options: Any) -> PartyServer:
    """Start a party on a background thread and return its server (``.stop()`` ends it)."""
    server = PartyServer(name, endpoint, datasets, **options)
    server.start()
    return server
