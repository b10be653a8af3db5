"""Socket factories with fednb's security rules and options applied.

A party binds a ROUTER (it is the server, like sshd); a coordinator connects one DEALER per
party. Every TCP endpoint uses CURVE; an ``ipc://`` endpoint may go without it only when its
socket file lives in a private directory (mode 0700, owned by this user), where the file
system already keeps other users out.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from fednb.transport.auth import ZAP_DOMAIN
from fednb.transport.keys import Keypair, require_curve
from fednb.wire.limits import DEFAULT_LIMITS, Limits

SCHEMES = ("tcp", "ipc")


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """Split ``scheme://address`` and check the scheme; ValueError otherwise."""
    scheme, sep, address = endpoint.partition("://")
    if not sep or scheme not in SCHEMES or not address:
        raise ValueError(f"endpoint {endpoint!r} must look like tcp://HOST:PORT or ipc:///PATH")
    return scheme, address


def ipc_is_private(address: str) -> bool:
    """True when the ipc socket's directory is owned by us and closed to group and others."""
    directory = Path(address).parent
    try:
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)


def check_security(endpoint: str, secure: bool) -> None:
    """Refuse an endpoint that would carry traffic without CURVE where that is not safe."""
    scheme, address = parse_endpoint(endpoint)
    if secure:
        require_curve()
        return
    if scheme == "tcp":
        raise ValueError(f"{endpoint}: TCP endpoints always use CURVE; give a keypair (fednb keys new PATH)")
    if not ipc_is_private(address):
        raise ValueError(
            f"{endpoint}: an ipc endpoint without CURVE must live in a private directory (mode 0700, owned by you)"
        )


def _common_options(sock: zmq.Socket, limits: Limits, heartbeat_ms: int, timeout_ms: int,
                    queue: int | None = None) -> None:
    sock.linger = 0
    if queue is not None:
        # messages queued to or from one peer before a send would block (0: no limit): a shared
        # endpoint carries the requests and replies of thousands of parties through one pipe
        sock.setsockopt(zmq.SNDHWM, queue)
        sock.setsockopt(zmq.RCVHWM, queue)
    # libzmq applies MAXMSGSIZE to each frame (and drops a peer that sends a larger one); a
    # frame is a header or one buffer, so neither limit is looser than the wire's own.
    sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_buffer_bytes, limits.max_header_bytes))
    # ZMTP pings find a dead link that the OS never reports (a cut cable, a frozen host).
    # Their deadline is the peer timeout, not a few intervals: one libzmq I/O thread that is
    # encrypting hundreds of MB for other parties may not get to a pong for seconds.
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(timeout_ms, heartbeat_ms * 3))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(timeout_ms, heartbeat_ms * 3))


def server_socket(
    context: zmq.Context,
    endpoint: str,
    keypair: Keypair | None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    heartbeat_ms: int = 1000,
    timeout_ms: int = 10_000,
    queue: int | None = None,
) -> zmq.Socket:
    """A bound ROUTER. With a keypair it is a CURVE server in fednb's ZAP domain: start the
    :class:`~fednb.transport.auth.Authenticator` first, or libzmq accepts any client. ``queue``:
    messages queued per peer (ZeroMQ's high-water marks; 0: no limit; None: ZeroMQ's 1000)."""
    check_security(endpoint, keypair is not None)
    sock = context.socket(zmq.ROUTER)
    try:
        _common_options(sock, limits, heartbeat_ms, timeout_ms, queue)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if keypair is not None:
            if keypair.secret is None:
                raise ValueError("a CURVE server needs its secret key")
            sock.curve_secretkey = keypair.secret
            sock.curve_publickey = keypair.public
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.bind(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def client_socket(
    context: zmq.Context,
    endpoint: str,
    keypair: Keypair | None,
    server_key: bytes | None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    heartbeat_ms: int = 1000,
    timeout_ms: int = 10_000,
    queue: int | None = None,
) -> zmq.Socket:
    """A DEALER connected to a party, pinning the party's public key when secure; ``queue`` as for
    :func:`server_socket`."""
    secure = keypair is not None or server_key is not None
    check_security(endpoint, secure)
    if secure and (keypair is None or keypair.secret is None or server_key is None):
        raise ValueError(f"{endpoint}: CURVE needs our keypair and the party's public key")
    sock = context.socket(zmq.DEALER)
    try:
        _common_options(sock, limits, heartbeat_ms, timeout_ms, queue)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if keypair is not None and server_key is not None and keypair.secret is not None:
            sock.curve_secretkey = keypair.secret
            sock.curve_publickey = keypair.public
            sock.curve_serverkey = server_key
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint a socket is bound to, with the port the OS chose for ``:0`` / ``:*``."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def send_frames(sock: zmq.Socket, frames: Sequence[Any], *, routing: bytes | None = None, flags: int = 0) -> int:
    """Send already encoded frames (through a ROUTER when ``routing`` is given); returns bytes sent.

    For a message encoded once and sent more than once, or measured before it is sent.
    """
    parts = [routing, *frames] if routing is not None else list(frames)
    sock.send_multipart(parts, flags=flags, copy=False)
    return sum(memoryview(frame).nbytes for frame in parts)
