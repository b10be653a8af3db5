"""Differential privacy in the notebook: the %fed_train DP flags, %fed_privacy, the dashboard's ε
column and warnings, the sidebar's budgets and the %fed_serve owner's ledger; no sockets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from fednb.federation.events import (EventBus, PartyDone, PrivacyUpdated, PrivacyWarning, RoundAggregated,
                                     RoundStarted, TrainingStarted)
from fednb.federation.federation import PartyInfo
from fednb.federation.history import History, PartyRound, RoundRecord
from fednb.federation.privacy import PartyPrivacy, PrivacyReport
from fednb.notebook.arguments import differential_privacy
from fednb.notebook.dashboard import Dashboard
from fednb.notebook.display import PrivacyView
from fednb.privacy.accountant import Mechanism
from fednb.privacy.dpfedavg import DPFedAvg
from fednb.privacy.dpsgd import DPSGD
from fednb.privacy.ledger import Ledger, ledger_path

ROOT = Path(__file__).resolve().parent.parent
ESM = ROOT / "fednb" / "notebook" / "dashboard.js"
APPROVALS_ESM = ROOT / "fednb" / "notebook" / "approvals.js"
PARTIES = ("alpha", "beta", "gamma")


def summary(spent: float, budget: float, epsilons: tuple[float, ...] = (), delta: float = 1e-5) -> dict[str, Any]:
    """A party's privacy summary as it reports it (the contract's dict)."""
    return {"epsilon_spent": spent, "epsilon_budget": budget, "epsilon_remaining": max(budget - spent, 0.0),
            "delta": delta,
            "history": [{"run": "r1", "round": i + 1, "mechanism": "dpsgd", "sampling_rate": 0.01,
                         "noise_multiplier": 1.1, "steps": 40, "epsilon_after": e, "time": "2026-12-01T10:00:00"}
                        for i, e in enumerate(epsilons)]}


# -- %fed_train's flags -------------------------------------------------------------------------------

def dp(**given: Any) -> Any:
    flags = {"noise": None, "epsilon": None, "clip": None, "delta": None, "fedavg": False, "adaptive": False,
             "count_stddev": None, "secure": False}
    return differential_privacy(**{**flags, **given})


def test_the_dp_flags_build_the_apis_settings() -> None:
    assert dp() is None
    assert dp(noise=1.1, clip=1.0) == DPSGD(noise_multiplier=1.1, max_grad_norm=1.0)
    assert dp(noise=0.8) == DPSGD(noise_multiplier=0.8)  # DP-SGD's own clip, 1.0
    assert dp(epsilon=3.0, clip=0.5, delta=1e-6) == DPSGD(target_epsilon=3.0, max_grad_norm=0.5, delta=1e-6)
    assert dp(fedavg=True, noise=1.0, clip=2.0) == DPFedAvg(clip=2.0, noise_multiplier=1.0, noise_at="coordinator")
    # under secure aggregation the coordinator sees only the sum: the parties add the noise
    assert dp(fedavg=True, noise=1.0, clip=2.0, secure=True).noise_at == "parties"
    adaptive = dp(fedavg=True, noise=1.0, clip=2.0, adaptive=True, count_stddev=0.8)
    assert adaptive.adaptive is True and adaptive.clipped_count_stddev == 0.8


@pytest.mark.parametrize("given, match", [
    ({"clip": 1.0}, r"^--dp-clip applies to differential privacy: add --dp-noise Z or --dp-epsilon E"),
    ({"delta": 1e-6}, r"^--dp-delta applies to differential privacy"),
    ({"noise": 1.0, "epsilon": 3.0}, r"^give one of --dp-noise and --dp-epsilon"),
    ({"adaptive": True, "noise": 1.0}, r"^--adaptive-clip applies to DP-FedAvg: add --dp-fedavg"),
    ({"count_stddev": 1.0, "epsilon": 3.0}, r"^--clipped-count-stddev applies to DP-FedAvg"),
    ({"fedavg": True, "noise": 1.0, "clip": 1.0, "adaptive": True, "count_stddev": 1.0, "secure": True},
     r"^--adaptive-clip needs each party's clipped bit, which --secure-aggregation hides"),
    ({"fedavg": True, "noise": 1.0}, r"^--dp-fedavg needs --dp-noise Z and --dp-clip C"),
    ({"fedavg": True, "clip": 1.0}, r"^--dp-fedavg needs --dp-noise Z and --dp-clip C"),
    ({"fedavg": True, "epsilon": 3.0, "clip": 1.0}, r"^--dp-epsilon calibrates DP-SGD's noise"),
    ({"fedavg": True, "noise": 1.0, "clip": 1.0, "adaptive": True}, r"^--adaptive-clip needs --clipped-count-stddev"),
    ({"fedavg": True, "noise": 1.0, "clip": 1.0, "count_stddev": 1.0}, r"^--clipped-count-stddev applies to adaptive"),
    ({"noise": -1.0}, r"^--dp-noise must be a finite number > 0, got -1\.0$"),
    ({"epsilon": 3.0, "clip": 0.0}, r"^--dp-clip must be a finite number > 0"),
    ({"epsilon": 3.0, "delta": 2.0}, r"^--dp-delta must be a number in \(0, 1\)"),
    ({"fedavg": True, "noise": 1.0, "clip": -2.0}, r"^--dp-clip must be a finite number > 0"),
    ({"fedavg": True, "noise": 1.0, "clip": 1.0, "adaptive": True, "count_stddev": 0.2},
     r"^--clipped-count-stddev = 0\.2 leaves no noise for the updates"),
])
def test_dp_flag_mistakes_are_one_line_usage_errors(given: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        dp(**given)
    assert "\n" not in str(info.value)


class Recorded:
    """What the magics handed to Session.start_training, instead of training."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, federation: Any, model: Any, name: str, options: dict[str, Any], *, background: bool) -> Any:
        self.calls.append(options)
        raise UsageError("recorded")  # the magic stops here, before waiting for a run


class PrivateFederation:
    """What %fed_train and %fed_privacy need of a federation: nothing for the first, privacy() for the second."""

    parties = list(PARTIES)

    def __init__(self, report: PrivacyReport) -> None:
        self.report = report

    def privacy(self) -> PrivacyReport:
        return self.report


def report() -> PrivacyReport:
    result = PrivacyReport()
    result["alpha"] = PartyPrivacy("alpha", 1.25, 3.0, 1.75, 1e-5,
                                   tuple(summary(1.25, 3.0, (0.5, 0.9, 1.25))["history"]))
    result["beta"] = PartyPrivacy("beta", 2.75, 3.0, 0.25, 1e-5, tuple(summary(2.75, 3.0, (1.5, 2.75))["history"]))
    result["gamma"] = PartyPrivacy("gamma", 0.0, None, None, None)
    return result


@pytest.fixture
def shell() -> Iterator[tuple[InteractiveShell, Recorded]]:
    ip = InteractiveShell()
    ip.run_line_magic("load_ext", "fednb")
    session = ip.magics_manager.registry["FedMagics"].session
    recorded = Recorded()
    session.start_training = recorded  # type: ignore[method-assign]
    session.federation = PrivateFederation(report())  # type: ignore[assignment]
    ip.run_cell("import torch\nmodel = torch.nn.Linear(4, 2)")
    try:
        yield ip, recorded
    finally:
        session.federation = None
        ip.run_line_magic("unload_ext", "fednb")


@pytest.mark.parametrize("line, expected", [
    ("--rounds 3", None),
    ("--rounds 3 --dp-noise 1.1 --dp-clip 1.0", DPSGD(noise_multiplier=1.1, max_grad_norm=1.0)),
    ("--dp-epsilon 3 --dp-delta 1e-6", DPSGD(target_epsilon=3.0, delta=1e-6)),
    ("--dp-fedavg --dp-noise 1.0 --dp-clip 0.5 --secure-aggregation",
     DPFedAvg(clip=0.5, noise_multiplier=1.0, noise_at="parties")),
    ("--dp-fedavg --dp-noise 1.0 --dp-clip 0.5 --adaptive-clip --clipped-count-stddev 1   # Andrew et al.",
     DPFedAvg(clip=0.5, noise_multiplier=1.0, adaptive=True, clipped_count_stddev=1.0)),
])
def test_fed_train_passes_dp_in_the_training_options(shell: tuple[InteractiveShell, Recorded], line: str,
                                                     expected: Any) -> None:
    ip, recorded = shell
    with pytest.raises(UsageError, match="recorded"):
        ip.run_line_magic("fed_train", line)
    (options,) = recorded.calls
    assert options["dp"] == expected
    assert options["rounds"] == (3 if "--rounds 3" in line else 10)


def test_fed_train_refuses_a_dp_mistake_before_training(shell: tuple[InteractiveShell, Recorded]) -> None:
    ip, recorded = shell
    with pytest.raises(UsageError, match="^--dp-clip applies to differential privacy") as info:
        ip.run_line_magic("fed_train", "--dp-clip 1.0")
    with pytest.raises(UsageError, match="^give one of --dp-noise and --dp-epsilon"):
        ip.run_line_magic("fed_train", "--dp-noise 1 --dp-epsilon 3")
    assert recorded.calls == [] and "\n" not in str(info.value)
    assert "--dp-epsilon" in type(ip.magics_manager.registry["FedMagics"]).fed_train.__doc__


# -- %fed_privacy -------------------------------------------------------------------------------------

def test_fed_privacy_shows_the_table_and_the_chart(shell: tuple[InteractiveShell, Recorded]) -> None:
    ip, _ = shell
    view = ip.run_line_magic("fed_privacy", "")
    assert isinstance(view, PrivacyView)
    text = repr(view)
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert lines["party"].split() == ["party", "ε", "spent", "budget", "remaining", "δ", "charges"]
    assert lines["alpha"].split() == ["alpha", "1.25", "3", "1.75", "1e-05", "3"]
    assert lines["beta"].split() == ["beta", "2.75", "3", "0.25", "1e-05", "2"]
    assert lines["gamma"].split() == ["gamma", "no", "budget", "0"]
    assert "ε after each charge:" in text and "alpha: 0.5, 0.9, 1.25 (budget 3)" in text
    assert "gamma:" not in text  # nothing charged there

    page = view._repr_html_()
    assert "<td>no budget</td>" in page and "<td>1.75</td>" in page
    points = re.findall(r'<circle class="fednb-privacy-point" data-party="(\w+)" data-charge="(\d+)" '
                        r'data-epsilon="([\d.]+)"', page)
    assert points == [("alpha", "1", "0.5"), ("alpha", "2", "0.9"), ("alpha", "3", "1.25"),
                      ("beta", "1", "1.5"), ("beta", "2", "2.75")]
    budgets = re.findall(r'class="fednb-privacy-budget" data-party="(\w+)"', page)
    assert budgets == ["alpha", "beta"]
    with pytest.raises(UsageError, match="takes no arguments"):
        ip.run_line_magic("fed_privacy", "alpha")


def test_the_privacy_view_escapes_names_and_says_when_nothing_was_charged() -> None:
    empty = PrivacyReport()
    empty["<b>x</b>"] = PartyPrivacy("<b>x</b>", 0.0, 2.0, 2.0, 1e-5)
    view = PrivacyView(empty)
    page = view._repr_html_()
    assert "<b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "no privacy charges yet" in page and "<svg" not in page
    assert "<b>x</b>  0" in repr(view) and "ε after each charge" not in repr(view)


def test_fed_privacy_without_a_federation_says_how_to_start_one() -> None:
    ip = InteractiveShell()
    try:
        ip.run_line_magic("load_ext", "fednb")
        with pytest.raises(UsageError, match="%fed_sim"):
            ip.run_line_magic("fed_privacy", "")
    finally:
        ip.run_line_magic("unload_ext", "fednb")


# -- the dashboard ------------------------------------------------------------------------------------

@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    widget = Dashboard(title="digits")
    yield widget
    widget.close()


def test_privacy_updates_fill_the_epsilon_column(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(2, "fedavg", PARTIES))
    dashboard.handle(PrivacyUpdated("alpha", summary(1.2, 3.0, (0.6, 1.2))))
    dashboard.handle(PrivacyUpdated("beta", summary(2.8, 3.0, (2.8,))))
    assert dashboard.privacy["alpha"] == {"spent": 1.2, "budget": 3.0, "remaining": pytest.approx(1.8),
                                          "delta": 1e-5, "charges": 2}
    dashboard.handle(PrivacyUpdated("alpha", summary(1.9, 3.0, (0.6, 1.2, 1.9))))  # the next train reply
    assert dashboard.privacy["alpha"]["spent"] == 1.9 and dashboard.privacy["alpha"]["charges"] == 3
    json.dumps(dashboard.get_state(), allow_nan=False)
    text = dashboard.summary_text()
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "ε / budget" in lines["party"]
    assert "1.9 / 3" in lines["alpha"] and "2.8 / 3" in lines["beta"] and "no budget" in lines["gamma"]
    assert "<td>1.9 / 3</td>" in dashboard.summary_html()


def test_a_dashboard_without_budgets_has_no_epsilon_column(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(1, "fedavg", PARTIES))
    assert dashboard.privacy == {} and "budget" not in dashboard.summary_text()


def test_a_privacy_warning_is_a_visible_line_for_this_run(dashboard: Dashboard) -> None:
    dashboard.handle(TrainingStarted(5, "fedavg", PARTIES))
    warning = PrivacyWarning("beta", "this run would take ε to 3.4 of its budget 3; it will refuse that round",
                             3.4, 3.0)
    dashboard.handle(warning)
    dashboard.handle(warning)  # told twice, shown once
    assert dashboard.warnings == [{"party": "beta", "epsilon_after": 3.4, "epsilon_budget": 3.0,
                                   "message": "this run would take ε to 3.4 of its budget 3; it will refuse that round"}]
    assert "warning: beta: this run would take ε to 3.4 of its budget 3" in dashboard.summary_text()
    assert "warning: beta: this run would take" in dashboard.summary_html()
    dashboard.handle(TrainingStarted(5, "fedavg", PARTIES, first_round=6))  # a new run, its own warnings
    assert dashboard.warnings == []


class SecureFederation:
    """What attach() reads: status() rows (with privacy), subscribe(), and the history of rounds."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.history = History()
        self.rows = [PartyInfo("alpha", "ipc://a", "online", 120, None, "", privacy=summary(0.5, 3.0, (0.5,))),
                     PartyInfo("beta", "ipc://b", "online", 80, None, "")]

    def status(self) -> list[PartyInfo]:
        return self.rows

    def subscribe(self, subscriber: Any) -> Any:
        return self.bus.subscribe(subscriber)

    def aggregate(self, round_: int, secure: dict[str, Any]) -> None:
        """As the round loop does: the record goes into the history, then RoundAggregated is published."""
        parties = {p: PartyRound(10, {"loss": 0.5}, 1.0) for p in ("alpha", "beta")}
        self.history.append(RoundRecord(round_, parties, {}, {"loss": 0.5}, None, secure=secure))
        self.bus.publish(RoundAggregated(round_, 2, {"loss": 0.5}, None, {}, 1.0))


def test_attach_seeds_the_budgets_and_shows_the_secure_badge(dashboard: Dashboard) -> None:
    federation = SecureFederation()
    unsubscribe = dashboard.attach(federation)
    assert dashboard.privacy == {"alpha": {"spent": 0.5, "budget": 3.0, "remaining": 2.5, "delta": 1e-5,
                                           "charges": 1}}
    federation.bus.publish(TrainingStarted(2, "fedavg", ("alpha", "beta")))
    federation.bus.publish(RoundStarted(1, 2, ("alpha", "beta")))
    for party in ("alpha", "beta"):
        federation.bus.publish(PartyDone(1, party, 10, {"loss": 0.5}, 1.0))
    federation.aggregate(1, {"parties": 2, "sum of": "sum of 2 parties"})
    assert dashboard.secure == "sum of 2 parties"
    assert "secure aggregation: the coordinator saw the sum of 2 parties" in dashboard.summary_text()
    federation.bus.publish(RoundStarted(2, 2, ("alpha", "beta")))
    federation.aggregate(2, {})  # a plain round: no badge
    assert dashboard.secure == ""
    unsubscribe()


def test_the_esm_draws_the_privacy_state() -> None:
    source = ESM.read_text(encoding="utf-8")
    for hook in ('"privacy"', '"warnings"', '"secure"', '"fednb-epsilon"', '"fednb-budget-fill"', '"fednb-warning"',
                 '"fednb-secure"', "no budget"):
        assert hook in source, hook
    style = (ESM.with_name("dashboard.css")).read_text(encoding="utf-8")
    assert ".fednb-budget-fill" in style and ".fednb-warning" in style


# -- the JupyterLab sidebar ---------------------------------------------------------------------------

def test_the_sidebar_rows_carry_each_partys_budget() -> None:
    from fednb.notebook.sidebar_state import party_rows, secure_badge, snapshot

    status = [PartyInfo("alpha", "ipc://a", "online", 120, 2, "", privacy=summary(1.5, 3.0, (1.0, 1.5))),
              PartyInfo("beta", "ipc://b", "online", 80, 2, "")]
    rows = party_rows(status, {}, {})
    assert rows[0]["privacy"] == {"epsilon_spent": 1.5, "epsilon_budget": 3.0, "epsilon_remaining": 1.5,
                                  "delta": 1e-5, "charges": 2}
    assert rows[1]["privacy"] is None
    history = History()
    assert secure_badge(history, 0) is None
    history.append(RoundRecord(1, {}, {}, {}, None, secure={"sum of": "sum of 4 parties"}))
    assert secure_badge(history, 1) == "sum of 4 parties"
    assert secure_badge(history, 0) is None  # this run has aggregated nothing yet: the record is an earlier run's
    history.append(RoundRecord(2, {}, {}, {}, None))
    assert secure_badge(history, 2) is None
    json.dumps(snapshot(1, parties=rows, run=None, background=False, approvals=None), allow_nan=False)


def test_the_sidebar_snapshot_has_the_budgets_and_the_badge() -> None:
    from fednb.notebook.session import Session
    from fednb.notebook.sidebar import SidebarBridge

    class Manager:
        def register_target(self, *args: Any) -> None: ...
        def unregister_target(self, *args: Any) -> None: ...

    class Comm:
        def on_msg(self, callback: Any) -> None: ...
        def on_close(self, callback: Any) -> None: ...
        def close(self) -> None: ...

    federation = SecureFederation()
    session = Session(shell=None)
    session.federation = federation  # type: ignore[assignment]
    bridge = SidebarBridge(session, Manager(), lambda **kw: Comm())
    bridge.start()
    try:
        federation.bus.publish(TrainingStarted(1, "fedavg", ("alpha", "beta")))
        federation.bus.publish(RoundStarted(1, 1, ("alpha", "beta")))
        federation.aggregate(1, {"sum of": "sum of 2 parties"})
        message = bridge._snapshot(7)
    finally:
        bridge.close()
    parties = {row["name"]: row for row in message["federation"]["parties"]}
    assert parties["alpha"]["privacy"]["epsilon_spent"] == 0.5 and parties["beta"]["privacy"] is None
    assert message["run"]["secure"] == "sum of 2 parties" and message["run"]["rounds_done"] == 1
    json.dumps(message, allow_nan=False)


# -- the %fed_serve owner's ledger ----------------------------------------------------------------------

def party_directory(tmp_path: Path) -> Path:
    from fednb.party.directory import open_directory

    return open_directory(tmp_path / "clinic", create=True)


def test_the_approvals_widget_shows_the_owners_ledger(tmp_path: Path) -> None:
    from fednb.notebook.serve import ApprovalsWidget

    directory = party_directory(tmp_path)
    widget = ApprovalsWidget(directory, party="clinic", budget=True)
    try:
        assert widget.ledger == {"state": "none", "message": "no ledger yet"}
        assert "privacy ledger: no ledger yet" in widget.summary_text()

        ledger = Ledger(ledger_path(directory), 3.0, 1e-5)  # as the party opens it when it starts
        widget.refresh()
        assert widget.ledger["state"] == "ok" and widget.ledger["epsilon_spent"] == 0.0
        assert widget.ledger["epsilon_budget"] == 3.0 and widget.ledger["recent"] == []
        entry = ledger.charge(Mechanism("dpsgd", 0.02, 1.1, 200), coordinator="ab" * 16, run="run-1", round=1,
                              label="lab")
        ledger.charge(Mechanism("dpsgd", 0.02, 1.1, 200), coordinator="ab" * 16, run="run-1", round=2)
        widget.refresh()
        view = widget.ledger
        assert view["charges"] == 2 and view["epsilon_spent"] == pytest.approx(ledger.spent)
        assert view["epsilon_remaining"] == pytest.approx(3.0 - ledger.spent) and view["delta"] == 1e-5
        assert [r["round"] for r in view["recent"]] == [1, 2]
        assert view["recent"][0]["epsilon_after"] == pytest.approx(entry["epsilon_after"])
        assert view["recent"][0]["by"] == f"lab ({'ab' * 6})"
        text = widget.summary_text()
        assert f"privacy budget: ε {ledger.spent:.4g} spent of 3 (δ = 1e-05); ε {3.0 - ledger.spent:.4g} left" in text
        assert "dpsgd for lab" in text and "round 2" in text
        json.dumps(widget.get_state(), allow_nan=False)

        # an edited ledger is the problem shown, not a crash
        path = ledger_path(directory)
        path.write_text(path.read_text().replace('"round":2', '"round":3'))
        widget.refresh()
        assert widget.ledger["state"] == "error" and "privacy ledger" in widget.ledger["message"]
    finally:
        widget.close()


def test_a_party_without_a_budget_shows_no_ledger(tmp_path: Path) -> None:
    from fednb.notebook.serve import ApprovalsWidget

    widget = ApprovalsWidget(party_directory(tmp_path), party="clinic")
    try:
        assert widget.ledger == {} and "privacy" not in widget.summary_text()
    finally:
        widget.close()
    source = APPROVALS_ESM.read_text(encoding="utf-8")
    assert '"fednb-ledger"' in source and '"fednb-charge"' in source and '"ledger"' in source


def test_fed_serve_passes_the_budget_to_the_party(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import fednb.notebook.serve as serve

    calls: list[dict[str, Any]] = []

    class Server:
        def stop(self) -> None: ...

    def fake_serve(name: str, listen: str, data: dict[str, str], **options: Any) -> tuple[Any, Any]:
        calls.append(options)
        return Server(), "the widget"

    monkeypatch.setattr(serve, "serve_in_notebook", fake_serve)
    ip = InteractiveShell()
    try:
        ip.run_line_magic("load_ext", "fednb")
        base = f"--name clinic --listen ipc://{tmp_path}/c.sock --data train=x.npz --dir {tmp_path}/clinic"
        assert ip.run_line_magic("fed_serve", f"{base} --dp-epsilon 3 --dp-delta 1e-6") == "the widget"
        assert (calls[-1]["dp_epsilon"], calls[-1]["dp_delta"], calls[-1]["directory"]) == (3.0, 1e-6,
                                                                                           f"{tmp_path}/clinic")
        ip.run_line_magic("fed_serve", f"{base} --dp-epsilon 1")
        assert calls[-1]["dp_epsilon"] == 1.0 and "dp_delta" not in calls[-1]  # the party's default δ
        ip.run_line_magic("fed_serve", base)
        assert "dp_epsilon" not in calls[-1]
        with pytest.raises(UsageError, match="^--dp-delta applies to a privacy budget: add --dp-epsilon E$"):
            ip.run_line_magic("fed_serve", f"{base} --dp-delta 1e-6")
        assert len(calls) == 3
    finally:
        ip.run_line_magic("unload_ext", "fednb")


# -- through real party processes ------------------------------------------------------------------------

def test_budgets_through_the_magics_the_dashboard_and_the_sidebar_rows() -> None:
    """%fed_sim with budgets, %fed_train with DP-SGD and then DP-FedAvg under secure aggregation:
    %fed_privacy, a dashboard attached to the federation and the sidebar's rows show what the parties spent."""
    from fednb.notebook.sidebar_state import party_rows

    ip = InteractiveShell()
    widget = Dashboard()
    try:
        ip.run_line_magic("load_ext", "fednb")
        ip.run_line_magic("fed_sim", "3 --dataset digits --partition iid --seed 2 --dp-epsilon 50")
        fed = ip.user_ns["fed"]
        ip.run_cell_magic("fed_model", "", "import torch.nn as nn\n"
                          "model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))")
        unsubscribe = widget.attach(fed)
        assert {name: (row["spent"], row["budget"]) for name, row in widget.privacy.items()} == \
            dict.fromkeys(fed.parties, (0.0, 50.0))  # from status() at attach time

        ip.run_line_magic("fed_train", "--rounds 2 --dp-noise 1.1 --dp-clip 1.0")
        view = ip.run_line_magic("fed_privacy", "")
        report = fed.privacy()
        for party, entry in report.items():
            assert entry.epsilon_budget == 50.0 and len(entry.history) == 2 and entry.epsilon_spent > 0
            line = next(line for line in repr(view).splitlines() if line.startswith(party + " "))
            assert line.split() == [party, f"{entry.epsilon_spent:.4g}", "50", f"{entry.epsilon_remaining:.4g}",
                                    "1e-05", "2"]
            assert widget.privacy[party]["spent"] == pytest.approx(entry.epsilon_spent)  # from PrivacyUpdated
            assert widget.privacy[party]["charges"] == 2
        assert view._repr_html_().count('class="fednb-privacy-point"') == 6

        ip.run_line_magic("fed_train", "--rounds 1 --secure-aggregation --dp-fedavg --dp-noise 2 --dp-clip 1")
        assert widget.secure == "sum of 3 parties"
        rows = party_rows(fed.status(), {}, {})
        for row in rows:
            spent = fed.privacy()[row["name"]].epsilon_spent
            assert row["privacy"]["epsilon_spent"] == pytest.approx(spent) and row["privacy"]["charges"] == 3
        assert fed.history[-1].secure["sum of"] == "sum of 3 parties"

        # a run that would exhaust the budgets: warned before round 1, then refused by every party
        spent = {party: entry.epsilon_spent for party, entry in fed.privacy().items()}
        with pytest.raises(UsageError, match="budget") as info:
            ip.run_line_magic("fed_train", "--rounds 1 --dp-noise 0.1")
        assert "\n" not in str(info.value)
        assert sorted(w["party"] for w in widget.warnings) == sorted(fed.parties)
        assert all(w["epsilon_after"] > 50 and w["epsilon_budget"] == 50 for w in widget.warnings)
        assert "warning: party-0: this run would take ε to" in widget.summary_text()
        assert {party: entry.epsilon_spent for party, entry in fed.privacy().items()} == spent  # nothing charged
        unsubscribe()
    finally:
        widget.close()
        ip.run_line_magic("unload_ext", "fednb")


# -- the ESMs drawn in Chromium ------------------------------------------------------------------------

# Renders an anywidget ESM into the page with a model that holds the given traits, as anywidget does.
RENDER = """async ([source, state]) => {
    const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
    const module = await import(url);
    const model = { get: (name) => state[name], on: () => undefined, off: () => undefined, send: () => undefined };
    const el = document.createElement("div");
    document.body.append(el);
    module.default.render({ model, el });
}"""


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (Playwright's sync API allows one at a time)."""
    import importlib.util

    from tests.jupyter_fixtures import CHROMIUM, chromium_context
    from tests.test_labextension import skip_or_fail

    if not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None:
        skip_or_fail("Chromium or playwright is missing: the ESMs cannot be drawn here")
    with chromium_context(tmp_path_factory.mktemp("chromium")) as context:
        yield context


@pytest.fixture(scope="module")
def page(chromium: Any) -> Iterator[Any]:
    tab = chromium.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    yield tab, problems
    tab.close()


def test_the_dashboard_draws_budgets_warnings_and_the_secure_badge(page: Any, dashboard: Dashboard) -> None:
    tab, problems = page
    dashboard.handle(TrainingStarted(3, "fedavg", PARTIES))
    dashboard.handle(PrivacyUpdated("alpha", summary(1.2, 3.0, (0.6, 1.2))))
    dashboard.handle(PrivacyUpdated("beta", summary(2.85, 3.0, (2.85,))))
    dashboard.handle(PrivacyWarning("beta", "this run would take ε to 3.4 of its budget 3", 3.4, 3.0))
    dashboard.secure = "sum of 3 parties"
    tab.set_content("<html><body></body></html>")
    tab.evaluate(RENDER, [ESM.read_text(encoding="utf-8"), dashboard.get_state()])
    cells = tab.eval_on_selector_all(
        "td.fednb-epsilon", "cells => cells.map(c => [c.dataset.party, c.innerText.trim(), "
        "c.querySelector('.fednb-budget-fill')?.style.width ?? null, "
        "c.querySelector('.fednb-budget-fill')?.classList.contains('fednb-budget-low') ?? null])")
    assert cells == [["alpha", "1.2 / 3", "40%", False], ["beta", "2.85 / 3", "95%", True],
                     ["gamma", "no budget", None, None]]
    assert tab.inner_text("th.fednb-epsilon-col") == "ε / budget"
    assert tab.inner_text("div.fednb-warning[data-party=beta]") == "⚠ beta: this run would take ε to 3.4 of its budget 3"
    assert tab.inner_text("span.fednb-secure") == "secure · sum of 3 parties"
    assert tab.get_attribute("td.fednb-epsilon[data-party=alpha]", "title") == \
        "ε 1.2 spent of 3, 1.8 left (δ = 1e-5); 2 charge(s)"
    assert problems == []


def test_the_approvals_widget_draws_the_ledger(page: Any, tmp_path: Path) -> None:
    from fednb.notebook.serve import ApprovalsWidget

    tab, problems = page
    directory = party_directory(tmp_path)
    ledger = Ledger(ledger_path(directory), 3.0, 1e-5)
    ledger.charge(Mechanism("dpsgd", 0.02, 1.1, 200), coordinator="cd" * 16, run="run-7", round=4)
    widget = ApprovalsWidget(directory, party="clinic", budget=True)
    try:
        tab.set_content("<html><body></body></html>")
        tab.evaluate(RENDER, [APPROVALS_ESM.read_text(encoding="utf-8"), widget.get_state()])
    finally:
        widget.close()
    assert tab.get_attribute("div.fednb-ledger", "data-state") == "ok"
    head = tab.inner_text("div.fednb-ledger-head")
    assert head == (f"privacy budget: ε {float(f'{ledger.spent:.4g}'):g} spent of 3 (δ = 1e-5), "
                    f"ε {float(f'{ledger.remaining:.4g}'):g} left")
    row = tab.eval_on_selector_all("tr.fednb-charge", "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
    assert len(row) == 1 and row[0][1:5] == ["cd" * 6, "run-7", "4", "dpsgd"]
    assert problems == []


# -- in JupyterLab: the sidebar's budgets and the dashboard's ε column --------------------------------

LAB_CELLS = [
    "%load_ext fednb",
    "%fed_sim 3 --seed 0 --dp-epsilon 20",
    "%%fed_model\nimport torch.nn as nn\nmodel = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))",
    "%fed_train --rounds 2 --dp-noise 1.1 --dp-clip 1.0 --secure-aggregation",
]


def test_jupyterlab_shows_each_partys_budget_in_the_sidebar_and_the_dashboard(chromium: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from tests.jupyter_fixtures import jupyter_lab, leftovers
    from tests.test_labextension import skip_or_fail

    from tests.test_labextension_browser import PANEL, SECONDS, command, notebook, open_notebook, run_cell

    root = tmp_path / "notebooks"
    root.mkdir()
    notebook(root / "fed.ipynb", LAB_CELLS)
    built = ROOT / "fednb" / "labextension"
    if (built / "package.json").exists():
        # the extension built from this checkout (`jlpm build:prod`), ahead of the copy that
        # `pip install` put in the environment: the private data dir comes first on the path
        extensions = tmp_path / "jupyter" / "data" / "labextensions"
        extensions.mkdir(parents=True)
        (extensions / "fednb-labextension").symlink_to(built, target_is_directory=True)
    console: list[str] = []
    with jupyter_lab(root, tmp_path / "jupyter") as lab:
        page = chromium.new_page()
        page.set_default_timeout(SECONDS)
        expect.set_options(timeout=SECONDS)
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                and "fednb" in m.text else None)
        page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
        page.goto(f"{lab.url}/lab?token={lab.token}&reset")
        page.wait_for_function("async () => { await window.jupyterapp?.restored; return !!window.jupyterapp; }")
        if not page.evaluate("() => window.jupyterapp.hasPlugin('fednb-labextension:plugin')"):
            skip_or_fail("JupyterLab has no fednb extension: `pip install -e .` builds and installs it")
        open_notebook(page, "fed.ipynb")
        command(page, "fednb:show-federation-panel")
        panel = page.locator(PANEL)
        for index in range(len(LAB_CELLS)):
            run_cell(page, index)
        budgets = panel.locator(".fednb-Panel-budget")
        expect(budgets).to_have_count(3)
        for party in ("party-0", "party-1", "party-2"):
            budget = panel.locator(f".fednb-Panel-budget[data-party={party}]")
            line = budget.locator(".fednb-Panel-budgetText")
            expect(line).to_have_text(re.compile(r"^ε [\d.]+ / 20 · [\d.]+ left$"))
            # the line and its meter read in one go: a later round's charge may redraw both between two reads
            text, maximum, value = budget.evaluate(
                "el => [el.querySelector('.fednb-Panel-budgetText').textContent,"
                " el.querySelector('meter').getAttribute('max'), el.querySelector('meter').getAttribute('value')]")
            spent, left = map(float, re.findall(r"[\d.]+", text.replace("/ 20", "")))
            assert 0 < spent < 20 and spent + left == pytest.approx(20, abs=0.1)
            assert float(maximum) == 20
            assert float(value) == pytest.approx(spent, rel=0.01)
        expect(panel.locator(".fednb-Panel-secure")).to_have_text("secure · sum of 3 parties")

        dashboard = page.locator(".fednb-dashboard")
        expect(dashboard.locator("td.fednb-epsilon")).to_have_count(3)
        expect(dashboard.locator("td.fednb-epsilon[data-party=party-0] .fednb-budget-text")).to_have_text(
            re.compile(r"^[\d.]+ / 20$"))
        expect(dashboard.locator("span.fednb-secure")).to_have_text("secure · sum of 3 parties")
        assert dashboard.locator(".fednb-budget").first.bounding_box()["height"] > 0  # the stylesheet draws it
        page.screenshot(path=str(tmp_path / "privacy.png"))
        page.close()
    assert console == [], "\n".join(console)
    left = {pid: command for pid, command in leftovers().items() if "jupyter" in command or "ipykernel" in command}
    assert not left, f"jupyter-lab or a kernel outlived the test: {left}"  # the module's Chromium goes on


def test_a_party_served_in_the_notebook_shows_its_owner_what_training_spent(tmp_path: Path, private_dir: Path,
                                                                              digits_parts: Any) -> None:
    """serve_in_notebook with a budget: the PartyServer keeps the ledger, the widget reads it as it grows."""
    import numpy as np

    import fednb
    from fednb.notebook.serve import serve_in_notebook
    from tests.conftest import MLP, build

    npz = tmp_path / "clinic.npz"
    np.savez(npz, x=digits_parts[0].x_train, y=digits_parts[0].y_train)
    endpoint = f"ipc://{private_dir}/clinic.sock"
    server, widget = serve_in_notebook("clinic", endpoint, {"train": str(npz)}, policy="open",
                                       directory=tmp_path / "clinic", dp_epsilon=2.0, dp_delta=1e-6)
    try:
        assert widget.ledger["state"] == "ok" and widget.ledger["charges"] == 0
        assert (widget.ledger["epsilon_budget"], widget.ledger["delta"]) == (2.0, 1e-6)
        with fednb.connect([{"name": "clinic", "endpoint": endpoint}]) as fed:
            fed.train(build(), MLP, rounds=1, batch_size=32, dp=fednb.DPSGD(noise_multiplier=1.5, delta=1e-6),
                      evaluate_every=0)
            reported = fed.privacy()["clinic"]
        widget.refresh()
        view = widget.ledger
        assert view["charges"] == 1 and view["epsilon_spent"] == pytest.approx(reported.epsilon_spent)
        assert view["recent"][0]["mechanism"] == "dpsgd" and view["recent"][0]["round"] == 1
        assert f"privacy budget: ε {reported.epsilon_spent:.4g} spent of 2 (δ = 1e-06)" in widget.summary_text()
    finally:
        server.stop()
        widget.close()
