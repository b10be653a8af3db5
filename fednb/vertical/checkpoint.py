"""Checkpoints of vertical training: the coordinator's part of a hetero LR or SecureBoost run, to resume it.

``vfl.train_logistic(..., checkpoint="lr.ckpt")`` and ``vfl.train_boosting(..., checkpoint="sb.ckpt")``
write the file after every completed epoch (each model's, for one-vs-rest) or round of trees,
atomically, in the format of :mod:`fednb.federation.checkpoint` (``FEDNB-CKPT/1``, a SHA-256, a
bundle; its header says ``"kind": "vertical"``). It holds what the coordinator holds, nothing of
the parties':

- the vertical run id, under which every party keeps its own part (:mod:`fednb.vertical.parts`):
  LR weights at every party; thresholds at the feature parties; trees, leaves and margins at the
  label party;
- the steps done (epochs over all one-vs-rest models, or rounds of trees) and the record so far
  (losses, seconds, what the coordinator decrypted; the rounds' metrics);
- for hetero LR the Paillier key pair the coordinator made for the run (so the file is written
  with mode 0600, readable by its owner only; SecureBoost's key is the label party's and stays there);
- a fingerprint in plain words: the parties, the label party, the alignment and split (sizes,
  test fraction, seed) and every training option but the run's length (``epochs``, ``trees``:
  a run may be resumed to go further, as ``fed.train``'s rounds).

Calling the same training again with the file checks the fingerprint (each difference named and
refused), and continues from the next step under the same run id: each party rebuilds its model
from the part it kept, or refuses, naming itself, when it holds none (it restarted) and the run
must start again. A file cut short, altered or of another kind is refused whole.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fednb.federation.checkpoint import CheckpointError, read, write
from fednb.privacy import paillier

ALGORITHMS = ("logistic", "boosting")
#: what each part of the fingerprint is, in a refusal's words
FINGERPRINT = {"algorithm": "the algorithm", "parties": "the parties", "label_party": "the label party",
               "alignment": "the alignment or split", "options": "the training options"}
_RUN = re.compile(r"[0-9a-f]{32}")


@dataclass
class VerticalCheckpoint:
    """The coordinator's part of one vertical run after ``done`` steps (epochs, or rounds of trees)."""

    algorithm: str
    run: str
    done: int
    fingerprint: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)
    #: hetero LR's Paillier key pair as (p, q); None for SecureBoost and plaintext runs
    keys: tuple[int, int] | None = None
    #: how many times the run was resumed
    attempt: int = 0

    def key_pair(self) -> tuple[paillier.PublicKey, paillier.PrivateKey] | None:
        if self.keys is None:
            return None
        p, q = self.keys
        public = paillier.PublicKey(p * q)
        return public, paillier.PrivateKey(public, p, q)


def fingerprint(vfl: Any, algorithm: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint, as plain JSON values."""
    alignment = {"rows": dict(vfl.sizes), "aligned": vfl.size, "split": dict(vfl.splits), **vfl.split_settings}
    return _plain({"algorithm": algorithm, "parties": list(vfl.parties), "label_party": vfl.label_party,
                   "alignment": alignment, "options": dict(options)})


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def save(path: str | os.PathLike[str], checkpoint: VerticalCheckpoint) -> None:
    """Write ``checkpoint`` atomically (mode 0600: it may hold the run's Paillier secret key)."""
    keys = [format(v, "x") for v in checkpoint.keys] if checkpoint.keys is not None else None
    header = {"kind": "vertical", "algorithm": checkpoint.algorithm, "run": checkpoint.run, "done": checkpoint.done,
              "fingerprint": checkpoint.fingerprint, "keys": keys, "attempt": checkpoint.attempt}
    record = json.dumps(checkpoint.record, allow_nan=True).encode()
    write(path, header, {"record": np.frombuffer(record, dtype=np.uint8)})


def load(path: str | os.PathLike[str]) -> VerticalCheckpoint:
    """The vertical checkpoint at ``path``, checked whole before anything is taken from it."""
    header, arrays = read(path)
    if header.get("kind") != "vertical":
        raise CheckpointError(f"{path} holds a checkpoint of fed.train (horizontal training), not of a vertical run: "
                              "use another checkpoint file")
    try:
        algorithm, run, done, attempt = header["algorithm"], header["run"], header["done"], header["attempt"]
        fingerprint, keys = header["fingerprint"], header["keys"]
        raw = arrays["record"]
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError("its record is not text")
        record = json.loads(bytes(raw).decode("utf-8"))
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} does not hold a readable vertical checkpoint: {exc}") from None
    if algorithm not in ALGORITHMS or not isinstance(run, str) or not _RUN.fullmatch(run) or not _count(done) \
            or not _count(attempt) or not isinstance(fingerprint, dict) or not isinstance(record, dict) \
            or set(fingerprint) != set(FINGERPRINT):
        raise CheckpointError(f"{path} holds an inconsistent vertical checkpoint")
    pair = None
    if keys is not None:
        if not (isinstance(keys, list) and len(keys) == 2 and all(isinstance(k, str) and re.fullmatch(
                r"[0-9a-f]{1,1024}", k) for k in keys)):
            raise CheckpointError(f"{path} holds a malformed Paillier key")
        p, q = (int(k, 16) for k in keys)
        if (p * q).bit_length() not in paillier.KEY_BITS or p == q:
            raise CheckpointError(f"{path} holds a Paillier key of a size fednb does not use")
        pair = (p, q)
    return VerticalCheckpoint(algorithm, run, done, fingerprint, record, pair, attempt)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**31


def _differences(saved: Any, asked: Any) -> str:
    """What differs, in a few words: the keys of two mappings whose values differ, or the two values."""
    if isinstance(saved, Mapping) and isinstance(asked, Mapping):
        names = sorted(set(saved) | set(asked))
        return "; ".join(f"{n} {saved.get(n)!r} → {asked.get(n)!r}" for n in names if saved.get(n) != asked.get(n))
    return f"{saved!r} → {asked!r}"


def check(saved: VerticalCheckpoint, expected: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """CheckpointError naming each difference between the run asked for and the one that wrote ``saved``."""
    expected = _plain(dict(expected))
    differ = [f"{words} ({_differences(saved.fingerprint.get(k), expected.get(k))})"
              for k, words in FINGERPRINT.items() if saved.fingerprint.get(k) != expected.get(k)]
    if differ:
        raise CheckpointError(f"cannot resume from {path}: {'; and '.join(differ)} differ from the run that wrote it "
                              f"(step {saved.done} of vertical run {saved.run[:8]}); use another checkpoint file to "
                              "start a new run, or train with the same parties, alignment and options to continue")


def resume(path: str | os.PathLike[str] | None, algorithm: str,
           expected: Mapping[str, Any]) -> VerticalCheckpoint | None:
    """The checkpoint to continue from, checked against the run asked for; None when there is none yet."""
    if path is None or not Path(path).exists():
        return None
    saved = load(path)
    if saved.algorithm != algorithm:
        raise CheckpointError(f"cannot resume from {path}: it holds a {saved.algorithm} run, not a {algorithm} one")
    check(saved, expected, path)
    return saved


def epochs_done(saved: VerticalCheckpoint, epochs: int, models: int | None, path: str | os.PathLike[str] | None) -> int:
    """The epochs a hetero LR checkpoint holds (over its ``models`` one-vs-rest models, None: one binary model), if
    ``epochs`` can continue them: a binary model's epochs may grow, one-vs-rest models' may not."""
    before = saved.record.get("epochs")
    if not isinstance(before, int) or isinstance(before, bool) or before < 1 or saved.done < 1:
        raise CheckpointError(f"{path} holds an inconsistent vertical checkpoint")
    if models is not None and (before != epochs or saved.done > models * epochs):
        raise CheckpointError(f"cannot resume from {path}: its one-vs-rest models train {before} epochs each "
                              f"(it holds {saved.done}), not {epochs}")
    if models is None and saved.done > epochs:
        raise CheckpointError(f"cannot resume from {path}: it holds {saved.done} epochs, more than the {epochs} asked")
    return saved.done


def logistic_record(saved: VerticalCheckpoint, path: str | os.PathLike[str] | None
                    ) -> tuple[str, list[float], list[float], list[tuple[str, str, int]]]:
    """A hetero LR checkpoint's record, checked: the model's name, losses and seconds per epoch, and what the
    coordinator decrypted (kind, party, count)."""
    record = saved.record
    name, losses, seconds = _name(record), _numbers(record.get("losses")), _numbers(record.get("seconds"))
    view = record.get("view")
    if name is None or losses is None or seconds is None or not isinstance(view, list) or not all(
            isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], str) and _count(v[2])
            for v in view):
        raise CheckpointError(f"{path} holds an inconsistent vertical checkpoint (its record)")
    return name, losses, seconds, [(k, p, c) for k, p, c in view]


def boosting_record(saved: VerticalCheckpoint, path: str | os.PathLike[str] | None
                    ) -> tuple[str, int, list[dict[str, float]], list[float], float]:
    """A SecureBoost checkpoint's record, checked: the model's name, its trees per round, each round's metrics
    and seconds, and the seconds its setup took."""
    record = saved.record
    name, classes, raw = _name(record), record.get("classes"), record.get("history")
    seconds, setup = _numbers(record.get("seconds")), _numbers([record.get("setup_seconds")])
    history = [] if not isinstance(raw, list) else [
        dict(zip(h, values)) for h in raw if isinstance(h, dict) and all(isinstance(k, str) for k in h)
        for values in [_numbers(list(h.values()))] if values is not None]
    if name is None or not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= 256 \
            or not isinstance(raw, list) or len(history) != len(raw) or len(history) != saved.done \
            or seconds is None or setup is None:
        raise CheckpointError(f"{path} holds an inconsistent vertical checkpoint (its record)")
    return name, classes, history, seconds, setup[0]


def _name(record: Mapping[str, Any]) -> str | None:
    name = record.get("name")
    return name if isinstance(name, str) and re.fullmatch(r"[0-9a-f]{12}", name) else None


def _numbers(values: Any) -> list[float] | None:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        return None
    return [float(v) for v in values]
