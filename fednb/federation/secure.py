"""The secure-aggregation round: the coordinator learns the sum of the parties' updates, nothing else.

Bonawitz et al.'s four stages (CCS 2017; SecAgg+ graph, Bell et al., CCS 2020) as four yields of
one protocol, each party answering each stage through its gate (see :mod:`fednb.privacy.secagg`
for the cryptography and what each role learns)::

    keys    train request + round setup ──> each party trains, keeps its update in its session,
                                             answers with three public keys (AdvertiseKeys)
    shares  everyone's keys ──> each party's sealed shares, commitment, signed model hash (ShareKeys)
    masked  per party: the shares addressed to it ──> y_u = q(e·Δ_u) + masks, uint32 (MaskedInputCollection)
    unmask  survivors and dropped ──> shares of b_v or s_v, never both (Unmasking)
       └── Σ y_u ──de-quantize──> the weighted mean update ──> strategy (one pre-summed mean)

A party that drops at any stage costs the round nothing while every secret it needs keeps t live
holders; otherwise :class:`~fednb.privacy.SecAggAbort` ends the round as a :class:`RoundError`
before any share that could reveal something is asked for. The strategy gets the mean as one
``add(mean, total_examples)``, so FedAvg, FedAvgM and FedProx work unchanged; a strategy that
needs individual updates (robust aggregators) says so with ``individual_updates = True`` and is
refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednb.errors import RoundError
from fednb.federation.events import EventBus, PartyDone, PartyDropped
from fednb.federation.history import PartyRound
from fednb.federation.protocol import Gathered, Stage, Steps, summarize_drops
from fednb.federation.rounds import Evaluation, RoundOutcome, _Evaluations
from fednb.privacy import SecAggAbort, SecAggConfig, SecAggCoordinator, SecAggError
from fednb.privacy.secagg import apply_update, dimension, model_hash
from fednb.strategies import Strategy, summable
from fednb.wire import Message

log = logging.getLogger(__name__)

#: The stages of a secure round, as the dashboard and ``fed.history`` name them.
STAGES = ("keys", "shares", "masked", "unmask")
#: The L2 norm each party's update (its trained weights minus the global ones) is clipped to by default.
DEFAULT_CLIP = 10.0


@dataclass(frozen=True)
class SecureAggregation:
    """How ``Federation.train(..., secure_aggregation=…)`` aggregates: the coordinator learns only the sum.

    ``clip`` bounds each party's update (trained minus received weights) in L2 norm: a larger
    update is scaled down to it, which the round's quantization range needs (nothing is ever
    clipped silently to make a sum fit; the default, 10.0, is far above what a round of SGD on
    a small model moves). The sum is taken mod 2^``bits``; ``threshold`` of each party's share
    holders rebuild its secrets (default ⌈2m/3⌉); ``neighbours`` is the SecAgg+ degree (default:
    all pairs up to 64 parties); ``max_examples`` caps one party's weight in the mean.
    """

    clip: float = DEFAULT_CLIP
    bits: int = 32
    threshold: int | None = None
    neighbours: int | None = None
    max_examples: int = 65536

    def __post_init__(self) -> None:
        self.config()  # checks every parameter now, at the call

    def config(self) -> SecAggConfig:
        return SecAggConfig(clip=self.clip, bits=self.bits, threshold=self.threshold, neighbours=self.neighbours,
                            max_examples=self.max_examples)

    @classmethod
    def of(cls, value: bool | SecureAggregation | None) -> SecureAggregation | None:
        """``secure_aggregation=`` as given to ``train``: True for the defaults, False/None for plain rounds."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        raise ValueError("secure_aggregation must be True, False or a fednb.SecureAggregation(...)")


@dataclass(frozen=True)
class SecureOutcome(RoundOutcome):
    """A secure round's outcome: a :class:`RoundOutcome` plus its stages' times and what the coordinator saw."""

    stages: dict[str, float] | None = None
    secure: dict[str, Any] | None = None


def stage_request(run: str, round: int, stage: str, payload: Mapping[str, Any]) -> Message:
    """A later stage's request: no code, the stage's relayed payload, for the round its train request opened."""
    return Message("secagg", {"run": run, "stage": stage, "request": dict(payload)}, round=round)


def keys_request(content: Mapping[str, Any], setup: Mapping[str, Any], *, round: int,
                 weights: Mapping[str, np.ndarray], evaluate: bool) -> Message:
    """The request that opens a secure round: a train request that also carries the round's setup."""
    return Message("train", {**content, "evaluate": evaluate, "secagg": dict(setup)}, round=round, arrays=weights)


def _answer(reply: Message) -> Mapping[str, Any]:
    answer = reply.content.get("secagg")
    if not isinstance(answer, Mapping):
        raise ValueError("the reply carries no secure aggregation answer")
    return answer


def secure_round(
    bus: EventBus,
    strategy: Strategy,
    *,
    round: int,
    parties: list[str],
    weights: Mapping[str, np.ndarray],
    content: Mapping[str, Any],
    min_parties: int,
    timeout: float | None,
    secure: SecureAggregation,
    evaluate_incoming: bool = False,
    unavailable: Mapping[str, str] | None = None,
    observe: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> Steps[SecureOutcome]:
    """One training round under secure aggregation, as a protocol of four stages (see the module docstring).

    Arguments as :func:`~fednb.federation.rounds.train_round`'s. Raises :class:`RoundError` when
    the round aborts (too few parties at a stage, a party that caught two model hashes) or fewer
    than ``min_parties`` inputs would be in the sum; nothing of any party's update is revealed then.
    """
    if getattr(strategy, "individual_updates", False):
        raise ValueError(f"strategy {getattr(strategy, 'name', strategy)!r} needs every party's update, which "
                         "secure aggregation hides; use one of " + ", ".join(summable()))
    dropped: dict[str, str] = dict(unavailable or {})
    stages: dict[str, float] = {}
    evaluations = _Evaluations()
    asked = len(parties) + len(dropped)

    def fail(why: str) -> RoundError:
        return RoundError(f"round {round}: secure aggregation aborted: {why}; no party's update was revealed"
                          + (f"; dropped: {summarize_drops(dropped)}" if dropped else ""), round=round, dropped=dropped)

    try:
        coordinator = SecAggCoordinator(secure.config(), run=content["run"], round=round, parties=parties,
                                        dimension=dimension(weights), model_hash=model_hash(weights))
    except ValueError as exc:
        raise fail(f"{len(parties)} parties online: {exc}") from None

    def close(name: str, gathered: Gathered) -> None:
        stages[name] = gathered.seconds
        for party, reason in gathered.dropped.items():
            reason = f"{reason} (at the {name} stage)"
            dropped[party] = reason
            log.info("round %d: %s dropped: %s", round, party, reason)
            bus.publish(PartyDropped(round, party, reason, late=party in gathered.late))

    def folding(name: str, receive: Any, evaluate: bool = False) -> Any:
        def on_reply(party: str, reply: Message) -> str | None:
            try:
                if evaluate and reply.content.get("evaluation") is not None:
                    problem = evaluations.add(party, reply.content["evaluation"])
                    if problem is not None:
                        return problem
                receive(party, reply)
            except (SecAggError, ValueError) as exc:
                evaluations.by_party.pop(party, None)
                return f"sent an unusable {name} reply ({exc})"
            bus.publish(PartyDone(round, party, 0, {}, float(reply.content.get("seconds") or 0.0), stage=name))
            return None
        return on_reply

    run = content["run"]
    try:
        # AdvertiseKeys (with local training)
        request = keys_request(content, coordinator.advertise_keys_request(), round=round, weights=weights,
                               evaluate=evaluate_incoming)
        def keys(party: str, reply: Message) -> None:
            coordinator.receive_keys(party, _answer(reply))
            if observe is not None:  # the opening reply carries a budget party's privacy report
                observe(party, reply.content)

        gathered = yield Stage("keys", tuple(parties), request=request, keep=False, timeout=timeout,
                               finish_late=True, on_reply=folding("keys", keys, evaluate=evaluate_incoming))
        close("keys", gathered)
        seconds = {party: float(reply.content.get("seconds") or 0.0) for party, reply in gathered.replies.items()
                   if reply is not None}
        # ShareKeys
        request = stage_request(run, round, "shares", coordinator.share_keys_request())
        gathered = yield Stage("shares", coordinator.advertised, request=request, timeout=timeout, keep=False,
                               on_reply=folding("shares", lambda p, r: coordinator.receive_shares(p, _answer(r))))
        close("shares", gathered)
        # MaskedInputCollection
        payloads = coordinator.masked_input_requests()
        gathered = yield Stage("masked", tuple(payloads), timeout=timeout, keep=False,
                               requests={p: stage_request(run, round, "masked", payloads[p]) for p in payloads},
                               on_reply=folding("masked", lambda p, r: coordinator.receive_masked_input(
                                   p, {"masked": r.arrays.get("masked")})))
        close("masked", gathered)
        payload = coordinator.unmask_request()
        if len(coordinator.masked) < min_parties:
            raise fail(f"only {len(coordinator.masked)} of {asked} parties sent masked inputs "
                       f"(min_parties={min_parties})")
        # Unmasking
        gathered = yield Stage("unmask", coordinator.masked, request=stage_request(run, round, "unmask", payload),
                               timeout=timeout, keep=False,
                               on_reply=folding("unmask", lambda p, r: coordinator.receive_unmask(p, _answer(r))))
        close("unmask", gathered)
        result = coordinator.result()
    except SecAggAbort as exc:
        raise fail(str(exc)) from None
    # the strategy gets the mean as one pre-summed update of all the examples behind it
    aggregation = strategy.start_round(round, weights)
    aggregation.add(apply_update(weights, result.total, result.divisor), result.examples)
    contributions = {party: PartyRound(0, {}, seconds.get(party, 0.0)) for party in result.parties}
    evaluation: Evaluation | None = evaluations.result(dropped) if evaluate_incoming else None
    seen = {"parties": len(result.parties), "sum of": f"sum of {len(result.parties)} parties",
            "examples": result.examples, "error_bound": result.error_bound,
            "dropouts": {party: stage for party, stage in result.dropouts.items()}}
    total = sum(stages.values())
    return SecureOutcome(aggregation.result(), contributions, dropped, {}, evaluation, total, stages, seen)
