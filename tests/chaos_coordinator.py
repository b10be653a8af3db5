"""The chaos run's coordinator process (``python -m tests.chaos SPEC``), and the training cell it sends.

Part of the chaos harness of tests/chaos.py: it prints one JSON line per event for the harness to read.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tests.chaos_processes import ROOT

#: A fixed random projection of a model's state, in float64; the same text runs at the parties.
PROJECT = """
def project(model):
    import numpy as np
    flat = np.concatenate([v.detach().cpu().numpy().astype(np.float64).ravel() for v in model.state_dict().values()])
    return float(flat @ np.random.default_rng(20240607).standard_normal(flat.size))
"""
#: The parties' training cell: plain SGD, reporting the round it was sent and what it received and sent.
CELL = PROJECT + """
import torch
w0 = project(model)
sent_for = torch.initial_seed() - config['seed']
opt = torch.optim.SGD(model.parameters(), lr=config['lr'])
for x, y in train:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
report(round=sent_for, w0=w0, w1=project(model), loss=loss)
"""


def project(model: Any) -> float:
    namespace: dict[str, Any] = {}
    exec(PROJECT, namespace)  # noqa: S102 - our own text, the one the parties run
    return float(namespace["project"](model))


# -- the coordinator process --------------------------------------------------------------------------------

def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def coordinate(spec: dict[str, Any]) -> int:
    """The coordinator: train to the last round, continuing from the checkpoint after every RoundError."""
    emit("start", pid=os.getpid())
    sys.path.insert(0, str(ROOT))
    import fednb
    from fednb.errors import RoundError
    from fednb.federation import checkpoint as ckpt
    from fednb.federation.events import RoundAggregated
    from tests.conftest import MLP, build

    path, min_parties = Path(spec["checkpoint"]), spec["min_parties"]
    if spec.get("warm_up"):
        # One round at every party with all the time it needs, before the faults start: a worker's first
        # request (a fresh process's first torch steps) is slower than the round timeout when eight start
        # at once, and a cancel at the deadline kills that worker, so without this round 1 never ends.
        with fednb.connect(spec["parties"], timeout=120) as fed:
            fed.train(build(seed=spec["model_seed"]), MLP, rounds=1, train_cell=CELL, evaluate_every=0,
                      min_parties=len(spec["parties"]), round_timeout=300)
        emit("warm", seconds=fed.history.rounds[-1].seconds)
        return 0
    with fednb.connect(spec["parties"], timeout=spec["connect_timeout"], require_all=False) as fed:
        emit("connected", online=fed._connections.online())

        def late() -> dict[str, int]:
            return {name: link["late"] for name, link in fed._connections.snapshot().items()}

        def on_event(event: object) -> None:
            if isinstance(event, RoundAggregated):
                record = fed.history.rounds[-1]  # appended (and checkpointed) before the event
                emit("round", round=event.round, rss_kb=rss_kb(), proj=project(model), late=late(),
                     parties=sorted(record.parties), dropped=record.dropped)

        model = build(seed=spec["model_seed"])
        fed.subscribe(on_event)
        while True:
            saved = ckpt.load(path) if path.exists() else None
            emit("train", next_round=saved.round + 1 if saved else 1, attempt=saved.attempt + 1 if saved else 0)
            try:
                fed.train(model, MLP, rounds=spec["rounds"], checkpoint=path, min_parties=min_parties,
                          round_timeout=spec["round_timeout"], train_cell=CELL, evaluate_every=0, lr=0.05,
                          batch_size=16, seed=7)
                break
            except RoundError as exc:
                emit("aborted", round=exc.round, message=str(exc), dropped=exc.dropped, late=late())
                time.sleep(0.5)
                deadline = time.monotonic() + 5.0  # give a moment for parties to come back, as a user would
                while len(fed._connections.online()) < min_parties and time.monotonic() < deadline:
                    time.sleep(0.1)
        emit("done", late=late(), rss_kb=rss_kb(), proj=project(model))
    return 0
