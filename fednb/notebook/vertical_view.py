"""The live view of vertical training: an anywidget that follows ``VerticalProgress`` events.

``%fed_vtrain`` displays a :class:`VerticalDashboard` under the cell and subscribes it to the
federation's events (:meth:`VerticalDashboard.attach`): each epoch of each model (one per class
for one-vs-rest) becomes one batch of trait changes, which the ESM beside this file
(``vertical_view.js``, styled by the federation dashboard's ``dashboard.css``) draws as progress,
one row per party with its role (label or features) and table size, and an SVG chart of the
loss per epoch; after training, the test split's metrics. Front ends without widgets (terminal
IPython, nbconvert, papermill) get :meth:`summary_text` and :meth:`summary_html` from the same
MIME bundle. In a terminal :class:`VerticalLines` prints one line per event instead.
"""

from __future__ import annotations

import html
import math
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import anywidget
import traitlets as t

from fednb.federation.events import VerticalProgress
from fednb.notebook.display import Table

STATES = ("idle", "training", "done", "error")
#: Epochs listed per model in the text/HTML summaries; older ones are counted, not shown.
SUMMARY_EPOCHS = 20
#: The metrics of ``Vertical.evaluate``, in the order the view shows them, with their names there.
METRICS = {"auc": "AUC", "accuracy": "accuracy", "ks": "KS", "logloss": "log-loss"}


def _number(value: Any) -> float | None:
    """A value as the comm can carry it: a finite float, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fixed(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def describe(settings: Mapping[str, Any]) -> str:
    """``train_logistic``'s keywords in a few words: encryption, optimiser, batches."""
    encryption = f"Paillier {settings['key_bits']} bits" if settings.get("encrypted", True) else "plaintext (no encryption)"
    return (f"{encryption} · {settings['optimizer']} lr {settings['lr']:g}, batch {settings['batch_size']}, "
            f"L2 {settings['l2']:g}")


class VerticalDashboard(anywidget.AnyWidget):
    """Live view of hetero logistic regression: epochs with their loss, the parties' roles, test metrics.

    The traits are the whole state; :meth:`handle` turns events into trait changes. It can be
    built and fed events without a federation (tests, replays).
    """

    _esm = pathlib.Path(__file__).with_name("vertical_view.js")
    _css = pathlib.Path(__file__).with_name("dashboard.css")

    title = t.Unicode("").tag(sync=True)
    detail = t.Unicode("").tag(sync=True)  # encryption and optimiser, in a few words
    state = t.Enum(STATES, default_value="idle").tag(sync=True)
    parties = t.List(t.Dict()).tag(sync=True)  # rows: name, role ("label" / "features"), rows (table size)
    aligned = t.Int(0).tag(sync=True)  # rows in the intersection
    split = t.Dict().tag(sync=True)  # {"train": n, "test": m}
    epochs = t.Int(0).tag(sync=True)  # epochs per model
    labels = t.List(t.Unicode()).tag(sync=True)  # one per model: "" for a binary model, "class k" for one-vs-rest
    models = t.List(t.Dict()).tag(sync=True)  # per model started: label, history [{epoch, loss, seconds}]
    metrics = t.Dict().tag(sync=True)  # the test split's, after training
    note = t.Unicode("").tag(sync=True)  # why there are no metrics, when there are none
    elapsed = t.Float(0.0).tag(sync=True)  # seconds since the run started, as of the last event
    error = t.Unicode("").tag(sync=True)

    def __init__(self, *, title: str = "hetero logistic regression", detail: str = "",
                 classes: Sequence[int] | None = None, epochs: int = 0, **kwargs: Any) -> None:
        labels = [f"class {k}" for k in classes] if classes is not None else [""]
        super().__init__(title=title, detail=detail, labels=labels, epochs=epochs, **kwargs)
        self._started = time.monotonic()
        self._names: dict[str, int] = {}  # model name at the parties -> its index in models

    # -- following a vertical federation ------------------------------------------------------------

    def attach(self, vertical: Any) -> Callable[[], None]:
        """Show ``vertical``'s parties, roles and split and follow its federation's events; returns the unsubscribe."""
        with self.hold_sync():
            self.parties = [{"name": p, "role": vertical.roles.get(p, ""), "rows": int(vertical.sizes.get(p, 0))}
                            for p in vertical.parties]
            self.aligned, self.split = int(vertical.size), dict(vertical.splits)
        return vertical.federation.subscribe(self.handle)

    def handle(self, event: Any) -> None:
        """Apply one event: an epoch appends to its model's curve; others are not this view's."""
        if not isinstance(event, VerticalProgress):
            return
        with self.hold_sync():
            if event.roles and not self.parties:
                self.parties = [{"name": p, "role": r, "rows": 0} for p, r in event.roles.items()]
            if event.stage == "epoch":
                self._epoch(event)
            self.elapsed = time.monotonic() - self._started

    def _epoch(self, event: VerticalProgress) -> None:
        self.state = "training"
        if event.epochs:
            self.epochs = int(event.epochs)
        models = [dict(m, history=list(m["history"])) for m in self.models]
        index = self._names.get(event.model)
        if index is None:
            index = self._names[event.model] = len(models)
            label = self.labels[index] if index < len(self.labels) else event.model
            models.append({"label": label, "history": []})
        models[index]["history"].append({"epoch": int(event.epoch), "loss": _number(event.loss),
                                         "auc": _number(event.metrics.get("auc")), "seconds": _number(event.seconds)})
        self.models = models

    def finished(self, metrics: Mapping[str, Any] | None = None, *, note: str = "", error: str = "") -> None:
        """The run ended: its test metrics (or why there are none), or its error."""
        with self.hold_sync():
            self.metrics = {k: _number(v) for k, v in (metrics or {}).items()}
            self.note, self.error = note, error
            self.state = "error" if error else "done"
            self.elapsed = time.monotonic() - self._started

    # -- without a browser ----------------------------------------------------------------------

    def _progress(self) -> str:
        done = sum(len(m["history"]) for m in self.models)
        total = self.epochs * len(self.labels)
        parts = [f"{done}/{total} epochs" if total else f"{done} epochs"]
        if self.models and len(self.labels) > 1:
            parts.append(f"model {len(self.models)}/{len(self.labels)} ({self.models[-1]['label']})")
        if self.models and self.models[-1]["history"]:
            last = self.models[-1]["history"][-1]
            parts.append(f"epoch {last['epoch']}: loss {_fixed(last['loss'])}, {_fixed(last['seconds'], 1)} s")
        parts.append(f"elapsed {self.elapsed:.1f} s")
        return ", ".join(parts)

    def _headline(self) -> list[str]:
        state = {"idle": "waiting for the first epoch", "training": "training", "done": "done",
                 "error": "failed"}[self.state]
        lines = [f"{self.title}: {state}"]
        if self.detail:
            lines.append(self.detail)
        if self.aligned:
            split = f" (train {self.split['train']}, test {self.split['test']})" if self.split else ""
            lines.append(f"{self.aligned} aligned rows{split}")
        lines.append(self._progress())
        if self.metrics:
            lines.append("test split: " + ", ".join(f"{METRICS.get(k, k)} {_fixed(v)}" for k, v in self.metrics.items()))
        elif self.note:
            lines.append(self.note)
        if self.error:
            lines.append(f"error: {self.error}")
        return lines

    def _tables(self) -> list[Table]:
        parties = Table(["party", "role", "table rows"], [[p["name"], p["role"], p["rows"]] for p in self.parties])
        tables = [parties]
        for model in self.models:
            shown = model["history"][-SUMMARY_EPOCHS:]
            older = len(model["history"]) - len(shown)
            title = " ".join(filter(None, [model["label"], f"(last {len(shown)} epochs)" if older else ""]))
            tables.append(Table(["epoch", "loss", "test AUC", "seconds"],
                                [[h["epoch"], _fixed(h["loss"]), _fixed(h.get("auc")), _fixed(h["seconds"], 2)]
                                 for h in shown], title=title))
        return tables

    def summary_text(self) -> str:
        """The current state as plain text: headline, the parties, each model's epochs."""
        return "\n\n".join(["\n".join(self._headline()), *(repr(table) for table in self._tables())])

    def summary_html(self) -> str:
        """The current state as a small self-contained HTML block (everything escaped)."""
        headline = self._headline()
        lines = "<br>".join(html.escape(line) for line in headline[1:])
        return "".join([f'<div class="fednb-vertical-summary" data-state="{html.escape(self.state)}">',
                        f"<p><strong>{html.escape(headline[0])}</strong><br>{lines}</p>",
                        *(table._repr_html_() for table in self._tables()), "</div>"])

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The widget view plus text/plain and text/html summaries for front ends without widgets."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle or {}, {})
        return {**data, "text/plain": self.summary_text(), "text/html": self.summary_html()}, dict(metadata)


class VerticalLines:
    """A terminal's view of vertical training: each event's message on a line of its own."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Any) -> None:
        if isinstance(event, VerticalProgress) and event.stage == "epoch":
            _, dot, label = event.model.rpartition(".")
            loss = "" if event.loss is None else f", loss {event.loss:.4f}"
            print(f"{f'class {label}, ' if dot else ''}epoch {event.epoch}/{event.epochs}{loss}, {event.seconds:.1f} s",
                  file=self.stream, flush=True)


def metrics_table(metrics: Mapping[str, Any], *, model: str = "", test_rows: int | None = None) -> Table:
    """``Vertical.evaluate``'s metrics as one row: the model, its test rows, then each metric."""
    names = [k for k in METRICS if k in metrics] + [k for k in metrics if k not in METRICS]
    return Table(["model", "test rows", *(METRICS.get(k, k) for k in names)],
                 [[model, "" if test_rows is None else test_rows, *(_number(metrics[k]) for k in names)]])


def alignment_table(vertical: Any) -> Table:
    """Each party of an aligned vertical federation: its role, its table's rows, the rows it shares."""
    return Table(["party", "role", "table rows", "aligned rows"],
                 [[p, vertical.roles.get(p, ""), vertical.sizes.get(p, ""), vertical.size] for p in vertical.parties])


class Following:
    """What ``%fed_vtrain`` shows while a model trains: the widget in a kernel, a line per epoch elsewhere.

    Built (and shown) just before training starts; :meth:`trained` or :meth:`failed` ends it. A
    foreground run's error is the magic's own one-line error, so the widget points there.
    """

    def __init__(self, shell: Any, vertical: Any, settings: Mapping[str, Any]) -> None:
        self.widget: VerticalDashboard | None = None
        self.metrics: dict[str, float] = {}
        self.note = ""
        if getattr(shell, "kernel", None) is None:
            self._detach = vertical.federation.subscribe(VerticalLines())
            self._handle: Any = None
            return
        from IPython.display import display

        self.widget = VerticalDashboard(detail=describe(settings), classes=settings.get("classes"),
                                        epochs=int(settings["epochs"]))
        self._detach = self.widget.attach(vertical)
        self._handle = display(self.widget, display_id=True)

    def trained(self, model: Any, vertical: Any) -> None:
        """Training ended: the test split's metrics, scored by the label party, end the view."""
        from fednb.errors import FednbError

        self._detach()
        try:
            self.metrics = vertical.evaluate(model)
        except (FednbError, ValueError) as exc:  # a party that has not approved scoring: train, don't score
            self.note = f"not scored on the test rows: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        self._show(metrics=self.metrics, note=self.note)

    def failed(self, error: BaseException) -> None:
        self._detach()
        interrupted = isinstance(error, KeyboardInterrupt)
        self._show(error="interrupted" if interrupted else "see the error below")

    def _show(self, **outcome: Any) -> None:
        if self.widget is not None:
            self.widget.finished(**outcome)
            self._handle.update(self.widget)  # static outputs (nbconvert, papermill) keep the final summary

    def summary(self, name: str, model: Any) -> str:
        """One line on the trained model: where it is, how long it took, how it scores."""
        count = len(model.models)
        what = f"{count} one-vs-rest models" if count > 1 else "hetero logistic regression"
        seconds = sum(model.seconds)
        per_epoch = seconds / len(model.seconds) if model.seconds else 0.0
        line = f"{name}: {what}, {model.config.epochs} epochs in {seconds:.1f} s ({per_epoch:.2f} s per epoch)"
        if self.metrics:
            line += "; test " + ", ".join(f"{METRICS.get(k, k)} {v:.4f}" for k, v in self.metrics.items())
        elif self.note:
            line += f"; {self.note}"
        return line + " — each party keeps its own weights"
