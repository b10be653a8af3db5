"""Flower 1.42 anchor for bench/simulation_scale.py (run with bench/.flower-venv).

Standalone: numpy + torch + flwr (+ scikit-learn for the digits data); it does
not import fednb.  Set up the environment with ``bash bench/flower_setup.sh``.

Setup, matching fednb's simulation-scale benchmark:
  * ``--parties`` N virtual SuperNodes run by Flower's simulation engine
    (``flwr.simulation.run_simulation`` with a ServerApp / ClientApp, Ray
    backend; ``backend_config`` gives Ray 2 CPUs and each ClientApp 1 CPU, so
    the actor pool has ``--actors`` = 2 actors).
  * FedAvg (``flwr.serverapp.strategy``) with fraction_train = per_round / N
    and min_train_nodes = per_round, so ``--per-round`` (100) ClientApps train
    each round; fraction_evaluate = 0 (no client evaluation).
  * Each client's ``--examples`` (128) training examples are drawn with
    replacement from the dataset under Dirichlet(alpha=0.5) label proportions,
    seeded by (seed, partition id), when its ClientApp runs.
    - digits: ``sklearn.datasets.load_digits`` (1797 x 64, 10 classes),
      pixels divided by 16 -> [0, 1].
    - synthetic: 3000 samples, 4 classes, 20 features; class c is
      N(mu_c, I) with mu_c ~ N(0, 2^2 I) (fixed by the seed).
  * Model nn.Sequential(Linear(features, 32), ReLU, Linear(32, classes));
    one local epoch of SGD, lr 0.05, batch 32.

Measured (printed as one JSON line at the end):
  * ready_s: seconds from the start of this script (before importing torch
    and flwr) until the first ClientApp starts training (clients report
    their start time in their MetricRecord as ``t-start``; the strategy reads
    and removes it).  Flower starts the ServerApp thread *before* it starts
    Ray and the actor pool, so its first ``configure_train`` (reported as
    first_configure_s) comes seconds before anything can run; that wait for
    Ray, the actors and their imports is counted here, not in round 1.
  * round_s: each round's wall time, from entering the strategy's
    ``configure_train`` (node sampling; for round 1, from ready as above) to
    leaving ``aggregate_evaluate`` (the last hook of a round, here with no
    evaluation replies): sampling, sending, the local trainings and FedAvg
    aggregation.  median_round_s is their median.
  * peak_rss_mb: max over samples (every 0.2 s, by a thread reading /proc) of
    the summed RSS of this process and all its descendants (Ray's GCS,
    raylet, workers/actors, ...).  Shared pages count once per process.

The base data set is cached per Ray actor in a small module registered in
``sys.modules``: the ClientApp is pickled by value with every task (it lives
in ``__main__``), so an ordinary global cache would not survive between calls.
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import flwr  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

ALPHA = 0.5


# ---------------------------------------------------------------- data / model
def base_dataset(name: str, seed: int):
    """(X float32, y int64) of the whole data set, cached per process."""
    cache = sys.modules.get("_flower_anchor_cache")
    if cache is None:
        cache = types.ModuleType("_flower_anchor_cache")
        cache.data = {}
        sys.modules["_flower_anchor_cache"] = cache
    key = (name, seed)
    if key not in cache.data:
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x, y = d.data / 16.0, d.target
        else:
            rng = np.random.default_rng(seed)
            means = rng.normal(0.0, 2.0, size=(4, 20))
            y = rng.integers(0, 4, size=3000)
            x = means[y] + rng.normal(size=(3000, 20))
        cache.data[key] = (x.astype(np.float32), y.astype(np.int64))
    return cache.data[key]


def client_examples(name: str, seed: int, pid: int, n: int):
    """n examples drawn with replacement under Dirichlet(ALPHA) label skew."""
    x, y = base_dataset(name, seed)
    classes = int(y.max()) + 1
    rng = np.random.default_rng([seed, pid])
    labels = rng.choice(classes, size=n, p=rng.dirichlet([ALPHA] * classes))
    idx = np.empty(n, dtype=np.int64)
    for c in range(classes):
        where = labels == c
        if where.any():
            idx[where] = rng.choice(np.flatnonzero(y == c), size=int(where.sum()))
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def make_model(features: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))


SHAPES = {"synthetic": (20, 4), "digits": (64, 10)}

# ----------------------------------------------------------------- ClientApp
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    t_start = time.time()
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    name, seed, n = str(cfg["dataset"]), int(cfg["seed"]), int(cfg["examples"])
    pid = int(context.node_config["partition-id"])
    x, y = client_examples(name, seed, pid, n)
    model = make_model(*SHAPES[name])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(n)
    batch = int(cfg["batch-size"])
    loss = torch.zeros(())
    for i in range(0, n, batch):  # one local epoch
        b = order[i : i + batch]
        opt.zero_grad()
        loss = loss_fn(model(x[b]), y[b])
        loss.backward()
        opt.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train_loss": loss.item(), "num-examples": n, "t-start": t_start}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


# ----------------------------------------------------------------- ServerApp
class TimedFedAvg(FedAvg):
    """FedAvg recording, per round: its start, its end and the earliest
    ClientApp start (clients report `t-start`; removed before aggregation)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.first_client: list[float] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.starts.append(time.time())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        t = [m.content["metrics"].pop("t-start") for m in replies if not m.has_error()]
        self.first_client.append(min(t) if t else float("nan"))
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        out = super().aggregate_evaluate(server_round, replies)
        self.ends.append(time.time())
        return out


# -------------------------------------------------------------- RSS sampling
def tree_rss_bytes(root: int) -> int:
    """Summed RSS of `root` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    page, total, todo = os.sysconf("SC_PAGE_SIZE"), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
    return total


class PeakRss(threading.Thread):
    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak, self.stop = interval, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            self.stop.wait(self.interval)


# ---------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parties", type=int, required=True)
    p.add_argument("--dataset", choices=sorted(SHAPES), default="synthetic")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    monitor = PeakRss()
    monitor.start()
    torch.manual_seed(a.seed)
    per_round = min(a.per_round, a.parties)
    strategy = TimedFedAvg(
        fraction_train=per_round / a.parties,
        min_train_nodes=per_round,  # guards against int(N * fraction) rounding down
        min_available_nodes=a.parties,  # round 1 samples from all N registered
        fraction_evaluate=0.0,
    )
    train_config = ConfigRecord(
        {"dataset": a.dataset, "seed": a.seed, "examples": a.examples,
         "lr": 0.05, "batch-size": 32}
    )
    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        model = make_model(*SHAPES[a.dataset])
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=a.rounds,
            train_config=train_config,
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=a.parties,
        backend_config={
            "init_args": {"num_cpus": a.actors, "num_gpus": 0},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        },
    )
    monitor.stop.set()
    monitor.join()
    starts = strategy.starts[:]
    if starts and strategy.first_client:  # round 1 waits for Ray + actors
        ready = max(starts[0], strategy.first_client[0])
        starts[0] = ready
    else:
        ready = starts[0] if starts else None
    rounds = [round(e - s, 3) for s, e in zip(starts, strategy.ends)]
    print(json.dumps({
        "framework": "flower",
        "version": flwr.__version__,
        "parties": a.parties,
        "dataset": a.dataset,
        "per_round": per_round,
        "actors": a.actors,
        "ready_s": round(ready - T0, 3) if ready else None,
        "first_configure_s": round(strategy.starts[0] - T0, 3) if starts else None,
        "round_s": rounds,
        "median_round_s": round(statistics.median(rounds), 3) if rounds else None,
        "peak_rss_mb": round(monitor.peak / 2**20, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
