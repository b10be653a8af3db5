"""The party's gate across real processes: policies, the owner's CLI, egress, containment, audit."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import numpy as np
import pytest

import fednb
from fednb.errors import PartyError, RoundError
from fednb.federation.events import PartyStatus
from fednb.party.approvals import Approvals
from fednb.party.audit import verify
from fednb.party.directory import open_directory
from fednb.party.policy import request_code
from tests.conftest import MLP, build, wait_until
from tests.conftest import cli as run_cli

MiB = 1 << 20


def approve(directory, type_: str, **content) -> str:
    """Approve one request's code as the owner would, straight in the party directory."""
    code = request_code(type_, {"config": {}, **content})
    Approvals(open_directory(directory, create=False)).approve(code.hash, by="test")
    return code.hash


def audit_lines(directory) -> list[dict]:
    result = verify(directory)
    assert result.intact, result.problem
    return result.entries



def cli(*args: str):
    """`fednb ARGS`, whatever its exit status: the tests read it."""
    return run_cli(*args, check=False)


@pytest.fixture
def npz(tmp_path, digits_parts):
    path = tmp_path / "train.npz"
    np.savez(path, x=digits_parts[0].x_train, y=digits_parts[0].y_train)
    return path


def _connect(endpoint: str):
    return fednb.connect([{"name": "clinic", "endpoint": endpoint}], heartbeat=0.2, heartbeat_timeout=2.0, timeout=20)


# -- policies and the owner's CLI ---------------------------------------------------------------------

def test_allowlist_refuses_at_once_until_approved_and_approvals_survive_a_restart(cli_parties, npz, tmp_path,
                                                                                   private_dir):
    directory = tmp_path / "clinic"
    args = ("--name", "clinic", "--listen", f"ipc://{private_dir}/c.sock", "--data", f"train={npz}",
            "--policy", "allowlist", "--dir", str(directory), "--threads", "1")
    party = cli_parties(*args)
    endpoint = party.wait_listening()
    cell, changed = "label_counts(train)", "label_counts(train) "
    with _connect(endpoint) as fed:
        started = time.monotonic()
        refused = fed.run(cell)["clinic"]
        assert isinstance(refused, PartyError) and refused.error_type == "PolicyRefused"
        assert "allowlist" in refused.message and time.monotonic() - started < 5
        listing = cli("approve", str(directory))
        assert listing.returncode == 0 and "label_counts(train)" in listing.stdout and "allowlist" in listing.stdout
        code = request_code("run", {"source": cell}).hash
        done = cli("approve", str(directory), "--approve", code[:10])
        assert done.returncode == 0 and code in done.stdout
        counts = fed.run(cell)["clinic"]
        assert isinstance(counts, dict) and sum(v for v in counts.values() if v) > 100
        assert isinstance(fed.run(changed)["clinic"], PartyError)  # one byte more: a new hash
    assert party.stop() == 0

    again = cli_parties(*args)
    with _connect(again.wait_listening()) as fed:
        assert isinstance(fed.run(cell)["clinic"], dict)  # the approval survived the restart
        assert fed.run(changed)["clinic"].error_type == "PolicyRefused"
    entries = audit_lines(directory)
    assert [e["decision"] for e in entries] == ["refuse", "run", "refuse", "run", "refuse"]
    assert all(e["coordinator"] == "local" and e["code_hash"] for e in entries)


def test_review_waits_for_the_owner_and_the_coordinator_sees_it(cli_parties, npz, tmp_path, private_dir):
    directory = tmp_path / "clinic"
    party = cli_parties("--name", "clinic", "--listen", f"ipc://{private_dir}/c.sock", "--data", f"train={npz}",
                        "--dir", str(directory), "--threads", "1")  # review is the default
    endpoint = party.wait_listening()
    with _connect(endpoint) as fed:
        statuses: list[PartyStatus] = []
        fed.subscribe(lambda event: statuses.append(event) if isinstance(event, PartyStatus) else None)
        results: dict[str, object] = {}
        worker = threading.Thread(target=lambda: results.update(fed.run("len(train.dataset)", timeout=60)))
        worker.start()
        assert wait_until(lambda: any(s.status == "awaiting approval" for s in statuses), timeout=10)
        detail = next(s.detail for s in statuses if s.status == "awaiting approval")
        assert "awaiting approval at clinic" in detail
        assert fed._connections.snapshot()["clinic"]["awaiting"] == detail
        (row,) = fed.status()  # the parties table says so too
        assert row.status == "awaiting approval" and "awaiting approval at clinic" in row.last_error
        time.sleep(0.5)
        assert worker.is_alive()  # still waiting for the owner
        listing = cli("approve", str(directory))
        assert "len(train.dataset)" in listing.stdout and "asked by" in listing.stdout and "returns" in listing.stdout
        code = request_code("run", {"source": "len(train.dataset)"}).hash
        assert cli("approve", str(directory), "--approve", code, "--rounds", "5").returncode == 0
        worker.join(20)
        assert results["clinic"] > 100
        assert statuses[-1].status == "online"  # nothing waits any more

        # a denial refuses the waiting request, and later ones at once
        denied: dict[str, object] = {}
        worker = threading.Thread(target=lambda: denied.update(fed.run("train.dataset.tensors[0].sum()", timeout=60)))
        worker.start()
        deny = request_code("run", {"source": "train.dataset.tensors[0].sum()"}).hash
        assert wait_until(lambda: (directory / "pending" / f"{deny}.json").exists(), timeout=10)
        assert cli("approve", str(directory), "--deny", deny[:12]).returncode == 0
        worker.join(20)
        assert denied["clinic"].error_type == "PolicyRefused" and "denied" in denied["clinic"].message
        assert fed.run("train.dataset.tensors[0].sum()")["clinic"].error_type == "PolicyRefused"

        # a request the owner does not decide in time is dropped, and says why
        late = fed.run("len(train.dataset) * 2", timeout=1)["clinic"]
        assert "awaiting approval at clinic" in late.message and "not approved within 1 s" in late.message
    entries = audit_lines(directory)
    assert entries[0]["notes"] == ["waited for the owner"] and entries[0]["outcome"] == "ok"
    assert Approvals(directory).approved()[code]["rounds"] == 4  # one of five runs used

    # the audit CLI: intact, then any edited line is found
    shown = cli("audit", str(directory))
    assert shown.returncode == 0 and "intact: 4 entries" in shown.stdout
    assert "cancelled while awaiting approval" in shown.stdout
    lines = (directory / "audit.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"outcome":"refused"', '"outcome":"ok"')
    (directory / "audit.jsonl").write_text("".join(lines))
    shown = cli("audit", str(directory))
    assert shown.returncode == 1 and "BROKEN" in shown.stdout


# -- egress ---------------------------------------------------------------------------------------------

@pytest.fixture
def guarded(start_party, private_dir, tmp_path):
    """An in-process party under policy allowlist, with its directory, and a federation on it."""
    directory = tmp_path / "clinic"
    party = start_party(f"ipc://{private_dir}/p.sock", policy="allowlist", directory=directory, heartbeat=0.2,
                        timeout=5.0, time_limit=3.0, memory_limit=256 * MiB)
    with fednb.connect([{"name": "p", "endpoint": party.endpoint}], heartbeat=0.2, heartbeat_timeout=2.0) as fed:
        yield fed, directory


TRAIN_CELLS = {
    "renamed data tensor": ("del model[0].weight\nmodel[0].register_parameter("
                            "'weight_x', nn.Parameter(train.dataset.tensors[0][:32, :64].T.clone()))",
                            "no longer matches"),
    "extra key": ("model.register_buffer('leak', train.dataset.tensors[0][:4].clone())", "no longer matches"),
    "wrong shape": ("model[2].bias = nn.Parameter(torch.zeros(11))", "no longer matches"),
    "NaN": ("with torch.no_grad():\n    model[0].weight[0, 0] = float('nan')", "non-finite"),
    "string metric": ("report(note='secret text')", "number"),
    "17 metrics": ("report(**{f'm{i}': 1.0 for i in range(17)})", "16"),
    "data in a metric name": ("report(**{'patient_' + str(int(train.dataset.tensors[1][0])) + ' x': 1.0})",
                              "plain name"),
}


@pytest.mark.parametrize("case", list(TRAIN_CELLS))
def test_off_spec_training_replies_are_blocked_and_logged(guarded, case):
    fed, directory = guarded
    cell, why = TRAIN_CELLS[case]
    approve(directory, "train", source=MLP, train_cell=cell)
    with pytest.raises(RoundError, match=why):
        fed.train(build(), MLP, rounds=1, train_cell=cell, min_parties=1, evaluate_every=0)
    (entry,) = audit_lines(directory)
    assert entry["decision"] == "run" and entry["outcome"].startswith(("blocked", "error"))
    assert entry["bytes_out"] < 2000  # an error, no tensors


def test_run_results_pass_the_guard(guarded):
    fed, directory = guarded
    cells = {
        "raw rows": "datasets['train'].tensors[0][:3]",
        "one raw row as a list": "train.dataset.tensors[0][5].tolist()",
        "a count of 3": "3",
        "counts": "{'rare': 3, 'total': len(train.dataset), 'mean': float(train.dataset.tensors[0].mean())}",
        "a string": "'hello'",
        "too many values": "train.dataset.tensors[0].mean(dim=1).repeat(3)",
        "an error with data in it": "raise KeyError(str(train.dataset.tensors[0][0].tolist()))",
    }
    for cell in cells.values():
        approve(directory, "run", source=cell)
    results = {name: fed.run(cell)["p"] for name, cell in cells.items()}
    for name in ("raw rows", "one raw row as a list", "a string", "too many values"):
        assert isinstance(results[name], PartyError) and results[name].error_type == "EgressBlocked", name
    assert "raw row" in results["raw rows"].message
    assert results["a count of 3"] is None  # suppressed: under the minimum group size
    counts = results["counts"]
    assert counts["rare"] is None and counts["total"] > 100 and 0 < counts["mean"] < 1
    error = results["an error with data in it"]
    assert error.error_type == "KeyError" and "line 1" in error.message and "[" not in error.message
    assert not error.traceback
    outcomes = [e["outcome"] for e in audit_lines(directory)]
    assert sum(o.startswith("blocked") for o in outcomes) == 4 and sum("suppressed" in o for o in outcomes) == 2


# -- contained execution ---------------------------------------------------------------------------------

def test_crashes_memory_and_endless_loops_are_contained(guarded):
    fed, directory = guarded
    cells = {
        "raise": "x = 1\nraise ValueError('no')",
        "memory": "import numpy as np\nnp.ones(2 * 1024**3 // 8).sum()",
        "loop": "while True:\n    pass",
        "crash": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
        "write the data": "datasets['train'].tensors[0][0, 0] = 99.0",
        "ok": "float(train.dataset.tensors[0][0, 0])",
        "define": "kept = 41.5\nkept",
        "use": "kept + 1",
    }
    for cell in cells.values():
        approve(directory, "run", source=cell)
    first = fed.run(cells["ok"])["p"]
    assert fed.run(cells["define"])["p"] == 41.5 and fed.run(cells["use"])["p"] == 42.5  # the namespace persists
    expected = {"raise": "ValueError", "memory": "MemoryError", "loop": "TimeLimit", "crash": "WorkerCrashed",
                "write the data": "WorkerCrashed"}
    for name, error_type in expected.items():
        started = time.monotonic()
        error = fed.run(cells[name])["p"]
        assert isinstance(error, PartyError) and error.error_type == error_type, (name, error)
        assert time.monotonic() - started < 10
        assert fed.run(cells["ok"])["p"] == first  # the party answers the next request; the data is unchanged
    assert isinstance(fed.run(cells["use"])["p"], PartyError)  # a killed worker's namespace is gone (NameError)


def test_a_cancelled_request_stops_running_at_the_party(start_party, private_dir):
    party = start_party(f"ipc://{private_dir}/p.sock", heartbeat=0.2, timeout=5.0, time_limit=60.0)
    with fednb.connect([{"name": "p", "endpoint": party.endpoint}], heartbeat=0.2, heartbeat_timeout=2.0) as fed:
        late = fed.run("while True:\n    pass", timeout=0.5)["p"]
        assert isinstance(late, PartyError) and "no reply" in late.message
        started = time.monotonic()
        assert fed.run("1 + 1", timeout=10)["p"] == 2  # answered at once: the loop was killed, not waited for
        assert time.monotonic() - started < 5


def test_the_simulation_auto_approves():
    with fednb.simulate(2, seed=0) as fed:
        assert all(row.status == "online" for row in fed.status())
        values = fed.run("'text may leave a simulation'")
        assert set(values.values()) == {"text may leave a simulation"}
        assert fed._connections.snapshot()[fed.parties[0]]["info"]["policy"] == "simulation"


def test_audit_json_lines_carry_the_issue_fields(guarded):
    fed, directory = guarded
    approve(directory, "run", source="1")
    fed.run("1")
    (entry,) = audit_lines(directory)
    for key in ("time", "coordinator", "type", "code_hash", "decision", "bytes_in", "bytes_out", "outcome", "prev"):
        assert key in entry
    assert json.loads((directory / "audit.head").read_text())["entries"] == 1
