"""Real Jupyter for the notebook and browser tests: a kernel, nbclient, JupyterLab, Chromium.

Nothing global is touched: the kernel spec (``python3`` -> this interpreter, so notebooks
run with the project's venv), the Jupyter config/data/runtime folders, the IPython profile,
matplotlib's cache and Chromium's profile all live in temporary folders. Every process started here is stopped by PID, and
:func:`leftovers` lets a test check that no jupyter-lab, kernel or chromium outlived it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
JUPYTER_LAB = Path(sys.executable).parent / "jupyter-lab"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


# -- a private Jupyter environment ----------------------------------------------------------------

def jupyter_environment(base: Path) -> dict[str, str]:
    """Temporary Jupyter/IPython folders under ``base``, with a ``python3`` kernel that is this venv."""
    env = {
        "JUPYTER_CONFIG_DIR": str(base / "config"),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "IPYTHONDIR": str(base / "ipython"),
        "MPLCONFIGDIR": str(base / "matplotlib"),  # its font cache, rebuilt in under a second
        "JUPYTER_PLATFORM_DIRS": "1",
        # In a venv Jupyter looks in the environment before the user's data dir; our
        # ``python3`` spec must come first.
        "JUPYTER_PREFER_ENV_PATH": "0",
    }
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    install_kernelspec(base / "data" / "kernels")
    return env


def install_kernelspec(kernels: Path, name: str = "python3") -> Path:
    """Write a kernel spec whose argv is this interpreter (the notebooks' ``python3``)."""
    spec = kernels / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({Path(sys.prefix).name})",
        "language": "python",
        "metadata": {"debugger": False},
    }))
    return spec


# -- nbclient with a record of live widget updates -------------------------------------------------

@dataclass
class WidgetUpdate:
    """One ``comm_msg`` state update, with the kernel's timestamp and the cell it arrived under."""

    cell: int
    comm_id: str
    sent: datetime
    state: dict[str, Any]


@dataclass
class LiveRecord:
    updates: list[WidgetUpdate] = field(default_factory=list)
    cell_finished: dict[int, datetime] = field(default_factory=dict)
    cell_seconds: dict[int, float] = field(default_factory=dict)


class RecordingClient(NotebookClient):
    """A NotebookClient that remembers each widget state update and when each cell finished.

    The timestamps are the kernel's own (message header ``date``), so "an update came before
    the cell finished" is decided on one clock, not by when our event loop got round to it.
    """

    def __init__(self, nb: Any, **kwargs: Any) -> None:
        super().__init__(nb, on_cell_executed=self._cell_executed, **kwargs)
        self.record = LiveRecord()
        self.kernel_spec_dir = ""

    def create_kernel_manager(self) -> Any:
        manager = super().create_kernel_manager()
        self.kernel_spec_dir = manager.kernel_spec.resource_dir
        return manager

    def handle_comm_msg(self, outs: list[Any], msg: dict[str, Any], cell_index: int) -> None:
        data = msg["content"].get("data") or {}
        if msg["msg_type"] == "comm_msg" and isinstance(data.get("state"), dict):
            self.record.updates.append(WidgetUpdate(cell_index, msg["content"]["comm_id"],
                                                    _date(msg["header"]["date"]), dict(data["state"])))
        super().handle_comm_msg(outs, msg, cell_index)

    async def async_execute_cell(self, cell: Any, cell_index: int, execution_count: int | None = None,
                                 store_history: bool = True) -> Any:
        started = time.monotonic()
        result = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        self.record.cell_seconds[cell_index] = time.monotonic() - started
        return result

    def _cell_executed(self, cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:
        self.record.cell_finished[cell_index] = _date(execute_reply["header"]["date"])


def _date(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def execute_notebook(path: Path, base: Path, *, timeout: int = 240) -> tuple[Any, RecordingClient]:
    """Run ``path`` top to bottom on a fresh kernel of this venv; widget state is stored."""
    env = jupyter_environment(base)
    nb = nbformat.read(path, as_version=4)
    client = RecordingClient(nb, kernel_name="python3", timeout=timeout, store_widget_state=True,
                             resources={"metadata": {"path": str(path.parent)}})
    saved = {key: os.environ.get(key) for key in env}
    # The kernel manager finds ``python3`` in JUPYTER_DATA_DIR first; the kernel inherits the
    # private folders too. nbclient owns (and shuts down) the kernel it starts.
    os.environ.update(env)
    try:
        client.execute()
        assert Path(client.kernel_spec_dir).is_relative_to(base), \
            f"the notebook ran on the kernel spec in {client.kernel_spec_dir}, not the test's own"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb, client


def widget_views(cell: Any) -> list[str]:
    """Model ids of the widgets a code cell's outputs display."""
    return [output["data"][WIDGET_VIEW]["model_id"] for output in cell.get("outputs", [])
            if output.get("output_type") in ("display_data", "execute_result") and WIDGET_VIEW in output.get("data", {})]


def widget_state(nb: Any, model_id: str) -> dict[str, Any]:
    """The final synced state of one widget, as nbclient stored it in the notebook."""
    states = nb.metadata["widgets"][WIDGET_STATE]["state"]
    return states[model_id]


def dashboards(nb: Any) -> list[tuple[int, str, dict[str, Any]]]:
    """(cell index, model id, final state) of every fednb dashboard the notebook displayed."""
    found = []
    for index, cell in enumerate(nb.cells):
        for model_id in widget_views(cell):
            entry = widget_state(nb, model_id)
            if entry.get("model_name") == "AnyModel" and _is_dashboard(entry["state"]):
                found.append((index, model_id, entry["state"]))
    return found


def _is_dashboard(state: dict[str, Any]) -> bool:
    return {"state", "round", "parties", "history"} <= set(state)


def cell_errors(nb: Any) -> list[str]:
    """Every error output in the executed notebook, as 'cell N: Name: value'."""
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, cell in enumerate(nb.cells)
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


# -- processes --------------------------------------------------------------------------------------

def _processes() -> dict[int, tuple[int, str]]:
    """Every live (not zombie) process: PID -> (parent PID, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if fields[0] != b"Z":
            found[int(entry)] = (int(fields[1]), command)
    return found


def children(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``: PID -> command line."""
    processes = _processes()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, command) in processes.items():
            if ppid == parent and child not in found:
                found[child] = command
                frontier.append(child)
    return found


def leftovers(*paths: Path) -> dict[int, str]:
    """Jupyter, kernel and Chromium processes still alive that this test run started.

    That is this process's descendants of those kinds, plus any process whose command line
    names one of ``paths`` (a test's temporary folders): a kernel or browser whose parent
    died is re-parented away from us, but still names its connection file or profile.
    """
    kinds = ("jupyter", "ipykernel", "chromium", "chrome", "playwright")
    alive = {pid: command for pid, command in children(os.getpid()).items() if any(k in command for k in kinds)}
    for pid, (_, command) in _processes().items():
        if pid != os.getpid() and any(str(path) in command for path in paths):
            alive[pid] = command
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def stop_pids(pids: dict[int, str], grace: float = 5.0) -> None:
    """SIGTERM each PID still alive, then SIGKILL whatever did not exit within ``grace``."""
    for pid in pids:
        if _alive(pid):
            with _gone_ok():
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with _gone_ok():
                os.kill(pid, signal.SIGKILL)


@contextmanager
def _gone_ok() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        return


# -- JupyterLab -------------------------------------------------------------------------------------

@dataclass
class JupyterLab:
    """A running jupyter-lab: its URL, token, root folder and process."""

    url: str
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our loopback server
            body = response.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}&reset"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def jupyter_lab(root: Path, base: Path, *, timeout: float = 60.0) -> Iterator[JupyterLab]:
    """Start ``jupyter-lab`` on 127.0.0.1 serving ``root``; stop it, and its kernels, by PID at the end."""
    env = {**os.environ, **jupyter_environment(base)}
    labconfig = base / "config" / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    # No network here: the news feed would only log fetch errors to the console.
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    token = secrets.token_hex(24)
    port = free_port()
    log = base / "jupyter-lab.log"
    command = [str(JUPYTER_LAB), "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True",
               f"--ServerApp.root_dir={root}", f"--LabApp.workspaces_dir={base / 'workspaces'}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=root)
    lab = JupyterLab(f"http://127.0.0.1:{port}", token, root, process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter-lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                lab.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter-lab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield lab
    finally:
        _stop_lab(lab)


def _stop_lab(lab: JupyterLab) -> None:
    """Shut the server down (it stops its kernels), then make sure of it and them by PID."""
    spawned = children(lab.process.pid)
    if lab.process.poll() is None:
        try:
            lab.api("/api/shutdown", method="POST")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            lab.process.terminate()
        try:
            lab.process.wait(15)
        except subprocess.TimeoutExpired:
            lab.process.kill()
            lab.process.wait()
    stop_pids({pid: cmd for pid, cmd in spawned.items() if _alive(pid)})


# -- Chromium ---------------------------------------------------------------------------------------

@contextmanager
def chromium_context(profile: Path) -> Iterator[Any]:
    """A headless Debian Chromium driven by Playwright, with a throwaway profile.

    Its XDG folders point into the profile too: Chromium would otherwise keep a crash
    report database in ~/.config/chromium and caches in ~/.cache.
    """
    from playwright.sync_api import sync_playwright

    env = {**os.environ, "XDG_CONFIG_HOME": str(profile / "xdg-config"), "XDG_CACHE_HOME": str(profile / "xdg-cache")}
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile / "user-data"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, env=env,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def copy_notebooks(destination: Path, *names: str) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(NOTEBOOKS / name, destination / name)
    return destination
