"""The built-in local loop's settings as they travel in a ``train`` or ``evaluate`` request.

Pure Python, so that the coordinator checks a config before any party sees it and the
party checks it again on receipt, with the same bounds and the same words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")

#: Settings of the built-in loop, with their defaults and (type, low, high) bounds.
TRAIN_SETTINGS: dict[str, tuple[Any, type, float, float]] = {
    "epochs": (1, int, 1, 10_000),
    "batch_size": (16, int, 1, 10_000_000),
    "lr": (0.05, float, 0.0, 1e6),
    "momentum": (0.9, float, 0.0, 1.0),
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
