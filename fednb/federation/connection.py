"""The coordinator's socket thread: one DEALER per party (or per shared endpoint), heartbeats, replies matched to requests.

All socket I/O of a federation happens here. Callers on any thread (a notebook cell inside a
running asyncio loop, a background training thread) hand in requests and get
:class:`concurrent.futures.Future` objects back; no event loop is nested or shared.

Each party's own state and message handling live in :mod:`fednb.federation.link`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from collections.abc import Iterable
from typing import Any

import zmq

from fednb.errors import FederationError
from fednb.federation.config import PartySpec, probe
from fednb.federation.endpoint import SharedEndpoint
from fednb.federation.events import EventBus
from fednb.federation.link import MONITORED, Link, resolve
from fednb.transport import Keypair, client_socket
from fednb.transport.channel import address_frame
from fednb.wire import DEFAULT_LIMITS, Limits, Message, encode

log = logging.getLogger(__name__)

#: When connecting, ask a silent endpoint ourselves after this long, this often, and call it
#: unreachable after this many refusals in a row (a party that is just starting gets a moment).
PROBE_AFTER = 0.5
PROBE_EVERY = 0.5
PROBE_REFUSALS = 2

class Connections:
    """Links to every party, served by one thread; see the module docstring."""

    def __init__(self, specs: list[PartySpec], keypair: Keypair | None, bus: EventBus, *,
                 heartbeat: float = 1.0, timeout: float = 10.0, limits: Limits = DEFAULT_LIMITS,
                 coordinator: str = "") -> None:
        if not 0 < heartbeat < timeout:
            raise ValueError("need 0 < heartbeat < timeout")
        self.specs = specs
        self.keypair = keypair
        self.bus = bus
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.limits = limits
        self.coordinator = coordinator
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._context = zmq.Context()
        self._links: dict[str, Link] = {}
        #: What the socket thread polls: a party's own link, or a shared endpoint with its parties' links.
        self._pollables: list[Link | SharedEndpoint] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fednb-federation-io", daemon=True)
        self._closed = False
        self._sockets_closed = False
        self._opened: list[zmq.Socket] = []
        try:
            shared: dict[tuple[str, bytes | None], list[PartySpec]] = {}
            for spec in specs:
                if spec.shared:
                    shared.setdefault((spec.endpoint, spec.public_key), []).append(spec)
                    continue
                sock, monitor = self._socket(spec.endpoint, spec.public_key)
                link = self._links[spec.name] = Link(spec, sock, monitor, bus, self._changed, limits)
                self._pollables.append(link)
            for (endpoint, public_key), members in shared.items():
                sock, monitor = self._socket(endpoint, public_key, queue=0)  # a round's requests, all at once
                links = [Link(spec, sock, monitor, bus, self._changed, limits, address=address_frame(spec.name))
                         for spec in members]
                self._links.update((link.name, link) for link in links)
                self._pollables.append(SharedEndpoint(endpoint, sock, monitor, links, limits))
        except BaseException:
            self._close_sockets()
            raise

    def _socket(self, endpoint: str, public_key: bytes | None, queue: int | None = None) -> tuple[zmq.Socket, zmq.Socket]:
        """A DEALER to ``endpoint`` and its monitor, registered for closing before anything can fail."""
        sock = client_socket(self._context, endpoint, self.keypair if public_key else None, public_key,
                             limits=self.limits, heartbeat_ms=int(self.heartbeat * 1000),
                             timeout_ms=int(self.timeout * 1000), queue=queue)
        self._opened.append(sock)
        monitor = sock.get_monitor_socket(MONITORED)
        self._opened.append(monitor)
        return sock, monitor

    # -- called from any thread -------------------------------------------------------------------

    def start(self, timeout: float = 30.0, require_all: bool = True) -> None:
        """Start the socket thread and wait until every party answered (or failed)."""
        self._thread.start()
        started = time.monotonic()
        deadline = started + timeout
        refusals: dict[str, int] = {}
        next_probe = started + PROBE_AFTER
        while True:
            with self._changed:
                waiting = [link for link in self._links.values() if link.status == "connecting"]
                if not waiting or time.monotonic() >= deadline:
                    break
                self._changed.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            if time.monotonic() >= next_probe:
                # libzmq retries a refused connection silently: ask the endpoint ourselves, so that
                # nobody listening is said at once instead of as "no answer" after the timeout
                next_probe = time.monotonic() + PROBE_EVERY
                for endpoint in dict.fromkeys(link.spec.endpoint for link in waiting):  # a shared one once
                    why = probe(endpoint)
                    refusals[endpoint] = refusals.get(endpoint, 0) + 1 if why else 0
                    if why and refusals[endpoint] >= PROBE_REFUSALS:
                        self._command("unreachable", (endpoint, why))
        with self._changed:
            failed = {name: link for name, link in self._links.items() if link.status != "online"}
        if failed and require_all:
            reasons = "; ".join(f"{name}: {link.detail or 'no answer within %.0f s' % timeout}" for name, link in failed.items())
            self.close()
            raise FederationError(f"could not connect to {len(failed)} of {len(self._links)} parties ({reasons})")

    def request(self, party: str, message: Message) -> Future[Message]:
        """Send ``message`` to ``party``; the future holds its reply (result or error message)."""
        if self._closed:
            raise FederationError("the federation is closed")
        return self.broadcast([party], message)[party]

    def broadcast(self, parties: list[str], message: Message) -> dict[str, Future[Message]]:
        """Send one ``message`` to each of ``parties``, encoded once here; a future per party.

        The frames are encoded on the calling thread (tensor buffers are zero-copy views) and
        the socket thread sends the same frames to every party.
        """
        if self._closed:
            raise FederationError("the federation is closed")
        unknown = [party for party in parties if party not in self._links]
        if unknown:
            raise FederationError(f"unknown party {unknown[0]!r}", party=unknown[0])
        frames = encode(message, self.limits)
        futures: dict[str, Future[Message]] = {party: Future() for party in parties}
        self._command("send", (message.id, frames, futures))
        return futures

    def cancel(self, party: str, message_id: str, finish: bool = False) -> None:
        """Ask ``party`` to drop a queued request and stop it if running (with ``finish``, let it run
        to its end: its session stays warm); its reply, if any, will be ignored."""
        if not self._closed:
            self._command("cancel", (party, message_id, finish))

    def awaiting(self, party: str, message_id: str | None = None) -> str | None:
        """What ``party`` said about a request it holds for its owner's approval (any, or ``message_id``)."""
        with self._lock:
            link = self._links.get(party)
            if link is None or not link.awaiting:
                return None
            if message_id is None:
                return next(iter(link.awaiting.values()))
            return link.awaiting.get(message_id)

    def cancel_all(self) -> None:
        """Cancel every request in flight at every party (Ctrl-C, a stop button): their work is killed there."""
        if self._closed:
            return
        with self._lock:
            # list(): a C-level copy, while the socket thread may add or settle requests
            targets = [(name, message_id) for name, link in self._links.items() for message_id in list(link.pending)]
        for party, message_id in targets:
            self.cancel(party, message_id)

    def snapshot(self, parties: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Each party's (or each of ``parties``') status, detail, seconds since last heard, what it said in
        welcome, and what it holds for its owner's approval (``awaiting``: the party's words, or None), and how
        many of its replies came after their request was settled and were discarded (``late``)."""
        now = time.monotonic()
        with self._lock:
            links = self._links if parties is None else {name: self._links[name] for name in parties}
            return {
                name: {"endpoint": link.spec.endpoint, "status": link.status, "detail": link.detail,
                       "awaiting": next(iter(link.awaiting.values()), None),
                       "silent_for": (now - link.last_seen) if link.last_seen else None, "info": dict(link.info),
                       "late": link.late}
                for name, link in links.items()
            }

    def online(self) -> list[str]:
        with self._lock:
            return [name for name, link in self._links.items() if link.status == "online"]

    def endpoints(self) -> list[dict[str, Any]]:
        """Each shared endpoint: its address, status and how many of the parties are served there."""
        with self._lock:
            return [p.describe() for p in self._pollables if isinstance(p, SharedEndpoint)]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, fail what is pending, close every socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_sockets()

    def _command(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the thread is awake already
            pass
        except OSError as exc:
            log.debug("wake pipe closed: %s", exc)

    def _close_sockets(self) -> None:
        with self._lock:
            if self._sockets_closed:
                return
            self._sockets_closed = True
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "send":
                for party, future in payload[2].items():
                    resolve(future, error=FederationError("the federation was closed", party=party))
        for link in self._links.values():
            for future in link.pending.values():
                resolve(future, error=FederationError("the federation was closed", party=link.spec.name))
            link.pending.clear()
        for sock in self._opened:
            sock.close(linger=0)
        self._context.term()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError as exc:
                log.debug("closing the wake pipe: %s", exc)

    # -- the socket thread ----------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        by_socket: dict[zmq.Socket, Link | SharedEndpoint] = {}
        by_monitor: dict[zmq.Socket, Link | SharedEndpoint] = {}
        for pollable in self._pollables:
            poller.register(pollable.socket, zmq.POLLIN)
            poller.register(pollable.monitor, zmq.POLLIN)
            by_socket[pollable.socket], by_monitor[pollable.monitor] = pollable, pollable
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=50))
                if self._wake_r in events:
                    self._drain_wake()
                self._run_commands()
                for sock in events:
                    if sock in by_socket:
                        by_socket[sock].receive()
                    elif sock in by_monitor:
                        by_monitor[sock].watch()
                now = time.monotonic()
                self._say_hello(now)
                if now >= next_beat:
                    next_beat = now + self.heartbeat
                    self._beat(now)
        except Exception:
            log.exception("the federation's socket thread failed")
            raise
        finally:
            self._close_sockets()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "send":
                message_id, frames, futures = payload
                for party, future in futures.items():
                    self._links[party].request(message_id, frames, future)
            elif kind == "unreachable":
                endpoint, why = payload
                for pollable in self._pollables:
                    if isinstance(pollable, SharedEndpoint) and pollable.endpoint == endpoint:
                        pollable.unreachable(why)
                    elif isinstance(pollable, Link) and pollable.spec.endpoint == endpoint \
                            and pollable.status == "connecting":
                        pollable.set_status("unreachable", why)
            elif kind == "cancel":
                party, message_id, finish = payload
                self._links[party].cancel(message_id, finish)

    def _say_hello(self, now: float) -> None:
        for pollable in self._pollables:
            pollable.hello(now, self.heartbeat, self.coordinator)

    def _beat(self, now: float) -> None:
        for pollable in self._pollables:
            pollable.beat(now, self.timeout)
