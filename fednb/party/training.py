"""The built-in local loop a party runs for ``train`` and ``evaluate`` requests.

Plain supervised learning: mini-batches from the party's train split, SGD or Adam, cross-
entropy (classification) or mean squared error (regression), with FedProx's proximal term
(Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) when ``mu > 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fednb.party.execution import LOOP_NAME, LOOP_VERSION  # noqa: F401 - the loop's identity lives beside code_hash
from fednb.wire.config import LOSSES, OPTIMIZERS, TRAIN_SETTINGS, check_config  # noqa: F401 - the loop's settings


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
