"""Simulations of many parties: the pool backend at 100, 1,000 and 10,000 virtual parties.

Each cell (dataset × parties) runs in a fresh interpreter, so that its peak memory is its own:
``fednb.simulate(N, dataset, backend="pool", workers=2, examples_per_party=128)`` (Dirichlet
α = 0.5 label skew, rows drawn with replacement), then ``train(..., parties_per_round=100)``
of a small MLP (one hidden layer of 32), one local epoch of SGD (lr 0.05, batch 32). Reported:

- ready: seconds from ``simulate()`` to a connected federation (host start, data, fork, welcome);
- round: the median wall time of a round, from one round's aggregate to the next (everything the
  coordinator does per round, sampling and events included), over ``--rounds`` after one warm-up
  round; and "train", the median over rounds of the busiest worker's summed party training time
  (what no scheduling can save);
- memory: the coordinator's peak RSS; the largest sum of RSS over every process (coordinator, host,
  workers), sampled every 0.2 s as the Flower anchor samples its process tree (shared pages count
  in every process that maps them); and the sum of proportional set sizes at the end (each shared
  page counted once).

Anchors measured in the same run: one process per party (``backend="process"``, each party given
the same rows as its own arrays) at 100 parties,
and Flower 1.42's Ray simulation with the same setup (``bench/flower_anchor.py`` in its own
environment, ``bench/.flower-venv``, made by ``bench/flower_setup.sh``; ``--no-flower`` skips it).

Usage::

    .venv/bin/python bench/simulation_scale.py                    # 100, 1,000, 10,000 on synthetic and digits
    .venv/bin/python bench/simulation_scale.py --parties 1000 --datasets synthetic --rounds 5 --no-flower
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOWER_PYTHON = HERE / ".flower-venv" / "bin" / "python"
PER_ROUND = 100
EXAMPLES = 128


def _kib(pid: int, path: str, key: str) -> int:
    """One ``key:`` field (kB) of ``/proc/PID/<path>``; 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/{path}", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler:
    """The largest sum of RSS over ``pids`` seen, sampled every 0.2 s (as the Flower anchor samples its tree)."""

    def __init__(self, pids: list[int]) -> None:
        import threading

        self.pids, self.peak_kib = pids, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kib = max(self.peak_kib, sum(_kib(pid, "status", "VmRSS:") for pid in self.pids))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def cell(parties: int, dataset: str, rounds: int, backend: str) -> dict:
    """One measurement in this process (started fresh by :func:`main`)."""
    import torch

    import fednb
    from fednb.federation.events import PartyDone, RoundAggregated

    features, classes = {"synthetic": (20, 4), "digits": (64, 10)}[dataset]
    source = (f"import torch.nn as nn\nmodel = nn.Sequential(nn.Linear({features}, 32), nn.ReLU(), "
              f"nn.Linear(32, {classes}))\n")
    started = time.perf_counter()
    if backend == "pool":
        fed = fednb.simulate(parties, dataset=dataset, partition="dirichlet", alpha=0.5, seed=0, timeout=600,
                             backend="pool", workers=2, examples_per_party=EXAMPLES)
    else:  # the same rows, one process per party: each party's own arrays (its test rows held out again)
        from fednb.data import load_dataset, sample_population

        data = load_dataset(dataset, seed=0)
        train, test = sample_population(data.y, parties, EXAMPLES, alpha=0.5, seed=0)
        rows = [list(a) + list(b) for a, b in zip(train, test)]
        fed = fednb.simulate(data={f"party-{k}": {"x": data.x[r], "y": data.y[r]} for k, r in enumerate(rows)},
                             seed=0, timeout=600)
    ready = time.perf_counter() - started
    try:
        host = fed.simulation
        workers = {name: i for i, w in enumerate(host.workers) for name in w["parties"]}
        stamps: list[float] = []
        busy: dict[int, dict[int, float]] = {}

        def on_event(event: object) -> None:
            if isinstance(event, RoundAggregated):
                stamps.append(time.perf_counter())
            elif isinstance(event, PartyDone):
                per_worker = busy.setdefault(event.round, {})
                worker = workers.get(event.party, hash(event.party))
                per_worker[worker] = per_worker.get(worker, 0.0) + event.seconds

        fed.subscribe(on_event)
        sampler = Sampler([os.getpid(), *host.pids])
        namespace: dict = {}
        exec(source, namespace)  # noqa: S102 - the bench's own model source
        model = namespace["model"]
        torch.manual_seed(0)
        history = fed.train(model, source, rounds=rounds + 1, parties_per_round=min(PER_ROUND, parties), lr=0.05,
                            epochs=1, batch_size=32, evaluate_every=0)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # the first round is the warm-up
        train = [max(busy[r.round].values()) for r in list(history)[1:] if r.round in busy]
        peak_kib = sampler.stop()
        # shared pages (torch, the dataset: forked copy-on-write) count once: proportional set sizes
        pss_kib = sum(_kib(pid, "smaps_rollup", "Pss:") for pid in [os.getpid(), *host.pids])
        accuracy = history[-1].metrics.get("accuracy")
    finally:
        fed.close()
    return {"framework": f"fednb {backend}", "parties": parties, "dataset": dataset, "ready_s": ready,
            "median_round_s": statistics.median(gaps), "median_train_s": statistics.median(train) if train else None,
            "coordinator_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_mb": peak_kib / 1024, "pss_mb": pss_kib / 1024, "accuracy": accuracy}


def _run(command: list[str], timeout: float) -> dict | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  timed out: {' '.join(command[-8:])}", file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def flower(parties: int, dataset: str, rounds: int) -> dict | None:
    if not FLOWER_PYTHON.exists():
        setup = HERE / "flower_setup.sh"
        print("  setting up the Flower anchor environment (bench/flower_setup.sh) ...", file=sys.stderr)
        if subprocess.run(["bash", str(setup)], check=False).returncode != 0:
            return None
    return _run([str(FLOWER_PYTHON), str(HERE / "flower_anchor.py"), "--parties", str(parties), "--dataset", dataset,
                 "--rounds", str(rounds + 1), "--per-round", str(min(PER_ROUND, parties)), "--examples", str(EXAMPLES),
                 "--actors", "2"], timeout=1800)


def _fmt(value: object, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--parties", default="100,1000,10000")
    parser.add_argument("--datasets", default="synthetic,digits")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per cell (after one warm-up)")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower anchor")
    parser.add_argument("--cell", nargs=3, metavar=("PARTIES", "DATASET", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(int(args.cell[0]), args.cell[1], args.rounds, args.cell[2])), flush=True)
        return
    env_python = sys.executable
    rows = []
    for dataset in args.datasets.split(","):
        for parties in (int(p) for p in args.parties.split(",")):
            runs = [("pool", parties)] + ([("process", parties)] if parties <= 100 else [])
            for backend, n in runs:
                print(f"fednb {backend}: {n} parties on {dataset} ...", file=sys.stderr)
                result = _run([env_python, __file__, "--rounds", str(args.rounds), "--cell", str(n), dataset, backend],
                              timeout=1800)
                if result:
                    rows.append(result)
            if not args.no_flower:
                print(f"flower: {parties} parties on {dataset} ...", file=sys.stderr)
                result = flower(parties, dataset, args.rounds)
                if result:
                    rows.append(result)
    print(f"\n{PER_ROUND} parties sampled per round, {EXAMPLES} examples each, one epoch; 2 pool workers / 2 Ray "
          f"actors; {os.cpu_count()} cores\n")
    print("| framework | dataset | parties | ready s | round s (median) | train s | coordinator MB | "
          "all processes: peak RSS sum MB | PSS sum MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['framework']} | {row['dataset']} | {row['parties']:,} | {_fmt(row['ready_s'], 1)} | "
              f"{_fmt(row['median_round_s'])} | {_fmt(row.get('median_train_s'))} | "
              f"{_fmt(row.get('coordinator_rss_mb'), 0)} | {_fmt(row.get('peak_rss_mb'), 0)} | "
              f"{_fmt(row.get('pss_mb'), 0)} |")


if __name__ == "__main__":
    main()
