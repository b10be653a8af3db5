"""The command line as a data owner and a coordinator use it: keys, a party process, connect."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fednb
from tests.conftest import FEDNB, MLP, build, cli

@pytest.fixture
def data_files(tmp_path, digits_parts):
    """One party's digits as .npz (train) and .csv (test); labels named "digit" in both."""
    part = digits_parts[0]
    npz = tmp_path / "train.npz"
    np.savez(npz, x=part.x_train, digit=part.y_train)  # --label names the label array of .npz too
    csv = tmp_path / "test.csv"
    header = ",".join([f"f{i}" for i in range(part.x_test.shape[1])] + ["digit"])
    rows = [",".join([*(f"{v:.6g}" for v in x), str(int(y))]) for x, y in zip(part.x_test, part.y_test)]
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    return npz, csv, part


def test_keys_new_writes_a_private_secret_and_show_prints_the_public_key(tmp_path):
    done = cli("keys", "new", str(tmp_path / "k" / "party"))
    public = (tmp_path / "k" / "party.key")
    secret = (tmp_path / "k" / "party.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and public.exists()
    key = cli("keys", "show", str(public)).stdout.strip()
    assert len(key) == 40 and key in done.stdout
    again = cli("keys", "new", str(tmp_path / "k" / "party"), check=False)
    assert again.returncode == 2 and "exists" in again.stderr


def test_party_cli_and_connect_over_tcp_with_curve(tmp_path, cli_parties, data_files):
    npz, csv, part = data_files
    cli("keys", "new", str(tmp_path / "party"))
    cli("keys", "new", str(tmp_path / "coordinator"))
    cli("keys", "new", str(tmp_path / "stranger"))
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"# who may connect\n{cli('keys', 'show', str(tmp_path / 'coordinator')).stdout.strip()} "
                          "coordinator@lab\n")
    party = cli_parties("--name", "clinic-a", "--listen", "tcp://127.0.0.1:*", "--key", str(tmp_path / "party"),
                    "--authorized-keys", str(authorized), "--data", f"train={npz}", "--data", f"test={csv}",
                    "--label", "digit", "--threads", "1", "--policy", "open", "--dir", str(tmp_path / "clinic-a"))
    endpoint = party.wait_listening()
    assert endpoint.startswith("tcp://127.0.0.1:")
    toml = tmp_path / "parties.toml"
    toml.write_text(f'[[party]]\nname = "clinic-a"\nendpoint = "{endpoint}"\npublic_key = "party.key"\n')

    with fednb.connect(toml, key=tmp_path / "coordinator", timeout=20) as fed:
        (row,) = fed.status()
        assert row.status == "online" and row.examples == len(part.y_train)
        history = fed.train(build(), MLP, rounds=2, lr=0.05, momentum=0.9, epochs=2, batch_size=16, min_parties=1)
        assert history[-1].evaluation["accuracy"] > 0.7
        assert history[-1].party_evaluation["clinic-a"]["examples"] == len(part.y_test)  # the CSV test split

    # a key the party does not list is refused, and said so
    with pytest.raises(fednb.FederationError, match="refused our key"):
        fednb.connect(toml, key=tmp_path / "stranger", timeout=5)
    assert party.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.parametrize("args, message", [
    (["--listen", "tcp://127.0.0.1:*"], "needs --key and --authorized-keys"),
    (["--listen", "tcp://127.0.0.1:*", "--key", "KEY", "--authorized-keys", "MISSING"], "do not exist"),
    (["--listen", "ipc:///tmp/fednb-world/p.sock"], "private directory"),
])
def test_party_cli_refuses_unsafe_or_broken_setups(tmp_path, data_files, args, message):
    npz, _, _ = data_files
    cli("keys", "new", str(tmp_path / "k"))
    os.makedirs("/tmp/fednb-world", mode=0o755, exist_ok=True)
    os.chmod("/tmp/fednb-world", 0o755)
    args = [a.replace("KEY", str(tmp_path / "k")).replace("MISSING", str(tmp_path / "none")) for a in args]
    done = cli("party", "--name", "p", *args, "--data", f"train={npz}", "--label", "digit", check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_party_cli_refuses_bad_data(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    private = tmp_path / "sock"
    private.mkdir(mode=0o700)
    done = cli("party", "--name", "p", "--listen", f"ipc://{private}/p.sock", "--data", f"train={bad}", check=False)
    assert done.returncode == 2 and "bad.npz" in done.stderr
    done = cli("party", "--name", "p", "--listen", f"ipc://{private}/p.sock", "--data", "valid=x.npz", check=False)
    assert done.returncode == 2 and "train=FILE" in done.stderr


def test_demo_runs_end_to_end():
    """`fednb demo` with fewer rounds: one line per round, then the centralized comparison."""
    done = cli("demo", "--parties", "2", "--rounds", "3")
    lines = done.stdout.splitlines()
    rounds = [line for line in lines if re.match(r"\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+s$", line)]
    assert len(rounds) == 3
    assert any(line.startswith("federated accuracy") for line in lines)
    assert any(line.startswith("centralized accuracy") for line in lines)


def test_module_entry_point_matches_the_console_script():
    assert Path(sys.executable).with_name("fednb").exists()
    assert cli("--version").stdout.strip() == f"fednb {fednb.__version__}"


@pytest.mark.parametrize("secure", [False, True], ids=["ipc", "ipc+curve"])
def test_fednb_sim_serves_parties_that_connect_can_reach(secure):
    """`fednb sim N` prints the connect call; running it reaches the parties; SIGTERM stops them all."""
    args = [*FEDNB, "sim", "2", "--dataset", "synthetic", "--partition", "iid", *(["--secure"] if secure else [])]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        call = re.search(r"(fednb\.connect\(.*\))", lines[1]).group(1)
        assert ("key=" in call) == secure
        with eval(call, {"fednb": fednb}) as fed:  # noqa: S307 - the line fednb itself printed
            assert fed.run("len(train.dataset)") == {"party-0": 1200, "party-1": 1200}
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
