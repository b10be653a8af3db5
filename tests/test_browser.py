"""The quickstart in a real browser: JupyterLab on 127.0.0.1, headless Debian Chromium.

The test opens ``quickstart.ipynb`` as a user would, runs every cell, and checks what the
user sees: a dashboard with one row per party and one chart point per round that filled in
while training ran, no error outputs and nothing on the browser console. Screenshots go to
``test-artifacts/``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.jupyter_fixtures import (ARTIFACTS, CHROMIUM, chromium_context, copy_notebooks, jupyter_lab, leftovers,
                                    stop_pids)


def _cannot_run(why: str) -> None:
    """Skip loudly; under CI=true a missing browser is a failure, not a skip."""
    message = f"\n\n*** {why}: the real-browser test cannot run. ***\n"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


if not CHROMIUM.exists():
    _cannot_run(f"{CHROMIUM} is missing (`make test` installs it as root: apt-get install chromium chromium-driver)")
if importlib.util.find_spec("playwright") is None:
    _cannot_run("the Python package playwright is missing (pip install -e '.[test]')")

ROUNDS = 10  # the quickstart's first %fed_train
PARTIES = 4
TIMEOUT_MS = 120_000  # generous: a 2-core machine shared with other work

# Records how many chart points the first dashboard showed after every DOM change, so the
# test can tell a chart that grew round by round from one drawn once at the end.
WATCH_POINTS = """() => {
    window.__fednbPoints = [];
    new MutationObserver(() => {
        const board = document.querySelector('.fednb-dashboard');
        if (!board) return;
        const count = board.querySelectorAll('circle.fednb-point').length;
        const seen = window.__fednbPoints;
        if (seen[seen.length - 1] !== count) seen.push(count);
    }).observe(document.body, {childList: true, subtree: true});
}"""

NOTEBOOK_READY = """async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    return panel.sessionContext.session.kernel.name;
}"""

ERROR_OUTPUTS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const errors = [];
    for (const cell of panel.content.model.cells) {
        if (cell.type !== 'code') continue;
        for (const output of cell.toJSON().outputs) {
            if (output.output_type === 'error') errors.push(`${output.ename}: ${output.evalue}`);
        }
    }
    return errors;
}"""

# The kernel is idle again and every code cell has run (an execution count), or one failed
# (run-all stops there).
RUN_ALL_OVER = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = Array.from(panel.content.model.cells).filter(cell => cell.type === 'code');
    const failed = cells.some(cell => cell.toJSON().outputs.some(output => output.output_type === 'error'));
    return panel.sessionContext.session.kernel.status === 'idle'
        && (failed || cells.every(cell => cell.executionCount !== null));
}"""


def first_dashboard_complete(rounds: int, parties: int) -> str:
    return f"""() => {{
        const board = document.querySelector('.fednb-dashboard');
        return !!board && board.querySelectorAll('tr.fednb-party').length === {parties}
            && board.querySelectorAll('circle.fednb-point').length === {rounds};
    }}"""


def test_quickstart_runs_in_jupyterlab_with_a_live_dashboard(tmp_path: Path) -> None:
    root = copy_notebooks(tmp_path / "notebooks", "quickstart.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []
    try:
        with jupyter_lab(root, tmp_path / "jupyter") as lab, chromium_context(tmp_path / "chromium") as browser:
            page = browser.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
            page.goto(lab.lab_url("quickstart.ipynb"))
            page.wait_for_function("() => window.jupyterapp?.shell.currentWidget?.sessionContext", timeout=TIMEOUT_MS)
            assert page.evaluate(NOTEBOOK_READY) == "python3"
            page.evaluate(WATCH_POINTS)

            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            try:
                page.wait_for_function(RUN_ALL_OVER, timeout=TIMEOUT_MS)
                assert page.evaluate(ERROR_OUTPUTS) == []
                page.wait_for_function(first_dashboard_complete(ROUNDS, PARTIES), timeout=30_000)
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "quickstart-failure.png"))
                raise

            dashboard = page.locator(".fednb-dashboard").first
            dashboard.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "quickstart-jupyterlab.png"))
            dashboard.screenshot(path=str(ARTIFACTS / "quickstart-dashboard.png"))
            assert dashboard.is_visible()
            rows = dashboard.locator("tr.fednb-party")
            assert sorted(text.split()[0] for text in rows.all_inner_texts()) == [f"party-{i}" for i in range(PARTIES)]
            assert dashboard.locator("svg.fednb-chart").is_visible()
            assert dashboard.locator("circle.fednb-point").count() == ROUNDS
            points = page.evaluate("() => window.__fednbPoints")
            assert any(0 < count < ROUNDS for count in points), f"the chart never showed a partial run: {points}"
            # The custom FedProx cell drew a second dashboard, of its 5 rounds.
            assert page.locator(".fednb-dashboard").count() == 2
            assert page.locator(".fednb-dashboard").nth(1).locator("circle.fednb-point").count() == 5
            assert page.locator(".fednb-party-output").count() == PARTIES  # %%fed_run: one block per party
            assert page.locator(".jp-RenderedImage img").count() >= 1  # the label-distribution plot
    finally:
        (ARTIFACTS / "quickstart-console.log").write_text("".join(f"{line}\n" for line in console))
        stray = leftovers(tmp_path)
        stop_pids(stray)
    assert console == [], ("the browser console logged errors (in full: test-artifacts/quickstart-console.log):\n"
                           + "\n".join(line.splitlines()[0] for line in console))
    assert not stray, f"jupyter-lab, a kernel or chromium outlived the test: {stray}"
