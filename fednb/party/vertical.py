"""A party's side of a vertical federation: private set intersection and hetero logistic regression.

Each ``vertical`` request names one built-in protocol step (:data:`fednb.wire.vertical.STEPS`); the kernel hands it
here with the coordinator's session, which keeps what the steps share: the PSI secret and the
aligned rows, the split, each model's weights (they never leave this worker), the seal keys.

::

    setup           role (label / features), the parties ──> this party's seal key, its table's size
    psi.blind       ──> its ids blinded, in a secret order            (uint8 [n, 32])
    psi.double      a peer's blinded points ──> blinded again          (uint8 [m, 32])
    psi.match       its own points double-blinded by the peer, the peer's by itself ──> match count
    psi.keep        (label party) ──> for each peer, which of their matched rows all peers share
    psi.restrict    (feature party) the positions to keep ──> the aligned size
    split           test fraction, seed ──> train/test sizes over the aligned rows
    lr.start        a model: settings, Paillier public key, the class (one-vs-rest), its vertical run id; with
                    ``resume``: the epochs done, and the model is rebuilt from this party's kept part
    lr.forward      (feature party) update with the last batch's gradient, then [[u_h]] sealed for the label party
    lr.residual     (label party) update, then [[d]] sealed for each feature party, [[B·loss]], its masked gradient
    lr.gradient     (feature party) [[d]] sealed ──> its masked gradient [[X_hᵀ·d + r]]
    lr.finish       an epoch's last decrypted gradient ──> applied: the epoch's model can be scored (and is kept)
    lr.scores       u_p = X_p·w_p for test rows only
    lr.evaluate     (label party) Σ of the other parties' u for the test rows ──> AUC, accuracy, KS, loss

A party never sends a plaintext feature, label, weight or score of a training row: ciphertexts
(sealed when they travel between parties through the coordinator, which holds the Paillier key),
masked gradients, blinded points, counts, and scores of test rows.

Each model's weights are kept after every epoch (:mod:`fednb.vertical.parts`), per vertical run id,
for the coordinator's session, and handed packed to the party process, which keeps them across its own
restarts (:mod:`fednb.party.keep_vertical`): a coordinator that resumes a checkpointed run (after its
own restart, with the same key) re-attaches to them, even after aligning again, as long as the rows
align the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.party.boosting import Boosting
from fednb.party.datasets import Split
from fednb.privacy import paillier, psi, seal
from fednb.privacy.pool import ForkPool
from fednb.vertical import metrics as vmetrics
from fednb.vertical import vectors
from fednb.vertical.logistic import Guest, Host, LogisticConfig, batches
from fednb.vertical.parts import PACKED, LogisticPart, Parts, alignment_of
from fednb.wire.vertical import STEPS

log = logging.getLogger(__name__)


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


@dataclass
class VerticalState:
    """What one coordinator's vertical federation keeps at this party (in its kernel session)."""

    run: str
    name: str
    role: str
    label_party: str
    parties: tuple[str, ...]
    key: Any = field(default_factory=seal.new_key)
    peers: dict[str, Any] = field(default_factory=dict)
    psi: dict[str, psi.PSIState] = field(default_factory=dict)
    matched: dict[str, np.ndarray] = field(default_factory=dict)
    rows: np.ndarray | None = None  # this party's table rows, in the order every party agrees on
    split: dict[str, np.ndarray] = field(default_factory=dict)  # positions into rows
    models: dict[str, _Model] = field(default_factory=dict)


def _points(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 2 or value.shape[1] != psi.POINT:
        raise ValueError(f"{name!r} must be a uint8 array of 32-byte points")
    return value


def _blob(arrays: Mapping[str, np.ndarray], name: str) -> bytes:
    value = arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 1:
        raise ValueError(f"{name!r} must be a uint8 byte array")
    return value.tobytes()


def _bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


class Vertical:
    """The steps of one party, on its ``train`` table (ids, features, and labels at the label party)."""

    def __init__(self, name: str, table: Split) -> None:
        if table.ids is None:
            raise ValueError(f"{name}'s training table has no id column (fednb party --id-column), so it cannot "
                             "take part in a vertical federation")
        self.name, self.table = name, table
        self.state: VerticalState | None = None
        self.boosting = Boosting(self)
        self.parts = Parts()  # what each vertical run keeps here between epochs and trees
        self._pool: Any = None

    def pool(self) -> Any:
        """Worker processes for this party's curve and Paillier work (forked inside its sandbox on first need; none
        on one core), shared by PSI, hetero LR and SecureBoost for the worker's lifetime."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self._pool is None and cores > 1:
            self._pool = ForkPool(cores)
        return self._pool

    def handle(self, content: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any],
                                                                                        dict[str, np.ndarray]]:
        step, request = content["step"], content["request"]
        if step not in STEPS:
            raise ValueError(f"unknown vertical step {step!r}")
        if step == "setup":
            return self._setup(content["run"], request)
        state = self.state
        if state is None or state.run != content["run"]:
            raise ValueError(f"{self.name} has no vertical federation of this run (its setup step opens one)")
        self.parts.stepped()
        if step in ("lr.start", "sb.start") and PACKED in arrays:  # the party process kept the run's parts
            self.parts.attach(self.name, request, _blob(arrays, PACKED))
        if step.startswith("sb."):
            answer, out = self.boosting.handle(state, step, request, arrays)
        else:
            answer, out = getattr(self, "_" + step.replace(".", "_"))(state, request, arrays)
        run = self.parts.stepped()  # a snapshot was kept: the party process keeps the run's, should this one go
        if run is not None:
            try:
                out = {**out, PACKED: _bytes(self.parts.pack(run))}
            except ValueError as exc:  # over a bundle's limits: the step stands, its part stays in this session
                log.warning("the parts of vertical run %s cannot be packed for the party to keep: %s", run[:8], exc)
        return answer, out

    # -- setup and alignment ------------------------------------------------------------------------

    def _setup(self, run: str, request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        parties = tuple(str(p) for p in request["parties"])
        label_party = str(request["label_party"])
        if self.name not in parties or label_party not in parties or len(set(parties)) != len(parties):
            raise ValueError("the vertical federation's parties must be distinct and include this party and the "
                             "label party")
        role = "label" if self.name == label_party else "features"
        if role == "label" and self.table.y is None:
            raise ValueError(f"{self.name} is named the label party, but its table has no label column (--label)")
        self.state = VerticalState(run, self.name, role, label_party, parties)
        return {"vertical": {"seal_key": seal.public_text(self.state.key), "rows": int(len(self.table.x)),
                             "features": int(np.prod(self.table.x.shape[1:])), "role": role}}, {}

    def _psi_blind(self, state: VerticalState, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        peers = {str(name): key for name, key in dict(request["keys"]).items()}
        if set(peers) != set(state.parties) - {self.name}:
            raise ValueError("the seal keys relayed are not those of the other parties")
        state.peers = {name: seal.read_public(key) for name, key in peers.items()}
        peer = self._peer(state, request)
        config = psi.PSIConfig(group="x25519")
        pool = self.pool() if len(self.table.ids) >= config.serial_below else None  # type: ignore[arg-type]
        state.psi[peer], points = psi.blind(list(self.table.ids), config, pool=pool)  # type: ignore[arg-type]
        return {"vertical": {"points": int(len(points))}}, {"points": points}

    def _peer(self, state: VerticalState, request: Mapping[str, Any]) -> str:
        """The peer this alignment step is with: feature parties align with the label party, it with each."""
        peer = str(request.get("peer"))
        allowed = [p for p in state.parties if p != self.name] if state.role == "label" else [state.label_party]
        if peer not in allowed:
            raise ValueError(f"{self.name} aligns with {', '.join(allowed)}, not {peer!r}")
        return peer

    def _psi_double(self, state: VerticalState, request: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        peer = self._peer(state, request)
        theirs = _points(arrays, "points")
        pool = self.pool() if len(theirs) >= state.psi[peer].config.serial_below else None
        twice = psi.double_blind(state.psi[peer], theirs, pool=pool)
        return {"vertical": {"points": int(len(twice))}}, {"points": twice}

    def _psi_match(self, state: VerticalState, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        peer = self._peer(state, request)
        alignment = psi.intersect(state.psi.pop(peer), _points(arrays, "mine"), _points(arrays, "theirs"))
        state.matched[peer] = alignment.rows
        if state.role == "features":
            state.rows = alignment.rows
        return {"vertical": {"matched": alignment.size}}, {}

    def _psi_keep(self, state: VerticalState, request: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The label party: the rows every feature party matched, and for each peer the positions (in its own
        order of matched rows, which is the order of the ids) that stay."""
        if state.role != "label" or set(state.matched) != set(state.parties) - {self.name}:
            raise ValueError("only the label party keeps rows, once it matched every other party")
        common = set.intersection(*(set(rows.tolist()) for rows in state.matched.values()))
        ids = self.table.ids
        assert ids is not None
        state.rows = np.array(sorted(common, key=lambda r: bytes(ids[r])), dtype=np.int64)
        out = {}
        for peer, rows in state.matched.items():
            keep = np.array([k for k, row in enumerate(rows.tolist()) if row in common], dtype=np.int64)
            out[f"keep.{peer}"] = keep
        return {"vertical": {"size": int(len(state.rows))}}, out

    def _psi_restrict(self, state: VerticalState, request: Mapping[str, Any],
                      arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        keep = arrays.get("keep")
        if state.rows is None or keep is None or keep.dtype != np.int64 or keep.ndim != 1:
            raise ValueError("restrict needs this party's matched rows and an int64 'keep' array")
        if len(keep) and (keep.min() < 0 or keep.max() >= len(state.rows) or np.any(np.diff(keep) <= 0)):
            raise ValueError("'keep' must be increasing positions into this party's matched rows")
        state.rows = state.rows[keep]
        return {"vertical": {"size": int(len(state.rows))}}, {}

    def _split(self, state: VerticalState, request: Mapping[str, Any],
               arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if state.rows is None:
            raise ValueError("split before alignment")
        fraction, seed = float(request["test_fraction"]), int(request["seed"])
        if not 0 < fraction < 1:
            raise ValueError("test_fraction must lie in (0, 1)")
        order = np.random.default_rng(seed).permutation(len(state.rows))  # a shared split, not a secret
        cut = int(round(len(order) * fraction))
        state.split = {"test": np.sort(order[:cut]), "train": np.sort(order[cut:])}
        state.models.clear()
        self.boosting.models.clear()
        return {"vertical": {name: int(len(rows)) for name, rows in state.split.items()}}, {}

    # -- hetero logistic regression -------------------------------------------------------------------

    def rows_of(self, state: VerticalState, split: str) -> np.ndarray:
        if split not in state.split or state.rows is None:
            raise ValueError(f"no {split} split yet (the coordinator splits the aligned rows first)")
        return state.rows[state.split[split]]

    def alignment(self, state: VerticalState) -> str:
        """The digest of this party's rows as aligned and split now (kept with each part, compared on resume)."""
        return alignment_of(self.rows_of(state, "train"), self.rows_of(state, "test"))

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

    def seal_for(self, state: VerticalState, to: str, data: bytes, context: Mapping[str, Any]) -> np.ndarray:
        """``data`` sealed for party ``to`` (X25519 + ChaCha20-Poly1305, bound to the run, both names, ``context``)."""
        return _bytes(seal.seal(state.key, state.peers[to], data, run=state.run, sender=self.name, receiver=to,
                                context=context))

    def open_from(self, state: VerticalState, sender: str, arrays: Mapping[str, np.ndarray], name: str,
                  context: Mapping[str, Any]) -> bytes:
        """The sealed array ``name`` from ``sender``, opened (ValueError when it was not sealed for this context)."""
        return self._open(state, sender, _blob(arrays, name), context)

    def _open(self, state: VerticalState, sender: str, blob: bytes, context: Mapping[str, Any]) -> bytes:
        return seal.open_sealed(state.key, state.peers[sender], blob, run=state.run, sender=sender,
                                receiver=self.name, context=context)

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
        positions = arrays.get("positions")
        if positions is not None:
            if positions.dtype != np.int64 or positions.ndim != 1 or (len(positions) and (
                    positions.min() < 0 or positions.max() >= len(rows))):
                raise ValueError("'positions' must be int64 positions into the test split")
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
