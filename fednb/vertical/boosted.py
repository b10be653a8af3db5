"""The coordinator's side of SecureBoost: it drives the steps of :mod:`fednb.party.boosting` and relays sealed payloads.

One round (one tree per margin), as exchanges through the coordinator::

    label party:     sb.gradients                       ──> [[g, h]] sealed per feature party
    for each level:
      feature parties: sb.histograms  (sealed in)       ──> packed candidates, sealed for the label party
      label party:     sb.split       (sealed in)       ──> decisions, sealed per feature party
      feature parties: sb.apply       (sealed in)       ──> left rows, sealed for the label party
      label party:     sb.grow        (sealed in)       ──> next level's membership sealed, or the round's metrics

The coordinator opens nothing: it learns the number of rounds and levels, payload sizes, and the
metrics the label party reports. The Paillier key is the label party's (made at ``sb.start``).

With ``checkpoint=FILE`` the coordinator writes its part (the run id, the rounds done and their
metrics) after every round (:mod:`fednb.vertical.checkpoint`); the parties keep theirs (thresholds at
the feature parties; trees, leaves, margins and the key at the label party: :mod:`fednb.vertical.parts`),
and the same call again continues from the next round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.errors import FederationError
from fednb.vertical import checkpoint as vckpt
from fednb.vertical.boosting import BoostingConfig
from fednb.wire import Message, new_id


@dataclass
class BoostingModel:
    """A trained SecureBoost model: its name at the parties (trees, thresholds and leaf weights stay there)."""

    name: str
    config: BoostingConfig
    classes: int = 1
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0


def _sealed(reply: Message, name: str) -> np.ndarray:
    value = reply.arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 1:
        raise FederationError(f"a party sent no sealed {name!r}")
    return np.asarray(value)


def train(vfl: Any, config: BoostingConfig, checkpoint: str | os.PathLike[str] | None = None) -> BoostingModel:
    """Grow ``config.trees`` rounds of trees on the training split of the aligned federation ``vfl``; with
    ``checkpoint``, write the coordinator's part after every round, or continue the run it holds."""
    if not vfl.splits:
        vfl.split()
    label = vfl.label_party
    settings = {name: getattr(config, name) for name in BoostingConfig.__dataclass_fields__}
    options = {k: v for k, v in settings.items() if k != "trees"}
    saved = vckpt.resume(checkpoint, "boosting", vckpt.fingerprint(vfl, "boosting", options))
    if saved is not None:
        if saved.done > config.trees:
            raise vckpt.CheckpointError(f"cannot resume from {checkpoint}: it holds {saved.done} rounds of trees, "
                                        f"more than the {config.trees} asked")
        run = saved.run
        name, classes, history, seconds, setup = vckpt.boosting_record(saved, checkpoint)
        model = BoostingModel(name, config, classes, history, seconds, setup)
        vfl.progress(f"resuming SecureBoost {name} from {checkpoint} after {saved.done} round(s)")
    else:
        run = new_id()
        model = BoostingModel(run[:12], config)
    started = time.perf_counter()
    start = {"model": model.name, "config": settings, "training": run, "resume": saved.done if saved else None}
    try:
        replies = vfl._step("sb.start", vfl.parties, start)
    except FederationError as exc:
        if saved is None:
            raise
        raise vckpt.CheckpointError(f"cannot resume from {checkpoint}: {exc}") from None
    classes = int(vfl._answer(replies[label]).get("classes", 1))
    if saved is not None and classes != model.classes:
        raise vckpt.CheckpointError(f"cannot resume from {checkpoint}: the label party grows {classes} tree(s) a "
                                    f"round, the checkpoint {model.classes}")
    model.classes = classes
    if saved is None:
        model.setup_seconds = time.perf_counter() - started
    vfl.progress(f"SecureBoost {model.name}: {config.trees} rounds of {model.classes} tree(s), depth {config.depth}, "
                 f"{'Paillier ' + str(config.key_bits) + ' bits' if config.encrypted else 'PLAINTEXT'} "
                 f"(set up in {model.setup_seconds:.1f} s)")
    attempt = saved.attempt + 1 if saved is not None else 0

    def save() -> None:
        """The coordinator's part after the rounds of ``model.history``."""
        if checkpoint is not None:
            record = {"name": model.name, "classes": model.classes, "history": model.history,
                      "seconds": model.seconds, "setup_seconds": model.setup_seconds}
            vckpt.save(checkpoint, vckpt.VerticalCheckpoint("boosting", run, len(model.history),
                                                            vckpt.fingerprint(vfl, "boosting", options), record,
                                                            None, attempt))

    try:
        _rounds(vfl, model, save)
    except FederationError as exc:
        error = FederationError(f"SecureBoost {model.name} stopped after {len(model.history)} of {config.trees} "
                                f"rounds: {exc} (the rounds done stay usable: the error's .model)")
        error.model = model  # type: ignore[attr-defined]
        raise error from exc
    vfl._say("trained", f"SecureBoost {model.name}: {config.trees} rounds in {sum(model.seconds):.1f} s "
                        f"({sum(model.seconds) / config.trees:.2f} s per round)", model=model.name,
             seconds=sum(model.seconds))
    return model


def _rounds(vfl: Any, model: BoostingModel, save: Callable[[], None]) -> None:
    """The rounds from the first not in ``model.history`` on; ``save()`` after each."""
    config, label, features = model.config, vfl.label_party, list(vfl.features)
    for r in range(len(model.history), config.trees):
        began = time.perf_counter()
        at = {"model": model.name, "round": r}
        reply = vfl._step("sb.gradients", [label], at)[label]
        sealed = {h: _sealed(reply, f"sealed.{h}") for h in features}
        metrics: dict[str, float] = {}
        for level in range(config.depth):
            at = {"model": model.name, "round": r, "level": level}
            vfl._say("level", f"{model.name}: tree {r + 1}/{config.trees}, level {level + 1}/{config.depth}",
                     model=model.name, tree=r + 1, trees=config.trees, level=level + 1, depth=config.depth)
            hist = vfl._per_party("sb.histograms", {h: at for h in features}, {h: {"sealed": sealed[h]} for h in features})
            split = vfl._step("sb.split", [label], at,
                              arrays={label: {f"sealed.{h}": _sealed(hist[h], "sealed") for h in features}})[label]
            applied = vfl._per_party("sb.apply", {h: at for h in features},
                                     {h: {"sealed": _sealed(split, f"sealed.{h}")} for h in features})
            grown = vfl._step("sb.grow", [label], at,
                              arrays={label: {f"sealed.{h}": _sealed(applied[h], "sealed") for h in features}})[label]
            answer = vfl._answer(grown)
            if answer.get("done"):
                metrics = {k: float(v) for k, v in dict(answer.get("metrics") or {}).items()}
                break
            sealed = {h: _sealed(grown, f"sealed.{h}") for h in features}
        else:
            raise FederationError("the label party did not finish the round's trees at the last level")
        model.history.append(metrics)
        model.seconds.append(time.perf_counter() - began)
        save()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("loss", "auc", "accuracy", "mse"))
        vfl._say("tree", f"{model.name}: tree {r + 1}/{config.trees}, {shown}, {model.seconds[-1]:.1f} s",
                 model=model.name, tree=r + 1, trees=config.trees, depth=config.depth, loss=metrics.get("loss"),
                 seconds=model.seconds[-1], metrics={k: v for k, v in metrics.items() if k != "loss"})


def predict(vfl: Any, model: BoostingModel, positions: np.ndarray | None) -> np.ndarray:
    """The label party's predictions of test rows: P(y = 1), class probabilities, or values (regression)."""
    arrays = {vfl.label_party: {"positions": positions}} if positions is not None else None
    reply = vfl._step("sb.predict", [vfl.label_party], {"model": model.name}, arrays=arrays)[vfl.label_party]
    value = reply.arrays.get("predictions")
    if value is None or value.dtype != np.float64:
        raise FederationError("the label party sent no predictions")
    return np.asarray(value)


def evaluate(vfl: Any, model: BoostingModel) -> dict[str, float]:
    reply = vfl._step("sb.evaluate", [vfl.label_party], {"model": model.name})[vfl.label_party]
    return {k: float(v) for k, v in vfl._answer(reply)["metrics"].items()}


def importance(vfl: Any, model: BoostingModel) -> dict[str, dict[str, dict[str, float]]]:
    """Per party, per own feature (as the party numbers its columns): splits and total gain."""
    replies = vfl._step("sb.importance", vfl.parties, {"model": model.name})
    return {p: {f: {"splits": int(v[0]), "gain": float(v[1])} for f, v in vfl._answer(r)["importance"].items()}
            for p, r in replies.items()}
