"""The one event reducer, RunState.apply, with no UI, threads or sockets; and the CLI lines that render it."""

from __future__ import annotations

import io
from dataclasses import FrozenInstanceError

import pytest

from fednb.federation.events import (PartyDone, PartyDropped, PartyStatus, RoundAggregated, RoundEvaluated,
                                     RoundStarted, StageStarted, TrainingFinished, TrainingStarted)
from fednb.federation.progress import RoundLines
from fednb.federation.runstate import CANCELLED, RunState

PARTIES = ("a", "b")


def fold(*events, state: RunState | None = None) -> RunState:
    state = state or RunState()
    for event in events:
        state = state.apply(event)
    return state


def one_round(round_: int, total: int, evaluation=None) -> list:
    return [RoundStarted(round_, total, PARTIES),
            PartyDone(round_, "a", 10, {"loss": 1.0 / round_}, 0.5),
            PartyDone(round_, "b", 30, {"loss": 2.0 / round_}, 0.7),
            RoundAggregated(round_, total, {"loss": 1.5 / round_}, evaluation, {}, 1.0)]


def test_apply_never_changes_the_state_it_is_given() -> None:
    before = fold(TrainingStarted(2, "fedavg", PARTIES))
    after = before.apply(RoundStarted(1, 2, PARTIES))
    assert (before.round, after.round) == (0, 1)
    assert {p.status for p in before.parties} == {"waiting"} and {p.status for p in after.parties} == {"training"}
    with pytest.raises(FrozenInstanceError):
        after.round = 3  # type: ignore[misc]
    assert RunState().apply(object()) == RunState()  # type: ignore[arg-type]  # unknown events: unchanged


def test_a_whole_run() -> None:
    state = fold(TrainingStarted(2, "fedavg", PARTIES, first_round=3), *one_round(3, 4, {"accuracy": 0.5}))
    assert (state.state, state.first_round, state.last_round, state.total_rounds) == ("training", 3, 4, 2)
    assert state.rounds_done == 1 and state.settled(3) and not state.settled(4)
    assert state.party("b").examples == 30 and state.party("b").metrics == {"loss": 2.0 / 3}
    assert state.activity() == {"a": "done", "b": "done"} and state.eta() == pytest.approx(1.0)
    entry, metrics = state.latest()
    assert entry is not None and entry.round == 3 and metrics == {"accuracy": 0.5}
    state = fold(*one_round(4, 4, {"accuracy": 0.7}), TrainingFinished(2, stopped=False), state=state)
    assert (state.state, state.rounds_done, state.eta(), state.activity()) == ("done", 2, 0.0, {})
    assert [r.round for r in state.history()] == [3, 4]


def test_an_evaluation_that_arrives_after_the_round_was_aggregated() -> None:
    state = fold(TrainingStarted(3, "fedavg", PARTIES), *one_round(1, 3))
    first = state.round_state(1)
    assert first is not None and not first.evaluated and first.shown() == {"loss": 1.5}
    assert first.shown_parties() == {"a": {"loss": 1.0}, "b": {"loss": 2.0}}  # train metrics, not a mix
    assert not state.settled(1)  # its evaluation may still come
    state = fold(RoundStarted(2, 3, PARTIES),
                 RoundEvaluated(1, {"accuracy": 0.8, "loss": 0.4}, {"a": {"accuracy": 0.9}}), state=state)
    first = state.round_state(1)
    assert first is not None and first.evaluated and first.shown() == {"accuracy": 0.8, "loss": 0.4}
    assert first.shown_parties() == {"a": {"accuracy": 0.9}} and state.settled(1)
    assert state.latest()[1] == {"accuracy": 0.8, "loss": 0.4}
    # a round whose evaluation never comes is settled once a later round is aggregated, or at the end
    state = fold(*one_round(2, 3)[1:], state=state)
    assert state.settled(1) and not state.settled(2)
    state = fold(TrainingFinished(2, stopped=True), state=state)
    assert state.settled(2) and state.state == "stopped"
    assert fold(RoundEvaluated(9, {"accuracy": 1.0}), state=state) == state  # not a round of this run


def test_the_last_rounds_evaluation_as_a_stage_of_its_own() -> None:
    state = fold(TrainingStarted(1, "fedavg", PARTIES), *one_round(1, 1), StageStarted(1, "evaluate", PARTIES))
    assert state.activity() == {"a": "evaluating", "b": "evaluating"} and not state.settled(1)
    state = fold(RoundEvaluated(1, {"accuracy": 0.9}), TrainingFinished(1, stopped=False), state=state)
    assert {p.status for p in state.parties} == {"done"} and state.round_state(1).evaluation == {"accuracy": 0.9}


def test_stages_of_a_protocol_round() -> None:
    state = fold(TrainingStarted(1, "secagg", PARTIES), RoundStarted(1, 1, PARTIES),
                 StageStarted(1, "keys", PARTIES), PartyDone(1, "a", 0, {}, 0.1, stage="keys"))
    assert state.round_state(1).stage == "keys"
    assert (state.party("a").status, state.party("a").stage) == ("done", "keys")
    assert (state.party("b").status, state.party("b").stage) == ("keys", "keys") and state.in_round == {"b"}
    state = fold(PartyStatus("b", "online"), state=state)
    assert state.party("b").status == "keys"  # back online mid-stage: still in it
    state = fold(StageStarted(1, "masked", PARTIES), PartyDone(1, "a", 10, {"loss": 0.3}, 0.2, stage="train"),
                 state=state)
    assert state.round_state(1).stage == "masked" and state.party("a").examples == 10
    state = fold(TrainingFinished(0, stopped=False, error="RoundError: too few"), state=state)
    assert state.state == "error" and state.party("b").status == "dropped" and state.party("b").detail == CANCELLED


def test_connection_trouble_outlives_runs_and_unknown_parties_are_ignored_mid_run() -> None:
    state = RunState.of_parties([("a", "online", 5, ""), ("b", "refused", None, "key not authorized")])
    assert [(p.status, p.detail) for p in state.parties] == [("waiting", ""), ("refused", "key not authorized")]
    state = fold(TrainingStarted(1, "fedavg", PARTIES), PartyStatus("zed", "online"), state=state)
    assert [p.name for p in state.parties] == ["a", "b"] and state.party("b").status == "refused"
    state = fold(RoundStarted(1, 1, ("a",)), PartyDropped(1, "a", "no reply", late=True), state=state)
    assert state.party("a").status == "late" and state.activity() == {"a": "late"}
    assert fold(PartyStatus("a", "online"), state=state).party("a").status == "late"
    assert state.stopping().state == "stopping" and RunState().stopping() == RunState()


def lines(*events) -> list[str]:
    out = io.StringIO()
    display = RoundLines(out)
    for event in events:
        display(event)
    return out.getvalue().splitlines()


def test_round_lines_wait_for_a_late_evaluation() -> None:
    written = lines(TrainingStarted(2, "fedavg", PARTIES), *one_round(1, 2))
    assert written == []  # round 1's evaluation is still to come
    written = lines(TrainingStarted(2, "fedavg", PARTIES), *one_round(1, 2), RoundStarted(2, 2, PARTIES),
                    RoundEvaluated(1, {"accuracy": 0.75}), *one_round(2, 2)[1:], RoundEvaluated(2, {"accuracy": 0.9}),
                    TrainingFinished(2, stopped=False))
    assert written[0].split() == ["round", "train", "loss", "test", "accuracy", "time"]
    assert [line.split()[:3] for line in written[1:]] == [["1", "1.5000", "0.7500"], ["2", "0.7500", "0.9000"]]


def test_round_lines_for_rounds_never_evaluated_and_a_failed_run() -> None:
    written = lines(TrainingStarted(3, "fedavg", PARTIES), *one_round(1, 3), *one_round(2, 3),
                    RoundStarted(3, 3, PARTIES), PartyDropped(3, "b", "IndexError"),
                    TrainingFinished(2, stopped=True, error="RoundError: round 3"), PartyStatus("a", "offline"))
    # round 2's line waits for an evaluation that never comes: it is written when training ends
    assert [line.split()[:3] for line in (written[1], written[3])] == [["1", "1.5000", "nan"], ["2", "0.7500", "nan"]]
    assert [written[2], *written[4:]] == ["       b dropped: IndexError",
                                          "training ended after 2 round(s): RoundError: round 3", "       a is offline"]
    # an evaluation inside RoundAggregated is written at once; each run gets its own lines
    again = lines(TrainingStarted(1, "fedavg", PARTIES), *one_round(1, 1, {"accuracy": 0.5}),
                  TrainingStarted(1, "fedavg", PARTIES, first_round=2), *one_round(2, 2, {"accuracy": 0.6}))
    assert [line.split()[0] for line in again] == ["round", "1", "2"]
