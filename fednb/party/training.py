"""The built-in local loop a party runs for ``train`` and ``evaluate`` requests.

Plain supervised learning: mini-batches from the party's train split, SGD or Adam, cross-
entropy (classification) or mean squared error (regression), with FedProx's proximal term
(Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) when ``mu > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fednb.party.execution import LOOP_NAME, LOOP_VERSION  # noqa: F401 - the loop's identity lives beside code_hash

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")

#: Settings of the built-in loop, with their defaults and (type, low, high) bounds.
TRAIN_SETTINGS: dict[str, tuple[Any, type, float, float]] = {
    "epochs": (1, int, 1, 10_000),
    "batch_size": (32, int, 1, 10_000_000),
    "lr": (0.01, float, 0.0, 1e6),
    "momentum": (0.0, float, 0.0, 1.0),
    "weight_decay": (0.0, float, 0.0, 1e6),
    "mu": (0.0, float, 0.0, 1e6),
    "seed": (0, int, 0, 2**63 - 1),
    "max_steps": (0, int, 0, 10**12),
}


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a train/evaluate config from the wire; unknown keys are kept for custom cells.

    Returns the config with defaults filled in. Raises ValueError naming the bad setting.
    """
    checked: dict[str, Any] = dict(config)
    for key, (default, kind, low, high) in TRAIN_SETTINGS.items():
        value = config.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {key!r} must be a number, got {type(value).__name__}")
        if kind is int and not float(value).is_integer():
            raise ValueError(f"config {key!r} must be an integer, got {value!r}")
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"config {key!r} = {value!r} is outside {low}..{high}")
        checked[key] = kind(value)
    optimizer = config.get("optimizer") or "sgd"
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"config 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    loss = config.get("loss") or "cross_entropy"
    loss = loss.replace("-", "_") if isinstance(loss, str) else loss
    if loss not in LOSSES:
        raise ValueError(f"config 'loss' must be one of {', '.join(LOSSES)}, got {config.get('loss')!r}")
    checked["optimizer"], checked["loss"] = optimizer, loss
    return checked


def loss_and_hits(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> tuple[torch.Tensor, int | None]:
    """Mean loss of a batch and, for classification, the number of correct predictions."""
    if loss == "cross_entropy":
        if outputs.ndim != 2 or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"cross-entropy needs outputs of shape [batch, classes] and integer labels; "
                f"got outputs {tuple(outputs.shape)} and labels of {targets.dtype}"
            )
        return F.cross_entropy(outputs, targets.long()), int((outputs.argmax(dim=1) == targets).sum())
    if outputs.ndim == 2 and outputs.shape[1] == 1 and targets.ndim == 1:
        outputs = outputs.squeeze(1)
    if outputs.shape != targets.shape:
        raise ValueError(f"mse needs outputs shaped like the targets; got {tuple(outputs.shape)} vs {tuple(targets.shape)}")
    return F.mse_loss(outputs, targets.to(outputs.dtype)), None


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model lives: a training cell may have moved it to a GPU, and the built-in
    loops then feed it batches there."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def fit(model: torch.nn.Module, loader: DataLoader, config: Mapping[str, Any]) -> dict[str, float]:
    """Train ``model`` in place for ``config['epochs']`` passes; mean loss (and accuracy)."""
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if config["optimizer"] == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"])
    else:
        optimizer = torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    mu = config["mu"]
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    model.train()
    total_loss, hits, seen, steps = 0.0, 0, 0, 0
    for _ in range(config["epochs"]):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss, correct = loss_and_hits(model(inputs), targets, config["loss"])
            objective = loss
            if mu > 0:
                objective = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            objective.backward()
            optimizer.step()
            batch = len(targets)
            total_loss += float(loss.detach()) * batch
            hits += correct or 0
            seen += batch
            steps += 1
            if config["max_steps"] and steps >= config["max_steps"]:
                break
        if config["max_steps"] and steps >= config["max_steps"]:
            break
    metrics = {"loss": total_loss / max(seen, 1)}
    if config["loss"] == "cross_entropy":
        metrics["accuracy"] = hits / max(seen, 1)
    return metrics


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, loss: str) -> tuple[dict[str, float], int]:
    """Mean loss (and accuracy) of ``model`` on ``loader``, with the number of examples."""
    model.eval()
    total_loss, hits, seen = 0.0, 0, 0
    device = model_device(model)
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        batch_loss, correct = loss_and_hits(model(inputs), targets, loss)
        total_loss += float(batch_loss) * len(targets)
        hits += correct or 0
        seen += len(targets)
    metrics = {"loss": total_loss / max(seen, 1)}
    if loss == "cross_entropy":
        metrics["accuracy"] = hits / max(seen, 1)
    return metrics, seen
