"""Rounds as protocols of stages: one loop drives plain FedAvg, secure aggregation and vertical steps.

A *stage* is one broadcast of requests and the gathering of their replies through the
coordinator. A *protocol* is a generator that yields stages and receives what each one
gathered, and returns the round's outcome::

    def fedavg(...) -> Steps[Outcome]:
        gathered = yield Stage("train", parties, request=Message("train", ...), on_reply=fold)
        return Outcome(...)

    outcome = drive(connections, bus, round, fedavg(...))

so a protocol reads like its paper (Bonawitz et al.'s AdvertiseKeys, ShareKeys,
MaskedInputCollection, Unmasking are four yields) while the transport only carries each
stage's messages. A request broadcast to every party of a stage is encoded once; messages
relayed from party to party go as one message per party (``requests``).
"""

from __future__ import annotations

import logging
import queue
import re
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fednb.errors import FederationError, PartyError
from fednb.federation.connection import Connections
from fednb.federation.events import EventBus, StageStarted
from fednb.wire import Message

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Called as each reply arrives; returns a reason to drop that party's reply, or None to keep it.
OnReply = Callable[[str, Message], "str | None"]


@dataclass(frozen=True)
class Stage:
    """One exchange of a round: what to send to which parties, and what to do with each reply.

    Exactly one of ``request`` (the same message for every party, encoded once) and
    ``requests`` (one message per party, e.g. payloads relayed from other parties) is given.
    With ``keep=False`` each reply is let go once ``on_reply`` consumed it, so that a stage
    holds one update's frames at a time, not every party's.
    """

    name: str
    parties: tuple[str, ...]
    request: Message | None = None
    requests: Mapping[str, Message] | None = None
    on_reply: OnReply | None = None
    keep: bool = True
    timeout: float | None = 300.0
    #: At the deadline, let a request already running at a late party run to its end (its reply is
    #: discarded as late) instead of stopping it: a round's training, whose session, once warm,
    #: makes that party's next round fast. A request still queued there is dropped either way.
    finish_late: bool = False

    def __post_init__(self) -> None:
        if (self.request is None) == (self.requests is None):
            raise ValueError("a stage sends either one request to all parties or one per party")
        if self.requests is not None and set(self.requests) != set(self.parties):
            raise ValueError("a stage needs one request for each of its parties")


@dataclass
class Gathered:
    """What came back from one stage: replies by party, and why the others dropped.

    ``errors`` holds the error a party itself reported (its type and message), for the
    parties among ``dropped`` that answered with one; ``late`` those that did not answer in time.
    """

    replies: dict[str, Message | None] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, PartyError] = field(default_factory=dict)
    late: set[str] = field(default_factory=set)
    seconds: float = 0.0


#: A protocol: yields stages, receives what each gathered, returns the round's outcome.
Steps = Generator[Stage, Gathered, T]


def drive(connections: Connections, bus: EventBus, round: int | None, steps: Steps[T]) -> T:
    """Run a protocol's stages one after the other and return its outcome."""
    try:
        stage = next(steps)
        while True:
            if round is not None:
                bus.publish(StageStarted(round, stage.name, stage.parties))
            gathered = gather(connections, stage)
            stage = steps.send(gathered)
    except StopIteration as end:
        return end.value  # type: ignore[no-any-return]
    finally:
        steps.close()


def party_error(party: str, reply: Message) -> PartyError:
    content = reply.content
    return PartyError(content["message"], party=party, round=reply.round, error_type=content["error_type"],
                      traceback=content.get("traceback"))


def gather(connections: Connections, stage: Stage) -> Gathered:
    """Send the stage's requests and wait for replies until all answered or the stage's timeout.

    Error replies and lost parties are dropped with their reason; a party still silent at
    the deadline is dropped as late and its request is cancelled. Ctrl-C cancels everything
    and re-raises.
    """
    started = time.monotonic()
    gathered = Gathered()
    outstanding: dict[Future[Message], tuple[str, str]] = {}
    arrived: queue.SimpleQueue[Future[Message]] = queue.SimpleQueue()
    try:
        if stage.request is not None:
            futures = connections.broadcast(list(stage.parties), stage.request)
            ids = dict.fromkeys(stage.parties, stage.request.id)
        else:
            assert stage.requests is not None
            futures = {party: connections.request(party, stage.requests[party]) for party in stage.parties}
            ids = {party: stage.requests[party].id for party in stage.parties}
        for party, future in futures.items():
            outstanding[future] = (party, ids[party])
            future.add_done_callback(arrived.put)
        deadline = None if stage.timeout is None else time.monotonic() + stage.timeout
        while outstanding:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future = arrived.get(timeout=remaining)
            except queue.Empty:
                break
            # once consumed, nothing here holds the future (and so the reply's frames)
            party, _ = outstanding.pop(future)
            _file(gathered, party, future, stage)
    except BaseException:
        for future, (party, message_id) in outstanding.items():
            connections.cancel(party, message_id)
        raise
    for future, (party, message_id) in outstanding.items():
        # A party that holds the request for its owner stays dropped (the round cannot wait for a
        # person), but says so; its owner's approval, when it comes, covers the next round's request.
        awaiting = connections.awaiting(party, message_id)
        connections.cancel(party, message_id, finish=stage.finish_late)
        gathered.dropped[party] = (f"{awaiting}: not approved within {stage.timeout:g} s" if awaiting
                                   else f"no reply within {stage.timeout:g} s")
        gathered.late.add(party)
    gathered.seconds = time.monotonic() - started
    return gathered


def _file(gathered: Gathered, party: str, future: Future[Message], stage: Stage) -> None:
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
    try:
        reason = stage.on_reply(party, reply) if stage.on_reply is not None else None
    except Exception as exc:  # noqa: BLE001 - a reply the protocol cannot use costs that party, not the round
        log.exception("stage %s: the reply of %s could not be used", stage.name, party)
        reason = f"sent a reply that could not be used ({type(exc).__name__}: {exc})"
    if reason is not None:
        gathered.dropped[party] = reason
    else:
        gathered.replies[party] = reply if stage.keep else None


def summarize_drops(dropped: Mapping[str, str], *, names: int = 8) -> str:
    """Dropped parties grouped by reason, one clause per reason, a few names each.

    ``{"p0": "IndexError …", "p1": "IndexError …"}`` → ``"IndexError … at 2 parties: p0, p1"``,
    so that a round that lost 100 parties the same way reads as one line, not 100.
    """
    by_reason: dict[str, list[str]] = {}
    for party, reason in dropped.items():
        by_reason.setdefault(_without_party(reason, party), []).append(party)
    clauses = []
    for reason, parties in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        parties.sort(key=_natural)
        shown = ", ".join(parties[:names]) + (f", … and {len(parties) - names} more" if len(parties) > names else "")
        count = f"{len(parties)} parties" if len(parties) > 1 else "1 party"
        clauses.append(f"{reason} at {count}: {shown}")
    return "; ".join(clauses)


def _natural(name: str) -> list[Any]:
    """party-2 before party-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _without_party(reason: str, party: str) -> str:
    """The reason with the party's own name taken out, so that equal failures group together."""
    name = re.escape(party)
    return re.sub(rf"^{name} ", "", re.sub(rf" at {name}(?=[ :])", "", reason, count=1), count=1)
