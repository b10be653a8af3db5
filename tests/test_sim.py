"""Local simulation: real processes that start fast and never outlive their coordinator."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fednb
from tests.conftest import MLP, build, wait_until


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_close_stops_every_process_and_removes_the_private_dir():
    fed = fednb.simulate(3, dataset="synthetic", partition="iid")
    host = fed.simulation
    pids = host.pids
    assert len(pids) == 4 and all(alive(pid) for pid in pids)
    assert stat.S_IMODE(host.directory.stat().st_mode) == 0o700
    assert all(p["endpoint"].startswith(f"ipc://{host.directory}/") for p in host.parties)
    assert host.ready_seconds > 0
    fed.close()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5)
    assert not host.directory.exists()
    fed.close()  # twice is fine
    with pytest.raises(fednb.FederationError, match="closed"):
        fed.run("1")


SCRIPT = """
import json, sys, time
import fednb
fed = fednb.simulate(2, dataset="synthetic", partition="iid")
print(json.dumps({"pids": fed.simulation.pids, "dir": str(fed.simulation.directory)}), flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)          # no close(): interpreter exit must stop the parties
time.sleep(60)           # killed from outside, like a kernel restart
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_parties_die_with_their_coordinator(how):
    """Parties and the private fednb-sim-* directory end with the coordinator, SIGKILL included."""
    coordinator = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), how], stdout=subprocess.PIPE,
                                   cwd=os.getcwd())
    try:
        assert coordinator.stdout is not None
        started = json.loads(coordinator.stdout.readline())
        pids, directory = started["pids"], Path(started["dir"])
        assert len(pids) == 3 and all(alive(pid) for pid in pids) and directory.name.startswith("fednb-sim-")
        assert directory.is_dir()
        if how == "kill":
            coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(30)
        assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10), [p for p in pids if alive(p)]
        assert wait_until(lambda: not directory.exists(), timeout=5), f"{directory} outlived its simulation"
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
        if coordinator.stdout is not None:
            coordinator.stdout.close()


@pytest.mark.parametrize("options", [{"secure": True}, {"transport": "tcp"}], ids=["ipc+curve", "tcp+curve"])
def test_secure_simulations_train(options):
    with fednb.simulate(2, dataset="digits", partition="iid", **options) as fed:
        endpoints = [p["endpoint"] for p in fed.simulation.parties]
        assert all(e.startswith("tcp://127.0.0.1:" if "transport" in options else "ipc://") for e in endpoints)
        assert all(p["public_key"] for p in fed.simulation.parties)
        history = fed.train(build(), MLP, rounds=2, lr=0.05, momentum=0.9, epochs=2, batch_size=16)
        assert len(history[-1].parties) == 2 and history[-1].evaluation["accuracy"] > 0.8


def test_simulate_rejects_bad_arguments_before_starting_anything():
    for kwargs, match in [({"n": 0}, "n must be"), ({"dataset": "imagenet"}, "unknown dataset"),
                          ({"partition": "alphabetical"}, "unknown partition"), ({"alpha": 0}, "alpha"),
                          ({"transport": "udp"}, "transport")]:
        with pytest.raises(ValueError, match=match):
            fednb.simulate(**{"n": 2, **kwargs})


def test_every_bundled_dataset_and_partition_starts():
    from fednb.data import load_dataset

    for dataset, partition in [("breast_cancer", "iid"), ("synthetic", "shards"), ("digits", "dirichlet")]:
        features = load_dataset(dataset).x.shape[1]
        with fednb.simulate(2, dataset=dataset, partition=partition, alpha=1.0) as fed:
            assert all(row.status == "online" and row.examples > 0 for row in fed.status())
            assert fed.run("next(iter(train))[0].shape[1]") == {"party-0": features, "party-1": features}


def test_a_contained_simulation_runs_party_code_in_workers_that_a_timeout_kills():
    """simulate(contained=True): the deployment's worker processes, so a runaway cell is stopped."""
    with fednb.simulate(2, dataset="digits", partition="iid", contained=True) as fed:
        history = fed.train(build(), MLP, rounds=1, lr=0.05, evaluate_every=0)
        assert len(history[-1].parties) == 2
        pid = fed.run("import os\nos.getpid()")
        assert all(p != int(party["pid"]) for p, party in zip(pid.values(), fed.simulation.parties))  # a worker
        started = time.monotonic()
        stuck = fed.run("while True:\n    pass", timeout=1.0)
        assert all(isinstance(v, fednb.PartyError) for v in stuck.values())
        assert fed.run("'alive'") == {"party-0": "alive", "party-1": "alive"}  # the loop was killed, not queued behind
        assert time.monotonic() - started < 10


def test_only_a_simulation_may_run_party_code_in_process(digits_parts):
    from fednb.party import PartyServer
    from tests.conftest import party_datasets

    with pytest.raises(ValueError, match="only a simulation"):
        PartyServer("p", "ipc:///tmp/x.sock", party_datasets(digits_parts[0]), policy="open", contained=False)


def test_every_simulated_party_has_its_budget_and_a_ledger_in_its_own_directory():
    from fednb.privacy.ledger import Ledger, ledger_path

    with fednb.simulate(2, dataset="synthetic", partition="iid", dp_epsilon=2.0) as fed:
        host = fed.simulation
        for party in host.parties:
            directory = host.directory / party["name"]
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            ledger = Ledger(ledger_path(directory))
            assert (ledger.epsilon_budget, ledger.delta, ledger.history) == (2.0, 1e-5, [])
    assert not host.directory.exists()  # the ledgers go with the simulation
    with fednb.simulate(1, dataset="synthetic", partition="iid", dp_epsilon=1.0, dp_delta=1e-6) as fed:
        (party,) = fed.simulation.parties
        assert Ledger(ledger_path(fed.simulation.directory / party["name"])).delta == 1e-6
    with fednb.simulate(1, dataset="synthetic", partition="iid") as fed:  # no budget: no party directory
        assert not (fed.simulation.directory / fed.simulation.parties[0]["name"]).exists()


@pytest.mark.parametrize("budget, match", [
    ({"dp_epsilon": 0}, "dp_epsilon must be a finite number > 0"), ({"dp_epsilon": float("inf")}, "dp_epsilon"),
    ({"dp_epsilon": True}, "dp_epsilon"), ({"dp_epsilon": "3"}, "dp_epsilon"),
    ({"dp_epsilon": 3.0, "dp_delta": 0}, r"dp_delta must be a number in \(0, 1\)"),
    ({"dp_epsilon": 3.0, "dp_delta": 1.0}, "dp_delta"), ({"dp_epsilon": 3.0, "dp_delta": float("nan")}, "dp_delta"),
])
def test_simulate_rejects_a_bad_budget_before_starting_anything(budget, match):
    from fednb.sim import start_host

    with pytest.raises(ValueError, match=match):
        fednb.simulate(2, **budget)
    with pytest.raises(ValueError, match=match):
        start_host(2, **budget)
