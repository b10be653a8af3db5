"""One federated round: send the global model, gather updates as they come, aggregate.

::

    configure_train ──train×N──> parties ──updates (as they arrive)──> Aggregation.add
         │                          (late / failed / misfit → dropped)        │
         └──────────── ≥ min_parties? ── result() ──> new global weights <────┘
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fednb.errors import FederationError, PartyError, RoundError
from fednb.federation.connection import Connections
from fednb.federation.events import EventBus, PartyDone, PartyDropped
from fednb.federation.history import PartyRound
from fednb.strategies import Strategy
from fednb.tensors import Template, mismatch
from fednb.wire import Message

log = logging.getLogger(__name__)


@dataclass
class Gathered:
    """What came back from one broadcast: replies by party, and why the others dropped.

    ``errors`` holds the error a party itself reported (its type and message), for the
    parties among ``dropped`` that answered with one.
    """

    replies: dict[str, Message | None] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, PartyError] = field(default_factory=dict)
    late: set[str] = field(default_factory=set)


def party_error(party: str, reply: Message) -> PartyError:
    content = reply.content
    return PartyError(content["message"], party=party, round=reply.round, error_type=content["error_type"],
                      traceback=content.get("traceback"))


def broadcast(connections: Connections, parties: list[str], make: Callable[[str], Message], *, timeout: float | None,
              on_reply: Callable[[str, Message], str | None] | None = None, keep: bool = True) -> Gathered:
    """Send ``make(party)`` to each party and wait for replies until all answered or ``timeout``.

    ``on_reply`` runs as each reply arrives and may return a reason to drop it. Error replies
    and lost parties are dropped with their reason; a party still silent at the deadline is
    dropped as late and its request is cancelled. Ctrl-C cancels everything and re-raises.
    With ``keep=False`` a reply is let go once ``on_reply`` has consumed it (``replies`` maps
    the party to None), so a round holds one update's frames at a time, not every party's.
    """
    gathered = Gathered()
    outstanding: dict[Future[Message], tuple[str, str]] = {}
    arrived: queue.SimpleQueue[Future[Message]] = queue.SimpleQueue()
    try:
        for party in parties:
            message = make(party)
            future = connections.request(party, message)
            outstanding[future] = (party, message.id)
            future.add_done_callback(arrived.put)
        deadline = None if timeout is None else time.monotonic() + timeout
        while outstanding:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future = arrived.get(timeout=remaining)
            except queue.Empty:
                break
            # once consumed, nothing here holds the future (and so the reply's frames)
            party, _ = outstanding.pop(future)
            _gather(gathered, party, future, on_reply, keep)
    except BaseException:
        for future, (party, message_id) in outstanding.items():
            connections.cancel(party, message_id)
        raise
    for future, (party, message_id) in outstanding.items():
        # A party that holds the request for its owner stays dropped (the round cannot wait for a
        # person), but says so; its owner's approval, when it comes, covers the next round's request.
        awaiting = connections.awaiting(party, message_id)
        connections.cancel(party, message_id)
        gathered.dropped[party] = (f"{awaiting}: not approved within {timeout:g} s" if awaiting
                                   else f"no reply within {timeout:g} s")
        gathered.late.add(party)
    return gathered


def _gather(gathered: Gathered, party: str, future: Future[Message],
            on_reply: Callable[[str, Message], str | None] | None, keep: bool) -> None:
    """File one party's answer under replies, errors or dropped."""
    try:
        reply = future.result()
    except CancelledError:
        gathered.dropped[party] = "cancelled"
        return
    except FederationError as exc:
        gathered.dropped[party] = str(exc)
        return
    if reply.type == "error":
        error = gathered.errors[party] = party_error(party, reply)
        gathered.dropped[party] = str(error)
        return
    reason = on_reply(party, reply) if on_reply is not None else None
    if reason is not None:
        gathered.dropped[party] = reason
    else:
        gathered.replies[party] = reply if keep else None


def check_update(template: Template, reply: Message) -> str | None:
    """Why a train reply cannot join the aggregate (misfit, non-finite, no examples), or None."""
    problem = mismatch(template, reply.arrays)
    if problem:
        return f"sent weights that do not fit the model ({problem})"
    examples = reply.content.get("examples")
    if not isinstance(examples, int) or examples <= 0:
        return "reported no training examples"
    for name, array in reply.arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"sent non-finite values in {name}"
    return None


def train_round(
    connections: Connections,
    bus: EventBus,
    strategy: Strategy,
    *,
    round: int,
    parties: list[str],
    weights: Mapping[str, np.ndarray],
    template: Template,
    content: Mapping[str, Any],
    min_parties: int,
    timeout: float | None,
    unavailable: Mapping[str, str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, PartyRound], dict[str, str], dict[str, float]]:
    """Run one round; return new weights, contributions, drops and aggregated train metrics.

    ``unavailable`` names chosen parties that were not asked (offline), with the reason;
    they count as dropped.
    """
    aggregation = strategy.start_round(round, weights)
    contributions: dict[str, PartyRound] = {}

    def on_reply(party: str, reply: Message) -> str | None:
        reason = check_update(template, reply)
        if reason is not None:
            return reason
        aggregation.add(reply.arrays, reply.content["examples"])
        metrics = dict(reply.content.get("metrics") or {})
        seconds = float(reply.content.get("seconds") or 0.0)
        contributions[party] = PartyRound(reply.content["examples"], metrics, seconds)
        bus.publish(PartyDone(round, party, reply.content["examples"], metrics, seconds))
        return None

    started = time.monotonic()
    gathered = broadcast(
        connections, parties,
        lambda party: Message("train", dict(content), round=round, arrays=weights),
        timeout=timeout, on_reply=on_reply, keep=False,
    )
    dropped = {**dict(unavailable or {}), **gathered.dropped}
    for party, reason in dropped.items():
        log.warning("round %d: %s dropped: %s", round, party, reason)
        bus.publish(PartyDropped(round, party, reason, late=party in gathered.late))
    if len(contributions) < min_parties:
        raise RoundError(
            f"round {round}: only {len(contributions)} of {len(parties) + len(unavailable or {})} parties replied "
            f"(min_parties={min_parties}); dropped: " + "; ".join(f"{p}: {r}" for p, r in dropped.items()),
            round=round, dropped=dropped,
        )
    metrics = strategy.aggregate_metrics(round, [(c.examples, c.metrics) for c in contributions.values()])
    log.debug("round %d gathered in %.3f s", round, time.monotonic() - started)
    return aggregation.result(), contributions, dropped, metrics

