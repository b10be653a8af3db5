"""The coordinator: connections to parties, the round loop, events and history."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fednb.federation.config import PartySpec, load_parties
from fednb.federation.connection import Connections
from fednb.federation.events import EventBus
from fednb.federation.federation import Federation, PartyInfo, PartyResults
from fednb.federation.rounds import Evaluation
from fednb.federation.history import History, PartyRound, RoundRecord
from fednb.transport import Keypair, load_keypair

__all__ = ["Evaluation", "Federation", "History", "PartyInfo", "PartyResults", "PartyRound", "PartySpec",
           "RoundRecord", "connect", "load_parties"]


def connect(
    parties: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    key: str | os.PathLike[str] | Keypair | None = None,
    *,
    timeout: float = 30.0,
    heartbeat: float = 1.0,
    heartbeat_timeout: float = 10.0,
    require_all: bool = True,
    name: str = "",
    on_close: Iterable[Callable[[], None]] = (),
) -> Federation:
    """Connect to parties and return a :class:`Federation` once every one has answered.

    ``parties`` is a TOML file of ``[[party]]`` tables or a list of ``{name, endpoint,
    public_key}``; ``key`` is the base path of our keypair (``fednb keys new PATH``). Each
    party's public key is pinned: a party that cannot prove it holds it is not talked to.
    ``heartbeat_timeout`` is how long a silent party stays online.
    """
    specs = load_parties(parties)
    keypair = key if isinstance(key, Keypair) else (load_keypair(key) if key is not None else None)
    if keypair is None and any(spec.public_key for spec in specs):
        raise ValueError("these parties use CURVE: pass key= (the base path of your keypair, see `fednb keys new`)")
    bus = EventBus()
    connections = Connections(specs, keypair, bus, heartbeat=heartbeat, timeout=heartbeat_timeout, coordinator=name)
    try:
        connections.start(timeout=timeout, require_all=require_all)
    except BaseException:
        for callback in on_close:
            callback()
        raise
    return Federation(connections, bus, on_close=on_close)
