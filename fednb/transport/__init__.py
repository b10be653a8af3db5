"""Transport: ZeroMQ sockets, CURVE keys, the ZAP allow-list. Knows frames, not messages."""

from __future__ import annotations

from fednb.transport.auth import AllowList, Authenticator, read_authorized_keys
from fednb.transport.keys import Keypair, generate, key_paths, load_keypair, load_public_key, write_keypair
from fednb.transport.sockets import bound_endpoint, check_security, client_socket, parse_endpoint, server_socket

__all__ = [
    "AllowList",
    "Authenticator",
    "Keypair",
    "bound_endpoint",
    "check_security",
    "client_socket",
    "generate",
    "key_paths",
    "load_keypair",
    "load_public_key",
    "parse_endpoint",
    "read_authorized_keys",
    "server_socket",
    "write_keypair",
]
