"""What the worker sandbox costs: a worker's start-up and a contained request, with and without it.

Two :class:`fednb.party.sandbox.Sandbox` instances over the same data run in this process, one
whose workers enter the sandbox (:mod:`fednb.party.containment`: user, mount, network and pid
namespaces, a read-only root, dropped privileges) and one whose workers only have the limits
fednb had before the sandbox. Requests alternate between the two, so drift hits both alike.

- start-up: a fresh worker's first request (``run 1``), i.e. fork from the zygote plus, for the
  sandboxed one, entering the namespaces and building its root; a worker serves one coordinator
  for a whole session, so this is paid once per coordinator, not per round;
- a train request of a 1M-parameter model with ``train_cell="pass"`` (the weights go to the
  worker and back through sealed memfds): what each party pays per round under ``fednb party``.

Usage::

    .venv/bin/python bench/containment.py                 # 10 start-ups, 30 requests each way
    .venv/bin/python bench/containment.py --params 10M --requests 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def build(params: int) -> tuple[str, dict[str, np.ndarray]]:
    layers = params // 1_000_000
    source = ("import torch.nn as nn\n"
              f"model = nn.Sequential(*[nn.Linear(1000, 1000, bias=False) for _ in range({layers})])\n")
    rng = np.random.default_rng(0)
    weights = {f"{i}.weight": rng.standard_normal((1000, 1000), dtype=np.float32) for i in range(layers)}
    return source, weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--params", default="1M", help="model size, a multiple of 1M (default 1M)")
    parser.add_argument("--requests", type=int, default=30, help="train requests each way (default 30)")
    parser.add_argument("--startups", type=int, default=10, help="fresh workers each way (default 10)")
    args = parser.parse_args(argv)
    params = int(float(args.params.rstrip("Mm")) * 1_000_000)

    from fednb.data import federated_split, load_dataset
    from fednb.party import Datasets, Split
    from fednb.party.sandbox import Sandbox
    from fednb.wire import Message, new_id

    part = federated_split(load_dataset("synthetic"), 10, "iid", seed=0)[0]
    datasets = Datasets({"train": Split(part.x_train, part.y_train), "test": Split(part.x_test, part.y_test)})
    source, weights = build(params)
    sides = {"sandboxed": Sandbox("bench", datasets, contain=True, threads=1),
             "limits only": Sandbox("bench", datasets, contain=False, threads=1)}
    startup: dict[str, list[float]] = {name: [] for name in sides}
    request: dict[str, list[float]] = {name: [] for name in sides}
    try:
        for sandbox in sides.values():
            sandbox.start()
        level = sides["sandboxed"].containment.level
        if level != "full":
            print(f"the sandbox is not available here ({sides['sandboxed'].containment.reason}); nothing to compare")
            return 1
        for index in range(args.startups):
            for name, sandbox in sides.items():
                started = time.perf_counter()
                reply = sandbox.run(f"coordinator-{index}", Message("run", {"source": "1"}))
                startup[name].append(time.perf_counter() - started)
                assert reply.type == "result", reply.content
        run = new_id()
        for index in range(args.requests + 2):  # two warm-up requests each way
            for name, sandbox in sides.items():
                message = Message("train", {"source": source, "train_cell": "pass", "config": {}, "run": run},
                                  round=index + 1, arrays=weights)
                started = time.perf_counter()
                reply = sandbox.run("coordinator", message)
                if index >= 2:
                    request[name].append(time.perf_counter() - started)
                assert reply.type == "result", reply.content
    finally:
        for sandbox in sides.values():
            sandbox.stop()

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    print(f"worker sandbox cost ({args.params} parameters; medians; requests alternate between the two)")
    print(f"{'':>14} | {'worker start-up ms':>18} | {'train request ms':>16}")
    for name in sides:
        print(f"{name:>14} | {ms(startup[name]):>18.1f} | {ms(request[name]):>16.1f}")
    ratio = ms(request["sandboxed"]) / ms(request["limits only"])
    print(f"a contained request with the sandbox: {ratio:.3f}× without it (target ≤ 1.10×: "
          f"{'met' if ratio <= 1.10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
