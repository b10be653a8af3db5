"""Training that runs on its own thread while the notebook stays usable.

``Federation.train_in_background(...)`` returns a :class:`TrainingRun` at once; the rounds go
on on a worker thread, each one's global weights are loaded into the caller's model only
after that round is aggregated, and :meth:`TrainingRun.stop` ends the run after the round in
progress. The federation's socket I/O stays on the federation's own thread as always.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fednb.federation.history import History

log = logging.getLogger(__name__)


class TrainingRun:
    """A handle on training that runs in the background: wait for it, stop it, read its outcome."""

    def __init__(self, train: Callable[[], History], stop: Callable[[], None], *, name: str = "fednb-training") -> None:
        self._train = train
        self._stop = stop
        self._done = threading.Event()
        self.history: History | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> TrainingRun:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.history = self._train()
        except BaseException as exc:  # noqa: BLE001 - kept for wait()/result(), which re-raise it
            self.error = exc
            log.info("background training ended with %s: %s", type(exc).__name__, exc)
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """End training after the round in progress (returns at once; :meth:`wait` to block)."""
        self._stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until training ended (True) or ``timeout`` passed (False)."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> History:
        """The history once training ended; re-raises its error; TimeoutError if still running."""
        if not self._done.wait(timeout):
            raise TimeoutError("training is still running")
        if self.error is not None:
            raise self.error
        assert self.history is not None
        return self.history

    def __repr__(self) -> str:
        state = "running" if not self.done else ("failed" if self.error else "done")
        return f"<TrainingRun {state}>"
