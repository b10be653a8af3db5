"""The party's gate without sockets: code hashes, approvals on disk, the egress guard, the audit chain."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pytest

from fednb.errors import GateError
from fednb.party import Datasets, Split
from fednb.party.approvals import Approvals, parse_until
from fednb.party.audit import AuditLog, verify
from fednb.party.directory import open_directory
from fednb.party.egress import EgressBlocked, EgressRules, Guard
from fednb.party.policy import Verdict, decide, request_code
from fednb.privacy import masking
from fednb.wire import Message
from fednb.wire.values import pack_value, unpack_value
from tests.conftest import MLP


@pytest.fixture
def party_dir(tmp_path):
    return open_directory(tmp_path / "party", create=True)


# -- code hashes and decisions --------------------------------------------------------------------

def test_a_one_byte_change_is_a_new_hash():
    base = request_code("run", {"source": "label_counts(train)"})
    assert request_code("run", {"source": "label_counts(train)"}).hash == base.hash
    assert request_code("run", {"source": "label_counts(train) "}).hash != base.hash
    loop = request_code("train", {"source": MLP, "config": {}})
    cell = request_code("train", {"source": MLP, "train_cell": "pass", "config": {}})
    changed = request_code("train", {"source": MLP.replace("32", "33"), "config": {}})
    assert len({loop.hash, cell.hash, changed.hash}) == 3 and loop.loop == "fednb.supervised v1"
    # the config (learning rate, …) is data, not code: it does not change the hash
    assert request_code("train", {"source": MLP, "config": {"lr": 9}}).hash == loop.hash
    # approving training of a model also covers evaluating it with the built-in evaluation
    assert loop.companions == (request_code("evaluate", {"source": MLP, "config": {}}).hash,)
    # a run cell is not a training cell with the same text
    assert request_code("run", {"source": "pass"}).hash != cell.hash


def test_policies_decide():
    code = request_code("run", {"source": "1"})
    assert decide("open", "unknown", "p", code).verdict is Verdict.RUN
    assert decide("simulation", "denied", "p", code).verdict is Verdict.RUN
    assert decide("review", "unknown", "p", code).verdict is Verdict.WAIT
    assert decide("review", "approved", "p", code).verdict is Verdict.RUN
    assert decide("review", "denied", "p", code).verdict is Verdict.REFUSE
    refused = decide("allowlist", "unknown", "p", code)
    assert refused.verdict is Verdict.REFUSE and "allowlist" in refused.reason and code.hash[:12] in refused.reason


# -- approvals on disk ------------------------------------------------------------------------------

def test_approvals_persist_expire_and_count_rounds(party_dir):
    code = request_code("train", {"source": MLP, "config": {}})
    approvals = Approvals(party_dir)
    assert approvals.standing(code.hash) == "unknown"
    assert approvals.add_pending(code, "coordinator-key", "weights")
    assert [p.hash for p in approvals.pending()] == [code.hash]
    hashes = approvals.approve(code.hash, rounds=2, by="test")
    assert hashes == [code.hash, *code.companions] and approvals.pending() == []
    again = Approvals(party_dir)  # a restart reads the same file
    assert again.standing(code.hash) == "approved" and again.standing(code.companions[0]) == "approved"
    again.use(code.hash)
    again.use(code.hash)
    assert Approvals(party_dir).standing(code.hash) == "unknown"  # two rounds used up
    assert Approvals(party_dir).standing(code.companions[0]) == "approved"
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    approvals.approve(code.hash, until=parse_until((later - dt.timedelta(days=1)).date().isoformat()))
    assert approvals.standing(code.hash) == "approved"
    assert approvals.standing(code.hash, at=later) == "unknown"
    approvals.deny(code.hash)
    assert Approvals(party_dir).standing(code.hash) == "denied"
    assert approvals.resolve(code.hash[:10]) == code.hash
    with pytest.raises(ValueError, match="past"):
        parse_until("2001-01-01")


def test_a_malformed_approvals_file_approves_nothing(party_dir):
    code = request_code("run", {"source": "1"})
    Approvals(party_dir).approve(code.hash)
    (party_dir / "approvals.json").write_text('{"version": 1, "approved": {"zz": {}}, "denied": {}}')
    with pytest.raises(GateError, match="malformed"):
        Approvals(party_dir)  # a party refuses to start on it
    (party_dir / "approvals.json").write_text(json.dumps({"version": 1, "approved": {}, "denied": {}}))
    live = Approvals(party_dir)
    (party_dir / "approvals.json").write_text("not json")
    assert live.standing(code.hash) == "unknown"  # a running party fails closed
    with pytest.raises(GateError):
        live.approve(code.hash)  # and never overwrites what it could not read
    assert (party_dir / "approvals.json").read_text() == "not json"


def test_a_party_directory_others_can_write_is_refused(tmp_path):
    directory = tmp_path / "open"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(GateError, match="chmod 700"):
        open_directory(directory, create=False)


# -- the egress guard -----------------------------------------------------------------------------

@pytest.fixture
def guard():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=60)
    data = Datasets({"train": Split(x, y), "test": Split(x[:20], y[:20])})
    return Guard("clinic", data, EgressRules(max_values=100, min_group=5)), x


def _train(arrays, content=None):
    request = Message("train", {"source": MLP, "config": {}, "run": "ab" * 16}, round=1,
                      arrays={"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})
    reply = request.reply("result", content or {"examples": 60, "metrics": {"loss": 0.5}, "seconds": 0.1}, arrays)
    return request, reply


GOOD = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}


@pytest.mark.parametrize("arrays, content, why", [
    ({"w": GOOD["w"], "data": np.ones(3, np.float32)}, None, "missing tensor 'b'; unexpected tensor 'data'"),      # a renamed tensor
    ({**GOOD, "extra": np.ones(3, np.float32)}, None, "unexpected tensor 'extra'"),                    # an extra key
    ({"w": np.ones((5, 3), np.float32), "b": GOOD["b"]}, None, "shape"),                          # a wrong shape
    ({"w": GOOD["w"], "b": GOOD["b"].astype(np.float64)}, None, "dtype"),                        # a wrong dtype
    ({"w": np.full((4, 3), np.nan, np.float32), "b": GOOD["b"]}, None, "non-finite"),              # NaN
    (GOOD, {"examples": 60, "metrics": {"note": "secret"}}, "finite number"),                   # a string metric
    (GOOD, {"examples": 60, "metrics": {f"m{i}": 1.0 for i in range(17)}}, "17 metrics"),          # 17 metrics
    (GOOD, {"examples": 60, "metrics": {"patient Smith": 1.0}}, "not a plain name"),              # data in a name
    (GOOD, {"examples": 10**6, "metrics": {}}, "example count"),                                  # data in a count
])
def test_guard_blocks_off_spec_training_replies(guard, arrays, content, why):
    request, reply = _train(arrays, content)
    with pytest.raises(EgressBlocked, match=why):
        guard[0].reply(request, reply)


def test_guard_rebuilds_a_good_training_reply(guard):
    request, reply = _train(GOOD, {"examples": 60, "metrics": {f"m{i}": 1.0 for i in range(16)}, "seconds": 1.5})
    out, note = guard[0].reply(request, reply)
    assert out.type == "result" and set(out.arrays) == {"w", "b"} and len(out.content["metrics"]) == 16
    assert out.reply_to == request.id and note == ""


def _run(guard, value):
    request = Message("run", {"source": "..."})
    packed, arrays = pack_value(value)
    out, note = guard.reply(request, request.reply("result", {"value": packed, "seconds": 0.0}, arrays))
    return unpack_value(out.content["value"], out.arrays), note


def test_guard_lets_aggregates_out_and_suppresses_small_counts(guard):
    value, note = _run(guard[0], {"counts": {0: 20, 1: 3, 2: 37}, "mean": 0.25, "n": 60, "zero": 0})
    assert value == {"counts": {0: 20, 1: None, 2: 37}, "mean": 0.25, "n": 60, "zero": 0}
    assert "suppressed 1" in note
    value, _ = _run(guard[0], np.array([12, 4, 0, 30]))
    assert np.isnan(value[1]) and value.tolist()[::2] == [12.0, 0.0]
    assert _run(guard[0], 3)[0] is None


@pytest.mark.parametrize("value, why", [
    ("Smith", "string"),
    ({"names": ["a"]}, "string"),
    (list(range(10, 200)), "more than 100"),
    ({"patient Smith": 10}, "plain name"),
])
def test_guard_blocks_strings_and_bulk(guard, value, why):
    with pytest.raises(EgressBlocked, match=why):
        _run(guard[0], value)


def test_guard_blocks_raw_rows(guard):
    _, x = guard
    with pytest.raises(EgressBlocked, match="raw row"):
        _run(guard[0], x[:2])  # two records as an array
    with pytest.raises(EgressBlocked, match="raw row"):
        _run(guard[0], x[7].tolist())  # one record as a list of numbers
    with pytest.raises(EgressBlocked, match="raw row"):
        _run(guard[0], {f"f{i}": float(v) for i, v in enumerate(x[3])})  # one record as a dict
    assert _run(guard[0], x.mean(axis=0))[0].shape == (8,)  # a mean is not a record


def test_guard_turns_cell_errors_into_type_and_line(guard):
    request = Message("run", {"source": "..."})
    leaked = request.reply("error", {"error_type": "KeyError", "message": "'patient Smith, 1961'",
                                     "traceback": "…Smith…", "origin": "cell", "line": 3})
    out, _ = guard[0].reply(request, leaked)
    assert out.content["error_type"] == "KeyError" and "line 3" in out.content["message"]
    assert "Smith" not in json.dumps(dict(out.content)) and "traceback" not in out.content
    forged = request.reply("error", {"error_type": "Leak_Smith", "message": "x", "origin": "cell"})
    assert guard[0].reply(request, forged)[0].content["error_type"] == "Exception"
    own = request.reply("error", {"error_type": "ValueError", "message": "config 'lr' is outside 0..1e6",
                                  "origin": "party"})
    assert guard[0].reply(request, own)[0].content["message"] == "config 'lr' is outside 0..1e6"


# -- the audit log ----------------------------------------------------------------------------------

def _log(party_dir, n=4):
    audit = AuditLog(party_dir)
    for i in range(n):
        audit.append({"coordinator": "k", "type": "run", "request": f"{i:032x}", "code_hash": "0" * 64,
                      "decision": "run", "bytes_in": 10, "bytes_out": 20, "outcome": "ok"})
    return party_dir / "audit.jsonl"


def test_an_untouched_audit_log_is_intact_across_restarts(party_dir):
    _log(party_dir, 3)
    _log(party_dir, 2)  # a restarted party chains on
    result = verify(party_dir)
    assert result.intact and len(result.entries) == 5


@pytest.mark.parametrize("line", [0, 1, 2, 3])
def test_editing_any_audit_line_is_detected(party_dir, line):
    path = _log(party_dir)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line] = lines[line].replace(b'"bytes_out":20', b'"bytes_out":2')
    path.write_bytes(b"".join(lines))
    result = verify(party_dir)
    assert not result.intact and result.problem


@pytest.mark.parametrize("change", ["drop_last", "drop_first", "swap", "append"])
def test_removing_reordering_or_adding_audit_lines_is_detected(party_dir, change):
    path = _log(party_dir)
    lines = path.read_bytes().splitlines(keepends=True)
    if change == "drop_last":
        lines = lines[:-1]
    elif change == "drop_first":
        lines = lines[1:]
    elif change == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines.append(lines[-1])
    path.write_bytes(b"".join(lines))
    assert not verify(party_dir).intact


# -- the party ↔ worker pipe ----------------------------------------------------------------------

def test_pipe_round_trip_and_what_it_refuses():
    import socket
    import struct

    from fednb.errors import WireError
    from fednb.party.pipe import PipeClosed, receive_message, send_message

    party, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with party, worker:
        arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
        send_message(worker, Message("result", {"examples": 3}, arrays=arrays))
        message, size = receive_message(party)
        assert np.array_equal(message.arrays["w"], arrays["w"]) and not message.arrays["w"].flags.writeable
        assert size > 48

        def raw(record: bytes, data: bytes, seal: bool) -> None:
            fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
            os.write(fd, data)
            if seal:
                import fcntl
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            socket.send_fds(worker, [record], [fd])
            os.close(fd)

        header = b'{"v":1}'
        record = struct.pack("<IQ", 1, len(header))
        raw(record, header, seal=False)  # a worker that could still change it after the check
        with pytest.raises(WireError, match="sealed"):
            receive_message(party)
        raw(struct.pack("<IQ", 1, 999), header, seal=True)  # sizes that do not add up
        with pytest.raises(WireError, match="record says"):
            receive_message(party)
        worker.send(record)  # no descriptor at all
        with pytest.raises(WireError, match="descriptor"):
            receive_message(party)
        raw(struct.pack("<I", 10**6), header, seal=True)  # a frame count beyond the limits
        with pytest.raises(WireError, match="frames"):
            receive_message(party)
        worker.close()
        with pytest.raises(PipeClosed):
            receive_message(party)


def test_what_a_request_returns_is_said_for_a_secure_round_and_for_scaffold(tmp_path) -> None:
    from fednb.party.gate import Gate
    from fednb.wire import Message

    rng = np.random.default_rng(0)
    gate = Gate("clinic", "review", Datasets({"train": Split(rng.normal(size=(20, 4)).astype(np.float32),
                                                             np.arange(20) % 2)}), directory=tmp_path / "p")
    try:
        weights = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}
        run = "0" * 32
        secure = Message("train", {"source": "m", "config": {}, "run": run,
                                   "secagg": {"run": run, "round": 1, "config": {}, "dimension": 15,
                                              "prg": masking.PRG}},
                         round=1, arrays=weights)
        assert gate.returns(secure).startswith("under secure aggregation") and "16 integers" in gate.returns(secure)
        plain = Message("train", {"source": "m", "config": {}, "run": run}, round=1, arrays=weights)
        assert "the model's weights (2 tensors, 15 values" in gate.returns(plain)
        scaffold = Message("train", {"source": "m", "config": {}, "run": run, "scaffold": True}, round=1,
                           arrays={**weights, "scaffold.c/w": weights["w"], "scaffold.c/b": weights["b"]})
        said = gate.returns(scaffold)
        assert "(2 tensors, 15 values" in said and "SCAFFOLD control variate" in said
        from fednb.party.policy import request_code

        plain_code, scaffold_code = request_code("train", plain.content), request_code("train", scaffold.content)
        assert plain_code.hash != scaffold_code.hash  # approving plain training does not approve SCAFFOLD's
        assert scaffold_code.loop is not None and "scaffold" in scaffold_code.loop
    finally:
        gate.close()
