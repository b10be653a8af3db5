"""Accuracy against ε, federated DP-SGD against centralized DP-SGD on the pooled data, and what DP costs a round.

One simulation of 4 parties (``fednb.simulate``, digits, iid, real party processes on ipc) trains
the same MLP for each ε in ``--epsilons`` with ``dp=fednb.DPSGD(target_epsilon=ε)`` over the whole
run (δ = 1e-5), and without DP for ε = inf; the anchor, measured in the same run, is Opacus DP-SGD
on the union of the parties' training sets at the same ε and the same number of epochs
(:func:`fednb.privacy.baseline.pooled_accuracy`). A last row trains DP-FedAvg under secure
aggregation (noise at the parties) and reports the party-level ε it spent.

The cost column is the median round's seconds with DP-SGD divided by the median plain round of
the same configuration, in the same simulation.

Usage::

    .venv/bin/python bench/privacy.py
    .venv/bin/python bench/privacy.py --epsilons 1,3,8,inf --rounds 10 --epochs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

MODEL = "import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))\n"


def build(seed: int = 0):  # -> torch.nn.Module
    import torch

    torch.manual_seed(seed)
    namespace: dict[str, object] = {}
    exec(MODEL, namespace)
    return namespace["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2, help="runs per ε (means are reported)")
    args = parser.parse_args()

    import fednb
    from fednb.data import federated_split, load_dataset
    from fednb.privacy.baseline import pooled_accuracy

    parts = federated_split(load_dataset("digits", seed=0), 4, "iid", seed=0, test_fraction=0.2)
    train = {"rounds": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "evaluate_every": args.rounds}
    print(f"# {os.cpu_count()} cores; 4 parties, digits iid, {args.rounds} rounds × {args.epochs} local epochs, "
          f"batch {args.batch_size}, lr {args.lr}; δ = 1e-5; means of {args.repeats} runs")
    print(f"{'epsilon':>8} {'federated':>10} {'pooled':>8} {'gap':>7} {'noise':>7} {'s/round':>8} {'cost':>6}")
    with fednb.simulate(4, dataset="digits", partition="iid", seed=0) as fed:
        plain: list[float] = []
        # the plain rounds first: the anchor of the cost column
        for epsilon in sorted((float(e) for e in args.epsilons.split(",")), key=lambda e: not math.isinf(e)):
            accuracy, anchor, seconds = [], [], []
            noise = 0.0
            for repeat in range(args.repeats):
                dp = None if math.isinf(epsilon) else fednb.DPSGD(target_epsilon=epsilon)
                history = fed.train(build(repeat), MODEL, dp=dp, **train)
                accuracy.append(history[-1].evaluation["accuracy"])
                rounds = list(history)[-args.rounds:]
                seconds += [r.seconds for r in rounds]
                noise = rounds[-1].privacy.get("noise_multiplier", 0.0)
                pooled, _z = pooled_accuracy(parts, MODEL, {"epochs": args.rounds * args.epochs,
                                                            "batch_size": args.batch_size, "lr": args.lr},
                                             epsilon=epsilon, seed=repeat)
                anchor.append(pooled)
            if math.isinf(epsilon):
                plain = seconds
            per_round = statistics.median(seconds)
            cost = f"{per_round / statistics.median(plain):>5.2f}x" if plain else "   - "
            fa, pa = statistics.mean(accuracy), statistics.mean(anchor)
            print(f"{epsilon:>8g} {fa:>10.3f} {pa:>8.3f} {100 * (fa - pa):>+6.1f} {noise:>7.3f} {per_round:>8.2f} "
                  f"{cost}", flush=True)
        started = time.perf_counter()
        history = fed.train(build(), MODEL, dp=fednb.DPFedAvg(clip=0.5, noise_multiplier=0.5, noise_at="parties"),
                            secure_aggregation=True, **train)
        spent = max(p.epsilon_spent for p in fed.privacy().values())
        print(f"DP-FedAvg under secure aggregation (clip 0.5, noise 0.5, noise at the parties): accuracy "
              f"{history[-1].evaluation['accuracy']:.3f}, party-level ε (this run and those before) {spent:.3g}, "
              f"{time.perf_counter() - started:.1f} s")
    if plain:
        print("cost: the median DP-SGD round over the median plain round (ε = inf), same configuration")


if __name__ == "__main__":
    main()
