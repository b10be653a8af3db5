"""The privacy budget on the command line: `fednb party --dp-epsilon`, and `fednb privacy DIR` reading the ledger."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from fednb.party.directory import open_directory
from fednb.privacy.accountant import Mechanism
from fednb.privacy.ledger import Ledger, ledger_path
from tests.conftest import cli

DPSGD = Mechanism("dpsgd", 0.01, 1.1, 100)


def error_line(done: subprocess.CompletedProcess[str], command: str, status: int = 2, *, alone: bool = True) -> str:
    """The CLI's error contract: this exit status, no traceback, one `fednb COMMAND: error: …` line last
    (``alone``: and nothing else; a party's log records come before it)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith(f"fednb {command}: error: ") and done.stderr.count("error:") == 1, done.stderr
    assert len(lines) == 1 or not alone, done.stderr
    return lines[-1]


@pytest.fixture
def charged(tmp_path):
    """A party directory whose ledger has a budget of ε = 3 and one DP-SGD charge."""
    directory = open_directory(tmp_path / "clinic", create=True)
    entry = Ledger(ledger_path(directory), 3.0, 1e-5).charge(DPSGD, coordinator="c", run="r", round=1)
    return directory, entry


def test_privacy_prints_the_ledger(charged):
    directory, entry = charged
    done = cli("privacy", str(directory))
    assert done.stdout == Ledger(ledger_path(directory)).format_table() + "\n" and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == f"privacy ledger {ledger_path(directory)}"
    assert lines[1].startswith(f"ε spent {entry['epsilon_after']:.4g} of 3 (δ = 1e-05")
    (charge,) = lines[4:]
    assert charge.split()[2:] == ["c", "r", "1", "dpsgd", "0.01", "1.1", "100", f"{entry['epsilon_after']:.4g}"]


def test_privacy_json_is_the_ledger_summary(charged):
    directory, entry = charged
    summary = json.loads(cli("privacy", str(directory), "--json").stdout)
    assert summary == Ledger(ledger_path(directory)).summary()
    assert summary["epsilon_budget"] == 3.0 and summary["delta"] == 1e-5
    assert summary["epsilon_spent"] == pytest.approx(entry["epsilon_after"]) and 0 < summary["epsilon_spent"] < 3
    assert summary["epsilon_remaining"] == pytest.approx(3.0 - summary["epsilon_spent"])
    (charge,) = summary["history"]
    assert (charge["run"], charge["round"], charge["mechanism"], charge["steps"]) == ("r", 1, "dpsgd", 100)


def test_privacy_reads_without_writing(charged):
    directory, _ = charged
    before = {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}
    cli("privacy", str(directory))
    cli("privacy", str(directory), "--json")
    assert {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()} == before


def test_privacy_without_a_directory_or_a_ledger_says_so_in_one_line(tmp_path):
    line = error_line(cli("privacy", str(tmp_path / "nowhere"), check=False), "privacy")
    assert "is not a party directory" in line
    directory = open_directory(tmp_path / "no-budget", create=True)  # a party that never had a budget
    line = error_line(cli("privacy", str(directory), check=False), "privacy")
    assert line.endswith(f"there is no privacy ledger in {directory}: the party has no privacy budget "
                         "(fednb party --dp-epsilon E)")


def test_an_edited_ledger_is_one_error_line_and_status_1(charged):
    directory, _ = charged
    path = ledger_path(directory)
    data = path.read_bytes()
    at = data.index(b'"noise_multiplier":1.1') + len(b'"noise_multiplier":1.')
    path.write_bytes(data[:at] + b"0" + data[at + 1:])  # one byte: the noise 1.1 becomes 1.0
    done = cli("privacy", str(directory), check=False)
    line = error_line(done, "privacy", status=1)
    assert f"the privacy ledger {path} does not verify: line 2 was changed after it was written" in line
    assert done.stdout == ""
    assert error_line(cli("privacy", str(directory), "--json", check=False), "privacy", status=1) == line
    path.write_bytes(data[:-1])  # the last newline cut: truncated
    assert "ends in an incomplete line" in error_line(cli("privacy", str(directory), check=False), "privacy", 1)


@pytest.mark.parametrize("budget, message", [
    (["--dp-epsilon", "0"], "--dp-epsilon must be a finite number > 0, got 0"),
    (["--dp-epsilon=-1"], "--dp-epsilon must be a finite number > 0, got -1"),
    (["--dp-epsilon", "inf"], "--dp-epsilon must be a finite number > 0, got inf"),
    (["--dp-epsilon", "nan"], "--dp-epsilon must be a finite number > 0, got nan"),
    (["--dp-epsilon", "three"], "--dp-epsilon expects a number, got 'three'"),
    (["--dp-epsilon", "3", "--dp-delta", "0"], "--dp-delta must be a number in (0, 1), got 0"),
    (["--dp-epsilon", "3", "--dp-delta", "1"], "--dp-delta must be a number in (0, 1), got 1"),
    (["--dp-epsilon", "3", "--dp-delta", "nan"], "--dp-delta must be a number in (0, 1), got nan"),
    (["--dp-epsilon", "3", "--dp-delta=-1e-5"], "--dp-delta must be a number in (0, 1), got -1e-5"),
    (["--dp-delta", "1e-5"], "--dp-delta goes with --dp-epsilon (the budget it is the δ of)"),
])
def test_party_refuses_a_budget_it_cannot_have_before_anything_else(tmp_path, budget, message):
    """Checked with the arguments: no directory made, no key or data file read (none exists here)."""
    where = tmp_path / "party"
    done = cli("party", "--name", "p", "--listen", "tcp://127.0.0.1:*", "--key", str(tmp_path / "none"),
               "--data", f"train={tmp_path / 'none.npz'}", "--dir", str(where), *budget, check=False)
    assert error_line(done, "party").endswith(message)
    assert not where.exists()


def test_a_budget_needs_a_directory_that_can_hold_its_ledger_before_the_data_is_read(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    private = tmp_path / "sock"
    private.mkdir(mode=0o700)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    args = ["party", "--name", "p", "--listen", f"ipc://{private}/p.sock", "--data", f"train={bad}",
            "--dir", str(shared)]
    line = error_line(cli(*args, "--dp-epsilon", "3", check=False), "party")
    assert line.endswith(f"{shared} can be written by other users (mode drwxrwxrwx); run: chmod 700 {shared}")
    assert "bad.npz" in error_line(cli(*args, check=False), "party")  # without a budget: the data first, as before
    file = tmp_path / "file"
    file.write_text("")
    line = error_line(cli(*args[:-1], str(file / "p"), "--dp-epsilon", "3", check=False), "party")
    assert str(file) in line and "bad.npz" not in line


def test_a_party_with_a_budget_keeps_its_ledger_for_fednb_privacy(tmp_path, cli_parties, digits_parts):
    part = digits_parts[0]
    npz = tmp_path / "train.npz"
    np.savez(npz, x=part.x_train, y=part.y_train)
    private = tmp_path / "sock"
    private.mkdir(mode=0o700)
    directory = tmp_path / "clinic"
    party = cli_parties("--name", "clinic", "--listen", f"ipc://{private}/p.sock", "--data", f"train={npz}",
                        "--policy", "open", "--threads", "1", "--dir", str(directory),
                        "--dp-epsilon", "2.5", "--dp-delta", "1e-6")
    party.wait_listening()
    ledger = Ledger(ledger_path(directory))
    assert (ledger.epsilon_budget, ledger.delta, ledger.spent, ledger.history) == (2.5, 1e-6, 0.0, [])
    summary = json.loads(cli("privacy", str(directory), "--json").stdout)
    assert (summary["epsilon_spent"], summary["epsilon_budget"], summary["history"]) == (0, 2.5, [])
    assert cli("privacy", str(directory)).stdout.splitlines()[-1] == "(no charges yet)"
    assert party.stop() == 0
    # the ledger outlives the party: restarted with another δ, the party refuses to serve, and says why
    done = cli("party", "--name", "clinic", "--listen", f"ipc://{private}/p.sock", "--data", f"train={npz}",
               "--policy", "open", "--threads", "1", "--dir", str(directory), "--dp-epsilon", "2.5", check=False)
    assert "accounts at δ = 1e-06, not δ = 1e-05" in error_line(done, "party", alone=False)


def test_fednb_privacy_shows_what_a_simulated_party_spent():
    """A DP-SGD round in a simulation with budgets: the party's ledger, read by `fednb privacy`, is what it reports."""
    import fednb
    from tests.conftest import MLP, build

    with fednb.simulate(2, dataset="digits", partition="iid", dp_epsilon=2.0) as fed:
        fed.train(build(), MLP, rounds=1, lr=0.05, evaluate_every=0,
                  dp=fednb.DPSGD(noise_multiplier=1.1, max_grad_norm=1.0))
        reported = fed.privacy()
        for party in fed.simulation.parties:
            summary = json.loads(cli("privacy", str(fed.simulation.directory / party["name"]), "--json").stdout)
            (charge,) = summary["history"]
            assert (charge["mechanism"], charge["round"], charge["noise_multiplier"]) == ("dpsgd", 1, 1.1)
            assert summary["epsilon_budget"] == 2.0 and 0 < summary["epsilon_spent"] < 2.0
            assert summary["epsilon_spent"] == pytest.approx(reported[party["name"]].epsilon_spent)
