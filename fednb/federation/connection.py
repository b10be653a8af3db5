"""The coordinator's socket thread: one DEALER per party, heartbeats, replies matched to requests.

All socket I/O of a federation happens here. Callers on any thread (a notebook cell inside a
running asyncio loop, a background training thread) hand in requests and get
:class:`concurrent.futures.Future` objects back; no event loop is nested or shared.

A party is ``connecting`` until it answers ``hello``, then ``online``; it goes ``offline``
when its connection drops or it stays silent past the heartbeat timeout (its pending
requests fail at once), and ``refused`` when its ZAP handler rejects our key. A party whose
owner must approve a request's code first answers it with a ``status`` message; that is
published as ``PartyStatus(party, "awaiting approval", detail)``, and ``online`` follows once
nothing waits any more.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from fednb import __version__
from fednb.errors import FederationError
from fednb.federation.config import PartySpec
from fednb.federation.events import EventBus, PartyStatus
from fednb.transport import Keypair, client_socket
from fednb.transport.channel import receive, send
from fednb.wire import DEFAULT_LIMITS, Limits, Message

log = logging.getLogger(__name__)

_MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass
class Link:
    """Everything the socket thread knows about one party."""

    spec: PartySpec
    socket: zmq.Socket
    monitor: zmq.Socket
    status: str = "connecting"
    detail: str = ""
    last_seen: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Future[Message]] = field(default_factory=dict)
    #: Requests the party holds for its owner's approval: message id -> the party's words.
    awaiting: dict[str, str] = field(default_factory=dict)
    next_hello: float = 0.0


def _resolve(future: Future[Message], result: Message | None = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:  # the waiter cancelled it first: nothing to deliver
        log.debug("dropped an answer to a request that was cancelled")


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
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fednb-federation-io", daemon=True)
        self._closed = False
        self._sockets_closed = False
        try:
            for spec in specs:
                sock = client_socket(self._context, spec.endpoint, keypair if spec.public_key else None,
                                     spec.public_key, limits=limits, heartbeat_ms=int(heartbeat * 1000),
                                     timeout_ms=int(timeout * 1000))
                monitor = sock.get_monitor_socket(_MONITORED)
                self._links[spec.name] = Link(spec, sock, monitor)
        except BaseException:
            self._close_sockets()
            raise

    # -- called from any thread -------------------------------------------------------------------

    def start(self, timeout: float = 30.0, require_all: bool = True) -> None:
        """Start the socket thread and wait until every party answered (or failed)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                waiting = [link for link in self._links.values() if link.status == "connecting"]
                if not waiting or time.monotonic() >= deadline:
                    break
                self._changed.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            failed = {name: link for name, link in self._links.items() if link.status != "online"}
        if failed and require_all:
            reasons = "; ".join(f"{name}: {link.detail or 'no answer within %.0f s' % timeout}" for name, link in failed.items())
            self.close()
            raise FederationError(f"could not connect to {len(failed)} of {len(self._links)} parties ({reasons})")

    def request(self, party: str, message: Message) -> Future[Message]:
        """Send ``message`` to ``party``; the future holds its reply (result or error message)."""
        if self._closed:
            raise FederationError("the federation is closed")
        if party not in self._links:
            raise FederationError(f"unknown party {party!r}", party=party)
        future: Future[Message] = Future()
        self._command("send", (party, message, future))
        return future

    def cancel(self, party: str, message_id: str) -> None:
        """Ask ``party`` to drop a queued request; its reply, if any, will be ignored."""
        if not self._closed:
            self._command("cancel", (party, message_id))

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

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each party's status, detail, seconds since last heard, what it said in welcome, and what
        it holds for its owner's approval (``awaiting``: the party's words, or None)."""
        now = time.monotonic()
        with self._lock:
            return {
                name: {"endpoint": link.spec.endpoint, "status": link.status, "detail": link.detail,
                       "awaiting": next(iter(link.awaiting.values()), None),
                       "silent_for": (now - link.last_seen) if link.last_seen else None, "info": dict(link.info)}
                for name, link in self._links.items()
            }

    def online(self) -> list[str]:
        with self._lock:
            return [name for name, link in self._links.items() if link.status == "online"]

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
                _resolve(payload[2], error=FederationError("the federation was closed", party=payload[0]))
        for link in self._links.values():
            for future in link.pending.values():
                _resolve(future, error=FederationError("the federation was closed", party=link.spec.name))
            link.pending.clear()
            link.monitor.close(linger=0)
            link.socket.close(linger=0)
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
        by_socket: dict[zmq.Socket, Link] = {}
        by_monitor: dict[zmq.Socket, Link] = {}
        for link in self._links.values():
            poller.register(link.socket, zmq.POLLIN)
            poller.register(link.monitor, zmq.POLLIN)
            by_socket[link.socket], by_monitor[link.monitor] = link, link
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=50))
                if self._wake_r in events:
                    self._drain_wake()
                self._run_commands()
                for sock in events:
                    if sock in by_socket:
                        self._receive(by_socket[sock])
                    elif sock in by_monitor:
                        self._monitor(by_monitor[sock])
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
                party, message, future = payload
                self._send_request(self._links[party], message, future)
            elif kind == "cancel":
                party, message_id = payload
                link = self._links[party]
                future = link.pending.pop(message_id, None)
                self._settled(link, message_id)
                if future is not None:
                    future.cancel()
                    self._send(link, Message("cancel", {"target": message_id}))

    def _send(self, link: Link, message: Message) -> bool:
        try:
            send(link.socket, message, limits=self.limits, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _send_request(self, link: Link, message: Message, future: Future[Message]) -> None:
        if link.status != "online":
            _resolve(future, error=FederationError(f"{link.spec.name} is {link.status}" + (f": {link.detail}" if link.detail else ""),
                                                   party=link.spec.name))
            return
        link.pending[message.id] = future
        try:
            sent = self._send(link, message)
        except (zmq.ZMQError, ValueError) as exc:
            link.pending.pop(message.id, None)
            _resolve(future, error=FederationError(f"could not send to {link.spec.name}: {exc}", party=link.spec.name))
            return
        if not sent:
            link.pending.pop(message.id, None)
            _resolve(future, error=FederationError(f"{link.spec.name} is not reachable (send would block)", party=link.spec.name))

    def _receive(self, link: Link) -> None:
        for _ in range(256):
            try:
                received = receive(link.socket, router=False, limits=self.limits)
            except zmq.Again:
                return
            link.last_seen = time.monotonic()
            message = received.message
            if message is None:
                log.warning("%s sent a malformed message: %s", link.spec.name, received.error)
                continue
            if message.type == "welcome":
                self._welcomed(link, message)
            elif message.type == "heartbeat":
                if link.status == "offline":
                    link.next_hello = 0.0
            elif message.reply_to is not None and message.reply_to in link.pending:
                if message.type == "status":
                    self._request_status(link, message)
                    continue
                self._settled(link, message.reply_to)
                _resolve(link.pending.pop(message.reply_to), message)
            elif message.type == "error":
                log.warning("%s reported: %s: %s", link.spec.name, message.content["error_type"], message.content["message"])
            else:
                log.debug("%s: ignored a late or unsolicited %s", link.spec.name, message.type)

    def _request_status(self, link: Link, message: Message) -> None:
        """A party's word on a request it holds: it awaits its owner's approval, or now runs."""
        state = message.content["state"]
        detail = message.content.get("detail") or state
        if state == "awaiting approval":
            with self._lock:
                link.awaiting[message.reply_to or ""] = detail
            log.warning("%s: %s", link.spec.name, detail)
            self.bus.publish(PartyStatus(link.spec.name, "awaiting approval", detail))
        else:
            log.info("%s: %s", link.spec.name, detail)
            self._settled(link, message.reply_to or "")

    def _settled(self, link: Link, message_id: str) -> None:
        """A request no longer waits for the party's owner; when none does, the party is plain online again."""
        with self._lock:
            was = link.awaiting.pop(message_id, None)
            idle = not link.awaiting
        if was is not None and idle and link.status == "online":
            self.bus.publish(PartyStatus(link.spec.name, "online", ""))

    def _welcomed(self, link: Link, message: Message) -> None:
        info = dict(message.content)
        if info.get("version") != __version__:
            log.info("%s runs fednb %s (here: %s)", link.spec.name, info.get("version"), __version__)
        self._set_status(link, "online", "", info)

    def _set_status(self, link: Link, status: str, detail: str, info: dict[str, Any] | None = None) -> None:
        with self._changed:
            changed = (link.status, link.detail) != (status, detail)
            link.status, link.detail = status, detail
            if info is not None:
                link.info = info
            self._changed.notify_all()
        if status != "online":
            for future in link.pending.values():
                _resolve(future, error=FederationError(f"{link.spec.name} went {status}: {detail}", party=link.spec.name))
            link.pending.clear()
            with self._lock:
                link.awaiting.clear()
        if changed:
            log.info("%s is %s%s", link.spec.name, status, f" ({detail})" if detail else "")
            self.bus.publish(PartyStatus(link.spec.name, status, detail))

    def _monitor(self, link: Link) -> None:
        while link.monitor.poll(0):
            event = recv_monitor_message(link.monitor)
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.next_hello = 0.0
            elif kind == zmq.EVENT_DISCONNECTED and link.status in ("online", "connecting"):
                self._set_status(link, "offline" if link.status == "online" else "connecting", "connection lost")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._set_status(link, "refused", "the party refused our key (is it in the party's authorized keys?)")
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._set_status(link, "refused" if link.status != "online" else "offline",
                                 "the secure handshake failed (is the party's public key right?)")

    def _say_hello(self, now: float) -> None:
        for link in self._links.values():
            if link.status != "online" and now >= link.next_hello:
                link.next_hello = now + min(self.heartbeat, 0.25)
                self._send(link, Message("hello", {"coordinator": self.coordinator, "version": __version__}))

    def _beat(self, now: float) -> None:
        for link in self._links.values():
            if link.status != "online":
                continue
            # While a reply is due, a party may be silent for longer: its heartbeats queue
            # behind its update, and libzmq's one I/O thread may spend seconds decrypting the
            # updates of every party. Then the ZMTP pings (any traffic counts) and the
            # request's own deadline decide, not the application heartbeat.
            if now - link.last_seen > self.timeout and not link.pending:
                self._set_status(link, "offline", f"silent for {now - link.last_seen:.1f} s")
            else:
                self._send(link, Message("heartbeat"))
