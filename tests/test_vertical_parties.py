"""Vertical learning across real parties: PSI and hetero logistic regression through their gates, on FATE's tables."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import fednb
from fednb.errors import FederationError
from fednb.party import PartyServer
from fednb.party.approvals import Approvals
from fednb.party.datasets import Datasets
from fednb.party.directory import open_directory
from fednb.party.policy import request_code
from fednb.privacy import psi
from tests.test_gate import audit_lines

FATE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"
pytestmark = pytest.mark.skipif(not FATE.is_dir(), reason=f"FATE's tables are not at {FATE}")


def tables(name: str) -> tuple[Datasets, Datasets]:
    guest = Datasets.from_files({"train": FATE / f"{name}_hetero_guest.csv"}, label="y", id_column="id")
    host = Datasets.from_files({"train": FATE / f"{name}_hetero_host.csv"}, id_column="id")
    return guest, host


def approve(directory: Path, *protocol_steps: str) -> None:
    """What the owner does with `fednb approve DIR --approve HASH`: approve each protocol once."""
    approvals = Approvals(open_directory(directory, create=False))
    for step in protocol_steps:
        approvals.approve(request_code("vertical", {"step": step}).hash, by="owner")


@pytest.fixture
def parties(tmp_path):
    """Start a label party and a feature party (sandboxed workers unless told otherwise); stopped afterwards."""
    started: list[PartyServer] = []
    made: list[str] = []  # the private socket directories, removed with the parties

    def start(name: str = "breast", policy: str = "review", approved: bool = True, contained: bool = True):
        guest, host = tables(name)
        sockets = tempfile.mkdtemp(prefix="fednb-v-")
        made.append(sockets)
        for party, data in (("bank", guest), ("partner", host)):
            directory = tmp_path / f"{party}-{len(started) // 2}" if policy != "simulation" else None
            server = PartyServer(party, f"ipc://{sockets}/{party}.sock", data, policy=policy, directory=directory,
                                 heartbeat=0.5, timeout=10.0, contained=contained, allow_weak_containment=True)
            if directory is not None and approved:
                open_directory(directory, create=True)
                approve(directory, "setup", "lr.start", "sb.start")
            server.start()
            started.append(server)
        return fednb.connect([{"name": s.name, "endpoint": s.endpoint} for s in started[-2:]], heartbeat=0.5,
                             heartbeat_timeout=5.0)

    start.started = started  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for server in started:
            server.stop()
        for sockets in made:
            shutil.rmtree(sockets, ignore_errors=True)


def joined(name: str, seed: int = 0, fraction: float = 0.2):
    """The joined table as the notebook author would build it for the baseline, split as the parties split."""
    guest, host = (d["train"] for d in tables(name))
    common = sorted(set(guest.ids.tolist()) & set(host.ids.tolist()))
    gi = {v: i for i, v in enumerate(guest.ids.tolist())}
    hi = {v: i for i, v in enumerate(host.ids.tolist())}
    x = np.hstack([guest.x[[gi[c] for c in common]], host.x[[hi[c] for c in common]]]).astype(np.float64)
    y = guest.y[[gi[c] for c in common]]
    order = np.random.default_rng(seed).permutation(len(common))
    cut = int(round(len(common) * fraction))
    test, train = np.sort(order[:cut]), np.sort(order[cut:])
    return x[train], y[train], x[test], y[test]


def test_breast_hetero_lr_matches_scikit_learn_through_guarded_sandboxed_parties(parties, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    with parties("breast") as fed:
        epochs: list = []
        fed.subscribe(lambda e: epochs.append(e) if getattr(e, "stage", "") == "epoch" else None)
        vfl = fed.vertical(id_column="id", label_party="bank")
        assert vfl.size == 569 and vfl.roles == {"bank": "label", "partner": "features"}
        assert vfl.split(0.2, seed=0) == {"train": 455, "test": 114}
        model = vfl.train_logistic(epochs=20, lr=0.15, batch_size=240, l2=0.01, key_bits=1024)
        metrics = vfl.evaluate(model)
        scores = vfl.predict(model)
    x, y, xt, yt = joined("breast")
    baseline = LogisticRegression(C=1.0 / (0.01 * len(y)), max_iter=5000).fit(x, y)
    reference = roc_auc_score(yt, baseline.predict_proba(xt)[:, 1])
    assert metrics["auc"] >= reference - 0.005, (metrics, reference)
    assert metrics["auc"] == pytest.approx(roc_auc_score(yt, scores), abs=1e-9)
    assert len(model.losses) == 20 and model.losses[-1] < model.losses[0]
    # each epoch's model was scored on the test split by the label party: the dashboard's AUC per epoch
    assert [e.epoch for e in epochs] == list(range(1, 21)) and epochs[-1].metrics["auc"] == pytest.approx(metrics["auc"])
    # the coordinator decrypted masked gradients (uniform mod n) and the loss, nothing else
    assert {kind for kind, _party, _count in model.view} == {"gradient", "loss"}
    # every step is in each party's audit log, covered by the protocol approvals
    entries = audit_lines(tmp_path / "partner-0")
    assert entries and all(e["type"] == "vertical" and e["decision"] == "run" and e["outcome"].startswith("ok")
                           for e in entries)
    assert len({e["code_hash"] for e in entries}) == 2  # psi/2 and hetero-lr/1


def test_vehicle_one_vs_rest_is_within_a_point_of_scikit_learn(parties):
    """Plaintext mode (the same algebra on floats, allowed only in a simulation): the protocol's accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    with parties("vehicle_scale", policy="simulation", contained=False) as fed:
        vfl = fed.vertical(label_party="bank")
        vfl.split(0.2, seed=0)
        model = vfl.train_logistic(epochs=40, lr=0.02, batch_size=64, l2=0.001, optimizer="rmsprop",
                                   encrypted=False, classes=[0, 1, 2, 3])
        metrics = vfl.evaluate(model)
        predicted = vfl.predict(model)
    x, y, xt, yt = joined("vehicle_scale")
    baseline = OneVsRestClassifier(LogisticRegression(C=1.0 / (0.001 * len(y)), max_iter=5000)).fit(x, y)
    reference = baseline.score(xt, yt)
    assert metrics["accuracy"] >= reference - 0.01, (metrics, reference)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(predicted == yt)))


def test_what_the_feature_party_and_the_coordinator_receive(parties, monkeypatch):
    """Recorded at the feature party's kernel: blinded points, sealed blobs and masked plaintexts, none of
    which reads as the labels; PSI messages hold no id and no unblinded point."""
    from fednb.party import vertical as party_vertical

    received: list[tuple[str, str, dict]] = []
    handle = party_vertical.Vertical.handle

    def recording(self, content, arrays):
        received.append((self.name, content["step"], {k: np.array(v) for k, v in arrays.items()}))
        return handle(self, content, arrays)

    monkeypatch.setattr(party_vertical.Vertical, "handle", recording)
    with parties("breast", policy="simulation", contained=False) as fed:
        vfl = fed.vertical(label_party="bank")
        model = vfl.train_logistic(epochs=1, key_bits=1024)
    guest, host = (d["train"] for d in tables("breast"))
    labels = guest.y.astype(np.float64)
    at_partner = [(step, arrays) for name, step, arrays in received if name == "partner"]
    steps = {step for step, _ in at_partner}
    assert {"psi.double", "psi.match", "lr.forward", "lr.gradient"} <= steps
    unblinded = {psi._digest(i)[:32] for i in psi.canonical_ids(sorted(set(guest.ids.tolist()) | set(host.ids.tolist())))}
    for step, arrays in at_partner:
        for name, array in arrays.items():
            data = array.tobytes()
            if step.startswith("psi") and array.dtype == np.uint8 and array.ndim == 2:
                points = {data[i:i + 32] for i in range(0, len(data), 32)}
                assert not points & unblinded, f"{step}: an unblinded point"
                assert array.shape[1] == 32  # points only: nothing else rides along (ids are hashed, then blinded)
            as_floats = np.frombuffer(data[: len(data) // 8 * 8], dtype="<f8")
            if as_floats.size >= 64:
                # ciphertexts, sealed blobs and masked values read as floats are noise: never 0/1 labels,
                # and hardly ever a number of a plausible size at all
                assert np.mean(np.isin(as_floats, (0.0, 1.0))) < 0.01, (step, name)
                with np.errstate(all="ignore"):
                    plausible = np.isfinite(as_floats) & (np.abs(as_floats) < 1e3) & (np.abs(as_floats) > 1e-3)
                assert np.mean(plausible) < 0.2, (step, name)
    # the decrypted gradients the coordinator saw were masked mod n: about as many high as low top bits
    assert model.view and all(kind in ("gradient", "loss") for kind, _p, _c in model.view)


def test_a_party_whose_owner_did_not_approve_the_protocol_refuses_and_plaintext_is_refused_when_guarded(parties):
    with parties("breast", policy="allowlist", approved=False) as fed:
        with pytest.raises(FederationError, match="runs only approved code"):
            fed.vertical(label_party="bank")
    with parties("breast", policy="allowlist") as fed:
        vfl = fed.vertical(label_party="bank")
        with pytest.raises(FederationError, match="encrypted only"):
            vfl.train_logistic(epochs=1, encrypted=False)


def test_bad_vertical_calls_fail_with_a_clear_error(parties):
    with parties("breast", policy="simulation", contained=False) as fed:
        with pytest.raises(ValueError, match="label_party"):
            fed.vertical(label_party="nobody")
        with pytest.raises(ValueError, match="no label column"):
            fed.vertical(label_party="partner")
        # a horizontal request to a feature party: it has no labels to train on
        from fednb.errors import RoundError

        with pytest.raises(RoundError, match="no label column"):
            fed.train(_linear(), MODEL, rounds=1, evaluate_every=0, parties=["partner"], min_parties=1)


MODEL = "import torch.nn as nn\nmodel = nn.Linear(20, 2)\n"


def _linear():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(20, 2)


def test_hetero_lr_with_two_feature_parties_reports_the_loss_of_the_joint_model(tmp_path) -> None:
    """The label party and two feature parties (breast's host columns cut in two): the loss, with the feature
    parties' cross terms masked until the coordinator sums them, equals a two-party run on the same columns."""
    import csv

    host = FATE / "breast_hetero_host.csv"
    with host.open() as f:
        rows = list(csv.reader(f))
    parts = {}
    for name, columns in (("north", range(1, 11)), ("south", range(11, 21))):
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([[r[0], *(r[c] for c in columns)] for r in rows])
        parts[name] = path
    guest = FATE / "breast_hetero_guest.csv"
    settings = {"epochs": 2, "lr": 0.15, "batch_size": 240, "l2": 0.01, "key_bits": 1024}
    with fednb.simulate(data={"bank": str(guest), **{k: str(v) for k, v in parts.items()}}, id_column="id",
                        label="y") as fed:
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        three = vfl.train_logistic(**settings)
        three_metrics = vfl.evaluate(three)
    with fednb.simulate(data={"bank": str(guest), "partner": str(host)}, id_column="id", label="y") as fed:
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        two = vfl.train_logistic(**settings)
        two_metrics = vfl.evaluate(two)
    assert len(three.losses) == 2 and three.losses == pytest.approx(two.losses, abs=1e-6)
    assert three_metrics["auc"] == pytest.approx(two_metrics["auc"], abs=1e-9)
    assert {kind for kind, _p, _n in three.view} == {"gradient", "loss"}
