"""What the JupyterLab sidebar is told, and what it may ask: the snapshot and request formats.

Pure data, no IPython: :class:`RunTracker` keeps the current (or last) training run
(a :class:`~fednb.federation.runstate.RunState`) with its times, :func:`snapshot` builds the one message the kernel sends
(``{"type": "snapshot", "version": 1, ...}``, plain JSON, never NaN), and
:func:`parse_request` checks what the panel sends back before anything acts on it::

    {"type": "refresh"}                 send a snapshot now
    {"type": "stop"}                    end training after the round in progress
    {"type": "approve", "id": "…"}      approve a pending request (a party served with %fed_serve)
    {"type": "deny", "id": "…"}         deny one

The TypeScript side (``labextension/src/protocol.ts``) validates the snapshot the same way.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fednb.federation.events import Event, TrainingFinished, TrainingStarted
from fednb.federation.runstate import LARGE, RunState

VERSION = 1
TARGET = "fednb.sidebar"
REQUESTS = ("refresh", "stop", "approve", "deny")
MAX_ID = 128
MAX_TEXT = 4000

RequestType = Literal["refresh", "stop", "approve", "deny"]


@dataclass(frozen=True)
class Request:
    """A message from the panel, checked: its type and, for approve/deny, the request id."""

    type: RequestType
    id: str | None = None


def parse_request(data: Any) -> Request:
    """Check a message from the panel; ValueError says what is wrong with it."""
    if not isinstance(data, Mapping):
        raise ValueError("a sidebar request must be a JSON object")
    kind = data.get("type")
    if kind not in REQUESTS:
        raise ValueError(f"unknown sidebar request type {kind!r}; expected one of {', '.join(REQUESTS)}")
    extra = set(data) - {"type", "id"}
    if extra:
        raise ValueError(f"unexpected fields in a {kind!r} request: {', '.join(sorted(map(str, extra)))}")
    ident = data.get("id")
    if kind in ("approve", "deny"):
        if not isinstance(ident, str) or not 0 < len(ident) <= MAX_ID or not ident.isprintable():
            raise ValueError(f"a {kind!r} request needs an 'id': a printable string of 1 to {MAX_ID} characters")
        return Request(kind, ident)
    if ident is not None:
        raise ValueError(f"a {kind!r} request takes no 'id'")
    return Request(kind)


def finite(value: Any) -> float | None:
    """A JSON-safe number: None for anything that is not a finite real."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def text(value: Any, limit: int = MAX_TEXT) -> str:
    value = "" if value is None else str(value)
    return value if len(value) <= limit else value[: limit - 1] + "…"


class RunTracker:
    """The current or last training run, as the panel shows it: a :class:`RunState` and the times.

    Thread-safe: events arrive on the federation's threads, snapshots are read on another.
    Round numbers are counted within the run (round 1 of ``--rounds 5`` is ``1/5`` even when
    the history already holds earlier rounds).
    """

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._run = RunState()
        self._started = 0.0
        self._ended: float | None = None

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, TrainingStarted):
                self._started, self._ended = self._clock(), None
            elif isinstance(event, TrainingFinished) and self._run.started:
                self._ended = self._clock()
            self._run = self._run.apply(event)

    def stopping(self) -> None:
        """Mark the running training as asked to stop (it ends after the round in progress)."""
        with self._lock:
            self._run = self._run.stopping()

    def view(self) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """The run as JSON (with ``elapsed`` seconds) and each party's part in the round in progress."""
        with self._lock:
            run, started, ended = self._run, self._started, self._ended
            if not run.started:
                return None, {}
            end = ended if ended is not None else self._clock()
        _, metrics = run.latest()
        view = {"state": run.state, "strategy": run.strategy, "round": max(run.round - run.first_round + 1, 0),
                "rounds": run.total_rounds, "rounds_done": run.rounds_done, "accuracy": finite(metrics.get("accuracy")),
                "loss": finite(metrics.get("loss")), "error": text(run.error) if run.error else None,
                "elapsed": round(end - started, 3)}
        return view, run.activity()


def privacy_summary(privacy: Any) -> dict[str, Any] | None:
    """A party's privacy summary (``PartyInfo.privacy``) as the panel shows it: ε spent, budget,
    remaining, δ and the number of charges; None for a party without a budget."""
    if not isinstance(privacy, Mapping) or finite(privacy.get("epsilon_budget")) is None:
        return None
    history = privacy.get("history")
    return {"epsilon_spent": finite(privacy.get("epsilon_spent")), "epsilon_budget": finite(privacy["epsilon_budget"]),
            "epsilon_remaining": finite(privacy.get("epsilon_remaining")), "delta": finite(privacy.get("delta")),
            "charges": len(history) if isinstance(history, (list, tuple)) else 0}


def secure_badge(history: Any, rounds_done: int) -> str | None:
    """"sum of N parties" when the run's last aggregated round was securely aggregated, else None.

    ``history`` is the federation's History, whose last record is the run's last round once the
    run has aggregated one (``rounds_done`` > 0).
    """
    if rounds_done <= 0 or history is None or not len(history):
        return None
    secure = getattr(history[-1], "secure", None)
    badge = secure.get("sum of") if isinstance(secure, Mapping) else None
    return text(badge, 200) if badge else None


def party_rows(status: Iterable[Any], seen: Mapping[str, float | None],
               activity: Mapping[str, str]) -> list[dict[str, Any]]:
    """One JSON row per party from ``Federation.status()`` rows, seconds since last heard and round
    activity; ``privacy`` is its budget (:func:`privacy_summary`), None without one."""
    rows = []
    for row in status:
        rows.append({
            "name": text(row.name, 200), "endpoint": text(row.endpoint, 500), "status": text(row.status, 40),
            "examples": row.examples if isinstance(row.examples, int) and not isinstance(row.examples, bool) else None,
            "last_round": row.last_round if isinstance(row.last_round, int) else None,
            "last_seen": finite(seen.get(row.name)), "activity": activity.get(row.name),
            "error": text(row.last_error, 500),
            "containment": text(getattr(row, "containment", "unknown"), 40),
            "privacy": privacy_summary(getattr(row, "privacy", None)),
        })
    return rows


def listed(status: list[Any], activity: Mapping[str, str], limit: int = LARGE) -> tuple[list[Any], dict[str, int] | None]:
    """The ``Federation.status()`` rows the panel lists, and for a population of more than ``limit``
    parties their counts: then only the round's parties and those not online are listed (at most ``limit``)."""
    if len(status) <= limit:
        return status, None
    shown = [row for row in status if row.name in activity or row.status != "online"][:limit]
    return shown, {"parties": len(status), "online": sum(row.status == "online" for row in status), "shown": len(shown)}


def snapshot(seq: int, *, parties: list[dict[str, Any]] | None, run: dict[str, Any] | None, background: bool,
             approvals: list[dict[str, Any]] | None, population: dict[str, int] | None = None) -> dict[str, Any]:
    """The message the panel renders; ``parties`` None means the kernel has no federation; ``population``,
    the counts of a federation larger than the parties listed (:func:`listed`)."""
    federation = None if parties is None else {"parties": parties, **({"population": population} if population else {})}
    if run is not None:
        run = {**run, "background": bool(background)}
    return {"type": "snapshot", "version": VERSION, "seq": seq, "federation": federation, "run": run,
            "approvals": approvals}


def approval_rows(pending: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pending approval requests as JSON rows: id, coordinator, kind, code (cut to a few KB), what it returns, age."""
    rows = []
    for item in pending:
        rows.append({"id": text(item.get("id"), MAX_ID), "coordinator": text(item.get("coordinator"), 200),
                     "kind": text(item.get("kind"), 40), "code": text(item.get("code")),
                     "returns": text(item.get("returns"), 500), "hash": text(item.get("hash"), 128),
                     "age": finite(item.get("age"))})
    return rows
