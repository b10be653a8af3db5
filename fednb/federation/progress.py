"""Training progress as plain text lines: the display for terminals, logs and ``fednb demo``."""

from __future__ import annotations

import sys
from typing import TextIO

from fednb.federation.events import Event, PartyDropped, PartyStatus, RoundAggregated, TrainingFinished


class RoundLines:
    """An event subscriber that writes one line per aggregated round (and one per drop).

    ::

        round  train loss  test accuracy     time
            1      0.7335         0.5905    0.31s
    """

    def __init__(self, out: TextIO | None = None, *, header: bool = True) -> None:
        self.out = out if out is not None else sys.stdout
        self._header = header

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundAggregated):
            if self._header:
                self._write(f"{'round':>5}  {'train loss':>10}  {'test accuracy':>13}  {'time':>7}")
                self._header = False
            accuracy = (event.evaluation or {}).get("accuracy", float("nan"))
            self._write(f"{event.round:>5}  {event.metrics.get('loss', float('nan')):>10.4f}  {accuracy:>13.4f}  "
                        f"{event.seconds:>6.2f}s")
        elif isinstance(event, PartyDropped):
            self._write(f"{'':7}{event.party} {'late' if event.late else 'dropped'}: {event.reason}")
        elif isinstance(event, PartyStatus) and event.status not in ("online", "connecting"):
            self._write(f"{'':7}{event.party} is {event.status}" + (f": {event.detail}" if event.detail else ""))
        elif isinstance(event, TrainingFinished) and (event.stopped or event.error):
            why = event.error or "stopped"
            self._write(f"training ended after {event.rounds_done} round(s): {why}")

    def _write(self, line: str) -> None:
        print(line, file=self.out, flush=True)
