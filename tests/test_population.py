"""The pool backend: virtual parties served by a few worker processes on shared endpoints.

Real processes throughout: ``simulate(backend="pool")`` starts the host, which forks the pool
workers; the coordinator talks to them over ipc sockets with address frames. The results of a
pool simulation must be those of one process per party for the same seed.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
import zmq

import fednb
from fednb.data import federated_indices, load_dataset, sample_population
from fednb.errors import FederationError
from fednb.party.admission import Jobs
from fednb.party.population import Members, Population, Rows
from fednb.party.population_server import PopulationServer
from fednb.party.training import fit  # noqa: F401 - the party code the pool runs, imported as a party imports it
from fednb.transport.channel import receive
from fednb.wire import Message, encode
from tests.conftest import MLP, build, wait_until

SMALL = "import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))\n"


def weights_after(fed, rounds: int = 2, **options) -> list[torch.Tensor]:
    model = build()
    fed.train(model, MLP, rounds=rounds, lr=0.05, epochs=1, batch_size=16, evaluate_every=0, **options)
    return [p.detach().clone() for p in model.parameters()]


def test_a_pool_of_two_workers_gives_the_results_of_one_process_per_party():
    with fednb.simulate(20, dataset="digits", partition="dirichlet", alpha=0.5, seed=3, backend="pool",
                        workers=2) as pool:
        assert pool.parties == [f"party-{k}" for k in range(20)]
        status = {row.name: row for row in pool.status()}
        assert len({row.endpoint for row in status.values()}) == 2  # two shared endpoints, twenty parties
        assert all(row.status == "online" and row.containment == "none" for row in status.values())
        pooled = weights_after(pool)
        pooled_sampled = weights_after(pool, parties_per_round=5, seed=7)
        examples = {name: row.examples for name, row in status.items()}
    with fednb.simulate(20, dataset="digits", partition="dirichlet", alpha=0.5, seed=3) as processes:
        assert examples == {row.name: row.examples for row in processes.status()}
        separate = weights_after(processes)
        separate_sampled = weights_after(processes, parties_per_round=5, seed=7)
    for a, b in zip(pooled + pooled_sampled, separate + separate_sampled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same party code on the same rows


def test_two_hundred_virtual_parties_train_sampled_rounds_with_custom_cells_and_runs():
    with fednb.simulate(200, dataset="synthetic", partition="iid", seed=0, backend="pool", workers=2,
                        members=8) as fed:
        host = fed.simulation
        assert len(host.workers) == 2 and len(fed.parties) == 200
        events: list = []
        fed.subscribe(events.append)
        model = build(SMALL)
        history = fed.train(model, SMALL, rounds=3, parties_per_round=20, lr=0.1, seed=1, evaluate_every=0)
        assert [len(r.parties) for r in history] == [20, 20, 20] and not any(r.dropped for r in history)
        assert len({p for r in history for p in r.parties}) > 20  # the members' cache of 8 turned over
        cell = ("opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                "for x, y in train:\n"
                "    opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()\n"
                "report(loss=float(loss))\n")
        history = fed.train(model, SMALL, rounds=1, parties_per_round=10, train_cell=cell, evaluate_every=0)
        assert "loss" in history[-1].metrics
        results = fed.run("len(train.dataset) if 'train' in dir() else 0", parties=["party-0", "party-199"])
        assert set(results) == {"party-0", "party-199"}
        workers = [int(w["pid"]) for w in host.workers]
    assert wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_population_larger_than_the_dataset_draws_its_rows_with_replacement():
    dataset = load_dataset("digits")
    train, test = sample_population(dataset.y, 3000, 64, alpha=0.5, seed=2)
    assert train.shape == (3000, 64) and test.shape == (3000, 16)
    assert not np.intersect1d(train, test).size  # no party tests on a row any party trains on
    again = sample_population(dataset.y, 3000, 64, alpha=0.5, seed=2)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    skew = np.mean([np.bincount(dataset.y[row], minlength=10).max() / 64 for row in train[:200]])
    assert skew > 0.35  # label skew: a party's largest class holds far more than a tenth of its rows
    with pytest.raises(ValueError, match="examples"):
        sample_population(dataset.y, 10, 0)
    with fednb.simulate(3000, dataset="digits", backend="pool", workers=2, examples_per_party=64) as fed:
        assert len(fed.parties) == 3000
        assert {row.examples for row in fed.status()} == {64}
        history = fed.train(build(), MLP, rounds=2, parties_per_round=30, lr=0.05, evaluate_every=0)
        assert [len(r.parties) for r in history] == [30, 30]


def test_what_the_pool_backends_do_not_do_is_refused_before_anything_starts():
    for options, match in [({"backend": "pool", "data": {"a": {"x": np.zeros((4, 2))}}}, "bundled dataset"),
                           ({"backend": "pool", "contained": True}, "contained"),
                           ({"backend": "pool", "dp_epsilon": 1.0}, "privacy budget"),
                           ({"backend": "pool", "workers": 0}, "workers"),
                           ({"backend": "pool", "partition": "iid", "examples_per_party": 8}, "Dirichlet"),
                           ({"backend": "nope"}, "backend"),
                           ({"examples_per_party": 10}, "backend='pool'"),
                           ({"backend": "pool", "ray_address": "auto"}, "backend='ray'")]:
        with pytest.raises(ValueError, match=match):
            fednb.simulate(4, **options)
    with pytest.raises(ValueError, match="between 1 and 512"):
        fednb.simulate(1000)
    with pytest.raises(ValueError, match="cannot give"):  # 1,000 parties of ≥ 10 rows: more than digits holds
        fednb.simulate(1000, backend="pool")


def _population(n: int = 6) -> Population:
    dataset = load_dataset("synthetic")
    parts = federated_indices(dataset.y, n, "iid", seed=0)
    return Population(dataset.x, dataset.y, [Rows(f"party-{k}", tr, te) for k, (tr, te) in enumerate(parts)],
                      cache_bytes=3 * 200 * 20 * 4)


def test_members_and_data_are_built_on_demand_within_their_bounds():
    population = _population()
    members = Members(population, Jobs("test"), members=2, max_held_bytes=2**20)
    first = members.get("party-0")
    assert members.get("party-0") is first
    for name in ("party-1", "party-2", "party-3"):
        members.get(name)
    assert len(list(members)) == 2  # the least recently used were forgotten
    assert members.get("party-0") is not first  # built afresh, with the replay memory it had
    assert members.get("party-0").replays is first.replays
    assert len(population._cache) <= 3 and population._cached <= population.cache_bytes
    with pytest.raises(KeyError):
        members.get("party-9")
    with pytest.raises(ValueError, match="indices"):
        Population(population.x, population.y, [Rows("a", np.array([10**6]), np.array([0]))])
    with pytest.raises(ValueError, match="distinct"):
        Population(population.x, population.y, [Rows("a", np.array([0]), np.array([1]))] * 2)


@pytest.fixture
def endpoint():
    """A population server on a thread, on an ipc socket in a private directory."""
    directory = tempfile.mkdtemp()
    os.chmod(directory, 0o700)
    server = PopulationServer("pool-t", f"ipc://{directory}/pool.sock", _population(), heartbeat=0.2, timeout=2.0)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(lambda _: ready.set(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server
    finally:
        server.stop()
        thread.join(5)


def _ask(sock: zmq.Socket, frames: list) -> Message:
    sock.send_multipart(frames)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sock.poll(100):
            got = receive(sock, router=False, addressed=True)
            if got.message is not None and got.message.type == "heartbeat":
                continue
            assert got.message is not None, got.error
            return got.message
    raise AssertionError("no answer")


def test_a_shared_endpoint_answers_bad_addresses_and_unknown_parties_and_keeps_serving(endpoint):
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint.endpoint)
    try:
        hello = encode(Message("hello", {"version": fednb.__version__}))
        welcome = _ask(sock, [b"", *hello])
        assert welcome.type == "welcome" and welcome.content["pool"]["parties"][0] == "party-0"
        assert list(welcome.arrays["pool.train"]) == [len(r.train) for r in endpoint.population.parties.values()]
        for address in (b"../party-0", b"x" * 65, "pärty".encode()):
            error = _ask(sock, [address, *hello])
            assert error.type == "error" and "address frame" in error.content["message"]
        error = _ask(sock, [b"party-9", *encode(Message("run", {"source": "1"}))])
        assert error.type == "error" and "no party 'party-9'" in error.content["message"]
        error = _ask(sock, [b"party-1", b"{not json"])
        assert error.type == "error" and error.content["error_type"] == "WireError"
        reply = _ask(sock, [b"party-1", *encode(Message("run", {"source": "6 * 7"}))])
        assert reply.type == "result" and reply.content["value"] == 42
        assert endpoint.stats["malformed"] >= 4 and endpoint.stats["failed"] == 0
    finally:
        sock.close(linger=0)
        context.term()


def test_parties_of_a_shared_endpoint_go_offline_with_it_and_a_foreign_party_is_refused(endpoint):
    specs = [{"name": f"party-{k}", "endpoint": endpoint.endpoint, "shared": True} for k in range(6)]
    with pytest.raises(FederationError, match="does not serve a party 'party-6'"):
        fednb.connect(specs + [{"name": "party-6", "endpoint": endpoint.endpoint, "shared": True}], timeout=5)
    fed = fednb.connect(specs, timeout=5, heartbeat=0.2, heartbeat_timeout=1.0)
    try:
        assert fed._connections.endpoints() == [{"endpoint": endpoint.endpoint, "status": "online", "parties": 6}]
        assert fed.run("1 + 1")["party-5"] == 2
        endpoint.stop()
        assert wait_until(lambda: {row.status for row in fed.status()} == {"offline"}, timeout=10)
    finally:
        fed.close()


def test_scaffold_on_a_pool_keeps_each_party_s_control_variate_across_evicted_members():
    def trained(fed) -> list[torch.Tensor]:
        model = build()
        fed.train(model, MLP, rounds=3, strategy="scaffold", lr=0.05, batch_size=16, parties_per_round=4, seed=2,
                  evaluate_every=0)
        return [p.detach().clone() for p in model.parameters()]

    # two members per worker: every sampled party's member is built afresh, its c_i read back from its file
    with fednb.simulate(12, dataset="digits", seed=1, backend="pool", workers=2, members=2) as fed:
        pooled = trained(fed)
        kept = list((fed.simulation.directory / "parties").glob("party-*/keep/*/scaffold.bundle"))
        assert kept  # each sampled party's c_i, in its own directory of the simulation's private one
    with fednb.simulate(12, dataset="digits", seed=1) as fed:
        separate = trained(fed)
    for a, b in zip(pooled, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_pool_worker_serves_on_through_thousands_of_hostile_frames_for_its_parties():
    """Every fuzz generator's frames, each behind a party's address, a bad address or the endpoint's own."""
    import json
    import random

    from tests.fuzzing import Aim, hello, mix, party_limits, rss

    with fednb.simulate(40, dataset="synthetic", partition="iid", backend="pool", workers=1, members=4) as fed:
        worker = fed.simulation.workers[0]
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.connect(worker["endpoint"])
        rng = random.Random(9)
        addresses = [b"party-3", b"party-17", b"", b"party-400", b"\xff\xfe", b"a" * 70, b"../x"]
        replies: dict[str, int] = {}

        def tally(reply: list[bytes]) -> str:
            header = json.loads(reply[1])
            key = header["content"].get("error_type", header["type"])
            replies[key] = replies.get(key, 0) + 1
            return header["type"]

        def send_all(count: int, seed: int) -> None:
            for _, frames in mix(seed, count, Aim("party", limits=party_limits(1 << 30))):
                sock.send_multipart([rng.choice(addresses), *frames])
                while sock.poll(0):
                    tally(sock.recv_multipart())

        try:
            send_all(300, 1)  # the allocator's first growth is not a leak
            before = rss(worker["pid"])
            send_all(3000, 2)
            sock.send_multipart([b"", *hello(rng)])
            assert wait_until(lambda: sock.poll(0) > 0, timeout=60)
            while sock.poll(2000):  # everything before the hello is answered first, and counted
                if tally(sock.recv_multipart()) == "welcome":
                    break
            else:
                raise AssertionError("the worker did not answer a hello after the fuzz")
            while sock.poll(2000):  # a fuzzed hello's welcome may come first: the worker is idle after the last reply
                tally(sock.recv_multipart())
            after = rss(worker["pid"])
        finally:
            sock.close(linger=0)
            context.term()
        assert replies.get("WireError", 0) > 1000 and not replies.get("InternalError"), replies
        assert replies.get("result", 0) > 10 and replies.get("ProtocolError", 0) > 100  # ran, or no such party
        assert after - before < 64 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB"
        history = fed.train(build(SMALL), SMALL, rounds=1, parties_per_round=8, evaluate_every=0)  # it still trains
        assert len(history[-1].parties) == 8


def test_secure_rounds_on_a_pool_keep_each_party_s_member_until_it_unmasks():
    """Two members a worker, six parties a secure round: a member is never evicted between its stages."""
    with fednb.simulate(30, dataset="digits", seed=4, backend="pool", workers=1, members=2) as fed:
        history = fed.train(build(), MLP, rounds=2, parties_per_round=6, secure_aggregation=True, lr=0.05,
                            evaluate_every=0)
        assert [len(r.parties) for r in history] == [6, 6] and not any(r.dropped for r in history)
        assert all(r.secure for r in history)


def test_thousands_of_parties_asked_at_once_through_one_shared_endpoint_all_answer():
    """More requests than ZeroMQ queues by default (1,000 a pipe) go through one endpoint's socket at once."""
    with fednb.simulate(2500, dataset="synthetic", backend="pool", workers=1, examples_per_party=8) as fed:
        results = fed.run("6 * 7", timeout=120)
    assert len(results) == 2500 and set(results.values()) == {42}


def test_a_shared_endpoint_bounds_the_bytes_its_parties_hold_together():
    directory = tempfile.mkdtemp()
    os.chmod(directory, 0o700)
    server = PopulationServer("pool-b", f"ipc://{directory}/pool.sock", _population(), max_held_bytes=1_000_000)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(lambda _: ready.set(),), daemon=True)
    thread.start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        assert ready.wait(10)
        sock.connect(server.endpoint)
        sock.send_multipart([b"party-0", *encode(Message("run", {"source": "import time\ntime.sleep(1.5)\n1"}))])
        big = "x = 1\n#" + "a" * 300_000 + "\nx"
        for k in range(1, 6):  # queued behind the sleep: each holds its 300 kB until it runs
            sock.send_multipart([f"party-{k}".encode(), *encode(Message("run", {"source": big}))])
        answers: dict[str, list[str]] = {}
        deadline = time.monotonic() + 30
        while sum(map(len, answers.values())) < 6 and time.monotonic() < deadline:
            if sock.poll(200):
                got = receive(sock, router=False, addressed=True)
                if got.message is not None and got.message.type != "heartbeat":
                    answers.setdefault(got.message.content.get("error_type", got.message.type), []).append(got.party)
        assert len(answers.get("PolicyRefused", [])) >= 2 and len(answers.get("result", [])) >= 3, answers
    finally:
        sock.close(linger=0)
        context.term()
        server.stop()
        thread.join(5)
