"""The coordinator's handle on a set of parties: train, evaluate, run, close.

A :class:`Federation` is what ``fednb.connect`` and ``fednb.simulate`` return, and what the
notebook magics drive. Its socket I/O runs on its own thread, so every method works from a
plain script, from a Jupyter cell inside a running asyncio loop, or from a background thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fednb.errors import FederationError, PartyError, WireError
from fednb.federation.background import TrainingRun
from fednb.federation.connection import Connections
from fednb.federation.events import EventBus, PrivacyUpdated, RoundEvaluated, Subscriber
from fednb.federation.history import History
from fednb.federation.privacy import PrivacyBook, PrivacyReport
from fednb.federation.private_run import PrivateRun
from fednb.federation.protocol import Stage, drive, gather
from fednb.federation.results import PartyInfo, PartyResults
from fednb.federation.rounds import Evaluation, evaluate_round
from fednb.federation.secure import SecureAggregation
from fednb.federation.source import check_code, model_source
from fednb.federation.training import plan_run, run_rounds
from fednb.strategies import Strategy
from fednb.tensors import state_arrays
from fednb.wire import Message
from fednb.wire.values import unpack_value

if TYPE_CHECKING:
    import torch

    from fednb.privacy.dpfedavg import DPFedAvg
    from fednb.privacy.dpsgd import DPSGD
    from fednb.vertical.federation import Vertical

log = logging.getLogger(__name__)


class Federation:
    """A connected set of parties. Use as a context manager, or call :meth:`close`."""

    def __init__(self, connections: Connections, bus: EventBus, *, on_close: Iterable[Callable[[], None]] = ()) -> None:
        self._connections = connections
        self.events = bus
        self.history = History()
        self._on_close = list(on_close)
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._busy = threading.Lock()
        self._last_round: dict[str, int] = {}
        self._last_error: dict[str, str] = {}
        self._closed = False
        self.model: torch.nn.Module | None = None
        self.source: str | None = None
        self._privacy = PrivacyBook()

    # -- what the federation is ---------------------------------------------------------------

    @property
    def parties(self) -> list[str]:
        """All party names, online or not, in the order they were given."""
        return [spec.name for spec in self._connections.specs]

    def status(self) -> list[PartyInfo]:
        """One row per party: endpoint, status (online, offline, awaiting approval, …), examples,
        last round, last error (or what the party said while it awaits its owner)."""
        rows = []
        for name, link in self._connections.snapshot().items():
            train = link["info"].get("datasets", {}).get("train", {})
            status, detail = link["status"], self._last_error.get(name) or link["detail"]
            if status == "online" and link.get("awaiting"):
                status, detail = "awaiting approval", str(link["awaiting"])
            rows.append(PartyInfo(name, link["endpoint"], status, train.get("examples"), self._last_round.get(name),
                                  detail, link["silent_for"], str(link["info"].get("containment") or "unknown"),
                                  self._privacy_of(name, link["info"])))
        return rows

    def _privacy_of(self, name: str, info: Mapping[str, Any]) -> dict[str, Any] | None:
        """The party's latest privacy summary: from its replies, else the one in its welcome."""
        summary = self._privacy.reported.get(name)
        if summary is None and info.get("privacy") is not None:
            summary = self._privacy.report(name, info["privacy"])
        return summary

    def privacy(self) -> PrivacyReport:
        """Per party: ε spent, budget and remaining, δ, and its charges, as each party with a budget last
        reported them; for a party without one, ε as this federation accounts what it asked of it."""
        self.status()  # files the summaries parties sent on connecting
        return self._privacy.view(self.parties)

    def _privacy_reported(self, party: str, raw: Any) -> None:
        summary = self._privacy.report(party, raw)
        if summary is not None:
            self.events.publish(PrivacyUpdated(party, summary))

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(event)`` for every event; returns the function that unsubscribes."""
        return self.events.subscribe(subscriber)

    def __repr__(self) -> str:
        online = len(self._connections.online())
        return f"<Federation of {len(self.parties)} parties, {online} online, {len(self.history)} rounds trained>"

    # -- training ----------------------------------------------------------------------------

    def train(
        self,
        model: torch.nn.Module,
        source: str | None = None,
        *,
        rounds: int = 1,
        strategy: str | Strategy = "fedavg",
        lr: float = 0.05,
        epochs: int = 1,
        batch_size: int = 16,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        loss: str = "cross_entropy",
        train_cell: str | None = None,
        min_parties: int | None = None,
        round_timeout: float | None = 300.0,
        evaluate_every: int = 1,
        parties: Iterable[str] | None = None,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        secure_aggregation: bool | SecureAggregation = False,
        dp: DPSGD | DPFedAvg | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        parties_per_round: int | None = None,
        fraction: float | None = None,
        **strategy_options: Any,
    ) -> History:
        """Train ``model`` for ``rounds`` rounds; afterwards it holds the global weights.

        Each round every online party builds the model from ``source`` (captured from the
        model's class when omitted), loads the global weights, trains on its own data with the
        built-in loop (``lr``, ``epochs``, ``batch_size``, ``optimizer``, ``momentum``, ``loss``;
        ``config`` adds or overrides settings) or with ``train_cell``, and sends back only its weights, example count and metrics. A party
        that fails or misses ``round_timeout`` is dropped for that round; the round completes
        if at least ``min_parties`` (default: a majority) replied, else :class:`RoundError`.
        Ctrl-C or :meth:`stop` end training after the current round with the weights so far.

        ``secure_aggregation=True`` (or a :class:`~fednb.SecureAggregation` with its clip, bits,
        threshold and neighbours) runs each round as the four stages of secure aggregation: the
        coordinator learns only the weighted mean of the parties' updates, and per-party train
        metrics and example counts stay at the parties.

        ``dp=fednb.DPSGD(noise_multiplier=… | target_epsilon=…, max_grad_norm=…)`` trains each
        party with record-level DP-SGD (a target ε is met by the whole run at every party);
        ``dp=fednb.DPFedAvg(clip=…, noise_multiplier=…)`` clips each party's update and noises the
        sum (here, or at the parties with ``noise_at="parties"`` under secure aggregation).
        Parties with a privacy budget refuse what would exceed it; :meth:`privacy` shows the ledgers.

        ``checkpoint="run.ckpt"`` writes the run's state after every round (atomically); the same call
        again, after a crash or a restart, continues from the next round under the same run id, and
        refuses when the source, cell, strategy or settings differ (:mod:`fednb.federation.checkpoint`).

        ``parties_per_round=k`` (or ``fraction=f`` of the parties) trains each round on k of the online
        parties, drawn from ``seed`` and the round; ``min_parties`` (default: a majority of k) applies to them.
        The last model's evaluation goes to k parties drawn alike; parties not online are not counted as
        dropped (the sample is drawn from those online).
        """
        plan = self._plan(model, source, rounds=rounds, strategy=strategy, lr=lr, epochs=epochs, batch_size=batch_size,
                          optimizer=optimizer, momentum=momentum, loss=loss, train_cell=train_cell,
                          min_parties=min_parties, round_timeout=round_timeout, evaluate_every=evaluate_every,
                          parties=parties, seed=seed, config=config, secure_aggregation=secure_aggregation, dp=dp,
                          checkpoint=checkpoint, parties_per_round=parties_per_round, fraction=fraction,
                          **strategy_options)
        self._claim()
        try:
            return plan()
        finally:
            self._busy.release()

    def train_in_background(self, model: torch.nn.Module, source: str | None = None, **options: Any) -> TrainingRun:
        """Start :meth:`train` on a worker thread and return its :class:`TrainingRun` at once.

        Takes :meth:`train`'s arguments and checks them here, so mistakes raise at the call.
        ``model`` receives each round's global weights once that round is aggregated;
        ``run.stop()`` (or :meth:`stop`) ends training after the round in progress.
        """
        plan = self._plan(model, source, **options)
        self._claim()

        def train() -> History:
            try:
                return plan()
            finally:
                self._busy.release()

        try:
            return TrainingRun(train, self.stop).start()
        except BaseException:
            self._busy.release()
            raise

    @property
    def training(self) -> bool:
        """Whether training is running, in the foreground or in the background."""
        return self._busy.locked()

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise FederationError("this federation is already training; stop it first (fed.stop())")
        self._stop.clear()
        self._abort.clear()

    def _plan(self, model: torch.nn.Module, source: str | None = None, **options: Any) -> Callable[[], History]:
        """Check :meth:`train`'s arguments; return the call that runs the rounds."""
        plan = plan_run(self, model, source, **options)

        def run() -> History:
            self.model, self.source = model, plan.code
            return run_rounds(self, plan)

        return run

    def _observer(self, private: PrivateRun | None) -> Callable[[str, Mapping[str, Any]], None]:
        def observe(party: str, content: Mapping[str, Any]) -> None:
            if content.get("privacy") is not None:
                self._privacy_reported(party, content["privacy"])
            if private is not None:
                private.observe(party, content)
        return observe

    def _record_evaluation(self, round_: int, evaluation: Evaluation) -> None:
        self.history.set_evaluation(round_, evaluation.metrics, evaluation.parties)
        self.events.publish(RoundEvaluated(round_, evaluation.metrics, evaluation.parties))

    def stop(self, *, now: bool = False) -> None:
        """End training after the round in progress (thread-safe).

        ``now=True`` also cancels the work running at the parties (their workers are killed),
        so training ends at once and the model keeps the last completed round's weights.
        """
        self._stop.set()
        if now and self.training:
            self._abort.set()
            self._connections.cancel_all()

    # -- vertical federations ------------------------------------------------------------------

    def vertical(self, id_column: str = "id", label_party: str | None = None, *, parties: Iterable[str] | None = None,
                 timeout: float | None = 600.0) -> Vertical:
        """Align the parties' rows by private set intersection on their id columns; a :class:`~fednb.vertical.
        federation.Vertical` to split, train (``train_logistic``), predict and evaluate on.

        Each party's table carries ids (``fednb party --id-column``; ``id_column`` names the column this
        federation expects, checked against what each party said); ``label_party`` holds the labels."""
        from fednb.vertical.federation import Vertical, check_vertical  # it imports the federation's modules

        chosen = self._choose(parties)
        check_vertical(self.status(), self._connections.snapshot(), chosen, label_party, id_column)
        self._claim()
        try:
            vfl = Vertical(self, chosen, str(label_party), timeout=timeout)
            vfl.align()
        finally:
            self._busy.release()
        return vfl

    # -- evaluation and cells -------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module, source: str | None = None, *, parties: Iterable[str] | None = None,
                 loss: str = "cross_entropy", batch_size: int = 256, timeout: float | None = 300.0) -> Evaluation:
        """Loss (and accuracy) of ``model`` on each party's test split, and their weighted mean.

        ``source`` defaults to the source this federation last trained ``model`` with.
        """
        code = self._source_of(model, source)
        weights = {name: np.array(array) for name, array in state_arrays(model).items()}
        return self._evaluate_weights(weights, code, {"loss": loss, "batch_size": batch_size}, self._choose(parties), timeout)

    def use_model(self, model: torch.nn.Module, source: str) -> None:
        """Remember ``source`` as how ``model`` is built: ``train(model)`` and ``evaluate(model)`` then need
        no ``source=`` (a notebook's ``%%fed_model`` cell does this)."""
        if not self.training:
            self.model, self.source = model, source

    def _source_of(self, model: torch.nn.Module, source: str | None) -> str:
        """``source``, else the one ``model`` was trained with here, else the model's captured class source."""
        if source is None and model is self.model and self.source is not None:
            return self.source
        return model_source(model, source)

    def _evaluate_weights(self, weights: Mapping[str, np.ndarray], code: str, base: Mapping[str, Any],
                          parties: list[str], timeout: float | None, round: int | None = None) -> Evaluation:
        config = {k: base[k] for k in ("loss", "batch_size", "seed") if k in base}
        return drive(self._connections, self.events, round, evaluate_round(
            round=round, parties=parties, weights=weights, source=code, config=config, timeout=timeout))

    def run(self, source: str, *, parties: Iterable[str] | None = None, timeout: float | None = 300.0) -> PartyResults:
        """Run ``source`` at each party; its last expression's value comes back per party.

        A party whose reply cannot be read (a malformed value) gets a :class:`PartyError` in
        the results; the other parties' results are kept.
        """
        if not isinstance(source, str):
            raise ValueError("source must be a string of Python code")
        check_code(source, "cell")
        chosen = self._choose(parties)
        gathered = gather(self._connections, Stage("run", tuple(chosen), request=Message("run", {"source": source}),
                                                   timeout=timeout))
        results = PartyResults()
        for party in chosen:
            reply = gathered.replies.get(party)
            if reply is not None:
                try:
                    results[party] = unpack_value(reply.content.get("value"), reply.arrays)
                except WireError as exc:
                    results[party] = PartyError(f"returned a malformed value: {exc}", party=party, error_type="WireError")
            elif party in gathered.errors:
                results[party] = gathered.errors[party]
            else:
                results[party] = PartyError(gathered.dropped.get(party, "no reply"), party=party, error_type="Dropped")
        return results

    def _choose(self, parties: Iterable[str] | None) -> list[str]:
        if self._closed:
            raise FederationError("the federation is closed")
        if parties is None:
            return self.parties
        chosen = [parties] if isinstance(parties, str) else list(parties)
        unknown = [p for p in chosen if p not in self.parties]
        if unknown or not chosen:
            raise ValueError(f"unknown parties: {', '.join(unknown) or '(none given)'}; known: {', '.join(self.parties)}")
        return chosen

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection and stop what this federation started. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            self._connections.close()
        finally:
            for callback in self._on_close:
                try:
                    callback()
                except Exception:
                    log.exception("cleanup after closing the federation failed")

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

