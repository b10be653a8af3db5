"""``fednb demo``: a federation of local parties against centralized training on pooled data.

Four parties hold label-skewed (Dirichlet α = 0.5) slices of the digits dataset; a small
MLP is trained with FedAvg, one line per round; then the same model, from the same
initial weights, is trained centrally on the union of the parties' data for comparison.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

MODEL_SOURCE = """\
import torch.nn as nn
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
"""

SETTINGS: dict[str, Any] = {"lr": 0.05, "epochs": 3, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9}


def _build(seed: int):  # -> torch.nn.Module
    import torch

    torch.manual_seed(seed)
    namespace: dict[str, object] = {}
    exec(MODEL_SOURCE, namespace)  # noqa: S102 - our own constant source
    return namespace["model"]


def centralized(rounds: int, dataset: str, parties: int, alpha: float, seed: int) -> float:
    """Test accuracy of the same model trained on the pooled train splits for as many epochs.

    It runs on one torch thread: batches of 16 through a small MLP are too small to split, and
    torch's default (a thread per core) made this step about ten times slower (34 s against 3 s).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _centralized(rounds, dataset, parties, alpha, seed)
    finally:
        torch.set_num_threads(threads)


def _centralized(rounds: int, dataset: str, parties: int, alpha: float, seed: int) -> float:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fednb.data import federated_split, load_dataset, pooled
    from fednb.party import training

    x_train, y_train, x_test, y_test = pooled(federated_split(load_dataset(dataset, seed=seed), parties, "dirichlet",
                                                              alpha=alpha, seed=seed))
    model = _build(seed)
    config = training.check_config({**SETTINGS, "epochs": rounds * SETTINGS["epochs"], "seed": seed})
    torch.manual_seed(seed)
    train = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                       batch_size=config["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(seed))
    training.fit(model, train, config)
    test = DataLoader(TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)), batch_size=512)
    metrics, _ = training.evaluate(model, test, "cross_entropy")
    return metrics["accuracy"]


def run(*, parties: int = 4, rounds: int = 15, dataset: str = "digits", alpha: float = 0.5, seed: int = 0,
        out: TextIO) -> dict[str, float]:
    """Run the demo, writing progress to ``out``; returns the headline numbers."""
    import fednb
    from fednb.federation.progress import RoundLines

    began = time.monotonic()
    print(f"fednb demo: {parties} parties, {dataset}, Dirichlet alpha={alpha}, {rounds} rounds of FedAvg", file=out)
    with fednb.simulate(parties, dataset=dataset, partition="dirichlet", alpha=alpha, seed=seed) as fed:
        ready = time.monotonic() - began
        sizes = ", ".join(f"{row.name}: {row.examples}" for row in fed.status())
        print(f"{parties} party processes ready in {ready:.1f} s ({sizes} training examples)", file=out)
        fed.subscribe(RoundLines(out))
        model = _build(seed)
        history = fed.train(model, MODEL_SOURCE, rounds=rounds, strategy="fedavg", seed=seed, **SETTINGS)
        federated = history.metric("accuracy")[-1]
    trained = time.monotonic() - began
    print(f"training the same model centrally on the pooled data for comparison ({rounds * SETTINGS['epochs']} "
          "epochs)...", file=out, flush=True)
    central = centralized(rounds, dataset, parties, alpha, seed)
    total = time.monotonic() - began
    print(f"federated accuracy   {federated:.4f}", file=out)
    print(f"centralized accuracy {central:.4f}  (same model and data, pooled)", file=out)
    print(f"gap {100 * (central - federated):+.1f} points; federated run {trained:.1f} s, "
          f"centralized {total - trained:.1f} s, whole demo {total:.1f} s", file=out)
    return {"federated": federated, "centralized": central, "seconds": total}
