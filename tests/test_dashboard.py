"""The dashboard widget without a browser or sockets: events in, traits and summaries out."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fednb.federation.events import (EventBus, PartyDone, PartyDropped, PartyStatus, RoundAggregated, RoundEvaluated,
                                     RoundStarted, StageStarted, TrainingFinished, TrainingStarted)
from fednb.notebook.dashboard import Dashboard

PARTIES = ("alpha", "beta", "gamma")
ESM = Path(__file__).resolve().parent.parent / "fednb" / "notebook" / "dashboard.js"
CSS = ESM.with_name("dashboard.css")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    widget = Dashboard(title="digits")
    yield widget
    widget.close()


def rows(widget: Dashboard) -> dict[str, dict]:
    return {row["name"]: row for row in widget.parties}


def statuses(widget: Dashboard) -> dict[str, str]:
    return {row["name"]: row["status"] for row in widget.parties}


def evaluation(round_: int) -> dict[str, float]:
    return {"loss": 1.0 / round_, "accuracy": 0.5 + 0.1 * round_}


def party_evaluation(round_: int, parties=PARTIES) -> dict[str, dict[str, float]]:
    return {p: {"loss": 1.0 / round_ + 0.01 * i, "accuracy": 0.45 + 0.1 * round_ - 0.01 * i, "examples": 50.0}
            for i, p in enumerate(parties)}


def run_rounds(widget: Dashboard, first: int, last: int, total: int, seconds: float = 2.0) -> None:
    """Rounds where every party trains and the global model is evaluated."""
    for round_ in range(first, last + 1):
        widget.handle(RoundStarted(round_, total, PARTIES))
        for i, party in enumerate(PARTIES):
            widget.handle(PartyDone(round_, party, 100 + i, {"loss": 0.9 / round_, "accuracy": 0.6}, 0.5))
        widget.handle(RoundAggregated(round_, total, {"loss": 0.9 / round_, "accuracy": 0.6}, evaluation(round_),
                                      party_evaluation(round_), seconds))


def test_a_run_of_four_rounds_moves_through_every_state(dashboard: Dashboard) -> None:
    assert (dashboard.state, dashboard.parties, dashboard.history, dashboard.eta) == ("idle", [], [], None)
    dashboard.handle(PartyStatus("alpha", "online"))
    dashboard.handle(PartyStatus("gamma", "offline", "no heartbeat for 10 s"))
    assert statuses(dashboard) == {"alpha": "waiting", "gamma": "offline"}

    before = time.time()
    dashboard.handle(TrainingStarted(4, "fedavg", PARTIES))
    assert dashboard.state == "training" and dashboard.strategy == "fedavg"
    assert (dashboard.first_round, dashboard.last_round, dashboard.round, dashboard.rounds_done) == (1, 4, 0, 0)
    assert before <= dashboard.started_at <= time.time()
    assert statuses(dashboard) == {"alpha": "waiting", "beta": "waiting", "gamma": "offline"}  # trouble outlives runs
    dashboard.handle(PartyStatus("gamma", "online"))
    assert rows(dashboard)["gamma"]["status"] == "waiting" and rows(dashboard)["gamma"]["detail"] == ""

    # Round 1: everyone trains; the global curve comes from the evaluation.
    dashboard.handle(RoundStarted(1, 4, PARTIES))
    assert dashboard.round == 1 and set(statuses(dashboard).values()) == {"training"}
    dashboard.handle(PartyDone(1, "alpha", 120, {"loss": 0.8, "accuracy": 0.7}, 1.25))
    alpha = rows(dashboard)["alpha"]
    assert (alpha["status"], alpha["examples"], alpha["loss"], alpha["accuracy"], alpha["seconds"]) == \
        ("done", 120, 0.8, 0.7, 1.25)
    assert statuses(dashboard)["beta"] == "training"
    for party in ("beta", "gamma"):
        dashboard.handle(PartyDone(1, party, 80, {"loss": 0.9, "accuracy": 0.65}, 1.0))
    dashboard.handle(RoundAggregated(1, 4, {"loss": 0.85, "accuracy": 0.68}, evaluation(1), party_evaluation(1), 2.0))
    assert dashboard.rounds_done == 1 and dashboard.eta == pytest.approx(2.0 * 3)
    assert dashboard.history == [{"round": 1, "loss": 1.0, "accuracy": pytest.approx(0.6), "seconds": 2.0,
                                  "evaluated": True,
                                  "parties": {p: {"loss": pytest.approx(m["loss"]), "accuracy": pytest.approx(m["accuracy"])}
                                              for p, m in party_evaluation(1).items()}}]

    # Round 2: gamma misses the deadline.
    dashboard.handle(RoundStarted(2, 4, PARTIES))
    assert statuses(dashboard)["gamma"] == "training" and rows(dashboard)["alpha"]["seconds"] is None
    for party in ("alpha", "beta"):
        dashboard.handle(PartyDone(2, party, 100, {"loss": 0.5, "accuracy": 0.8}, 1.0))
    dashboard.handle(PartyDropped(2, "gamma", "no reply within 30 s", late=True))
    assert rows(dashboard)["gamma"]["status"] == "late" and rows(dashboard)["gamma"]["detail"] == "no reply within 30 s"
    dashboard.handle(RoundAggregated(2, 4, {"loss": 0.5, "accuracy": 0.8}, evaluation(2),
                                     party_evaluation(2, ("alpha", "beta")), 4.0))
    assert dashboard.history[1]["round"] == 2 and set(dashboard.history[1]["parties"]) == {"alpha", "beta"}
    assert dashboard.eta == pytest.approx(3.0 * 2)  # mean of 2 s and 4 s, two rounds left

    # Round 3: beta waits for its owner's approval (a status the dashboard does not know);
    # the round is not evaluated, so the curves use the train metrics.
    dashboard.handle(RoundStarted(3, 4, PARTIES))
    assert statuses(dashboard) == {"alpha": "training", "beta": "training", "gamma": "training"}
    dashboard.handle(PartyStatus("beta", "awaiting approval", "code 1a2b"))
    assert rows(dashboard)["beta"]["status"] == "awaiting approval" and rows(dashboard)["beta"]["detail"] == "code 1a2b"
    dashboard.handle(PartyStatus("beta", "online"))
    assert rows(dashboard)["beta"]["status"] == "training"
    for i, party in enumerate(PARTIES):
        dashboard.handle(PartyDone(3, party, 100, {"loss": 0.3 + i / 10, "accuracy": 0.9}, 1.0))
    dashboard.handle(RoundAggregated(3, 4, {"loss": 0.4, "accuracy": 0.9}, None, {}, 3.0))
    third = dashboard.history[2]
    assert (third["loss"], third["accuracy"], third["evaluated"]) == (0.4, 0.9, False)
    assert third["parties"]["gamma"] == {"loss": pytest.approx(0.5), "accuracy": 0.9}
    assert dashboard.eta == pytest.approx(3.0)

    run_rounds(dashboard, 4, 4, 4)
    assert dashboard.state == "training"
    dashboard.handle(TrainingFinished(4, stopped=False))
    assert (dashboard.state, dashboard.rounds_done, dashboard.eta, dashboard.error) == ("done", 4, 0.0, "")
    assert [h["round"] for h in dashboard.history] == [1, 2, 3, 4]
    assert [r["name"] for r in dashboard.parties] == list(PARTIES)
    assert dashboard.elapsed >= 0.0


def test_a_new_run_starts_a_fresh_chart_but_keeps_the_rows(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(2, "fedavg", PARTIES))
    run_rounds(dashboard, 1, 2, 2)
    dashboard.handle(TrainingFinished(2, stopped=False))
    dashboard.handle(TrainingStarted(2, "fedprox", PARTIES, first_round=3))
    assert (dashboard.state, dashboard.history, dashboard.rounds_done) == ("training", [], 0)
    assert (dashboard.first_round, dashboard.last_round, dashboard.strategy) == (3, 4, "fedprox")
    assert all(row["examples"] is not None and row["loss"] is None for row in dashboard.parties)


def test_stopped_and_failed_runs_end_in_their_own_states(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(4, "fedavg", PARTIES))
    run_rounds(dashboard, 1, 2, 4)
    dashboard.handle(TrainingFinished(2, stopped=True))
    assert (dashboard.state, dashboard.rounds_done, dashboard.eta) == ("stopped", 2, None)

    dashboard.handle(TrainingStarted(4, "fedavg", PARTIES, first_round=3))
    dashboard.handle(RoundStarted(3, 6, PARTIES))
    dashboard.handle(PartyDone(3, "alpha", 100, {"loss": 0.5}, 1.0))
    dashboard.handle(TrainingFinished(0, stopped=True, error="RoundError: round 3: only 1 of 3 parties replied"))
    assert dashboard.state == "error" and dashboard.error.startswith("RoundError")
    assert statuses(dashboard) == {"alpha": "done", "beta": "dropped", "gamma": "dropped"}  # no reply will come
    assert rows(dashboard)["beta"]["detail"] == "round cancelled: training ended"


def test_an_evaluation_that_comes_a_round_later_replaces_the_train_numbers(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(2, "fedavg", PARTIES))
    dashboard.handle(RoundStarted(1, 2, PARTIES))
    for party in PARTIES:
        dashboard.handle(PartyDone(1, party, 100, {"loss": 0.9, "accuracy": 0.6}, 0.5))
    dashboard.handle(RoundAggregated(1, 2, {"loss": 0.9, "accuracy": 0.6}, None, {}, 1.0))
    assert dashboard.history[0]["evaluated"] is False and dashboard.history[0]["accuracy"] == 0.6
    dashboard.handle(RoundStarted(2, 2, PARTIES))
    dashboard.handle(RoundEvaluated(1, evaluation(1), party_evaluation(1)))
    first = dashboard.history[0]
    assert first["evaluated"] is True and first["accuracy"] == pytest.approx(0.6) and first["loss"] == 1.0
    assert set(first["parties"]) == set(PARTIES) and statuses(dashboard) == dict.fromkeys(PARTIES, "training")
    dashboard.handle(StageStarted(2, "masked", PARTIES))  # a stage of a protocol round shows by name
    assert set(statuses(dashboard).values()) == {"masked"}


def test_a_dashboard_whose_error_is_shown_below_says_so() -> None:
    widget = Dashboard(error_below=True)
    try:
        widget.handle(TrainingStarted(1, "fedavg", PARTIES))
        widget.handle(TrainingFinished(0, stopped=True, error="RoundError: round 1: only 0 of 3 parties replied"))
        assert widget.state == "error" and widget.error == "see the error below"
        assert "only 0 of 3" not in widget.summary_text() and "see the error below" in widget.summary_text()
    finally:
        widget.close()


def test_metrics_that_json_cannot_carry_become_none(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(1, "fedavg", PARTIES))
    dashboard.handle(RoundStarted(1, 1, PARTIES))
    dashboard.handle(PartyDone(1, "alpha", 10, {"loss": math.nan, "accuracy": math.inf}, 1.0))
    dashboard.handle(RoundAggregated(1, 1, {"loss": math.nan}, {"loss": "high", "accuracy": 0.5},
                                     {"alpha": {"loss": -math.inf}}, 1.0))
    assert (rows(dashboard)["alpha"]["loss"], rows(dashboard)["alpha"]["accuracy"]) == (None, None)
    assert dashboard.history[0]["loss"] is None and dashboard.history[0]["parties"]["alpha"]["loss"] is None
    json.dumps(dashboard.get_state(), allow_nan=False)  # the comm refuses NaN


def test_each_event_is_one_batch_of_state(dashboard: Dashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[set[str]] = []
    monkeypatch.setattr(dashboard, "send_state", lambda key=None: sent.append(set(key or ())))
    dashboard.handle(TrainingStarted(1, "fedavg", PARTIES))
    dashboard.handle(RoundStarted(1, 1, PARTIES))
    dashboard.handle(RoundAggregated(1, 1, {"loss": 0.5}, evaluation(1), party_evaluation(1), 1.0))
    assert len(sent) == 3
    assert {"state", "parties", "last_round", "started_at"} <= sent[0]
    assert {"history", "rounds_done", "eta"} <= sent[2]


def test_handle_from_many_threads_at_once_loses_nothing(dashboard: Dashboard) -> None:
    parties = tuple(f"party-{i}" for i in range(8))
    rounds = 25
    dashboard.handle(TrainingStarted(rounds, "fedavg", parties))
    dashboard.handle(RoundStarted(1, rounds, parties))
    start = threading.Barrier(len(parties) + 1)
    failures: list[BaseException] = []

    def party(index: int) -> None:
        name = parties[index]
        try:
            start.wait(timeout=10)
            for step in range(40):
                dashboard.handle(PartyStatus(name, "awaiting approval", f"step {step}"))
                dashboard.handle(PartyDone(1, name, 100 + index, {"loss": 1.0 / (index + 1)}, 0.1))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the test's thread
            failures.append(exc)

    def aggregator() -> None:
        try:
            start.wait(timeout=10)
            for round_ in range(1, rounds + 1):
                dashboard.handle(RoundAggregated(round_, rounds, {"loss": 0.5}, None, {}, 1.0))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=party, args=(i,)) for i in range(len(parties))]
    threads.append(threading.Thread(target=aggregator))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a read-modify-write without the lock would lose updates
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not failures and not any(thread.is_alive() for thread in threads)
    assert [row["name"] for row in dashboard.parties] == list(parties)
    for index, row in enumerate(dashboard.parties):
        assert (row["status"], row["examples"], row["loss"]) == ("done", 100 + index, pytest.approx(1.0 / (index + 1)))
    assert [h["round"] for h in dashboard.history] == list(range(1, rounds + 1))
    assert dashboard.rounds_done == rounds and dashboard.eta == 0.0


def test_the_stop_message_calls_on_stop_once_while_training() -> None:
    calls: list[str] = []
    widget = Dashboard(on_stop=lambda: calls.append("stop"))
    try:
        widget._handle_custom_msg({"type": "stop"}, [])
        assert calls == [] and widget.state == "idle"  # nothing to stop
        widget.handle(TrainingStarted(3, "fedavg", PARTIES))
        widget._handle_custom_msg({"type": "pause"}, [])
        assert calls == []
        widget._handle_custom_msg({"type": "stop"}, [])
        assert calls == ["stop"] and widget.state == "stopping"
        widget._handle_custom_msg({"type": "stop"}, [])
        assert calls == ["stop"]
        widget.handle(RoundAggregated(1, 3, {"loss": 0.5}, None, {}, 1.0))
        assert widget.state == "stopping"
        widget.handle(TrainingFinished(1, stopped=True))
        assert widget.state == "stopped"
    finally:
        widget.close()


def test_a_stop_that_ends_training_at_once_is_not_overwritten() -> None:
    widget = Dashboard()
    try:
        # on_stop may publish on the same thread (a federation between rounds): no deadlock,
        # and the final state wins over "stopping".
        widget._on_stop = lambda: widget.handle(TrainingFinished(0, stopped=True))
        widget.handle(TrainingStarted(3, "fedavg", PARTIES))
        widget._handle_custom_msg({"type": "stop"}, [])
        assert widget.state == "stopped"
    finally:
        widget.close()


class FakeFederation:
    """What attach() needs of a Federation: status() rows and subscribe()."""

    def __init__(self) -> None:
        from fednb.federation.federation import PartyInfo

        self.bus = EventBus()
        self.rows = [PartyInfo("alpha", "ipc://a", "online", 120, None, ""),
                     PartyInfo("beta", "ipc://b", "refused", None, None, "key not authorized"),
                     PartyInfo("gamma", "ipc://c", "online", 80, 3, "")]

    def status(self):
        return self.rows

    def subscribe(self, subscriber):
        return self.bus.subscribe(subscriber)


def test_attach_seeds_the_rows_and_follows_the_events(dashboard: Dashboard) -> None:
    federation = FakeFederation()
    unsubscribe = dashboard.attach(federation)
    assert dashboard.parties == [
        {"name": "alpha", "status": "waiting", "examples": 120, "loss": None, "accuracy": None, "seconds": None,
         "detail": ""},
        {"name": "beta", "status": "refused", "examples": None, "loss": None, "accuracy": None, "seconds": None,
         "detail": "key not authorized"},
        {"name": "gamma", "status": "waiting", "examples": 80, "loss": None, "accuracy": None, "seconds": None,
         "detail": ""},
    ]
    federation.bus.publish(TrainingStarted(2, "fedavg", ("alpha", "gamma")))
    assert dashboard.state == "training" and [r["name"] for r in dashboard.parties] == ["alpha", "gamma"]
    federation.bus.publish(PartyStatus("beta", "online"))  # not in this run
    assert [r["name"] for r in dashboard.parties] == ["alpha", "gamma"]
    unsubscribe()
    federation.bus.publish(RoundStarted(1, 2, ("alpha", "gamma")))
    assert dashboard.round == 0


def finished_run(widget: Dashboard) -> Dashboard:
    widget.handle(TrainingStarted(4, "fedavg", PARTIES))
    run_rounds(widget, 1, 4, 4, seconds=1.5)
    widget.handle(PartyDropped(4, "gamma", "went offline", late=False))
    widget.handle(TrainingFinished(4, stopped=False))
    return widget


def test_the_text_summary_has_the_numbers(dashboard: Dashboard) -> None:
    text = finished_run(dashboard).summary_text()
    assert text.startswith("digits: done")
    assert "4/4 rounds" in text and "strategy fedavg" in text
    assert "round 4 (test): accuracy 0.9000, loss 0.2500" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "done" in lines["alpha"] and "100" in lines["alpha"] and "0.2250" in lines["alpha"]
    assert "dropped" in lines["gamma"] and "went offline" in lines["gamma"]
    assert [line.split()[:2] for line in text.splitlines() if re.match(r"^[1-4]\s", line)] == \
        [["1", "0.6000"], ["2", "0.7000"], ["3", "0.8000"], ["4", "0.9000"]]


def test_the_summaries_escape_names_and_say_what_is_happening() -> None:
    widget = Dashboard(title="<i>run</i>")
    try:
        assert "waiting for training" in widget.summary_text()
        widget.handle(TrainingStarted(2, "fedavg", ("<b>x</b>", "ok")))
        widget.handle(RoundStarted(1, 2, ("<b>x</b>", "ok")))
        widget.handle(PartyDropped(1, "<b>x</b>", "said <script>alert(1)</script>"))
        page = widget.summary_html()
        assert "<b>" not in page and "<script>" not in page and "<i>" not in page
        assert "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;script&gt;" in page and "&lt;i&gt;run&lt;/i&gt;" in page
        assert "round 1 in progress" in widget.summary_text()
    finally:
        widget.close()


def test_the_html_summary_holds_the_same_numbers(dashboard: Dashboard) -> None:
    page = finished_run(dashboard).summary_html()
    assert page.startswith('<div class="fednb-dashboard-summary" data-state="done">') and page.endswith("</div>")
    assert page.count("<table") == 2 and "4/4 rounds" in page
    for number in ("0.6000", "0.9000", "0.2500", "1.5 s", ">100<", "went offline"):
        assert number in page


def test_the_mime_bundle_has_the_widget_and_the_summaries(dashboard: Dashboard) -> None:
    finished_run(dashboard)
    data, metadata = dashboard._repr_mimebundle_()
    assert data[WIDGET_VIEW]["model_id"] == dashboard.model_id
    assert data["text/plain"] == dashboard.summary_text()
    assert data["text/html"] == dashboard.summary_html()
    assert isinstance(metadata, dict)


def test_the_esm_is_self_contained() -> None:
    source = ESM.read_text(encoding="utf-8")
    assert Dashboard(title="x")._esm == source
    assert re.search(r"^export default \{ render \};?$", source, re.MULTILINE)
    assert re.search(r"^function render\(\{ model, el \}\)", source, re.MULTILINE)
    for forbidden in (r"\bimport\b", r"\brequire\s*\(", r"\bfetch\s*\(", "http", "//cdn", "unpkg", "jsdelivr"):
        assert not re.search(forbidden, source), forbidden
    for hook in ('"fednb-dashboard"', '"fednb-party"', 'class: "fednb-chart"', '"fednb-point"', '"fednb-stop"',
                 "dataset.party", '"data-round"'):
        assert hook in source, hook
    style = CSS.read_text(encoding="utf-8")
    assert "@import" not in style and "http" not in style and "url(" not in style


def test_the_esm_is_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed, so the ESM's syntax cannot be checked here")
    copy = tmp_path / "dashboard.mjs"  # node --check reads .js as CommonJS, where export is an error
    copy.write_text(ESM.read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run([node, "--check", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_population_of_thousands_is_summarised_with_a_loss_histogram_not_listed(dashboard: Dashboard) -> None:
    population = tuple(f"party-{k}" for k in range(5000))
    dashboard.handle(TrainingStarted(2, "fedavg", population))
    sampled = population[:40:2]
    for round_ in (1, 2):
        dashboard.handle(RoundStarted(round_, 2, sampled, population))
        for i, party in enumerate(sampled):
            if i == 7:
                dashboard.handle(PartyDropped(round_, party, "went offline", late=False))
            else:
                dashboard.handle(PartyDone(round_, party, 64, {"loss": 0.5 + i / 40, "accuracy": 0.7}, 0.1))
        if round_ == 1:
            summary = dict(dashboard.population)
        dashboard.handle(RoundAggregated(round_, 2, {"loss": 0.6, "accuracy": 0.7}, None, {}, 0.4))
    assert len(dashboard._run.parties) == 20  # rows for the round's parties, never the 5,000
    assert dashboard.parties == [] and all(entry["parties"] == {} for entry in dashboard.history)
    assert {k: summary[k] for k in ("parties", "available", "round", "sampled", "done", "dropped")} == {
        "parties": 5000, "available": 5000, "round": 1, "sampled": 20, "done": 19, "dropped": 1}
    losses = summary["losses"]
    assert sum(losses["counts"]) == 19 and len(losses["edges"]) == len(losses["counts"]) + 1
    assert losses["edges"][0] == pytest.approx(0.5) and losses["edges"][-1] == pytest.approx(0.5 + 19 / 40)
    assert "5000" in dashboard.summary_text() and "sampled" in dashboard.summary_text()
    dashboard.handle(PartyStatus("party-4000", "offline", "connection lost"))  # not this round's: counted only
    assert dashboard.parties == []


def test_a_run_that_ends_while_its_dashboard_is_being_shown_still_shows_the_final_summary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Parties that all fail at once end the run on the round loop's thread while the kernel's
    thread is still inside display(): the final summary must replace the one display() drew."""
    import IPython.display

    from fednb.notebook.session import Session

    federation = FakeFederation()
    federation.parties = [row.name for row in federation.rows]
    federation.stop = lambda **_: None
    updates: list[str] = []

    class Handle:
        def update(self, widget: Dashboard) -> None:
            updates.append(widget.state)

    def display(widget: Dashboard, *, display_id: bool) -> Handle:
        drawn = widget.state  # what the output shows: drawn before the run ends
        ended = threading.Thread(target=federation.bus.publish,
                                 args=(TrainingFinished(0, stopped=True, error="RuntimeError: no GPU here"),))
        ended.start()
        ended.join()
        assert drawn != widget.state == "error"
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    shell = type("Shell", (), {"kernel": object()})()
    session = Session(shell)
    follow = session._follow(federation, background=False)
    federation.bus.publish(TrainingStarted(1, "fedavg", ("alpha", "gamma")))
    follow(True)
    try:
        assert updates == ["error"] and "see the error below" in session.dashboard._repr_mimebundle_()[0]["text/plain"]
    finally:
        session.dashboard.close()
