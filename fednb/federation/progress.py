"""Training progress as plain text lines: the display for terminals, logs and ``fednb demo``."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from fednb.federation.events import Event, PartyDropped, PartyStatus, TrainingFinished, TrainingStarted
from fednb.federation.runstate import RoundState, RunState


class RoundLines:
    """An event subscriber that writes one line per round (and one per drop), from a :class:`RunState`.

    ::

        round  train loss  test accuracy     time
            1      0.7335         0.5905    0.31s

    A round's line is written once its numbers are final (:meth:`RunState.settled`): when its
    evaluation arrives, which may be after the next round began, or when it is clear none will.
    """

    def __init__(self, out: TextIO | None = None, *, header: bool = True, error_below: bool = False) -> None:
        """``error_below``: the caller shows the run's error itself (a magic raising it), so the
        last line says where instead of repeating it."""
        self.out = out if out is not None else sys.stdout
        self._header = header
        self._error_below = error_below
        self._lock = threading.Lock()  # events come from the round loop's and the connection's threads
        self._run = RunState()
        self._written: set[int] = set()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, TrainingStarted):
                self._written.clear()  # a new run: its rounds get lines of their own
            self._run = self._run.apply(event)
            for entry in self._run.history():
                if entry.round not in self._written and self._run.settled(entry.round):
                    self._written.add(entry.round)
                    self._round_line(entry)
            if isinstance(event, PartyDropped):
                self._write(f"{'':7}{event.party} {'late' if event.late else 'dropped'}: {event.reason}")
            elif isinstance(event, PartyStatus) and event.status not in ("online", "connecting"):
                self._write(f"{'':7}{event.party} is {event.status}" + (f": {event.detail}" if event.detail else ""))
            elif isinstance(event, TrainingFinished) and (event.stopped or event.error):
                why = "see the error below" if event.error and self._error_below else event.error or "stopped"
                self._write(f"training ended after {event.rounds_done} round(s): {why}")

    def _round_line(self, entry: RoundState) -> None:
        if self._header:
            self._write(f"{'round':>5}  {'train loss':>10}  {'test accuracy':>13}  {'time':>7}")
            self._header = False
        accuracy = (entry.evaluation or {}).get("accuracy", float("nan"))
        seconds = entry.seconds if entry.seconds is not None else float("nan")
        self._write(f"{entry.round:>5}  {entry.metrics.get('loss', float('nan')):>10.4f}  {accuracy:>13.4f}  "
                    f"{seconds:>6.2f}s")

    def _write(self, line: str) -> None:
        print(line, file=self.out, flush=True)
