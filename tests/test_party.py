"""A live party on real sockets: authentication, garbage, errors, heartbeats, egress of train replies."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

import fednb
from fednb.errors import PartyError
from fednb.transport import AllowList, generate
from fednb.transport.channel import receive, send
from fednb.wire import Message, encode
from tests.conftest import MLP, build, wait_until




def _drain(sock, seconds):
    received = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            received.append(sock.recv_multipart())
    return received


@pytest.fixture
def dealer():
    """Raw DEALER sockets speaking to a party as an arbitrary client would; closed after the test."""
    context = zmq.Context()
    sockets = []

    def make(endpoint, keypair=None, server_key=None):
        sock = context.socket(zmq.DEALER)
        sockets.append(sock)
        sock.linger = 0
        if keypair is not None:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = keypair.secret, keypair.public, server_key
        sock.connect(endpoint)
        return sock

    yield make
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def test_unknown_client_key_gets_nothing_through(start_party, dealer):
    party_key, allowed, intruder = generate(), generate(), generate()
    party = start_party("tcp://127.0.0.1:*", keypair=party_key, allow=AllowList(keys={allowed.public: "allowed"}))
    sock = dealer(party.endpoint, intruder, party_key.public)
    for _ in range(100):
        try:
            send(sock, Message("run", {"source": "1 + 1"}), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
    assert _drain(sock, 1.0) == []
    assert party.stats["received"] == 0 and party.stats["requests"] == 0
    # the allowed key, same party, same moment: served
    with fednb.connect([{"name": "p", "endpoint": party.endpoint, "public_key": party_key.public.decode()}],
                       allowed, timeout=10) as fed:
        assert fed.run("1 + 1")["p"] == 2


def test_party_with_empty_allow_list_accepts_nobody(start_party, dealer):
    party_key, coordinator = generate(), generate()
    party = start_party("tcp://127.0.0.1:*", keypair=party_key, allow=AllowList(keys={}))
    with pytest.raises(fednb.FederationError, match="refused our key"):
        fednb.connect([{"name": "p", "endpoint": party.endpoint, "public_key": party_key.public.decode()}],
                      coordinator, timeout=5)
    assert party.stats["received"] == 0


def test_wrong_party_key_is_not_talked_to(start_party):
    party_key, coordinator, impostor = generate(), generate(), generate()
    party = start_party("tcp://127.0.0.1:*", keypair=party_key, allow=AllowList(keys={coordinator.public: "c"}))
    with pytest.raises(fednb.FederationError, match="could not connect"):
        fednb.connect([{"name": "p", "endpoint": party.endpoint, "public_key": impostor.public.decode()}],
                      coordinator, timeout=3)
    assert party.stats["received"] == 0


def test_garbage_frames_leave_the_party_serving(start_party, dealer, private_dir):
    party = start_party(f"ipc://{private_dir}/p.sock")
    sock = dealer(party.endpoint)
    rng = np.random.default_rng(0)
    good = encode(Message("run", {"source": "21 * 2"}))
    garbage = [
        [b""], [b"\x00" * 10], [b"{}"], [b"[1,2,3]"], [bytes(rng.integers(0, 256, 300, dtype=np.uint8))],
        [bytes(good[0])[:-5]], [bytes(good[0]), b"extra frame"], [bytes(good[0]).replace(b'"run"', b'"rm"')],
        [bytes(good[0]).replace(b'"v":1', b'"v":99')],
        [bytes(encode(Message("train", {"source": "x", "config": {}}, arrays={"w": np.ones(4, np.float32)}))[0])],
    ]
    garbage += [[bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))] for _ in range(200)]
    for frames in garbage:
        sock.send_multipart(frames)
    replies = _drain(sock, 1.0)
    errors = [frames for frames in replies if b'"error"' in frames[0]]
    assert len(errors) >= len(garbage) - 5  # nearly every one answered with an error
    assert party.stats["malformed"] == len(garbage)
    send(sock, Message("run", {"source": "21 * 2"}))
    for frames in _drain(sock, 3.0):
        if b'"result"' in frames[0]:
            assert b'"value":42' in frames[0]
            break
    else:
        pytest.fail("the party stopped answering after garbage")


@pytest.fixture
def fed_one(start_party, private_dir):
    party = start_party(f"ipc://{private_dir}/p.sock", heartbeat=0.2, timeout=1.0)
    with fednb.connect([{"name": "p", "endpoint": party.endpoint}], heartbeat=0.2, heartbeat_timeout=1.0) as fed:
        yield fed


def test_cell_errors_come_back_and_the_party_keeps_serving(fed_one):
    results = fed_one.run("def f():\n    raise KeyError('no such column')\nf()")
    error = results["p"]
    assert isinstance(error, PartyError) and error.error_type == "KeyError" and "no such column" in error.message
    assert "f()" in error.traceback and "fednb/" not in error.traceback
    with pytest.raises(ValueError, match="does not compile"):  # a syntax error never leaves the coordinator
        fed_one.run("x = ")
    assert fed_one.run("41 + 1")["p"] == 42


def test_namespace_persists_per_coordinator(fed_one):
    fed_one.run("counter = 10")
    assert fed_one.run("counter += 1\ncounter")["p"] == 11


def test_run_returns_plain_values_and_tensors(fed_one, digits_parts):
    n = len(digits_parts[0].y_train)
    value = fed_one.run("{'n': len(train.dataset), 'mean': float(datasets['train'].tensors[0].mean()), "
                        "'counts': label_counts(train), 'w': torch.arange(6.).reshape(2, 3), 'names': ['a', None]}")["p"]
    assert value["n"] == n and 0 < value["mean"] < 1 and sum(value["counts"].values()) == n
    assert all(isinstance(k, int) for k in value["counts"])
    np.testing.assert_array_equal(value["w"], np.arange(6.0).reshape(2, 3))
    assert value["names"] == ["a", None]
    assert fed_one.run("float('nan')")["p"] != fed_one.run("float('nan')")["p"]  # NaN survives
    refused = fed_one.run("'x' * 2000")["p"]
    assert isinstance(refused, PartyError) and "longer than" in refused.message
    refused = fed_one.run("object()")["p"]
    assert isinstance(refused, PartyError) and "cannot be returned" in refused.message


def test_heartbeats_flow_while_a_long_cell_runs(fed_one):
    started = time.monotonic()
    assert fed_one.run("import time\ntime.sleep(2.5)\n'done'")["p"] == "done"
    assert time.monotonic() - started >= 2.5
    assert fed_one.status()[0].status == "online"  # 2.5 s of work > the 1 s heartbeat timeout


def test_train_reply_must_match_the_model(fed_one):
    model = build()
    with pytest.raises(fednb.RoundError, match="no longer matches") as info:
        fed_one.train(model, MLP, rounds=1, train_cell="model.extra = nn.Linear(2, 2)", min_parties=1)
    assert "p" in info.value.dropped
    with pytest.raises(fednb.RoundError, match="non-finite"):
        fed_one.train(build(), MLP, rounds=1, min_parties=1,
                      train_cell="with torch.no_grad():\n    model[0].weight[0, 0] = float('nan')")
    with pytest.raises(fednb.RoundError, match="number"):
        fed_one.train(build(), MLP, rounds=1, min_parties=1, train_cell="report(note='secret text')")


def test_train_cell_pass_returns_the_weights_unchanged(fed_one, digits_parts):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fed_one.train(model, MLP, rounds=2, train_cell="pass", evaluate_every=0)
    assert len(history) == 2 and history[-1].parties["p"].examples == len(digits_parts[0].y_train)
    for key, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), before[key].numpy())


def test_custom_train_cell_sees_model_train_config_report(fed_one, digits_parts):
    cell = (
        "opt = torch.optim.SGD(model.parameters(), lr=config['lr'])\n"
        "for x, y in train:\n"
        "    opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()\n"
        "report(loss=loss, batches=len(train), lr=config['lr'], custom=config['custom'])\n"
    )
    history = fed_one.train(build(), MLP, rounds=1, lr=0.05, batch_size=64, train_cell=cell, config={"custom": 7})
    metrics = history[-1].parties["p"].metrics
    assert metrics["batches"] == -(-len(digits_parts[0].y_train) // 64) and metrics["lr"] == 0.05 and metrics["custom"] == 7 and metrics["loss"] > 0


def test_bad_config_is_refused_before_it_leaves(fed_one):
    with pytest.raises(ValueError, match="optimizer"):
        fed_one.train(build(), MLP, rounds=1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="epochs"):
        fed_one.train(build(), MLP, rounds=1, epochs=0)


def test_a_silent_party_goes_offline_then_comes_back(start_party, private_dir):
    party = start_party(f"ipc://{private_dir}/p.sock", heartbeat=0.2, timeout=5.0)
    with fednb.connect([{"name": "p", "endpoint": party.endpoint}], heartbeat=0.2, heartbeat_timeout=1.0) as fed:
        party.stop()  # stops answering; the socket closes
        assert wait_until(lambda: fed.status()[0].status == "offline", timeout=2.0)
        restarted = start_party(f"ipc://{private_dir}/p.sock", heartbeat=0.2, timeout=5.0)
        assert wait_until(lambda: fed.status()[0].status == "online", timeout=5.0)
        assert fed.run("1")["p"] == 1
        restarted.stop()
