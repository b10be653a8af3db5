"""The coordinator's handle on a vertical federation: align rows by PSI, split them, train and score hetero LR.

``vfl = fed.vertical(id_column="id", label_party="bank")`` runs the private set intersection
through the parties' gates (see :mod:`fednb.party.vertical` for each step) and returns a
:class:`Vertical`. The coordinator relays blinded points and learns the sizes of the sets and
of the intersection; it holds the Paillier secret key of each training run (the arbiter of
Hardy et al.), and so decrypts only masked gradients and the loss; the ciphertexts the parties
pass each other reach it sealed party to party.

One batch of hetero logistic regression, as three exchanges::

    feature parties: lr.forward   (last batch's decrypted gradient in; [[u_h]] sealed for the label party out)
    label party:     lr.residual  (its decrypted gradient in; [[d]] sealed per feature party, [[B·loss]], masked gradient)
    feature parties: lr.gradient  ([[d]] in; masked gradient out)
    coordinator:     decrypts the masked gradients and the loss; the next batch carries them back

With ``checkpoint=FILE`` the coordinator writes its part of the run after every epoch
(:mod:`fednb.vertical.checkpoint`) and the parties keep theirs (:mod:`fednb.vertical.parts`); the
same call again continues from the next epoch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.errors import FederationError
from fednb.federation.events import VerticalProgress
from fednb.federation.protocol import Stage, gather
from fednb.privacy import paillier
from fednb.privacy.psi import intersection_size
from fednb.vertical import boosted
from fednb.vertical import checkpoint as vckpt
from fednb.vertical import vectors
from fednb.vertical.boosted import BoostingModel
from fednb.vertical.boosting import BoostingConfig
from fednb.vertical.logistic import LogisticConfig, batches
from fednb.wire import Message, new_id

log = logging.getLogger(__name__)


@dataclass
class LogisticModel:
    """A trained hetero logistic regression: its name at the parties (their weights stay there), and its record.

    ``classes`` is set for one-vs-rest (one binary model per class, ``models``)."""

    name: str
    config: LogisticConfig
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    classes: list[int] | None = None
    models: list[str] = field(default_factory=list)
    view: list[tuple[str, str, int]] = field(default_factory=list)  # what the coordinator decrypted: (kind, party, count)


def check_vertical(status: Sequence[Any], links: Mapping[str, Any], chosen: Sequence[str], label_party: str | None,
                   id_column: str) -> None:
    """ValueError (FederationError for an offline party) when these parties cannot form a vertical federation."""
    if label_party is None or label_party not in chosen:
        raise ValueError(f"label_party must be one of the parties ({', '.join(chosen)}), got {label_party!r}")
    if len(chosen) < 2:
        raise ValueError("a vertical federation needs the label party and at least one feature party")
    rows = {row.name: row for row in status}
    for party in chosen:
        train = links[party]["info"].get("datasets", {}).get("train", {})
        if rows[party].status != "online":
            raise FederationError(f"{party} is {rows[party].status}")
        if not train.get("ids"):
            raise ValueError(f"{party}'s training table has no id column: start it with --id-column {id_column}")
    if not links[label_party]["info"].get("datasets", {}).get("train", {}).get("label"):
        raise ValueError(f"{label_party} holds no label column (start it with --label)")


class Vertical:
    """An aligned vertical federation (see the module docstring). ``size`` is the intersection's."""

    def __init__(self, federation: Any, parties: Sequence[str], label_party: str, *, timeout: float | None = 600.0,
                 progress: Callable[[str], None] | None = None) -> None:
        self.federation, self.parties, self.label_party = federation, tuple(parties), label_party
        self.features = tuple(p for p in self.parties if p != label_party)
        self.run = new_id()
        self.timeout = timeout
        self.progress = progress or (lambda line: log.info("%s", line))
        self.sizes: dict[str, int] = {}
        self.roles: dict[str, str] = {}
        self.size = 0
        self.splits: dict[str, int] = {}
        self.split_settings: dict[str, Any] = {}  # the split's test fraction and seed (a checkpoint's alignment)

    def _say(self, stage: str, message: str, **details: Any) -> None:
        self.progress(message)
        self.federation.events.publish(VerticalProgress(stage, message, roles=dict(self.roles), **details))

    # -- driving steps ------------------------------------------------------------------------------

    def _step(self, step: str, parties: Sequence[str], request: Mapping[str, Any] | None = None, *,
              arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, Message]:
        """Send one step to ``parties`` (the same parameters, per-party arrays) and return every reply, or raise."""
        return self._per_party(step, {p: dict(request or {}) for p in parties}, arrays)

    def _per_party(self, step: str, requests: Mapping[str, Mapping[str, Any]],
                   arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, Message]:
        """One step with its own parameters for each party, all at once."""
        messages = {p: Message("vertical", {"run": self.run, "step": step, "request": dict(r)},
                               arrays=dict((arrays or {}).get(p, {}))) for p, r in requests.items()}
        gathered = gather(self.federation._connections,
                          Stage(step, tuple(messages), requests=messages, timeout=self.timeout))
        if gathered.dropped:
            raise FederationError(f"vertical step {step} failed: "
                                  + "; ".join(f"{p}: {why}" for p, why in gathered.dropped.items()))
        return {p: reply for p, reply in gathered.replies.items() if reply is not None}

    @staticmethod
    def _answer(reply: Message) -> dict[str, Any]:
        answer = reply.content.get("vertical")
        if not isinstance(answer, Mapping):
            raise FederationError(f"a vertical reply carries no answer ({reply.type})")
        return dict(answer)

    # -- alignment ----------------------------------------------------------------------------------

    def align(self) -> int:
        """Private set intersection of every feature party with the label party; the intersection's size."""
        started = time.perf_counter()
        replies = self._step("setup", self.parties, {"parties": list(self.parties), "label_party": self.label_party})
        keys = {}
        for party, reply in replies.items():
            answer = self._answer(reply)
            keys[party], self.sizes[party], self.roles[party] = answer["seal_key"], int(answer["rows"]), answer["role"]
        for host in self.features:
            # one pair at a time, both parties at once at each step: blind, double-blind the other's, match
            pair = (self.label_party, host)
            peer = {self.label_party: host, host: self.label_party}
            replies = self._per_party("psi.blind", {p: {"keys": {q: k for q, k in keys.items() if q != p},
                                                        "peer": peer[p]} for p in pair})
            blinded = {p: _points(replies[p], "points", self.sizes[p]) for p in pair}
            replies = self._per_party("psi.double", {p: {"peer": peer[p]} for p in pair},
                                      {p: {"points": blinded[peer[p]]} for p in pair})
            twice = {peer[p]: _points(replies[p], "points", self.sizes[peer[p]]) for p in pair}  # blinded twice
            matched = intersection_size(twice[self.label_party], twice[host])
            replies = self._per_party("psi.match", {p: {"peer": peer[p]} for p in pair},
                                      {p: {"mine": twice[p], "theirs": twice[peer[p]]} for p in pair})
            for p in pair:
                if int(self._answer(replies[p])["matched"]) != matched:
                    raise FederationError(f"{p} matched another number of rows than the points show")
        reply = self._step("psi.keep", [self.label_party])[self.label_party]
        self.size = int(self._answer(reply)["size"])
        for host in self.features:
            keep = reply.arrays.get(f"keep.{host}")
            if keep is None:
                raise FederationError(f"the label party sent no rows to keep for {host}")
            answer = self._answer(self._step("psi.restrict", [host], arrays={host: {"keep": np.asarray(keep)}})[host])
            if int(answer["size"]) != self.size:
                raise FederationError(f"{host} kept {answer['size']} rows, the label party {self.size}")
        self._say("aligned", f"aligned {self.size} rows of {', '.join(f'{p}: {n}' for p, n in self.sizes.items())} "
                             f"in {time.perf_counter() - started:.1f} s", seconds=time.perf_counter() - started)
        return self.size

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
        """One seeded train/test split of the aligned rows, the same at every party."""
        if not 0 < test_fraction < 1:
            raise ValueError("test_fraction must lie in (0, 1)")
        replies = self._step("split", self.parties, {"test_fraction": float(test_fraction), "seed": int(seed)})
        sizes = {p: self._answer(r) for p, r in replies.items()}
        if len({(s["train"], s["test"]) for s in sizes.values()}) != 1:
            raise FederationError(f"the parties split differently: {sizes}")
        self.splits = {"train": int(sizes[self.label_party]["train"]), "test": int(sizes[self.label_party]["test"])}
        self.split_settings = {"test_fraction": float(test_fraction), "seed": int(seed)}
        return dict(self.splits)

    # -- hetero logistic regression -----------------------------------------------------------------

    def train_logistic(self, epochs: int = 20, lr: float = 0.15, batch_size: int = 240, l2: float = 0.01,
                       optimizer: str = "sgd", key_bits: int = 2048, encrypted: bool = True,
                       classes: Sequence[int] | None = None, seed: int = 0,
                       checkpoint: str | os.PathLike[str] | None = None) -> LogisticModel:
        """Hetero logistic regression (Hardy et al., 2017, with masked gradients); ``classes`` trains one binary
        model per class (one-vs-rest). The coordinator holds a fresh Paillier key of ``key_bits``.

        ``checkpoint``: a file written after every epoch (mode 0600: it holds the key pair); calling again with
        it continues the run from the next epoch (a binary model's ``epochs`` may grow), and refuses, naming the
        difference, other parties, alignment or options (:mod:`fednb.vertical.checkpoint`)."""
        if not self.splits:
            self.split()
        config = LogisticConfig(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2, optimizer=optimizer,  # type: ignore[arg-type]
                                encrypted=encrypted, paillier=paillier.PaillierConfig(key_bits=key_bits), seed=seed)
        options = {**_settings(config), "classes": None if classes is None else [int(c) for c in classes]}
        options.pop("epochs")
        saved = vckpt.resume(checkpoint, "logistic", vckpt.fingerprint(self, "logistic", options))
        positives: list[int | None] = [None] if classes is None else [int(c) for c in classes]
        if saved is not None:
            run, keys = saved.run, saved.key_pair()
            done = vckpt.epochs_done(saved, epochs, len(positives) if classes is not None else None, checkpoint)
            name, losses, seconds, view = vckpt.logistic_record(saved, checkpoint)
            if (keys is not None) != encrypted:
                raise vckpt.CheckpointError(f"{checkpoint} holds an inconsistent vertical checkpoint (its key)")
            public, private = keys if keys is not None else (None, None)
            model = LogisticModel(name, config, losses, seconds, view=view)
            self.progress(f"resuming hetero logistic regression {name} from {checkpoint} after {done} epoch(s)")
        else:
            run, done = new_id(), 0
            name = run[:12]
            model = LogisticModel(name, config)
            if encrypted:
                started = time.perf_counter()
                public, private = paillier.generate_keypair(config.paillier)
                self.progress(f"Paillier key of {key_bits} bits in {time.perf_counter() - started:.1f} s")
            else:
                public = private = None
        model.classes = None if classes is None else [int(c) for c in classes]
        model.models = [name] if classes is None else [f"{name}.{k}" for k in positives]
        attempt = saved.attempt + 1 if saved is not None else 0

        def save(total: int) -> None:
            """The coordinator's part after ``total`` epochs (over every one-vs-rest model)."""
            if checkpoint is None:
                return
            record = {"name": name, "epochs": epochs, "losses": model.losses, "seconds": model.seconds,
                      "view": [list(v) for v in model.view]}
            vckpt.save(checkpoint, vckpt.VerticalCheckpoint(
                "logistic", run, total, vckpt.fingerprint(self, "logistic", options), record,
                (private.p, private.q) if private is not None else None, attempt))

        for i, (binary, positive) in enumerate(zip(model.models, positives)):
            kept = min(max(done - i * epochs, 0), epochs)
            self._train_binary(model, binary, positive, public, private, run=run, kept=kept, save=save,
                               before=i * epochs, path=checkpoint)
        self._say("trained", f"hetero logistic regression {name}: {len(model.models)} model(s), {epochs} epochs, "
                             f"{sum(model.seconds):.1f} s", model=name, epochs=epochs, seconds=sum(model.seconds))
        return model

    def _train_binary(self, model: LogisticModel, name: str, positive: int | None, public: Any, private: Any, *,
                      run: str, kept: int, save: Callable[[int], None], before: int,
                      path: str | os.PathLike[str] | None) -> None:
        """One binary model's epochs from ``kept`` (the epochs its parties kept), under vertical run ``run``;
        ``save`` writes the checkpoint after each, ``before`` the epochs of the one-vs-rest models before it."""
        config = model.config
        start = {"model": name, "config": _settings(config), "public_key": format(public.n, "x") if public else None,
                 "positive": positive, "training": run, "resume": kept or None}
        try:
            self._step("lr.start", self.parties, start)
        except FederationError as exc:
            if not kept:
                raise
            raise vckpt.CheckpointError(f"cannot resume from {path}: {exc}") from None
        width = paillier.plaintext_width(public) if public is not None else 8
        decrypted: dict[str, np.ndarray] = {}
        rows = self.splits["train"]
        for epoch in range(kept, config.epochs):
            started, total = time.perf_counter(), 0.0
            for b, batch in enumerate(batches(rows, config, epoch)):
                at = {"model": name, "epoch": epoch, "batch": b}
                forward = self._step("lr.forward", self.features, at,
                                     arrays={h: _carry(decrypted, h) for h in self.features})
                sealed = {f"sealed.{h}": _blob(forward[h], "sealed") for h in self.features}
                guest = self._step("lr.residual", [self.label_party], at,
                                   arrays={self.label_party: {**sealed, **_carry(decrypted, self.label_party)}})
                answer = guest[self.label_party]
                relayed = {h: {"sealed": _blob(answer, f"sealed.{h}")} for h in self.features}
                for j, h in enumerate(self.features):  # earlier feature parties' [[u]] for h's cross terms
                    relayed[h].update({f"peer.{k}": _blob(forward[k], f"sealed.{h}")
                                       for k in self.features[:j] if config.loss})
                gradients = self._step("lr.gradient", self.features, at, arrays=relayed)
                masked = {self.label_party: _blob(answer, "masked")}
                masked.update({h: _blob(gradients[h], "masked") for h in self.features})
                decrypted = {p: vectors.decrypt_masked(private, public, data, width) for p, data in masked.items()}
                model.view += [("gradient", p, len(v) // width) for p, v in decrypted.items()]
                if config.loss and "loss" in answer.arrays:
                    parts = [_blob(answer, "loss")] + [_blob(gradients[h], "cross") for h in self.features[1:]]
                    loss = vectors.decrypt_loss(private, public, parts) / len(batch)
                    model.view.append(("loss", "", 1))
                    total += loss * len(batch)
            # the epoch's last update is applied now, so that the epoch's model can be scored (and each party
            # keeps its weights as they are after this epoch)
            self._step("lr.finish", self.parties, {"model": name, "epoch": epoch},
                       arrays={p: _carry(decrypted, p) for p in self.parties})
            decrypted = {}
            model.losses.append(total / rows)
            model.seconds.append(time.perf_counter() - started)
            save(before + epoch + 1)
            scored = self._evaluate([name], None) if positive is None and self.splits.get("test") else {}
            self._say("epoch", f"{name}: epoch {epoch + 1}/{config.epochs}, loss {model.losses[-1]:.4f}"
                               + (f", test AUC {scored['auc']:.4f}" if "auc" in scored else "")
                               + f", {model.seconds[-1]:.1f} s", model=name, epoch=epoch + 1, epochs=config.epochs,
                      loss=model.losses[-1] if config.loss else None, seconds=model.seconds[-1],
                      metrics={k: v for k, v in scored.items() if k in ("auc", "accuracy")})

    # -- SecureBoost --------------------------------------------------------------------------------

    def train_boosting(self, trees: int = 10, depth: int = 3, bins: int = 32, lr: float = 0.3, l2: float = 1.0,
                       min_child_weight: float = 1.0, objective: str = "binary", key_bits: int = 2048,
                       encrypted: bool = True, checkpoint: str | os.PathLike[str] | None = None) -> BoostingModel:
        """SecureBoost (Cheng et al., 2021): gradient-boosted trees over encrypted gradients, the label party holding
        the Paillier key (see :mod:`fednb.vertical.secureboost` for what each party learns). ``objective``:
        "binary", "multiclass" (one tree per class per round) or "regression" (squared loss).

        ``checkpoint``: a file written after every round of trees; calling again with it continues from the next
        round (``trees`` may grow), and refuses other parties, alignment or options, naming the difference."""
        config = BoostingConfig(trees=trees, depth=depth, bins=bins, lr=lr, l2=l2, min_child_weight=min_child_weight,
                                objective=objective, key_bits=key_bits, encrypted=encrypted)  # type: ignore[arg-type]
        return boosted.train(self, config, checkpoint=checkpoint)

    def importance(self, model: BoostingModel) -> dict[str, dict[str, dict[str, float]]]:
        """Feature importance by party: each party reports splits and gain of its own features only."""
        return boosted.importance(self, model)

    def _scores(self, name: str, positions: np.ndarray | None) -> dict[str, np.ndarray]:
        arrays = {p: ({"positions": positions} if positions is not None else {}) for p in self.parties}
        replies = self._step("lr.scores", self.parties, {"model": name}, arrays=arrays)
        return {p: np.asarray(r.arrays.get("scores"), dtype=np.float64) for p, r in replies.items()}

    def predict(self, model: LogisticModel | BoostingModel, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """P(y = 1) for test rows (positions into the test split; all by default); one-vs-rest: the class;
        boosting: P(y = 1), class probabilities (multiclass) or values (regression)."""
        positions = None if rows is None else np.asarray(rows, dtype=np.int64)
        if isinstance(model, BoostingModel):
            return boosted.predict(self, model, positions)
        per_model = []
        for name in model.models:
            parts = self._scores(name, positions)
            per_model.append(1.0 / (1.0 + np.exp(-np.sum(list(parts.values()), axis=0))))
        if model.classes is None:
            return per_model[0]
        return np.asarray(model.classes)[np.argmax(np.stack(per_model, axis=1), axis=1)]

    def evaluate(self, model: LogisticModel | BoostingModel) -> dict[str, float]:
        """Metrics on the test split, computed by the label party (which holds the labels) from its own scores
        and the sum of the others': AUC, accuracy, KS and log-loss; one-vs-rest: accuracy and mean AUC;
        boosting: the same for binary, accuracy and log loss for multiclass, MSE and R² for regression."""
        if isinstance(model, BoostingModel):
            return boosted.evaluate(self, model)
        return self._evaluate(model.models, model.classes)

    def _evaluate(self, models: Sequence[str], classes: Sequence[int] | None) -> dict[str, float]:
        arrays = {}
        for i, name in enumerate(models):
            others = self._scores(name, None)
            others.pop(self.label_party, None)
            total = np.sum(list(others.values()), axis=0) if others else np.zeros(self.splits["test"])
            arrays[f"others.{i}"] = np.asarray(total, dtype=np.float64)
        reply = self._step("lr.evaluate", [self.label_party], {"models": list(models),
                                                               "classes": None if classes is None else list(classes)},
                           arrays={self.label_party: arrays})
        return {k: float(v) for k, v in self._answer(reply[self.label_party])["metrics"].items()}


def _settings(config: LogisticConfig) -> dict[str, Any]:
    """A model's settings as lr.start carries them (and a checkpoint's fingerprint records them)."""
    return {"epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size, "l2": config.l2,
            "optimizer": config.optimizer, "encrypted": config.encrypted, "seed": config.seed,
            "loss": config.loss, "paillier": {"key_bits": config.paillier.key_bits}}


def _points(reply: Message, name: str, count: int) -> np.ndarray:
    value = reply.arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.shape != (count, 32):
        raise FederationError(f"a party sent {name!r} that are not {count} points")
    return np.asarray(value)


def _blob(reply: Message, name: str) -> np.ndarray:
    value = reply.arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 1:
        raise FederationError(f"a party sent no {name!r}")
    return np.asarray(value)


def _carry(decrypted: Mapping[str, np.ndarray], party: str) -> dict[str, np.ndarray]:
    return {"decrypted": decrypted[party]} if party in decrypted else {}
