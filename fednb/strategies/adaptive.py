"""FedAdam, FedYogi and FedAdagrad: an adaptive optimizer on the coordinator.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2. The parties train as in FedAvg; the coordinator
treats the round's example-weighted mean as a pseudo-gradient ``Δ = mean(updates) − x``
and steps, per coordinate::

    m = β1 · m + (1 − β1) · Δ
    v = v + Δ²                                   FedAdagrad
    v = β2 · v + (1 − β2) · Δ²                   FedAdam
    v = v − (1 − β2) · Δ² · sign(v − Δ²)         FedYogi
    x = x + η · m / (√v + τ)

with ``m`` starting at 0 and ``v`` at τ² (the algorithm's ``v₋₁ ≥ τ²``), and no bias
correction (the paper has none). ``server_lr`` is η, ``tau`` the adaptivity τ (the smaller,
the more adaptive). The defaults are the paper's: β1 = 0.9 and β2 = 0.99, fixed in all its
experiments (Section 5); τ = 10⁻³, which worked across its tasks; η = 10⁻² for FedAdam and
FedYogi and 10⁻¹ for FedAdagrad, the server rates most often best in its grids (Appendix D).
FedAdagrad's β1 defaults to 0, which is Adagrad itself; Algorithm 2 allows β1 > 0.

Integer tensors (BatchNorm's ``num_batches_tracked``) take FedAvg's plain mean. ``m`` and
``v`` live on the strategy between rounds and start again when the model's names or shapes
change; :meth:`~FedAdam.state` / :meth:`~FedAdam.load_state` carry them through a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.server_step import (ServerStepAggregation, check_number, float_dtype, pack_state, same_model,
                                          unpack_state)

__all__ = ["FedAdagrad", "FedAdam", "FedYogi", "ServerOptimizer", "adaptive_step", "second_moment"]

Rule = Literal["adagrad", "adam", "yogi"]


def second_moment(rule: Rule, v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """Algorithm 2's ``v_t`` from ``v_{t−1}`` and the pseudo-gradient Δ, as a new array."""
    d2 = np.square(delta)
    if rule == "adagrad":
        return v + d2
    b2 = v.dtype.type(beta2)
    if rule == "adam":
        return b2 * v + (1 - b2) * d2
    if rule == "yogi":
        return v - (1 - b2) * d2 * np.sign(v - d2)
    raise ValueError(f"unknown adaptive rule {rule!r}")


def adaptive_step(rule: Rule, x: np.ndarray, mean: np.ndarray, m: np.ndarray | None, v: np.ndarray | None, *,
                  server_lr: float, beta1: float, beta2: float,
                  tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of Algorithm 2 for one float tensor: ``(new x, new m, new v)``, inputs untouched.

    ``m``/``v`` of None start the moments (0 and τ²). Computed in float32, or in float64 for
    float64 weights; the new weights keep ``x``'s dtype.
    """
    dtype = float_dtype(x.dtype)
    t = dtype.type
    x_acc = x.astype(dtype, copy=False)
    delta = np.subtract(mean, x_acc, dtype=dtype)
    m_prev = np.zeros_like(x_acc) if m is None else m.astype(dtype, copy=False)
    v_prev = np.full_like(x_acc, t(tau) * t(tau)) if v is None else v.astype(dtype, copy=False)
    m_new = t(beta1) * m_prev + (1 - t(beta1)) * delta
    v_new = second_moment(rule, v_prev, delta, beta2)
    x_new = x_acc + t(server_lr) * m_new / (np.sqrt(v_new) + t(tau))
    return x_new.astype(x.dtype, copy=False), m_new, v_new


class ServerOptimizer:
    """Algorithm 2's server step with its moments ``m`` and ``v``, kept between rounds."""

    def __init__(self, rule: Rule, *, server_lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.rule = rule
        self.server_lr = check_number("server_lr", server_lr, 0.0, low_open=True)
        self.beta1 = check_number("beta1", beta1, 0.0, 1.0)
        self.beta2 = check_number("beta2", beta2, 0.0, 1.0)
        self.tau = check_number("tau", tau, 0.0, low_open=True)
        self.reset()

    def reset(self) -> None:
        """Forget the moments, as before the first round."""
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, current: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new weights from ``current`` and the round's mean; updates ``m``, ``v`` and ``steps``."""
        keep = same_model(self.m, current)
        new: dict[str, np.ndarray] = {}
        m: dict[str, np.ndarray] = {}
        v: dict[str, np.ndarray] = {}
        for key, x in current.items():
            if x.dtype.kind != "f":
                new[key] = mean[key]
                continue
            new[key], m[key], v[key] = adaptive_step(
                self.rule, x, mean[key], self.m.get(key) if keep else None, self.v.get(key) if keep else None,
                server_lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        self.m, self.v = m, v
        self.steps = self.steps + 1 if keep else 1
        return new

    def state(self) -> dict[str, Any]:
        return pack_state({"m": self.m, "v": self.v}, self.steps)

    def load_state(self, state: Mapping[str, Any]) -> None:
        slots, steps = unpack_state(state, ("m", "v"))
        if any((v < 0).any() for v in slots["v"].values()):
            raise ValueError("state entries 'v/<tensor>' must be >= 0 (a second moment)")
        self.m, self.v, self.steps = slots["m"], slots["v"], steps

    def options(self) -> str:
        return f"server_lr={self.server_lr!r}, beta1={self.beta1!r}, beta2={self.beta2!r}, tau={self.tau!r}"


class _OnServerOptimizer:
    """What the three strategies share: a round's mean goes through their :class:`ServerOptimizer`."""

    optimizer: ServerOptimizer

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return ServerStepAggregation(current, self.optimizer.step)

    def reset(self) -> None:
        """Forget ``m`` and ``v``, as before the first round."""
        self.optimizer.reset()

    def state(self) -> dict[str, Any]:
        """``{"m/<tensor>": array, "v/<tensor>": array, "steps": n}``: numpy arrays and an int."""
        return self.optimizer.state()

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (e.g. read back from a checkpoint)."""
        self.optimizer.load_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer.options()})"


class FedAdam(_OnServerOptimizer, Strategy):
    """FedAvg's parties, Adam on the coordinator (Reddi et al. 2021)."""

    name = "fedadam"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.optimizer = ServerOptimizer("adam", server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)


class FedYogi(_OnServerOptimizer, Strategy):
    """FedAvg's parties, Yogi on the coordinator: ``v`` moves additively, so it grows more slowly
    than Adam's after large updates (Reddi et al. 2021)."""

    name = "fedyogi"

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.optimizer = ServerOptimizer("yogi", server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)


class FedAdagrad(_OnServerOptimizer, Strategy):
    """FedAvg's parties, Adagrad on the coordinator: ``v`` sums every round's Δ² (Reddi et al. 2021)."""

    name = "fedadagrad"

    def __init__(self, server_lr: float = 1e-1, beta1: float = 0.0, tau: float = 1e-3) -> None:
        # Adagrad has no β2; the optimizer's is unused
        self.optimizer = ServerOptimizer("adagrad", server_lr=server_lr, beta1=beta1, beta2=0.0, tau=tau)

    def __repr__(self) -> str:
        o = self.optimizer
        return f"FedAdagrad(server_lr={o.server_lr!r}, beta1={o.beta1!r}, tau={o.tau!r})"
