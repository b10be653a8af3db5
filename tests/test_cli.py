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
    made = cli("keys", "new", str(tmp_path / "coordinator")).stdout
    cli("keys", "new", str(tmp_path / "other"))
    cli("keys", "new", str(tmp_path / "stranger"))
    # the authorized-keys line that `fednb keys new` prints, and another coordinator's .key file pasted as it is
    key = cli("keys", "show", str(tmp_path / "coordinator")).stdout.strip()
    assert f"\n            {key} coordinator\n" in made and "authorized-keys file" in made
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"# who may connect\n{key} coordinator\n{(tmp_path / 'other.key').read_text()}")
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

    with fednb.connect(toml, key=tmp_path / "other", timeout=20) as fed:  # the pasted .key file
        assert [row.status for row in fed.status()] == ["online"]
    # a key the party does not list is refused, and said so
    with pytest.raises(fednb.FederationError, match="refused our key"):
        fednb.connect(toml, key=tmp_path / "stranger", timeout=5)
    assert party.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.parametrize("args, message", [
    (["--listen", "tcp://127.0.0.1:*"], "needs --key and --authorized-keys"),
    (["--listen", "tcp://127.0.0.1:*", "--key", "KEY", "--authorized-keys", "MISSING"], "do not exist"),
    (["--listen", "ipc://WORLD/p.sock"], "private directory"),
])
def test_party_cli_refuses_unsafe_or_broken_setups(tmp_path, data_files, args, message):
    npz, _, _ = data_files
    cli("keys", "new", str(tmp_path / "k"))
    world = tmp_path / "world"  # a socket directory others may read: refused
    world.mkdir()
    world.chmod(0o755)
    args = [a.replace("KEY", str(tmp_path / "k")).replace("MISSING", str(tmp_path / "none")).replace("WORLD", str(world))
            for a in args]
    done = cli("party", "--name", "p", *args, "--data", f"train={npz}", "--label", "digit", check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_party_cli_serves_a_vertical_table_by_its_id_column(tmp_path, cli_parties):
    """--id-column: the label party and a feature party (no label column) of FATE's breast_hetero."""
    fate = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"
    private = tmp_path / "sock"
    private.mkdir(mode=0o700)
    specs = []
    for name, table in (("bank", "breast_hetero_guest.csv"), ("partner", "breast_hetero_host.csv")):
        party = cli_parties("--name", name, "--listen", f"ipc://{private}/{name}.sock", "--data",
                            f"train={fate / table}", "--id-column", "id", "--label", "y", "--policy", "open",
                            "--threads", "1", "--dir", str(tmp_path / name))
        specs.append({"name": name, "endpoint": party.wait_listening()})
    with fednb.connect(specs, timeout=20) as fed:
        assert {row.name: (row.status, row.examples) for row in fed.status()} == {
            "bank": ("online", 569), "partner": ("online", 569)}  # every row: vertical parties split after PSI
        described = {s["name"]: fed._connections.snapshot()[s["name"]]["info"]["datasets"] for s in specs}
        assert described == {
            "bank": {"train": {"examples": 569, "features": [10], "ids": True, "label": True, "classes": 2}},
            "partner": {"train": {"examples": 569, "features": [20], "ids": True, "label": False}}}


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
    announced = [i for i, line in enumerate(lines) if line.startswith("training the same model centrally")]
    result = [i for i, line in enumerate(lines) if line.startswith("centralized accuracy")]
    assert announced and result and announced[0] < result[0], done.stdout  # no silent minute after the last round


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


def one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The CLI's error contract: exit status 2, no traceback, one `fednb COMMAND: error: …` line last."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith(f"fednb {command}: error: ") and len(done.stderr.split("error:")) == 2, done.stderr
    return lines[-1]


def test_a_party_on_a_port_in_use_says_so_in_one_line(tmp_path, data_files):
    import socket

    npz, _, _ = data_files
    cli("keys", "new", str(tmp_path / "party"))
    cli("keys", "new", str(tmp_path / "coordinator"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["party", "--name", "p", "--listen", f"tcp://127.0.0.1:{port}", "--key", str(tmp_path / "party"),
                "--authorized-keys", str(tmp_path / "coordinator.key"), "--data", f"train={npz}", "--label", "digit",
                "--dir", str(tmp_path / "p")]
        done = cli(*args, check=False)
    line = one_error_line(done, "party")
    assert line.endswith(f"cannot listen on tcp://127.0.0.1:{port}: the address is in use (another party or "
                         "program has it; choose another port)")
    logged = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ fednb[.\w]* (INFO|WARNING) ")
    assert all(logged.match(other) for other in done.stderr.splitlines()[:-1]), done.stderr  # the rest: log records


@pytest.mark.parametrize("args, message", [
    (["audit", "NOWHERE"], "is not a party directory"),
    (["approve", "NOWHERE"], "is not a party directory"),
    (["keys", "show", "NOWHERE/k"], "neither a 40-character Z85 key nor a key file"),
    (["keys", "new", "/proc/fednb/k"], "/proc/fednb"),  # an OSError: the file it names, and why
    (["sim", "0"], "n must be an integer"),
])
def test_every_subcommand_reports_errors_in_one_line(tmp_path, args, message):
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")) for a in args]
    assert message in one_error_line(cli(*args, check=False), args[0])


def test_audit_into_a_closed_pipe_is_quiet(tmp_path):
    """`fednb audit DIR | head`: the reader leaving is no error, and no BrokenPipeError is printed."""
    from fednb.party.audit import AuditLog
    from fednb.party.directory import open_directory

    directory = open_directory(tmp_path / "party", create=True)
    audit = AuditLog(directory)
    for number in range(300):  # more than a pipe holds
        audit.append({"coordinator": "alice", "type": "run", "request": f"{number:032x}", "decision": "run",
                      "outcome": "ok"})
    # the reader is gone before fednb writes a byte: every write fails with EPIPE
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([*FEDNB, "audit", str(directory)], stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(writer)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == ""
    # as a user types it
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {' '.join(FEDNB)} audit {directory} | head -n 2"],
                          capture_output=True, text=True, timeout=60)
    assert done.stderr == "" and len(done.stdout.splitlines()) == 2 and done.returncode in (0, 128 + signal.SIGPIPE)


def test_approve_without_a_match_lists_what_is_pending(tmp_path):
    from fednb.party.approvals import Approvals
    from fednb.party.directory import open_directory
    from fednb.party.policy import request_code

    directory = open_directory(tmp_path / "clinic", create=True)
    line = one_error_line(cli("approve", str(directory), "--approve", "deadbeef", check=False), "approve")
    assert line.endswith(f"no pending request matches deadbeef: nothing is pending in {directory}")
    code = request_code("run", {"source": "label_counts(train)"})
    assert Approvals(directory).add_pending(code, "alice@lab", "numbers")
    line = one_error_line(cli("approve", str(directory), "--approve", "deadbeef", check=False), "approve")
    assert line.endswith(f"no pending request matches deadbeef: pending in {directory}: {code.hash[:12]} "
                         "(run from alice@lab)")
    assert "give more digits" not in line
    assert cli("approve", str(directory), "--approve", code.hash[:12]).stdout.startswith(f"approved {code.hash}")


def test_a_mistyped_key_path_names_the_key_that_exists(tmp_path, data_files):
    npz, _, _ = data_files
    cli("keys", "new", str(tmp_path / "keys" / "clinic-a"))
    base = ["party", "--name", "p", "--listen", "tcp://127.0.0.1:*", "--authorized-keys",
            str(tmp_path / "keys" / "clinic-a.key"), "--data", f"train={npz}", "--label", "digit"]
    typo = one_error_line(cli(*base, "--key", str(tmp_path / "keys" / "clinci-a"), check=False), "party")
    assert typo.endswith(f"{tmp_path}/keys/clinci-a.key_secret does not exist; did you mean {tmp_path}/keys/clinic-a?")
    assert "keys new" not in typo
    nowhere = one_error_line(cli(*base, "--key", str(tmp_path / "kyes" / "clinic-a"), check=False), "party")
    assert "nor does the directory" in nowhere and "keys new" not in nowhere
    (tmp_path / "fresh").mkdir()
    fresh = one_error_line(cli(*base, "--key", str(tmp_path / "fresh" / "party"), check=False), "party")
    assert fresh.endswith(f"to make a keypair there: fednb keys new {tmp_path}/fresh/party")


def test_the_party_help_documents_the_authorized_keys_format():
    text = " ".join(cli("party", "--help").stdout.split())
    assert "An authorized-keys file (--authorized-keys FILE) lists, as ssh's does, one coordinator per line" in text
    assert "may be pasted as it is" in text and "directory (--authorized-keys DIR)" in text


def test_a_build_without_node_says_what_to_do_in_one_line(tmp_path):
    """The wheel's build hook, run with a PATH that has no node: install Node.js, or FEDNB_SKIP_JS=1."""
    hook = Path(__file__).resolve().parents[1] / "labextension" / "build_hook.py"
    call = f"import runpy; runpy.run_path({str(hook)!r})['build']('wheel', '0.1.0')"
    env = {k: v for k, v in os.environ.items() if k != "FEDNB_SKIP_JS"}
    done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=60,
                          env={**env, "PATH": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == ["fednb: building the JupyterLab extension needs Node.js >= 18, and node is "
                                        "not on PATH: install it (e.g. apt-get install nodejs), or set "
                                        "FEDNB_SKIP_JS=1 to build fednb without its JupyterLab extension"]
    skipped = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=60,
                             env={**env, "PATH": str(tmp_path), "FEDNB_SKIP_JS": "1"}, cwd=tmp_path)
    assert skipped.returncode == 0 and "not built" in skipped.stderr
    old = tmp_path / "node"  # a node too old for JupyterLab 4
    old.write_text("#!/bin/sh\necho v16.20.0\n")
    old.chmod(0o755)
    done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=60,
                          env={**env, "PATH": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode == 1 and "is v16.20.0: upgrade it, or set FEDNB_SKIP_JS=1" in done.stderr
