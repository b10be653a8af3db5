"""The JupyterLab extension without a browser: its TypeScript model, and the kernel's comm bridge.

The snapshot/request formats with no kernel; the TypeScript model and type check (``jlpm
test``: tsc, then node's own test runner); and the bridge in a real kernel, spoken to over
the Jupyter protocol with the messages JupyterLab sends. The extension in real JupyterLab
and Chromium is ``test_labextension_browser.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fednb.federation.events import (PartyDone, PartyDropped, RoundAggregated, RoundStarted, TrainingFinished,
                                     TrainingStarted)
from fednb.notebook.sidebar_state import TARGET, RunTracker, listed, parse_request, party_rows, snapshot
from tests.jupyter_fixtures import ROOT, jupyter_environment

LABEXTENSION = ROOT / "labextension"
CI = os.environ.get("CI") == "true"


def skip_or_fail(why: str) -> None:
    """Skip loudly on a developer machine; fail under CI, where everything must run."""
    message = f"\n\n*** {why} ***\n"
    if CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# -- the formats, no kernel -----------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    None, [], "stop", {"type": "exec", "code": "import os"}, {"type": "stop", "id": "x"},
    {"type": "approve"}, {"type": "approve", "id": ""}, {"type": "deny", "id": 7}, {"type": "deny", "id": "a" * 129},
    {"type": "deny", "id": "a\nb"}, {"type": "refresh", "extra": 1},
])
def test_bad_requests_from_the_panel_are_refused(data: Any) -> None:
    with pytest.raises(ValueError):
        parse_request(data)


def test_good_requests_from_the_panel() -> None:
    assert parse_request({"type": "stop"}).type == "stop"
    assert parse_request({"type": "approve", "id": "ab" * 32}).id == "ab" * 32


def test_a_population_is_counted_and_only_its_round_and_troubled_parties_are_listed() -> None:
    from types import SimpleNamespace

    status = [SimpleNamespace(name=f"party-{k}", status="offline" if k == 9 else "online") for k in range(5000)]
    shown, population = listed(status, {"party-3": "training", "party-4": "done"})
    assert [row.name for row in shown] == ["party-3", "party-4", "party-9"]
    assert population == {"parties": 5000, "online": 4999, "shown": 3}
    rows = party_rows([SimpleNamespace(name=r.name, endpoint="ipc:///x", status=r.status, examples=8, last_round=None,
                                       last_error="") for r in shown], {}, {})
    message = snapshot(1, parties=rows, run=None, background=False, approvals=None, population=population)
    assert message["federation"]["population"] == population and len(message["federation"]["parties"]) == 3
    few, none = listed(status[:10], {})
    assert few == status[:10] and none is None
    assert "population" not in snapshot(1, parties=[], run=None, background=False, approvals=None)["federation"]


def test_the_run_tracker_counts_rounds_within_the_run() -> None:
    clock = iter([100.0, 107.5, 110.0]).__next__
    tracker = RunTracker(clock)
    assert tracker.view() == (None, {})
    tracker(TrainingStarted(rounds=3, strategy="fedavg", parties=("a", "b"), first_round=11))
    tracker(RoundStarted(round=11, rounds=13, parties=("a", "b")))
    tracker(PartyDone(round=11, party="a", examples=10, metrics={}, seconds=0.1))
    tracker(PartyDropped(round=11, party="b", reason="timeout", late=True))
    run, activity = tracker.view()
    assert run is not None and (run["round"], run["rounds"], run["rounds_done"]) == (1, 3, 0)
    assert run["elapsed"] == 7.5 and activity == {"a": "done", "b": "late"}
    tracker(RoundAggregated(round=11, rounds=13, metrics={"loss": 2.0}, evaluation={"accuracy": 0.5,
                                                                                      "loss": float("nan")}))
    tracker.stopping()
    tracker(TrainingFinished(rounds_done=1, stopped=True))
    run, activity = tracker.view()
    assert run is not None and run["state"] == "stopped" and run["rounds_done"] == 1
    assert (run["accuracy"], run["loss"]) == (0.5, None)  # NaN never reaches JSON
    assert run["elapsed"] == 10.0 and activity == {}
    json.dumps(snapshot(1, parties=[], run=run, background=False, approvals=None), allow_nan=False)


def test_the_sidebar_reads_the_session_not_the_magics() -> None:
    """The bridge and the magics share one Session; the bridge never reaches into FedMagics."""
    from fednb.notebook.session import Session
    from fednb.notebook.sidebar import SidebarBridge

    source = (ROOT / "fednb" / "notebook" / "sidebar.py").read_text()
    assert "magics" not in source.lower()

    class Manager:
        def register_target(self, *args: Any) -> None: ...
        def unregister_target(self, *args: Any) -> None: ...

    class Comm:
        def on_msg(self, callback: Any) -> None: ...
        def on_close(self, callback: Any) -> None: ...
        def close(self) -> None: ...

    session = Session(shell=None)
    bridge = SidebarBridge(session, Manager(), lambda **kw: Comm())
    bridge.start()
    try:
        assert bridge._act(parse_request({"type": "stop"})) == (False, "nothing is training")
        assert len(session._listeners) == 1  # it follows the session's changes
    finally:
        bridge.close()
    assert session._listeners == []


# -- the TypeScript model, with node's own test runner ---------------------------------------------

def test_typescript_model_and_type_check() -> None:
    """`jlpm test` compiles the model and its tests and runs them; `typecheck` checks all sources."""
    jlpm = shutil.which("jlpm", path=str(Path(sys.executable).parent)) or shutil.which("jlpm")
    if jlpm is None or shutil.which("node") is None or not (LABEXTENSION / "node_modules").is_dir():
        skip_or_fail("node, jlpm or labextension/node_modules is missing: `pip install -e .` builds them "
                     "(FEDNB_SKIP_JS=1 skips the JS build)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for script in ("typecheck", "test"):
        done = subprocess.run([jlpm, "run", script], cwd=LABEXTENSION, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"jlpm run {script} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "# fail 0" in done.stdout and "# pass" in done.stdout, done.stdout[-2000:]


# -- the bridge in a real kernel, spoken to like JupyterLab would -----------------------------------

class KernelSession:
    """A kernel of this venv and a client that opens comms and collects what arrives on them."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.messages: list[dict[str, Any]] = []

    def execute(self, code: str, timeout: float = 120) -> dict[str, Any]:
        msg_id = self.client.execute(code)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.client.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                self.drain(0.2)
                assert reply["content"]["status"] == "ok", reply["content"]
                return reply

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.client.get_iopub_msg(timeout=0.05))
            except Exception:  # queue.Empty
                continue

    def comm_open(self, data: dict[str, Any] | None = None) -> str:
        comm_id = uuid.uuid4().hex
        self._send("comm_open", {"comm_id": comm_id, "target_name": TARGET, "data": data or {}})
        return comm_id

    def comm_send(self, comm_id: str, data: Any) -> None:
        self._send("comm_msg", {"comm_id": comm_id, "data": data})

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        self.client.shell_channel.send(self.client.session.msg(msg_type, content))

    def on(self, comm_id: str) -> list[dict[str, Any]]:
        return [m["content"]["data"] for m in self.messages
                if m["msg_type"] == "comm_msg" and m["content"].get("comm_id") == comm_id]

    def wait_for(self, comm_id: str, test: Any, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for data in self.on(comm_id):
                if test(data):
                    return data
            self.drain(0.2)
        raise AssertionError(f"nothing matched on comm {comm_id}; last: {self.on(comm_id)[-3:]}")


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KernelSession]:
    from jupyter_client.manager import start_new_kernel

    for key, value in jupyter_environment(tmp_path).items():
        monkeypatch.setenv(key, value)
    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        yield KernelSession(client)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        manager.cleanup_resources()


def snapshots(data: dict[str, Any]) -> bool:
    return data.get("type") == "snapshot"


def results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [data for data in messages if data.get("type") == "result"]


def test_the_kernel_bridge_speaks_only_the_sidebar_protocol(kernel: KernelSession) -> None:
    kernel.execute("%load_ext fednb")
    opened = [m for m in kernel.messages if m["msg_type"] == "comm_open"]
    assert [m["content"]["target_name"] for m in opened] == [TARGET], "no doorbell on %load_ext"
    assert opened[0]["content"]["data"] == {"type": "hello", "version": 1}
    info = kernel.client.comm_info(target_name=TARGET, reply=True)["content"]
    assert list(info["comms"]) == [opened[0]["content"]["comm_id"]], "a later front end cannot find fednb"

    comm = kernel.comm_open()
    first = kernel.wait_for(comm, snapshots)
    assert first["federation"] is None and first["run"] is None and first["approvals"] is None

    for bad in ({"type": "exec", "code": "open('/etc/passwd').read()"}, "stop", {"type": "approve", "id": ""}):
        kernel.comm_send(comm, bad)
    kernel.comm_send(comm, {"type": "stop"})
    kernel.comm_send(comm, {"type": "approve", "id": "ab" * 32})
    kernel.wait_for(comm, lambda d: len(results(kernel.on(comm))) >= 5)
    replies = results(kernel.on(comm))
    assert [(r["request"], r["ok"]) for r in replies] == [("invalid", False)] * 3 + [("stop", False),
                                                                                    ("approve", False)]
    assert replies[3]["message"] == "nothing is training" and "%fed_serve" in replies[4]["message"]

    kernel.execute("%fed_sim 2 --seed 1")
    sim = kernel.wait_for(comm, lambda d: snapshots(d) and d["federation"] is not None and
                          sum(p["status"] == "online" for p in d["federation"]["parties"]) == 2)
    assert [p["name"] for p in sim["federation"]["parties"]] == ["party-0", "party-1"]
    assert all(p["examples"] > 0 and p["endpoint"].startswith("ipc://") for p in sim["federation"]["parties"])

    kernel.execute("%%fed_model\nimport torch.nn as nn\nmodel = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), "
                   "nn.Linear(16, 10))")
    kernel.execute("%fed_train --rounds 200 --background")
    kernel.wait_for(comm, lambda d: snapshots(d) and (d["run"] or {}).get("rounds_done", 0) >= 1)
    kernel.comm_send(comm, {"type": "stop"})
    stopped = kernel.wait_for(comm, lambda d: snapshots(d) and (d["run"] or {}).get("state") == "stopped")
    assert stopped["run"]["background"] is True and 1 <= stopped["run"]["rounds_done"] < 200
    assert stopped["run"]["strategy"] == "fedavg" and stopped["run"]["rounds"] == 200
    assert 0 <= stopped["run"]["accuracy"] <= 1 and stopped["run"]["elapsed"] > 0
    seqs = [d["seq"] for d in kernel.on(comm) if snapshots(d)]
    assert seqs == sorted(seqs) and len(seqs) < 10 * stopped["run"]["rounds_done"] + 20, "snapshots not throttled"

    kernel.execute("%fed_close")
    kernel.wait_for(comm, lambda d: snapshots(d) and d["federation"] is None and d["run"] is None)
    kernel.execute("%unload_ext fednb")
    closed = {m["content"]["comm_id"] for m in kernel.messages if m["msg_type"] == "comm_close"}
    assert comm in closed and opened[0]["content"]["comm_id"] in closed
    assert kernel.client.comm_info(target_name=TARGET, reply=True)["content"]["comms"] == {}


# A party served in the kernel with %fed_serve, and a coordinator (in a thread of the same
# kernel) whose request waits for the owner's approval.
SERVE_DATA = """\
import pathlib, tempfile, threading
import numpy as np
import fednb

place = pathlib.Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
np.savez(place / "train.npz", x=rng.normal(size=(40, 4)).astype("float32"), y=np.arange(40) % 2)
"""
SERVE = "%fed_serve --name clinic --listen ipc://{place}/clinic.sock --data train={place}/train.npz --dir {place}/party"
ASK = """\
coordinator = fednb.connect([{"name": "clinic", "endpoint": f"ipc://{place}/clinic.sock"}], timeout=60)
answer = {}
asking = threading.Thread(target=lambda: answer.update(coordinator.run("6 * 7", timeout=120)), daemon=True)
asking.start()
"""
ANSWER = "asking.join(60); coordinator.close()\nprint(dict(answer))"


def test_a_served_partys_pending_requests_are_approved_from_the_panel(kernel: KernelSession) -> None:
    kernel.execute("%load_ext fednb")
    comm = kernel.comm_open()
    kernel.wait_for(comm, snapshots)
    kernel.execute(SERVE_DATA)
    kernel.execute(SERVE)
    kernel.execute(ASK)
    waiting = kernel.wait_for(comm, lambda d: snapshots(d) and bool(d["approvals"]))
    [request] = waiting["approvals"]
    assert request["kind"] == "run" and request["code"] == "6 * 7" and len(request["id"]) == 64
    assert request["returns"].startswith("numbers") and request["age"] >= 0
    kernel.comm_send(comm, {"type": "deny", "id": "0" * 64})
    kernel.wait_for(comm, lambda d: results(kernel.on(comm)) != [])
    assert results(kernel.on(comm))[-1]["ok"] is False
    kernel.comm_send(comm, {"type": "approve", "id": request["id"]})
    kernel.wait_for(comm, lambda d: snapshots(d) and d["approvals"] == [])
    kernel.wait_for(comm, lambda d: len(results(kernel.on(comm))) == 2)
    assert results(kernel.on(comm))[-1] == {"type": "result", "request": "approve", "ok": True,
                                            "message": f"approved {request['id'][:12]}"}
    reply = kernel.execute(ANSWER)
    out = "".join(m["content"].get("text", "") for m in kernel.messages if m["msg_type"] == "stream"
                  and m["content"]["name"] == "stdout" and m["parent_header"].get("msg_id") == reply["parent_header"]["msg_id"])
    assert out.strip() == "{'clinic': 42}"
