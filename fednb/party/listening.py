"""A party's listening sockets: the ROUTER coordinators connect to, and the wake pair of its job thread.

Both a party (:mod:`fednb.party.server`) and a shared endpoint of virtual parties
(:mod:`fednb.party.population_server`) serve one ROUTER, under CURVE with a ZAP handler admitting
only the authorized keys when they have a keypair, and an inproc PAIR through which the job
thread wakes the socket thread when a reply is ready. :class:`Listening` opens them in that
order and closes them in reverse; when a request still runs on the job thread, the context is
destroyed rather than waited for.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import zmq

from fednb.transport import AllowList, Authenticator, Keypair, bound_endpoint, server_socket
from fednb.wire import Limits


class Listening:
    """A bound ROUTER (``router``, at ``endpoint``), its ZAP handler, and the job thread's wake pair."""

    def __init__(self, endpoint: str, keypair: Keypair | None, allow: AllowList | None, *, limits: Limits,
                 heartbeat: float, timeout: float, queue: int | None = None) -> None:
        self.context = zmq.Context()
        self.authenticator: Authenticator | None = None
        self._sockets: list[zmq.Socket] = []
        self.wake_address = f"inproc://fednb-party-{uuid.uuid4().hex}"
        try:
            if keypair is not None and allow is not None:
                self.authenticator = Authenticator(self.context, allow)
                self.authenticator.start()
            self.router = server_socket(self.context, endpoint, keypair, limits=limits, queue=queue,
                                        heartbeat_ms=int(heartbeat * 1000), timeout_ms=int(timeout * 1000))
            self._sockets.append(self.router)
            self.wake = self.context.socket(zmq.PAIR)
            self._sockets.append(self.wake)
            self.wake.bind(self.wake_address)
        except BaseException:
            self.close(lambda _: True)
            raise
        self.endpoint = bound_endpoint(self.router)

    def close(self, jobs_ended: Callable[[float], bool]) -> None:
        """Close the sockets and the ZAP handler; ``jobs_ended(timeout)`` says whether the job thread has ended."""
        for sock in self._sockets:
            sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        if jobs_ended(0.5):
            self.context.term()
        else:  # a cell still running: its wake socket stays open
            self.context.destroy(linger=0)
