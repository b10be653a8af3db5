"""The round loop of horizontal training: rounds as protocols of stages, checkpointed after each one.

:meth:`fednb.Federation.train` checks its arguments into a :class:`RunPlan` (:func:`plan_run`);
:func:`run_rounds` drives the rounds (plain or under secure aggregation, with differential privacy
where asked), records each in the federation's history and, with ``checkpoint=``, writes the run's
state after every completed round and resumes from it (:mod:`fednb.federation.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fednb.errors import RoundError
from fednb.federation import checkpoint as ckpt
from fednb.federation.events import (PrivacyUpdated, PrivacyWarning, RoundAggregated, RoundStarted, TrainingFinished,
                                     TrainingStarted)
from fednb.federation.history import History, RoundRecord
from fednb.federation.private_run import PrivateRun
from fednb.federation.protocol import Steps, drive
from fednb.federation.rounds import RoundOutcome, train_round
from fednb.federation.secure import SecureAggregation, secure_round
from fednb.federation.source import check_code
from fednb.strategies import Strategy, get_strategy, summable
from fednb.tensors import load_arrays, state_arrays
from fednb.wire import new_id
from fednb.wire.config import check_config

if TYPE_CHECKING:
    import torch

    from fednb.privacy.dpfedavg import DPFedAvg
    from fednb.privacy.dpsgd import DPSGD

log = logging.getLogger("fednb.federation.federation")


@dataclass
class RunPlan:
    """One call of ``train``, checked: what to train, how, and where its checkpoint goes."""

    model: torch.nn.Module
    code: str
    chosen: list[str]
    rounds: int
    strategy: Strategy
    base: dict[str, Any]
    train_cell: str | None
    min_parties: int
    round_timeout: float | None
    evaluate_every: int
    secure: SecureAggregation | None = None
    private: PrivateRun | None = None
    checkpoint: Path | None = None
    fingerprint: dict[str, str] | None = None
    #: parties sampled per round (``parties_per_round``, or ``fraction`` of the chosen), None: every online party
    sample: int | None = None


def sampled_count(parties: int, per_round: int | None, fraction: float | None) -> int | None:
    """The parties sampled each round (None: no sampling); ValueError for a count or fraction out of range."""
    if per_round is not None and fraction is not None:
        raise ValueError("give parties_per_round or fraction, not both")
    if per_round is not None:
        if isinstance(per_round, bool) or not isinstance(per_round, int) or not 1 <= per_round <= parties:
            raise ValueError(f"parties_per_round must be an integer from 1 to {parties}")
        return per_round
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError("fraction must lie in (0, 1]")
        return max(1, int(round(fraction * parties)))
    return None


def sample(online: list[str], count: int, *, seed: int, round_: int) -> list[str]:
    """The round's parties: ``count`` of the online ones, drawn from the run's seed and the round (the same
    draw on a resumed run; which parties train is not secret)."""
    if len(online) <= count:
        return list(online)
    rng = np.random.default_rng([seed, round_])
    return sorted(rng.choice(online, size=count, replace=False).tolist())


def plan_run(fed: Any, /, model: torch.nn.Module, source: str | None = None, *, rounds: int = 1,
             strategy: str | Strategy = "fedavg", lr: float = 0.05, epochs: int = 1, batch_size: int = 16,
             optimizer: str = "sgd", momentum: float = 0.9, loss: str = "cross_entropy", train_cell: str | None = None,
             min_parties: int | None = None, round_timeout: float | None = 300.0, evaluate_every: int = 1,
             parties: Iterable[str] | None = None, seed: int = 0, config: Mapping[str, Any] | None = None,
             secure_aggregation: bool | SecureAggregation = False, dp: DPSGD | DPFedAvg | None = None,
             checkpoint: str | os.PathLike[str] | None = None, parties_per_round: int | None = None,
             fraction: float | None = None, **strategy_options: Any) -> RunPlan:
    """Check :meth:`fednb.Federation.train`'s arguments (``fed``: the federation) into the plan that
    :func:`run_rounds` runs."""
    chosen = fed._choose(parties)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError("rounds must be a positive integer")
    per_round = sampled_count(len(chosen), parties_per_round, fraction)
    if min_parties is None:
        min_parties = (per_round or len(chosen)) // 2 + 1
    if not 1 <= min_parties <= (per_round or len(chosen)):
        raise ValueError(f"min_parties must be between 1 and {per_round or len(chosen)}"
                         + (" (the parties sampled per round)" if per_round else ""))
    if round_timeout is not None and round_timeout <= 0:
        raise ValueError("round_timeout must be positive (or None to wait for ever)")
    if train_cell is not None and not isinstance(train_cell, str):
        raise ValueError("train_cell must be source code (a string)")
    if not isinstance(evaluate_every, int) or evaluate_every < 0:
        raise ValueError("evaluate_every must be a non-negative integer (0: never)")
    chosen_strategy = get_strategy(strategy, **strategy_options)
    secure = SecureAggregation.of(secure_aggregation)
    if secure is not None and getattr(chosen_strategy, "individual_updates", False):
        raise ValueError(f"strategy {getattr(chosen_strategy, 'name', strategy)!r} needs every party's update, "
                         "which secure aggregation hides; use one of " + ", ".join(summable()))
    from fednb.privacy.dpfedavg import DPFedAvg

    if isinstance(dp, DPFedAvg) and getattr(chosen_strategy, "individual_updates", False):
        raise ValueError(f"strategy {getattr(chosen_strategy, 'name', strategy)!r} needs every party's update; "
                         "DP-FedAvg gives it one noised sum; use one of " + ", ".join(summable()))
    if chosen_strategy.plain_rounds_only and (secure is not None or dp is not None):
        raise ValueError(f"strategy {chosen_strategy.name!r} exchanges control variates beside the weights, which "
                         "secure aggregation and DP do not carry yet: train it without secure_aggregation= and dp=")
    chosen_strategy.configure_run(len(chosen))  # SCAFFOLD's N: every party of the run
    needed = getattr(chosen_strategy, "min_updates", 1)
    if needed > (per_round or len(chosen)):
        raise ValueError(f"strategy {chosen_strategy.name!r} needs at least {needed} updates a round, and a "
                         f"round here has at most {per_round or len(chosen)}")
    code = fed._source_of(model, source)
    if train_cell is not None:
        check_code(train_cell, "train cell")
    base = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "momentum": momentum,
            "loss": loss, "seed": seed, **dict(config or {})}
    checked = check_config(chosen_strategy.configure_train(fed.history.last_round + 1, base))
    private = None
    if dp is not None:
        examples = {row.name: row.examples for row in fed.status() if row.name in chosen and row.examples}
        private = PrivateRun(dp, rounds=rounds, config=checked, examples=examples, strategy=chosen_strategy,
                             secure=secure, dimension=sum(int(np.prod(a.shape)) for a in state_arrays(model).values()),
                             book=fed._privacy, train_cell=train_cell)
        chosen_strategy, secure = private.strategy, private.secure

    plan = RunPlan(model, code, chosen, rounds, chosen_strategy, base, train_cell, min_parties, round_timeout,
                   evaluate_every, secure, private, sample=per_round)
    if checkpoint is not None:
        plan.checkpoint = Path(os.fspath(checkpoint))
        plan.fingerprint = ckpt.fingerprint(source=code, train_cell=train_cell, config=base,
                                            strategy={"strategy": strategy if isinstance(strategy, str) else
                                                      repr(strategy), "options": strategy_options},
                                            settings={"parties": chosen, "min_parties": min_parties,
                                                      "sample": per_round,
                                                      "secure": repr(secure), "dp": repr(dp)})
    return plan


def _resume(fed: Any, plan: RunPlan, model: torch.nn.Module, strategy: Strategy) -> ckpt.Checkpoint | None:
    """The checkpoint to continue from (its weights loaded into ``model``, its state into the strategy), if any."""
    if plan.checkpoint is None or not plan.checkpoint.exists():
        return None
    saved = ckpt.load(plan.checkpoint)
    ckpt.check(saved, plan.fingerprint or {}, plan.checkpoint)
    expected = {name: array.shape for name, array in state_arrays(model).items()}
    if {name: array.shape for name, array in saved.weights.items()} != expected:
        raise ckpt.CheckpointError(f"cannot resume from {plan.checkpoint}: its weights do not fit the model")
    load_arrays(model, saved.weights)
    if saved.strategy and hasattr(strategy, "load_state"):
        strategy.load_state(saved.strategy)
    fed.history.rounds = [r for r in fed.history if r.round < saved.first] + list(saved.history)
    return saved


def _save(fed: Any, plan: RunPlan, state: ckpt.Checkpoint, strategy: Strategy) -> None:
    """Write the run's state after a round: ``state`` completed with the fingerprint, strategy and history."""
    if plan.checkpoint is None:
        return
    state.fingerprint = plan.fingerprint or {}
    state.strategy = strategy.state() if hasattr(strategy, "state") else {}
    state.history = [r for r in fed.history if r.round >= state.first]
    ckpt.save(plan.checkpoint, state)


def run_rounds(fed: Any, plan: RunPlan) -> History:
    """The round loop. Round r's request also asks each party to evaluate the weights it
    carries (round r-1's model) when that round is due an evaluation; the last round's
    model is evaluated by a request of its own."""
    model, code, chosen, rounds, strategy = plan.model, plan.code, plan.chosen, plan.rounds, plan.strategy
    base, train_cell, min_parties, round_timeout = plan.base, plan.train_cell, plan.min_parties, plan.round_timeout
    evaluate_every, secure, private = plan.evaluate_every, plan.secure, plan.private
    weights = {name: np.array(array) for name, array in state_arrays(model).items()}
    run_id, first, attempt = new_id(), fed.history.last_round + 1, 0
    resumed = _resume(fed, plan, model, strategy)
    if resumed is not None:
        run_id, first, weights, attempt = resumed.run, resumed.first, resumed.weights, resumed.attempt + 1
    last = first + rounds - 1
    if resumed is not None:
        first = resumed.round + 1
        if first > last:
            log.info("the checkpoint %s holds the whole run (rounds to %d)", plan.checkpoint, resumed.round)
            return fed.history
        log.info("resuming run %s from %s at round %d of %d", run_id[:8], plan.checkpoint, first, last)
        # the attempt is written before any round goes out: a round that fails again (or a coordinator killed
        # again) resumes with a later attempt still, which the parties accept
        _save(fed, plan, ckpt.Checkpoint(run_id, resumed.first, last, resumed.round, {}, weights, attempt=attempt),
              strategy)
    start, planned = (first if resumed is None else resumed.first), last - first + 1
    fed.events.publish(TrainingStarted(planned, getattr(strategy, "name", type(strategy).__name__), tuple(chosen),
                                       first))
    observe = fed._observer(private)
    if private is not None:
        links = fed._connections.snapshot(chosen)
        for party in chosen:
            summary = fed._privacy_of(party, links[party]["info"])
            if summary is not None:
                fed.events.publish(PrivacyUpdated(party, summary))
        for party, after, budget in private.forecast(chosen):
            message = (f"{party}: this run would take ε to {after:.3g}, past its budget of {budget:.3g}; it will "
                       "refuse the rounds beyond it")
            log.warning("%s", message)
            fed.events.publish(PrivacyWarning(party, message, after, budget))
    done, error, unevaluated = 0, None, None
    try:
        for round_ in range(first, last + 1):
            here = set(fed._connections.online())  # once a round: a population may hold 100,000 parties
            online = [p for p in chosen if p in here]
            available = online
            if plan.sample is not None:
                online = sample(online, plan.sample, seed=int(base.get("seed", 0)), round_=round_)
            fed.events.publish(RoundStarted(round_, last, tuple(online),
                                            tuple(available) if plan.sample is not None else ()))
            started = time.monotonic()
            content = {"source": code, "train_cell": train_cell, "config": strategy.configure_train(round_, base),
                       "run": run_id, "attempt": attempt}
            dp_round = private.round_dp(online) if private is not None else {}
            if dp_round:
                content["dp"] = dp_round
            # who was expected and is not there: every chosen party; with sampling none (the sample is
            # drawn from those online), or each round would drop a whole absent population again
            links = fed._connections.snapshot([p for p in chosen if p not in here] if plan.sample is None else [])
            offline = {p: f"{links[p]['status']}" + (f" ({links[p]['detail']})" if links[p]["detail"] else "")
                       for p in links}
            protocol: Steps[RoundOutcome]
            if secure is None:
                protocol = train_round(fed.events, strategy, round=round_, parties=online, weights=weights,
                                       content=content, min_parties=min_parties, timeout=round_timeout,
                                       evaluate_incoming=unevaluated is not None, unavailable=offline,
                                       observe=observe)
            else:
                protocol = secure_round(fed.events, strategy, round=round_, parties=online, weights=weights,
                                        content=content, min_parties=min_parties, timeout=round_timeout,
                                        secure=secure, evaluate_incoming=unevaluated is not None,
                                        unavailable=offline, observe=observe)
            try:
                outcome = drive(fed._connections, fed.events, round_, protocol)
            except RoundError:
                if fed._abort.is_set():  # stop(now=True) cancelled this round's work at the parties
                    log.info("training stopped during round %d; the model keeps round %d's weights",
                             round_, round_ - 1)
                    break
                raise
            if unevaluated is not None and outcome.evaluation is not None:
                fed._record_evaluation(unevaluated, outcome.evaluation)
            unevaluated = None
            if private is not None:
                private.finish_round(dp_round, run=run_id, round=round_, parties=list(outcome.contributions))
            weights = outcome.weights
            load_arrays(model, weights)
            for party in outcome.contributions:
                fed._last_round[party] = round_
                fed._last_error.pop(party, None)
            fed._last_error.update(outcome.dropped)
            record = RoundRecord(round_, outcome.contributions, outcome.dropped, outcome.metrics, None, {},
                                 time.monotonic() - started, dict(getattr(outcome, "stages", None) or
                                                                  {"train": outcome.seconds}),
                                 dict(getattr(outcome, "secure", None) or {}),
                                 {k: dp_round[k] for k in ("kind", "noise_multiplier", "clip", "max_grad_norm")
                                  if k in dp_round})
            fed.history.append(record)
            done += 1
            _save(fed, plan, ckpt.Checkpoint(run_id, start, last, round_, {}, weights, attempt=attempt), strategy)
            fed.events.publish(RoundAggregated(round_, last, outcome.metrics, None, {}, record.seconds))
            if evaluate_every and (round_ % evaluate_every == 0 or round_ == last):
                unevaluated = round_
            if fed._stop.is_set():
                log.info("training stopped after round %d", round_)
                break
        if unevaluated is not None and not fed._abort.is_set():
            here = set(fed._connections.online())
            online = [p for p in chosen if p in here]
            if plan.sample is not None:  # a sampled run's last model is evaluated on a sample of its size too
                online = sample(online, plan.sample, seed=int(base.get("seed", 0)), round_=last + 1)
            fed._record_evaluation(unevaluated, fed._evaluate_weights(weights, code, base, online, round_timeout,
                                                                        round=unevaluated))
            _save(fed, plan, ckpt.Checkpoint(run_id, start, last, fed.history.last_round, {}, weights,
                                             attempt=attempt), strategy)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        fed.events.publish(TrainingFinished(done, fed._stop.is_set() or (error is not None and done < planned),
                                            error))
    return fed.history

