"""Messages over sockets: encode and send without copying tensors, receive and validate.

A received message keeps its frames alive through the read-only arrays that view them; the
one copy of received tensor data happens where it is consumed (loaded into a model at the
party, accumulated into the aggregate at the coordinator).
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from fednb.errors import WireError
from fednb.wire import DEFAULT_LIMITS, Limits, Message, check_content, decode, encode
from fednb.wire.messages import PARTY_NAME


@dataclass(frozen=True)
class Received:
    """One received message with who sent it (ROUTER routing id, ZAP User-Id).

    Exactly one of ``message`` (validated) and ``error`` (why it was refused) is set.
    """

    message: Message | None
    error: WireError | None
    routing: bytes | None
    user: str
    nbytes: int
    #: On a shared endpoint (one that serves many virtual parties, see :mod:`fednb.party.population`),
    #: the party the message is for or from; ``""`` for the endpoint itself, ``None`` elsewhere.
    party: str | None = None


def is_address(raw: bytes) -> bool:
    """Whether ``raw`` is an address frame: a party's name (:data:`~fednb.wire.messages.PARTY_NAME`), or
    empty for the endpoint itself."""
    return not raw or (raw.isascii() and PARTY_NAME.fullmatch(raw.decode("ascii")) is not None)


def address_frame(party: str) -> bytes:
    """The frame that names ``party`` on a shared endpoint (ValueError for a name no address can carry)."""
    raw = party.encode("ascii", "replace")
    if not is_address(raw):
        raise ValueError(f"{party!r} cannot be a party's address: 1 to 64 letters, digits, '.', '_' or '-'")
    return raw


def send(sock: zmq.Socket, message: Message, *, routing: bytes | None = None, limits: Limits = DEFAULT_LIMITS,
         flags: int = 0) -> int:
    """Send ``message`` (through a ROUTER when ``routing`` is given); returns bytes sent."""
    frames = encode(message, limits)
    if routing is not None:
        frames.insert(0, routing)
    sock.send_multipart(frames, flags=flags, copy=False)
    return sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)


def receive(sock: zmq.Socket, *, router: bool, limits: Limits = DEFAULT_LIMITS, addressed: bool = False) -> Received:
    """Receive one message without blocking and validate it.

    A malformed message comes back with ``error`` set, so that the caller can answer or
    drop it and go on serving; only socket errors raise. ``addressed``: the socket is a shared
    endpoint's, and the frame after the routing id names the party (``Received.party``).
    """
    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    routing = frames.pop(0).bytes if router and frames else None
    party = None
    if addressed:
        raw = frames.pop(0).bytes if frames else b"\xff"
        if not is_address(raw):
            return Received(message=None, error=WireError(f"a message on a shared endpoint must start with a party's "
                                                          f"address frame, got {raw[:80]!r}"),
                            routing=routing, user="", nbytes=sum(len(frame) for frame in frames))
        party = raw.decode("ascii")
    user = ""
    if frames:
        try:
            user = str(frames[0].get("User-Id") or "")
        except zmq.ZMQError:
            user = ""
    nbytes = sum(len(frame) for frame in frames)
    try:
        message = check_content(decode(frames, limits))
    except WireError as exc:
        return Received(message=None, error=exc, routing=routing, user=user, nbytes=nbytes, party=party)
    except Exception as exc:  # noqa: BLE001 - a decoder bug must cost this message, never the socket's thread
        error = WireError(f"the message could not be decoded ({type(exc).__name__}: {exc})")
        return Received(message=None, error=error, routing=routing, user=user, nbytes=nbytes, party=party)
    return Received(message=message, error=None, routing=routing, user=user, nbytes=nbytes, party=party)
