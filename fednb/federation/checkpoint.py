"""Checkpoints of a training run: written after every round, read back to continue after a crash or a restart.

``fed.train(model, source, rounds=…, checkpoint="run.ckpt")`` writes the file after each
completed round, atomically (:func:`fednb.atomic.write_atomic`: a temporary file, fsync,
rename, fsync of the directory). It holds everything the next round needs: the global weights,
the strategy's state (server momentum, adaptive moments), the history, the run id, the first,
last and latest round, and a fingerprint of what the run was asked to do (hashes of the model
source, the training cell, the configuration, the strategy and its options, the run's
settings). Calling the same ``train(...)`` again finds the file, checks the fingerprint (a
difference is named and refused), and continues from the next round under the same run id,
which the parties accept because its rounds still move forward.

The format is fednb's own, no pickle: ``FEDNB-CKPT/1``, the SHA-256 of the body, and the body,
a bundle of :mod:`fednb.wire.bundle` (a validated JSON header and raw little-endian arrays). A
file that is cut short, altered or not a checkpoint is refused whole (:class:`CheckpointError`);
nothing is loaded from it. The file is created with mode 0600 (the temporary file of
:func:`fednb.atomic.write_atomic` is, and the rename keeps it): readable by its owner only, as
a vertical checkpoint, which holds the Paillier key pair of its run, must be.

:func:`write` and :func:`read` are the file itself (magic, checksum, bundle), which vertical
training's checkpoints (:mod:`fednb.vertical.checkpoint`) share; their header says
``"kind": "vertical"``, which :func:`load` refuses, as they refuse this one's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fednb.atomic import write_atomic
from fednb.errors import FednbError, WireError
from fednb.federation.history import PartyRound, RoundRecord
from fednb.wire import bundle

MAGIC = b"FEDNB-CKPT/1\n"
DIGEST = 32


class CheckpointError(FednbError, ValueError):
    """A checkpoint that cannot be read, or that belongs to another run than the one asked for."""


def digest(value: Any) -> str:
    """SHA-256 of a string, or of plain data as canonical JSON."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Checkpoint:
    """One run's state after round ``round`` (rounds ``first`` … ``last`` of the federation's numbering)."""

    run: str
    first: int
    last: int
    round: int
    fingerprint: dict[str, str]
    weights: dict[str, np.ndarray]
    strategy: dict[str, Any] = field(default_factory=dict)
    history: list[RoundRecord] = field(default_factory=list)
    #: how many times the run was resumed: the parties accept a round again from a later attempt only
    attempt: int = 0


FINGERPRINT = {"source": "the model source", "train_cell": "the training cell", "config": "the configuration",
               "strategy": "the strategy or its options", "settings": "the run's settings (parties, min_parties, "
               "secure aggregation, differential privacy)"}


def fingerprint(*, source: str, train_cell: str | None, config: Mapping[str, Any], strategy: Any,
                settings: Mapping[str, Any]) -> dict[str, str]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"source": digest(source), "train_cell": digest(train_cell or ""), "config": digest(dict(config)),
            "strategy": digest(strategy), "settings": digest(dict(settings))}


# -- strategy state: arrays and numbers, flattened for the bundle ----------------------------------------

def _flatten(state: Mapping[str, Any], arrays: dict[str, np.ndarray], prefix: str = "strategy/") -> dict[str, Any]:
    scalars: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[prefix + key] = value
        elif isinstance(value, Mapping):
            scalars[key] = {"__arrays__": sorted(str(k) for k in value)}
            for name, array in value.items():
                arrays[f"{prefix}{key}/{name}"] = np.asarray(array)
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[key] = value
        else:
            raise TypeError(f"strategy state {key!r} is a {type(value).__name__}: only arrays, dicts of arrays and "
                            "numbers can be checkpointed")
    return scalars


def _unflatten(scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    nested: set[str] = set()
    for key, value in scalars.items():
        if isinstance(value, Mapping) and "__arrays__" in value:
            state[key] = {name: np.array(arrays[f"strategy/{key}/{name}"]) for name in value["__arrays__"]}
            nested.update(f"strategy/{key}/{name}" for name in value["__arrays__"])
        else:
            state[key] = value
    for name, array in arrays.items():
        if name.startswith("strategy/") and name not in nested:
            state[name[len("strategy/"):]] = np.array(array)
    return state


# -- history ---------------------------------------------------------------------------------------------

def _record(raw: Any) -> RoundRecord:
    if not isinstance(raw, Mapping):
        raise CheckpointError("a history entry is not an object")
    values = dict(raw)
    values["parties"] = {str(k): PartyRound(**v) for k, v in dict(values.get("parties") or {}).items()}
    try:
        return RoundRecord(**values)
    except TypeError as exc:
        raise CheckpointError(f"a history entry does not fit: {exc}") from None


# -- the file --------------------------------------------------------------------------------------------

def write(path: str | os.PathLike[str], header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Write a checkpoint file atomically: the magic, the SHA-256 of the body, the body (``header`` and ``arrays``
    as a bundle). The old file or the new one survives a crash, never half; the file's mode is 0600."""
    body = bundle.pack(header, arrays)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, MAGIC + hashlib.sha256(body).digest() + body)


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and arrays of the checkpoint file at ``path``, its magic and checksum checked first."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    start = len(MAGIC) + DIGEST
    if not data.startswith(MAGIC) or len(data) < start:
        raise CheckpointError(f"{path} is not a fednb checkpoint")
    body = data[start:]
    if hashlib.sha256(body).digest() != data[len(MAGIC):start]:
        raise CheckpointError(f"{path} is corrupt (its checksum does not match): refusing to resume from it")
    try:
        return bundle.unpack(body)
    except WireError as exc:
        raise CheckpointError(f"{path} does not hold a readable checkpoint: {exc}") from None


def save(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (the old file or the new one survives a crash, never half)."""
    arrays: dict[str, np.ndarray] = {f"weights/{k}": np.ascontiguousarray(v) for k, v in checkpoint.weights.items()}
    scalars = _flatten(checkpoint.strategy, arrays)
    history = json.dumps([dataclasses.asdict(r) for r in checkpoint.history], allow_nan=True).encode()
    arrays["history"] = np.frombuffer(history, dtype=np.uint8)
    header = {"run": checkpoint.run, "first": checkpoint.first, "last": checkpoint.last, "round": checkpoint.round,
              "fingerprint": checkpoint.fingerprint, "strategy": scalars, "weights": list(checkpoint.weights),
              "attempt": checkpoint.attempt}
    write(path, header, arrays)


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint at ``path``, checked whole before anything is taken from it."""
    header, arrays = read(path)
    if header.get("kind") == "vertical":
        raise CheckpointError(f"{path} holds a vertical training run (vfl.train_logistic or vfl.train_boosting), "
                              "not one of fed.train: use another checkpoint file")
    try:
        names = header["weights"]
        weights = {str(k): np.array(arrays[f"weights/{k}"]) for k in names}
        history = [_record(r) for r in json.loads(bytes(arrays["history"]).decode("utf-8"))]
        checkpoint = Checkpoint(run=str(header["run"]), first=int(header["first"]), last=int(header["last"]),
                                round=int(header["round"]), fingerprint={str(k): str(v) for k, v in
                                                                          dict(header["fingerprint"]).items()},
                                weights=weights, strategy=_unflatten(dict(header["strategy"]), arrays),
                                history=history, attempt=int(header.get("attempt", 0)))
    except (WireError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} does not hold a readable checkpoint: {exc}") from None
    if not checkpoint.first <= checkpoint.round + 1 <= checkpoint.last + 1 or not all(
            math.isfinite(float(np.sum(w, dtype=np.float64))) or w.dtype.kind not in "fc" for w in weights.values()):
        raise CheckpointError(f"{path} holds an inconsistent checkpoint")
    return checkpoint


def check(checkpoint: Checkpoint, expected: Mapping[str, str], path: str | os.PathLike[str]) -> None:
    """CheckpointError naming what differs between the run asked for and the one that wrote ``checkpoint``."""
    differ = [FINGERPRINT.get(k, k) for k in FINGERPRINT if checkpoint.fingerprint.get(k) != expected.get(k)]
    if differ:
        raise CheckpointError(f"cannot resume from {path}: {', '.join(differ)} differ from the run that wrote it "
                              f"(round {checkpoint.round} of run {checkpoint.run[:8]}); use another checkpoint file "
                              "to start a new run, or run the same code and settings to continue")
