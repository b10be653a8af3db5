"""The live view of vertical training: an anywidget that follows ``VerticalProgress`` events.

``%fed_vtrain`` displays a :class:`VerticalDashboard` under the cell and subscribes it to the
federation's events (:meth:`VerticalDashboard.attach`); each event becomes one batch of trait
changes, which the ESM beside this file (``vertical_view.js``, styled by the federation
dashboard's ``dashboard.css``) draws: progress, one row per party with its role (label or
features) and table size, an SVG chart, and after training the test split's metrics. Its
``mode`` is the algorithm's. Hetero logistic regression ("logistic"): the loss per epoch of
each model (one per class for one-vs-rest). SecureBoost ("boosting"): the tree and level
growing now, the training loss and a test metric per tree, and after training each party's
feature importance as horizontal bars. Front ends without widgets (terminal IPython,
nbconvert, papermill) get :meth:`summary_text` and :meth:`summary_html` from the same MIME
bundle. In a terminal :class:`VerticalLines` prints one line per epoch or tree instead.
"""

from __future__ import annotations

import html
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import anywidget
import traitlets as t

from fednb.federation.events import VerticalProgress
from fednb.notebook.display import Table
from fednb.notebook.vertical_tables import METRICS, Importance, _number, importance_rows
from fednb.vertical.boosted import BoostingModel

STATES = ("idle", "training", "done", "error")
MODES = ("logistic", "boosting")
#: Epochs (trees) listed per model in the text/HTML summaries; older ones are counted, not shown.
SUMMARY_EPOCHS = 20
#: The test metric a boosting curve follows: the first of these that the objective has.
CURVE_METRICS = ("auc", "accuracy", "r2")


def _fixed(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def mode_of(settings: Mapping[str, Any]) -> str:
    """"boosting" for ``train_boosting``'s keywords, "logistic" for ``train_logistic``'s."""
    return "boosting" if "trees" in settings else "logistic"


def describe(settings: Mapping[str, Any]) -> str:
    """The training keywords in a few words: encryption, then the optimiser and batches, or the trees' shape."""
    encryption = f"Paillier {settings['key_bits']} bits" if settings.get("encrypted", True) else "plaintext (no encryption)"
    if mode_of(settings) == "boosting":
        return (f"{encryption} · {settings['objective']}, {settings['trees']} trees of depth {settings['depth']}, "
                f"{settings['bins']} bins, lr {settings['lr']:g}, L2 {settings['l2']:g}")
    return (f"{encryption} · {settings['optimizer']} lr {settings['lr']:g}, batch {settings['batch_size']}, "
            f"L2 {settings['l2']:g}")


def curve_metric(rounds: Sequence[Mapping[str, Any]]) -> str | None:
    """The test metric a boosting curve follows: AUC (binary), accuracy (multiclass) or R² (regression)."""
    return next((k for k in CURVE_METRICS if any(r.get(k) is not None for r in rounds)), None)


class VerticalDashboard(anywidget.AnyWidget):
    """Live view of vertical training: progress, the parties' roles, a curve per epoch or tree, test metrics.

    The traits are the whole state; :meth:`handle` turns events into trait changes. It can be
    built and fed events without a federation (tests, replays).
    """

    _esm = pathlib.Path(__file__).with_name("vertical_view.js")
    _css = pathlib.Path(__file__).with_name("dashboard.css")

    mode = t.Enum(MODES, default_value="logistic").tag(sync=True)
    title = t.Unicode("").tag(sync=True)
    detail = t.Unicode("").tag(sync=True)  # encryption and optimiser or trees, in a few words
    state = t.Enum(STATES, default_value="idle").tag(sync=True)
    parties = t.List(t.Dict()).tag(sync=True)  # rows: name, role ("label" / "features"), rows (table size)
    aligned = t.Int(0).tag(sync=True)  # rows in the intersection
    split = t.Dict().tag(sync=True)  # {"train": n, "test": m}
    epochs = t.Int(0).tag(sync=True)  # logistic: epochs per model
    labels = t.List(t.Unicode()).tag(sync=True)  # one per model: "" for a binary model, "class k" for one-vs-rest
    models = t.List(t.Dict()).tag(sync=True)  # per model started: label, history [{epoch, loss, seconds}]
    trees = t.Int(0).tag(sync=True)  # boosting: rounds of trees
    depth = t.Int(0).tag(sync=True)  # boosting: levels per tree
    position = t.Dict().tag(sync=True)  # boosting: {"tree": k, "level": l}, the level growing now
    rounds = t.List(t.Dict()).tag(sync=True)  # boosting, per tree done: tree, loss (training), seconds, test metrics
    importance = t.List(t.Dict()).tag(sync=True)  # boosting, after training: party, feature, splits, gain
    metrics = t.Dict().tag(sync=True)  # the test split's, after training
    note = t.Unicode("").tag(sync=True)  # why there are no metrics, when there are none
    elapsed = t.Float(0.0).tag(sync=True)  # seconds since the run started, as of the last event
    error = t.Unicode("").tag(sync=True)

    def __init__(self, *, mode: str = "logistic", title: str | None = None, detail: str = "",
                 classes: Sequence[int] | None = None, epochs: int = 0, trees: int = 0, depth: int = 0,
                 **kwargs: Any) -> None:
        labels = [f"class {k}" for k in classes] if classes is not None else [""]
        if title is None:
            title = "SecureBoost" if mode == "boosting" else "hetero logistic regression"
        super().__init__(mode=mode, title=title, detail=detail, labels=labels, epochs=epochs, trees=trees,
                         depth=depth, **kwargs)
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
        """Apply one event: an epoch or a tree appends to its curve, a level moves the progress; others are not
        this view's."""
        if not isinstance(event, VerticalProgress):
            return
        with self.hold_sync():
            if event.roles and not self.parties:
                self.parties = [{"name": p, "role": r, "rows": 0} for p, r in event.roles.items()]
            if event.stage == "epoch":
                self._epoch(event)
            elif event.stage in ("level", "tree"):
                self._tree(event)
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

    def _tree(self, event: VerticalProgress) -> None:
        self.state = "training"
        if event.trees:
            self.trees, self.depth = int(event.trees), int(event.depth)
        if event.stage == "level":
            self.position = {"tree": int(event.tree), "level": int(event.level)}
            return
        self.position = {"tree": int(event.tree), "level": int(event.depth)}
        scored = {k: _number(v) for k, v in event.metrics.items()}
        self.rounds = [*self.rounds, {"tree": int(event.tree), "loss": _number(event.loss),
                                      "seconds": _number(event.seconds), **scored}]

    def finished(self, metrics: Mapping[str, Any] | None = None, *, note: str = "", error: str = "",
                 importance: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> None:
        """The run ended: its test metrics (or why there are none) and, for trees, the features' importance; or
        its error."""
        with self.hold_sync():
            self.metrics = {k: _number(v) for k, v in (metrics or {}).items()}
            self.importance = importance_rows(importance or {})
            self.note, self.error = note, error
            self.state = "error" if error else "done"
            self.elapsed = time.monotonic() - self._started

    # -- without a browser ----------------------------------------------------------------------

    def _progress(self) -> str:
        if self.mode == "boosting":
            return self._tree_progress()
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

    def _tree_progress(self) -> str:
        done, at = len(self.rounds), self.position
        parts = [f"{done}/{self.trees} trees" if self.trees else f"{done} trees"]
        if self.state == "training" and at.get("tree", 0) > done:
            parts.append(f"tree {at['tree']}/{self.trees}, level {at['level']}/{self.depth}")
        if self.rounds:
            last, metric = self.rounds[-1], curve_metric(self.rounds)
            shown = f", test {METRICS[metric]} {_fixed(last.get(metric))}" if metric else ""
            parts.append(f"tree {last['tree']}: loss {_fixed(last['loss'])}{shown}, {_fixed(last['seconds'], 1)} s")
        parts.append(f"elapsed {self.elapsed:.1f} s")
        return ", ".join(parts)

    def _headline(self) -> list[str]:
        first = "the first tree" if self.mode == "boosting" else "the first epoch"
        state = {"idle": f"waiting for {first}", "training": "training", "done": "done", "error": "failed"}[self.state]
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
        if self.mode == "boosting":
            shown = self.rounds[-SUMMARY_EPOCHS:]
            names = [k for k in ("auc", "accuracy", "mse", "r2") if any(r.get(k) is not None for r in shown)]
            title = f"last {len(shown)} trees" if len(self.rounds) > len(shown) else ""
            tables.append(Table(["tree", "loss", *(f"test {METRICS[k]}" for k in names), "seconds"],
                                [[r["tree"], _fixed(r["loss"]), *(_fixed(r.get(k)) for k in names),
                                  _fixed(r["seconds"], 2)] for r in shown], title=title))
            if self.importance:
                tables.append(Importance(self.importance, parties=[p["name"] for p in self.parties]).table())
        for model in self.models:
            shown = model["history"][-SUMMARY_EPOCHS:]
            older = len(model["history"]) - len(shown)
            title = " ".join(filter(None, [model["label"], f"(last {len(shown)} epochs)" if older else ""]))
            tables.append(Table(["epoch", "loss", "test AUC", "seconds"],
                                [[h["epoch"], _fixed(h["loss"]), _fixed(h.get("auc")), _fixed(h["seconds"], 2)]
                                 for h in shown], title=title))
        return tables

    def summary_text(self) -> str:
        """The current state as plain text: headline, the parties, each model's epochs (or the trees and the
        features' importance)."""
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
    """A terminal's view of vertical training: each epoch's or tree's message on a line of its own."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Any) -> None:
        if isinstance(event, VerticalProgress) and event.stage == "epoch":
            _, dot, label = event.model.rpartition(".")
            loss = "" if event.loss is None else f", loss {event.loss:.4f}"
            print(f"{f'class {label}, ' if dot else ''}epoch {event.epoch}/{event.epochs}{loss}, {event.seconds:.1f} s",
                  file=self.stream, flush=True)
        elif isinstance(event, VerticalProgress) and event.stage == "tree":
            loss = "" if event.loss is None else f", loss {event.loss:.4f}"
            metric = curve_metric([event.metrics])
            shown = f", test {METRICS[metric]} {event.metrics[metric]:.4f}" if metric else ""
            print(f"tree {event.tree}/{event.trees}{loss}{shown}, {event.seconds:.1f} s", file=self.stream, flush=True)


class Following:
    """What ``%fed_vtrain`` shows while a model trains: the widget in a kernel, a line per epoch or tree elsewhere.

    Built (and shown) just before training starts; :meth:`trained` or :meth:`failed` ends it. A
    foreground run's error is the magic's own one-line error, so the widget points there.
    """

    def __init__(self, shell: Any, vertical: Any, settings: Mapping[str, Any]) -> None:
        self.widget: VerticalDashboard | None = None
        self.metrics: dict[str, float] = {}
        self.note = ""
        self.label_party = vertical.label_party
        if getattr(shell, "kernel", None) is None:
            self._detach = vertical.federation.subscribe(VerticalLines())
            self._handle: Any = None
            return
        from IPython.display import display

        mode = mode_of(settings)
        self.widget = VerticalDashboard(mode=mode, detail=describe(settings), classes=settings.get("classes"),
                                        epochs=int(settings.get("epochs", 0)), trees=int(settings.get("trees", 0)),
                                        depth=int(settings.get("depth", 0)))
        self._detach = self.widget.attach(vertical)
        self._handle = display(self.widget, display_id=True)

    def trained(self, model: Any, vertical: Any) -> None:
        """Training ended: the test split's metrics, scored by the label party, and for trees each party's feature
        importance end the view."""
        from fednb.errors import FednbError

        self._detach()
        importance = None
        try:
            self.metrics = vertical.evaluate(model)
            if isinstance(model, BoostingModel):
                importance = vertical.importance(model)
        except (FednbError, ValueError) as exc:  # a party that has not approved scoring: train, don't score
            self.note = f"not scored on the test rows: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        self._show(metrics=self.metrics, note=self.note, importance=importance)

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
        seconds = sum(model.seconds)
        per = seconds / len(model.seconds) if model.seconds else 0.0
        if isinstance(model, BoostingModel):
            trees = f"{len(model.seconds)} rounds of {model.classes} trees" if model.classes > 1 else \
                f"{len(model.seconds)} trees"
            line = (f"{name}: SecureBoost, {trees} of depth {model.config.depth} in {seconds:.1f} s "
                    f"({per:.2f} s per {'round' if model.classes > 1 else 'tree'}, set up in {model.setup_seconds:.1f} s)")
            keeps = f"each party keeps its own thresholds, {self.label_party} the leaf weights"
        else:
            count = len(model.models)
            what = f"{count} one-vs-rest models" if count > 1 else "hetero logistic regression"
            line = f"{name}: {what}, {model.config.epochs} epochs in {seconds:.1f} s ({per:.2f} s per epoch)"
            keeps = "each party keeps its own weights"
        if self.metrics:
            line += "; test " + ", ".join(f"{METRICS.get(k, k)} {v:.4f}" for k, v in self.metrics.items())
        elif self.note:
            line += f"; {self.note}"
        return f"{line} — {keeps}"
