"""A shared endpoint as the coordinator's socket thread sees it: one socket for many parties.

A population of virtual parties (:mod:`fednb.party.population_server`) answers on one
endpoint; every message there carries an address frame naming the party (``b""``: the
endpoint itself). The coordinator keeps one DEALER, one monitor, one ``hello`` and one
heartbeat per endpoint, and one :class:`~fednb.federation.link.Link` per party for its
status and pending requests, so that a round costs what its sampled parties cost and not
what the population holds. The endpoint's welcome lists its parties with their datasets;
a party the coordinator expects there but the endpoint does not serve is ``refused``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from fednb import __version__
from fednb.federation.link import HANDSHAKE, Link, monitor_change
from fednb.transport.channel import receive
from fednb.wire import Limits, Message, encode

log = logging.getLogger(__name__)


class SharedEndpoint:
    """The socket, monitor and liveness of one shared endpoint, and the links of its parties."""

    def __init__(self, endpoint: str, socket: zmq.Socket, monitor: zmq.Socket, links: list[Link],
                 limits: Limits) -> None:
        self.endpoint = endpoint
        self.socket = socket
        self.monitor = monitor
        self.links = {link.name: link for link in links}
        self.limits = limits
        self.status = "connecting"
        self.last_seen = 0.0
        self.next_hello = 0.0

    def receive(self) -> None:
        """Handle what the endpoint sent (at most 1024 messages a turn, so that nothing else starves)."""
        for _ in range(1024):
            try:
                received = receive(self.socket, router=False, limits=self.limits, addressed=True)
            except zmq.Again:
                return
            self.last_seen = time.monotonic()
            link = self.links.get(received.party) if received.party else None
            if link is not None:
                link.last_seen = self.last_seen
                if received.message is not None and received.message.type == "welcome":
                    log.warning("%s sent a welcome for %s: only the endpoint says who it serves", self.endpoint,
                                link.name)
                    continue
                link.deliver(received)
                continue
            message = received.message
            if received.party:
                log.warning("%s sent a message for %r, a party it does not serve here", self.endpoint, received.party)
            elif message is None:
                log.warning("%s sent a malformed message: %s", self.endpoint, received.error)
            elif message.type == "welcome":
                if self.status != "online":  # the answer to our hello; once online, a welcome changes nothing
                    self._welcomed(message)
                else:
                    log.debug("%s: ignored a welcome while online", self.endpoint)
            elif message.type == "heartbeat":
                if self.status == "offline":
                    self.next_hello = 0.0
            elif message.type == "error":
                log.warning("%s reported: %s: %s", self.endpoint, message.content["error_type"],
                            message.content["message"])

    def _welcomed(self, message: Message) -> None:
        content = message.content
        pool = content.get("pool")
        if pool is None:
            self._set_all("refused", f"{self.endpoint} is a party's own endpoint, not a shared one")
            return
        if content.get("version") != __version__:
            log.info("%s runs fednb %s (here: %s)", self.endpoint, content.get("version"), __version__)
        index = {name: i for i, name in enumerate(pool["parties"])}
        shared = {k: content[k] for k in ("version", "policy", "containment") if k in content}
        self.status = "online"
        for name, link in self.links.items():
            i = index.get(name)
            if i is None:
                link.set_status("refused", f"{self.endpoint} does not serve a party {name!r}")
                continue
            datasets = {split: {**shape, "examples": int(message.arrays[f"pool.{split}"][i])}
                        for split, shape in pool["datasets"].items()}
            link.set_status("online", "", {"party": name, **shared, "datasets": datasets,
                                           "endpoint": self.endpoint})

    def _set_all(self, status: str, detail: str) -> None:
        self.status = status
        for link in self.links.values():
            if link.status != "refused" or status == "refused":
                link.set_status(status, detail)

    def watch(self) -> None:
        """Read the socket monitor: handshakes, disconnects, refused keys, for every party here."""
        while self.monitor.poll(0):
            change = monitor_change(recv_monitor_message(self.monitor)["event"], self.status, "endpoint")
            if change == HANDSHAKE:
                self.next_hello = 0.0
            elif change is not None:
                self._set_all(*change)

    def hello(self, now: float, heartbeat: float, coordinator: str) -> None:
        if self.status != "online" and now >= self.next_hello:
            self.next_hello = now + min(heartbeat, 0.25)
            self._send(Message("hello", {"coordinator": coordinator, "version": __version__}))

    def beat(self, now: float, timeout: float) -> None:
        """One heartbeat for the endpoint; silent past ``timeout`` with nothing due, all its parties go offline."""
        if self.status != "online":
            return
        if now - self.last_seen > timeout and not any(link.pending for link in self.links.values()):
            self._set_all("offline", f"silent for {now - self.last_seen:.1f} s")
        else:
            self._send(Message("heartbeat"))

    def unreachable(self, why: str) -> None:
        if self.status == "connecting":
            self._set_all("unreachable", why)

    def _send(self, message: Message) -> None:
        try:
            self.socket.send_multipart([b"", *encode(message, self.limits)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.debug("%s: %s not sent (the endpoint is not reading)", self.endpoint, message.type)

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "status": self.status, "parties": len(self.links)}
