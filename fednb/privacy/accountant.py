"""Privacy accounting: the ε a party has spent on its training data, through Opacus's RDP accountant.

Every request a party runs under a budget is one :class:`Mechanism`: the Sampled Gaussian
Mechanism applied ``steps`` times, each step including each record (DP-SGD) or each party
(DP-FedAvg) with probability ``sampling_rate`` and adding Gaussian noise of ``noise_multiplier``
times the clipping norm. Its Rényi DP (Mironov, Talwar and Zhang, "Rényi Differential Privacy
of the Sampled Gaussian Mechanism", 2019) is computed by Opacus; RDP composes by addition
across steps, rounds and runs (Mironov, "Rényi Differential Privacy", CSF 2017), so a party's
lifetime of requests with different (q, z, steps) is one sum, turned into (ε, δ) once at the
end with the conversion of Balle et al., "Hypothesis Testing Interpretations and Rényi
Differential Privacy", AISTATS 2020 (Opacus's ``get_privacy_spent``). No formula is written
here: :func:`epsilon` is what ``opacus.accountants.RDPAccountant`` reports for the same history
(over a wider range of orders, :data:`ORDERS`, so that very small and very large ε stay tight).

Opacus (and so torch) is imported on the first call, not on import: the coordinator and
the party's router can build and check :class:`Mechanism` values without it.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

KINDS: tuple[str, ...] = ("dpsgd", "dpfedavg")
MechanismKind = Literal["dpsgd", "dpfedavg"]

#: RDP orders searched for the best conversion to (ε, δ): Opacus's defaults (1.1 … 10.9, 12 … 63)
#: widened at both ends. Orders near 1 give the tightest bound when ε is large (DP-FedAvg with
#: few parties, ε of tens); large orders when ε is small. More orders only tighten the bound.
ORDERS: tuple[float, ...] = (
    tuple(1 + x / 100 for x in range(1, 10))
    + tuple(1 + x / 10.0 for x in range(1, 100))
    + tuple(float(x) for x in range(12, 64))
    + (64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0)
)

#: Calibration never proposes more noise than this (Opacus's own ceiling, ``MAX_SIGMA``).
MAX_NOISE_MULTIPLIER = 1e6
#: :func:`calibrate` returns a noise multiplier whose ε is within this fraction below the target.
CALIBRATION_TOLERANCE = 0.005


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Mechanism:
    """One accounted use of the data: the Sampled Gaussian Mechanism applied ``steps`` times.

    ``kind`` says what was sampled: records (``"dpsgd"``, one step per optimizer step) or
    parties (``"dpfedavg"``, one step per round). ``noise_multiplier`` is the noise's standard
    deviation divided by the clipping norm (the L2 sensitivity).
    """

    kind: MechanismKind
    sampling_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mechanism kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ValueError(f"sampling_rate must be a number in (0, 1], got {q!r}")
        _check_positive("noise_multiplier", self.noise_multiplier)
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        # stored as plain floats so that equal mechanisms hash and serialize alike
        object.__setattr__(self, "sampling_rate", float(q))
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Mechanism:
        """The mechanism in ``value`` (as :meth:`to_dict` writes it); ValueError when it is not one."""
        names = {"kind", "sampling_rate", "noise_multiplier", "steps"}
        if not isinstance(value, Mapping) or set(value) != names:
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise ValueError(f"a mechanism needs exactly the keys {sorted(names)}, got {got}")
        return cls(kind=cast(MechanismKind, value["kind"]), sampling_rate=value["sampling_rate"],
                   noise_multiplier=value["noise_multiplier"], steps=value["steps"])


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sampling_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step at each of :data:`ORDERS`; a run's RDP is this times its steps (Opacus's
    ``compute_rdp`` multiplies the same way), so a ledger of many rounds costs one evaluation."""
    from opacus.accountants.analysis import rdp as analysis

    return tuple(float(v) for v in analysis.compute_rdp(q=sampling_rate, noise_multiplier=noise_multiplier,
                                                        steps=1, orders=list(ORDERS)))


def _rdp(history: Sequence[Mechanism]) -> list[float]:
    total = [0.0] * len(ORDERS)
    for mechanism in history:
        if not isinstance(mechanism, Mechanism):
            raise ValueError(f"history must hold Mechanism values, got {type(mechanism).__name__}")
        per_step = _rdp_per_step(mechanism.sampling_rate, mechanism.noise_multiplier)
        total = [t + r * mechanism.steps for t, r in zip(total, per_step)]
    return total


def epsilon(history: Sequence[Mechanism], delta: float) -> float:
    """ε at ``delta`` of all mechanisms in ``history`` composed (0.0 for an empty history)."""
    delta = _check_delta(delta)
    if not history:
        return 0.0
    from opacus.accountants.analysis import rdp as analysis

    with warnings.catch_warnings():
        # Opacus warns when the best order is at an end of the range searched; the ε it returns is
        # still a valid upper bound (only perhaps a loose one), and ORDERS is already wide.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _order = analysis.get_privacy_spent(orders=list(ORDERS), rdp=_rdp(history), delta=delta)
    eps = float(eps)
    # inf (no privacy left at all, e.g. noise far too small) is a real answer that passes no budget;
    # NaN would compare false against every budget, so it is reported as inf
    return math.inf if math.isnan(eps) else eps


def cost(history: Sequence[Mechanism], new: Mechanism, delta: float) -> tuple[float, float]:
    """(ε spent by ``history``, ε after ``new`` is added). RDP is not additive in ε, so what a
    request costs is ``after - spent``, which depends on what was spent before it."""
    if not isinstance(new, Mechanism):
        raise ValueError(f"new must be a Mechanism, got {type(new).__name__}")
    return epsilon(history, delta), epsilon([*history, new], delta)


def calibrate(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    history: Sequence[Mechanism] = (),
    kind: MechanismKind = "dpsgd",
) -> float:
    """The smallest noise multiplier (to within the search) for which ``steps`` steps at
    ``sampling_rate``, after ``history``, spend at most ``target_epsilon``.

    The ε reached is in ``[target·(1 − CALIBRATION_TOLERANCE), target]``: never above the target,
    and within 0.5 % of it. A bisection over the library's ε, as Opacus's ``get_noise_multiplier``
    does, but with a relative tolerance and room for an earlier history (a party's lifetime
    budget). ValueError when the history alone already spends the target.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    Mechanism(kind, sampling_rate, 1.0, steps)  # validates q, steps and kind with the same words
    spent = epsilon(history, delta)
    if spent >= target:
        raise ValueError(f"the history already spends ε = {spent:.4g}, at or above the target ε = {target:.4g}")

    def eps_at(z: float) -> float:
        return epsilon([*history, Mechanism(kind, sampling_rate, z, steps)], delta)

    low, high = 0.0, 1.0
    while eps_at(high) > target:  # double until the target is met; low stays infeasible (or 0)
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches ε = {target:.4g} "
                             f"(δ = {delta:g}, q = {sampling_rate:g}, {steps} steps): the target is too small")
    for _ in range(200):
        if eps_at(high) >= target * (1 - CALIBRATION_TOLERANCE):
            break
        middle = (low + high) / 2
        if eps_at(middle) > target:
            low = middle
        else:
            high = middle
    return high
