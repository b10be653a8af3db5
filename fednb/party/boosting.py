"""A party's side of SecureBoost: the ``sb.*`` steps of the ``secureboost/1`` protocol.

::

    sb.start       a model's settings, its vertical run id ──> (label party) the margins per row; its Paillier key
                   is made here; with ``resume``: the rounds done, and the model is rebuilt from the part kept here
    sb.gradients   (label party) ──> [[g, h]] packed, sealed for each feature party
    sb.histograms  (feature party) [[g, h]] (level 0) or the node membership, sealed ──> packed candidates, sealed
    sb.split       (label party) the candidates, sealed ──> "your candidate k" for each feature party, sealed
    sb.apply       (feature party) its decisions, sealed ──> the rows that go left at its splits, sealed
    sb.grow        (label party) the left rows, sealed ──> the next level's membership, sealed; after the last
                   level: the round's metrics
    sb.evaluate    (label party) ──> test metrics       sb.predict (label party) ──> predictions of test rows
    sb.importance  ──> split counts and gains of this party's own features

Every payload between label and feature parties is sealed end to end (the coordinator relays
them and holds no key that opens them). What each party learns is in :mod:`fednb.vertical.secureboost`.

Each model's part is kept per vertical run id after every round (:mod:`fednb.vertical.parts`): the label
party's when ``sb.grow`` ends a round, a feature party's after each ``sb.apply`` (the state after the round,
should the round end there). A coordinator resuming a checkpointed run re-attaches to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.vertical import boosting as bt
from fednb.vertical.parts import FeaturePart, LabelPart
from fednb.vertical.secureboost import FeatureParty, LabelParty, Payload, test_metrics
from fednb.wire import bundle
from fednb.wire.vertical import scored_positions

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


@dataclass
class _Booster:
    role: LabelParty | FeatureParty
    config: bt.BoostingConfig
    round: int = -1
    level: int = -1
    stage: str = "start"  # the step this model expects next
    training: str | None = None  # the vertical run id its parts are kept under
    settings: dict[str, Any] = field(default_factory=dict)


def read_config(settings: Mapping[str, Any]) -> bt.BoostingConfig:
    """The model's settings as the coordinator sent them, checked."""
    allowed = set(bt.BoostingConfig.__dataclass_fields__)
    if not isinstance(settings, Mapping) or not set(settings) <= allowed:
        raise ValueError(f"boosting settings must be among {', '.join(sorted(allowed))}")
    return bt.BoostingConfig(**dict(settings))


class Boosting:
    """The ``sb.*`` steps of one party, on the aligned rows of its vertical federation (``vertical``)."""

    def __init__(self, vertical: Any) -> None:
        self.vertical = vertical
        self.models: dict[str, _Booster] = {}

    def handle(self, state: Any, step: str, request: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Reply:
        if step == "sb.start":
            return self._start(state, request)
        model = self.models.get(str(request.get("model")))
        if model is None:
            raise ValueError(f"{self.vertical.name} has no boosting model of that name")
        return getattr(self, "_" + step[3:])(state, model, request, arrays)

    # -- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _expect(model: _Booster, stage: str, request: Mapping[str, Any], *, label: bool, next_round: bool = False,
                next_level: bool = False) -> None:
        """The step must be this party's and come in protocol order: its round and level are the model's (or the
        next round's first level, or the next level, where the step opens one); then they are the model's."""
        if isinstance(model.role, LabelParty) != label:
            raise ValueError(f"this party is not the {'label' if label else 'feature'} party of this model")
        if model.stage != stage:
            raise ValueError(f"this model expects sb.{model.stage}, not sb.{stage}")
        r, level = request.get("round"), request.get("level", 0)
        if isinstance(r, bool) or not isinstance(r, int) or isinstance(level, bool) or not isinstance(level, int):
            raise ValueError("round and level must be integers")
        if next_round and level == 0:
            expected = (model.round + 1, 0)
        elif next_level:
            expected = (model.round, model.level + 1)
        else:
            expected = (model.round, model.level)
        if (r, level) != expected:
            raise ValueError(f"round {r} level {level} comes out of order (expected round {expected[0]} level "
                             f"{expected[1]})")
        if r >= model.config.trees or level >= model.config.depth:
            raise ValueError(f"the model has {model.config.trees} rounds of {model.config.depth} levels")
        model.round, model.level = r, level

    def _context(self, step: str, request: Mapping[str, Any]) -> dict[str, Any]:
        return {"step": step, "model": str(request["model"]), "round": int(request["round"]),
                "level": int(request.get("level", 0))}

    def _seal(self, state: Any, to: str, payload: Payload, context: Mapping[str, Any]) -> np.ndarray:
        return self.vertical.seal_for(state, to, bundle.pack(*payload), context)

    def _open(self, state: Any, sender: str, arrays: Mapping[str, np.ndarray], name: str,
              context: Mapping[str, Any]) -> Payload:
        return bundle.unpack(self.vertical.open_from(state, sender, arrays, name, context))

    def _from_features(self, state: Any, arrays: Mapping[str, np.ndarray], step: str,
                       request: Mapping[str, Any]) -> dict[str, Payload]:
        """Every feature party's payload of ``step`` (sealed for this, the label party), opened."""
        context = self._context(step, request)
        return {p: self._open(state, p, arrays, f"sealed.{p}", context) for p in self._features(state)}

    def _features(self, state: Any) -> list[str]:
        return [p for p in state.parties if p != state.label_party]

    # -- steps --------------------------------------------------------------------------------------

    def _start(self, state: Any, request: Mapping[str, Any]) -> Reply:
        config = read_config(request["config"])
        train, test = self.vertical.rows_of(state, "train"), self.vertical.rows_of(state, "test")
        table = self.vertical.table
        x, x_test = (np.asarray(table.x[r], dtype=np.float64).reshape(len(r), -1) for r in (train, test))
        pool = self.vertical.pool() if config.encrypted else None
        label = state.role == "label"
        part = self.vertical.parts.resume(self.vertical.name, request, self.vertical.alignment(state),
                                          "label" if label else "features", "boosting")
        role: LabelParty | FeatureParty
        if label:
            keys = part.keys() if isinstance(part, LabelPart) else None
            role = LabelParty(x, np.asarray(table.y[train]), x_test, config, self._features(state), pool=pool,
                              keys=keys)
            answer = {"rows": int(len(train)), "classes": role.k}
        else:
            role = FeatureParty(x, x_test, config, pool=pool)
            answer = {"rows": int(len(train))}
        model = _Booster(role, config, stage="gradients" if label else "histograms",
                         training=request.get("training"), settings=dict(request["config"]))
        if part is not None:
            part.restore(role)
            model.round = part.done - 1  # the next round is the first this start's run grows
        self.models[str(request["model"])] = model
        return {"vertical": answer}, {}

    def _keep(self, state: Any, model: _Booster, request: Mapping[str, Any]) -> None:
        """This party's part after the model's current round (a feature party's: should the round end here)."""
        if model.training is None:
            return
        alignment, done = self.vertical.alignment(state), model.round + 1
        part = LabelPart.of(model.role, model.settings, alignment, done) if isinstance(model.role, LabelParty) \
            else FeaturePart.of(model.role, model.settings, alignment, done)
        self.vertical.parts.keep(model.training, str(request["model"]), part)

    def _gradients(self, state: Any, model: _Booster, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> Reply:
        self._expect(model, "gradients", request, label=True, next_round=True)
        assert isinstance(model.role, LabelParty)
        payload = model.role.begin_round()
        context = self._context("sb.gradients", request)
        model.stage = "split"
        return {"vertical": {}}, {f"sealed.{p}": self._seal(state, p, payload, context) for p in self._features(state)}

    def _histograms(self, state: Any, model: _Booster, request: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> Reply:
        role = model.role
        assert isinstance(role, FeatureParty)
        level = int(request.get("level", 0))
        self._expect(model, "histograms", request, label=False, next_round=level == 0, next_level=level != 0)
        step = "sb.gradients" if level == 0 else "sb.grow"
        context = self._context(step, request)
        context["level"] = 0 if level == 0 else level - 1
        payload = self._open(state, state.label_party, arrays, "sealed", context)
        if level == 0:
            role.begin_round(payload)
            payload = ({}, {})
        reply = role.histograms_for(level, payload)
        model.stage = "apply"
        return {"vertical": {}}, {"sealed": self._seal(state, state.label_party, reply,
                                                       self._context("sb.histograms", request))}

    def _split(self, state: Any, model: _Booster, request: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Reply:
        self._expect(model, "split", request, label=True)
        role = model.role
        assert isinstance(role, LabelParty)
        decisions = role.split(model.level, self._from_features(state, arrays, "sb.histograms", request))
        model.stage = "grow"
        out = self._context("sb.split", request)
        return {"vertical": {}}, {f"sealed.{p}": self._seal(state, p, decisions[p], out) for p in decisions}

    def _apply(self, state: Any, model: _Booster, request: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Reply:
        self._expect(model, "apply", request, label=False)
        role = model.role
        assert isinstance(role, FeatureParty)
        payload = self._open(state, state.label_party, arrays, "sealed", self._context("sb.split", request))
        reply = role.apply(payload)
        model.stage = "histograms"
        self._keep(state, model, request)
        return {"vertical": {}}, {"sealed": self._seal(state, state.label_party, reply,
                                                       self._context("sb.apply", request))}

    def _grow(self, state: Any, model: _Booster, request: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Reply:
        self._expect(model, "grow", request, label=True)
        role = model.role
        assert isinstance(role, LabelParty)
        grown = role.grow(model.level, self._from_features(state, arrays, "sb.apply", request))
        if grown is not None:
            model.stage, model.level = "split", model.level + 1
            out = self._context("sb.grow", request)
            return {"vertical": {"done": False}}, {f"sealed.{p}": self._seal(state, p, grown, out)
                                                    for p in self._features(state)}
        model.stage = "gradients"
        self._keep(state, model, request)
        y_test = np.asarray(self.vertical.table.y[self.vertical.rows_of(state, "test")], dtype=np.float64)
        return {"vertical": {"done": True, "metrics": role.metrics(y_test)}}, {}

    def _evaluate(self, state: Any, model: _Booster, request: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray]) -> Reply:
        role = model.role
        if not isinstance(role, LabelParty):
            raise ValueError("only the label party evaluates")
        # the test margins hold the rounds completed: a round cut short (a party lost) leaves them as they were
        y = np.asarray(self.vertical.table.y[self.vertical.rows_of(state, "test")], dtype=np.float64)
        return {"vertical": {"metrics": test_metrics(role.config.objective, y, role.test_margins)}}, {}

    def _predict(self, state: Any, model: _Booster, request: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray]) -> Reply:
        """Predictions of test rows (positions into the test split; all by default), from the joint traversal the
        parties made of the test rows as each tree grew (each answered left or right at its own nodes only)."""
        role = model.role
        if not isinstance(role, LabelParty):
            raise ValueError("only the label party predicts")
        margins = role.test_margins
        positions = scored_positions(arrays, len(margins))
        if positions is not None:
            margins = margins[positions]
        out = bt.probabilities(role.config.objective, margins)
        return {"vertical": {"rows": int(len(margins))}}, {"predictions": np.asarray(out, dtype=np.float64)}

    def _importance(self, state: Any, model: _Booster, request: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> Reply:
        return {"vertical": {"importance": model.role.importance()}}, {}
