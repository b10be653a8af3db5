"""Checkpoints of vertical training: hetero LR and SecureBoost resumed after a coordinator killed with SIGKILL or
interrupted, equal to an uninterrupted run; refusals of changed runs, damaged files and parties that lost their part."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fednb.federation import checkpoint as hckpt
from fednb.federation.events import VerticalProgress
from fednb.privacy import paillier
from fednb.vertical import checkpoint as vckpt
from fednb.vertical import logistic, secureboost
from fednb.vertical.boosting import BoostingConfig
from fednb.vertical.parts import FeaturePart, LabelPart, LogisticPart, Parts
from fednb.wire import bundle
from tests.conftest import kill_when
from tests.test_gate import audit_lines
from tests.test_vertical_parties import FATE, parties  # noqa: F401 - the parties fixture

pytestmark = pytest.mark.skipif(not FATE.is_dir(), reason=f"FATE's tables are not at {FATE}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "ab" * 16
ALIGNED = "cd" * 32
LR = {"epochs": 5, "lr": 0.05, "batch_size": 128, "l2": 0.01, "optimizer": "rmsprop", "key_bits": 1024}
SB = {"trees": 4, "depth": 2, "bins": 16, "min_child_weight": 1e-3, "key_bits": 1024}


# -- the parties' parts and the coordinator's file, without sockets ------------------------------------

def test_each_partys_part_round_trips_through_a_bundle_and_restores_its_model() -> None:
    rng = np.random.default_rng(0)
    x, xh, y = rng.normal(size=(60, 3)), rng.normal(size=(60, 4)), rng.integers(0, 2, 60)
    config = logistic.LogisticConfig(epochs=2, batch_size=16, optimizer="rmsprop", encrypted=False)
    fitted = logistic.fit(x, y, [xh], config)
    settings = {"epochs": 2, "optimizer": "rmsprop"}
    parts = Parts()
    parts.keep(RUN, "m", LogisticPart.of(fitted.guest, settings, None, None, ALIGNED, 2))
    parts.keep(RUN, "m.host", LogisticPart.of(fitted.hosts[0], settings, None, None, ALIGNED, 2))
    boost = BoostingConfig(trees=2, depth=2, bins=8, encrypted=True, key_bits=1024, min_child_weight=1e-3)
    keys = paillier.generate_keypair(paillier.PaillierConfig(key_bits=1024))
    grown = secureboost.fit(x[:40], y[:40], x[40:], y[40:], {"partner": (xh[:40], xh[40:])}, boost, keys=keys)
    parts.keep(RUN, "sb", LabelPart.of(grown.label, {"trees": 2}, ALIGNED, 2))
    parts.keep(RUN, "sb.f", FeaturePart.of(grown.features["partner"], {"trees": 2}, ALIGNED, 2))

    again = Parts()
    assert again.unpack(parts.pack(RUN)) == RUN
    guest = logistic.Guest(x, y, config)
    part = again.find("bank", RUN, "m", 2, "logistic")
    part.restore(guest)
    assert np.array_equal(guest.weights, fitted.guest.weights)
    assert np.array_equal(guest.optimizer.square, fitted.guest.optimizer.square)  # RMSprop goes on where it was
    label = secureboost.LabelParty(x[:40], y[:40], x[40:], boost, ["partner"], keys=again.find(
        "bank", RUN, "sb", 2, "label").keys())
    assert label.suite is not None and label.suite.n == keys[0].n  # the label party's key comes back
    again.find("bank", RUN, "sb", 2, "label").restore(label)
    assert np.array_equal(label.test_margins, grown.label.test_margins) and label.gains == grown.label.gains
    assert [t.nodes.keys() for t in label.trees] == [t.nodes.keys() for t in grown.label.trees]
    feature = secureboost.FeatureParty(xh[:40], xh[40:], boost)
    again.find("partner", RUN, "sb.f", 2, "features").restore(feature)
    assert feature.splits == grown.features["partner"].splits and feature.n == keys[0].n and feature.round == 1

    # only the two newest steps stay; another step, role or run is refused, saying the run must start again
    for done in (3, 4):
        parts.keep(RUN, "m", LogisticPart.of(fitted.guest, settings, None, None, ALIGNED, done))
    with pytest.raises(ValueError, match=r"after step\(s\) 3, 4, not after 2; the run must start again"):
        parts.find("bank", RUN, "m", 2, "logistic")
    with pytest.raises(ValueError, match="in another role"):
        parts.find("bank", RUN, "sb", 2, "features")
    with pytest.raises(ValueError, match="bank no longer holds its part of vertical run cdcdcdcd.*must start again"):
        parts.find("bank", "cd" * 16, "m", 2, "logistic")
    with pytest.raises(ValueError, match="other settings \\(optimizer 'rmsprop' → 'sgd'\\)"):
        parts.resume("bank", {"model": "m", "training": RUN, "resume": 4, "config": {"epochs": 9, "optimizer": "sgd"}},
                     ALIGNED, "logistic", "logistic")
    with pytest.raises(ValueError, match="align or split differently"):
        parts.resume("bank", {"model": "m", "training": RUN, "resume": 4, "config": settings}, "ef" * 32,
                     "logistic", "logistic")
    # a bundle whose arrays do not fit is refused whole: nothing of it is kept
    header, arrays = bundle.unpack(parts.pack(RUN))
    arrays["0.weights"] = arrays["0.weights"].astype(np.float32)
    fresh = Parts()
    with pytest.raises(ValueError, match="finite float64"):
        fresh.unpack(bundle.pack(header, arrays))
    assert fresh.runs_kept() == []


def test_a_vertical_checkpoint_is_0600_round_trips_and_refuses_damage_other_kinds_and_changed_runs(tmp_path) -> None:
    public, private = paillier.generate_keypair(paillier.PaillierConfig(key_bits=1024))
    fingerprint = {"algorithm": "logistic", "parties": ["bank", "partner"], "label_party": "bank",
                   "alignment": {"rows": {"bank": 569, "partner": 569}, "aligned": 569,
                                 "split": {"train": 455, "test": 114}, "test_fraction": 0.2, "seed": 0},
                   "options": {"lr": 0.15, "classes": None}}
    record = {"name": "ab" * 6, "epochs": 3, "losses": [0.6, 0.5], "seconds": [1.0, 1.1], "view": [["loss", "", 1]]}
    path = tmp_path / "lr.ckpt"
    vckpt.save(path, vckpt.VerticalCheckpoint("logistic", RUN, 2, fingerprint, record, (private.p, private.q), 1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds the Paillier secret key
    read = vckpt.load(path)
    assert (read.run, read.done, read.attempt, read.record) == (RUN, 2, 1, record)
    pair = read.key_pair()
    assert pair is not None and pair[0].n == public.n
    assert vckpt.logistic_record(read, path) == ("ab" * 6, [0.6, 0.5], [1.0, 1.1], [("loss", "", 1)])

    changed = json.loads(json.dumps(fingerprint))
    changed["parties"] = ["bank", "other"]
    changed["label_party"] = "partner"
    changed["alignment"]["seed"] = 1
    changed["options"]["lr"] = 0.1
    with pytest.raises(hckpt.CheckpointError) as refused:
        vckpt.check(read, changed, path)
    message = str(refused.value)
    for named in ("the parties (['bank', 'partner'] → ['bank', 'other'])", "the label party ('bank' → 'partner')",
                  "the alignment or split (seed 0 → 1)", "the training options (lr 0.15 → 0.1)"):
        assert named in message, message
    with pytest.raises(hckpt.CheckpointError, match="holds a logistic run, not a boosting one"):
        vckpt.resume(path, "boosting", fingerprint)
    with pytest.raises(hckpt.CheckpointError, match="holds a vertical training run"):
        hckpt.load(path)  # fed.train refuses it
    horizontal = tmp_path / "h.ckpt"
    hckpt.save(horizontal, hckpt.Checkpoint(RUN, 1, 2, 1, {}, {"w": np.zeros(2)}))
    with pytest.raises(hckpt.CheckpointError, match="checkpoint of fed.train"):
        vckpt.load(horizontal)
    data = path.read_bytes()
    for damaged in (data[:-5], data[: len(data) // 2], bytes([data[0] ^ 1]) + data[1:],
                    data[:80] + bytes([data[80] ^ 0x20]) + data[81:]):
        path.write_bytes(damaged)
        with pytest.raises(hckpt.CheckpointError, match="corrupt|not a fednb checkpoint"):
            vckpt.load(path)


# -- across real parties ---------------------------------------------------------------------------------

COORDINATOR = """
import json, sys, numpy as np, fednb
with fednb.connect({parties!r}, heartbeat=0.5, heartbeat_timeout=5.0) as fed:
    vfl = fed.vertical(id_column="id", label_party="bank")
    vfl.split(0.2, seed=0)
    model = vfl.train_logistic(**{options!r}, checkpoint={checkpoint!r})
    np.save({out!r} + ".npy", vfl.predict(model))
    with open({out!r} + ".json", "w") as f:
        json.dump({{"losses": model.losses, "name": model.name, "metrics": vfl.evaluate(model)}}, f)
"""


def test_hetero_lr_resumes_after_its_coordinator_is_killed_and_ends_as_an_uninterrupted_run(parties,
                                                                                             tmp_path) -> None:
    """Guarded, sandboxed parties; the coordinator, a real process, is killed with SIGKILL after epoch 2 and run
    again: it aligns again, each party re-attaches to the weights it kept, and training goes on from epoch 3.
    Paillier arithmetic on fixed-point values is exact, so the predictions equal those of a run never stopped."""
    with parties("breast") as fed:  # this connection trains the uninterrupted run; the coordinators' too
        endpoints = [{"name": s.name, "endpoint": s.endpoint} for s in parties.started]  # type: ignore[attr-defined]
        path = str(tmp_path / "lr.ckpt")

        def coordinator(out: str) -> subprocess.Popen[str]:
            script = textwrap.dedent(COORDINATOR).format(parties=endpoints, options=LR, checkpoint=path, out=out)
            return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        kill_when(coordinator(str(tmp_path / "never")), lambda: os.path.exists(path) and vckpt.load(path).done >= 2)
        killed = vckpt.load(path)
        assert 2 <= killed.done < LR["epochs"] and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        print(f"killed after epoch {killed.done} of {LR['epochs']}")
        second = coordinator(str(tmp_path / "resumed"))
        out, err = second.communicate(timeout=180)
        assert second.returncode == 0, err
        done = vckpt.load(path)
        assert (done.run, done.done, done.attempt) == (killed.run, LR["epochs"], 1)
        resumed = json.loads((tmp_path / "resumed.json").read_text())
        assert resumed["name"] == killed.run[:12] and len(resumed["losses"]) == LR["epochs"]

        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        straight = vfl.train_logistic(**LR, checkpoint=tmp_path / "straight.ckpt")
        np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), vfl.predict(straight))
        assert resumed["losses"] == straight.losses and resumed["metrics"] == vfl.evaluate(straight)
        # the same call with other options, or on another split, is refused, naming the difference
        with pytest.raises(hckpt.CheckpointError, match=r"the training options \(lr 0.05 → 0.1\)"):
            vfl.train_logistic(**{**LR, "lr": 0.1}, checkpoint=path)
        with pytest.raises(hckpt.CheckpointError, match="more than the 3 asked"):
            vfl.train_logistic(**{**LR, "epochs": 3}, checkpoint=path)
        vfl.split(0.25, seed=0)
        with pytest.raises(hckpt.CheckpointError, match=r"the alignment or split \(split .*test_fraction 0.2 → 0.25"):
            vfl.train_logistic(**LR, checkpoint=path)
        # epochs may grow: the finished run goes on for one more, from the weights the parties kept
        vfl.split(0.2, seed=0)
        longer = vfl.train_logistic(**{**LR, "epochs": LR["epochs"] + 1}, checkpoint=path)
        assert longer.losses[:-1] == straight.losses and len(longer.losses) == LR["epochs"] + 1
    # every step of the three coordinators passed each party's egress guard, the resumed ones sized as fresh
    # ones; only the killed coordinator's last reply found no one to take it
    for party in ("bank", "partner"):
        entries = audit_lines(tmp_path / f"{party}-0")
        others = [e["outcome"] for e in entries if not e["outcome"].startswith("ok")]
        assert all(e["decision"] == "run" for e in entries) and len(entries) > 100
        assert others in ([], ["the reply above was not delivered"]), others


def test_secureboost_interrupted_after_two_trees_resumes_and_ends_as_an_uninterrupted_run(parties, tmp_path) -> None:
    """Ctrl-C in the notebook after tree 2 of 4; the same call goes on from tree 3, the label party with its trees,
    margins and key, the feature party with its thresholds; predictions, metrics and each party's importance
    equal a run never stopped (the sums are exact in fixed point). Parties started afresh on new directories hold
    no part of the run: the resume is refused, naming each (tests/test_vertical_restart.py restarts them on theirs)."""
    path = tmp_path / "sb.ckpt"
    with parties("breast") as fed:
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)

        def interrupt(event) -> None:
            if isinstance(event, VerticalProgress) and event.stage == "tree" and event.tree == 2:
                raise KeyboardInterrupt

        detach = fed.subscribe(interrupt)
        with pytest.raises(KeyboardInterrupt):
            vfl.train_boosting(**SB, checkpoint=path)
        detach()
        assert vckpt.load(path).done == 2
        trees: list[int] = []
        detach = fed.subscribe(lambda e: trees.append(e.tree) if getattr(e, "stage", "") == "tree" else None)
        model = vfl.train_boosting(**SB, checkpoint=path)
        detach()
        assert trees == [3, 4] and len(model.history) == SB["trees"] and vckpt.load(path).attempt == 1
        resumed = (vfl.predict(model), vfl.evaluate(model), vfl.importance(model))
        straight = vfl.train_boosting(**SB, checkpoint=tmp_path / "straight.ckpt")
        np.testing.assert_array_equal(resumed[0], vfl.predict(straight))
        assert resumed[1] == vfl.evaluate(straight) and resumed[2] == vfl.importance(straight)
        assert model.history == straight.history
        with pytest.raises(hckpt.CheckpointError, match=r"the training options \(depth 2 → 3\)"):
            vfl.train_boosting(**{**SB, "depth": 3}, checkpoint=path)
    for server in parties.started:  # type: ignore[attr-defined]
        server.stop()
    with parties("breast") as fed:  # new parties (new directories): neither kernel nor keep holds the run
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        with pytest.raises(hckpt.CheckpointError, match="no longer holds its part of vertical run .*must start again") \
                as refused:
            vfl.train_boosting(**SB, checkpoint=path)
        assert "bank no longer holds" in str(refused.value) and "partner no longer holds" in str(refused.value)


def test_fed_vtrain_checkpoint_resumes_a_run_and_refuses_a_changed_one_in_one_line(tmp_path) -> None:
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    guest, host = FATE / "breast_hetero_guest.csv", FATE / "breast_hetero_host.csv"
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fednb")
    try:
        shell.run_line_magic("fed_sim", f"--data bank={guest} --data partner={host} --id-column id --label y")
        shell.run_line_magic("fed_align", "--label-party bank")
        path = tmp_path / "lr.ckpt"
        shell.run_line_magic("fed_vtrain", f"logistic --epochs 2 --plaintext --checkpoint {path}")
        first = shell.user_ns["vmodel"]
        shell.run_line_magic("fed_vtrain", f"logistic --epochs 3 --plaintext --checkpoint {path}")
        longer = shell.user_ns["vmodel"]
        assert longer.name == first.name and longer.losses[:2] == first.losses and len(longer.losses) == 3
        assert vckpt.load(path).done == 3
        with pytest.raises(UsageError, match=r"the training options \(lr 0.15 → 0.3\)") as refused:
            shell.run_line_magic("fed_vtrain", f"logistic --epochs 3 --plaintext --lr 0.3 --checkpoint {path}")
        assert "\n" not in str(refused.value)

        # one-vs-rest, stopped after the first class's model: its model re-attaches, the second trains afresh
        vfl, ovr = shell.user_ns["vfl"], {"epochs": 2, "encrypted": False, "classes": [0, 1], "optimizer": "rmsprop"}

        def interrupt(event) -> None:
            if isinstance(event, VerticalProgress) and event.stage == "epoch" and str(event.model).endswith(".0") \
                    and event.epoch == 2:
                raise KeyboardInterrupt

        detach = vfl.federation.subscribe(interrupt)
        with pytest.raises(KeyboardInterrupt):
            vfl.train_logistic(**ovr, checkpoint=tmp_path / "ovr.ckpt")
        detach()
        assert vckpt.load(tmp_path / "ovr.ckpt").done == 2
        resumed = vfl.train_logistic(**ovr, checkpoint=tmp_path / "ovr.ckpt")
        straight = vfl.train_logistic(**ovr)
        assert resumed.losses == straight.losses and len(resumed.losses) == 4
        np.testing.assert_array_equal(vfl.predict(resumed), vfl.predict(straight))
        with pytest.raises(hckpt.CheckpointError, match="one-vs-rest models train 2 epochs each"):
            vfl.train_logistic(**{**ovr, "epochs": 3}, checkpoint=tmp_path / "ovr.ckpt")
    finally:
        shell.run_line_magic("fed_close", "")
        InteractiveShell.clear_instance()
