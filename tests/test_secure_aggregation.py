"""Secure aggregation across real processes: real parties, real sockets, the four stages through their gates."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import fednb
from fednb.errors import RoundError
from fednb.federation.events import PartyDone, StageStarted
from fednb.federation.protocol import Gathered, Stage, drive
from fednb.federation.secure import STAGES, SecureAggregation, keys_request, stage_request
from fednb.privacy import SecAggAbort, SecAggConfig, SecAggCoordinator, masking
from fednb.privacy.secagg import dimension
from fednb.strategies import FedAvg
from fednb.tensors import state_arrays
from fednb.wire import Message, new_id
from tests.conftest import MLP, build, wait_until
from tests.test_gate import approve, audit_lines

BASE = {"lr": 0.05, "epochs": 1, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9, "loss": "cross_entropy",
        "seed": 0}


def pids(fed) -> dict[str, int]:
    return {p["name"]: int(p["pid"]) for p in fed.simulation.parties}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_five_parties_learn_digits_under_secure_aggregation_as_well_as_with_plain_fedavg():
    rounds = 4
    with fednb.simulate(5, partition="iid", seed=1) as fed:
        stages: list[tuple[int, str]] = []
        done: list[tuple[str, str]] = []
        fed.subscribe(lambda e: stages.append((e.round, e.stage)) if isinstance(e, StageStarted) else None)
        fed.subscribe(lambda e: done.append((e.party, e.stage)) if isinstance(e, PartyDone) else None)
        # the parties seed their local training with seed + round: the secure run's rounds come
        # after the plain run's, so its seed is lowered by as many rounds to train alike
        plain = fed.train(build(seed=3), MLP, rounds=rounds, seed=rounds)[rounds - 1]
        secure = fed.train(build(seed=3), MLP, rounds=rounds, seed=0, secure_aggregation=True)[2 * rounds - 1]
        assert abs(plain.evaluation["accuracy"] - secure.evaluation["accuracy"]) <= 0.01, (plain.evaluation,
                                                                                             secure.evaluation)
        assert secure.evaluation["accuracy"] > 0.8
        assert secure.secure["sum of"] == "sum of 5 parties" and secure.secure["examples"] > 1000
        assert 0 < secure.secure["error_bound"] < 1e-4
        assert set(secure.stages) == set(STAGES) and all(s >= 0 for s in secure.stages.values())
        assert [stage for r, stage in stages if r == 2 * rounds][:4] == list(STAGES)
        assert {stage for _, stage in done} >= set(STAGES)
        # the coordinator saw no party's example count or train metrics
        assert all(part.examples == 0 and part.metrics == {} for part in secure.parties.values())
        # FedAvgM and FedProx take the pre-summed mean as one update
        for strategy in ("fedavgm", "fedprox"):
            record = fed.train(build(seed=3), MLP, rounds=1, strategy=strategy, evaluate_every=0,
                               secure_aggregation=SecureAggregation(clip=5.0))[-1]
            assert record.secure["parties"] == 5


def test_a_party_killed_at_each_stage_in_turn_costs_the_round_nothing():
    with fednb.simulate(7, partition="iid", heartbeat=0.2, heartbeat_timeout=1.5) as fed:
        by_name = pids(fed)
        killed: dict[int, str] = {}

        def kill(event: object) -> None:
            # round r kills one of its parties as stage r begins, before its request goes out
            if isinstance(event, StageStarted) and event.stage == STAGES[event.round - 1] \
                    and event.round not in killed:
                victim = sorted(p for p in event.parties if alive(by_name[p]))[0]
                killed[event.round] = victim
                os.kill(by_name[victim], signal.SIGKILL)
                assert wait_until(lambda: not alive(by_name[victim]), timeout=5)

        fed.subscribe(kill)
        history = fed.train(build(), MLP, rounds=4, secure_aggregation=True, evaluate_every=0, round_timeout=30)
        assert len(history) == 4
        summed = []
        for record, stage in zip(history, STAGES):
            victim = killed[record.round]
            assert f"at the {stage} stage" in record.dropped[victim], record.dropped
            summed.append(record.secure["parties"])
        # keys: not in the round; shares: nobody masks with it; masked: its masks removed; unmask: its input is in
        assert summed == [6, 5, 4, 4]
        assert history[-1].secure["dropouts"][killed[4]] == "unmask"


def test_a_party_that_requires_secure_aggregation_refuses_plain_rounds_and_small_sums():
    with fednb.simulate(3, partition="iid", require_secure_aggregation=True) as fed:
        with pytest.raises(RoundError, match="party-0 releases updates only under secure aggregation"):
            fed.train(build(), MLP, rounds=1, evaluate_every=0)
        with pytest.raises(RoundError, match="takes part only in sums of at least 3 parties") as refused:
            fed.train(build(), MLP, rounds=1, evaluate_every=0, parties=["party-0", "party-1"], min_parties=2,
                      secure_aggregation=True)
        assert "no party's update was revealed" in str(refused.value)
        record = fed.train(build(), MLP, rounds=1, evaluate_every=0, secure_aggregation=True)[-1]
        assert record.secure["sum of"] == "sum of 3 parties"


def _cheating_round(parties: list[str], weights: dict, other: dict, cheated: str):
    """A coordinator that sends ``cheated`` other weights, and checks no model hash itself."""
    run = new_id()
    coordinator = SecAggCoordinator(SecAggConfig(clip=10.0), run=run, round=1, parties=parties,
                                    dimension=dimension(weights))
    content = {"source": MLP, "train_cell": None, "config": FedAvg().configure_train(1, BASE), "run": run}
    setup = coordinator.advertise_keys_request()
    requests = {p: keys_request(content, setup, round=1, weights=other if p == cheated else weights, evaluate=False)
                for p in parties}
    yield Stage("keys", tuple(parties), requests=requests,
                on_reply=lambda p, r: coordinator.receive_keys(p, r.content["secagg"]))
    shares = stage_request(run, 1, "shares", coordinator.share_keys_request())
    yield Stage("shares", coordinator.advertised, request=shares,
                on_reply=lambda p, r: coordinator.receive_shares(p, r.content["secagg"]))
    payloads = coordinator.masked_input_requests()
    masked: Gathered = yield Stage(
        "masked", tuple(payloads), requests={p: stage_request(run, 1, "masked", payloads[p]) for p in payloads},
        on_reply=lambda p, r: coordinator.receive_masked_input(p, {"masked": r.arrays["masked"]}))
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        coordinator.unmask_request()
    return masked, coordinator


def test_a_coordinator_that_sends_two_parties_different_weights_gets_an_aborted_round():
    with fednb.simulate(5, partition="iid") as fed:
        weights = {k: np.array(v) for k, v in state_arrays(build()).items()}
        other = {k: v + np.float32(0.001) for k, v in weights.items()}
        masked, coordinator = drive(fed._connections, fed.events, 1,
                                    _cheating_round(fed.parties, weights, other, "party-4"))
        assert not masked.replies and set(masked.dropped) == set(fed.parties)
        assert all("received a different global model" in reason for reason in masked.dropped.values()), masked.dropped
        assert not coordinator.masked  # no masked input reached the coordinator, let alone a sum
        # keys and shares never appear in the parties' log
        logged = (fed.simulation.directory / "parties.log").read_text()
        secrets = [text for keys in coordinator._keys.values() for text in keys.to_dict().values()]
        secrets += [text for sealed in coordinator._sealed.values() for text in sealed.values()]
        assert secrets and not [text for text in secrets if text in logged]


def test_guarded_parties_let_out_only_what_each_stage_implies(start_party, private_dir, tmp_path):
    directories = [tmp_path / f"clinic-{i}" for i in range(3)]
    servers = [start_party(f"ipc://{private_dir}/p{i}.sock", i, policy="allowlist", directory=directories[i],
                           heartbeat=0.2, timeout=5.0, require_secure_aggregation=True) for i in range(3)]
    for directory in directories:
        approve(directory, "train", source=MLP)
    specs = [{"name": s.name, "endpoint": s.endpoint} for s in servers]
    with fednb.connect(specs, heartbeat=0.2, heartbeat_timeout=2.0) as fed:
        record = fed.train(build(), MLP, rounds=1, evaluate_every=0, secure_aggregation=True)[-1]
        assert record.secure["sum of"] == "sum of 3 parties"
        entries = audit_lines(directories[0])
        kinds = [(e["type"], e["decision"], e["outcome"]) for e in entries]
        assert kinds == [("train", "run", "ok")] + [("secagg", "run", "ok")] * 3, kinds
        assert all(e["code_hash"] == entries[0]["code_hash"] for e in entries)
        assert all("covered by the approval" in e["reason"] for e in entries[1:])
        # a later stage outside a live secure round is refused at the gate, before any worker sees it
        stray = stage_request(new_id(), 1, "shares", {"keys": {}})
        gathered = fed_gather(fed, stray)
        assert "no approved secure round" in gathered.dropped["party-0"]


def fed_gather(fed, request: Message) -> Gathered:
    from fednb.federation.protocol import gather

    return gather(fed._connections, Stage("stray", tuple(fed.parties), request=request, timeout=10))


# -- the wire and the egress guard, without sockets ----------------------------------------------------

def _setup(run: str, round: int = 1, dimension_: int = 8) -> dict:
    return {"run": run, "round": round, "config": SecAggConfig(clip=1.0).to_dict(), "dimension": dimension_,
            "prg": masking.PRG}


def test_the_wire_checks_every_field_of_a_secure_stage():
    from fednb.errors import WireError
    from fednb.wire import check_content

    run = new_id()
    content = {"source": MLP, "config": {}, "run": run}
    check_content(Message("train", {**content, "secagg": _setup(run)}, round=1))
    check_content(stage_request(run, 1, "masked", {"parties": []}))
    bad = {
        "setup of another round": Message("train", {**content, "secagg": _setup(run, round=2)}, round=1),
        "setup of another run": Message("train", {**content, "secagg": _setup(new_id())}, round=1),
        "setup without its dimension": Message("train", {**content, "secagg": {"run": run, "round": 1}}, round=1),
        "unknown stage": stage_request(run, 1, "keys", {}),
        "no round": Message("secagg", {"run": run, "stage": "shares", "request": {}}),
        "bad run id": stage_request("run-1", 1, "shares", {}),
        "tensors in a stage request": Message("secagg", {"run": run, "stage": "shares", "request": {}}, round=1,
                                              arrays={"x": np.zeros(2, np.float32)}),
        "an extra field": Message("secagg", {"run": run, "stage": "shares", "request": {}, "code": "x"}, round=1),
    }
    for name, message in bad.items():
        with pytest.raises(WireError):
            check_content(message)
            pytest.fail(name)


def test_the_egress_guard_lets_out_only_what_a_secure_stage_implies(digits_parts):
    import base64

    from fednb.party.egress import EgressBlocked, Guard
    from fednb.privacy.secagg import SEALED, SHARE
    from tests.conftest import party_datasets

    guard = Guard("party-0", party_datasets(digits_parts[0]))
    run = new_id()
    weights = {"w": np.zeros((2, 4), np.float32)}
    b64 = lambda n: base64.b64encode(bytes(n)).decode()  # noqa: E731
    keys = {"encryption_key": b64(32), "masking_key": b64(32), "signing_key": b64(32)}
    train = Message("train", {"source": MLP, "config": {}, "run": run, "secagg": _setup(run)}, round=1, arrays=weights)
    out, _ = guard.reply(train, train.reply("result", {"secagg": keys, "seconds": 0.1}))
    assert out.content["secagg"] == keys and "examples" not in out.content and not out.arrays
    # the reply is rebuilt: an example count or metrics the worker added do not ride along
    out, _ = guard.reply(train, train.reply("result", {"secagg": keys, "examples": 10, "metrics": {"loss": 0.1}}))
    assert set(out.content) == {"secagg", "seconds"}
    for wrong in ({"secagg": {**keys, "note": b64(32)}}, {"secagg": {**keys, "masking_key": b64(33)}},
                  {"secagg": {**keys, "masking_key": " " + b64(32)}}):
        with pytest.raises(EgressBlocked):
            guard.reply(train, train.reply("result", wrong))
    with pytest.raises(EgressBlocked, match="no tensors"):
        guard.reply(train, train.reply("result", {"secagg": keys}, {"w": np.zeros((2, 4), np.float32)}))
    shares = stage_request(run, 1, "shares", {"keys": {"party-0": keys, "party-1": keys, "party-2": keys}})
    answer = {"shares": {"party-1": b64(SEALED), "party-2": b64(SEALED)}, "commitment": b64(32),
              "model_hash": "ab" * 32, "transcript": "cd" * 32, "signature": b64(64)}
    out, _ = guard.reply(shares, shares.reply("result", {"secagg": answer}))
    assert out.content["secagg"] == answer
    for wrong in ({**answer, "shares": {"party-9": b64(SEALED)}}, {**answer, "shares": {"party-1": b64(SEALED + 1)}},
                  {**answer, "model_hash": "not hex"}, {**answer, "extra": 1}):
        with pytest.raises(EgressBlocked):
            guard.reply(shares, shares.reply("result", {"secagg": wrong}))
    masked = stage_request(run, 1, "masked", {"parties": ["party-0", "party-1", "party-2"]})
    vector = np.zeros(9, np.uint32)
    out, _ = guard.reply(masked, masked.reply("result", {"secagg": {}}, {"masked": vector}), masked=(9, "uint32"))
    assert out.arrays["masked"].shape == (9,)
    for arrays in ({"masked": np.zeros(10, np.uint32)}, {"masked": np.zeros(9, np.float32)},
                   {"masked": vector, "w": np.zeros((2, 4), np.float32)}):
        with pytest.raises(EgressBlocked):
            guard.reply(masked, masked.reply("result", {"secagg": {}}, arrays), masked=(9, "uint32"))
    unmask = stage_request(run, 1, "unmask", {"survivors": ["party-0", "party-1"], "dropped": ["party-2"]})
    answer = {"self_mask_shares": {"party-0": b64(SHARE), "party-1": b64(SHARE)},
              "masking_key_shares": {"party-2": b64(SHARE)}}
    guard.reply(unmask, unmask.reply("result", {"secagg": answer}))
    with pytest.raises(EgressBlocked, match="never both"):
        both = {**answer, "masking_key_shares": {"party-1": b64(SHARE)}}
        guard.reply(unmask, unmask.reply("result", {"secagg": both}))


def test_the_faces_take_secure_aggregation_and_check_its_settings():
    from IPython.core.error import UsageError

    from fednb.notebook.arguments import secure_aggregation

    assert fednb.SecureAggregation is SecureAggregation and "SecureAggregation" in fednb.__all__
    assert SecureAggregation.of(True) == SecureAggregation() and SecureAggregation.of(False) is None
    with pytest.raises(ValueError, match="clip"):
        SecureAggregation(clip=0)
    with pytest.raises(ValueError, match="secure_aggregation must be"):
        SecureAggregation.of("yes")  # type: ignore[arg-type]
    assert secure_aggregation(False, None) is False
    assert secure_aggregation(True, 2.5) == SecureAggregation(clip=2.5)
    with pytest.raises(UsageError, match="add --secure-aggregation"):
        secure_aggregation(False, 1.0)
    with pytest.raises(UsageError, match="--clip"):
        secure_aggregation(True, -1.0)
