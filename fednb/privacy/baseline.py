"""The centralized anchor for federated DP: the same model trained with Opacus DP-SGD on the parties' pooled data.

A federated DP-SGD run is judged against this one at the same ε and δ: every party's training
records pooled into one set (one sampling rate, batch size / pooled examples), as many epochs
as each party trained in all, the noise calibrated for that whole run with the same accountant,
and the accuracy measured on the parties' pooled test splits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fednb.privacy.accountant import calibrate
from fednb.privacy.dpsgd import fit_private, planned_steps, sample_rate_for
from fednb.wire.config import check_config


def pooled_accuracy(parts: Sequence[Any], source: str, config: Mapping[str, Any], *, epsilon: float,
                    delta: float = 1e-5, max_grad_norm: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """(test accuracy, noise multiplier) of ``source``'s model trained on the pooled ``parts`` (each with
    ``x_train``, ``y_train``, ``x_test``, ``y_test``) for ``config["epochs"]`` epochs; ``epsilon`` may be
    ``math.inf`` for plain (non-private) training of the same model."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fednb.party.training import evaluate, fit

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))

    train = tensors(np.concatenate([p.x_train for p in parts]), np.concatenate([p.y_train for p in parts]))
    test = tensors(np.concatenate([p.x_test for p in parts]), np.concatenate([p.y_test for p in parts]))
    torch.manual_seed(seed)
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - the caller's own model source, as fednb.demo builds its model
    model = namespace["model"]
    settings = check_config({"optimizer": "sgd", "momentum": 0.9, "loss": "cross_entropy", "seed": seed,
                             **dict(config)})
    if math.isinf(epsilon):
        fit(model, DataLoader(train, batch_size=int(settings["batch_size"]), shuffle=True,
                              generator=torch.Generator().manual_seed(seed)), settings)
        noise = 0.0
    else:
        rate = sample_rate_for(int(settings["batch_size"]), len(train))
        noise = calibrate(epsilon, delta, rate, planned_steps(rate, int(settings["epochs"])))
        fit_private(model, train, settings, noise_multiplier=noise, max_grad_norm=max_grad_norm, sample_rate=rate)
    metrics, _examples = evaluate(model, DataLoader(test, batch_size=256), "cross_entropy")
    return float(metrics["accuracy"]), noise
