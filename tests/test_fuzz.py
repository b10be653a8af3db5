"""Fuzzing at scale, the short version: hostile frames at a live party process, hostile replies at a coordinator.

The frames come from tests/fuzzing.py (bench/fuzz.py sends ten times as many). A party must keep
serving, answer each frame it cannot use with an error, keep its memory bounded and its audit log
complete; a coordinator must turn each hostile reply into that party's error within the call's
timeout and keep the other parties' results. The frames that once broke one of them (tests/fuzzing.py's
FOUND: an empty buffer of a huge shape, a vertical request's settings that are no object, a welcome
whose split is no object) are in the mix, and each is sent on purpose by a regression test at the end.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import fednb
from fednb.errors import PartyError
from fednb.party.audit import verify
from fednb.transport import write_keypair
from tests.conftest import MLP, build
from tests.fuzzing import (FOUND, GENERATORS, KNOWN_DEFECTS, Aim, FakeParty, draw, dump, fuzz_party, hello, mix,
                           party_limits, rid, rss)
from tests.test_party import dealer  # noqa: F401 - the raw DEALER fixture
from tests.test_party_hardening import answer, ask, npz, party_args  # noqa: F401 - npz is a fixture

MiB = 1 << 20
FRAMES = {"ipc": 10_000, "tcp+curve": 4_000}  # CURVE costs more a frame; the time of `make test` is bounded
#: Growth allowed over the fuzz, after a warm-up: the largest messages are 4 MiB headers, held a
#: few times over while one is decoded (bytes, str, parsed), and the allocator keeps some freed
#: pages; ~25 MiB at most was seen. A leak of 5 KiB a frame (a reply, a log record, a routing id
#: kept per frame) would be 50 MiB over 10,000 frames, and is caught.
RSS_BOUND = 50 * MiB
COORDINATOR_TIMEOUT = 1.0


class Logged(logging.Handler):
    """Counts fednb's log records by level (exceptions apart), instead of pytest keeping thousands of them."""

    def __init__(self) -> None:
        super().__init__()
        self.levels: Counter[str] = Counter()
        self.exceptions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        if record.exc_info:
            self.exceptions.append(f"{record.getMessage()}: {record.exc_info[1]!r}")


@contextmanager
def counted_logs() -> Iterator[Logged]:
    """fednb's records counted, not kept: entered in the test's body, after pytest attached its capture
    (which also joins loggers that do not propagate when a test starts)."""
    logger = logging.getLogger("fednb")
    handler, propagate = Logged(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def stderr_lines(party) -> tuple[list[str], threading.Thread]:
    """Read the party's log lines as they come (a full pipe would stop its logging, and then the party)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(party.process.stderr.readline, "")), daemon=True)
    reader.start()
    return lines, reader


# -- a live party process ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["ipc", "tcp+curve"])
def test_a_party_process_serves_on_through_thousands_of_hostile_frames(cli_parties, npz, tmp_path, private_dir,
                                                                        dealer, transport):
    """Every generator's frames; then the party answers a hello, its RSS and audit log are checked, it exits 0.

    ipc: policy allowlist (every request refused, each one audited); tcp + CURVE: an authorized key,
    policy review and a privacy budget (requests wait for the owner, DP settings are read).
    """
    directory = tmp_path / "clinic"
    if transport == "ipc":
        args = party_args("clinic", f"ipc://{private_dir}/c.sock", npz, directory, "--policy", "allowlist")
        keys: tuple = ()
    else:
        party_key, coordinator = write_keypair(tmp_path / "party"), write_keypair(tmp_path / "coordinator")
        args = party_args("clinic", "tcp://127.0.0.1:*", npz, directory, "--policy", "review", "--key",
                          str(tmp_path / "party"), "--authorized-keys", str(tmp_path / "coordinator.key"),
                          "--dp-epsilon", "8")
        keys = (coordinator, party_key.public)
    party = cli_parties(*args)
    sock = dealer(party.wait_listening(), *keys)
    lines, reader = stderr_lines(party)
    aim = Aim("party", limits=party_limits(1 << 30))  # --max-message-bytes 1G, the default
    warm = fuzz_party(sock, mix(1, 500, aim))  # the allocator's first growth is not a leak
    assert warm.welcomed
    before = rss(party.process.pid)
    tally = fuzz_party(sock, mix(14, FRAMES[transport], aim))
    after = rss(party.process.pid)

    assert tally.welcomed and party.process.poll() is None  # it answered a hello after all of them
    assert sum(tally.sent.values()) == FRAMES[transport] and set(tally.sent) == set(GENERATORS)
    assert tally.errors["WireError"] > FRAMES[transport] // 2 and not tally.errors["InternalError"], tally.errors
    assert after - before < RSS_BOUND, f"RSS grew {(after - before) / MiB:.1f} MiB ({before / MiB:.0f} MiB before)"
    party.process.send_signal(signal.SIGTERM)
    assert party.process.wait(20) == 0
    reader.join(10)
    tracebacks = [line for line in lines if "Traceback" in line]
    assert not tracebacks and "Traceback" not in (directory / "party.log").read_text(), tracebacks[:3]
    assert sum("lone surrogate" in line for line in lines) > 10  # how this fuzz found its first defect
    checked = verify(directory)
    assert checked.intact, checked.problem
    # one line per request that reached the gate: each was refused, or waited and was abandoned at the stop
    waited = sum(e["outcome"].startswith("abandoned") for e in checked.entries)
    refused = warm.errors["PolicyRefused"] + warm.errors["ReplayError"] + tally.errors["PolicyRefused"] + \
        tally.errors["ReplayError"]
    assert len(checked.entries) == refused + waited and refused > 100, (len(checked.entries), refused, waited)
    assert transport == "ipc" or waited > 0


# -- a coordinator -------------------------------------------------------------------------------------

def test_a_coordinator_turns_hostile_replies_into_that_partys_errors(start_party, private_dir):
    """A fake party answers every request with 20 hostile messages; a real party's results are all kept."""
    real = start_party(f"ipc://{private_dir}/real.sock", policy="simulation", contained=False)
    model = build()
    with counted_logs() as logged, FakeParty(f"ipc://{private_dir}/fake.sock", seed=14, burst=20) as fake, \
            fednb.connect([{"name": "real", "endpoint": real.endpoint},
                           {"name": "fake", "endpoint": fake.endpoint}], timeout=20) as fed:
        for _ in range(5):  # torch's and the allocator's first growth is not a leak
            fed.run("1", timeout=COORDINATOR_TIMEOUT)
        fed.evaluate(model, MLP, timeout=30)
        fed.train(model, MLP, rounds=1, min_parties=1, round_timeout=30, evaluate_every=0)
        before = rss()
        fake_results: Counter[str] = Counter()
        slowest = 0.0
        for index in range(100):
            started = time.monotonic()
            results = fed.run("1", timeout=COORDINATOR_TIMEOUT)
            slowest = max(slowest, time.monotonic() - started)
            assert results["real"] == 1
            fake_results[type(results["fake"]).__name__] += 1
            if index % 10 == 0:
                assert [row.status for row in fed.status()] == ["online", "online"]
        for _ in range(5):
            evaluation = fed.evaluate(model, MLP, timeout=10)
            assert evaluation.parties["real"]["examples"] > 0
        history = fed.train(model, MLP, rounds=1, min_parties=1, round_timeout=10, evaluate_every=0)
        assert "real" in history[-1].parties and "fake" not in history[-1].parties, history[-1].dropped
        after = rss()
        assert fed._connections._thread.is_alive()  # the socket thread: one failure there ends the federation

    assert sum(fake.sent.values()) >= 2000 and set(GENERATORS) <= set(fake.sent), fake.sent
    assert fake_results["PartyError"] >= 90, fake_results  # the rest: a well-formed result (a plain value)
    assert slowest < COORDINATOR_TIMEOUT + 2.0
    assert after - before < RSS_BOUND, f"RSS grew {(after - before) / MiB:.1f} MiB"
    assert logged.levels["WARNING"] >= 1000 and not logged.exceptions, logged.exceptions[:3]


# -- what the fuzz found, fixed: regression tests -----------------------------------------------------------------

def known(name: str, aim: Aim) -> list[bytes]:
    """The frames that once triggered defect ``name`` (tests/fuzzing.py's FOUND)."""
    return FOUND[name](random.Random(0), aim)


def test_a_zero_size_buffer_of_a_huge_shape_does_not_stop_a_party_process(cli_parties, npz, tmp_path, private_dir,
                                                                             dealer):
    party = cli_parties(*party_args("clinic", f"ipc://{private_dir}/c.sock", npz, tmp_path / "clinic",
                                    "--policy", "allowlist"))
    sock = dealer(party.wait_listening())
    sock.send_multipart(known("huge_empty_shape", Aim("party")))
    try:
        code = party.process.wait(3)
    except subprocess.TimeoutExpired:  # still serving
        code = None
    assert code is None, f"the party exited with status {code}"
    refused = answer(sock, timeout=10)  # the malformed frame's answer names no request
    assert refused["type"] == "error" and refused["content"]["error_type"] == "WireError", refused
    assert ask(sock, hello(random.Random(1)), timeout=10)["type"] == "welcome"


def test_a_zero_size_buffer_of_a_huge_shape_in_a_reply_costs_that_party_only(start_party, private_dir):
    real = start_party(f"ipc://{private_dir}/real.sock", policy="simulation", contained=False)
    with FakeParty(f"ipc://{private_dir}/fake.sock", seed=1) as fake, \
            fednb.connect([{"name": "real", "endpoint": real.endpoint},
                           {"name": "fake", "endpoint": fake.endpoint}], timeout=20) as fed:
        fake.next_burst = [known("huge_empty_shape", Aim("coordinator"))]
        fed.run("1", timeout=COORDINATOR_TIMEOUT)
        results = fed.run("1", timeout=COORDINATOR_TIMEOUT)
        assert results["real"] == 1 and isinstance(results["fake"], PartyError), results
        assert fed._connections._thread.is_alive()


def test_a_vertical_request_whose_config_is_no_object_is_refused_and_audited(start_party, private_dir, tmp_path,
                                                                            dealer, caplog):
    directory = tmp_path / "party"
    party = start_party(f"ipc://{private_dir}/p.sock", policy="allowlist", directory=directory)
    sock = dealer(party.endpoint)
    with caplog.at_level(logging.WARNING, logger="fednb.party"):
        reply = ask(sock, known("vertical_config", Aim("party")))
    party.stop()
    refused = reply["content"].get("error_type")
    assert reply["type"] == "error" and refused in ("PolicyRefused", "WireError"), reply["content"]
    assert not [record for record in caplog.records if record.exc_info]
    assert len(verify(directory).entries) == (refused == "PolicyRefused")  # the gate audits what reaches it


def test_a_welcome_whose_train_split_is_no_object_costs_that_partys_row_only(start_party, private_dir):
    real = start_party(f"ipc://{private_dir}/real.sock", policy="simulation", contained=False)
    with FakeParty(f"ipc://{private_dir}/fake.sock", seed=1) as fake, \
            fednb.connect([{"name": "real", "endpoint": real.endpoint},
                           {"name": "fake", "endpoint": fake.endpoint}], timeout=20) as fed:
        fake.next_burst = [known("welcome_datasets", Aim("coordinator")), [b"not a header"]]
        assert isinstance(fed.run("1", timeout=COORDINATOR_TIMEOUT)["fake"], PartyError)  # after the welcome
        rows = {row.name: row for row in fed.status()}
        assert rows["real"].examples > 0 and rows["fake"].status == "online"


# -- a coordinator, through a shared endpoint ------------------------------------------------------------

class FakeEndpoint(FakeParty):
    """A ROUTER that passes for a shared endpoint of parties ``a``, ``b`` and ``c`` and answers each request
    with hostile frames behind that party's address, another party's, the endpoint's or a malformed one."""

    PARTIES = ("a", "b", "c")
    ADDRESSES = (b"", b"zz", b"\xff", b"x" * 70)

    def _serve(self) -> None:
        assert self._socket is not None
        sock, next_beat = self._socket, 0.0
        while not self._stop.is_set():
            if sock.poll(50):
                routing, address, *frames = sock.recv_multipart()
                self._peers.add(routing)
                self._reply(sock, routing, address, json.loads(frames[0]))
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat
                beat = dump({"v": 1, "id": rid(self._ids), "type": "heartbeat", "round": None, "reply_to": None,
                             "content": {}, "buffers": []})
                for peer in self._peers:
                    sock.send_multipart([peer, b"", beat])

    def _reply(self, sock, routing: bytes, address: bytes, request: dict) -> None:
        if request["type"] == "hello":
            welcome = {"v": 1, "id": rid(self._ids), "type": "welcome", "round": None, "reply_to": request["id"],
                       "content": {"party": "fake", "version": fednb.__version__, "policy": "simulation",
                                   "datasets": {}, "pool": {"parties": list(self.PARTIES),
                                                            "datasets": {"train": {"features": [4]}}}},
                       "buffers": [{"name": "pool.train", "dtype": "int64", "shape": [3], "nbytes": 24}]}
            sock.send_multipart([routing, b"", dump(welcome), np.array([5, 6, 7], np.int64).tobytes()])
            return
        if request["type"] in ("heartbeat", "cancel"):
            return
        self.requests += 1
        aim = Aim("coordinator", reply_to=request["id"], round=request["round"],
                  buffers=tuple((b["name"], b["dtype"], tuple(b["shape"])) for b in request["buffers"]))
        for _ in range(self.burst):
            name, frames = draw(self.rng, aim, self.generators, self.avoided)
            to = address if self.rng.random() < 0.7 else self.rng.choice((*self.ADDRESSES, b"a", b"b"))
            sock.send_multipart([routing, to, *frames])
            self.sent[name] += 1
        sock.send_multipart([routing, address, b"not a header"])


def test_a_coordinator_turns_hostile_replies_of_a_shared_endpoint_into_its_parties_errors(private_dir):
    with counted_logs() as logged, FakeEndpoint(f"ipc://{private_dir}/pool.sock", seed=21, burst=20) as fake, \
            fednb.connect([{"name": name, "endpoint": fake.endpoint, "shared": True} for name in FakeEndpoint.PARTIES],
                          timeout=20) as fed:
        assert {row.name: row.examples for row in fed.status()} == {"a": 5, "b": 6, "c": 7}
        for _ in range(5):
            fed.run("1", timeout=COORDINATOR_TIMEOUT)
        before = rss()
        outcomes: Counter[str] = Counter()
        for _ in range(60):
            for party, result in fed.run("1", timeout=COORDINATOR_TIMEOUT).items():
                outcomes[type(result).__name__] += 1
        after = rss()
        assert fed._connections._thread.is_alive()
        assert {row.status for row in fed.status()} == {"online"}
    assert sum(fake.sent.values()) >= 3000, fake.sent
    assert outcomes["PartyError"] >= 150, outcomes  # each request failed by what came back, or its timeout
    assert after - before < RSS_BOUND, f"RSS grew {(after - before) / MiB:.1f} MiB"
    assert logged.levels["WARNING"] >= 1000 and not logged.exceptions, logged.exceptions[:3]
