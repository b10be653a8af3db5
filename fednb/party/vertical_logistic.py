"""A party's side of hetero logistic regression: the ``lr.*`` steps of a vertical federation.

Mixed into :class:`fednb.party.vertical.Vertical`, which opens the federation, aligns its rows, splits them,
and keeps the seal keys; the steps, and what each sends, are listed there. Each model lives in the
federation's session (:class:`fednb.party.vertical.VerticalState`) as a :class:`_Model`: its role's
weights (they never leave this worker), its Paillier public key, and the epochs it finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fednb.party.datasets import Split
from fednb.privacy import paillier
from fednb.vertical import metrics as vmetrics
from fednb.vertical import vectors
from fednb.vertical.logistic import Guest, Host, LogisticConfig, batches
from fednb.vertical.parts import LogisticPart, Parts
from fednb.wire.vertical import scored_positions

if TYPE_CHECKING:
    from fednb.party.vertical import VerticalState


@dataclass
class _Model:
    role: Guest | Host
    config: LogisticConfig
    key: paillier.PublicKey | None
    pending: bool = False  # a masked gradient is out, awaiting its decryption
    training: str | None = None  # the vertical run id its parts are kept under
    settings: dict[str, Any] = field(default_factory=dict)
    positive: int | None = None
    done: int = 0  # epochs finished


def _blob(arrays: Mapping[str, np.ndarray], name: str) -> bytes:
    value = arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 1:
        raise ValueError(f"{name!r} must be a uint8 byte array")
    return value.tobytes()


def _bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


class LogisticSteps:
    """The ``lr.*`` steps of one party, mixed into :class:`fednb.party.vertical.Vertical` (which keeps the table,
    the parts kept between epochs, and the aligned rows and seals that the ``sb.*`` steps share)."""

    name: str
    table: Split
    parts: Parts

    if TYPE_CHECKING:  # Vertical's own, shared with the alignment and SecureBoost steps
        def pool(self) -> Any: ...

        def rows_of(self, state: VerticalState, split: str) -> np.ndarray: ...

        def alignment(self, state: VerticalState) -> str: ...

        def seal_for(self, state: VerticalState, to: str, data: bytes, context: Mapping[str, Any]) -> np.ndarray: ...

        def _open(self, state: VerticalState, sender: str, blob: bytes, context: Mapping[str, Any]) -> bytes: ...

    def _lr_start(self, state: VerticalState, request: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        settings = dict(request["config"])
        config = LogisticConfig(**{k: v for k, v in settings.items() if k != "paillier"},
                                paillier=paillier.PaillierConfig(**dict(settings.get("paillier") or {})))
        key = None
        if config.encrypted:
            n = int(str(request["public_key"]), 16)
            if n.bit_length() < 1000:
                raise ValueError("the Paillier public key is shorter than 1024 bits")
            key = paillier.PublicKey(n)
        rows = self.rows_of(state, "train")
        x = np.asarray(self.table.x[rows], dtype=np.float64).reshape(len(rows), -1)
        if state.role == "label":
            assert self.table.y is not None
            y = np.asarray(self.table.y[rows])
            target = request.get("positive")
            if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
                raise ValueError("'positive' must be the class label (an integer) a one-vs-rest model tells apart")
            labels = (y == target).astype(np.int64) if target is not None else y.astype(np.int64)
            if target is None and not np.all((labels == 0) | (labels == 1)):
                raise ValueError("binary logistic regression needs 0/1 labels; several classes train one-vs-rest")
            role: Guest | Host = Guest(x, labels, config, key, self.pool() if key is not None else None)
        else:
            role = Host(x, config, key, self.pool() if key is not None else None)
        model = _Model(role, config, key, training=request.get("training"), settings=settings,
                       positive=request.get("positive"))
        part = self.parts.resume(self.name, request, self.alignment(state), "logistic", "logistic")
        if part is not None:
            if part.role != state.role or part.positive != model.positive or part.public_key != (
                    format(key.n, "x") if key is not None else None):
                raise ValueError(f"{self.name} kept model {request['model']} in another role, for another class or "
                                 "under another Paillier key")
            part.restore(role)
            model.done = part.done
        state.models[str(request["model"])] = model
        return {"vertical": {"rows": int(len(rows))}}, {}

    def _model(self, state: VerticalState, request: Mapping[str, Any], role: type) -> _Model:
        model = state.models.get(str(request.get("model")))
        if model is None or not isinstance(model.role, role):
            raise ValueError(f"{self.name} has no such model as a {'label' if role is Guest else 'feature'} party")
        return model

    def _batch(self, model: _Model, state: VerticalState, request: Mapping[str, Any]) -> np.ndarray:
        epoch, batch = int(request["epoch"]), int(request["batch"])
        plan = batches(len(self.rows_of(state, "train")), model.config, epoch)
        if not 0 <= epoch < model.config.epochs or not 0 <= batch < len(plan):
            raise ValueError(f"no batch {batch} of epoch {epoch}")
        if epoch != model.done:
            raise ValueError(f"epoch {epoch} comes out of order: this model has finished {model.done} epoch(s)")
        return plan[batch]

    @staticmethod
    def _update(model: _Model, arrays: Mapping[str, np.ndarray]) -> None:
        """Apply the last batch's decrypted masked gradient, if one is out."""
        if not model.pending:
            if "decrypted" in arrays:
                raise ValueError("a decrypted gradient arrived, but none is out")
            return
        width = paillier.plaintext_width(model.key) if model.key is not None else 8
        data = _blob(arrays, "decrypted")
        values = paillier.from_wire_ints(data, width) if model.key is not None else np.frombuffer(data, "<f8")
        model.role.update(values)
        model.pending = False

    def _context(self, state: VerticalState, step: str, request: Mapping[str, Any]) -> dict[str, Any]:
        return {"step": step, "model": str(request["model"]), "epoch": int(request["epoch"]),
                "batch": int(request["batch"])}

    def _lr_forward(self, state: VerticalState, request: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        model = self._model(state, request, Host)
        self._update(model, arrays)
        assert isinstance(model.role, Host)
        earlier, later = self._neighbours(state)
        forward = model.role.forward(self._batch(model, state, request), masked=bool(earlier) and model.config.loss)
        payload = vectors.pack([forward.scores] + ([forward.loss] if forward.loss is not None else []))
        context = self._context(state, "forward", request)
        out = {"sealed": self.seal_for(state, state.label_party, payload, context)}
        if model.config.loss:  # [[u_h]] for each later feature party's cross terms of the loss
            out.update({f"sealed.{k}": self.seal_for(state, k, vectors.pack([forward.scores]), context) for k in later})
        return {"vertical": {}}, out

    def _neighbours(self, state: VerticalState) -> tuple[list[str], list[str]]:
        """The feature parties before and after this one, in the federation's order."""
        hosts = [p for p in state.parties if p != state.label_party]
        i = hosts.index(self.name)
        return hosts[:i], hosts[i + 1:]

    def _lr_residual(self, state: VerticalState, request: Mapping[str, Any],
                     arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        model = self._model(state, request, Guest)
        self._update(model, arrays)
        guest = model.role
        assert isinstance(guest, Guest)
        rows = self._batch(model, state, request)
        hosts = [p for p in state.parties if p != self.name]
        forwards = [vectors.read(self._open(state, h, _blob(arrays, f"sealed.{h}"),
                                             self._context(state, "forward", request)), model.key, len(rows))
                    for h in hosts]
        residual = guest.residual(rows, [f[0] for f in forwards])
        out: dict[str, np.ndarray] = {}
        for host in hosts:
            out[f"sealed.{host}"] = self.seal_for(state, host, vectors.pack([residual]),
                                               self._context(state, "residual", request))
        if model.config.loss:
            out["loss"] = _bytes(vectors.pack([guest.loss([f[1] for f in forwards if len(f) > 1])]))
        out["masked"] = _bytes(vectors.pack([guest.gradient()]))
        model.pending = True
        return {"vertical": {"rows": int(len(rows))}}, out

    def _lr_gradient(self, state: VerticalState, request: Mapping[str, Any],
                     arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        model = self._model(state, request, Host)
        rows = self._batch(model, state, request)
        [residual] = vectors.read(self._open(state, state.label_party, _blob(arrays, "sealed"),
                                              self._context(state, "residual", request)), model.key, len(rows))
        masked = model.role.gradient(residual)
        model.pending = True
        out = {"masked": _bytes(vectors.pack([masked]))}
        earlier, _later = self._neighbours(state)
        if earlier and model.config.loss:
            context = self._context(state, "forward", request)
            others = [vectors.read(self._open(state, j, _blob(arrays, f"peer.{j}"), context), model.key, len(rows))[0]
                      for j in earlier]
            assert isinstance(model.role, Host)
            out["cross"] = _bytes(vectors.pack([model.role.cross_loss(others)]))
        return {"vertical": {}}, out

    def _lr_finish(self, state: VerticalState, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        model = state.models.get(str(request.get("model")))
        if model is None:
            raise ValueError(f"{self.name} has no such model")
        epoch = request.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch != model.done:
            raise ValueError(f"lr.finish must name the epoch it ends ({model.done}), not {epoch!r}")
        self._update(model, arrays)
        model.done += 1
        if model.training is not None:
            self.parts.keep(model.training, str(request["model"]), LogisticPart.of(
                model.role, model.settings, model.positive, model.key, self.alignment(state), model.done))
        return {"vertical": {}}, {}

    def _lr_scores(self, state: VerticalState, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        model = state.models.get(str(request.get("model")))
        if model is None or model.pending:
            raise ValueError(f"{self.name} has no trained model of that name")
        rows = self.rows_of(state, "test")
        positions = scored_positions(arrays, len(rows))
        if positions is not None:
            rows = rows[positions]
        x = np.asarray(self.table.x[rows], dtype=np.float64).reshape(len(rows), -1)
        return {"vertical": {"rows": int(len(rows))}}, {"scores": model.role.predict_part(x)}

    def _lr_evaluate(self, state: VerticalState, request: Mapping[str, Any],
                     arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The label party scores the test split: its own u plus the others' sum, per model; only metrics leave.

        One model: AUC, accuracy, KS and log-loss. One-vs-rest (``classes``): accuracy of the highest-scoring
        class and the mean of the per-class AUCs."""
        if state.role != "label":
            raise ValueError("only the label party evaluates")
        rows = self.rows_of(state, "test")
        names, classes = list(request["models"]), request.get("classes")
        if not names or len(names) > 64 or (classes is not None and len(classes) != len(names)):
            raise ValueError("evaluate needs one to 64 models (and one class per model for one-vs-rest)")
        x = np.asarray(self.table.x[rows], dtype=np.float64).reshape(len(rows), -1)
        probabilities = []
        for i, name in enumerate(names):
            others = arrays.get(f"others.{i}")
            if others is None or others.dtype != np.float64 or others.shape != (len(rows),) or \
                    not np.all(np.isfinite(others)):
                raise ValueError("'others.i' must be one finite float64 score per test row")
            model = state.models.get(str(name))
            if model is None or not isinstance(model.role, Guest):
                raise ValueError(f"{self.name} has no model {name!r}")
            probabilities.append(1.0 / (1.0 + np.exp(-(model.role.predict_part(x) + others))))
        assert self.table.y is not None
        y = np.asarray(self.table.y[rows])
        if classes is None:
            return {"vertical": {"metrics": vmetrics.evaluate(y.astype(np.int64), probabilities[0])}}, {}
        predicted = np.asarray(classes)[np.argmax(np.stack(probabilities, axis=1), axis=1)]
        aucs = [vmetrics.auc((y == k).astype(np.int64), p) for k, p in zip(classes, probabilities)]
        return {"vertical": {"metrics": {"accuracy": float(np.mean(predicted == y)), "auc": float(np.mean(aucs))}}}, {}
