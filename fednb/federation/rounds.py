"""The protocols of a plain federated round: train (FedAvg and its kin) and evaluate.

::

    train (one stage) ──global weights×N──> parties ──updates, as they arrive──> Aggregation.add
       │  (the request may also ask each party to evaluate the incoming weights first: the
       │   evaluation of the previous round's model rides on this round's request)
       └── ≥ min_parties? ── result() ──> new global weights

    evaluate (one stage) ──weights×N──> parties ──test metrics──> example-weighted means

Each is a generator of :class:`~fednb.federation.protocol.Stage` objects that
:func:`~fednb.federation.protocol.drive` runs; a party answers each stage through its gate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednb.errors import RoundError, WireError
from fednb.federation.events import EventBus, PartyDone, PartyDropped
from fednb.federation.history import PartyRound
from fednb.federation.protocol import Gathered, Stage, Steps, summarize_drops
from fednb.strategies import Strategy, weighted_metrics
from fednb.wire import Message, check_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """Per-party and example-weighted global metrics of one model."""

    parties: dict[str, dict[str, float]]
    metrics: dict[str, float]
    dropped: dict[str, str]

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]


@dataclass(frozen=True)
class RoundOutcome:
    """What one train stage produced.

    ``evaluation`` is the evaluation of the weights the round started from (the previous
    round's global model), when the round's request asked for it.
    """

    weights: dict[str, np.ndarray]
    contributions: dict[str, PartyRound]
    dropped: dict[str, str]
    metrics: dict[str, float]
    evaluation: Evaluation | None
    seconds: float


class _Evaluations:
    """Collects ``(examples, metrics)`` per party and turns them into an :class:`Evaluation`."""

    def __init__(self) -> None:
        self.by_party: dict[str, tuple[int, dict[str, float]]] = {}

    def add(self, party: str, evaluation: Any) -> str | None:
        """File one party's ``{"examples", "metrics"}``; a reason when it cannot be used."""
        if not isinstance(evaluation, Mapping):
            return "sent an evaluation that is not an object"
        examples = evaluation.get("examples")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            return "sent an evaluation without a valid example count"
        try:
            metrics = check_metrics(evaluation.get("metrics") or {}, where="evaluation")
        except WireError as exc:
            return f"sent unusable evaluation metrics ({exc})"
        self.by_party[party] = (examples, metrics)
        return None

    def result(self, dropped: Mapping[str, str]) -> Evaluation:
        per_party = {party: {**metrics, "examples": float(examples)} for party, (examples, metrics) in self.by_party.items()}
        global_metrics = weighted_metrics([(examples, metrics) for examples, metrics in self.by_party.values()
                                           if examples > 0])
        return Evaluation(per_party, global_metrics, dict(dropped))


def train_round(
    bus: EventBus,
    strategy: Strategy,
    *,
    round: int,
    parties: list[str],
    weights: Mapping[str, np.ndarray],
    content: Mapping[str, Any],
    min_parties: int,
    timeout: float | None,
    evaluate_incoming: bool = False,
    unavailable: Mapping[str, str] | None = None,
    observe: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> Steps[RoundOutcome]:
    """One training round as a protocol of one stage (see the module docstring).

    ``content`` is the train request's content (source, train cell, config, run id), to which
    the strategy's :meth:`~fednb.strategies.Strategy.train_request` may add fields and arrays;
    ``unavailable`` names chosen parties that were not asked (offline), with the reason: they
    count as dropped. ``observe(party, content)`` sees each used reply's content (its
    privacy report, DP-FedAvg's clipped bit). Raises :class:`RoundError` when fewer than
    ``min_parties`` updates could be used.
    """
    extra_content, extra_arrays = strategy.train_request(round, weights)  # more than the weights: SCAFFOLD's c
    aggregation = strategy.start_round(round, weights)
    contributions: dict[str, PartyRound] = {}
    evaluations = _Evaluations()

    def on_reply(party: str, reply: Message) -> str | None:
        examples: int = reply.content.get("examples") or 0
        if evaluate_incoming and reply.content.get("evaluation") is not None:
            problem = evaluations.add(party, reply.content["evaluation"])
            if problem is not None:
                return problem
        try:  # the aggregation checks the update (fednb.tensors.check_update) before it folds it in
            aggregation.add(reply.arrays, examples)
        except ValueError as exc:
            evaluations.by_party.pop(party, None)
            return f"sent an update that cannot be used ({exc})"
        if observe is not None:
            observe(party, reply.content)
        metrics = dict(reply.content.get("metrics") or {})
        seconds = float(reply.content.get("seconds") or 0.0)
        contributions[party] = PartyRound(examples, metrics, seconds)
        bus.publish(PartyDone(round, party, examples, metrics, seconds))
        return None

    request = Message("train", {**content, **extra_content, "evaluate": evaluate_incoming}, round=round,
                      arrays={**weights, **extra_arrays})
    gathered: Gathered = yield Stage("train", tuple(parties), request=request, on_reply=on_reply, keep=False,
                                     timeout=timeout, finish_late=True)
    dropped = {**dict(unavailable or {}), **gathered.dropped}
    for party, reason in dropped.items():
        log.info("round %d: %s dropped: %s", round, party, reason)  # the events carry it to every display
        bus.publish(PartyDropped(round, party, reason, late=party in gathered.late))
    if len(contributions) < min_parties:
        asked = len(parties) + len(unavailable or {})
        raise RoundError(f"round {round}: only {len(contributions)} of {asked} parties replied "
                         f"(min_parties={min_parties}); dropped: {summarize_drops(dropped)}",
                         round=round, dropped=dropped)
    metrics = strategy.aggregate_metrics(round, [(c.examples, c.metrics) for c in contributions.values()])
    evaluation = evaluations.result(dropped) if evaluate_incoming else None
    return RoundOutcome(aggregation.result(), contributions, dropped, metrics, evaluation, gathered.seconds)


def evaluate_round(*, round: int | None, parties: list[str], weights: Mapping[str, np.ndarray], source: str,
                   config: Mapping[str, Any], timeout: float | None) -> Steps[Evaluation]:
    """The evaluation of ``weights`` on every party's test split, as a protocol of one stage."""
    evaluations = _Evaluations()

    def on_reply(party: str, reply: Message) -> str | None:
        return evaluations.add(party, {"examples": reply.content.get("examples"),
                                       "metrics": reply.content.get("metrics")})

    request = Message("evaluate", {"source": source, "config": dict(config)}, round=round, arrays=weights)
    gathered: Gathered = yield Stage("evaluate", tuple(parties), request=request, on_reply=on_reply, keep=False,
                                     timeout=timeout, finish_late=True)
    return evaluations.result(gathered.dropped)
