"""SecureBoost's feature party: its own columns, bins and thresholds; the payloads it exchanges with the label
party.

The protocol, and what each role learns, are in :mod:`fednb.vertical.secureboost`, which holds the
label party and runs both roles in one process (:func:`fednb.vertical.secureboost.fit`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.privacy import paillier
from fednb.vertical import boosting as bt
from fednb.vertical.histograms import Encrypted, Plain, shuffle

Payload = tuple[dict[str, Any], dict[str, np.ndarray]]


def _key(k: int, node: int) -> str:
    return f"{k}.{node}"


def _bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.astype(bool))


def _small(meta: Mapping[str, Any], name: str, high: int) -> int:
    value = meta.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"the gradients' {name!r} must be an integer from 1 to {high}")
    return value


def _membership(arrays: Mapping[str, np.ndarray], name: str, rows: int) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != np.int32 or value.shape != (rows,) or (rows and (
            value.min() < 0 or value.max() >= 2**9)):
        raise ValueError(f"{name!r} must be one node id per row")
    return np.asarray(value)


class FeatureParty:
    """A feature party: its own columns, bins and thresholds; ciphertexts under the label party's key."""

    def __init__(self, x: np.ndarray, x_test: np.ndarray, config: bt.BoostingConfig, *, pool: Any = None) -> None:
        self.config, self.pool = config, pool
        x = np.asarray(x, dtype=np.float64)
        self.binning = bt.Binning.fit(x, config.bins)
        self.sizes = self.binning.sizes
        self.codes = self.binning.codes(x)
        self.test_codes = self.binning.codes(np.asarray(x_test, dtype=np.float64))
        self.candidates = self.binning.candidates()
        self.tags = np.frombuffer(secrets.token_bytes(8 * len(self.codes)), dtype=np.uint64)
        self.suite: Encrypted | Plain | None = None
        self.n: int | None = None
        self.values: dict[int, Any] = {}
        self.train: dict[int, np.ndarray] = {}
        self.test: dict[int, np.ndarray] = {}
        self.histograms: dict[str, Any] = {}
        self.orders: dict[str, np.ndarray] = {}
        self.packing: tuple[int, int] = (1, 1)
        self.splits: dict[tuple[int, int], tuple[int, float]] = {}  # (tree, node) → own feature, threshold
        self.round = -1
        self.k = 1
        self.gains: dict[int, list[float]] = {}

    def begin_round(self, payload: Payload) -> None:
        """Take a round's encrypted gradients (the key is the label party's; it must not change within a model)."""
        meta, arrays = payload
        k, per, width_field = _small(meta, "classes", 256), _small(meta, "per", 64), _small(meta, "field", 256)
        rows = len(self.codes)
        if self.config.encrypted:
            n = int(str(meta.get("n")), 16)
            if n.bit_length() < 1000 or (self.n is not None and n != self.n):
                raise ValueError("the label party's public key is missing, too short, or changed within the model")
            self.n = n
            if not isinstance(self.suite, Encrypted):
                self.suite = Encrypted(paillier.PublicKey(n), None, self.pool)
        elif meta.get("n") is not None:
            raise ValueError("a public key arrived in a plaintext run")
        else:
            self.suite = Plain()
        self.k, self.packing, self.round = k, (per, width_field), self.round + 1
        self.values = {}
        for c in range(self.k):
            data = arrays.get(f"gh.{c}")
            if data is None:
                raise ValueError(f"the gradients of margin {c} are missing")
            self.values[c] = self.suite.read(data.tobytes(), rows)
            self.train[c] = np.zeros(rows, np.int32)
            self.test[c] = np.zeros(len(self.test_codes), np.int32)
        self.histograms, self.orders = {}, {}

    def histograms_for(self, level: int, payload: Payload) -> Payload:
        """Each open node's candidates: built, or derived from the parent and the smaller sibling; shuffled, packed."""
        assert self.suite is not None, "histograms before the round's gradients"
        meta, arrays = payload
        opened: dict[int, list[int]] = {c: [0] for c in range(self.k)}
        if level > 0:
            raw = meta.get("open")
            if not isinstance(raw, Mapping) or set(raw) != {str(c) for c in range(self.k)}:
                raise ValueError("the open nodes of every tree must be named")
            for c in range(self.k):
                self.train[c] = _membership(arrays, f"train.{c}", len(self.codes))
                self.test[c] = _membership(arrays, f"test.{c}", len(self.test_codes))
                nodes = raw[str(c)]
                if not isinstance(nodes, list) or not all(isinstance(j, int) and not isinstance(j, bool) and
                                                          2**level - 1 <= j < 2**(level + 1) - 1 for j in nodes):
                    raise ValueError(f"open nodes must lie on level {level}")
                opened[c] = sorted(set(nodes))
        built: dict[str, Any] = {}
        out: dict[str, np.ndarray] = {}
        per, width_field = self.packing
        for c in range(self.k):
            for node in opened[c]:
                key = _key(c, node)
                if key in built:
                    continue
                parent = _key(c, (node - 1) // 2) if node else None
                sibling = node + 1 if node % 2 else node - 1
                rows = np.flatnonzero(self.train[c] == node)
                if parent in self.histograms and sibling in opened[c]:
                    other = np.flatnonzero(self.train[c] == sibling)
                    small, large = (node, sibling) if len(rows) <= len(other) else (sibling, node)
                    small_rows = rows if small == node else other
                    built[_key(c, small)] = self.suite.build(self.values[c], small_rows, self.codes, self.sizes)
                    built[_key(c, large)] = self.suite.subtract(self.histograms[parent], built[_key(c, small)])
                else:
                    built[key] = self.suite.build(self.values[c], rows, self.codes, self.sizes)
        counts = {}
        for key, histogram in built.items():
            c, node = (int(part) for part in key.split("."))
            kept = self._distinct(np.flatnonzero(self.train[c] == node))
            order = kept[shuffle(len(kept))]
            self.orders[key], counts[key] = order, len(order)
            data = self.suite.candidates(histogram, self.sizes, order, per, width_field)
            out[f"cand.{key}"] = np.frombuffer(data, dtype=np.uint8).copy()
        self.histograms = built
        return {"candidates": counts}, out

    def _distinct(self, rows: np.ndarray) -> np.ndarray:
        """The candidates that split the node's rows in a way no earlier candidate (lower bin, or lower feature)
        does, with rows on both sides: scikit-learn's first-wins rule among equal splits, kept here because the
        label party sees the candidates shuffled. Their number is what the label party could count from the sums
        anyway (equal sides give equal sums). Sides are compared by a sum of random 64-bit row tags."""
        kept, seen, at = [], set(), 0
        tags = self.tags[rows]
        for f, size in enumerate(self.sizes.tolist()):
            codes = self.codes[rows, f]
            filled = np.bincount(codes, minlength=size)[:size]
            sums = np.zeros(size, dtype=np.uint64)
            np.add.at(sums, codes, tags)
            left, count = np.cumsum(sums), np.cumsum(filled)
            for b in range(size - 1):
                if filled[b] and count[b] < len(rows) and int(left[b]) not in seen:
                    seen.add(int(left[b]))
                    kept.append(at + b)
            at += size - 1
        return np.array(kept, dtype=np.int64)

    def apply(self, payload: Payload) -> Payload:
        """For each "your candidate k": keep the threshold, and say which of the node's rows go left."""
        meta, _arrays = payload
        decisions = meta.get("decisions")
        if not isinstance(decisions, list) or len(decisions) > 256 * self.k:
            raise ValueError("decisions must be a list")
        out: dict[str, np.ndarray] = {}
        for item in decisions:
            if not isinstance(item, list) or len(item) != 4:
                raise ValueError("a decision is [tree, node, candidate, gain]")
            c, node, i, gain = item
            key = _key(c, node) if isinstance(c, int) and isinstance(node, int) else ""
            if key not in self.orders or isinstance(i, bool) or not isinstance(i, int) or \
                    not 0 <= i < len(self.candidates) or not isinstance(gain, (int, float)) or f"left.{key}" in out:
                raise ValueError("a decision names no candidate of an open node")
            f, b = self.candidates[int(self.orders[key][i])]
            rows = np.flatnonzero(self.train[c] == node)
            here = np.flatnonzero(self.test[c] == node)
            out[f"left.{key}"] = _bits(self.codes[rows, f] <= b)
            out[f"test.{key}"] = _bits(self.test_codes[here, f] <= b)
            self.splits[(self.round * self.k + c, node)] = (f, float(self.binning.edges[f][b]))
            self.gains.setdefault(f, []).append(float(gain))
        return {}, out

    def importance(self) -> dict[str, list[float]]:
        return {str(f): [len(g), float(sum(g))] for f, g in sorted(self.gains.items())}
