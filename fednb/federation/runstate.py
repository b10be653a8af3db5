"""What a training run looks like so far: one pure reducer of the federation's events.

``RunState.apply(event)`` returns a new state and never changes the old one: no UI, no
threads, no clock. The dashboard widget, the JupyterLab sidebar and the CLI progress lines
(:class:`~fednb.federation.progress.RoundLines`) each keep a ``RunState`` and render it, so
they cannot disagree about what happened::

    state = RunState()
    for event in events:
        state = state.apply(event)
    state.rounds_done, state.latest(), state.activity()

A round's evaluation (of the global model it produced) may come after its
:class:`~fednb.federation.events.RoundAggregated`, in a
:class:`~fednb.federation.events.RoundEvaluated` (the parties evaluate it while they train
the next round); :meth:`RunState.settled` says when a round's numbers are final.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fednb.federation.events import (Event, PartyDone, PartyDropped, PartyStatus, RoundAggregated, RoundEvaluated,
                                     RoundStarted, StageStarted, TrainingFinished, TrainingStarted)

#: Party statuses the round loop drives. Any other status (connecting, offline, refused,
#: "awaiting approval", a protocol stage's name, ...) is shown as it is.
ROUND_STATUSES = ("waiting", "training", "done", "late", "dropped")
#: Values of :attr:`RunState.state`.
STATES = ("idle", "training", "stopping", "stopped", "done", "error")
#: The party status a stage shows (a stage not listed shows its own name).
STAGE_STATUS = {"train": "training", "evaluate": "evaluating"}
#: Why a party still in the round is marked dropped when training ends.
CANCELLED = "round cancelled: training ended"
#: A run of more parties than this keeps rows for the parties of its round only (a population of
#: thousands, sampled): every event then costs what the round's parties cost, and displays
#: summarise the population (:attr:`RunState.population`) instead of listing it.
LARGE = 200


@dataclass(frozen=True)
class PartyState:
    """One party as the run sees it: its status, last train metrics and time, and its stage."""

    name: str
    status: str = "waiting"
    examples: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)  # its last train metrics in this run
    seconds: float | None = None  # how long its last reply took
    detail: str = ""  # why it dropped, what it awaits, ...
    stage: str = ""  # the protocol stage it is in (or last finished) this round


@dataclass(frozen=True)
class RoundState:
    """One round of the run: who took part, its stage, train metrics and (maybe later) evaluation."""

    round: int
    parties: tuple[str, ...] = ()
    stage: str = "train"
    train: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # each party's train metrics
    aggregated: bool = False
    metrics: Mapping[str, Any] = field(default_factory=dict)  # aggregated train metrics
    evaluation: Mapping[str, Any] | None = None  # the global model's test metrics, once known
    party_evaluation: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def evaluated(self) -> bool:
        return self.evaluation is not None

    def shown(self) -> Mapping[str, Any]:
        """The round's headline metrics: the evaluation where there is one, else the train metrics."""
        return self.evaluation if self.evaluation is not None else self.metrics

    def shown_parties(self) -> Mapping[str, Mapping[str, Any]]:
        """Per-party metrics of the same kind as :meth:`shown`, so one round never mixes the two."""
        return self.party_evaluation if self.evaluation is not None else self.train


class _Rows(tuple):  # type: ignore[type-arg]
    """Party rows that know their positions by name: one party's change is a copy made in C, not a scan
    in Python (a round of 10,000 parties has 10,000 of them)."""

    @functools.cached_property
    def positions(self) -> dict[str, int]:
        return {p.name: i for i, p in enumerate(self)}


def _rows(parties: tuple[PartyState, ...]) -> _Rows:
    return parties if isinstance(parties, _Rows) else _Rows(parties)


def _replace_party(parties: tuple[PartyState, ...], name: str, **changes: Any) -> tuple[PartyState, ...]:
    """The rows with ``name``'s changed (appended when new); the others are the same objects."""
    rows = _rows(parties)
    at = rows.positions.get(name)
    if at is None:
        grown = _Rows((*rows, replace(PartyState(name), **changes)))
        grown.__dict__["positions"] = {**rows.positions, name: len(rows)}
        return grown
    changed = _Rows((*rows[:at], replace(rows[at], **changes), *rows[at + 1:]))
    changed.__dict__["positions"] = rows.positions  # the same names at the same places
    return changed


@dataclass(frozen=True)
class RunState:
    """The current (or last) training run, folded from federation events; immutable."""

    state: str = "idle"
    strategy: str = ""
    first_round: int = 1
    last_round: int = 0
    round: int = 0  # the round in progress (or last started); 0 before the first
    rounds_done: int = 0
    parties: tuple[PartyState, ...] = ()  # in the order the run (or the federation) lists them
    rounds: tuple[RoundState, ...] = ()  # this run's rounds, oldest first
    in_round: frozenset[str] = frozenset()  # asked in the current stage, not yet done or dropped
    error: str = ""
    started: bool = False  # whether TrainingStarted was seen (a display attached mid-run has not)
    #: Parties of a run larger than :data:`LARGE` (0: every party has a row in ``parties``); then
    #: ``parties`` holds the current round's, and ``available`` how many its sample was drawn from.
    population: int = 0
    available: int = 0
    sampled: frozenset[str] = frozenset()  # a population's parties of the current round

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def of_parties(cls, rows: Iterable[tuple[str, str, int | None, str]]) -> RunState:
        """A state before any training: one ``(name, status, examples, detail)`` row per party
        (``Federation.status()``); an online party is waiting. A population larger than
        :data:`LARGE` is counted, not listed."""
        rows = list(rows)
        if len(rows) > LARGE:
            return cls(population=len(rows), available=sum(status == "online" for _, status, _, _ in rows))
        return cls(parties=tuple(PartyState(name, "waiting" if status == "online" else status, examples,
                                            detail="" if status == "online" else detail)
                                 for name, status, examples, detail in rows))

    def apply(self, event: Event) -> RunState:
        """The state after ``event``; events of kinds it does not know leave it as it is."""
        handler = _HANDLERS.get(type(event))
        return handler(self, event) if handler is not None else self

    def stopping(self) -> RunState:
        """Asked to stop: a running training ends after the round in progress."""
        return replace(self, state="stopping") if self.state == "training" else self

    # -- reading -------------------------------------------------------------------------------

    @property
    def total_rounds(self) -> int:
        return max(self.last_round - self.first_round + 1, 0)

    @property
    def running(self) -> bool:
        return self.state in ("training", "stopping")

    def party(self, name: str) -> PartyState | None:
        if isinstance(self.parties, _Rows):
            at = self.parties.positions.get(name)
            return None if at is None else self.parties[at]
        return next((p for p in self.parties if p.name == name), None)

    def round_state(self, round_: int) -> RoundState | None:
        return next((r for r in self.rounds if r.round == round_), None)

    def history(self) -> tuple[RoundState, ...]:
        """The aggregated rounds, oldest first."""
        return tuple(r for r in self.rounds if r.aggregated)

    def settled(self, round_: int) -> bool:
        """Whether ``round_``'s numbers are final: aggregated, and evaluated, or its evaluation
        will not come (a later round was aggregated or evaluated, or training ended)."""
        entry = self.round_state(round_)
        if entry is None or not entry.aggregated:
            return False
        if entry.evaluated or not self.running:
            return True
        return any(r.round > round_ and (r.aggregated or r.evaluated) for r in self.rounds)

    def latest(self) -> tuple[RoundState | None, Mapping[str, Any]]:
        """The newest evaluated round and its evaluation; else the newest aggregated round and its
        train metrics; else (None, {})."""
        evaluated = [r for r in self.rounds if r.evaluated]
        if evaluated:
            return evaluated[-1], evaluated[-1].evaluation or {}
        history = self.history()
        return (history[-1], history[-1].metrics) if history else (None, {})

    def eta(self) -> float | None:
        """Seconds left at the mean round time so far (0 once done; None when unknown)."""
        if self.state == "done":
            return 0.0
        times = [r.seconds for r in self.history() if r.seconds is not None]
        if not self.running or not times:
            return None
        aggregated = self.history()[-1].round
        return sum(times) / len(times) * max(self.last_round - aggregated, 0)

    def activity(self) -> dict[str, str]:
        """Each party's part in the round in progress (training, done, late, ...); {} between runs."""
        current = self.round_state(self.round)
        if not self.running or current is None:
            return {}
        return {p.name: p.status for p in self.parties if p.name in current.parties}


# -- one function per event -----------------------------------------------------------------------

def _with_round(state: RunState, round_: int, **changes: Any) -> tuple[RoundState, ...]:
    """The rounds with ``round_``'s entry changed (created when new, kept in round order)."""
    found = state.round_state(round_)
    entry = replace(found if found is not None else RoundState(round_), **changes)
    rounds = [r for r in state.rounds if r.round != round_] + [entry]
    return tuple(sorted(rounds, key=lambda r: r.round))


def _training_started(state: RunState, event: TrainingStarted) -> RunState:
    if len(event.parties) > LARGE:  # a population: its rounds' parties get rows as they are sampled
        return RunState(state="training", strategy=event.strategy, first_round=event.first_round,
                        last_round=event.first_round + event.rounds - 1, started=True,
                        population=len(event.parties), available=state.available)
    fresh = []
    for name in event.parties:
        row = state.party(name) or PartyState(name)
        # Connection trouble (offline, refused, ...) outlives runs; round results do not.
        keep = row.status not in (*ROUND_STATUSES, "online")
        fresh.append(replace(row, status=row.status if keep else "waiting", detail=row.detail if keep else "",
                             metrics={}, seconds=None, stage=""))
    return RunState(state="training", strategy=event.strategy, first_round=event.first_round,
                    last_round=event.first_round + event.rounds - 1, parties=tuple(fresh), started=True)


def _round_started(state: RunState, event: RoundStarted) -> RunState:
    if state.population:  # rows for this round's parties only; the others are counted
        rows = tuple(PartyState(name, "training", stage="train") for name in event.parties)
        return replace(state, parties=rows, in_round=frozenset(event.parties), round=event.round,
                       last_round=event.rounds, state="training" if state.state == "idle" else state.state,
                       available=len(event.sampled_from or event.parties), sampled=frozenset(event.parties),
                       rounds=_with_round(state, event.round, parties=tuple(event.parties), stage="train"))
    parties = state.parties
    for name in event.sampled_from:
        if name not in event.parties:
            parties = _replace_party(parties, name, status="not sampled", detail="", seconds=None, stage="")
    for name in event.parties:
        parties = _replace_party(parties, name, status="training", detail="", seconds=None, stage="train")
    return replace(state, parties=parties, in_round=frozenset(event.parties), round=event.round,
                   last_round=event.rounds, state="training" if state.state == "idle" else state.state,
                   rounds=_with_round(state, event.round, parties=tuple(event.parties), stage="train"))


def _stage_started(state: RunState, event: StageStarted) -> RunState:
    status = STAGE_STATUS.get(event.stage, event.stage)
    parties = state.parties
    for name in event.parties:
        parties = _replace_party(parties, name, status=status, detail="", stage=event.stage)
    known = state.round_state(event.round)
    members = tuple(dict.fromkeys((*(known.parties if known else ()), *event.parties)))
    return replace(state, parties=parties, in_round=frozenset(event.parties),
                   round=max(state.round, event.round),
                   rounds=_with_round(state, event.round, parties=members, stage=event.stage))


def _party_done(state: RunState, event: PartyDone) -> RunState:
    metrics = dict(event.metrics)
    changes: dict[str, Any] = {"status": "done", "seconds": event.seconds, "detail": "", "stage": event.stage}
    if event.stage == "train":
        changes.update(examples=event.examples, metrics=metrics)
    entry = state.round_state(event.round) or RoundState(event.round)
    rounds = state.rounds
    if event.stage == "train":
        rounds = _with_round(state, event.round, train={**entry.train, event.party: metrics})
    return replace(state, parties=_replace_party(state.parties, event.party, **changes),
                   in_round=state.in_round - {event.party}, rounds=rounds)


def _party_dropped(state: RunState, event: PartyDropped) -> RunState:
    return replace(state, in_round=state.in_round - {event.party},
                   parties=_replace_party(state.parties, event.party, status="late" if event.late else "dropped",
                                          detail=event.reason))


def _round_aggregated(state: RunState, event: RoundAggregated) -> RunState:
    found = state.round_state(event.round)
    evaluation = event.evaluation if event.evaluation is not None else (found.evaluation if found else None)
    party_evaluation = event.party_evaluation if event.evaluation is not None else (
        found.party_evaluation if found else {})
    rounds = _with_round(state, event.round, aggregated=True, metrics=dict(event.metrics), evaluation=evaluation,
                         party_evaluation=dict(party_evaluation), seconds=event.seconds)
    return replace(state, rounds=rounds, rounds_done=sum(r.aggregated for r in rounds),
                   round=max(state.round, event.round), last_round=event.rounds)


def _round_evaluated(state: RunState, event: RoundEvaluated) -> RunState:
    if state.round_state(event.round) is None:
        return state  # a round of an earlier run
    parties, evaluating = state.parties, {p.name for p in state.parties if p.stage == "evaluate"} & state.in_round
    for name in evaluating:  # an evaluation stage of its own (after the last round) is over
        parties = _replace_party(parties, name, status="done")
    return replace(state, parties=parties, in_round=state.in_round - evaluating,
                   rounds=_with_round(state, event.round, evaluation=dict(event.evaluation),
                                      party_evaluation=dict(event.party_evaluation)))


def _training_finished(state: RunState, event: TrainingFinished) -> RunState:
    parties = state.parties
    for name in state.in_round:  # an error or Ctrl-C cancelled their requests: no reply will come
        if state.party(name) is not None:
            parties = _replace_party(parties, name, status="dropped", detail=CANCELLED)
    outcome = "error" if event.error else "stopped" if event.stopped else "done"
    return replace(state, parties=parties, in_round=frozenset(), rounds_done=event.rounds_done,
                   error=event.error or "", state=outcome)


def _party_status(state: RunState, event: PartyStatus) -> RunState:
    row = state.party(event.party)
    if row is None and (state.state != "idle" or state.population):
        return state  # a party outside this run (or this round, of a population)
    status = event.status
    if status == "online":
        if event.party in state.in_round:
            status = "training" if (row is None or row.stage in ("", "train")) else row.stage
        elif row is not None and row.status in ("done", "late", "dropped"):
            status = row.status
        else:
            status = "waiting"
    return replace(state, parties=_replace_party(state.parties, event.party, status=status, detail=event.detail))


_HANDLERS: dict[type, Any] = {
    TrainingStarted: _training_started, RoundStarted: _round_started, StageStarted: _stage_started,
    PartyDone: _party_done, PartyDropped: _party_dropped, RoundAggregated: _round_aggregated,
    RoundEvaluated: _round_evaluated, TrainingFinished: _training_finished, PartyStatus: _party_status,
}
