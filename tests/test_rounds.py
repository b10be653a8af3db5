"""Rounds as protocols of stages, across real party processes: folded evaluation, checks before
sending, readable drops, connection failures that say what is wrong, malformed replies."""

from __future__ import annotations

import socket
import time

import pytest

import fednb
from fednb.errors import FederationError, PartyError, RoundError
from fednb.federation.events import RoundAggregated, RoundEvaluated, StageStarted, TrainingStarted
from fednb.federation.protocol import summarize_drops
from fednb.transport import generate
from tests.conftest import MLP, build


@pytest.fixture(scope="module")
def fed4():
    """Four simulated parties on digits with unequal, label-skewed shares."""
    with fednb.simulate(4, dataset="digits", partition="dirichlet", alpha=0.5, seed=0) as fed:
        yield fed


def test_drops_are_grouped_by_reason():
    dropped = {f"party-{i}": f"IndexError at party-{i} (round 3): Target 3 is out of bounds" for i in range(100)}
    dropped["party-x"] = "party-x went offline: connection lost"
    text = summarize_drops(dropped)
    assert text.startswith("IndexError (round 3): Target 3 is out of bounds at 100 parties: party-0, party-1")
    assert "… and 92 more" in text and "went offline: connection lost at 1 party: party-x" in text
    assert len(text) < 300


def test_a_round_that_fails_everywhere_reads_as_one_short_line(fed4):
    cell = "raise IndexError('Target 3 is out of bounds')\n"
    with pytest.raises(RoundError) as caught:
        fed4.train(build(), MLP, rounds=1, train_cell=cell, round_timeout=60)
    message = str(caught.value)
    assert "IndexError" in message and "at 4 parties: party-0, party-1, party-2, party-3" in message
    assert message.count("Target 3 is out of bounds") == 1
    assert set(caught.value.dropped) == set(fed4.parties)


def test_user_code_and_settings_are_checked_before_anything_is_sent(fed4):
    events = []
    unsubscribe = fed4.subscribe(events.append)
    try:
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"train cell does not compile: .*line 2"):
            fed4.train(build(), MLP, train_cell="x = 1\nfor x in :\n    pass\n")
        with pytest.raises(ValueError, match="defines no torch.nn.Module named `model`"):
            fed4.train(build(), "import torch.nn as nn\nnet = nn.Linear(64, 10)\n")
        with pytest.raises(ValueError, match="builds a different model"):
            fed4.train(build(), "import torch.nn as nn\nmodel = nn.Linear(64, 10)\n")
        with pytest.raises(ValueError, match=r"model source fails at line 2 \(NameError"):
            fed4.train(build(), "import torch.nn as nn\nmodel = Nope()\n")
        with pytest.raises(ValueError, match="'lr' = -1.0 is outside"):
            fed4.train(build(), MLP, lr=-1.0)
        with pytest.raises(ValueError, match="cell does not compile"):
            fed4.run("1 +")
        assert time.monotonic() - started < 5
    finally:
        unsubscribe()
    assert not [e for e in events if isinstance(e, (TrainingStarted, StageStarted))]


def test_the_evaluation_rides_on_the_next_round_and_the_source_is_remembered(fed4):
    events = []
    unsubscribe = fed4.subscribe(events.append)
    model = build(seed=2)
    try:
        history = fed4.train(model, MLP, rounds=3, evaluate_every=1)
    finally:
        unsubscribe()
    stages = [(e.round, e.stage) for e in events if isinstance(e, StageStarted)]
    last = history.last_round
    # three train stages and one evaluate stage for the last round, not three of each
    assert stages == [(last - 2, "train"), (last - 1, "train"), (last, "train"), (last, "evaluate")]
    evaluated = [e.round for e in events if isinstance(e, RoundEvaluated)]
    assert evaluated == [last - 2, last - 1, last]
    aggregated = [e for e in events if isinstance(e, RoundAggregated)]
    assert all(e.evaluation is None for e in aggregated)
    for record in history.rounds[-3:]:
        assert record.evaluation is not None and 0.0 <= record.evaluation["accuracy"] <= 1.0
        assert set(record.party_evaluation) == set(fed4.parties)
    # evaluate() and run() after train() need no source again
    evaluation = fed4.evaluate(model)
    assert evaluation["accuracy"] == pytest.approx(history.metric("accuracy")[-1], abs=1e-9)
    results = fed4.run("type(model).__name__")
    assert set(results.ok.values()) == {"Sequential"}


def test_a_malformed_reply_fails_that_party_and_keeps_the_others(fed4):
    sizes = fed4.run("sum(len(y) for _, y in train)")
    largest = max(sizes.values())
    results = fed4.run(f"n = sum(len(y) for _, y in train)\n'\\ud800' if n == {largest} else n\n", timeout=30)
    bad = [party for party, size in sizes.items() if size == largest]
    for party, value in results.items():
        if party in bad:
            assert isinstance(value, PartyError), value
        else:
            assert value == sizes[party]
    # the parties go on serving
    assert fed4.run("1 + 1").ok == dict.fromkeys(fed4.parties, 2)


def test_connection_failures_say_what_is_wrong(private_dir):
    key = generate()
    with pytest.raises(ValueError, match=r"port in 1\.\.65535"):
        fednb.connect([{"name": "a", "endpoint": "tcp://127.0.0.1:70000", "public_key": key.public}], key=key)
    with pytest.raises(ValueError, match="cannot be resolved"):
        fednb.connect([{"name": "a", "endpoint": "tcp://no-such-host.invalid:7410", "public_key": key.public}],
                      key=key)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(FederationError, match=rf"connection refused: nothing listens on 127\.0\.0\.1:{port}"):
        fednb.connect([{"name": "a", "endpoint": f"tcp://127.0.0.1:{port}", "public_key": key.public}], key=key,
                      timeout=30)
    assert time.monotonic() - started < 10
    with pytest.raises(FederationError, match="no such socket file"):
        fednb.connect([{"name": "b", "endpoint": f"ipc://{private_dir}/nobody"}], timeout=30)
    assert time.monotonic() - started < 15


class FakeParty:
    """A raw ROUTER that speaks just enough of the protocol; ``bad`` answers ``run`` with a lone
    surrogate in its JSON, which no fednb party would send."""

    def __init__(self, endpoint: str, name: str, *, bad: bool) -> None:
        import threading

        import zmq

        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        self.name, self.bad = name, bad
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _header(self, type_: str, reply_to: str | None, content: str) -> bytes:
        from fednb.wire import new_id

        reply = "null" if reply_to is None else f'"{reply_to}"'
        return (f'{{"v":1,"id":"{new_id()}","type":"{type_}","round":null,"reply_to":{reply},'
                f'"content":{content},"buffers":[]}}').encode()

    def _serve(self) -> None:
        import json

        import zmq

        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            routing, header, *_ = self.router.recv_multipart()
            request = json.loads(header)
            if request["type"] == "hello":
                content = json.dumps({"party": self.name, "version": fednb.__version__, "policy": "open",
                                      "datasets": {}})
                answer = self._header("welcome", request["id"], content)
            elif request["type"] == "run":
                value = '"\\ud800"' if self.bad else "7"
                answer = self._header("result", request["id"], f'{{"value":{value}}}')
            else:
                continue
            self.router.send_multipart([routing, answer])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.router.close(linger=0)
        self.context.term()


def test_the_coordinator_fails_a_party_that_sends_a_malformed_reply_and_keeps_the_others(private_dir):
    good = FakeParty(f"ipc://{private_dir}/good", "good", bad=False)
    bad = FakeParty(f"ipc://{private_dir}/bad", "bad", bad=True)
    try:
        with fednb.connect([{"name": "good", "endpoint": f"ipc://{private_dir}/good"},
                            {"name": "bad", "endpoint": f"ipc://{private_dir}/bad"}], timeout=20) as fed:
            started = time.monotonic()
            results = fed.run("7", timeout=30)
            assert time.monotonic() - started < 10  # failed at once, not at the timeout
            assert results["good"] == 7
            assert isinstance(results["bad"], PartyError) and "malformed" in str(results["bad"])
            assert fed.run("7", parties=["good"]).ok == {"good": 7}
    finally:
        good.close()
        bad.close()
