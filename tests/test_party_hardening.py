"""A party against hostile or careless peers, across real processes and sockets.

Lone surrogates, exceptions while handling a message, replays, memory a peer could pin,
messages over the size limit, a tampered audit log, and the party's log lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
import zmq

import fednb
from fednb.party.audit import new_chain, verify, who
from fednb.transport import AllowList, generate
from fednb.wire import Message, encode, new_id
from tests.conftest import MLP, cli, wait_until
from tests.test_party import dealer  # noqa: F401 - the raw DEALER fixture

RUN = "5eed" * 8


def header(type_: str, content: dict, *, round_: int | None = None, id_: str | None = None) -> bytes:
    """A header as a hostile peer writes it: json.dumps escapes lone surrogates as \\udXXX."""
    return json.dumps({"v": 1, "id": id_ or new_id(), "type": type_, "round": round_, "reply_to": None,
                       "content": content, "buffers": []}).encode()


def answer(sock: zmq.Socket, request_id: str | None = None, timeout: float = 10.0, final: bool = True) -> dict:
    """The next reply's header (to ``request_id`` when given), skipping heartbeats (and status when ``final``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sock.poll(50):
            continue
        reply = json.loads(sock.recv_multipart()[0])
        if reply["type"] == "heartbeat" or (final and reply["type"] == "status"):
            continue
        if request_id is None or reply["reply_to"] == request_id or reply["reply_to"] is None:
            return reply
    raise AssertionError(f"no reply to {request_id} within {timeout} s")


def ask(sock: zmq.Socket, frames: list, *, final: bool = True, timeout: float = 10.0) -> dict:
    sock.send_multipart(frames)
    return answer(sock, json.loads(frames[0])["id"], timeout, final)


@pytest.fixture
def npz(tmp_path, digits_parts):
    path = tmp_path / "train.npz"
    np.savez(path, x=digits_parts[0].x_train, y=digits_parts[0].y_train)
    return path


def party_args(name, endpoint, npz, directory, *more):
    return ("--name", name, "--listen", endpoint, "--data", f"train={npz}", "--dir", str(directory), "--threads", "1",
            *more)


# -- one message never knocks the party over ------------------------------------------------------------

SURROGATES = [
    ("run", {"source": "\ud800"}),
    ("run", {"source": "x = 1", "\udfff": 1}),
    ("evaluate", {"source": "model = \udc00", "config": {}}),
    ("train", {"source": "\ud800", "config": {}, "run": RUN}),
    ("train", {"source": "x", "config": {"lr\ud800": 0.1}, "run": RUN}),
]


@pytest.mark.parametrize("policy", ["open", "review"])
def test_lone_surrogates_are_refused_and_the_party_process_keeps_serving(cli_parties, npz, tmp_path, private_dir,
                                                                         dealer, policy):
    party = cli_parties(*party_args("clinic", f"ipc://{private_dir}/c.sock", npz, tmp_path / "clinic",
                                    "--policy", policy))
    sock = dealer(party.wait_listening())
    for type_, content in SURROGATES:
        reply = ask(sock, [header(type_, content, round_=1 if type_ == "train" else None)])
        assert reply["type"] == "error" and reply["content"]["error_type"] == "WireError"
        assert "lone surrogate" in reply["content"]["message"]
    assert party.process.poll() is None
    reply = ask(sock, [header("run", {"source": "6 * 7"})], final=policy == "open")
    if policy == "open":
        assert reply["type"] == "result" and reply["content"]["value"] == 42
    else:  # waiting for the owner is an answer too: the party serves
        assert reply["type"] == "status" and reply["content"]["state"] == "awaiting approval"
    assert party.stop() == 0


def test_an_exception_while_handling_a_message_costs_that_message_only(start_party, private_dir, dealer, caplog):
    party = start_party(f"ipc://{private_dir}/p.sock", policy="simulation", contained=False)
    sock = dealer(party.endpoint)
    admit = party.admission.admit

    def broken(routing, ticket):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "a bug no check foresaw")

    party.admission.admit = broken
    with caplog.at_level(logging.ERROR, logger="fednb.party.server"):
        reply = ask(sock, [header("run", {"source": "1"})])
    assert reply["type"] == "error" and reply["content"]["error_type"] == "InternalError"
    assert any("failed on run" in r.getMessage() and r.exc_info for r in caplog.records)
    assert party.stats["failed"] == 1 and party.state.value == "running"
    party.admission.admit = admit
    assert ask(sock, [header("run", {"source": "6 * 7"})])["content"]["value"] == 42


# -- replays --------------------------------------------------------------------------------------------

def test_replayed_requests_and_rounds_that_go_back_are_refused(start_party, private_dir, tmp_path, dealer, caplog):
    directory = tmp_path / "party"
    party = start_party(f"ipc://{private_dir}/p.sock", policy="simulation", contained=False, directory=directory)
    sock = dealer(party.endpoint)
    frames = [header("run", {"source": "6 * 7"})]
    assert ask(sock, frames)["content"]["value"] == 42
    with caplog.at_level(logging.WARNING, logger="fednb.party"):
        replayed = ask(sock, frames)
    assert replayed["type"] == "error" and replayed["content"]["error_type"] == "ReplayError"
    assert "received before" in replayed["content"]["message"]
    assert any("ReplayError" in r.getMessage() or "received before" in r.getMessage() for r in caplog.records)

    def train(round_: int, run: str = RUN) -> dict:
        # the model source fails in the kernel: the replay check comes before anything runs
        return ask(sock, [header("train", {"source": "model = None", "config": {}, "run": run}, round_=round_)])

    assert train(5)["content"]["error_type"] != "ReplayError"
    back = train(3)
    assert back["content"]["error_type"] == "ReplayError" and "round 3" in back["content"]["message"]
    assert "round 5" in back["content"]["message"]
    assert train(5)["content"]["error_type"] == "ReplayError"  # the same round again, with a new id
    assert train(6)["content"]["error_type"] != "ReplayError"
    assert train(1, run="ab" * 16)["content"]["error_type"] != "ReplayError"  # a new run starts fresh
    party.stop()
    entries = verify(directory).entries
    refused = [e for e in entries if str(e["outcome"]).startswith("refused:")]
    assert len(refused) == 3 and all(e["decision"] == "refuse" for e in refused)
    assert "received before" in refused[0]["outcome"] and "does not move forward" in refused[1]["outcome"]


def test_a_federation_trains_again_after_a_run(start_party, private_dir):
    """Two runs of the same rounds: each gets its own run id, so the second is not a replay."""
    from tests.conftest import MLP, build

    party = start_party(f"ipc://{private_dir}/p.sock", policy="simulation", contained=False)
    with fednb.connect([{"name": "p", "endpoint": party.endpoint}]) as fed:
        for _ in range(2):
            history = fed.train(build(), MLP, rounds=2, train_cell="pass", evaluate_every=0)
            assert history[-1].parties["p"].examples > 0  # no round was refused as a replay


# -- memory a peer could pin ----------------------------------------------------------------------------

def test_requests_held_for_the_owner_have_a_byte_budget(start_party, private_dir, tmp_path, dealer):
    party = start_party(f"ipc://{private_dir}/p.sock", policy="review", directory=tmp_path / "party",
                        max_held_bytes=6000)
    sock = dealer(party.endpoint)
    first = ask(sock, [header("run", {"source": "1 #" + "x" * 3000})], final=False)
    assert first["type"] == "status" and first["content"]["state"] == "awaiting approval"
    second = ask(sock, [header("run", {"source": "2 #" + "x" * 3000})])
    assert second["type"] == "error" and second["content"]["error_type"] == "PolicyRefused"
    assert "over its budget of 6,000 bytes" in second["content"]["message"]
    assert len(party.admission.waiting) == 1
    small = ask(sock, [header("run", {"source": "3"})], final=False)  # room for a small one still
    assert small["type"] == "status"


def test_cancels_of_unknown_requests_are_not_remembered(start_party, private_dir, dealer):
    party = start_party(f"ipc://{private_dir}/p.sock", policy="simulation", contained=False)
    sock = dealer(party.endpoint)
    for _ in range(5000):
        sock.send_multipart([header("cancel", {"target": new_id()})])
    assert wait_until(lambda: party.stats["received"] >= 5000, timeout=20)
    assert party.admission._cancelled == set() and party.admission._queued == set()
    # a cancel of a queued request still works: it is answered without running
    slow = [header("run", {"source": "import time\ntime.sleep(1)\n1"})]
    queued = [header("run", {"source": "2"})]
    sock.send_multipart(slow)
    sock.send_multipart(queued)
    queued_id = json.loads(queued[0])["id"]
    sock.send_multipart([header("cancel", {"target": queued_id})])
    reply = answer(sock, queued_id)
    assert reply["content"]["error_type"] == "Cancelled" and "before it ran" in reply["content"]["message"]
    assert party.admission._cancelled == set()


def test_a_cancel_that_lets_work_finish_keeps_the_worker_and_a_plain_cancel_kills_it(start_party, private_dir,
                                                                                      dealer):
    """At a round's deadline the coordinator sends ``finish``: the running request ends normally in its
    warm worker (its session kept), a queued one is dropped; a plain cancel (Ctrl-C) stops the running one."""
    party = start_party(f"ipc://{private_dir}/p.sock", policy="open")
    sock = dealer(party.endpoint)
    assert ask(sock, [header("run", {"source": "warm = 41\nwarm"})], timeout=60)["type"] == "result"
    slow = [header("run", {"source": "import time\ntime.sleep(1.5)\nwarm + 1"})]
    queued = [header("run", {"source": "'never ran'"})]
    sock.send_multipart(slow)
    sock.send_multipart(queued)
    slow_id, queued_id = (json.loads(frames[0])["id"] for frames in (slow, queued))
    time.sleep(0.3)
    for target in (slow_id, queued_id):
        sock.send_multipart([header("cancel", {"target": target, "finish": True})])
    finished = answer(sock, slow_id)
    assert finished["type"] == "result" and finished["content"]["value"] == 42  # same worker, same session
    dropped = answer(sock, queued_id)
    assert dropped["content"]["error_type"] == "Cancelled" and "before it ran" in dropped["content"]["message"]
    stopped = [header("run", {"source": "import time\ntime.sleep(30)"})]
    stopped_id = json.loads(stopped[0])["id"]
    sock.send_multipart(stopped)
    time.sleep(0.3)
    sock.send_multipart([header("cancel", {"target": stopped_id})])
    killed = answer(sock, stopped_id)
    assert killed["content"]["error_type"] == "Cancelled" and "starts afresh" in killed["content"]["message"]
    bad = ask(sock, [header("cancel", {"target": new_id(), "finish": "yes"})])
    assert bad["type"] == "error" and "finish" in bad["content"]["message"]


def test_max_message_bytes_bounds_frames_and_messages(cli_parties, npz, tmp_path, private_dir, dealer):
    party = cli_parties(*party_args("clinic", f"ipc://{private_dir}/c.sock", npz, tmp_path / "clinic",
                                    "--policy", "open", "--max-message-bytes", "1M"))
    endpoint = party.wait_listening()
    big = dealer(endpoint)
    # one frame over the limit: libzmq drops the sender before any of it reaches the party
    message = Message("run", {"source": "1"}, arrays={"x": np.zeros(2 << 20, np.uint8)})
    big.send_multipart(encode(message))
    assert not big.poll(1000) or json.loads(big.recv_multipart()[0])["type"] == "heartbeat"
    # frames under the limit that add up to more: refused from the header, before any array is built
    sock = dealer(endpoint)
    arrays = {name: np.zeros(600 << 10, np.uint8) for name in "ab"}
    frames = [bytes(frame) for frame in encode(Message("run", {"source": "1"}, arrays=arrays))]
    reply = ask(sock, frames)
    assert reply["content"]["error_type"] == "WireError" and "over the limit of 1048576" in reply["content"]["message"]
    assert ask(sock, [header("run", {"source": "6 * 7"})])["content"]["value"] == 42
    assert party.stop() == 0


def test_the_party_command_documents_max_message_bytes():
    from tests.conftest import cli

    shown = cli("party", "--help").stdout
    assert "--max-message-bytes" in shown and "256M float32" in " ".join(shown.split())


# -- the audit log ----------------------------------------------------------------------------------------

def test_a_tampered_audit_log_stays_broken_until_the_owner_acts(cli_parties, npz, tmp_path, private_dir, dealer):
    directory = tmp_path / "clinic"
    args = party_args("clinic", f"ipc://{private_dir}/c.sock", npz, directory, "--policy", "open")
    party = cli_parties(*args)
    sock = dealer(party.wait_listening())
    assert ask(sock, [header("run", {"source": "6 * 7"})])["content"]["value"] == 42
    assert party.stop() == 0
    log_path = directory / "audit.jsonl"
    log_path.write_text(log_path.read_text().replace('"outcome":"ok"', '"outcome":"refused"'))
    tampered = log_path.read_bytes()

    again = cli_parties(*args)
    assert again.process.wait(60) == 2
    error = again.process.stderr.read().strip()
    assert len(error.splitlines()) == 1 and "does not verify" in error and "--new-chain" in error
    assert log_path.read_bytes() == tampered and not verify(directory).intact  # nothing chained on

    # the documented way out, as the owner types it
    done = cli("audit", str(directory), "--new-chain")
    assert "set the broken audit log aside as audit.broken-" in done.stdout
    (aside,) = directory.glob("audit.broken-*.jsonl")
    assert aside.read_bytes() == tampered
    with pytest.raises(fednb.errors.GateError, match="intact"):
        new_chain(directory)
    refused = cli("audit", str(directory), "--new-chain", check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    restarted = cli_parties(*args)
    sock = dealer(restarted.wait_listening())
    assert ask(sock, [header("run", {"source": "6 * 7"})])["content"]["value"] == 42
    assert restarted.stop() == 0
    checked = verify(directory)
    assert checked.intact and len(checked.entries) == 2
    first = checked.entries[0]
    assert first["type"] == "new-chain" and "did not verify" in first["outcome"]
    assert first["previous_log"] == aside.name and first["previous_sha256"] == hashlib.sha256(tampered).hexdigest()


def test_an_audit_log_that_cannot_be_written_fails_closed(start_party, private_dir, tmp_path, dealer):
    directory = tmp_path / "party"
    party = start_party(f"ipc://{private_dir}/p.sock", policy="simulation", contained=False, directory=directory)
    sock = dealer(party.endpoint)
    assert ask(sock, [header("run", {"source": "6 * 7"})])["content"]["value"] == 42
    shutil.move(directory / "audit.jsonl", directory / "audit.saved")
    os.mkdir(directory / "audit.jsonl")  # appending now fails, whoever the process runs as
    withheld = ask(sock, [header("run", {"source": "6 * 7"})])
    assert withheld["type"] == "error" and "could not write its audit log" in withheld["content"]["message"]
    refused = ask(sock, [header("run", {"source": "1"})])
    assert refused["content"]["error_type"] == "PolicyRefused" and "cannot write its audit log" in \
        refused["content"]["message"]


# -- what the owner reads ---------------------------------------------------------------------------------

def test_normal_disconnects_are_info_and_the_audit_names_the_label(start_party, tmp_path, caplog):
    party_key, coordinator = generate(), generate()
    directory = tmp_path / "party"
    party = start_party("tcp://127.0.0.1:*", keypair=party_key, allow=AllowList(keys={coordinator.public: "alice"}),
                        policy="simulation", contained=False, directory=directory, heartbeat=0.1, timeout=5.0)
    with caplog.at_level(logging.INFO, logger="fednb.party"):
        for _ in range(2):
            with fednb.connect([{"name": "p", "endpoint": party.endpoint, "public_key": party_key.public.decode()}],
                               coordinator, timeout=10) as fed:
                assert fed.run("6 * 7")["p"] == 42
            assert wait_until(lambda: not party._sessions, timeout=5)
    server = [r for r in caplog.records if r.name == "fednb.party.server"]
    assert not [r for r in server if r.levelno >= logging.WARNING], [r.getMessage() for r in server]
    assert sum("disconnected" in r.getMessage() for r in server) == 2
    assert any("alice (" in r.getMessage() for r in server)
    (entry, _) = verify(directory).entries
    assert entry["label"] == "alice" and entry["coordinator"] == coordinator.public.decode()
    assert who(entry) == f"alice ({coordinator.public.decode()[:12]})"


def test_a_restarted_party_still_refuses_a_round_its_run_already_trained(start_party, private_dir, tmp_path, dealer):
    """The runs' last rounds live in the party directory (replay.json): a restart does not forget them."""
    endpoint = f"ipc://{private_dir}/r.sock"
    directory = tmp_path / "party"
    party = start_party(endpoint, policy="open", directory=directory)
    sock = dealer(endpoint)
    train = header("train", {"source": MLP, "config": {"lr": 0.1, "epochs": 1, "batch_size": 16}, "run": RUN},
                   round_=3)
    assert ask(sock, [train], timeout=60)["type"] in ("result", "error")
    party.stop()
    assert json.loads((directory / "replay.json").read_text())  # written, atomically, once per round
    restarted = start_party(endpoint, policy="open", directory=directory)
    sock = dealer(endpoint)
    again = header("train", {"source": MLP, "config": {"lr": 0.1, "epochs": 1, "batch_size": 16}, "run": RUN},
                   round_=2)
    reply = ask(sock, [again], timeout=60)
    assert reply["type"] == "error" and "does not move forward" in reply["content"]["message"]
    restarted.stop()
    (directory / "replay.json").write_text("{not json")
    with pytest.raises(ValueError, match="replay.json cannot be read"):
        start_party(endpoint, index=1, policy="open", directory=directory)
