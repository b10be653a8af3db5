"""Vertical learning on FATE's default_credit: PSI, then hetero LR under Paillier (1024, 2048 bits) and in plaintext.

One simulation of two real party processes (``fednb.simulate(data=...)``, ipc): ``guest``
holds ``default_credit_hetero_guest.csv`` (id, label y, 13 features) and ``host``
``default_credit_hetero_host.csv`` (id, 10 features), 30,000 rows each. The coordinator aligns
them by ECDH-PSI (``fed.vertical(id_column="id", label_party="guest")``, timed around the call;
ids/s counts both tables' ids, as ``bench/psi.py`` does), splits the aligned rows
(``vfl.split``), and trains hetero logistic regression (Hardy et al. with masked gradients)
for ``--epochs`` epochs in plaintext mode (``encrypted=False``: the same algebra on floats,
the anchor measured in the same run) and under Paillier encryption at each of ``--key-bits``.
Each row reports the mean seconds per epoch, that over the plaintext epoch, the seconds of
``train_logistic`` outside the epochs (``setup``: the Paillier key generation, the start and
finish steps), and the test metrics the label party
computes (``vfl.evaluate``).

The last row is scikit-learn's ``LogisticRegression`` on the joined table (guest and host
columns side by side, rows matched by id) with the same split and regularisation
(C = 1 / (l2 · n_train); scikit-learn minimises C·Σ loss + ½|w|², fednb (1/n)·Σ loss +
½·λ·|w|², and neither penalises the intercept). The split is reproduced here as the parties
draw it: the aligned rows ordered by their ids' canonical bytes (decimal text), permuted with
``numpy.random.default_rng(seed)``, the first round(n · fraction) the test split. As a check,
the plaintext model's test predictions (``vfl.predict``) are scored against the labels in that
order and must give the label party's AUC.

``--psi-only`` aligns two synthetic tables of ``--ids`` ids each (default 1,000,000), half of
them in common, through the same parties: written to a temporary directory as CSV, the label
party's with id, label and one feature column, the feature party's with id and one feature, the
rows in random order. It reports ids/s and ids/s per core (``os.cpu_count()``) against issue
12's target (20,000 ids/s per core) and FATE 2.x's ≈ 2,000.

Usage::

    .venv/bin/python bench/vertical.py                                   # 2 epochs; 1024 and 2048 bits
    .venv/bin/python bench/vertical.py --epochs 1 --key-bits 1024
    .venv/bin/python bench/vertical.py --psi-only                        # 1M × 1M ids, 50 % overlap
    .venv/bin/python bench/vertical.py --psi-only --ids 20000
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"
TARGET_PER_CORE = 20_000  # issue 12: ids/s per core
FATE_PER_CORE = 2_000  # FATE 2.x: 100 M ids in 51 min on 16 cores


def read_table(path: Path, label: str | None) -> tuple[list[bytes], np.ndarray, np.ndarray | None]:
    """(ids as canonical bytes, features as the parties read them (float32), labels or None) of a FATE CSV."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    at_id = header.index("id")
    at_label = header.index(label) if label is not None and label in header else None
    features = [i for i in range(len(header)) if i not in (at_id, at_label)]
    ids = [row[at_id].encode() for row in body]
    x = np.array([[float(row[i]) for i in features] for row in body], dtype=np.float32)
    y = None if at_label is None else np.array([int(row[at_label]) for row in body], dtype=np.int64)
    return ids, x, y


def joined(guest: Path, host: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(guest features, labels, host features) of the ids both tables hold, ordered by their canonical bytes."""
    ids_g, xg, y = read_table(guest, "y")
    ids_h, xh, _ = read_table(host, None)
    assert y is not None
    at_g = {k: i for i, k in enumerate(ids_g)}
    at_h = {k: i for i, k in enumerate(ids_h)}
    common = sorted(set(at_g) & set(at_h))
    rows_g = np.array([at_g[k] for k in common], dtype=np.int64)
    rows_h = np.array([at_h[k] for k in common], dtype=np.int64)
    return xg[rows_g].astype(np.float64), y[rows_g], xh[rows_h].astype(np.float64)


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions into the aligned rows, as every party draws them."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(order[cut:]), np.sort(order[:cut])


def sklearn_metrics(xg: np.ndarray, y: np.ndarray, xh: np.ndarray, train: np.ndarray, test: np.ndarray,
                    l2: float) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x = np.hstack([xg, xh])
    model = LogisticRegression(C=1 / (l2 * len(train)), max_iter=10_000).fit(x[train], y[train])
    p = model.predict_proba(x[test])[:, 1]
    return {"auc": float(roc_auc_score(y[test], p)), "accuracy": float(np.mean((p >= 0.5) == y[test]))}


def show_progress(event: Any) -> None:
    """Epoch lines on stderr, so that a long encrypted run shows it is moving and stdout keeps the table."""
    from fednb.federation.events import VerticalProgress

    if isinstance(event, VerticalProgress) and event.stage == "epoch":
        print(f"  … {event.message}", file=sys.stderr, flush=True)


def align(fed: Any, timeout: float) -> tuple[Any, float]:
    started = time.perf_counter()
    vfl = fed.vertical(id_column="id", label_party="guest", timeout=timeout)
    return vfl, time.perf_counter() - started


def train_run(args: argparse.Namespace) -> None:
    import fednb
    from sklearn.metrics import roc_auc_score

    bits = [int(b) for b in args.key_bits.split(",") if b.strip()]
    guest, host = Path(args.guest), Path(args.host)
    cores = os.cpu_count() or 1
    settings = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "l2": args.l2,
                "optimizer": args.optimizer, "seed": args.seed}
    xg, y, xh = joined(guest, host)
    train, test = split(len(y), args.test_fraction, args.seed)
    started = time.perf_counter()
    with fednb.simulate(data={"guest": str(guest), "host": str(host)}, id_column="id", label="y",
                        timeout=args.timeout) as fed:
        up = time.perf_counter() - started
        fed.events.subscribe(show_progress)
        vfl, psi_seconds = align(fed, args.timeout)
        sizes = vfl.split(test_fraction=args.test_fraction, seed=args.seed)
        if vfl.size != len(y) or sizes != {"train": len(train), "test": len(test)}:
            raise SystemExit(f"the parties aligned {vfl.size} rows split {sizes}; the joined table here has "
                             f"{len(y)} rows split {len(train)}/{len(test)}")
        total_ids = sum(vfl.sizes.values())
        print(f"# {cores} cores; {guest.name} ({xg.shape[1]} features + y) and {host.name} ({xh.shape[1]} "
              f"features), {', '.join(f'{p} {n:,}' for p, n in vfl.sizes.items())} rows; parties up in {up:.1f} s")
        print(f"# PSI: {vfl.size:,} rows aligned in {psi_seconds:.2f} s: {total_ids / psi_seconds:,.0f} ids/s, "
              f"{total_ids / psi_seconds / cores:,.0f} per core (both tables' ids over wall time)")
        print(f"# split {sizes['train']:,} train / {sizes['test']:,} test (seed {args.seed}); hetero LR "
              f"{args.optimizer}, lr {args.lr}, batch {args.batch_size}, l2 {args.l2}, {args.epochs} epoch(s)")
        print(f"{'mode':<14} {'s/epoch':>8} {'ratio':>7} {'setup':>7} {'AUC':>7} {'acc':>7} {'KS':>7} "
              f"{'logloss':>8} {'loss':>8}", flush=True)
        plain = 0.0
        reference = sklearn_metrics(xg, y, xh, train, test, args.l2)
        for key_bits in [0, *bits]:
            encrypted = key_bits > 0
            t = time.perf_counter()
            model = vfl.train_logistic(encrypted=encrypted, key_bits=key_bits or 2048, **settings)
            per_epoch = float(np.mean(model.seconds))
            setup = time.perf_counter() - t - sum(model.seconds)
            scores = vfl.evaluate(model)
            if not encrypted:
                plain = per_epoch
                check = float(roc_auc_score(y[test], vfl.predict(model)))
                if abs(check - scores["auc"]) > 1e-9:
                    raise SystemExit(f"the split reproduced here is not the parties': AUC {check} here, "
                                     f"{scores['auc']} at the label party")
            name = f"paillier-{key_bits}" if encrypted else "plaintext"
            ratio = f"{per_epoch / plain:>6.1f}x" if encrypted else f"{'1.0x':>7}"
            print(f"{name:<14} {per_epoch:>8.2f} {ratio} {setup:>7.1f} {scores['auc']:>7.4f} "
                  f"{scores['accuracy']:>7.4f} {scores['ks']:>7.4f} {scores['logloss']:>8.4f} "
                  f"{model.losses[-1]:>8.4f}", flush=True)
        print(f"{'scikit-learn':<14} {'-':>8} {'-':>7} {'-':>7} {reference['auc']:>7.4f} "
              f"{reference['accuracy']:>7.4f}")
    print("s/epoch: mean over the epochs; setup: key generation, start and finish steps; ratio: over the "
          "plaintext epoch, same run; loss: the last epoch's Taylor loss (decrypted by the coordinator); "
          "scikit-learn: LogisticRegression on the joined table, same split, C = 1/(l2·n_train)")


def write_psi_tables(directory: Path, n: int, seed: int) -> tuple[Path, Path]:
    """guest.csv: ids 0 … n-1, a label, a feature; host.csv: ids n/2 … 3n/2-1, a feature; rows in random order."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, first, header in (("guest", 0, "id,y,x0"), ("host", n // 2, "id,x0")):
        ids = rng.permutation(n) + first
        feature = rng.standard_normal(n)
        columns = [ids, rng.integers(0, 2, n), feature] if name == "guest" else [ids, feature]
        path = directory / f"{name}.csv"
        fmt = ["%d", "%d", "%.6f"] if name == "guest" else ["%d", "%.6f"]
        np.savetxt(path, np.column_stack(columns), fmt=fmt, delimiter=",", header=header, comments="")
        paths.append(path)
    return paths[0], paths[1]


def psi_run(args: argparse.Namespace) -> None:
    import fednb

    n, cores = args.ids, os.cpu_count() or 1
    expected = n - n // 2
    with tempfile.TemporaryDirectory(prefix="fednb-bench-psi-") as directory:
        t = time.perf_counter()
        guest, host = write_psi_tables(Path(directory), n, args.seed)
        written = time.perf_counter() - t
        t = time.perf_counter()
        with fednb.simulate(data={"guest": str(guest), "host": str(host)}, id_column="id", label="y",
                            timeout=args.timeout) as fed:
            up = time.perf_counter() - t
            vfl, seconds = align(fed, args.timeout)
    if vfl.size != expected:
        raise SystemExit(f"the parties aligned {vfl.size} rows; {expected} ids are in common")
    rate = 2 * n / seconds
    print(f"# {cores} cores; two tables of {n:,} ids, {expected:,} in common; CSVs written in {written:.1f} s, "
          f"parties up (tables loaded) in {up:.1f} s")
    print(f"{'ids':>11} {'aligned':>10} {'PSI s':>8} {'ids/s':>10} {'per core':>9} {'target':>7} {'FATE 2.x':>9}")
    print(f"{n:>11,} {vfl.size:>10,} {seconds:>8.2f} {rate:>10,.0f} {rate / cores:>9,.0f} "
          f"{rate / cores / TARGET_PER_CORE:>6.2f}x {rate / cores / FATE_PER_CORE:>8.1f}x")
    print(f"ids/s: both tables' ids (2N) over the wall time of fed.vertical; target: {TARGET_PER_CORE:,} ids/s "
          f"per core (issue 12); FATE 2.x: ≈ {FATE_PER_CORE:,} ids/s per core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guest", default=str(DATA / "default_credit_hetero_guest.csv"))
    parser.add_argument("--host", default=str(DATA / "default_credit_hetero_host.csv"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--key-bits", default="1024,2048", help="comma-separated Paillier key sizes")
    parser.add_argument("--lr", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=240)
    parser.add_argument("--l2", type=float, default=0.01)
    parser.add_argument("--optimizer", choices=["sgd", "rmsprop"], default="sgd")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--psi-only", action="store_true", help="align two synthetic tables of --ids ids only")
    parser.add_argument("--ids", type=int, default=1_000_000, help="ids per table with --psi-only (default 1M)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the parties to start, and per step")
    args = parser.parse_args()
    if args.psi_only:
        if args.ids < 2:
            parser.error("--ids must be at least 2")
        psi_run(args)
    else:
        if args.epochs < 1:
            parser.error("--epochs must be at least 1")
        train_run(args)


if __name__ == "__main__":
    main()
