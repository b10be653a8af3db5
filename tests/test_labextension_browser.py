"""The JupyterLab extension in real JupyterLab, driven in headless Debian Chromium.

One JupyterLab and one browser page for the module (about half a minute in all): the tests
run in order on the same notebooks, as a user would: a federation appears in the sidebar
and the status bar, training advances round by round, the commands run a cell at the
parties and stop training (background, foreground, and from the dashboard's ``fednb:stop``
event), the panel follows the active notebook and survives a kernel restart, and a party
served in a notebook has its request approved from the panel. (The interrupt that 'Stop
training' falls back to for kernels that cannot hear a comm message during a cell is
checked against a fake kernel in ``labextension/test/connection.test.ts``: ipykernel 7
always hears it.) Screenshots of the panel and the status bar go to
``test-artifacts/labextension-*.png``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the fixture skips (or fails, under CI) with a message
    expect = None  # type: ignore[assignment]

from tests.jupyter_fixtures import CHROMIUM, ROOT, chromium_context, jupyter_lab, leftovers
from tests.test_labextension import ANSWER, ASK, SERVE, SERVE_DATA, skip_or_fail

ARTIFACTS = ROOT / "test-artifacts"

SECONDS = 90_000  # ms: generous for a 2-core machine shared with other work
PANEL = "#fednb-federation-panel"
STATUS = ".fednb-Status"
MLP = "%%fed_model\nimport torch.nn as nn\nmodel = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))"
CELLS = [
    "%load_ext fednb",                                        # 0
    "%fed_sim 3 --seed 0",                                     # 1
    MLP,                                                       # 2
    "%fed_train --rounds 5 --epochs 12 --batch-size 8",        # 3: foreground, slow enough to watch
    "label_counts(train)",                                     # 4: 'Run cell at parties'
    "%fed_train --rounds 200 --background",                    # 5: 'Stop training' ends it
    "%fed_train --rounds 200 --epochs 4",                      # 6: foreground, stopped by the dashboard's event
]

# The notebook the test works in, found by path (the shell's current widget is whatever has
# focus, which may be the sidebar).
NB = "Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.context?.path === window.__fednbPath)"

# Activate the notebook, select cell i and run it; return once it started, not when it ends
# (a foreground %fed_train keeps the kernel busy).
RUN_CELL = f"""async (i) => {{
    const app = window.jupyterapp;
    const panel = {NB};
    app.shell.activateById(panel.id);
    // notebook:run-cell runs in the notebook that has focus: wait until ours has it
    for (let tries = 0; app.shell.currentWidget !== panel && tries < 100; tries++) {{
        await new Promise(resolve => setTimeout(resolve, 50));
    }}
    if (app.shell.currentWidget !== panel) throw new Error(`${{window.__fednbPath}} never got focus`);
    panel.content.activeCellIndex = i;
    panel.content.deselectAll();
    const cell = panel.content.model.cells.get(i);
    const started = new Promise(resolve => {{
        const check = () => {{ if (cell.executionState === 'running') resolve(true); }};
        cell.stateChanged.connect(check);
        setTimeout(() => resolve(false), 10000);
    }});
    void app.commands.execute('notebook:run-cell');
    return await started;
}}"""

# The cell ran to the end. (Not the kernel's status: with JupyterLab 4.6 and ipykernel 7,
# comm messages run on a subshell whose 'idle' shows while a cell still runs.)
CELL_DONE = f"""(i) => {{
    const cell = {NB}.content.model.cells.get(i);
    return cell.executionState === 'idle' && cell.executionCount !== null;
}}"""

CELL_OUTPUT = f"(i) => {NB}.content.model.cells.get(i).toJSON().outputs"
CELL_SOURCE = f"(i) => {NB}.content.model.cells.get(i).sharedModel.getSource()"
KERNEL = f"{NB}.sessionContext.session.kernel"

# Open (or activate) a notebook and wait for its kernel.
OPEN = """async (path) => {
    const app = window.jupyterapp;
    await app.restored;
    window.__fednbPath = path;
    const widget = await app.commands.execute('docmanager:open', {path});
    app.shell.activateById(widget.id);
    await widget.context.ready;
    await widget.sessionContext.ready;
}"""

KERNEL_IDLE = f"() => {KERNEL}?.status === 'idle'"

# The panel shows a run in progress that has finished a round (so the magic waits on it).
TRAINED_A_ROUND = """() => {
    const summary = document.querySelector('.fednb-Panel-summary')?.textContent ?? '';
    const round = /^training · round (\\d+)\\//.exec(summary);
    return round !== null && Number(round[1]) >= 2;
}"""

# The dashboard's Stop button dispatches this from inside the output; true if nobody handled it.
DISPATCH_STOP = f"""(i) => {{
    const cell = {NB}.content.widgets[i];
    const target = cell.node.querySelector('.jp-OutputArea-output') ?? cell.node;
    return target.dispatchEvent(new CustomEvent('fednb:stop', {{bubbles: true, cancelable: true}}));
}}"""

# Every text the status-bar item and the panel's round showed, in order.
WATCH = """() => {
    window.__fednbSeen = {status: [], round: []};
    const note = (list, text) => { if (list[list.length - 1] !== text) list.push(text); };
    new MutationObserver(() => {
        note(window.__fednbSeen.status, document.querySelector('.fednb-Status')?.textContent ?? '');
        note(window.__fednbSeen.round, document.querySelector('.fednb-Panel-round')?.textContent ?? '');
    }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def notebook(path: Path, cells: list[str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not CHROMIUM.exists():
        skip_or_fail(f"{CHROMIUM} is missing: the JupyterLab tests cannot run (`make test` installs it as root)")
    if expect is None:
        skip_or_fail("playwright is missing: pip install -e '.[test]'")
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    root.mkdir()
    notebook(root / "fed.ipynb", CELLS)
    notebook(root / "plain.ipynb", ["1 + 1"])
    notebook(root / "party.ipynb", ["%load_ext fednb", SERVE_DATA, SERVE, ASK, ANSWER])
    ARTIFACTS.mkdir(exist_ok=True)
    console: list[str] = []
    with jupyter_lab(root, base / "jupyter") as lab, chromium_context(base / "chromium") as browser:
        page = browser.new_page()
        page.set_default_timeout(SECONDS)
        expect.set_options(timeout=SECONDS)
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                and "fednb" in m.text else None)
        page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
        page.goto(f"{lab.url}/lab?token={lab.token}&reset")  # notebooks are opened by the tests, one at a time
        page.wait_for_function("() => !!window.jupyterapp")
        page.wait_for_function("async () => { await window.jupyterapp.restored; return true; }")
        if not page.evaluate("() => window.jupyterapp.hasPlugin('fednb-labextension:plugin')"):
            skip_or_fail("JupyterLab has no fednb extension: `pip install -e .` builds and installs it "
                         "(not with FEDNB_SKIP_JS=1)")
        open_notebook(page, "fed.ipynb")
        page.evaluate(WATCH)
        yield page
    assert console == [], "\n".join(console)
    assert not leftovers(), "jupyter-lab, a kernel or chromium outlived the tests"



def open_notebook(page: Any, path: str) -> None:
    page.wait_for_function("() => !!window.jupyterapp")
    page.evaluate(OPEN, path)
    page.wait_for_function(KERNEL_IDLE)


def run_cell(page: Any, index: int, wait: bool = True) -> None:
    page.evaluate(RUN_CELL, index)
    if wait:
        page.wait_for_function(CELL_DONE, arg=index)


def command(page: Any, name: str) -> None:
    page.evaluate("(name) => window.jupyterapp.commands.execute(name)", name)


def snap(page: Any, name: str) -> None:
    page.locator(PANEL).screenshot(path=str(ARTIFACTS / f"labextension-{name}-panel.png"))
    page.screenshot(path=str(ARTIFACTS / f"labextension-{name}.png"))


def test_the_panel_and_status_bar_follow_a_federation_in_jupyterlab(lab_page: Any) -> None:
    page = lab_page
    command(page, "fednb:show-federation-panel")
    panel = page.locator(PANEL)
    expect(panel.locator(".fednb-Panel-empty")).to_contain_text("Run %load_ext fednb")
    expect(page.locator(STATUS)).to_have_text("")

    try:
        run_cell(page, 0)
        expect(panel.locator(".fednb-Panel-empty")).to_contain_text("No federation in this kernel yet")
        run_cell(page, 1)
        expect(panel.locator("li[data-party][data-status=online]")).to_have_count(3)
        expect(panel.locator("li[data-party]")).to_have_count(3)
        expect(page.locator(STATUS)).to_have_text("fed: 3 parties")
        expect(panel.locator(".fednb-Panel-parties h3")).to_have_text("Parties (3/3 online)")
        run_cell(page, 2)

        run_cell(page, 3, wait=False)
        page.wait_for_function("() => document.querySelector('.fednb-Status')?.textContent.includes('round')")
        page.wait_for_function("() => /[1-9]/.test(document.querySelector('.fednb-Panel-accuracy')?.textContent)")
        snap(page, "training")
        page.locator(STATUS).screenshot(path=str(ARTIFACTS / "labextension-statusbar.png"))
        page.wait_for_function(CELL_DONE, arg=3)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "labextension-failure.png"))
        raise
    seen = page.evaluate("() => window.__fednbSeen")
    rounds = [int(text.split("round ")[1].split("/")[0]) for text in seen["status"] if "round" in text]
    assert all(text.endswith("/5") for text in seen["status"] if "round" in text), seen
    assert rounds == sorted(rounds) and len(set(rounds)) >= 3 and rounds[-1] == 5, f"not round by round: {seen}"
    panel_rounds = [text for text in seen["round"] if text]
    assert len(set(panel_rounds)) >= 3 and panel_rounds[-1] == "5/5", seen
    expect(page.locator(STATUS)).to_have_text("fed: 3 parties")
    expect(panel.locator(".fednb-Panel-summary")).to_have_text("done · 5/5 rounds")
    expect(panel.locator(".fednb-Panel-run dd").first).to_have_text("fedavg")
    assert 0.5 < float(panel.locator(".fednb-Panel-accuracy").inner_text()) <= 1
    snap(page, "done")


def test_commands_run_a_cell_at_the_parties_and_stop_training(lab_page: Any) -> None:
    """Runs after the test above, on its federation."""
    page = lab_page
    panel = page.locator(PANEL)
    cell = page.locator(".jp-Notebook .jp-Cell")
    try:
        toolbar = page.locator(".jp-NotebookPanel-toolbar .fednb-RunAtParties button")
        expect(toolbar).to_be_enabled()
        command(page, "apputils:activate-command-palette")
        search = page.locator(".lm-CommandPalette-input")
        for label, name in (("Run cell at parties", "run-cell-at-parties"), ("Stop training", "stop-training"),
                            ("Show federation panel", "show-federation-panel")):
            search.fill(label)  # (JupyterLab hides disabled items: 'Stop training' is, while nothing trains)
            expect(page.locator(f".lm-CommandPalette-item[data-command='fednb:{name}']")).to_have_count(1)
        search.press("Escape")
        cell.nth(4).locator(".jp-InputArea-editor").click(button="right")  # the cell's context menu
        page.locator(".lm-Menu-item", has_text="Run cell at parties").click()
        page.wait_for_function(CELL_DONE, arg=4)
        assert page.evaluate(CELL_SOURCE, 4) == "%%fed_run\nlabel_counts(train)"
        expect(cell.nth(4).locator(".fednb-party-output")).to_have_count(3)

        run_cell(page, 5)  # --background: the kernel is idle, the comm carries the stop
        expect(page.locator(STATUS)).to_contain_text("round")
        assert page.evaluate("() => window.jupyterapp.commands.isEnabled('fednb:stop-training')")
        command(page, "fednb:stop-training")
        expect(panel.locator(".fednb-Panel-summary")).to_contain_text("stopped after")
        expect(page.locator(STATUS)).to_have_text("fed: 3 parties")
        assert not page.evaluate("() => window.jupyterapp.commands.isEnabled('fednb:stop-training')")

        run_cell(page, 6, wait=False)  # foreground: the dashboard's event stops it, heard during the cell
        page.wait_for_function(TRAINED_A_ROUND)
        assert page.evaluate(DISPATCH_STOP, 6) is False, "the extension did not take the dashboard's fednb:stop"
        page.wait_for_function(CELL_DONE, arg=6)
        expect(panel.locator(".fednb-Panel-summary")).to_contain_text("stopped after")
        assert not [o for o in page.evaluate(CELL_OUTPUT, 6) if o["output_type"] == "error"]

        snap(page, "stopped")
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "labextension-failure.png"))
        raise


def test_the_panel_follows_the_active_notebook_and_survives_a_restart(lab_page: Any) -> None:
    """Runs after the tests above: fed.ipynb's kernel has a federation, plain.ipynb's has none."""
    page = lab_page
    panel = page.locator(PANEL)
    empty = panel.locator(".fednb-Panel-empty")
    try:
        open_notebook(page, "plain.ipynb")
        expect(panel.locator(".fednb-Panel-notebook")).to_have_text("plain.ipynb")
        expect(empty).to_contain_text("Run %load_ext fednb")
        expect(page.locator(STATUS)).to_have_text("")
        expect(panel.locator("li[data-party]")).to_have_count(0)
        snap(page, "empty")

        open_notebook(page, "fed.ipynb")
        expect(panel.locator(".fednb-Panel-notebook")).to_have_text("fed.ipynb")
        expect(panel.locator("li[data-party]")).to_have_count(3)
        expect(page.locator(STATUS)).to_have_text("fed: 3 parties")

        page.evaluate(f"() => {{ void {KERNEL}.restart(); }}")
        expect(empty).to_contain_text("Run %load_ext fednb")
        expect(page.locator(STATUS)).to_have_text("")
        page.wait_for_function(KERNEL_IDLE)
        run_cell(page, 0)
        expect(empty).to_contain_text("No federation in this kernel yet")
        run_cell(page, 1)
        expect(panel.locator("li[data-party][data-status=online]")).to_have_count(3)
        expect(page.locator(STATUS)).to_have_text("fed: 3 parties")
        expect(panel.locator(".fednb-Panel-run .fednb-Panel-idle")).to_contain_text("Not trained yet")
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "labextension-failure.png"))
        raise


def test_a_pending_request_is_approved_in_the_panel(lab_page: Any) -> None:
    """A party served with %fed_serve: its request waits in the panel until Approve lets it run."""
    page = lab_page
    panel = page.locator(PANEL)
    try:
        open_notebook(page, "party.ipynb")
        command(page, "fednb:show-federation-panel")
        for index in range(4):  # %load_ext, the data, %fed_serve, the coordinator's request
            run_cell(page, index)
        request = panel.locator(".fednb-Panel-approvals li[data-request]")
        expect(request).to_have_count(1)
        expect(request.locator(".fednb-Panel-code")).to_have_text("6 * 7")
        expect(request.locator(".fednb-Panel-request")).to_contain_text("run from")
        expect(panel.locator(".fednb-Panel-empty")).to_be_hidden()
        snap(page, "approvals")
        request.locator(".fednb-Panel-approve").click()
        expect(panel.locator(".fednb-Panel-approvals h3")).to_have_text("Approval requests (0)")
        expect(panel.locator(".fednb-Panel-result")).to_contain_text("approved")
        run_cell(page, 4)
        texts = [o.get("text", "") for o in page.evaluate(CELL_OUTPUT, 4) if o.get("name") == "stdout"]
        assert "".join(texts).strip() == "{'clinic': 42}", texts
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "labextension-failure.png"))
        raise
