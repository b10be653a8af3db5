"""One notebook's fednb session: what the magics and the JupyterLab sidebar share.

The session holds the federation (``%fed_sim`` / ``%fed_connect``), the model definitions
recorded by ``%%fed_model``, the training run with its display (the dashboard in a kernel,
one line per round in a terminal) and the parties this kernel serves. The magics change it
through its methods; the sidebar reads it and subscribes to its changes, and never reaches
into the magics.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fednb.federation.events import TrainingFinished

if TYPE_CHECKING:
    from fednb.federation import Federation
    from fednb.federation.background import TrainingRun
    from fednb.notebook.dashboard import Dashboard

#: Loggers whose warnings repeat what the session's displays already show while it trains:
#: a party dropped from a round (a dashboard row, a progress line) and the run's own error
#: (the magic's one-line error, or the dashboard of a background run).
SHOWN_BY_DISPLAYS = ("fednb.federation.rounds", "fednb.federation.background")


class Session:
    """The federation, model sources, training run, dashboard and served parties of one shell."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.federation: Federation | None = None
        self.sources: dict[str, str] = {}  # variable name -> the model source recorded by %%fed_model
        self.model_name: str | None = None  # the variable last defined or trained
        self.training: TrainingRun | None = None
        self.background = False  # whether the training runs with --background
        self.dashboard: Dashboard | None = None  # the dashboard of the current or last run
        self.served: list[Any] = []  # parties this kernel serves (%fed_serve)
        self._listeners: list[Callable[[], None]] = []
        self._quiet = _WhileTraining(self)

    # -- watching it ----------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` whenever the federation or the training run changes; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    @property
    def source(self) -> str | None:
        """The source of the model last defined or trained (what the parties build)."""
        return self.sources.get(self.model_name) if self.model_name is not None else None

    @property
    def is_training(self) -> bool:
        return self.training is not None and not self.training.done

    # -- the federation -------------------------------------------------------------------------

    def adopt(self, federation: Federation) -> None:
        """Make ``federation`` the session's (closing the one before); the notebook's ``fed``."""
        self.close_federation()
        self.federation = federation
        self.shell.user_ns["fed"] = federation
        self._share_model()
        self.changed()

    def close_federation(self) -> None:
        """Stop training and close the session's federation (a new one replaces it, or unload)."""
        run, federation = self.training, self.federation
        self.training, self.federation = None, None
        self.changed()
        if run is not None and not run.done:
            run.stop()
        if federation is not None:
            federation.close()
            if self.shell.user_ns.get("fed") is federation:
                del self.shell.user_ns["fed"]
        if run is not None:
            run.wait(10)

    def record_model(self, name: str, source: str) -> None:
        self.sources[name] = source
        self.model_name = name
        self._share_model()

    def _share_model(self) -> None:
        """Tell the federation how the notebook's model is built, so that ``fed.train(model)`` needs no source."""
        if self.federation is None or self.model_name is None or self.source is None:
            return
        import torch

        model = self.shell.user_ns.get(self.model_name)
        if isinstance(model, torch.nn.Module):
            self.federation.use_model(model, self.source)

    # -- training -------------------------------------------------------------------------------

    def start_training(self, federation: Federation, model: Any, name: str, options: dict[str, Any], *,
                       background: bool) -> TrainingRun:
        """Start training ``model`` (the variable ``name``) with a display following it; raises
        the API's errors (bad options) before anything is shown."""
        follow = self._follow(federation, background=background)
        try:
            run = federation.train_in_background(model, self.sources.get(name), **options)
        except BaseException:
            follow(False)
            raise
        self.training, self.background, self.model_name = run, background, name
        follow(True)
        self.changed()
        return run

    def stop_training(self, *, now: bool = False) -> bool:
        """End the session's training after the round in progress (``now``: at once); False if none runs."""
        federation = self.federation
        if federation is None or not (self.is_training or federation.training):
            return False
        federation.stop(now=now)
        return True

    def interrupted(self) -> None:
        """Ctrl-C during training: cancel the work running at the parties; the model keeps the
        last completed round's weights."""
        if self.federation is not None:
            self.federation.stop(now=True)
        print("training interrupted: work at the parties cancelled; the model keeps the last completed round",
              file=sys.stderr, flush=True)

    def _follow(self, federation: Federation, *, background: bool) -> Callable[[bool], None]:
        """Subscribe a display to the next training run; call the result with whether it started.

        In a kernel the display is the dashboard widget, shown once the run has started and
        shown again (with its final summary) when it ends; in a terminal, one line per round.
        A foreground run's error is the magic's own one-line error, so its dashboard points
        there instead of repeating it.
        """
        from IPython.display import display

        handle: Any = None
        if getattr(self.shell, "kernel", None) is None:
            from fednb.federation.progress import RoundLines

            widget = None
            detach = federation.subscribe(RoundLines(sys.stdout, error_below=not background))
        else:
            from fednb.notebook.dashboard import Dashboard

            widget = Dashboard(title=f"{len(federation.parties)} parties", on_stop=federation.stop,
                               error_below=not background)
            detach = widget.attach(federation)

        # The run may end (its parties fail at once) while ``display`` is still showing the widget,
        # before ``handle`` is set: whichever of the two comes second shows the final summary.
        shown = threading.Lock()
        finished = False

        def on_finished(event: Any) -> None:
            nonlocal finished
            if isinstance(event, TrainingFinished):
                stop_following()
                with shown:
                    finished, display_handle = True, handle
                if display_handle is not None:
                    display_handle.update(widget)  # static outputs (nbconvert, papermill) keep the final summary

        unsubscribe = federation.subscribe(on_finished)

        def stop_following() -> None:
            detach()
            unsubscribe()

        def started(ok: bool) -> None:
            nonlocal handle
            if not ok:
                stop_following()
            elif widget is not None:
                self.dashboard = widget
                drawn = display(widget, display_id=True)
                with shown:
                    handle, ended = drawn, finished
                if ended:
                    handle.update(widget)

        return started

    # -- lifecycle ------------------------------------------------------------------------------

    def quiet_logs(self, on: bool) -> None:
        """While this session trains, keep the warnings its displays already show out of the output."""
        for name in SHOWN_BY_DISPLAYS:
            logger = logging.getLogger(name)
            if on:
                logger.addFilter(self._quiet)
            else:
                logger.removeFilter(self._quiet)

    def stop_serving(self) -> None:
        """Stop the parties this kernel serves through %fed_serve."""
        while self.served:
            self.served.pop().stop()


class _WhileTraining(logging.Filter):
    """Drops warnings that a display of the session's running training shows already."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self._session = session

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not self._session.is_training
