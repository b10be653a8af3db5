"""Differential privacy in a train request: what the coordinator asks, and what one party charges for it.

The coordinator turns ``train(..., dp=DPSGD(...) | DPFedAvg(...))`` into one ``dp`` object in
each train request (:func:`wire_dp`); the noise multiplier is always resolved there (a target ε
is calibrated once, before round 1, for the party that needs the most noise). Each party reads it
back with :func:`read_dp` and computes, from its own training set alone, the
:class:`~fednb.privacy.accountant.Mechanism` its ledger charges (:func:`mechanism_for`): the
party's gate and its kernel call the same function, so the party trains exactly what it
accounted. ::

    {"kind": "dpsgd", "noise_multiplier": z, "max_grad_norm": C, "delta": δ,
     "target_epsilon": ε or null, "rounds": R}
    {"kind": "dpfedavg", "noise_multiplier": z, "clip": C_t (this round's clip), "noise_at": …,
     "noise_parties": t (the fewest inputs a secure sum holds) or null, "sampling_rate": q,
     "adaptive": bool, "clipped_count_stddev": σ_b or null, "delta": δ, "rounds": R}

DP-SGD is charged per optimizer step at the party's own sampling rate (batch size / training
examples, Poisson sampling); DP-FedAvg once per round at the rate at which the coordinator
samples parties (1.0 while every party takes part in every round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fednb.privacy.accountant import Mechanism, calibrate, epsilon
from fednb.privacy.dpfedavg import DPFedAvg
from fednb.privacy.dpsgd import DPSGD, planned_steps, sample_rate_for

#: A calibrated run may exceed its target ε by this fraction at a party (float noise in the search).
TARGET_SLACK = 1e-6

_DPSGD_FIELDS = {"kind", "noise_multiplier", "max_grad_norm", "delta", "target_epsilon", "rounds"}
_DPFEDAVG_FIELDS = {"kind", "noise_multiplier", "clip", "noise_at", "noise_parties", "sampling_rate", "adaptive",
                    "clipped_count_stddev", "delta", "rounds"}


@dataclass(frozen=True)
class DPRequest:
    """The ``dp`` object of one train request, checked (see the module docstring)."""

    kind: str
    noise_multiplier: float
    clip: float  # DP-SGD: the per-record gradient clip; DP-FedAvg: this round's update clip
    delta: float
    rounds: int
    target_epsilon: float | None = None
    noise_at: str = "coordinator"
    noise_parties: int | None = None
    sampling_rate: float = 1.0
    adaptive: bool = False
    clipped_count_stddev: float | None = None

    @property
    def update_noise_multiplier(self) -> float:
        """DP-FedAvg: the noise multiplier on the updates (all of it, or what adaptive clipping leaves)."""
        if not self.adaptive or self.clipped_count_stddev is None:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.clipped_count_stddev) ** -2) ** -0.5

    def describe(self) -> str:
        """The request's privacy in the owner's words (the audit log, refusals)."""
        if self.kind == "dpsgd":
            target = f", whole run ε ≤ {self.target_epsilon:g}" if self.target_epsilon is not None else ""
            return f"DP-SGD (noise {self.noise_multiplier:.4g}, clip {self.clip:g}{target})"
        return f"DP-FedAvg (noise {self.noise_multiplier:.4g}, clip {self.clip:.4g}, noise at the {self.noise_at})"


def _number(value: Any, name: str, *, low: float = 0.0, high: float = math.inf, closed: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value <= high if not closed else low <= value <= high):
        raise ValueError(f"dp: {name} must be a finite number in ({low:g}, {high:g}], got {value!r}")
    return float(value)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"dp: {name} must be an integer >= 1, got {value!r}")
    return value


def read_dp(value: Any) -> DPRequest:
    """The ``dp`` object of a train request as a :class:`DPRequest`; ValueError naming what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError("dp must be an object")
    kind = value.get("kind")
    fields = {"dpsgd": _DPSGD_FIELDS, "dpfedavg": _DPFEDAVG_FIELDS}.get(kind)  # type: ignore[arg-type]
    if fields is None:
        raise ValueError(f"dp: unknown kind {kind!r}: expected 'dpsgd' or 'dpfedavg'")
    if set(value) != fields:
        raise ValueError(f"dp: {kind} needs exactly the fields {', '.join(sorted(fields))}")
    common: dict[str, Any] = {"noise_multiplier": _number(value["noise_multiplier"], "noise_multiplier"),
              "delta": _number(value["delta"], "delta", high=1.0 - 1e-12),
              "rounds": _count(value["rounds"], "rounds")}
    if kind == "dpsgd":
        target = value["target_epsilon"]
        return DPRequest("dpsgd", clip=_number(value["max_grad_norm"], "max_grad_norm"),
                         target_epsilon=None if target is None else _number(target, "target_epsilon"), **common)
    if value["noise_at"] not in ("coordinator", "parties"):
        raise ValueError("dp: noise_at must be 'coordinator' or 'parties'")
    parties = value["noise_parties"]
    if value["noise_at"] == "parties" and parties is None:
        raise ValueError("dp: noise added at the parties needs noise_parties")
    if not isinstance(value["adaptive"], bool):
        raise ValueError("dp: adaptive must be true or false")
    stddev = value["clipped_count_stddev"]
    request = DPRequest("dpfedavg", clip=_number(value["clip"], "clip"), noise_at=value["noise_at"],
                        noise_parties=None if parties is None else _count(parties, "noise_parties"),
                        sampling_rate=_number(value["sampling_rate"], "sampling_rate", high=1.0),
                        adaptive=value["adaptive"],
                        clipped_count_stddev=None if stddev is None else _number(stddev, "clipped_count_stddev"),
                        **common)
    if request.adaptive and (request.clipped_count_stddev is None
                             or 2 * request.clipped_count_stddev <= request.noise_multiplier):
        raise ValueError("dp: adaptive clipping needs clipped_count_stddev above noise_multiplier / 2")
    return request


def steps_for(config: Mapping[str, Any], examples: int) -> tuple[float, int]:
    """DP-SGD at a party with ``examples`` training records: (sampling rate, steps per round)."""
    rate = sample_rate_for(int(config["batch_size"]), examples)
    return rate, planned_steps(rate, int(config["epochs"]), int(config.get("max_steps") or 0))


def mechanism_for(request: DPRequest, config: Mapping[str, Any], examples: int) -> Mechanism:
    """What one round of ``request`` costs a party with ``examples`` training records."""
    if request.kind == "dpsgd":
        rate, steps = steps_for(config, examples)
        return Mechanism("dpsgd", rate, request.noise_multiplier, steps)
    return Mechanism("dpfedavg", request.sampling_rate, request.noise_multiplier, 1)


def run_epsilon(request: DPRequest, config: Mapping[str, Any], examples: int) -> float:
    """ε at the request's δ of the whole run (all its rounds) at this party, by itself."""
    one = mechanism_for(request, config, examples)
    return epsilon([Mechanism(one.kind, one.sampling_rate, one.noise_multiplier, one.steps * request.rounds)],
                   request.delta)


def check_target(request: DPRequest, config: Mapping[str, Any], examples: int) -> str | None:
    """Why a calibrated DP-SGD run does not fit its own target ε at this party, or None when it does."""
    if request.target_epsilon is None:
        return None
    reached = run_epsilon(request, config, examples)
    if reached > request.target_epsilon * (1 + TARGET_SLACK):
        return (f"the run's noise ({request.noise_multiplier:.4g}) gives ε = {reached:.4g} over {request.rounds} "
                f"rounds here, above its target ε = {request.target_epsilon:g}")
    return None


def wire_dp(dp: DPSGD | DPFedAvg, *, rounds: int, config: Mapping[str, Any], examples: Mapping[str, int],
            noise_parties: int | None = None, clip: float | None = None, sampling_rate: float = 1.0) -> dict[str, Any]:
    """The ``dp`` object the coordinator sends for a run of ``rounds`` rounds.

    ``examples`` are the parties' training-set sizes (what they said on connecting): a target ε
    is calibrated for the party whose run needs the most noise, so that every party's whole run
    fits in it. ``noise_parties`` is the secure sum's threshold (DP-FedAvg with noise at the
    parties); ``clip`` is this round's DP-FedAvg clip when adaptive clipping moved it.
    """
    if isinstance(dp, DPSGD):
        noise = dp.noise_multiplier
        if noise is None:
            if not examples:
                raise ValueError("DP-SGD with a target ε needs each party's training-set size, and none is known")
            noise = 0.0
            for party, count in examples.items():
                rate, steps = steps_for(config, count)
                try:
                    noise = max(noise, calibrate(dp.target_epsilon, dp.delta, rate, steps * rounds))  # type: ignore[arg-type]
                except ValueError as exc:
                    raise ValueError(f"cannot reach ε = {dp.target_epsilon:g} at {party}: {exc}") from None
        return {"kind": "dpsgd", "noise_multiplier": noise, "max_grad_norm": dp.max_grad_norm, "delta": dp.delta,
                "target_epsilon": dp.target_epsilon, "rounds": rounds}
    if isinstance(dp, DPFedAvg):
        if dp.noise_at == "parties" and noise_parties is None:
            raise ValueError("DPFedAvg(noise_at='parties') splits the noise across the parties of a secure sum: "
                             "train with secure_aggregation=True")
        return {"kind": "dpfedavg", "noise_multiplier": dp.noise_multiplier, "clip": dp.clip if clip is None else clip,
                "noise_at": dp.noise_at, "noise_parties": noise_parties if dp.noise_at == "parties" else None,
                "sampling_rate": sampling_rate, "adaptive": dp.adaptive,
                "clipped_count_stddev": dp.clipped_count_stddev, "delta": dp.delta, "rounds": rounds}
    raise ValueError("dp must be a fednb.DPSGD(...) or a fednb.DPFedAvg(...)")
