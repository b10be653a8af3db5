"""Gradient-boosted trees for vertical federations, the plaintext core of SecureBoost: objectives, bins, splits, trees.

SecureBoost (Cheng et al., "SecureBoost: A Lossless Federated Learning Framework", IEEE
Intelligent Systems 2021) grows the trees of gradient boosting (Chen and Guestrin, "XGBoost",
KDD 2016) over columns held by several parties. What this module holds needs no encryption and
no party: what the label party computes from its labels and margins (gradients and hessians,
the base score, the loss), what every party computes on its own columns (quantile bins, the
rows each bin holds) and how the label party scores split candidates and leaves:

    gain   = G_L²/(H_L + λ) + G_R²/(H_R + λ) − G²/(H + λ)      (split if > 0, both sides H ≥ min_child_weight)
    weight = −lr · G/(H + λ)                                     (a leaf's contribution to the margin)

with G, H the sums of the gradients and hessians of a node's rows. Bins follow scikit-learn's
``HistGradientBoosting``: midpoints between distinct values when they are few, otherwise
percentiles (averaged inverted CDF); a row goes left of candidate b of a feature when its bin is at most b (its value
at most the bin's upper edge). Trees grow level by level to ``depth``; node ids are heap
positions (root 0, children 2j + 1 and 2j + 2). :mod:`fednb.vertical.histograms` carries the
sums encrypted, :mod:`fednb.vertical.secureboost` splits the work between the parties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

OBJECTIVES = ("binary", "multiclass", "regression")
Objective = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True)
class BoostingConfig:
    """One SecureBoost run: trees (rounds; one tree per class per round for multiclass), their shape, the encryption."""

    trees: int = 10
    depth: int = 3
    bins: int = 32
    lr: float = 0.3
    l2: float = 1.0
    min_child_weight: float = 1.0
    objective: Objective = "binary"
    encrypted: bool = True
    key_bits: int = 2048
    #: fractional bits of each packed gradient and hessian (relative to the tree's largest)
    precision: int = 40

    def __post_init__(self) -> None:
        for name, low, high in (("trees", 1, 1000), ("depth", 1, 8), ("bins", 2, 256), ("precision", 16, 52)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")
        for name in ("lr", "l2", "min_child_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and name == "lr"):
                bound = "above 0" if name == "lr" else "at least 0"
                raise ValueError(f"{name} must be a finite number {bound}, not {value!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.key_bits not in (1024, 2048, 3072):
            raise ValueError(f"key_bits must be 1024, 2048 or 3072, not {self.key_bits!r}")
        if not isinstance(self.encrypted, bool):
            raise ValueError("encrypted must be True or False")


# -- objectives ---------------------------------------------------------------------------------------

def classes_of(objective: Objective, y: np.ndarray) -> int:
    """The margins per row: 1 (binary, regression) or the number of classes (labels 0 … K − 1)."""
    if objective == "regression":
        if not np.all(np.isfinite(y)):
            raise ValueError("regression needs finite labels")
        return 1
    if not np.all(np.equal(np.mod(y, 1), 0)) or np.min(y, initial=0) < 0:
        raise ValueError("classification needs integer labels 0, 1, … (one per class)")
    k = int(np.max(y, initial=0)) + 1
    if objective == "binary" and k > 2:
        raise ValueError(f"the labels hold {k} classes: use objective='multiclass'")
    if objective == "multiclass" and k < 3:
        raise ValueError("multiclass needs at least three classes (use objective='binary' for two)")
    return 1 if objective == "binary" else k


def base_score(objective: Objective, y: np.ndarray, k: int) -> np.ndarray:
    """The starting margin: log-odds of the positive rate, log class priors, or the mean label."""
    if objective == "regression":
        return np.array([float(np.mean(y))])
    if objective == "binary":
        p = float(np.clip(np.mean(y), 1e-12, 1 - 1e-12))
        return np.array([math.log(p / (1 - p))])
    priors = np.clip(np.bincount(y.astype(np.int64), minlength=k) / len(y), 1e-12, None)
    return np.log(priors)


def probabilities(objective: Objective, margins: np.ndarray) -> np.ndarray:
    """P(y = 1) (binary), class probabilities (multiclass), or the prediction itself (regression)."""
    if objective == "binary":
        return 1.0 / (1.0 + np.exp(-margins[:, 0]))
    if objective == "multiclass":
        shifted = np.exp(margins - margins.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return margins[:, 0].copy()


def gradients(objective: Objective, y: np.ndarray, margins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row and margin: the gradient and hessian of the loss (log loss, softmax cross-entropy, ½ squared error)."""
    if objective == "regression":
        return margins - y.reshape(-1, 1), np.ones_like(margins)
    p = probabilities(objective, margins)
    if objective == "binary":
        p = p.reshape(-1, 1)
        target = y.reshape(-1, 1).astype(np.float64)
    else:
        target = np.eye(margins.shape[1])[y.astype(np.int64)]
    return p - target, p * (1 - p)


def loss(objective: Objective, y: np.ndarray, margins: np.ndarray) -> float:
    """Mean log loss (binary, multiclass) or mean squared error (regression)."""
    if objective == "regression":
        return float(np.mean((margins[:, 0] - y) ** 2))
    p = np.clip(probabilities(objective, margins), 1e-15, 1 - 1e-15)
    if objective == "binary":
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(y)), y.astype(np.int64)])))


# -- bins ---------------------------------------------------------------------------------------------

def bin_edges(column: np.ndarray, bins: int) -> np.ndarray:
    """Upper edges of the bins of one feature (at most ``bins − 1``): scikit-learn's quantile thresholds."""
    values = np.unique(np.asarray(column, dtype=np.float64))
    if len(values) <= bins:
        edges = (values[:-1] + values[1:]) / 2
    else:
        edges = np.percentile(column, np.linspace(0, 100, bins + 1)[1:-1], method="averaged_inverted_cdf")
    return np.unique(edges)


@dataclass(frozen=True)
class Binning:
    """One party's bins: per feature the upper edges; ``codes`` maps values to bins (value ≤ edge b → bin ≤ b)."""

    edges: tuple[np.ndarray, ...]

    @classmethod
    def fit(cls, x: np.ndarray, bins: int) -> Binning:
        if x.ndim != 2 or not np.all(np.isfinite(x)):
            raise ValueError("features must be a finite 2-d array (rows × columns)")
        return cls(tuple(bin_edges(x[:, f], bins) for f in range(x.shape[1])))

    @property
    def sizes(self) -> np.ndarray:
        """The number of bins of each feature (one more than its edges)."""
        return np.array([len(e) + 1 for e in self.edges], dtype=np.int64)

    def codes(self, x: np.ndarray) -> np.ndarray:
        """Each value's bin, as uint8 (rows × features)."""
        out = np.empty(x.shape, dtype=np.uint8)
        for f, edges in enumerate(self.edges):
            out[:, f] = np.searchsorted(edges, x[:, f], side="left")
        return out

    def candidates(self) -> list[tuple[int, int]]:
        """Every split candidate (feature, bin): rows of bins ≤ bin go left."""
        return [(f, b) for f, edges in enumerate(self.edges) for b in range(len(edges))]


def histogram(codes: np.ndarray, sizes: np.ndarray, g: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, per bin the sums of g and h of the rows given (features × max bins, zero-padded)."""
    width = int(sizes.max(initial=1))
    gs, hs = np.zeros((codes.shape[1], width)), np.zeros((codes.shape[1], width))
    for f in range(codes.shape[1]):
        gs[f] = np.bincount(codes[:, f], weights=g, minlength=width)[:width]
        hs[f] = np.bincount(codes[:, f], weights=h, minlength=width)[:width]
    return gs, hs


def cumulative(gs: np.ndarray, hs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Every candidate's left sums (G_L, H_L), in the order of :meth:`Binning.candidates` (candidates × 2)."""
    out = [np.stack([np.cumsum(gs[f, :s - 1]), np.cumsum(hs[f, :s - 1])], axis=1) for f, s in enumerate(sizes)]
    return np.concatenate(out) if out else np.zeros((0, 2))


# -- splits and trees ---------------------------------------------------------------------------------

def gains(left: np.ndarray, total: tuple[float, float], config: BoostingConfig) -> np.ndarray:
    """The gain of each candidate from its left sums (candidates × 2); −inf where a side is too light."""
    g, h = total
    gl, hl = left[:, 0], left[:, 1]
    gr, hr = g - gl, h - hl
    lam = config.l2
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = gl**2 / (hl + lam) + gr**2 / (hr + lam) - g**2 / (h + lam)
    light = (hl < max(config.min_child_weight, 1e-3)) | (hr < max(config.min_child_weight, 1e-3))
    return np.where(light | ~np.isfinite(gain), -np.inf, gain)


def leaf_weight(g: float, h: float, config: BoostingConfig) -> float:
    """A leaf's contribution to the margin: −lr · G/(H + λ)."""
    return -config.lr * g / (h + config.l2) if h + config.l2 > 0 else 0.0


@dataclass
class Node:
    """One node of a tree, as the label party keeps it: a split (its owner, and the label party's own threshold
    when it owns it) or a leaf (its weight)."""

    owner: str | None = None      # the party whose feature splits it; None: a leaf
    feature: int = -1             # the label party's own feature (its splits only)
    threshold: float = math.nan   # the label party's own threshold (its splits only)
    gain: float = 0.0
    weight: float = 0.0


@dataclass
class Tree:
    """One tree: for margin ``k`` (its class), nodes by heap id."""

    k: int
    nodes: dict[int, Node] = field(default_factory=dict)

    def leaves(self) -> list[int]:
        return sorted(j for j, node in self.nodes.items() if node.owner is None)


def children(node: int) -> tuple[int, int]:
    return 2 * node + 1, 2 * node + 2


def level_of(node: int) -> int:
    return int(math.floor(math.log2(node + 1)))
