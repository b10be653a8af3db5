"""Where the parties are: a TOML file or a list of ``{name, endpoint, public_key}``.

::

    [[party]]
    name = "clinic-a"
    endpoint = "tcp://10.0.0.5:7410"
    public_key = "keys/clinic-a.key"    # or the key's 40-character Z85 text
    # shared = true: one of the parties a shared endpoint serves (fednb.party.population_server)
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednb.transport import load_public_key, parse_endpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class PartySpec:
    """How to reach one party and which public key it must prove it holds."""

    name: str
    endpoint: str
    public_key: bytes | None = None
    #: Served at a shared endpoint with other parties (a simulation's population): messages there carry
    #: the party's name in an address frame (:mod:`fednb.federation.endpoint`).
    shared: bool = False


def load_parties(parties: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[PartySpec]:
    """Party specs from a TOML file (``[[party]]`` tables) or a list of mappings."""
    base = Path(".")
    if isinstance(parties, (str, os.PathLike)):
        path = Path(parties).expanduser()
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read the parties file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        entries = document.get("party", document.get("parties"))
        if not isinstance(entries, list):
            raise ValueError(f"{path} must list parties as [[party]] tables")
        base = path.parent
    else:
        entries = list(parties)
    specs: list[PartySpec] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"party #{index + 1} must be a table/dict with name, endpoint, public_key")
        unknown = set(entry) - {"name", "endpoint", "public_key", "shared"}
        if unknown:
            raise ValueError(f"party #{index + 1}: unknown field(s) {', '.join(sorted(unknown))}")
        name, endpoint = entry.get("name"), entry.get("endpoint")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ValueError(f"party #{index + 1} needs a name")
        if not isinstance(endpoint, str):
            raise ValueError(f"party {name!r} needs an endpoint")
        scheme, _ = parse_endpoint(endpoint)
        check_target(endpoint, f"party {name!r}")
        key_spec = entry.get("public_key")
        key = None
        if key_spec:
            candidate = Path(str(key_spec)).expanduser()
            if not candidate.is_absolute() and (base / candidate).exists():
                key_spec = str(base / candidate)
            key = load_public_key(key_spec)
        elif scheme == "tcp":
            raise ValueError(f"party {name!r}: a tcp endpoint needs the party's public_key (CURVE is always on)")
        shared = entry.get("shared", False)
        if not isinstance(shared, bool):
            raise ValueError(f"party {name!r}: shared must be true or false")
        specs.append(PartySpec(name, endpoint, key, shared))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("party names must be unique")
    if not specs:
        raise ValueError("no parties given")
    return specs


def check_target(endpoint: str, who: str) -> None:
    """ValueError at once for an endpoint that no connection could reach: a port out of
    range, a wildcard host, a host name that does not resolve."""
    scheme, address = parse_endpoint(endpoint)
    if scheme != "tcp":
        return
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{who}: endpoint {endpoint!r} needs a host and a port in 1..65535, like tcp://10.0.0.5:7410")
    if host == "*":
        raise ValueError(f"{who}: endpoint {endpoint!r} has the wildcard host *, which a party listens on but "
                         "nobody can connect to; give the party's address")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"{who}: the host {host!r} of {endpoint} cannot be resolved ({exc.strerror})") from None


def probe(endpoint: str, timeout: float = 0.5) -> str | None:
    """Why nothing answers at ``endpoint`` (refused, unreachable, no socket file), or None when
    something accepts a connection there or the probe cannot tell (a slow network)."""
    scheme, address = parse_endpoint(endpoint)
    target: Any
    if scheme == "ipc":
        if not os.path.exists(address):
            return f"nobody listens at {address} (no such socket file)"
        family, target = socket.AF_UNIX, address
    else:
        host, _, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            family, _, _, _, target = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        except (socket.gaierror, ValueError) as exc:
            return f"the host of {endpoint} cannot be resolved ({exc})"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except ConnectionRefusedError:
            return f"connection refused: nothing listens on {address}"
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return f"{address} is unreachable ({exc.strerror})"
            return None  # a timeout or something the probe cannot judge: let the handshake decide
    return None
