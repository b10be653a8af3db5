"""Faults over many rounds: the short chaos run (tests/chaos.py), and what it found: a regression test, and a strict xfail.

The long run is ``python bench/chaos.py`` (100 rounds).
"""

from __future__ import annotations

import json
import os

import pytest

import fednb
from fednb.errors import RoundError
from fednb.federation import checkpoint as ckpt
from tests.chaos import Chaos, Plan
from tests.conftest import MLP, build


def test_training_survives_party_and_coordinator_faults_over_twenty_rounds() -> None:
    """8 `fednb party` processes, 20 rounds with a checkpoint, min_parties 4, a 3 s round timeout; parties
    SIGKILLed and restarted, SIGSTOPped and continued after the timeout, an outage that aborts a round, and
    two SIGKILLs of the coordinator, which resumes from its checkpoint (tests/chaos.py lists the checks)."""
    summary = Chaos(Plan(rounds=20, seed=1, party_every=(2, 4), stop_extra=(0.5, 1.5), deadline=240)).run()
    print(json.dumps(summary, indent=1))  # the chaos table, with -s or on failure
    assert not summary["problems"], "\n".join(summary["problems"])
    faults = summary["faults"]
    assert faults["coordinator SIGKILL + resume"] == 2 and len(summary["resumes"]) == 2
    assert faults.get("party SIGKILL + restart", 0) + faults.get("party SIGSTOP + SIGCONT", 0) >= 3
    assert summary["rounds_completed"] == 20 and summary["rounds_aborted"] and summary["late_replies"] > 0


def test_a_round_that_failed_twice_can_still_be_resumed(start_party, private_dir, tmp_path) -> None:
    """Each resume writes its attempt before a round goes out (the chaos run once stuck at a round that had
    failed twice: every later try carried an attempt the parties had seen)."""
    flag = tmp_path / "fail"
    # round 3 fails at every party while the flag file exists (the party seeds torch with seed + round)
    cell = (f"import os, torch\nif os.path.exists({str(flag)!r}) and torch.initial_seed() - config['seed'] == 3:\n"
            "    raise RuntimeError('injected failure')\n")
    parties = [start_party(f"ipc://{private_dir}/{name}.sock", i, policy="simulation", contained=False)
               for i, name in enumerate("ab")]
    path = tmp_path / "run.ckpt"
    options = {"rounds": 4, "min_parties": 2, "train_cell": cell, "evaluate_every": 0, "checkpoint": path}
    with fednb.connect([{"name": n, "endpoint": p.endpoint} for n, p in zip("ab", parties)]) as fed:
        model = build(seed=1)
        flag.write_text("")
        for _ in range(2):  # round 3 fails in the first call, and again in the call that resumes it
            with pytest.raises(RoundError, match="injected failure"):
                fed.train(model, MLP, **options)
        assert ckpt.load(path).round == 2
        os.remove(flag)
        try:
            fed.train(model, MLP, **options)  # the cause is gone: this should finish rounds 3 and 4
        except RoundError as exc:
            assert "does not move forward" in str(exc), exc  # refused as a replay, not another failure
            raise
    assert [r.round for r in ckpt.load(path).history] == [1, 2, 3, 4]


SLOW_START = "import time\nif not globals().get('warm'):\n    time.sleep(2.5)  # a fresh worker's first steps\nwarm = True\n"


@pytest.mark.parametrize("where", ["fednb party", "in process"])
def test_a_party_slower_than_the_round_timeout_once_takes_part_later(where, cli_parties, start_party, digits_parts,
                                                                       tmp_path, private_dir) -> None:
    """A party's first request outlasts the round timeout; one of its next rounds must have it. At the
    deadline the coordinator lets a running round finish there (its reply is discarded as late), so the
    session it warmed serves the next round, in a contained worker as in a simulation's process."""
    import numpy as np

    endpoint = f"ipc://{private_dir}/p.sock"
    if where == "in process":
        start_party(endpoint, policy="simulation", contained=False)
    else:
        np.savez(tmp_path / "p.npz", x=digits_parts[0].x_train, y=digits_parts[0].y_train)
        endpoint = cli_parties("--name", "p", "--listen", endpoint, "--data", f"train={tmp_path / 'p.npz'}",
                               "--policy", "open", "--dir", str(tmp_path / "p"), "--threads", "1").wait_listening()
    with fednb.connect([{"name": "p", "endpoint": endpoint}]) as fed:
        model = build(seed=1)
        for attempt in range(5):
            try:
                fed.train(model, MLP, rounds=1, min_parties=1, round_timeout=1.0, train_cell=SLOW_START,
                          evaluate_every=0)
            except RoundError as exc:
                assert "no reply within 1 s" in str(exc), exc  # late, not failed for another reason
                if attempt == 4:
                    raise
                continue
            # the party took part, once its worker was warm: the first round it finished came late, unused
            assert attempt > 0 and fed._connections.snapshot()["p"]["late"] >= 1
            return
