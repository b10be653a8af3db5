"""The live federation dashboard: an anywidget that follows one training run's events.

``%fed_train`` displays a :class:`Dashboard` under the cell and subscribes it to the
federation (:meth:`Dashboard.attach`). Each event becomes one batch of trait changes, which
the ESM beside this file (``dashboard.js``) draws as round progress, one row per party and an
SVG chart of global and per-party accuracy and loss, with a Stop button. Front ends without
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

from fednb.federation.events import (Event, PartyDone, PartyDropped, PartyStatus, RoundAggregated, RoundStarted,
                                     TrainingFinished, TrainingStarted)
from fednb.notebook.display import Table

if TYPE_CHECKING:
    from fednb.federation.federation import Federation

log = logging.getLogger(__name__)

#: Row statuses the round loop drives. Any other status (connecting, offline, refused,
#: "awaiting approval", ...) arrives through PartyStatus and is shown as it is.
ROUND_STATUSES = ("waiting", "training", "done", "late", "dropped")
#: Values of :attr:`Dashboard.state`.
STATES = ("idle", "training", "stopping", "stopped", "done", "error")
#: Rounds listed in the text/HTML summaries; older ones are counted, not shown.
SUMMARY_ROUNDS = 20


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


def _new_row(name: str, status: str = "waiting", examples: int | None = None, detail: str = "") -> dict[str, Any]:
    return {"name": name, "status": status, "examples": examples, "loss": None, "accuracy": None, "seconds": None,
            "detail": detail}


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

    def __init__(self, *, title: str = "", on_stop: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(title=title, **kwargs)
        self._on_stop = on_stop
        # One lock orders every read-modify-write of the traits: events arrive from the round
        # loop's thread and the connection thread, the Stop message from the kernel's thread.
        self._lock = threading.RLock()
        self._clock: float | None = None  # monotonic time of TrainingStarted
        self._in_round: set[str] = set()  # asked this round, not yet done or dropped
        self._round_train: dict[str, dict[str, float | None]] = {}  # this round's train metrics per party
        self.on_msg(self._on_message)

    # -- following a federation ---------------------------------------------------------------

    def attach(self, federation: Federation) -> Callable[[], None]:
        """Show ``federation``'s parties and follow its events; returns the unsubscribe function."""
        rows = [_new_row(info.name, "waiting" if info.status == "online" else info.status, info.examples,
                         "" if info.status == "online" else info.last_error or "")
                for info in federation.status()]
        with self._lock, self.hold_sync():
            self.parties = rows
        return federation.subscribe(self.handle)

    def handle(self, event: Event) -> None:
        """Apply one federation event to the traits, as one batch of changes; thread-safe."""
        with self._lock, self.hold_sync():
            if isinstance(event, TrainingStarted):
                self._training_started(event)
            elif isinstance(event, RoundStarted):
                self._round_started(event)
            elif isinstance(event, PartyDone):
                self._party_done(event)
            elif isinstance(event, PartyDropped):
                self._party_dropped(event)
            elif isinstance(event, RoundAggregated):
                self._round_aggregated(event)
            elif isinstance(event, TrainingFinished):
                self._training_finished(event)
            elif isinstance(event, PartyStatus):
                self._party_status(event)
            else:
                log.debug("dashboard ignores %s", type(event).__name__)
                return
            if self._clock is not None:
                self.elapsed = time.monotonic() - self._clock

    def _rows(self) -> dict[str, dict[str, Any]]:
        """Copies of the rows by name: the synced list is replaced, never changed in place."""
        return {row["name"]: dict(row) for row in self.parties}

    def _update_row(self, name: str, **changes: Any) -> None:
        rows = self._rows()
        rows[name] = {**rows.get(name, _new_row(name)), **changes}
        self.parties = list(rows.values())

    def _training_started(self, event: TrainingStarted) -> None:
        rows = self._rows()
        fresh = []
        for name in event.parties:
            row = rows.get(name, _new_row(name))
            # Connection trouble (offline, refused, ...) outlives runs; round results do not.
            keep = row["status"] not in (*ROUND_STATUSES, "online")
            fresh.append({**row, "status": row["status"] if keep else "waiting", "detail": row["detail"] if keep else "",
                          "loss": None, "accuracy": None, "seconds": None})
        self._clock = time.monotonic()
        self._in_round, self._round_train = set(), {}
        self.parties = fresh
        self.strategy = event.strategy
        self.first_round = event.first_round
        self.last_round = event.first_round + event.rounds - 1
        self.round = 0
        self.rounds_done = 0
        self.history = []
        self.started_at = time.time()
        self.elapsed = 0.0
        self.eta = None
        self.error = ""
        self.state = "training"

    def _round_started(self, event: RoundStarted) -> None:
        if self._clock is None:  # attached after TrainingStarted: time from here
            self._clock = time.monotonic()
            self.started_at = time.time()
        rows = self._rows()
        for name in event.parties:
            rows[name] = {**rows.get(name, _new_row(name)), "status": "training", "detail": "", "seconds": None}
        self._in_round, self._round_train = set(event.parties), {}
        self.parties = list(rows.values())
        self.round = event.round
        self.last_round = event.rounds
        if self.state == "idle":
            self.state = "training"

    def _party_done(self, event: PartyDone) -> None:
        self._in_round.discard(event.party)
        self._round_train[event.party] = _loss_accuracy(event.metrics)
        self._update_row(event.party, status="done", examples=event.examples, seconds=_number(event.seconds),
                         detail="", **self._round_train[event.party])

    def _party_dropped(self, event: PartyDropped) -> None:
        self._in_round.discard(event.party)
        self._update_row(event.party, status="late" if event.late else "dropped", detail=event.reason)

    def _round_aggregated(self, event: RoundAggregated) -> None:
        # Curves use the global model's evaluation where the round had one; otherwise the
        # train metrics, for the global curve and the per-party curves alike, so that one
        # round never mixes the two.
        evaluated = event.evaluation is not None
        glob = _loss_accuracy(event.evaluation if evaluated else event.metrics)
        per_party = ({name: _loss_accuracy(m) for name, m in event.party_evaluation.items()} if evaluated
                     else dict(self._round_train))
        entry = {"round": event.round, **glob, "seconds": _number(event.seconds), "evaluated": evaluated,
                 "parties": per_party}
        history = [*self.history, entry]
        self.history = history
        self.rounds_done = len(history)
        self.round = event.round
        self.last_round = event.rounds
        times = [h["seconds"] for h in history if h["seconds"] is not None]
        left = max(event.rounds - event.round, 0)
        self.eta = (sum(times) / len(times)) * left if times else None

    def _training_finished(self, event: TrainingFinished) -> None:
        if self._in_round:  # an error or Ctrl-C cancelled their requests: no reply will come
            rows = self._rows()
            for name in self._in_round & rows.keys():
                rows[name] = {**rows[name], "status": "dropped", "detail": "round cancelled: training ended"}
            self.parties = list(rows.values())
        self._in_round = set()
        self.rounds_done = event.rounds_done
        self.error = event.error or ""
        self.state = "error" if event.error else "stopped" if event.stopped else "done"
        self.eta = 0.0 if self.state == "done" else None

    def _party_status(self, event: PartyStatus) -> None:
        rows = self._rows()
        if event.party not in rows and self.state != "idle":
            return  # a party outside this run
        row = rows.get(event.party, _new_row(event.party))
        status = event.status
        if status == "online":
            if event.party in self._in_round:
                status = "training"
            elif row["status"] in ("done", "late", "dropped"):
                status = row["status"]
            else:
                status = "waiting"
        self._update_row(event.party, status=status, detail=event.detail)

    # -- the Stop button ------------------------------------------------------------------------

    def _on_message(self, widget: Any, content: Any, buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "stop":
            self._request_stop()
        else:
            log.warning("dashboard got an unknown message: %r", content)

    def _request_stop(self) -> None:
        with self._lock:
            if self.state != "training":
                return
        # on_stop runs outside the lock: it may publish events, which take the lock.
        if self._on_stop is not None:
            self._on_stop()
        with self._lock:
            if self.state == "training":  # training may have ended meanwhile
                self.state = "stopping"

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
        if self.error:
            lines.append(f"error: {self.error}")
        return lines

    def _tables(self) -> tuple[Table, Table | None]:
        with self._lock:
            parties, history = list(self.parties), list(self.history)
        party_table = Table(["party", "status", "examples", "loss", "accuracy", "time", "detail"],
                            [[r["name"], r["status"], r["examples"], _fixed(r["loss"], 4), _fixed(r["accuracy"], 4),
                              _duration(r["seconds"]) if r["seconds"] is not None else "", r["detail"]]
                             for r in parties])
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
