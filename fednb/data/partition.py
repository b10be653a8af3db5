"""Partitioners that split one dataset's indices among simulated parties.

Three ways to deal samples, from the federated-learning literature:

- ``iid``: shuffle, then near-equal contiguous chunks.
- ``dirichlet``: label skew. For each class, party proportions are drawn from
  Dir(alpha · 1_n); small alpha gives each party few classes, large alpha approaches IID
  (Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification", 2019; Yurochkin et al., "Bayesian Nonparametric
  Federated Learning of Neural Networks", ICML 2019).
- ``shards``: pathological non-IID. Sort by label, cut into ``n · shards_per_party``
  shards, deal ``shards_per_party`` shards to each party at random (McMahan et al.,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017).

Every partitioner takes its randomness from ``np.random.default_rng(seed)``, never the
global RNG, and returns sorted, disjoint index arrays that together cover ``y``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PARTITIONS", "partition", "sample_population", "train_test_split"]

PARTITIONS: tuple[str, ...] = ("dirichlet", "iid", "shards")

# Dirichlet draws are repeated until every party holds min_size samples; after this many
# draws the best one is repaired by moving samples from the largest parties.
_DIRICHLET_TRIES = 100


def partition(
    y: np.ndarray,
    n: int,
    method: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_party: int = 2,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split the indices of ``y`` among ``n`` parties; one sorted int64 array per party.

    The arrays are disjoint, cover ``range(len(y))``, and each holds at least
    ``min_size`` indices (``ValueError`` when ``n · min_size > len(y)``).
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"y must be one-dimensional, got shape {labels.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size!r}")
    if method not in PARTITIONS:
        raise ValueError(f"unknown partition method {method!r}; known methods: {', '.join(PARTITIONS)}")
    n, min_size = int(n), int(min_size)
    total = labels.shape[0]
    if n * min_size > total:
        raise ValueError(
            f"cannot give {n} parties at least {min_size} samples each from {total} samples; "
            "use fewer parties or a smaller min_size"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(total), n)
    elif method == "dirichlet":
        if not (isinstance(alpha, (int, float, np.floating)) and np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        parts = _dirichlet(labels, n, float(alpha), min_size, rng)
    else:
        if (
            isinstance(shards_per_party, bool)
            or not isinstance(shards_per_party, (int, np.integer))
            or shards_per_party < 1
        ):
            raise ValueError(f"shards_per_party must be a positive integer, got {shards_per_party!r}")
        parts = _shards(labels, n, int(shards_per_party), rng)
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def _dirichlet(
    labels: np.ndarray, n: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    _, codes = np.unique(labels, return_inverse=True)
    by_class = [np.flatnonzero(codes == c) for c in range(int(codes.max(initial=-1)) + 1)]
    total = labels.shape[0]
    best: list[np.ndarray] | None = None
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        sizes = np.zeros(n, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n, alpha))
            # Yurochkin et al.: a party already over the average size takes no more, which
            # keeps any one party from swallowing the dataset
            p = p * (sizes < total / n)
            p = p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)
            cuts = (np.cumsum(p)[:-1] * idx.shape[0]).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
                sizes[k] += chunk.shape[0]
        draw = [np.concatenate(chunks) if chunks else np.empty(0, np.int64) for chunks in parts]
        if sizes.min() >= min_size:
            return draw
        if best is None or sizes.min() > min(b.shape[0] for b in best):
            best = draw
    assert best is not None
    return _top_up(best, min_size, rng)


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest parties until every party has ``min_size``."""
    parts = [rng.permutation(p) for p in parts]
    for k in range(len(parts)):
        while parts[k].shape[0] < min_size:
            donor = max(range(len(parts)), key=lambda j: parts[j].shape[0])
            need = min(min_size - parts[k].shape[0], parts[donor].shape[0] - min_size)
            parts[k] = np.concatenate([parts[k], parts[donor][:need]])
            parts[donor] = parts[donor][need:]
    return parts


def _shards(labels: np.ndarray, n: int, per_party: int, rng: np.random.Generator) -> list[np.ndarray]:
    total = labels.shape[0]
    count = n * per_party
    if count > total:
        raise ValueError(
            f"cannot cut {total} samples into {n} × {per_party} = {count} non-empty shards"
        )
    # shuffle first so that samples of one label land in shards in random order
    shuffled = rng.permutation(total)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    # deal shard positions first, then size each shard so that every party's shards add
    # up to a near-equal share (sizes differ by at most one sample between parties)
    owner = np.empty(count, dtype=np.int64)
    owner[rng.permutation(count)] = np.arange(count) // per_party
    party_sizes = [len(c) for c in np.array_split(np.arange(total), n)]
    shard_sizes = {k: [len(c) for c in np.array_split(np.arange(party_sizes[k]), per_party)] for k in range(n)}
    sizes = np.array([shard_sizes[int(k)].pop() for k in owner], dtype=np.int64)
    shards = np.split(order, np.cumsum(sizes)[:-1])
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for k, shard in zip(owner, shards):
        parts[int(k)].append(shard)
    return [np.concatenate(p) for p in parts]


def train_test_split(
    indices: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split one party's ``indices`` into sorted (train, test) index arrays.

    Stratified by label when ``y`` holds class labels and every class present has at least
    two examples; otherwise a plain random split. Both parts are non-empty whenever
    ``len(indices) >= 2``.
    """
    if not (isinstance(test_fraction, (int, float, np.floating)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    idx = np.asarray(indices)
    labels = np.asarray(y)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError("indices must be a one-dimensional integer array")
    idx = idx.astype(np.int64, copy=False)
    rng = np.random.default_rng(seed)
    count = idx.shape[0]
    if count < 2:
        return np.sort(idx), np.empty(0, dtype=np.int64)
    n_test = min(max(int(round(test_fraction * count)), 1), count - 1)
    party_labels = labels[idx]
    stratify = party_labels.dtype.kind in "biu"
    if stratify:
        _, codes, counts = np.unique(party_labels, return_inverse=True, return_counts=True)
        stratify = bool(counts.min() >= 2)
    if stratify:
        # largest-remainder apportionment hits n_test exactly; floor(c · t / N) < c for
        # t < N, and the extra samples go first to classes that can spare one, so every
        # class keeps a training example whenever that is possible at all
        quota = counts * n_test / count
        take = np.floor(quota).astype(np.int64)
        short = n_test - int(take.sum())
        if short:
            remainder = quota - take + rng.random(len(counts)) * 1e-9  # random tie-break
            while short:  # one more each, to the classes that can spare one first; again while still short
                spare = take < counts - 1
                room = spare if spare.any() else take < counts
                given = np.lexsort((-remainder, ~spare, ~room))[:min(short, int(room.sum()))]
                take[given] += 1
                short -= len(given)
        picks = [rng.permutation(np.flatnonzero(codes == c))[:t] for c, t in enumerate(take)]
        test_pos = np.concatenate(picks)
    else:
        test_pos = rng.permutation(count)[:n_test]
    mask = np.zeros(count, dtype=bool)
    mask[test_pos] = True
    return np.sort(idx[~mask]), np.sort(idx[mask])


def sample_population(
    y: np.ndarray,
    n: int,
    examples: int,
    *,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` row indices, shape ``(n, examples)`` and ``(n, t)``, of a population of
    ``n`` parties larger than the dataset could hold disjointly.

    Cross-device simulations (thousands of parties of ~100 examples each) draw every party's
    rows *with replacement*: its label proportions from Dir(alpha · 1) (label skew, as the
    ``dirichlet`` partition), then ``examples`` training rows from the first ``1 - test_fraction``
    of the shuffled dataset and ``t = max(1, round(examples · test_fraction / (1 - test_fraction)))``
    test rows, with the same proportions, from the rest, so that no party tests on a row any
    party trains on. Vectorised: 10,000 parties take milliseconds.
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError("y must be one-dimensional integer class labels")
    for what, value in (("n", n), ("examples", examples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if not (isinstance(alpha, (int, float, np.floating)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(test_fraction, (int, float, np.floating)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.shape[0])
    cut = int(round(labels.shape[0] * (1 - test_fraction)))
    pools = (order[:cut], order[cut:])
    classes = np.unique(labels)
    proportions = rng.dirichlet(np.full(len(classes), float(alpha)), size=int(n))
    tests = max(1, int(round(examples * test_fraction / (1 - test_fraction))))
    out = []
    for pool, size in zip(pools, (int(examples), tests)):
        by_class = [pool[labels[pool] == c] for c in classes]
        present = np.array([len(rows) > 0 for rows in by_class])
        if not present.any():
            raise ValueError("the dataset is too small to hold out a test part")
        p = proportions * present
        p /= p.sum(axis=1, keepdims=True)
        counts = rng.multinomial(size, p)  # (n, classes)
        rows = np.empty((int(n), size), dtype=np.int64)
        start = np.concatenate([np.zeros((int(n), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
        for c, members in enumerate(by_class):
            total = int(counts[:, c].sum())
            if not total:
                continue
            drawn = members[rng.integers(0, len(members), size=total)]
            # the parties' column ranges for class c, filled in one scatter
            owner = np.repeat(np.arange(int(n)), counts[:, c])
            offset = np.arange(total) - np.repeat(np.cumsum(counts[:, c]) - counts[:, c], counts[:, c])
            rows[owner, start[owner, c] + offset] = drawn
        out.append(np.sort(rows, axis=1))
    return out[0], out[1]
