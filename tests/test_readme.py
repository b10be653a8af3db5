"""The README's notebook cells, exactly as a user copies them, run in order in a real kernel.

Every fenced block whose info string is ``ipython`` is one notebook cell (the README says so
above them); blocks marked ``python`` are scripts and are not run here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.jupyter_fixtures import ROOT, cell_errors, dashboards, execute_notebook, leftovers, stop_pids

README = ROOT / "README.md"
CELL = re.compile(r"^```ipython\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_cells() -> list[str]:
    return [match.group(1).rstrip("\n") for match in CELL.finditer(README.read_text())]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("readme")
    notebook = base / "readme.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in readme_cells()]
    nbformat.write(nb, notebook)
    try:
        executed, _ = execute_notebook(notebook, base, timeout=180)
        executed.metadata["test_base"] = str(base)
        yield executed
    finally:
        stop_pids(leftovers(base))  # nbclient shuts its kernel down; make sure of it


def test_the_readme_has_its_notebook_cells_marked() -> None:
    cells = readme_cells()
    assert cells[0].startswith("%load_ext fednb") and len(cells) >= 5
    assert any(cell.startswith("%%fed_train") for cell in cells) and any("%fed_eval" in cell for cell in cells)
    assert "```ipython" not in README.read_text().split("## From Python")[1]  # only notebook cells are marked


def test_the_readme_cells_run_verbatim_in_a_kernel(executed: Any) -> None:
    assert not cell_errors(executed), cell_errors(executed)
    sources = [cell.source for cell in executed.cells]
    assert sources == readme_cells()  # nothing was adapted for the test
    finished = [state for _, _, state in dashboards(executed)]
    assert len(finished) == 2 and all(state["state"] == "done" for state in finished)
    built_in, fedprox = finished
    assert built_in["history"][-1]["accuracy"] >= 0.9  # the README's settings learn
    assert fedprox["strategy"] == "fedprox" and fedprox["history"][-1]["accuracy"] >= 0.9


def test_the_fedprox_cell_uses_mu() -> None:
    fedprox = next(cell for cell in readme_cells() if "--strategy fedprox" in cell)
    assert 'config["mu"]' in fedprox and "proximal" in fedprox


def test_no_kernel_left_behind(executed: Any) -> None:
    # conftest's session fixture checks the party processes
    assert not leftovers(Path(executed.metadata["test_base"]))
