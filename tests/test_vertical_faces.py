"""Vertical learning's notebook faces: %fed_sim --data, %fed_align, %fed_vtrain, %fed_veval, the live view, the notebook.

The magics run in a real IPython shell against simulated parties on FATE's ``breast_hetero``
tables; the view is fed events without a federation and drawn in Chromium; and
``notebooks/vertical.ipynb`` runs top to bottom on a fresh kernel, as tests/test_notebooks.py
runs the others.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from fednb.federation.events import VerticalProgress
from fednb.notebook.vertical_view import VerticalDashboard, VerticalLines, metrics_table
from tests.jupyter_fixtures import (CHROMIUM, NOTEBOOKS, ROOT, WIDGET_VIEW, RecordingClient, cell_errors, chromium_context,
                                    execute_notebook, leftovers, stop_pids, widget_state)
from tests.test_notebooks import test_notebook_is_stored_with_outputs_cleared as stored_with_outputs_cleared

FATE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"
GUEST, HOST = FATE / "breast_hetero_guest.csv", FATE / "breast_hetero_host.csv"
ROLES = {"bank": "label", "partner": "features"}
BUDGET_SECONDS = 120  # the bound for one notebook, top to bottom, on the 2-core machine
needs_fate = pytest.mark.skipif(not GUEST.is_file(), reason=f"FATE's tables are not at {FATE}")


def one_line(call: Any, match: str) -> str:
    with pytest.raises(UsageError, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# -- the magics against simulated parties -----------------------------------------------------------

@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    """One shell for the module: the bank and the partner simulated on their own tables, aligned."""
    if not GUEST.is_file():
        pytest.skip(f"FATE's tables are not at {FATE}")
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fednb")
    try:
        shell.run_line_magic("fed_sim", f"--data bank={GUEST} --data partner={HOST} --id-column id --label y")
        yield shell
    finally:
        shell.run_line_magic("fed_close", "")
        InteractiveShell.clear_instance()


@needs_fate
def test_fed_sim_data_starts_one_party_per_table(ip: InteractiveShell) -> None:
    fed = ip.user_ns["fed"]
    assert fed.parties == ["bank", "partner"]
    assert {row.name: row.examples for row in fed.status()} == {"bank": 569, "partner": 569}


@needs_fate
def test_fed_align_binds_vfl_and_shows_each_partys_role_and_size(ip: InteractiveShell, capsys: Any) -> None:
    table = ip.run_line_magic("fed_align", "--id-column id --label-party bank --test-fraction 0.2 --seed 0")
    out = capsys.readouterr().out
    assert re.search(r"vfl: 569 rows in common, found by private set intersection in [\d.]+ s; train 455, test 114",
                     out), out
    vfl = ip.user_ns["vfl"]
    assert (vfl.size, vfl.roles, vfl.splits) == (569, ROLES, {"train": 455, "test": 114})
    assert repr(table).splitlines() == ["party    role      table rows  aligned rows",
                                        "bank     label     569         569",
                                        "partner  features  569         569"]
    assert "<td>features</td>" in table._repr_html_()


@needs_fate
def test_fed_vtrain_trains_under_encryption_binds_vmodel_and_fed_veval_scores_it(ip: InteractiveShell,
                                                                               capsys: Any) -> None:
    ip.run_line_magic("fed_align", "--label-party bank")
    capsys.readouterr()
    ip.run_line_magic("fed_vtrain", "logistic --epochs 3 --lr 0.15 --batch-size 240 --l2 0.01 --key-bits 1024")
    out = capsys.readouterr().out
    # a terminal gets one line per epoch, then where the model is and how it scores
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(",")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], out
    assert all(re.search(r"loss 0\.\d{4}, [\d.]+ s$", line) for line in epochs), epochs
    assert re.search(r"vmodel: hetero logistic regression, 3 epochs in [\d.]+ s .*; test AUC 0\.9\d{3}", out), out
    model = ip.user_ns["vmodel"]
    assert model.config.paillier.key_bits == 1024 and model.config.encrypted and len(model.losses) == 3
    assert {kind for kind, _, _ in model.view} == {"gradient", "loss"}  # all the coordinator decrypted
    table = ip.run_line_magic("fed_veval", "")
    header, row = repr(table).splitlines()
    assert header.split() == ["model", "test", "rows", "AUC", "accuracy", "KS", "log-loss"]
    values = row.split()
    assert values[:2] == ["vmodel", "114"] and float(values[2]) > 0.98, row
    assert float(values[2]) == pytest.approx(ip.user_ns["vfl"].evaluate(model)["auc"], abs=1e-4)


@needs_fate
def test_a_plaintext_baseline_and_one_vs_rest_in_a_simulation(ip: InteractiveShell, capsys: Any) -> None:
    ip.run_line_magic("fed_align", "--label-party bank")
    ip.run_line_magic("fed_vtrain", "logistic --epochs 2 --plaintext --optimizer rmsprop --name plain")
    plain = ip.user_ns["plain"]
    assert not plain.config.encrypted and plain.config.optimizer == "rmsprop"
    ip.run_line_magic("fed_vtrain", "logistic --epochs 1 --plaintext --classes 0,1 --name ovr")
    out = capsys.readouterr().out
    assert "class 0, epoch 1/1" in out and "class 1, epoch 1/1" in out and "2 one-vs-rest models" in out
    assert ip.user_ns["ovr"].classes == [0, 1]
    table = ip.run_line_magic("fed_veval", "--model ovr")
    assert repr(table).splitlines()[0].split() == ["model", "test", "rows", "AUC", "accuracy"]


@needs_fate
@pytest.mark.parametrize("magic, line, match", [
    ("fed_sim", "--data bank", "--data expects NAME=FILE"),
    ("fed_sim", f"--data a={GUEST} --data a={HOST}", "names party 'a' twice"),
    ("fed_sim", f"2 --data a={GUEST}", "leave out N"),
    ("fed_sim", f"--data a={GUEST} --dataset digits", "leave out N, --dataset"),
    ("fed_sim", "3 --id-column id", "--id-column and --label describe the tables of --data"),
    ("fed_sim", "", "give the number of parties"),
    ("fed_sim", "--data bank=/nonexistent/bank.csv --id-column id", "no such file"),
    ("fed_sim", f"--data bank={GUEST} --id-column y --label y", "both 'y'"),
    ("fed_align", "", "required: --label-party"),
    ("fed_align", "--label-party nobody", "--label-party must be one of the parties"),
    ("fed_align", "--label-party partner", "partner holds no label column"),
    ("fed_align", "--label-party bank --parties bank", "at least one feature party"),
    ("fed_align", "--label-party bank --parties bank,nobody", "unknown parties"),
    ("fed_align", "--label-party bank --test-fraction 1", "--test-fraction must lie in"),
    ("fed_vtrain", "", "required: algorithm"),
    ("fed_vtrain", "boost", "invalid choice: 'boost'"),
    ("fed_vtrain", "logistic --epochs 0", "--epochs must be a positive integer"),
    ("fed_vtrain", "logistic --batch-size 0", "--batch-size must be a positive integer"),
    ("fed_vtrain", "logistic --lr -1", "--lr must be a finite number above 0"),
    ("fed_vtrain", "logistic --l2 -0.5", "--l2: at least 0"),
    ("fed_vtrain", "logistic --optimizer adam", "--optimizer must be 'sgd' or 'rmsprop'"),
    ("fed_vtrain", "logistic --key-bits 512", r"--key-bits must be one of \(1024, 2048, 3072\)"),
    ("fed_vtrain", "logistic --classes 1", "at least two distinct"),
    ("fed_vtrain", "logistic --classes a,b", "integer class labels"),
    ("fed_vtrain", "logistic --name 9x", "variable name"),
    ("fed_vtrain", "logistic --epochs", "expected one argument"),
    ("fed_veval", "--model missing", "no vertical model named `missing`"),
    ("fed_veval", "now", "unrecognized arguments: now"),
])
def test_user_errors_are_one_line_usage_errors(ip: InteractiveShell, magic: str, line: str, match: str) -> None:
    if "vfl" not in ip.user_ns:
        ip.run_line_magic("fed_align", "--label-party bank")
    fed = ip.user_ns["fed"]
    one_line(lambda: ip.run_line_magic(magic, line), match)
    assert ip.user_ns["fed"] is fed  # a mistake starts nothing and replaces nothing


def test_without_an_alignment_the_magics_say_how_to_make_one() -> None:
    shell = InteractiveShell()
    try:
        shell.run_line_magic("load_ext", "fednb")
        one_line(lambda: shell.run_line_magic("fed_align", "--label-party bank"), "no federation yet: .*%fed_sim")
        for magic, line in (("fed_vtrain", "logistic"), ("fed_veval", "")):
            one_line(lambda: shell.run_line_magic(magic, line), "no aligned vertical federation yet: run %fed_align")
    finally:
        shell.run_line_magic("unload_ext", "fednb")


@needs_fate
def test_closing_the_federation_forgets_its_alignment() -> None:
    shell = InteractiveShell()
    mini = FATE / "breast_hetero_mini_guest.csv", FATE / "breast_hetero_mini_host.csv"
    try:
        shell.run_line_magic("load_ext", "fednb")
        shell.run_line_magic("fed_sim", f"--data bank={mini[0]} --data partner={mini[1]} --id-column id --label y")
        shell.run_line_magic("fed_align", "--label-party bank")
        shell.run_line_magic("fed_vtrain", "logistic --epochs 1 --plaintext")
        assert {"vfl", "vmodel"} <= set(shell.user_ns)
        shell.run_line_magic("fed_close", "")
        assert "vfl" not in shell.user_ns and "fed" not in shell.user_ns
        one_line(lambda: shell.run_line_magic("fed_veval", ""), "run %fed_align")
    finally:
        shell.run_line_magic("unload_ext", "fednb")


def test_the_magics_defaults_are_the_apis() -> None:
    """%fed_vtrain logistic and Vertical.train_logistic train alike when given nothing."""
    from fednb.notebook.magics import FedMagics
    from fednb.vertical.federation import Vertical

    parameters = inspect.signature(Vertical.train_logistic).parameters
    defaults = {action.dest: action.default for action in FedMagics.fed_vtrain.parser._actions}
    shared = {"epochs", "lr", "batch_size", "l2", "optimizer", "key_bits", "seed"}
    assert {name: defaults[name] for name in shared} == {name: parameters[name].default for name in shared}
    assert defaults["plaintext"] is (not parameters["encrypted"].default) and defaults["classes"] is None
    for magic, shown in ((FedMagics.fed_vtrain, ("--key-bits", "default: 2048", "one-vs-rest", "(%fed_align)")),
                         (FedMagics.fed_align, ("--label-party", "private set intersection")),
                         (FedMagics.fed_veval, ("AUC", "--model")), (FedMagics.fed_sim, ("--data", "NAME=FILE"))):
        assert all(text in magic.__doc__ for text in shown), magic.__name__


# -- the live view, without a federation --------------------------------------------------------------

def epoch(model: str, number: int, loss: float | None = 0.5, epochs: int = 3) -> VerticalProgress:
    return VerticalProgress("epoch", f"{model}: epoch {number}", model=model, epoch=number, epochs=epochs, loss=loss,
                            seconds=1.25, roles=ROLES)


@pytest.fixture
def view() -> Iterator[VerticalDashboard]:
    widget = VerticalDashboard(detail="Paillier 1024 bits · sgd lr 0.15, batch 240, L2 0.01", epochs=3)
    widget.parties = [{"name": p, "role": r, "rows": 569} for p, r in ROLES.items()]
    widget.aligned, widget.split = 569, {"train": 455, "test": 114}
    yield widget
    widget.close()


def test_the_view_follows_epochs_and_ends_with_the_test_metrics(view: VerticalDashboard) -> None:
    assert (view.state, view.models, view.labels) == ("idle", [], [""])
    view.handle(epoch("a1b2", 1, 0.59))
    view.handle(VerticalProgress("aligned", "aligned", roles=ROLES))  # not an epoch: changes no curve
    view.handle(epoch("a1b2", 2, 0.39))
    assert view.state == "training"
    assert view.models == [{"label": "", "history": [{"epoch": 1, "loss": 0.59, "auc": None, "seconds": 1.25},
                                                     {"epoch": 2, "loss": 0.39, "auc": None, "seconds": 1.25}]}]
    assert "2/3 epochs, epoch 2: loss 0.3900, 1.2 s" in view.summary_text()
    view.handle(epoch("a1b2", 3, 0.36))
    view.finished({"auc": 0.9958, "accuracy": 0.9737, "ks": 0.9474, "logloss": 0.2463})
    text = view.summary_text()
    assert view.state == "done" and text.startswith("hetero logistic regression: done\nPaillier 1024 bits")
    assert "569 aligned rows (train 455, test 114)" in text
    assert "test split: AUC 0.9958, accuracy 0.9737, KS 0.9474, log-loss 0.2463" in text
    assert "bank     label     569" in text and "3      0.3600  —         1.25" in text
    bundle, _ = view._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and 'data-state="done"' in bundle["text/html"]
    assert "<td>features</td>" in bundle["text/html"]


def test_the_view_draws_one_curve_per_class_and_says_why_there_are_no_metrics() -> None:
    widget = VerticalDashboard(classes=[0, 1, 2], epochs=2)
    try:
        for k in range(3):
            for number in (1, 2):
                widget.handle(epoch(f"m.{k}", number, None, epochs=2))  # no loss: two feature parties
        widget.finished(note="not scored on the test rows: lr.evaluate awaits approval at bank")
        assert [m["label"] for m in widget.models] == ["class 0", "class 1", "class 2"]
        assert all(h["loss"] is None for m in widget.models for h in m["history"])
        text = widget.summary_text()
        assert "6/6 epochs, model 3/3 (class 2)" in text and "awaits approval at bank" in text
        assert "class 2\nepoch  loss  test AUC  seconds\n1      —     —         1.25" in text
    finally:
        widget.close()


def test_a_failed_run_says_where_its_error_is(view: VerticalDashboard) -> None:
    view.handle(epoch("a1b2", 1))
    view.finished(error="see the error below")
    assert view.state == "error" and view.summary_text().splitlines()[0] == "hetero logistic regression: failed"


def test_a_terminal_gets_one_line_per_epoch_and_tables_format_the_metrics() -> None:
    stream = io.StringIO()
    lines = VerticalLines(stream)
    for event in (epoch("a1b2", 1, 0.5869), VerticalProgress("trained", "done"), epoch("a1b2.3", 2, None)):
        lines(event)
    assert stream.getvalue() == "epoch 1/3, loss 0.5869, 1.2 s\nclass 3, epoch 2/3, 1.2 s\n"
    table = metrics_table({"logloss": 0.25, "auc": 0.99581, "ks": 0.9}, model="vmodel", test_rows=114)
    assert repr(table).splitlines() == ["model   test rows  AUC     KS   log-loss", "vmodel  114        0.9958  0.9  0.25"]


# Renders an anywidget ESM into the page with a model that holds the given traits, as anywidget does.
RENDER = """async ([source, css, state]) => {
    const style = document.createElement("style");
    style.textContent = css;
    document.head.append(style);
    const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
    const module = await import(url);
    const model = { get: (name) => state[name], on: () => undefined, off: () => undefined, send: () => undefined };
    const el = document.createElement("div");
    document.body.append(el);
    module.default.render({ model, el });
}"""


def test_the_esm_draws_roles_the_loss_per_epoch_and_the_metrics(tmp_path: Path, view: VerticalDashboard) -> None:
    from tests.test_labextension import skip_or_fail

    if not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None:
        skip_or_fail("Chromium or playwright is missing: the ESM cannot be drawn here")
    for number, loss in ((1, 0.59), (2, 0.39), (3, 0.36)):
        view.handle(epoch("a1b2", number, loss))
    view.finished({"auc": 0.9958, "accuracy": 0.9737})
    esm = ROOT / "fednb" / "notebook" / "vertical_view.js"
    with chromium_context(tmp_path) as context:
        tab = context.new_page()
        problems: list[str] = []
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        tab.set_content("<html><head></head><body></body></html>")
        tab.evaluate(RENDER, [esm.read_text(encoding="utf-8"), esm.with_name("dashboard.css").read_text(encoding="utf-8"),
                              view.get_state()])
        roles = tab.eval_on_selector_all("tr.fednb-party", "rows => rows.map(r => [r.dataset.party, "
                                         "r.querySelector('.fednb-role').dataset.role, r.cells[2].innerText])")
        assert roles == [["bank", "label", "569"], ["partner", "features", "569"]]
        points = tab.eval_on_selector_all("circle.fednb-loss-point", "ps => ps.map(p => [p.dataset.epoch, "
                                          "p.querySelector('title').textContent])")
        assert points == [["1", "epoch 1: loss 0.5900, 1.25 s"], ["2", "epoch 2: loss 0.3900, 1.25 s"],
                          ["3", "epoch 3: loss 0.3600, 1.25 s"]]
        ys = [float(y) for y in tab.eval_on_selector_all("circle.fednb-loss-point", "ps => ps.map(p => p.getAttribute('cy'))")]
        assert ys == sorted(ys), "a falling loss is drawn falling"
        assert tab.inner_text("div.fednb-metrics") == "test split: AUC 0.9958 · accuracy 0.9737"
        assert "3/3 epochs" in tab.inner_text(".fednb-vertical") and tab.inner_text(".fednb-state") == "done"
        assert problems == []


# -- notebooks/vertical.ipynb, top to bottom ---------------------------------------------------------

def test_the_notebook_is_stored_with_outputs_cleared() -> None:
    stored_with_outputs_cleared("vertical.ipynb")


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, RecordingClient, float, Path]]:
    if not GUEST.is_file():
        pytest.skip(f"FATE's tables are not at {FATE}")
    base = tmp_path_factory.mktemp("vertical")
    started = time.monotonic()
    try:
        nb, client = execute_notebook(NOTEBOOKS / "vertical.ipynb", base, timeout=BUDGET_SECONDS)
        yield nb, client, time.monotonic() - started, base
    finally:
        stop_pids(leftovers(base))  # nbclient shuts its kernel down; make sure of it


def cell(nb: Any, startswith: str) -> tuple[int, Any]:
    found = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith(startswith)]
    assert len(found) == 1, f"expected one cell starting with {startswith!r}, found {len(found)}"
    return found[0]


def text(nb: Any, startswith: str) -> str:
    _, found = cell(nb, startswith)
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in found.outputs)


@needs_fate
def test_the_notebook_runs_top_to_bottom_well_within_budget(executed: Any) -> None:
    nb, client, seconds, _ = executed
    assert not cell_errors(nb), cell_errors(nb)
    slowest = sorted(client.record.cell_seconds.items(), key=lambda item: -item[1])[:3]
    assert seconds < BUDGET_SECONDS, slowest
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


@needs_fate
def test_the_notebook_aligns_trains_and_scores_as_it_says(executed: Any) -> None:
    nb = executed[0]
    assert "bank     label     569         569" in text(nb, "%fed_align")
    assert "partner  features  569         569" in text(nb, "%fed_align")
    assert "train 455, test 114" in text(nb, "%fed_align")
    header, row = text(nb, "%fed_veval").splitlines()
    assert header.split() == ["model", "test", "rows", "AUC", "accuracy", "KS", "log-loss"]
    name, rows, auc, accuracy, *_ = row.split()
    assert (name, rows) == ("vmodel", "114") and float(auc) > 0.98 and float(accuracy) > 0.9, row
    # the comparison on the joined table: the same split, an AUC within 0.005 of scikit-learn's
    comparison = text(nb, "import numpy as np")
    federated = float(re.search(r"vertical federation \(Paillier 1024\): (0\.\d+)", comparison).group(1))
    pooled = float(re.search(r"scikit-learn on the joined table: +(0\.\d+)", comparison).group(1))
    assert federated == pytest.approx(float(auc), abs=1e-4) and abs(federated - pooled) <= 0.005, comparison
    seen = text(nb, "from collections import Counter")
    assert "40 × masked gradient of bank (11 values)" in seen and "40 × masked gradient of partner (20 values)" in seen
    assert "40 × batch loss" in seen and "federation closed" in text(nb, "%fed_close")


@needs_fate
def test_the_notebooks_view_showed_each_epoch_while_training_ran(executed: Any) -> None:
    nb, client, _, _ = executed
    index, training = cell(nb, "%fed_vtrain logistic --epochs 20")
    [view] = [o["data"][WIDGET_VIEW]["model_id"] for o in training.outputs if WIDGET_VIEW in o.get("data", {})]
    final = widget_state(nb, view)["state"]
    assert final["state"] == "done" and final["detail"].startswith("Paillier 1024 bits")
    assert [p["role"] for p in final["parties"]] == ["label", "features"]
    [curve] = final["models"]
    assert [e["epoch"] for e in curve["history"]] == list(range(1, 21))
    assert curve["history"][-1]["loss"] < curve["history"][0]["loss"]
    assert final["metrics"]["auc"] > 0.98
    # the kernel sent each epoch as it happened, before the cell ended
    updates = [u for u in client.record.updates if u.comm_id == view and "models" in u.state]
    done = [len(u.state["models"][0]["history"]) for u in updates if u.state["models"]]
    assert done == sorted(done) and 0 < done[0] < 20 and done[-1] == 20
    assert all(u.cell == index and u.sent < client.record.cell_finished[index] for u in updates)
    first, last = updates[0].sent, updates[-1].sent
    assert (last - first).total_seconds() > 1.0, "the epochs arrived all at once"
    # front ends without widgets keep the final summary
    static = "".join(o["data"].get("text/plain", "") for o in training.outputs if "data" in o)
    assert "hetero logistic regression: done" in static and "test split: AUC 0.9" in static


@needs_fate
def test_no_kernel_left_behind(executed: Any) -> None:
    stray = leftovers(executed[3])
    stop_pids(stray)
    assert not stray, f"a kernel outlived its notebook: {stray}"
