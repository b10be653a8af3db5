"""SecureBoost's two roles: the label party (labels, key, tree) and a feature party (its columns, its thresholds).

Per round the label party computes every row's gradient and hessian for each margin (one tree per
class per round for multiclass) and sends them packed and encrypted under its own Paillier key
(:mod:`fednb.vertical.histograms`). Then, level by level of the trees::

    feature parties: histograms   node membership in (level > 0) ──> shuffled, packed candidate sums
    label party:     split        decrypts, scores everyone's candidates (its own in the clear); for each
                                  node: a split of its own, "your candidate k" to a feature party, or a leaf
    feature parties: apply        "your candidate k" ──> the rows of the node that go left (train and test)
    label party:     grow         the new membership for the next level; after the last, the leaf weights

What each learns. A feature party: the tree shape, which rows (training and test) share a node,
the gain of its own splits (for its feature importance), ciphertexts. It never sees a label, a
gradient in the clear, or another party's threshold. The label party: the sums of gradients left
of each candidate of each feature party (shuffled: it does not know which feature or threshold a
candidate is), and which rows go left at their splits. Leaf weights and the margins stay at the
label party; thresholds stay with their owner. Messages between the two are payloads ``(meta,
arrays)`` that the parties seal end to end (:mod:`fednb.party.boosting`); the coordinator that
relays them learns the metrics the label party reports, nothing else. :func:`fit` runs both roles
in one process (tests and benchmarks). The feature party's role is in :mod:`fednb.vertical.secureboost_features`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.privacy import paillier
from fednb.vertical import boosting as bt
from fednb.vertical import metrics as vmetrics
from fednb.vertical.histograms import Encrypted, Packing, scales
from fednb.vertical.secureboost_features import FeatureParty, Payload, _key


def _unbits(data: np.ndarray | None, count: int, name: str) -> np.ndarray:
    if data is None or data.dtype != np.uint8 or data.shape != ((count + 7) // 8,):
        raise ValueError(f"{name!r} must be {count} bits")
    return np.unpackbits(data, count=count).astype(bool)


@dataclass
class _Growing:
    """One tree as the label party grows it: which node each row is in, and the tree's gradients."""

    tree: bt.Tree
    g: np.ndarray
    h: np.ndarray
    train: np.ndarray
    test: np.ndarray
    open: list[int] = field(default_factory=lambda: [0])
    scales: tuple[float, float] = (1.0, 1.0)


class LabelParty:
    """The label party: its own columns and labels, the Paillier key pair, the trees' structure and leaf weights."""

    def __init__(self, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, config: bt.BoostingConfig,
                 features: Sequence[str], *, pool: Any = None, keys: tuple[Any, Any] | None = None) -> None:
        self.config, self.features = config, tuple(features)
        self.y = np.asarray(y, dtype=np.float64)
        self.k = bt.classes_of(config.objective, self.y)
        self.binning = bt.Binning.fit(np.asarray(x, dtype=np.float64), config.bins)
        self.codes = self.binning.codes(np.asarray(x, dtype=np.float64))
        self.test_codes = self.binning.codes(np.asarray(x_test, dtype=np.float64))
        self.base = bt.base_score(config.objective, self.y, self.k)
        self.margins = np.tile(self.base, (len(self.y), 1))
        self.test_margins = np.tile(self.base, (len(x_test), 1))
        self.trees: list[bt.Tree] = []
        self.suite: Encrypted | None = None
        if config.encrypted:
            public, private = keys or paillier.generate_keypair(paillier.PaillierConfig(key_bits=config.key_bits))
            self.suite = Encrypted(public, private, pool)
        self.packing = Packing.plan(len(self.y), config.key_bits, config.precision)
        self.growing: list[_Growing] = []
        self.gains: dict[str, list[float]] = {}  # own feature → gains of its splits

    @property
    def rows(self) -> int:
        return len(self.y)

    def begin_round(self) -> Payload:
        """Gradients and hessians of every margin, packed and encrypted: the same payload for every feature party."""
        g, h = bt.gradients(self.config.objective, self.y, self.margins)
        rows, test = len(self.y), len(self.test_margins)
        self.growing = [_Growing(bt.Tree(k), g[:, k], h[:, k], np.zeros(rows, np.int32), np.zeros(test, np.int32))
                        for k in range(self.k)]
        arrays: dict[str, np.ndarray] = {}
        for grow in self.growing:
            grow.scales = scales(grow.g, grow.h)
            if self.suite is None:
                arrays[f"gh.{grow.tree.k}"] = np.stack([grow.g, grow.h], axis=1).astype("<f8")
            else:
                data = self.suite.encrypt(self.packing.encode(grow.g, grow.h, grow.scales))
                arrays[f"gh.{grow.tree.k}"] = np.frombuffer(data, dtype=np.uint8).copy()
        meta = {"classes": self.k, "field": self.packing.field, "per": self.packing.per,
                "n": format(self.suite.n, "x") if self.suite is not None else None}
        return meta, arrays

    def split(self, level: int, replies: Mapping[str, Payload]) -> dict[str, Payload]:
        """Score every open node's candidates (own and decrypted); decide; "your candidate k" per feature party."""
        decisions: dict[str, list[list[Any]]] = {p: [] for p in self.features}
        for grow in self.growing:
            for node in grow.open:
                rows = np.flatnonzero(grow.train == node)
                total = (float(grow.g[rows].sum()), float(grow.h[rows].sum()))
                gs, hs = bt.histogram(self.codes[rows], self.binning.sizes, grow.g[rows], grow.h[rows])
                options: list[tuple[str | None, np.ndarray]] = [(None, bt.cumulative(gs, hs, self.binning.sizes))]
                for party in self.features:
                    meta, arrays = replies[party]
                    options.append((party, self._candidates(meta, arrays, _key(grow.tree.k, node), grow.scales)))
                self._decide(grow, node, rows, total, options, decisions)
        return {p: ({"decisions": d}, {}) for p, d in decisions.items()}

    def _candidates(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], key: str,
                    tree_scales: tuple[float, float]) -> np.ndarray:
        counts = meta.get("candidates")
        count = counts.get(key) if isinstance(counts, Mapping) else None
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 2**16:
            raise ValueError(f"a feature party sent no candidate count for node {key}")
        data = arrays.get(f"cand.{key}")
        if data is None or data.dtype != np.uint8 or data.ndim != 1:
            raise ValueError(f"a feature party sent no candidates for node {key}")
        if self.suite is None:
            values = np.frombuffer(data.tobytes(), dtype="<f8")
            if values.shape != (2 * count,) or not np.all(np.isfinite(values)):
                raise ValueError(f"node {key}: expected {count} finite candidate sums")
            return values.reshape(count, 2)
        packed = -(-count // self.packing.per)
        if data.size != packed * self.suite.width:
            raise ValueError(f"node {key}: expected {packed} packed ciphertexts")
        plain = self.suite.decrypt(data.tobytes())
        return self.packing.decode(plain, self.suite.n, count, tree_scales)

    def _decide(self, grow: _Growing, node: int, rows: np.ndarray, total: tuple[float, float],
                options: list[tuple[str | None, np.ndarray]], decisions: dict[str, list[list[Any]]]) -> None:
        best: tuple[float, str | None, int] = (0.0, None, -1)
        found = False
        for owner, left in options:
            if len(left) == 0:
                continue
            scored = bt.gains(left, total, self.config)
            i = int(np.argmax(scored))
            if np.isfinite(scored[i]) and scored[i] > best[0] + 1e-12:
                best, found = (float(scored[i]), owner, i), True
        tree = grow.tree
        if not found:
            tree.nodes[node] = bt.Node(weight=bt.leaf_weight(*total, self.config))
            return
        gain, owner, i = best
        if owner is None:
            f, b = self.binning.candidates()[i]
            tree.nodes[node] = bt.Node(owner="", feature=f, threshold=float(self.binning.edges[f][b]), gain=gain)
            self.gains.setdefault(str(f), []).append(gain)
            here = np.flatnonzero(grow.test == node)
            self._route(grow, node, self.codes[rows, f] <= b, rows, self.test_codes[here, f] <= b, here)
        else:
            tree.nodes[node] = bt.Node(owner=owner, gain=gain)
            decisions[owner].append([tree.k, node, i, gain])

    @staticmethod
    def _route(grow: _Growing, node: int, left: np.ndarray, rows: np.ndarray, test_left: np.ndarray,
               test_rows: np.ndarray) -> None:
        a, b = bt.children(node)
        grow.train[rows] = np.where(left, a, b)
        grow.test[test_rows] = np.where(test_left, a, b)

    def grow(self, level: int, replies: Mapping[str, Payload]) -> Payload | None:
        """The feature parties' left rows applied; the membership for the next level, or None once the trees are
        grown (their leaves weighed, the margins moved)."""
        for grow in self.growing:
            for node in grow.open:
                split = grow.tree.nodes.get(node)
                if split is None or not split.owner:
                    continue
                _meta, arrays = replies[split.owner]
                rows = np.flatnonzero(grow.train == node)
                here = np.flatnonzero(grow.test == node)
                key = _key(grow.tree.k, node)
                self._route(grow, node, _unbits(arrays.get(f"left.{key}"), len(rows), f"left.{key}"), rows,
                            _unbits(arrays.get(f"test.{key}"), len(here), f"test.{key}"), here)
            grow.open = [c for node in grow.open if grow.tree.nodes[node].owner is not None
                         for c in bt.children(node)]
        if level + 1 < self.config.depth and any(grow.open for grow in self.growing):
            arrays = {}
            for grow in self.growing:
                arrays[f"train.{grow.tree.k}"] = grow.train.copy()
                arrays[f"test.{grow.tree.k}"] = grow.test.copy()
            return {"open": {str(g.tree.k): g.open for g in self.growing}}, arrays
        for grow in self.growing:
            for node in grow.open:
                rows = np.flatnonzero(grow.train == node)
                grow.tree.nodes[node] = bt.Node(weight=bt.leaf_weight(float(grow.g[rows].sum()),
                                                                      float(grow.h[rows].sum()), self.config))
            weights = np.zeros(2 ** (self.config.depth + 1))
            for j, kept in grow.tree.nodes.items():
                weights[j] = kept.weight if kept.owner is None else 0.0
            self.margins[:, grow.tree.k] += weights[grow.train]
            self.test_margins[:, grow.tree.k] += weights[grow.test]
            self.trees.append(grow.tree)
        self.growing = []
        return None

    def metrics(self, y_test: np.ndarray | None) -> dict[str, float]:
        """The training loss and, with the test labels, the test metrics of the model so far."""
        out = {"loss": bt.loss(self.config.objective, self.y, self.margins)}
        if y_test is not None and len(y_test):
            out.update(test_metrics(self.config.objective, y_test, self.test_margins))
        return out

    def importance(self) -> dict[str, list[float]]:
        """Own features: [splits, total gain]."""
        return {f: [len(g), float(sum(g))] for f, g in sorted(self.gains.items(), key=lambda kv: int(kv[0]))}


def test_metrics(objective: bt.Objective, y: np.ndarray, margins: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, KS, log loss (binary); accuracy and log loss (multiclass); MSE and R² (regression)."""
    p = bt.probabilities(objective, margins)
    if objective == "binary":
        return vmetrics.evaluate(y.astype(np.int64), p)
    if objective == "multiclass":
        return {"accuracy": float(np.mean(np.argmax(p, axis=1) == y)), "logloss": bt.loss(objective, y, margins)}
    mse = float(np.mean((p - y) ** 2))
    variance = float(np.var(y))
    return {"mse": mse, "r2": 1 - mse / variance if variance > 0 else 0.0}


@dataclass
class Fitted:
    """Both roles after :func:`fit`, and the metrics of each round."""

    label: LabelParty
    features: dict[str, FeatureParty]
    history: list[dict[str, float]]
    seconds: list[float]


def fit(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray | None,
        feature_columns: Mapping[str, tuple[np.ndarray, np.ndarray]], config: bt.BoostingConfig, *,
        pool: Any = None, keys: tuple[Any, Any] | None = None,
        progress: Callable[[int, dict[str, float]], None] | None = None) -> Fitted:
    """Every role in one process, step after step as the parties run them: the label party's columns ``x`` and
    labels, each feature party's (train, test) columns."""
    label = LabelParty(x, y, x_test, config, list(feature_columns), pool=pool, keys=keys)
    parties = {p: FeatureParty(a, b, config, pool=pool) for p, (a, b) in feature_columns.items()}
    history, seconds = [], []
    for r in range(config.trees):
        started = time.perf_counter()
        gradients = label.begin_round()
        for party in parties.values():
            party.begin_round(gradients)
        membership: Payload = ({}, {})
        for level in range(config.depth):
            replies = {p: party.histograms_for(level, membership) for p, party in parties.items()}
            decisions = label.split(level, replies)
            applied = {p: party.apply(decisions[p]) for p, party in parties.items()}
            grown = label.grow(level, applied)
            if grown is None:
                break
            membership = grown
        if label.growing:
            raise RuntimeError("a round ended with trees still growing")
        history.append(label.metrics(y_test))
        seconds.append(time.perf_counter() - started)
        if progress is not None:
            progress(r, history[-1])
    return Fitted(label, parties, history, seconds)
