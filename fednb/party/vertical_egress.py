"""The egress guard's rules for vertical steps: only what each step implies, of exactly the size it implies.

Blinded points are 32 bytes each, one per row of the party's table (or of the points it was
sent); sealed and masked messages hold Paillier ciphertexts whose number follows from the batch
(its rows, from the shared batch plan) and the party's own columns, and whose width follows
from the public key the run started with; scores leave only for rows of the test split; metrics
are a handful of finite numbers. Anything else is blocked. The guard keeps, per run, the
training split's size and each model's settings, as the approved steps set them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.party.boosting_egress import Blocked, BoostingRules
from fednb.privacy import paillier
from fednb.privacy.psi import POINT
from fednb.privacy.seal import NONCE, TAG
from fednb.vertical.logistic import LogisticConfig, batches
from fednb.vertical.parts import KEPT
from fednb.wire import Message

__all__ = ["Blocked", "VerticalGuard"]
MAX_METRICS = 8

HEADER, VECTOR = 4, 11  # the vector message's count, and each vector's kind, scale and length
SEALED = NONCE + TAG


def _points(arrays: Mapping[str, np.ndarray], name: str, count: int) -> None:
    value = arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.shape != (count, POINT):
        raise Blocked(f"{name!r} must be {count} blinded points")


def _size(arrays: Mapping[str, np.ndarray], name: str, expected: int) -> None:
    value = arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 1 or value.size != expected:
        got = "none" if value is None else f"{value.dtype} {value.shape}"
        raise Blocked(f"{name!r} must be {expected} bytes of ciphertext, got {got}")


def _count(answer: Mapping[str, Any], name: str, most: int) -> int:
    value = answer.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise Blocked(f"{name!r} must be a count from 0 to {most}")
    return value


class VerticalGuard(BoostingRules):
    """What may leave for each vertical step of one party (train table of ``rows`` rows and ``columns`` columns)."""

    def __init__(self, rows: int, columns: int) -> None:
        self.rows, self.columns = rows, columns
        self.train: dict[str, int] = {}  # run → rows of its training split
        self.test: dict[str, int] = {}
        self.models: dict[tuple[str, str], tuple[LogisticConfig, int]] = {}  # (run, model) → settings, width

    def reply(self, request: Message, reply: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        content = request.content
        run, step, asked = content["run"], content["step"], content["request"]
        answer = reply.content.get("vertical")
        if not isinstance(answer, Mapping):
            raise Blocked("a vertical reply must carry its answer")
        arrays = dict(reply.arrays)
        if any(name.startswith(KEPT) for name in arrays):  # taken out before the guard (fednb.party.keep_vertical)
            raise Blocked("what a party keeps of a vertical run (its part of the model) never leaves it")
        check = getattr(self, "_" + step.replace(".", "_"), None)
        if check is None:
            raise Blocked(f"no rule lets out the reply to vertical step {step!r}")
        out = check(run, asked, request, dict(answer), arrays)
        return out, arrays

    # -- alignment ----------------------------------------------------------------------------------

    def _setup(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        if arrays or set(answer) != {"seal_key", "rows", "features", "role"} or answer["rows"] != self.rows \
                or answer["features"] != self.columns or answer["role"] not in ("label", "features"):
            raise Blocked("setup returns a seal key, the table's size and the party's role only")
        if not isinstance(answer["seal_key"], str) or len(answer["seal_key"]) != 44:
            raise Blocked("the seal key must be 32 bytes in base64")
        return answer

    def _psi_blind(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        _points(arrays, "points", self.rows)
        if set(arrays) != {"points"}:
            raise Blocked("blinding returns the blinded points only")
        return {"points": self.rows}

    def _psi_double(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        sent = request.arrays.get("points")
        count = 0 if sent is None else int(sent.shape[0])
        _points(arrays, "points", count)
        if set(arrays) != {"points"}:
            raise Blocked("double blinding returns the points it was sent, blinded again, only")
        return {"points": count}

    def _psi_match(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        if arrays:
            raise Blocked("matching returns a count only")
        return {"matched": _count(answer, "matched", self.rows)}

    def _psi_keep(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        size = _count(answer, "size", self.rows)
        for name, value in arrays.items():
            if not name.startswith("keep.") or value.dtype != np.int64 or value.ndim != 1 or value.size != size:
                raise Blocked("keeping returns, per peer, the positions of the rows every party shares")
        return {"size": size}

    def _psi_restrict(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        if arrays:
            raise Blocked("restricting returns a count only")
        return {"size": _count(answer, "size", self.rows)}

    def _split(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        train, test = _count(answer, "train", self.rows), _count(answer, "test", self.rows)
        if arrays or set(answer) != {"train", "test"}:
            raise Blocked("splitting returns the two sizes only")
        self.train[run], self.test[run] = train, test
        return {"train": train, "test": test}

    # -- hetero logistic regression -----------------------------------------------------------------

    def _lr_start(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        settings = dict(asked.get("config") or {})
        config = LogisticConfig(**{k: v for k, v in settings.items() if k != "paillier"},
                                paillier=paillier.PaillierConfig(**dict(settings.get("paillier") or {})))
        if not config.encrypted:
            raise Blocked("a guarded party trains hetero logistic regression encrypted only")
        n = int(str(asked["public_key"]), 16)
        width = (n * n).bit_length() + 7 >> 3
        self.models[(run, str(asked["model"]))] = (config, width)
        if arrays or set(answer) != {"rows"} or answer["rows"] != self.train.get(run):
            raise Blocked("starting a model returns its training rows only")
        return answer

    def _model(self, run: str, asked: Any) -> tuple[LogisticConfig, int]:
        model = self.models.get((run, str(asked.get("model"))))
        if model is None:
            raise Blocked("no model of this run was started here")
        return model

    def _batch(self, run: str, asked: Any, config: LogisticConfig) -> int:
        plan = batches(self.train[run], config, int(asked["epoch"]))
        return len(plan[int(asked["batch"])])

    def _lr_forward(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config, width = self._model(run, asked)
        rows = self._batch(run, asked, config)
        expected = HEADER + VECTOR + rows * width + (VECTOR + width if config.loss else 0) + SEALED
        _size(arrays, "sealed", expected)
        peers = [name for name in arrays if name.startswith("sealed.")]
        for name in peers:  # [[u_h]] for a later feature party's cross terms
            _size(arrays, name, HEADER + VECTOR + rows * width + SEALED)
        if set(arrays) != {"sealed", *peers} or answer or (peers and not config.loss):
            raise Blocked("forward returns sealed messages only")
        return {}

    def _lr_residual(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config, width = self._model(run, asked)
        rows = self._batch(run, asked, config)
        hosts = [name for name in arrays if name.startswith("sealed.")]
        for name in hosts:
            _size(arrays, name, HEADER + VECTOR + rows * width + SEALED)
        _size(arrays, "masked", HEADER + VECTOR + (self.columns + 1) * width)
        allowed = set(hosts) | {"masked"}
        if "loss" in arrays:
            _size(arrays, "loss", HEADER + VECTOR + width)
            allowed.add("loss")
        if not hosts or set(arrays) != allowed or answer.get("rows") != rows:
            raise Blocked("the residual returns sealed residuals, the loss and a masked gradient only")
        return {"rows": rows}

    def _lr_gradient(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        _config, width = self._model(run, asked)
        _size(arrays, "masked", HEADER + VECTOR + self.columns * width)
        if "cross" in arrays:  # the masked cross terms of the loss: one ciphertext
            _size(arrays, "cross", HEADER + VECTOR + width)
        if not set(arrays) <= {"masked", "cross"} or answer:
            raise Blocked("the gradient step returns a masked gradient (and masked cross terms) only")
        return {}

    def _lr_finish(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        if arrays or answer:
            raise Blocked("finishing returns nothing")
        return {}

    def _lr_scores(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        self._model(run, asked)
        positions = request.arrays.get("positions")
        count = self.test.get(run, 0) if positions is None else int(positions.size)
        scores = arrays.get("scores")
        if scores is None or scores.dtype != np.float64 or scores.shape != (count,) or set(arrays) != {"scores"} \
                or count > self.test.get(run, 0) or not np.all(np.isfinite(scores)):
            raise Blocked("scores leave only for rows of the test split")
        return {"rows": count}

    def _lr_evaluate(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        metrics = answer.get("metrics")
        if arrays or not isinstance(metrics, Mapping) or len(metrics) > MAX_METRICS or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in metrics.items()):
            raise Blocked("evaluation returns a few finite metrics only")
        return {"metrics": dict(metrics)}
