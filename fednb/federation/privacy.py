"""Differential privacy at the coordinator: the ``dp`` of each round, DP-FedAvg's noised mean, and the ledgers seen.

``train(..., dp=DPSGD(...))`` asks each party to train with DP-SGD; the noise is resolved here
once, before round 1 (a target ε is calibrated for the party whose whole run needs the most
noise). ``dp=DPFedAvg(...)`` clips each party's update at the party; the noise goes on the sum,
either here (:class:`PrivateStrategy`, which wraps the chosen strategy: the strategy gets the
noised mean as one pre-summed update, as under secure aggregation) or, with secure aggregation,
at the parties, each adding a share sized for the fewest inputs the sum can hold; adaptive
clipping moves the clip between rounds from the parties' noised clipped bits.

Parties with a budget report it in their welcome and in each train reply; :class:`PrivacyBook`
keeps the latest report per party, checked here before use, and what this federation asked of
every party, so that ``fed.privacy()`` shows ε for parties without a budget too (as this
coordinator accounts it).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.privacy.accountant import Mechanism, epsilon
from fednb.privacy.dpfedavg import DPFedAvg, clip_update, next_clip, noise_rng, noisy_clipped_fraction
from fednb.privacy.dpsgd import DPSGD
from fednb.privacy.request import mechanism_for, read_dp
from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.server_step import check_number

log = logging.getLogger(__name__)

MAX_HISTORY = 64
_SUMMARY_NUMBERS = ("epsilon_spent", "epsilon_budget", "epsilon_remaining", "delta")


def check_dp(dp: Any, *, secure: bool, train_cell: str | None) -> DPSGD | DPFedAvg | None:
    """``train``'s ``dp=`` checked against the rest of the call; ValueError naming the mistake."""
    if dp is None:
        return None
    if not isinstance(dp, (DPSGD, DPFedAvg)):
        raise ValueError("dp must be a fednb.DPSGD(...) or a fednb.DPFedAvg(...)")
    if isinstance(dp, DPSGD) and train_cell is not None:
        raise ValueError("DP-SGD trains with the built-in loop only: drop the train cell")
    if isinstance(dp, DPFedAvg):
        if dp.noise_at == "parties" and not secure:
            raise ValueError("DPFedAvg(noise_at='parties') splits the noise across a secure sum: add "
                             "secure_aggregation=True")
        if dp.noise_at == "coordinator" and secure:
            raise ValueError("with secure aggregation the coordinator sees only the sum: DP-FedAvg's noise goes on "
                             "at the parties (DPFedAvg(..., noise_at='parties'))")
        if dp.adaptive and secure:
            raise ValueError("adaptive clipping needs each party's clipped bit, which secure aggregation hides: "
                             "use a fixed clip")
    return dp


# -- the coordinator's noise ------------------------------------------------------------------------


class _NoisedMean(Aggregation):
    """DP-FedAvg with the noise added here: equal weights, each update clipped again, N(0, (z·C)²) on the sum."""

    def __init__(self, inner: Aggregation, current: Mapping[str, np.ndarray], owner: PrivateStrategy) -> None:
        self.inner, self.owner = inner, owner
        self.dtypes = {k: np.asarray(a).dtype for k, a in current.items()}
        self.current = {k: np.asarray(a, dtype=np.float64) for k, a in current.items()}
        self.sum = {k: np.zeros_like(a) for k, a in self.current.items()}
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        if set(update) != set(self.current):
            raise ValueError("the update's tensors are not the model's")
        delta = {k: np.asarray(update[k], dtype=np.float64) - self.current[k] for k in self.current}
        # the party clipped it; clipping again costs nothing and keeps one party's effect within C
        clipped, _norm = clip_update(delta, self.owner.clip)
        for k, a in clipped.items():
            self.sum[k] += a
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no update to aggregate")
        dp = self.owner.dp
        assert isinstance(dp, DPFedAvg)
        stddev = self.owner.update_noise * self.owner.clip
        rng = noise_rng()
        mean = {k: (self.current[k] + (a + rng.normal(0.0, stddev, size=a.shape)) / self.count).astype(self.dtypes[k])
                for k, a in self.sum.items()}
        self.inner.add(mean, self.count)
        return self.inner.result()


class PrivateStrategy(Strategy):
    """A strategy under DP-FedAvg with the noise at the coordinator (and its adaptive clip), wrapping another."""

    def __init__(self, inner: Strategy, dp: DPFedAvg, update_noise: float) -> None:
        self.inner, self.dp, self.update_noise = inner, dp, update_noise
        self.name = getattr(inner, "name", type(inner).__name__)  # type: ignore[misc]
        self.clip = dp.clip

    def configure_train(self, round: int, config: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.configure_train(round, config)

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        return _NoisedMean(self.inner.start_round(round, current), current, self)

    def aggregate_metrics(self, round: int, results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
        return self.inner.aggregate_metrics(round, results)

    def state(self) -> dict[str, Any]:
        """The wrapped strategy's state (server momentum, moments) and the adaptive clip, for a checkpoint."""
        inner = self.inner.state() if hasattr(self.inner, "state") else {}
        return {**inner, "dp.clip": float(self.clip)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state`: the clip where the interrupted run had moved it, and the inner state."""
        inner = {key: value for key, value in state.items() if key != "dp.clip"}
        if state.get("dp.clip") is not None:
            self.clip = check_number("the checkpoint's dp.clip", state["dp.clip"], 0.0, low_open=True)
        if inner and hasattr(self.inner, "load_state"):
            self.inner.load_state(inner)

    def adapt(self, bits: Sequence[int]) -> None:
        """Andrew et al.'s step: move the clip toward the target quantile from this round's noised clipped bits."""
        if not self.dp.adaptive or not bits:
            return
        fraction = noisy_clipped_fraction(int(sum(bits)), len(bits), self.dp, noise_rng())
        self.clip = next_clip(self.clip, fraction, self.dp)
        log.info("adaptive clipping: %d of %d updates within the clip; next clip %.4g", sum(bits), len(bits), self.clip)


# -- what parties report, and what this federation asked ---------------------------------------------


@dataclass(frozen=True)
class PartyPrivacy:
    """One party's privacy: its budget as it reports it (or, without one, ε as this coordinator accounts it)."""

    party: str
    epsilon_spent: float
    epsilon_budget: float | None
    epsilon_remaining: float | None
    delta: float | None
    history: tuple[dict[str, Any], ...] = ()

    def row(self) -> dict[str, Any]:
        return {"party": self.party, "epsilon_spent": self.epsilon_spent, "epsilon_budget": self.epsilon_budget,
                "epsilon_remaining": self.epsilon_remaining, "delta": self.delta, "charges": len(self.history)}


class PrivacyReport(dict):  # type: ignore[type-arg]
    """``fed.privacy()``: party name → :class:`PartyPrivacy`."""

    def rows(self) -> list[dict[str, Any]]:
        return [value.row() for value in self.values()]

    def __repr__(self) -> str:
        lines = []
        for p in self.values():
            budget = f"of {p.epsilon_budget:.4g} (left {p.epsilon_remaining:.4g})" if p.epsilon_budget is not None \
                else "(no budget there; as this coordinator accounts it)"
            lines.append(f"{p.party}: ε {p.epsilon_spent:.4g} {budget}, {len(p.history)} charges")
        return "\n".join(lines) or "(no parties)"


def _finite(value: Any, low: float = 0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def check_summary(value: Any) -> dict[str, Any]:
    """A party's privacy summary as it came over the wire, checked; ValueError when it is not one."""
    if not isinstance(value, Mapping) or not set(_SUMMARY_NUMBERS) <= set(value):
        raise ValueError("a privacy summary needs epsilon_spent, epsilon_budget, epsilon_remaining and delta")
    out: dict[str, Any] = {}
    for name in _SUMMARY_NUMBERS:
        if not _finite(value[name]) or (name == "delta" and not 0 < value[name] < 1):
            raise ValueError(f"privacy summary: {name} is not a valid number")
        out[name] = float(value[name])
    history = value.get("history") or []
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise ValueError(f"privacy summary: history must be a list of at most {MAX_HISTORY} charges")
    out["history"] = [_charge(entry) for entry in history]
    mechanisms = value.get("mechanisms")
    if mechanisms is not None:
        if not isinstance(mechanisms, list) or len(mechanisms) > MAX_HISTORY:
            raise ValueError("privacy summary: mechanisms must be a short list")
        out["mechanisms"] = [Mechanism.from_dict(m) for m in mechanisms]
    return out


def _charge(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise ValueError("privacy summary: a charge must be an object")
    mechanism = Mechanism.from_dict({k: entry.get(k) for k in ("sampling_rate", "noise_multiplier", "steps")}
                                    | {"kind": entry.get("mechanism")})
    after, round_ = entry.get("epsilon_after"), entry.get("round")
    if not _finite(after) or (round_ is not None and (isinstance(round_, bool) or not isinstance(round_, int))):
        raise ValueError("privacy summary: a charge needs epsilon_after and an integer round")
    run, time = entry.get("run"), entry.get("time")
    return {"run": str(run)[:64], "round": round_, "mechanism": mechanism.kind,
            "sampling_rate": mechanism.sampling_rate, "noise_multiplier": mechanism.noise_multiplier,
            "steps": mechanism.steps, "epsilon_after": float(after or 0.0), "time": str(time)[:40]}


@dataclass
class PrivacyBook:
    """The latest privacy summary of each party, and what this federation charged parties without a budget."""

    reported: dict[str, dict[str, Any]] = field(default_factory=dict)
    asked: dict[str, list[tuple[Mechanism, float, dict[str, Any]]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, party: str, value: Any) -> dict[str, Any] | None:
        """File a summary a party sent; the checked summary, or None (logged) when it cannot be used."""
        try:
            summary = check_summary(value)
        except (ValueError, TypeError) as exc:
            log.warning("%s sent a privacy summary that cannot be used: %s", party, exc)
            return None
        with self.lock:
            self.reported[party] = summary
        return summary

    def charged(self, party: str, mechanism: Mechanism, delta: float, *, run: str, round: int) -> None:
        """Account one round this federation ran at a party (for parties that keep no budget themselves)."""
        with self.lock:
            entries = self.asked.setdefault(party, [])
            after = epsilon([m for m, _d, _e in entries if _d == delta] + [mechanism], delta)
            entries.append((mechanism, delta, {"run": run, "round": round, "mechanism": mechanism.kind,
                                               "sampling_rate": mechanism.sampling_rate,
                                               "noise_multiplier": mechanism.noise_multiplier,
                                               "steps": mechanism.steps, "epsilon_after": after, "time": ""}))

    def view(self, parties: Sequence[str]) -> PrivacyReport:
        report = PrivacyReport()
        with self.lock:
            for party in parties:
                summary = self.reported.get(party)
                if summary is not None:
                    report[party] = PartyPrivacy(party, summary["epsilon_spent"], summary["epsilon_budget"],
                                                 summary["epsilon_remaining"], summary["delta"],
                                                 tuple(summary["history"]))
                    continue
                entries = self.asked.get(party, [])
                history = tuple(entry for _m, _d, entry in entries)[-MAX_HISTORY:]
                spent = history[-1]["epsilon_after"] if history else 0.0
                report[party] = PartyPrivacy(party, spent, None, None, entries[-1][1] if entries else None, history)
        return report

    def forecast(self, party: str, run: Sequence[Mechanism]) -> tuple[float, float] | None:
        """(ε after the whole run, budget) at a party that reported a budget; None without one.

        Exact when the party sent its grouped mechanisms; from its latest charges otherwise (a
        lower bound when it has more than those)."""
        with self.lock:
            summary = self.reported.get(party)
        if summary is None:
            return None
        if "mechanisms" in summary:
            past = list(summary["mechanisms"])
        else:
            past = [Mechanism(h["mechanism"], h["sampling_rate"], h["noise_multiplier"], h["steps"])
                    for h in summary["history"]]
        return epsilon(past + list(run), summary["delta"]), summary["epsilon_budget"]


def run_mechanisms(dp_wire: Mapping[str, Any], config: Mapping[str, Any], examples: int | None,
                   rounds: int) -> list[Mechanism]:
    """What a whole run of ``rounds`` rounds costs a party with ``examples`` training records."""
    if examples is None or examples < 1:
        return []
    one = mechanism_for(read_dp(dp_wire), config, examples)
    return [Mechanism(one.kind, one.sampling_rate, one.noise_multiplier, one.steps * rounds)]
