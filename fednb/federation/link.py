"""One party as the coordinator's socket thread sees it: its socket, status and pending requests.

A party is ``connecting`` until it answers ``hello``, then ``online``; it goes ``offline``
when its connection drops or it stays silent past the heartbeat timeout (its pending
requests fail at once), ``refused`` when its ZAP handler rejects our key, and
``unreachable`` when nothing listens at its endpoint. A party whose owner must approve a
request's code first answers it with a ``status`` message; that is published as
``PartyStatus(party, "awaiting approval", detail)``, and ``online`` follows once nothing
waits any more. Only the socket thread calls a link's methods; ``changed`` (the
connections' condition) guards what other threads read.
"""

from __future__ import annotations

import logging
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
from fednb.transport.channel import Received, receive
from fednb.wire import Limits, Message, encode

log = logging.getLogger(__name__)

MONITORED = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
             | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


#: What :func:`monitor_change` says of a completed handshake: say hello now.
HANDSHAKE = ("", "")


def monitor_change(kind: int, status: str, what: str) -> tuple[str, str] | None:
    """The (status, detail) a socket monitor event moves a party in ``status`` to (:data:`HANDSHAKE`: say
    hello; None: no change); ``what`` names the peer in the detail ("party", "endpoint")."""
    if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return HANDSHAKE
    if kind == zmq.EVENT_DISCONNECTED and status in ("online", "connecting"):
        return ("offline" if status == "online" else "connecting"), "connection lost"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "refused", f"the {what} refused our key (is it in the {what}'s authorized keys?)"
    if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return ("refused" if status != "online" else "offline",
                f"the secure handshake failed (is the {what}'s public key right?)")
    return None


def resolve(future: Future[Message], result: Message | None = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:  # the waiter cancelled it first: nothing to deliver
        log.debug("dropped an answer to a request that was cancelled")


@dataclass
class Link:
    """Everything the socket thread knows about one party."""

    spec: PartySpec
    socket: zmq.Socket
    monitor: zmq.Socket
    bus: EventBus
    changed: threading.Condition
    limits: Limits
    status: str = "connecting"
    detail: str = ""
    last_seen: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, Future[Message]] = field(default_factory=dict)
    #: Requests the party holds for its owner's approval: message id -> the party's words.
    awaiting: dict[str, str] = field(default_factory=dict)
    next_hello: float = 0.0
    #: Replies that came after their request was settled (a party late past its round's deadline, or
    #: answering a cancelled request): counted and discarded, never taken into a round.
    late: int = 0
    #: A party of a shared endpoint (:mod:`fednb.federation.endpoint`): the address frame that names it
    #: there, before every message; its socket, monitor, hello and heartbeat are the endpoint's.
    address: bytes | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: Message) -> bool:
        return self.send_frames(encode(message, self.limits))

    def send_frames(self, frames: list[Any]) -> bool:
        if self.address is not None:
            frames = [self.address, *frames]
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def request(self, message_id: str, frames: list[Any], future: Future[Message]) -> None:
        """Send an encoded request; ``future`` gets its reply, or the error that it cannot be sent."""
        if self.status != "online":
            resolve(future, error=FederationError(f"{self.name} is {self.status}" + (f": {self.detail}" if self.detail else ""),
                                                  party=self.name))
            return
        self.pending[message_id] = future
        try:
            sent = self.send_frames(frames)
        except (zmq.ZMQError, ValueError) as exc:
            self.pending.pop(message_id, None)
            resolve(future, error=FederationError(f"could not send to {self.name}: {exc}", party=self.name))
            return
        if not sent:
            self.pending.pop(message_id, None)
            resolve(future, error=FederationError(f"{self.name} is not reachable (send would block)", party=self.name))

    def cancel(self, message_id: str, finish: bool = False) -> None:
        future = self.pending.pop(message_id, None)
        self.settled(message_id)
        if future is not None:
            future.cancel()
            self.send(Message("cancel", {"target": message_id, **({"finish": True} if finish else {})}))

    # -- receiving ----------------------------------------------------------------------------

    def receive(self) -> None:
        """Handle what the party sent (at most 256 messages, so that no party starves the others)."""
        for _ in range(256):
            try:
                received = receive(self.socket, router=False, limits=self.limits)
            except zmq.Again:
                return
            self.last_seen = time.monotonic()
            self.deliver(received)

    def deliver(self, received: Received) -> None:
        """Handle one message the party sent."""
        message = received.message
        if message is None:
            # Nothing in a malformed message can be trusted, not even whom it answers: what
            # this party owes us fails now (named), instead of waiting out the timeout.
            log.warning("%s sent a malformed message: %s", self.name, received.error)
            self.fail_pending(FederationError(f"{self.name} sent a malformed reply ({received.error})",
                                              party=self.name))
            return
        if message.type == "welcome":
            self._welcomed(message)
        elif message.type == "heartbeat":
            if self.status == "offline":
                self.next_hello = 0.0
        elif message.reply_to is not None and message.reply_to in self.pending:
            if message.type == "status":
                self._request_status(message)
                return
            self.settled(message.reply_to)
            resolve(self.pending.pop(message.reply_to), message)
        elif message.type == "error":
            self.late += message.reply_to is not None
            log.warning("%s reported: %s: %s", self.name, message.content["error_type"], message.content["message"])
        else:
            if message.reply_to is not None:
                self.late += 1
            log.debug("%s: ignored a late or unsolicited %s", self.name, message.type)

    def fail_pending(self, error: FederationError) -> None:
        for message_id in list(self.pending):
            self.settled(message_id)
            resolve(self.pending.pop(message_id), error=error)

    def _request_status(self, message: Message) -> None:
        """A party's word on a request it holds: it awaits its owner's approval, or now runs."""
        state = message.content["state"]
        detail = message.content.get("detail") or state
        if state == "awaiting approval":
            with self.changed:
                self.awaiting[message.reply_to or ""] = detail
            log.warning("%s: %s", self.name, detail)
            self.bus.publish(PartyStatus(self.name, "awaiting approval", detail))
        else:
            log.info("%s: %s", self.name, detail)
            self.settled(message.reply_to or "")

    def settled(self, message_id: str) -> None:
        """A request no longer waits for the party's owner; when none does, the party is plain online again."""
        with self.changed:
            was = self.awaiting.pop(message_id, None)
            idle = not self.awaiting
        if was is not None and idle and self.status == "online":
            self.bus.publish(PartyStatus(self.name, "online", ""))

    def _welcomed(self, message: Message) -> None:
        info = dict(message.content)
        if info.get("version") != __version__:
            log.info("%s runs fednb %s (here: %s)", self.name, info.get("version"), __version__)
        self.set_status("online", "", info)

    # -- status -------------------------------------------------------------------------------

    def set_status(self, status: str, detail: str, info: dict[str, Any] | None = None) -> None:
        with self.changed:
            changed = (self.status, self.detail) != (status, detail)
            self.status, self.detail = status, detail
            if info is not None:
                self.info = info
            self.changed.notify_all()
        if status != "online":
            for future in self.pending.values():
                resolve(future, error=FederationError(f"{self.name} went {status}: {detail}", party=self.name))
            self.pending.clear()
            with self.changed:
                self.awaiting.clear()
        if changed:
            log.info("%s is %s%s", self.name, status, f" ({detail})" if detail else "")
            self.bus.publish(PartyStatus(self.name, status, detail))

    def watch(self) -> None:
        """Read the socket monitor: handshakes, disconnects, refused keys."""
        while self.monitor.poll(0):
            change = monitor_change(recv_monitor_message(self.monitor)["event"], self.status, "party")
            if change == HANDSHAKE:
                self.next_hello = 0.0
            elif change is not None:
                self.set_status(*change)

    def hello(self, now: float, heartbeat: float, coordinator: str) -> None:
        if self.status != "online" and now >= self.next_hello:
            self.next_hello = now + min(heartbeat, 0.25)
            self.send(Message("hello", {"coordinator": coordinator, "version": __version__}))

    def beat(self, now: float, timeout: float) -> None:
        if self.status != "online":
            return
        # While a reply is due, a party may be silent for longer: its heartbeats queue
        # behind its update, and libzmq's one I/O thread may spend seconds decrypting the
        # updates of every party. Then the ZMTP pings (any traffic counts) and the
        # request's own deadline decide, not the application heartbeat.
        if now - self.last_seen > timeout and not self.pending:
            self.set_status("offline", f"silent for {now - self.last_seen:.1f} s")
        else:
            self.send(Message("heartbeat"))
