"""Update-level DP: DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018), with adaptive clipping (Andrew, Thakkar, McMahan and
Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021).

Pure functions on updates (``{name: array}``, as :func:`fednb.tensors.state_arrays` gives):

- each party clips its update to L2 norm ``clip`` (:func:`clip_update`), over all arrays together;
- Gaussian noise of standard deviation ``noise_multiplier · clip`` goes on the *sum* of the
  clipped updates, with equal weights (one party changes the sum by at most ``clip``): either
  the coordinator adds it (:func:`add_coordinator_noise`; trusts the coordinator), or, with
  secure aggregation, each party adds a share of variance σ²/n (:func:`party_noise`), so the sum
  the coordinator unmasks carries σ² and it never sees a less noisy value. The shares are sized
  for ``n`` = the fewest parties whose inputs secure aggregation will sum (its threshold): with
  more survivors the sum carries more noise, never less. Secure aggregation sums quantized
  integers modulo 2^k, so the sum of Gaussian shares is Gaussian only up to that rounding; an
  exact guarantee would need integer noise (the distributed discrete Gaussian, Kairouz, Liu and
  Steinke, ICML 2021).
- with ``adaptive``, each party also reports whether its update was within the clip
  (:func:`clipped_bit`); the noised fraction moves the clip geometrically toward the
  ``target_quantile`` of update norms (:func:`next_clip`). The bits use part of the privacy:
  the updates are noised with :func:`update_noise_multiplier`, so that both together are
  accounted as one Gaussian mechanism of ``noise_multiplier`` (Andrew et al., Theorem 1).

Party-level ε is accounted per round as :meth:`DPFedAvg.mechanism`: the sampled Gaussian
mechanism with the rate at which parties are sampled. With few parties all sampled each round
this ε is large (all parties every round, noise 1, 100 rounds: ε ≈ 96 at δ = 1e-5 by RDP); record-level DP-SGD
(:mod:`fednb.privacy.dpsgd`) is then the meaningful guarantee.

Noise comes from :func:`noise_rng`: a :class:`~fednb.privacy.noise.SecureNormal`, Gaussian
variates from a ChaCha20 stream under a fresh key from ``os.urandom``; no one can replay it.
numpy's generators are never used for it (tests may pass a seeded one, for reproducible values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np

from fednb.privacy.accountant import Mechanism
from fednb.privacy.noise import SecureNormal

Update = Mapping[str, np.ndarray]
Rng = Union[SecureNormal, np.random.Generator]
NOISE_AT = ("coordinator", "parties")


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPFedAvg:
    """DP-FedAvg's parameters, checked at construction.

    ``noise_multiplier`` is what is accounted: with ``adaptive`` clipping it covers the updates
    and the clipped-count bits together, and ``clipped_count_stddev`` (σ_b, Andrew et al.
    suggest about the expected number of parties per round / 20) must exceed half of it.
    """

    clip: float
    noise_multiplier: float
    noise_at: Literal["coordinator", "parties"] = "coordinator"
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", _positive("clip", self.clip))
        object.__setattr__(self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier))
        if self.noise_at not in NOISE_AT:
            raise ValueError(f"noise_at must be one of {', '.join(NOISE_AT)}, got {self.noise_at!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {self.adaptive!r}")
        q = self.target_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
            raise ValueError(f"target_quantile must be a number in (0, 1), got {q!r}")
        object.__setattr__(self, "target_quantile", float(q))
        object.__setattr__(self, "clip_learning_rate", _positive("clip_learning_rate", self.clip_learning_rate))
        if self.clipped_count_stddev is not None:
            object.__setattr__(self, "clipped_count_stddev",
                               _positive("clipped_count_stddev", self.clipped_count_stddev))
        if self.adaptive:
            if self.clipped_count_stddev is None:
                raise ValueError("adaptive clipping needs clipped_count_stddev (σ_b, e.g. expected parties per round / 20)")
            if 2 * self.clipped_count_stddev <= self.noise_multiplier:
                raise ValueError(f"clipped_count_stddev = {self.clipped_count_stddev:g} leaves no noise for the updates: "
                                 f"it must exceed noise_multiplier / 2 = {self.noise_multiplier / 2:g}")
        delta = self.delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        object.__setattr__(self, "delta", float(delta))

    def mechanism(self, sampling_rate: float, rounds: int = 1) -> Mechanism:
        """What a party's ledger charges for ``rounds`` rounds in which parties are sampled at ``sampling_rate``."""
        return Mechanism("dpfedavg", sampling_rate, self.noise_multiplier, rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "dpfedavg", "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "noise_at": self.noise_at, "adaptive": self.adaptive, "target_quantile": self.target_quantile,
                "clip_learning_rate": self.clip_learning_rate, "clipped_count_stddev": self.clipped_count_stddev,
                "delta": self.delta}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DPFedAvg:
        """The settings in ``value`` as :meth:`to_dict` writes them; ValueError on anything else."""
        fields = {"kind", "clip", "noise_multiplier", "noise_at", "adaptive", "target_quantile",
                  "clip_learning_rate", "clipped_count_stddev", "delta"}
        if not isinstance(value, Mapping) or value.get("kind") != "dpfedavg" or not set(value) <= fields \
                or "clip" not in value or "noise_multiplier" not in value:
            raise ValueError(f"not DPFedAvg settings: {value!r}")
        return cls(**{k: v for k, v in value.items() if k != "kind"})


def noise_rng() -> SecureNormal:
    """The generator for DP noise: a ChaCha20 stream under a fresh key (see the module docstring)."""
    return SecureNormal()


def update_norm(update: Update) -> float:
    """L2 norm of an update over all its arrays together."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in update.values()))


def clip_update(update: Update, clip: float) -> tuple[dict[str, np.ndarray], float]:
    """(the update scaled to L2 norm at most ``clip``, its norm before); a new dict, the input untouched."""
    clip = _positive("clip", clip)
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update holds non-finite values; it cannot be clipped")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (np.asarray(a) * scale).astype(np.asarray(a).dtype, copy=False) for k, a in update.items()}, norm


def update_noise_multiplier(config: DPFedAvg) -> float:
    """The noise multiplier on the updates: all of ``noise_multiplier`` without adaptive clipping;
    with it, what is left once the clipped-count bits take theirs, z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)."""
    if not config.adaptive:
        return config.noise_multiplier
    assert config.clipped_count_stddev is not None  # DPFedAvg checks this for adaptive clipping
    return (config.noise_multiplier ** -2 - (2 * config.clipped_count_stddev) ** -2) ** -0.5


def _gaussian(template: Update, stddev: float, rng: Rng) -> dict[str, np.ndarray]:
    if not isinstance(rng, (SecureNormal, np.random.Generator)):
        raise ValueError("rng must be a numpy Generator (see noise_rng); the legacy global RNG is never used")
    return {k: rng.normal(0.0, stddev, size=np.shape(a)).astype(np.asarray(a).dtype, copy=False)
            for k, a in template.items()}


def add_coordinator_noise(summed: Update, config: DPFedAvg, rng: Rng,
                          clip: float | None = None) -> dict[str, np.ndarray]:
    """The sum of clipped updates plus N(0, (z_Δ · clip)²) on every coordinate (the coordinator adds it).

    ``clip`` is this round's clip where adaptive clipping moved it (default ``config.clip``).
    """
    stddev = update_noise_multiplier(config) * _positive("clip", config.clip if clip is None else clip)
    noise = _gaussian(summed, stddev, rng)
    return {k: np.asarray(a) + noise[k] for k, a in summed.items()}


def party_noise(template: Update, config: DPFedAvg, parties: int, rng: Rng,
                clip: float | None = None) -> dict[str, np.ndarray]:
    """One party's share of the noise, N(0, (z_Δ · clip)² / parties), to add before secure aggregation.

    ``parties`` is the fewest inputs the sum will hold (secure aggregation's threshold), so the
    sum carries at least the full variance.
    """
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise ValueError(f"parties must be an integer >= 1, got {parties!r}")
    stddev = update_noise_multiplier(config) * _positive("clip", config.clip if clip is None else clip)
    return _gaussian(template, stddev / math.sqrt(parties), rng)


def clipped_bit(norm: float, clip: float) -> int:
    """Andrew et al.'s b_i: 1 when the update's norm was within the clip, else 0."""
    return 1 if norm <= clip else 0


def noisy_clipped_fraction(bits_sum: int, parties: int, config: DPFedAvg, rng: Rng) -> float:
    """The fraction of updates within the clip, (Σ b_i + N(0, σ_b²)) / parties."""
    if config.clipped_count_stddev is None:
        raise ValueError("the clipped fraction is noised only with adaptive clipping (clipped_count_stddev)")
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise ValueError(f"parties must be an integer >= 1, got {parties!r}")
    if not isinstance(rng, (SecureNormal, np.random.Generator)):
        raise ValueError("rng must be a numpy Generator (see noise_rng)")
    return (bits_sum + float(rng.normal(0.0, config.clipped_count_stddev))) / parties


def next_clip(clip: float, clipped_fraction: float, config: DPFedAvg) -> float:
    """Andrew et al.'s geometric update: C ← C · exp(−η_C (b̄ − γ)); the clip shrinks while more
    than the target quantile γ of updates fit in it, and grows while fewer do."""
    return _positive("clip", clip) * math.exp(-config.clip_learning_rate * (clipped_fraction - config.target_quantile))
