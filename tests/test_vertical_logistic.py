"""Hetero logistic regression (Hardy et al., 2017) and its Paillier helpers, with no sockets.

The properties: the joint model is as good as scikit-learn's on the joined table; encryption
changes nothing but fixed-point rounding; the arbiter sees masked gradients and the loss only;
what a host receives is ciphertext it cannot relate to the labels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gmpy2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score, roc_curve
from sklearn.multiclass import OneVsRestClassifier

from fednb.privacy import paillier
from fednb.vertical import logistic, metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"


def load(name: str):
    """(guest features, labels, host features) of a FATE hetero table, rows matched by id."""
    guest = np.loadtxt(DATA / f"{name}_guest.csv", delimiter=",", skiprows=1)
    host = np.loadtxt(DATA / f"{name}_host.csv", delimiter=",", skiprows=1)
    host = host[np.argsort(host[:, 0])][np.searchsorted(np.sort(host[:, 0]), guest[:, 0])]
    assert (host[:, 0] == guest[:, 0]).all()
    return guest[:, 2:], guest[:, 1].astype(np.int64), host[:, 1:]


def split(rows: int, seed: int = 0, test_fraction: float = 0.2):
    order = np.random.default_rng(seed).permutation(rows)
    cut = rows - int(round(test_fraction * rows))
    return order[:cut], order[cut:]


@pytest.fixture(scope="module")
def breast():
    xg, y, xh = load("breast_hetero")
    assert xg.shape == (569, 10) and xh.shape == (569, 20)
    train, test = split(len(y))
    return xg, y, xh, train, test


@pytest.fixture(scope="module")
def key_1024():
    return paillier.generate_keypair(paillier.PaillierConfig(key_bits=1024))


def sklearn_auc(xg, y, xh, train, test, l2):
    x = np.hstack([xg, xh])
    # scikit-learn minimizes C·Σ loss + ½|w|²; ours is (1/n)·Σ loss + ½·λ·|w|²: C = 1 / (λ·n)
    model = LogisticRegression(C=1 / (l2 * len(train)), max_iter=10_000).fit(x[train], y[train])
    return roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1)
    p[:50] = np.round(p[:50], 1)  # ties
    fpr, tpr, _ = roc_curve(y, p)
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert metrics.accuracy(y, p) == pytest.approx(accuracy_score(y, p >= 0.5))
    assert metrics.ks(y, p) == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert metrics.logloss(y, p) == pytest.approx(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)), rel=1e-9)
    with pytest.raises(ValueError, match="both classes"):
        metrics.auc(np.ones(3), np.ones(3))


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_plaintext_auc_is_within_0_005_of_scikit_learn(breast, optimizer):
    xg, y, xh, train, test = breast
    config = logistic.LogisticConfig(epochs=20, lr=0.15 if optimizer == "sgd" else 0.01, batch_size=240,
                                     l2=0.01, optimizer=optimizer, encrypted=False)
    fitted = logistic.fit(xg[train], y[train], [xh[train]], config)
    ours = metrics.auc(y[test], fitted.predict(xg[test], [xh[test]]))
    assert abs(ours - sklearn_auc(xg, y, xh, train, test, 0.01)) <= 0.005
    assert fitted.losses[-1] < fitted.losses[0]


def test_encrypted_run_equals_plaintext_run_and_arbiter_sees_masked_values_only(breast, key_1024):
    xg, y, xh, train, test = breast
    config = logistic.LogisticConfig(epochs=2, batch_size=240, l2=0.01,
                                     paillier=paillier.PaillierConfig(key_bits=1024))
    arbiter = logistic.Arbiter(config, keys=key_1024)  # one key for the module: keygen is the slow part
    encrypted = logistic.fit(xg[train], y[train], [xh[train]], config, arbiter=arbiter)
    plain = logistic.fit(xg[train], y[train], [xh[train]], dataclasses.replace(config, encrypted=False))
    assert np.allclose(encrypted.guest.weights, plain.guest.weights, atol=1e-6)
    assert np.allclose(encrypted.hosts[0].weights, plain.hosts[0].weights, atol=1e-6)
    assert np.allclose(encrypted.losses, plain.losses, atol=1e-6)

    # The arbiter's view: per batch one loss and one masked vector per party, nothing else.
    kinds = [kind for kind, _, _ in arbiter.view]
    assert set(kinds) == {"loss", "gradient"} and kinds.count("loss") == 4 and kinds.count("gradient") == 8
    n = key_1024[0].n
    masked = [int(v) for kind, _, values in arbiter.view if kind == "gradient" for v in values]  # type: ignore[union-attr]
    # masked values are uniform mod n: none is a small (signed) number, as an unmasked fixed-point gradient would be
    assert all(min(v, n - v) > n >> 64 for v in masked)
    assert len(set(masked)) == len(masked)


def test_a_host_cannot_divide_out_its_own_scores(breast, key_1024):
    """[[d]] is re-randomized: [[d]] / [[u_h]] is no trivial encryption (1 + k·n) that would show ¼·u_g − ½·y."""
    xg, y, xh, train, _ = breast
    public, _ = key_1024
    config = logistic.LogisticConfig(epochs=1, paillier=paillier.PaillierConfig(key_bits=1024))
    guest = logistic.Guest(xg[train], y[train], config, public)
    host = logistic.Host(xh[train], config, public)
    host.weights = np.linspace(-0.1, 0.1, xh.shape[1])
    guest.weights = np.linspace(-0.2, 0.2, xg.shape[1] + 1)
    rows = np.arange(120)
    forward = host.forward(rows)
    residual = guest.residual(rows, [forward.scores])
    assert isinstance(residual, paillier.CipherVector) and isinstance(forward.scores, paillier.CipherVector)
    n2 = public.nsquare
    for c_d, c_u in zip(residual.ciphertexts, forward.scores.ciphertexts):
        quotient = c_d * int(gmpy2.invert(c_u, n2)) % n2
        assert (quotient - 1) % public.n != 0
    # and the bytes the host receives, read as numbers, say nothing of the labels
    wire = np.frombuffer(paillier.to_bytes(residual), dtype=np.uint8).reshape(len(rows), -1).astype(float)
    assert abs(np.corrcoef(wire[:, -1], y[train][rows])[0, 1]) < 0.5


def test_paillier_vector_algebra(key_1024):
    public, private = key_1024
    config = paillier.PaillierConfig(key_bits=1024)
    rng = np.random.default_rng(1)
    v, w = rng.normal(size=12), rng.normal(size=12)
    m = rng.normal(size=(3, 12))
    masks = paillier.obfuscators(public, 24, config)
    a = paillier.encrypt(public, v, 30, masks[:12])
    b = paillier.encrypt(public, w, 30, masks[12:])
    assert np.allclose(paillier.decrypt(private, a), v, atol=1e-9)
    assert np.allclose(paillier.decrypt(private, paillier.add(a, b)), v + w, atol=1e-9)
    plain = paillier.encode(public, w, 30)
    assert np.allclose(paillier.decrypt(private, paillier.add_plain(a, plain)), v + w, atol=1e-9)
    product = paillier.matvec(m, a, 20, config)
    assert product.scale == 50 and np.allclose(paillier.decrypt(private, product), m @ v, atol=1e-5)
    assert np.allclose(paillier.decrypt(private, paillier.total(a)), v.sum(), atol=1e-9)
    again = paillier.from_bytes(public, paillier.to_bytes(a), a.scale)
    assert again.ciphertexts == a.ciphertexts
    assert len(paillier.to_bytes(a)) == 12 * 256  # 2048-bit ciphertexts at 1024-bit keys
    fresh = paillier.rerandomize(a, paillier.obfuscators(public, 12, config))
    assert fresh.ciphertexts != a.ciphertexts
    assert np.allclose(paillier.decrypt(private, fresh), v, atol=1e-9)


def test_paillier_refuses_what_would_wrap(key_1024):
    public, _ = key_1024
    with pytest.raises(ValueError, match="does not fit"):
        paillier.encode(public, np.array([2.0**1000]), 40)
    with pytest.raises(ValueError, match="NaN"):
        paillier.encode(public, np.array([np.nan]), 40)
    with pytest.raises(ValueError, match="unit"):
        paillier.from_bytes(public, bytes(256), 40)
    with pytest.raises(ValueError, match="whole number"):
        paillier.from_bytes(public, bytes(255), 40)
    with pytest.raises(ValueError, match="key_bits"):
        paillier.PaillierConfig(key_bits=512)


def test_vehicle_one_vs_rest_is_close_to_scikit_learn():
    """Multiclass by one-vs-rest; the Taylor loss costs about 2 points here (its exact optimum scores 0.71, sklearn 0.74)."""
    xg, y, xh = load("vehicle_scale_hetero")
    train, test = split(len(y))
    config = logistic.LogisticConfig(epochs=200, lr=0.02, batch_size=64, l2=0.001, optimizer="rmsprop",
                                     encrypted=False)
    classes, models = logistic.fit_one_vs_rest(xg[train], y[train], [xh[train]], config)
    assert list(classes) == [0, 1, 2, 3]
    ours = np.mean(logistic.predict_one_vs_rest(classes, models, xg[test], [xh[test]]) == y[test])
    x = np.hstack([xg, xh])
    reference = OneVsRestClassifier(LogisticRegression(C=1 / (0.001 * len(train)), max_iter=10_000))
    theirs = np.mean(reference.fit(x[train], y[train]).predict(x[test]) == y[test])
    assert ours >= theirs - 0.03, (ours, theirs)


def test_config_is_checked():
    with pytest.raises(ValueError, match="optimizer"):
        logistic.LogisticConfig(optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        logistic.LogisticConfig(batch_size=0)
    with pytest.raises(ValueError, match="labels"):
        logistic.Guest(np.zeros((3, 2)), np.array([0, 1, 2]), logistic.LogisticConfig(encrypted=False))


def test_obfuscators_ahead_and_matvec_in_a_pool(key_1024):
    public, private = key_1024
    config = paillier.PaillierConfig(key_bits=1024, workers=2, serial_below=8)
    rng = np.random.default_rng(2)
    v, m = rng.normal(size=10), rng.normal(size=(4, 10))
    with paillier.open_pool(config) as pool:
        stock = paillier.ObfuscatorStock(public, config, pool)
        stock.prefetch(6)
        masks = stock.take(10)  # 6 computed ahead, 4 on demand
        assert len(set(masks)) == 10
        zeros = paillier.encrypt(public, np.zeros(10), 20, masks)
        assert np.all(paillier.decrypt(private, zeros) == 0)  # each is an n-th residue: Enc(0)
        a = paillier.encrypt(public, v, 30, paillier.obfuscators(public, 10, config, pool))
        pooled = paillier.matvec(m, a, 20, config, pool)
    assert pooled.ciphertexts == paillier.matvec(m, a, 20, config).ciphertexts
    assert np.allclose(paillier.decrypt(private, pooled), m @ v, atol=1e-5)
