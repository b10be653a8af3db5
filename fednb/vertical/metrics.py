"""Scores of a binary classifier on a test split: AUC, accuracy, KS and log loss (numpy only)."""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    p = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != p.shape or not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1, one per score")
    return y.astype(np.int64), p


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann–Whitney U statistic, ties counted half (as scikit-learn)."""
    y, p = _check(labels, scores)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both classes")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
    ends = np.r_[starts[1:], len(p)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def accuracy(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> float:
    """Share of rows where (score ≥ threshold) equals the label."""
    y, p = _check(labels, scores)
    return float(np.mean((p >= threshold) == (y == 1)))


def ks(labels: np.ndarray, scores: np.ndarray) -> float:
    """Kolmogorov–Smirnov statistic: the largest gap between the score distributions of the two classes (max TPR − FPR)."""
    y, p = _check(labels, scores)
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # thresholds between distinct scores
    tpr = np.cumsum(ys)[last] / max(1, ys.sum())
    fpr = np.cumsum(1 - ys)[last] / max(1, (1 - ys).sum())
    return float(np.max(tpr - fpr, initial=0.0))


def logloss(labels: np.ndarray, scores: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of the labels, probabilities clipped to [eps, 1 − eps]."""
    y, p = _check(labels, scores)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def evaluate(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, KS and log loss in one dict."""
    return {"auc": auc(labels, scores), "accuracy": accuracy(labels, scores), "ks": ks(labels, scores),
            "logloss": logloss(labels, scores)}
