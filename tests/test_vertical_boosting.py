"""SecureBoost: packing and encrypted histograms, the two roles against scikit-learn, and across real parties."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fednb.errors import FederationError
from fednb.federation.events import VerticalProgress
from fednb.privacy import paillier
from fednb.vertical import boosting as bt
from fednb.vertical import secureboost as sb
from fednb.vertical.histograms import Encrypted, Packing, Plain, shuffle
from tests.test_vertical_parties import FATE, joined, parties  # noqa: F401 - the parties fixture

pytestmark = pytest.mark.skipif(not FATE.is_dir(), reason=f"FATE's tables are not at {FATE}")
KEYS = paillier.generate_keypair(paillier.PaillierConfig(key_bits=1024))


def sklearn_model(objective: str, config: bt.BoostingConfig):
    """scikit-learn's HistGradientBoosting with the same trees, depth, bins, learning rate and l2 (grown level by
    level: no leaf limit, no early stopping, min_samples_leaf 1; its hessian floor is 1e-3)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    kind = HistGradientBoostingRegressor if objective == "regression" else HistGradientBoostingClassifier
    return kind(max_iter=config.trees, max_depth=config.depth, max_bins=config.bins, learning_rate=config.lr,
                l2_regularization=config.l2, min_samples_leaf=1, max_leaf_nodes=None, early_stopping=False)


def split_columns(name: str) -> tuple[np.ndarray, ...]:
    x, y, xt, yt = joined(name)
    guest = 10 if name == "breast" else 9  # the label party's columns come first in the joined table
    return x[:, :guest], x[:, guest:], y, xt[:, :guest], xt[:, guest:], yt


# -- packing and the encrypted sums ---------------------------------------------------------------------

def test_packed_gradients_sum_and_decode_exactly_signed_fields_included() -> None:
    rng = np.random.default_rng(1)
    g, h = rng.uniform(-1, 1, 300), rng.uniform(0, 0.25, 300)
    packing = Packing.plan(300, 1024, 40)
    assert packing.per * 2 * packing.field <= 1022 and packing.per >= 8
    scales = (1.0, 0.25)
    values = packing.encode(g, h, scales)
    n = KEYS[0].n
    groups = [rng.choice(300, size=s, replace=False) for s in (1, 7, 150, 300, 33, 2, 90, 12, 5)]
    # pack len(groups) candidate sums the way a feature party does: Horner by 2^(2W), the first lowest
    packed = 0
    for group in reversed(groups):
        packed = (packed << (2 * packing.field)) + sum(values[i] for i in group)
    plaintexts = [packed % n] if len(groups) <= packing.per else None
    assert plaintexts is not None
    decoded = packing.decode(plaintexts, n, len(groups), scales)
    expected = np.array([[g[gr].sum(), h[gr].sum()] for gr in groups])
    assert np.allclose(decoded, expected, atol=len(g) * 2.0**-40)


def test_encrypted_histograms_equal_the_plaintext_ones_after_decryption() -> None:
    rng = np.random.default_rng(2)
    rows, features = 120, 4
    x = rng.normal(size=(rows, features))
    x[:, 3] = np.round(x[:, 3])  # few distinct values: midpoint bins, some empty in a node
    binning = bt.Binning.fit(x, 8)
    codes, sizes = binning.codes(x), binning.sizes
    g, h = rng.uniform(-1, 1, rows), rng.uniform(0, 0.25, rows)
    packing = Packing.plan(rows, 1024, 40)
    label = Encrypted(KEYS[0], KEYS[1])
    host = Encrypted(KEYS[0])
    values = host.read(label.encrypt(packing.encode(g, h, (1.0, 0.25))), rows)
    node, other = np.flatnonzero(x[:, 0] <= 0), np.flatnonzero(x[:, 0] > 0)
    parent = host.build(values, np.arange(rows), codes, sizes)
    small = host.build(values, other, codes, sizes)
    derived = host.subtract(parent, small)  # histogram subtraction: the sibling without a pass over its rows
    order = shuffle(sum(int(s) - 1 for s in sizes))
    data = host.candidates(derived, sizes, order, packing.per, packing.field)
    assert len(data) == -(-len(order) // packing.per) * label.width
    got = packing.decode(label.decrypt(data), label.n, len(order), (1.0, 0.25))
    plain = Plain().candidates(Plain().build(np.stack([g, h], 1), node, codes, sizes), sizes, order, 1, 1)
    assert np.allclose(got, np.frombuffer(plain, "<f8").reshape(-1, 2), atol=1e-9)
    # what leaves is freshly randomized: the same sums packed twice give other ciphertexts
    assert host.candidates(derived, sizes, order, packing.per, packing.field) != data


def test_a_received_ciphertext_that_is_not_a_unit_is_refused() -> None:
    host = Encrypted(KEYS[0])
    with pytest.raises(ValueError, match="not a unit"):
        host.read(bytes(host.width * 2), 2)
    with pytest.raises(ValueError, match="expected 3 ciphertexts"):
        host.read(bytes(host.width * 2), 3)


def test_config_is_validated() -> None:
    for bad in ({"trees": 0}, {"depth": 9}, {"bins": 1}, {"lr": 0}, {"l2": -1}, {"objective": "poisson"},
                {"key_bits": 512}):
        with pytest.raises(ValueError):
            bt.BoostingConfig(**bad)  # type: ignore[arg-type]


# -- the two roles in one process against scikit-learn --------------------------------------------------

@pytest.mark.parametrize("name,objective", [("breast", "binary"), ("vehicle_scale", "multiclass")])
def test_plaintext_roles_grow_scikit_learns_trees(name: str, objective: str) -> None:
    """Same bins, gains and leaves: the training loss equals scikit-learn's to float precision (its gradients are
    float32), and the test metric is within 0.01."""
    xg, xh, y, xgt, xht, yt = split_columns(name)
    config = bt.BoostingConfig(objective=objective, encrypted=False, min_child_weight=1e-3)  # type: ignore[arg-type]
    fitted = sb.fit(xg, y, xgt, yt, {"partner": (xh, xht)}, config)
    reference = sklearn_model(objective, config).fit(np.hstack([xg, xh]), y)
    from sklearn.metrics import log_loss, roc_auc_score

    assert fitted.history[-1]["loss"] == pytest.approx(log_loss(y, reference.predict_proba(np.hstack([xg, xh]))),
                                                       abs=1e-6)
    if objective == "binary":
        theirs = roc_auc_score(yt, reference.predict_proba(np.hstack([xgt, xht]))[:, 1])
        assert abs(fitted.history[-1]["auc"] - theirs) <= 0.01
    else:
        assert abs(fitted.history[-1]["accuracy"] - reference.score(np.hstack([xgt, xht]), yt)) <= 0.01
    # every split has an owner; the feature party keeps its own thresholds, the label party only its own
    owners = {node.owner for tree in fitted.label.trees for node in tree.nodes.values()}
    assert owners == {None, "", "partner"} and fitted.features["partner"].splits


def test_regression_reduces_the_squared_error_like_scikit_learn() -> None:
    xg, xh, _y, xgt, xht, _yt = split_columns("breast")
    y, yt = xh[:, 0] * 2 + xg[:, 1], xht[:, 0] * 2 + xgt[:, 1]  # a target both parties' columns explain
    config = bt.BoostingConfig(objective="regression", encrypted=False, min_child_weight=1e-3)
    fitted = sb.fit(xg, y, xgt, yt, {"partner": (xh, xht)}, config)
    reference = sklearn_model("regression", config).fit(np.hstack([xg, xh]), y)
    mse = float(np.mean((reference.predict(np.hstack([xgt, xht])) - yt) ** 2))
    assert fitted.history[-1]["mse"] == pytest.approx(mse, rel=0.05) and fitted.history[-1]["r2"] > 0.8


def test_encrypted_roles_grow_the_plaintext_trees_and_exchange_only_ciphertexts_and_membership() -> None:
    """What the feature party receives: ciphertexts (units mod n², nothing like the gradients when read as floats),
    node membership and "your candidate k"; what the label party receives: packed ciphertexts and left bits, never
    a threshold or a feature value of the other party."""
    xg, xh, y, xgt, xht, yt = split_columns("breast")
    config = bt.BoostingConfig(trees=3, depth=3, key_bits=1024)
    received: dict[str, list] = {"features": [], "label": []}
    original = (sb.FeatureParty.begin_round, sb.FeatureParty.histograms_for, sb.FeatureParty.apply,
                sb.LabelParty.split, sb.LabelParty.grow)

    def spy(kind: str, function, position: int):
        def wrapped(self, *args):
            received[kind].append(args[position])
            return function(self, *args)
        return wrapped

    patches = [spy("features", original[0], 0), spy("features", original[1], 1), spy("features", original[2], 0),
               spy("label", original[3], 1), spy("label", original[4], 1)]
    mp = pytest.MonkeyPatch()
    for name, patched in zip(("begin_round", "histograms_for", "apply"), patches[:3]):
        mp.setattr(sb.FeatureParty, name, patched)
    for name, patched in zip(("split", "grow"), patches[3:]):
        mp.setattr(sb.LabelParty, name, patched)
    try:
        encrypted = sb.fit(xg, y, xgt, yt, {"partner": (xh, xht)}, config, keys=KEYS)
    finally:
        mp.undo()
    plain = sb.fit(xg, y, xgt, yt, {"partner": (xh, xht)}, bt.BoostingConfig(trees=3, depth=3, encrypted=False))
    assert [h["loss"] for h in encrypted.history] == pytest.approx([h["loss"] for h in plain.history], abs=1e-9)
    n, width = KEYS[0].n, (KEYS[0].nsquare.bit_length() + 7) // 8
    kinds = set()
    for meta, arrays in received["features"]:
        assert set(meta) <= {"classes", "field", "per", "n", "open", "decisions"}
        for key, value in arrays.items():
            kinds.add(key.split(".")[0])
            if key.startswith("gh."):
                assert value.dtype == np.uint8 and value.size == len(y) * width
                ints = [int.from_bytes(value[i:i + width].tobytes(), "big") for i in range(0, value.size, width)]
                assert all(0 < c < n * n for c in ints) and len(set(ints)) == len(ints)
                # read as floats, uniform bytes: about 0.5 % land where gradients live (1e-3 ≤ |g| ≤ 1), no labels
                magnitude = np.abs(value.view("<f8"))
                assert np.mean((magnitude >= 1e-3) & (magnitude <= 1)) < 0.02 and not np.any(magnitude == 1)
            else:
                assert value.dtype == np.int32  # node membership of training and test rows
    assert kinds == {"gh", "train", "test"}
    edges = {float(e) for edge in encrypted.features["partner"].binning.edges for e in edge}
    values = {float(v) for v in np.ravel(xh)}
    for meta, arrays in (payload for replies in received["label"] for payload in replies.values()):
        assert set(meta) <= {"candidates"}
        for key, value in arrays.items():
            assert key.split(".")[0] in ("cand", "left", "test") and value.dtype == np.uint8
            floats = value.view("<f8") if value.size % 8 == 0 else np.zeros(0)
            seen = {float(f) for f in floats[np.isfinite(floats)]}
            assert not seen & (edges | values) - {0.0}


# -- across real parties ---------------------------------------------------------------------------------

def test_secureboost_on_breast_across_guarded_parties_matches_scikit_learn(parties, tmp_path) -> None:
    from sklearn.metrics import roc_auc_score

    with parties("breast") as fed:
        events: list = []
        fed.subscribe(lambda e: events.append(e) if isinstance(e, VerticalProgress) else None)
        relayed: list = []
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        step = vfl._per_party

        def recording(name, requests, arrays=None):
            replies = step(name, requests, arrays)
            relayed.extend((name, p, r) for p, r in replies.items())
            return replies

        vfl._per_party = recording  # what the coordinator receives, step by step
        model = vfl.train_boosting(trees=10, depth=3, bins=32, lr=0.3, l2=1.0, min_child_weight=1e-3, key_bits=1024)
        metrics = vfl.evaluate(model)
        predictions = vfl.predict(model)
        importance = vfl.importance(model)
        with pytest.raises(FederationError, match="encrypted only"):
            vfl.train_boosting(trees=1, encrypted=False)
    x, y, xt, yt = joined("breast")
    reference = sklearn_model("binary", model.config).fit(x, y)
    theirs = roc_auc_score(yt, reference.predict_proba(xt)[:, 1])
    assert abs(metrics["auc"] - theirs) <= 0.01, (metrics, theirs)
    assert metrics["auc"] == pytest.approx(roc_auc_score(yt, predictions), abs=1e-9)
    assert len(model.history) == 10 and model.history[-1]["loss"] < model.history[0]["loss"]
    # per-tree progress with the level, and each tree's metrics, for the dashboard
    assert [e.tree for e in events if e.stage == "tree"] == list(range(1, 11))
    assert {(e.level, e.depth) for e in events if e.stage == "level"} == {(1, 3), (2, 3), (3, 3)}
    # the coordinator relayed sealed payloads between the parties and read metrics only
    for name, party, reply in relayed:
        if name.startswith("sb."):
            for key, value in reply.arrays.items():
                assert key.startswith("sealed") or (name, key) == ("sb.predict", "predictions"), (name, key)
    # importance: each party its own features, by its own column numbers
    assert set(importance) == {"bank", "partner"} and all(int(f) < 20 for f in importance["partner"])
    assert all(v["splits"] >= 1 and v["gain"] > 0 for p in importance.values() for v in p.values())


def test_multiclass_secureboost_on_vehicle_across_parties(parties) -> None:
    with parties("vehicle_scale") as fed:
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        model = vfl.train_boosting(trees=10, depth=3, objective="multiclass", min_child_weight=1e-3, key_bits=1024)
        metrics = vfl.evaluate(model)
        probabilities = vfl.predict(model, [0, 1, 2])
    x, y, xt, yt = joined("vehicle_scale")
    reference = sklearn_model("multiclass", model.config).fit(x, y)
    assert model.classes == 4 and probabilities.shape == (3, 4)
    assert abs(metrics["accuracy"] - reference.score(xt, yt)) <= 0.01, (metrics, reference.score(xt, yt))


def test_a_feature_party_lost_mid_training_is_named_and_the_rounds_done_stay_usable(parties) -> None:
    with parties("breast") as fed:
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.split(0.2, seed=0)
        stopped = threading.Event()
        partner = next(s for s in parties.started if s.name == "partner")  # type: ignore[attr-defined]

        def kill(event) -> None:
            if isinstance(event, VerticalProgress) and event.stage == "tree" and event.tree == 2 and \
                    not stopped.is_set():
                stopped.set()
                threading.Thread(target=partner.stop, daemon=True).start()

        fed.subscribe(kill)
        with pytest.raises(FederationError, match="partner") as caught:
            vfl.train_boosting(trees=6, depth=3, key_bits=1024)
        model = caught.value.model  # type: ignore[attr-defined]
        assert 2 <= len(model.history) < 6
        # the label party's model holds the completed rounds, unchanged by the round cut short
        done = vfl.evaluate(model)
        assert done["auc"] == pytest.approx(model.history[-1]["auc"])
