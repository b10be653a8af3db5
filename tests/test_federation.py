"""The Federation API across real party processes: training, evaluation, cells, drops, events."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch.nn as nn

import fednb
from fednb.federation.events import PartyDone, PartyDropped, RoundAggregated, RoundStarted, TrainingFinished
from tests.conftest import MLP, build, wait_until


@pytest.fixture(scope="module")
def fed3():
    """Three simulated parties on digits (Dirichlet α = 0.5), shared by the tests of this module."""
    with fednb.simulate(3, dataset="digits", partition="dirichlet", alpha=0.5, seed=0) as fed:
        yield fed


def test_three_parties_train_digits_above_090(fed3):
    events = []
    unsubscribe = fed3.subscribe(events.append)
    model = build(seed=1)
    try:
        history = fed3.train(model, MLP, rounds=8, lr=0.05, epochs=2, batch_size=16, momentum=0.9)
    finally:
        unsubscribe()
    assert len(history) >= 8
    accuracy = history.metric("accuracy")[-1]
    assert accuracy > 0.9, history.metric("accuracy")
    # the model in the caller's hands holds the global weights: evaluating it agrees
    evaluation = fed3.evaluate(model, MLP)
    assert evaluation["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert set(evaluation.parties) == set(fed3.parties) and not evaluation.dropped
    examples = {p: int(m["examples"]) for p, m in evaluation.parties.items()}
    weighted = sum(examples[p] * m["accuracy"] for p, m in evaluation.parties.items()) / sum(examples.values())
    assert evaluation["accuracy"] == pytest.approx(weighted)
    # every round announced itself, every party reported, every round was aggregated, in order
    kinds = [type(e) for e in events]
    assert kinds.count(RoundStarted) == 8 and kinds.count(RoundAggregated) == 8
    assert kinds.count(PartyDone) == 24 and kinds[-1] is TrainingFinished
    first_done = kinds.index(PartyDone)
    assert kinds.index(RoundStarted) < first_done < kinds.index(RoundAggregated)
    record = history[-1]
    assert set(record.parties) == set(fed3.parties) and not record.dropped
    assert record.parties["party-0"].examples == fed3.status()[0].examples
    frame = history.to_frame()
    assert {"round", "party", "examples", "train_loss", "eval_accuracy"} <= set(frame.columns)


def test_fedavg_is_the_example_weighted_mean_of_the_updates(fed3):
    """Each party adds n_k / 1000 to every weight (n_k: its examples); FedAvg must give
    w + sum(n_k^2) / (1000 sum(n_k)), the example-weighted mean, in closed form."""
    model = build(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cell = ("with torch.no_grad():\n    for p in model.parameters():\n"
            "        p.add_(len(train.dataset) / 1000)\n")
    fed3.train(model, MLP, rounds=1, train_cell=cell, evaluate_every=0)
    n = np.array([row.examples for row in fed3.status()], dtype=np.float64)
    shift = (n**2).sum() / (1000 * n.sum())
    assert shift != pytest.approx(n.mean() / 1000)  # the parties differ: weighting matters
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), before[key].numpy() + shift, rtol=0, atol=1e-6)


def test_run_returns_per_party_results_and_errors(fed3):
    counts = fed3.run("label_counts(train)")
    assert set(counts) == set(fed3.parties)
    for party, row in zip(fed3.parties, fed3.status()):
        assert sum(counts[party].values()) == row.examples
    results = fed3.run("1 / 0", parties=["party-1"])
    assert list(results) == ["party-1"] and results.errors["party-1"].error_type == "ZeroDivisionError"
    with pytest.raises(ValueError, match="unknown parties"):
        fed3.run("1", parties=["nobody"])


def test_model_source_is_captured_from_a_user_class(fed3):
    model = Net()
    history = fed3.train(model, rounds=1, lr=0.05, evaluate_every=0)
    assert len(history[-1].parties) == 3
    assert "class Net" in fed3.source and "model = Net()" in fed3.source
    with pytest.raises(ValueError, match="source="):
        fed3.train(nn.Sequential(nn.Linear(64, 10)), rounds=1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def test_bad_arguments_raise_value_error_before_anything_is_sent(fed3):
    model = build()
    for kwargs, match in [({"rounds": 0}, "rounds"), ({"min_parties": 4}, "min_parties"),
                          ({"round_timeout": -1}, "round_timeout"), ({"strategy": "nope"}, "unknown strategy"),
                          ({"train_cell": 3}, "train_cell"), ({"parties": ["x"]}, "unknown parties")]:
        with pytest.raises(ValueError, match=match):
            fed3.train(model, MLP, **kwargs)


def test_works_from_inside_a_running_event_loop(fed3):
    """A Jupyter cell runs inside asyncio: the blocking API must not need the loop."""

    async def cell():
        return fed3.run("6 * 7")["party-2"], fed3.train(build(), MLP, rounds=1, evaluate_every=0)

    value, history = asyncio.run(cell())
    assert value == 42 and len(history[-1].parties) == 3


def test_a_party_killed_mid_round_is_dropped_and_the_round_completes():
    with fednb.simulate(3, dataset="digits", partition="iid", heartbeat=0.2, heartbeat_timeout=2.0) as fed:
        victim = fed.simulation.parties[1]
        dropped: list[PartyDropped] = []
        fed.subscribe(lambda e: dropped.append(e) if isinstance(e, PartyDropped) else None)
        slow = "import time\ntime.sleep(1.0)\nreport(done=1)"
        result: dict[str, object] = {}

        def train() -> None:
            result["history"] = fed.train(build(), MLP, rounds=1, train_cell=slow, min_parties=2, round_timeout=20)

        worker = threading.Thread(target=train)
        started = time.monotonic()
        worker.start()
        time.sleep(0.4)  # the parties are inside the cell now
        os.kill(int(victim["pid"]), signal.SIGKILL)
        worker.join(30)
        assert not worker.is_alive()
        history = result["history"]
        record = history[-1]
        assert set(record.parties) == {"party-0", "party-2"}
        assert "party-1" in record.dropped and [e.party for e in dropped] == ["party-1"]
        assert time.monotonic() - started < 10  # noticed at once, not at the round deadline
        assert wait_until(lambda: fed.status()[1].status == "offline", timeout=3)
        # with the victim gone, a round needing all three fails clearly, naming it
        with pytest.raises(fednb.RoundError, match="party-1") as info:
            fed.train(build(), MLP, rounds=1, min_parties=3, evaluate_every=0)
        assert "party-1" in info.value.dropped


def test_a_late_party_is_dropped_at_the_deadline():
    with fednb.simulate(2, dataset="digits", partition="iid") as fed:
        fed.run("LATE = True", parties=["party-1"])  # each party keeps the coordinator's namespace
        fed.run("LATE = False", parties=["party-0"])
        slow = "import time\ntime.sleep(3.0 if LATE else 0)"
        started = time.monotonic()
        history = fed.train(build(), MLP, rounds=1, train_cell=slow, min_parties=1, round_timeout=1.0,
                            evaluate_every=0)
        assert time.monotonic() - started < 2.5
        record = history[-1]
        assert list(record.parties) == ["party-0"] and "within 1 s" in record.dropped["party-1"]
        # the late party is still online and serves the next request once its cell is done
        assert fed.run("'still here'", parties=["party-1"])["party-1"] == "still here"


def test_a_frozen_party_is_marked_offline_within_the_heartbeat_timeout():
    """SIGSTOP: the process lives, its sockets stay open, it just says nothing."""
    with fednb.simulate(2, dataset="synthetic", partition="iid", heartbeat=0.2, heartbeat_timeout=1.5) as fed:
        pid = int(fed.simulation.parties[1]["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert wait_until(lambda: fed.status()[1].status == "offline", timeout=5)
            assert time.monotonic() - started <= 1.5 + 1.0
            # frozen while a reply is due: the transport's pings drop it, not the round deadline
            started = time.monotonic()
            fed.run("1", parties=["party-0"])
            assert wait_until(lambda: fed.status()[1].status == "online", timeout=0.1) is False
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_until(lambda: fed.status()[1].status == "online", timeout=5)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = fed.run("'hello'", timeout=30)
            assert results["party-0"] == "hello" and isinstance(results["party-1"], fednb.PartyError)
            assert time.monotonic() - started < 1.5 + 2.0
        finally:
            os.kill(pid, signal.SIGCONT)


def test_stop_now_cancels_the_work_at_the_parties_and_keeps_the_last_round():
    with fednb.simulate(2, dataset="digits", partition="iid", contained=True) as fed:
        model = build()
        fed.train(model, MLP, rounds=1, lr=0.05, evaluate_every=0)
        kept = {k: v.clone() for k, v in model.state_dict().items()}
        run = fed.train_in_background(model, MLP, rounds=5, train_cell="import time\ntime.sleep(30)")
        assert wait_until(lambda: fed.training, timeout=2)
        time.sleep(0.5)  # the parties are inside the cell
        started = time.monotonic()
        fed.stop(now=True)
        assert run.wait(5), "stop(now=True) did not end training"
        assert time.monotonic() - started < 5 and len(run.result()) == 1  # no round was added
        for key, value in model.state_dict().items():
            assert np.array_equal(value.numpy(), kept[key].numpy())
        started = time.monotonic()
        assert fed.run("'free'") == {"party-0": "free", "party-1": "free"}  # the sleeping workers were killed
        assert time.monotonic() - started < 5
