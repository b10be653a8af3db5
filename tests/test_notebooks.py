"""The walk-through notebooks, run top to bottom by nbclient on a fresh kernel of this venv.

Each notebook runs once per module (a few tens of seconds); the tests then read what it
left: the dashboards' final synced state (stored by nbclient as widget state), the widget
updates the kernel sent while each training cell was still running, and the cells' outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.jupyter_fixtures import (NOTEBOOKS, RecordingClient, cell_errors, dashboards,
                                    execute_notebook, leftovers, stop_pids)

PARTIES = [f"party-{i}" for i in range(4)]
BUDGET_SECONDS = 120  # the bound for one notebook, top to bottom, on this 2-core machine


@dataclass
class Executed:
    nb: Any
    client: RecordingClient
    seconds: float
    base: Path  # the run's private Jupyter folders (kernel connection file, IPython profile)

    def cell(self, startswith: str) -> tuple[int, Any]:
        """The one code cell whose source starts with ``startswith``."""
        found = [(i, c) for i, c in enumerate(self.nb.cells)
                 if c.cell_type == "code" and c.source.lstrip().startswith(startswith)]
        assert len(found) == 1, f"expected one cell starting with {startswith!r}, found {len(found)}"
        return found[0]

    def slowest(self) -> str:
        """The three slowest cells, for a failure message."""
        times = sorted(self.client.record.cell_seconds.items(), key=lambda item: -item[1])[:3]
        return ", ".join(f"cell {i}: {seconds:.1f} s" for i, seconds in times)

    def outputs(self, startswith: str, mime: str) -> list[Any]:
        _, cell = self.cell(startswith)
        return [o["data"][mime] for o in cell.outputs if mime in o.get("data", {})]


def run(name: str, base: Path) -> Executed:
    started = time.monotonic()
    nb, client = execute_notebook(NOTEBOOKS / name, base, timeout=BUDGET_SECONDS)
    return Executed(nb, client, time.monotonic() - started, base)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    return run("quickstart.ipynb", tmp_path_factory.mktemp("quickstart"))


@pytest.fixture(scope="module")
def non_iid(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    return run("non-iid.ipynb", tmp_path_factory.mktemp("non-iid"))


@pytest.fixture(scope="module")
def privacy(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    return run("privacy.ipynb", tmp_path_factory.mktemp("privacy"))


def assert_finished(state: dict[str, Any], first: int, last: int, min_accuracy: float) -> None:
    """A dashboard that saw a whole run: every round, one done row per party, good accuracy."""
    assert state["state"] == "done", state.get("error")
    assert (state["first_round"], state["last_round"]) == (first, last)
    assert state["rounds_done"] == last - first + 1
    assert [entry["round"] for entry in state["history"]] == list(range(first, last + 1))
    assert sorted(row["name"] for row in state["parties"]) == PARTIES
    assert {row["status"] for row in state["parties"]} == {"done"}
    assert all(row["examples"] > 0 for row in state["parties"])
    final = state["history"][-1]
    assert final["evaluated"] and sorted(final["parties"]) == PARTIES
    assert final["accuracy"] >= min_accuracy, f"global test accuracy {final['accuracy']:.3f} < {min_accuracy}"


def assert_live(executed: Executed, cell: int, model_id: str, rounds: int) -> None:
    """The dashboard changed round by round while the cell ran, not only once at the end.

    Times are the kernel's own message timestamps: each update's against the execute reply
    that ended the cell.
    """
    record = executed.client.record
    finished = record.cell_finished[cell]
    updates = [u for u in record.updates if u.comm_id == model_id]
    assert updates and all(u.cell == cell for u in updates)
    progress = [(u.sent, u.state["rounds_done"]) for u in updates if "rounds_done" in u.state]
    assert [done for _, done in progress] == sorted(done for _, done in progress), "rounds went backwards"
    partial = [sent for sent, done in progress if 0 < done < rounds]
    assert partial, "the dashboard showed no round until the run was over"
    completed = min(sent for sent, done in progress if done == rounds)
    assert partial[0] < completed < finished
    # The chart's data grew with the rounds, and parties were shown at work mid-run.
    assert any(0 < len(u.state["history"]) < rounds for u in updates if "history" in u.state)
    assert any(row["status"] == "training" for u in updates if "parties" in u.state and u.sent < completed
               for row in u.state["parties"]), "no party was ever shown training"
    states = [u.state["state"] for u in updates if "state" in u.state]
    assert states[0] == "training" and states[-1] == "done"


# -- both notebooks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["quickstart.ipynb", "non-iid.ipynb", "privacy.ipynb"])
def test_notebook_is_stored_with_outputs_cleared(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "widgets" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert sum(cell.cell_type == "markdown" for cell in nb.cells) >= len(code) // 2, "explain the steps"


# -- quickstart -----------------------------------------------------------------------------------

def test_quickstart_runs_top_to_bottom_within_budget(quickstart: Executed) -> None:
    assert not cell_errors(quickstart.nb)
    assert quickstart.seconds < BUDGET_SECONDS, quickstart.slowest()
    assert all(cell.execution_count for cell in quickstart.nb.cells if cell.cell_type == "code")


def test_quickstart_dashboards_end_with_every_round_and_party(quickstart: Executed) -> None:
    builtin, _ = quickstart.cell("%fed_train")
    custom, _ = quickstart.cell("%%fed_train")
    shown = {cell: state for cell, _, state in dashboards(quickstart.nb)}
    assert sorted(shown) == [builtin, custom]
    assert_finished(shown[builtin], first=1, last=10, min_accuracy=0.85)
    # The custom FedProx step continues from the global weights for rounds 11-15, and its
    # report(loss=…, accuracy=…) reaches the per-party rows.
    assert_finished(shown[custom], first=11, last=15, min_accuracy=0.85)
    assert shown[custom]["strategy"].lower().startswith("fedprox")
    assert all(row["loss"] is not None and 0 <= row["accuracy"] <= 1 for row in shown[custom]["parties"])
    # Front ends without widgets (nbconvert, papermill, GitHub) show the stored summary: the final one.
    for source in ("%fed_train", "%%fed_train"):
        [static] = quickstart.outputs(source, "text/html")
        [text] = quickstart.outputs(source, "text/plain")
        assert 'data-state="done"' in static and all(party in static for party in PARTIES)
        assert "waiting for training" not in text and "party-3" in text


def test_quickstart_dashboards_update_while_training_runs(quickstart: Executed) -> None:
    for cell, model_id, state in dashboards(quickstart.nb):
        assert_live(quickstart, cell, model_id, rounds=state["rounds_done"])


def test_quickstart_history_evaluation_and_label_exploration(quickstart: Executed) -> None:
    [frame] = quickstart.outputs("history = fed.history.to_frame()", "text/html")
    assert "eval_accuracy" in frame and frame.split("<tbody>")[1].count("<tr") == 10  # one row per round
    [evaluation] = quickstart.outputs("%fed_eval", "text/plain")
    assert all(party in evaluation for party in [*PARTIES, "(global)"])
    [per_party] = quickstart.outputs("%%fed_run", "text/html")
    assert all(f'data-party="{party}"' in per_party for party in PARTIES)
    assert len(quickstart.outputs("import matplotlib", "image/png")) == 1
    _, close = quickstart.cell("%fed_close")
    assert "federation closed" in "".join(o.get("text", "") for o in close.outputs)


# -- non-IID comparison ---------------------------------------------------------------------------

def test_non_iid_trains_three_splits_within_budget(non_iid: Executed) -> None:
    assert not cell_errors(non_iid.nb)
    assert non_iid.seconds < BUDGET_SECONDS, non_iid.slowest()
    shown = dashboards(non_iid.nb)
    assert len(shown) == 4
    for (cell, model_id, state), floor in zip(shown[:3], [0.9, 0.85, 0.6]):
        assert_finished(state, first=1, last=20, min_accuracy=floor)
        assert_live(non_iid, cell, model_id, rounds=20)


def test_non_iid_a_thousand_pooled_parties_train_sampled_and_are_summarised(non_iid: Executed) -> None:
    _, sim = non_iid.cell("%fed_sim 1000 --backend pool")
    table = "".join(o.get("data", {}).get("text/plain", "") for o in sim.outputs)
    assert table.count("ipc://") == 2 and "500" in table  # two workers, 500 parties each
    cell, _, state = dashboards(non_iid.nb)[3]
    assert state["state"] == "done" and state["rounds_done"] == 8
    assert state["parties"] == [] and all(entry["parties"] == {} for entry in state["history"])
    population = state["population"]
    assert population["parties"] == 1000 and population["sampled"] == 50 and population["done"] == 50
    assert sum(population["losses"]["counts"]) == 50
    assert state["history"][-1]["accuracy"] > 0.5


def test_non_iid_skew_costs_accuracy_as_the_notebook_says(non_iid: Executed) -> None:
    curves = {}
    for cell, _, state in dashboards(non_iid.nb)[:3]:
        name = non_iid.nb.cells[cell].source.split('keep("')[1].split('"')[0]
        curves[name] = [entry["accuracy"] for entry in state["history"]]
    assert list(curves) == ["IID", "Dirichlet α = 1.0", "Dirichlet α = 0.1"]
    mean = {name: sum(curve) / len(curve) for name, curve in curves.items()}
    # "with α = 0.1 ... the global curve climbs slowly": less accuracy over the run than IID.
    assert mean["Dirichlet α = 0.1"] < mean["IID"]
    assert curves["Dirichlet α = 0.1"][0] < curves["IID"][0]
    # The label and accuracy figures, and the summary table, are all there.
    assert len(non_iid.outputs("import matplotlib", "image/png")) == 1
    assert len(non_iid.outputs("fig, axes = plt.subplots(1, 3, figsize=(13, 3.6)", "image/png")) == 1
    [summary] = non_iid.outputs("fig, axes = plt.subplots(1, 3, figsize=(13, 3.6)", "text/html")
    assert "final accuracy" in summary and "worst party, final" in summary


# -- differential privacy -------------------------------------------------------------------------

def _text(executed: Executed, startswith: str) -> str:
    _, cell = executed.cell(startswith)
    return "".join(o.get("text", "") for o in cell.outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in cell.outputs)


def test_privacy_accuracy_grows_with_epsilon_and_budgets_are_enforced(privacy: Executed) -> None:
    assert not cell_errors(privacy.nb)
    assert privacy.seconds < BUDGET_SECONDS, privacy.slowest()
    sweep = _text(privacy, "import fednb\n\naccuracy = {}")
    accuracy = {line.split(":")[0].split("=")[1].strip(): float(line.split("accuracy ")[1].split()[0])
                for line in sweep.splitlines() if line.startswith("ε =")}
    assert list(accuracy) == ["1.0", "3.0", "8.0", "inf"], sweep
    assert accuracy["1.0"] < accuracy["inf"] and accuracy["8.0"] > 0.8 and accuracy["inf"] > 0.9, accuracy
    assert len(privacy.outputs("import matplotlib", "image/png")) == 1
    # DP-FedAvg under secure aggregation: the coordinator saw the sum of the four
    assert "sum of 4 parties" in _text(privacy, "record = fed.history[-1]")
    # the owners' budgets: spent after the first run, then refused with the numbers
    refused = _text(privacy, "try:\n    fed.train(model, dp=fednb.DPSGD(target_epsilon=3.0)")
    assert "privacy budget exceeded" in refused and "ε left" in refused, refused
    plain = _text(privacy, "try:\n    fed.train(model, rounds=1)")
    assert "trains only with differential privacy" in plain, plain
    shown = [c for c in privacy.nb.cells if c.cell_type == "code" and c.source.strip() == "%fed_privacy"]
    assert len(shown) == 2
    budgets = "".join(o.get("data", {}).get("text/plain", "") for o in shown[1].outputs)
    assert all(party in budgets for party in PARTIES) and "4" in budgets, budgets


def test_no_kernel_left_behind(quickstart: Executed, non_iid: Executed, privacy: Executed) -> None:
    # The notebooks ran in this module; conftest's session fixture checks the party processes.
    stray = leftovers(quickstart.base, non_iid.base, privacy.base)
    stop_pids(stray)
    assert not stray, f"a kernel outlived its notebook: {stray}"
