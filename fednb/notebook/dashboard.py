"""The live federation dashboard: an anywidget that follows one training run's events.

``%fed_train`` displays a :class:`Dashboard` under the cell and subscribes it to the
federation (:meth:`Dashboard.attach`). Each event becomes one batch of trait changes, which
the ESM beside this file (``dashboard.js``) draws as round progress, one row per party and an
SVG chart of global and per-party accuracy and loss, with a Stop button. Under differential
privacy each party's row also shows ε spent against its budget (from ``PrivacyUpdated``), and a
``PrivacyWarning`` (a run that would exhaust a party's budget) shows as a warning line; under
secure aggregation a badge says how many parties' updates the coordinator saw only as a sum
(the round's record in the federation's history). Front ends without
widgets (terminal IPython, nbconvert, papermill) get :meth:`Dashboard.summary_text` and
:meth:`Dashboard.summary_html` from the same MIME bundle instead of an empty widget.
"""

from __future__ import annotations

import html
import logging
import math
import pathlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets as t

from fednb.federation.events import (Event, PrivacyUpdated, PrivacyWarning, RoundAggregated, RoundStarted,
                                     TrainingStarted)
from fednb.federation.runstate import ROUND_STATUSES, STATES, RunState
from fednb.notebook.display import Table

if TYPE_CHECKING:
    from fednb.federation.federation import Federation

log = logging.getLogger(__name__)

__all__ = ["ROUND_STATUSES", "STATES", "Dashboard"]  # the statuses and states are RunState's
#: What a dashboard whose run's error is shown under it says instead of the error.
ERROR_BELOW = "see the error below"
#: Rounds listed in the text/HTML summaries; older ones are counted, not shown.
SUMMARY_ROUNDS = 20
#: Privacy warnings kept (a run warns at most once per party).
MAX_WARNINGS = 20


def population_summary(run: RunState, bins: int = 12) -> dict[str, Any]:
    """What a dashboard shows of a population: how many parties, how many the round sampled and how they
    fared, and the histogram of the round's training losses (``bins`` equal bins from min to max)."""
    # the round's sampled parties, and what they reported from training (a last evaluation may add rows)
    current = run.round_state(run.round)
    trained = current.train if current is not None else {}
    statuses = [p.status for p in run.parties if p.name in run.sampled]
    losses = sorted(v for m in trained.values() if (v := _number(m.get("loss"))) is not None)
    histogram: dict[str, Any] = {"edges": [], "counts": [], "median": None}
    if losses:
        low, high = losses[0], losses[-1]
        width = (high - low) / bins or 1.0
        counts = [0] * bins
        for value in losses:
            counts[min(int((value - low) / width), bins - 1)] += 1
        histogram = {"edges": [low + i * width for i in range(bins + 1)], "counts": counts,
                     "median": losses[len(losses) // 2]}
    return {"parties": run.population, "available": run.available, "round": run.round, "sampled": len(run.sampled),
            "done": len(trained), "dropped": statuses.count("dropped") + statuses.count("late"),
            "losses": histogram}


def _number(value: Any) -> float | None:
    """A metric as the comm can carry it: a finite float, else None (JSON has no NaN)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _loss_accuracy(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
    metrics = metrics or {}
    return {"loss": _number(metrics.get("loss")), "accuracy": _number(metrics.get("accuracy"))}


def _duration(seconds: float | None) -> str:
    """Seconds as ``12.3 s`` below a minute, else ``m:ss`` or ``h:mm:ss``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def privacy_row(privacy: Any) -> dict[str, Any] | None:
    """A party's privacy summary (``PrivacyUpdated.privacy``, ``PartyInfo.privacy``) as the dashboard
    shows it: ε spent, budget, remaining, δ and the number of charges; None without a budget."""
    if not isinstance(privacy, Mapping) or _number(privacy.get("epsilon_budget")) is None:
        return None
    history = privacy.get("history")
    return {"spent": _number(privacy.get("epsilon_spent")), "budget": _number(privacy["epsilon_budget"]),
            "remaining": _number(privacy.get("epsilon_remaining")), "delta": _number(privacy.get("delta")),
            "charges": len(history) if isinstance(history, (list, tuple)) else 0}


def _budget_text(row: Mapping[str, Any] | None) -> str:
    """``1.23 / 3`` (ε spent / budget), or "no budget"."""
    if row is None or row.get("budget") is None:
        return "no budget"
    spent = row.get("spent")
    return f"{'?' if spent is None else f'{spent:.3g}'} / {row['budget']:.3g}"


def _warning_text(warning: Mapping[str, Any]) -> str:
    party, message = warning.get("party", ""), warning.get("message", "")
    return message if party and party in message else f"{party}: {message}"


class Dashboard(anywidget.AnyWidget):
    """Live view of a training run: progress and ETA, one row per party, metric curves, Stop.

    The traits are the whole state; :meth:`handle` turns federation events into trait
    changes and may be called from any thread. The widget can be built and fed events
    without a federation (tests, replays).
    """

    _esm = pathlib.Path(__file__).with_name("dashboard.js")
    _css = pathlib.Path(__file__).with_name("dashboard.css")

    title = t.Unicode("").tag(sync=True)
    strategy = t.Unicode("").tag(sync=True)
    state = t.Enum(STATES, default_value="idle").tag(sync=True)
    round = t.Int(0).tag(sync=True)  # the round in progress (or last finished); 0 before the first
    first_round = t.Int(1).tag(sync=True)
    last_round = t.Int(0).tag(sync=True)
    rounds_done = t.Int(0).tag(sync=True)
    started_at = t.Float(None, allow_none=True).tag(sync=True)  # epoch seconds of TrainingStarted
    elapsed = t.Float(0.0).tag(sync=True)  # seconds, as of the last event (the ESM ticks between events)
    eta = t.Float(None, allow_none=True).tag(sync=True)  # seconds left, as of the last event
    parties = t.List(t.Dict()).tag(sync=True)  # rows: name, status, examples, loss, accuracy, seconds, detail
    history = t.List(t.Dict()).tag(sync=True)  # per round: round, loss, accuracy, seconds, evaluated, parties
    error = t.Unicode("").tag(sync=True)
    privacy = t.Dict().tag(sync=True)  # party -> spent, budget, remaining, delta, charges (parties with a budget)
    warnings = t.List(t.Dict()).tag(sync=True)  # this run's privacy warnings: party, message, epsilon_after, ...
    secure = t.Unicode("").tag(sync=True)  # "sum of N parties" when the last round was securely aggregated
    # a population of more than LARGE parties (then ``parties`` is empty): parties, available, round, sampled,
    # done, dropped, and the histogram of this round's training losses {"edges": [...], "counts": [...]}
    population = t.Dict().tag(sync=True)

    def __init__(self, *, title: str = "", on_stop: Callable[[], None] | None = None, error_below: bool = False,
                 **kwargs: Any) -> None:
        """``error_below``: the run's error is shown under the dashboard (a foreground ``%fed_train``
        raises it), so the dashboard says where instead of repeating it."""
        super().__init__(title=title, **kwargs)
        self._on_stop = on_stop
        self._error_below = error_below
        # One lock orders every read-modify-write of the state: events arrive from the round
        # loop's thread and the connection thread, the Stop message from the kernel's thread.
        self._lock = threading.RLock()
        self._clock: float | None = None  # monotonic time of TrainingStarted
        self._run = RunState()  # what the traits show
        self._history: Any = None  # the attached federation's History: each round's secure-aggregation record
        self.on_msg(self._on_message)

    # -- following a federation ---------------------------------------------------------------

    def attach(self, federation: Federation) -> Callable[[], None]:
        """Show ``federation``'s parties and follow its events; returns the unsubscribe function."""
        status = federation.status()
        seeded = RunState.of_parties((info.name, info.status, info.examples, info.last_error or "")
                                     for info in status)
        privacy = {info.name: row for info in status if (row := privacy_row(info.privacy))}
        with self._lock, self.hold_sync():
            self._run = seeded
            self._history = getattr(federation, "history", None)
            self._render()
            if privacy:
                self.privacy = {**self.privacy, **privacy}
        return federation.subscribe(self.handle)

    def handle(self, event: Event) -> None:
        """Apply one federation event to the traits, as one batch of changes; thread-safe."""
        with self._lock, self.hold_sync():
            if isinstance(event, (PrivacyUpdated, PrivacyWarning)):
                self._privacy_event(event)
                return
            run = self._run.apply(event)
            if run is self._run:
                log.debug("dashboard ignores %s", type(event).__name__)
                return
            if isinstance(event, TrainingStarted) or self._clock is None and isinstance(event, RoundStarted):
                self._clock = time.monotonic()  # attached after TrainingStarted: time from here
                self.started_at = time.time()
            if isinstance(event, TrainingStarted):
                self.warnings, self.secure = [], ""  # a run's warnings come after its TrainingStarted
            elif isinstance(event, RoundAggregated):
                self.secure = self._secure_of(event.round)
            self._run = run
            self._render()
            if self._clock is not None:
                self.elapsed = time.monotonic() - self._clock

    def _privacy_event(self, event: PrivacyUpdated | PrivacyWarning) -> None:
        """A party's ε spent and budget, or a warning that this run would exhaust it; under the lock."""
        if isinstance(event, PrivacyUpdated):
            row = privacy_row(event.privacy)
            privacy = {name: r for name, r in self.privacy.items() if name != event.party}
            self.privacy = privacy if row is None else {**privacy, event.party: row}
            return
        warning = {"party": str(event.party), "message": str(event.message),
                   "epsilon_after": _number(event.epsilon_after), "epsilon_budget": _number(event.epsilon_budget)}
        if warning not in self.warnings:
            self.warnings = [*self.warnings, warning][-MAX_WARNINGS:]

    def _secure_of(self, round_: int) -> str:
        """What the coordinator saw of round ``round_`` under secure aggregation ("sum of N parties"), else ''."""
        history = self._history
        if history is None:
            return ""
        for record in reversed(list(history)):
            if record.round == round_:
                secure = getattr(record, "secure", None) or {}
                return str(secure.get("sum of", "")) if isinstance(secure, Mapping) else ""
        return ""

    def _render(self) -> None:
        """Set the traits from the run state (unchanged values send nothing)."""
        run = self._run
        many = bool(run.population)  # thousands of parties: summarised, never one row (or curve) each
        self.population = population_summary(run) if many else {}
        self.parties = [] if many else [
            {"name": p.name, "status": p.status, "examples": p.examples, **_loss_accuracy(p.metrics),
             "seconds": _number(p.seconds), "detail": p.detail} for p in run.parties]
        self.history = [{"round": r.round, **_loss_accuracy(r.shown()), "seconds": _number(r.seconds),
                         "evaluated": r.evaluated,
                         "parties": {} if many else {name: _loss_accuracy(m) for name, m in r.shown_parties().items()}}
                        for r in run.history()]
        self.strategy, self.first_round, self.last_round = run.strategy, run.first_round, run.last_round
        self.error = ERROR_BELOW if run.error and self._error_below else run.error
        self.round, self.rounds_done, self.eta = run.round, run.rounds_done, run.eta()
        self.state = run.state

    # -- the Stop button ------------------------------------------------------------------------

    def _on_message(self, widget: Any, content: Any, buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "stop":
            self._request_stop()
        else:
            log.warning("dashboard got an unknown message: %r", content)

    def _request_stop(self) -> None:
        with self._lock:
            if self._run.state != "training":
                return
        # on_stop runs outside the lock: it may publish events, which take the lock.
        if self._on_stop is not None:
            self._on_stop()
        with self._lock, self.hold_sync():
            self._run = self._run.stopping()  # a no-op when training ended meanwhile
            self._render()

    # -- without a browser ----------------------------------------------------------------------

    def _headline(self) -> list[str]:
        total = max(self.last_round - self.first_round + 1, 0)
        state = {"idle": "waiting for training", "training": "training", "stopping": "stopping after this round",
                 "stopped": "stopped", "done": "done", "error": "failed"}[self.state]
        lines = [f"{self.title or 'fednb training'}: {state}"]
        if self.state != "idle":
            parts = [f"{self.rounds_done}/{total} rounds"]
            if self.first_round != 1 and total:
                parts[0] += f" (rounds {self.first_round}-{self.last_round})"
            aggregated = self.history[-1]["round"] if self.history else 0
            if self.state in ("training", "stopping") and self.round > aggregated:
                parts.append(f"round {self.round} in progress")
            parts.append(f"elapsed {_duration(self.elapsed)}")
            if self.state in ("training", "stopping"):
                parts.append(f"ETA {_duration(self.eta)}")
            if self.strategy:
                parts.append(f"strategy {self.strategy}")
            lines.append(", ".join(parts))
        if self.history:
            last = self.history[-1]
            which = "test" if last["evaluated"] else "train"
            lines.append(f"round {last['round']} ({which}): accuracy {_fixed(last['accuracy'], 4)}, "
                         f"loss {_fixed(last['loss'], 4)}")
        if self.secure:
            lines.append(f"secure aggregation: the coordinator saw the {self.secure}")
        lines += [f"warning: {_warning_text(w)}" for w in self.warnings]
        if self.error:
            lines.append(f"error: {self.error}")
        return lines

    def _tables(self) -> tuple[Table, Table | None]:
        with self._lock:
            parties, history, privacy = list(self.parties), list(self.history), dict(self.privacy)
            population = dict(self.population)
        columns = ["party", "status", "examples", "loss", "accuracy", "time"] + (["ε / budget"] if privacy else [])
        party_table = Table([*columns, "detail"],
                            [[r["name"], r["status"], r["examples"], _fixed(r["loss"], 4), _fixed(r["accuracy"], 4),
                              _duration(r["seconds"]) if r["seconds"] is not None else "",
                              *([_budget_text(privacy.get(r["name"]))] if privacy else []), r["detail"]]
                             for r in parties])
        if population:
            losses = population["losses"]
            spread = (f"{_fixed(losses['median'], 4)} ({_fixed(losses['edges'][0], 4)} – "
                      f"{_fixed(losses['edges'][-1], 4)})" if losses["counts"] else "")
            party_table = Table(["parties", "available", "round", "sampled", "done", "dropped",
                                 "training loss: median (range)"],
                                [[population["parties"], population["available"], population["round"],
                                  population["sampled"], population["done"], population["dropped"], spread]])
        if not history:
            return party_table, None
        shown = history[-SUMMARY_ROUNDS:]
        caption = f"last {len(shown)} of {len(history)} rounds" if len(shown) < len(history) else ""
        round_table = Table(["round", "accuracy", "loss", "time", "metrics"],
                            [[h["round"], _fixed(h["accuracy"], 4), _fixed(h["loss"], 4), _duration(h["seconds"]),
                              "test" if h["evaluated"] else "train"] for h in shown], title=caption)
        return party_table, round_table

    def summary_text(self) -> str:
        """The current state as plain text: headline, one line per party, the recent rounds."""
        with self._lock:
            headline = self._headline()
        party_table, round_table = self._tables()
        blocks = ["\n".join(headline), repr(party_table)]
        if round_table is not None:
            blocks.append(repr(round_table))
        return "\n\n".join(blocks)

    def summary_html(self) -> str:
        """The current state as a small self-contained HTML block (everything escaped)."""
        with self._lock:
            headline, state = self._headline(), self.state
        party_table, round_table = self._tables()
        lines = "<br>".join(html.escape(line) for line in headline[1:])
        body = [f'<div class="fednb-dashboard-summary" data-state="{html.escape(state)}">',
                f"<p><strong>{html.escape(headline[0])}</strong>" + (f"<br>{lines}" if lines else "") + "</p>",
                party_table._repr_html_()]
        if round_table is not None:
            body.append(round_table._repr_html_())
        body.append("</div>")
        return "".join(body)

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The widget view plus text/plain and text/html summaries for front ends without widgets."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle or {}, {})
        return {**data, "text/plain": self.summary_text(), "text/html": self.summary_html()}, dict(metadata)
