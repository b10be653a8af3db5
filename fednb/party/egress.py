"""The egress guard: what may leave a party under the ``review`` and ``allowlist`` policies.

It runs in the party process on every reply its worker produced, and rebuilds the reply from
the allowed parts only, so nothing the worker added rides along:

train     tensors whose names, shapes and dtypes match the approved model's state_dict (the
          template of the weights the coordinator sent, which the worker checked against the
          model built from the approved source), all finite; the example count (at most the
          train split's size); at most 16 scalar metrics with plain names; and, when the request
          asked for it, the evaluation of the weights it sent (as for evaluate, below). A SCAFFOLD
          request (``"scaffold": true``) also gets the party's Δc_i back: ``scaffold.dc/<tensor>``,
          one finite array per ``scaffold.c/<tensor>`` it sent, shaped alike (one per float tensor
          of the weights); no ``scaffold.`` array leaves otherwise, and the party's own control
          variate (``scaffold.ci/``) never does.
evaluate  the example count (at most the test split's size) and the scalar metrics.
secure    the stages of a secure round (a ``train`` with a setup, then ``secagg`` requests), each
          only what its stage implies: three public keys (base64 of 32 bytes each) and, when
          asked, the evaluation of the weights sent; sealed shares addressed to parties that
          advertised keys, a commitment, the model hash, transcript and signature; one masked
          vector of unsigned integers of exactly the approved model's size + 1; shares of
          unmasking secrets for exactly the survivors and dropped parties named. No update,
          no example count, no metrics.
run       numbers, and lists/dicts/arrays of numbers, at most ``max_values`` of them; integers
          from 1 to ``min_group - 1`` are treated as small counts and suppressed (sent as None,
          or NaN inside an integer array), as statistical disclosure control does; no strings
          (dict keys and metric names must look like identifiers); no raw row of a dataset.
errors    their type (a built-in or fednb exception name) and, when the party's own code raised
          it, its message; an error raised by coordinator code leaves as its type and line only.
          The traceback stays in the party's log.

The guard bounds the shape and volume of what leaves; approved code can still encode data in
the numbers it is allowed to return (16 metrics a round are 1024 bits), which is why code is
reviewed before it runs.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednb.errors import GateError, WireError
from fednb.party.datasets import Datasets
from fednb.privacy import masking
from fednb.privacy.secagg import SEALED, SHARE
from fednb.strategies.scaffold import reply_template
from fednb.tensors import Template, check_update
from fednb.wire import MAX_METRICS, Message, check_metrics
from fednb.wire.values import pack_value, unpack_value
from fednb.party.vertical_egress import Blocked, VerticalGuard

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]{0,63}")
_BUILTIN_ERRORS = frozenset(name for name, value in vars(builtins).items()
                            if isinstance(value, type) and issubclass(value, BaseException))
_PARTY_ERRORS = frozenset({"WireError", "GateError", "EgressBlocked", "Cancelled", "TimeLimit", "WorkerCrashed",
                           "PolicyRefused", "ProtocolError", "FednbError", "SecAggError", "SecAggAbort",
                           "SecAggMessageError"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class EgressBlocked(GateError):
    """A reply the guard did not let out; ``reason`` says which rule it broke."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EgressRules:
    """The guard's limits, set by the party's owner."""

    max_metrics: int = MAX_METRICS
    max_values: int = 1000
    min_group: int = 5
    max_message: int = 300

    def __post_init__(self) -> None:
        for name in ("max_metrics", "max_values", "min_group", "max_message"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name != "min_group" else 0):
                raise ValueError(f"egress {name} must be a positive integer, got {value!r}")
        if self.max_metrics > MAX_METRICS:
            raise ValueError(f"egress max_metrics may be at most {MAX_METRICS}, the wire's limit")


def _plain_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EgressBlocked(f"{what} {str(name)[:40]!r} is not a plain name (letters, digits, _ . - /, at most 64)")
    return name


def _metrics(raw: Any, limit: int, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    try:
        metrics = check_metrics(raw, where=where, limit=limit)
    except WireError as exc:
        raise EgressBlocked(str(exc)) from None
    for key in metrics:
        _plain_name(key, "metric name")
    return metrics


def _examples(raw: Any, most: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= most:
        raise EgressBlocked(f"the example count must be an integer from 0 to {most}")
    return raw


def _seconds(raw: Any) -> float:
    return float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw) else 0.0


def _exactly(value: Any, names: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != names:
        raise EgressBlocked(f"{what} must have exactly the fields {', '.join(sorted(names))}")
    return value


def _b64(text: Any, length: int, what: str) -> str:
    """Base64 of exactly ``length`` bytes, re-encoded, so that nothing rides along in padding or spacing."""
    try:
        return masking.encode(masking.decode(text, length))
    except ValueError as exc:
        raise EgressBlocked(f"a {what} must be base64 of {length} bytes ({exc})") from None


class RowIndex:
    """Hashes of every row of a party's feature arrays, to recognise a raw row on its way out."""

    def __init__(self, datasets: Datasets) -> None:
        self._tables: list[tuple[np.dtype[Any], int, set[bytes]]] = []
        for split in datasets.splits.values():
            x = split.x
            width = int(np.prod(x.shape[1:])) if x.ndim > 1 else 0
            if width < 2 or x.dtype.kind not in "biuf":
                continue
            rows = np.ascontiguousarray(x.reshape(len(x), width))
            self._tables.append((rows.dtype, width, {_row_key(row) for row in rows}))

    def find(self, values: np.ndarray) -> str | None:
        """Why ``values`` hold a raw row of the data (as a message), or None."""
        flat = values.reshape(-1)
        for dtype, width, keys in self._tables:
            if flat.size < width or flat.size % width:
                continue
            rows = flat.reshape(-1, width)
            with np.errstate(all="ignore"):
                cast = rows.astype(dtype)
                exact = (cast.astype(np.float64) == rows.astype(np.float64)).all(axis=1)
            for row, same in zip(cast, exact):
                if same and row.min() != row.max() and _row_key(row) in keys:
                    return f"it contains a raw row of the party's data ({width} values equal to a record)"
        return None


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=12).digest()


class _RunCheck:
    """One walk over a run result: counts values, suppresses small counts, refuses the rest."""

    def __init__(self, rules: EgressRules, rows: RowIndex) -> None:
        self.rules, self.rows = rules, rows
        self.count = 0
        self.suppressed = 0

    def _spend(self, n: int) -> None:
        self.count += n
        if self.count > self.rules.max_values:
            raise EgressBlocked(f"the result has more than {self.rules.max_values} values")

    def _small(self, value: int) -> bool:
        return 1 <= value < self.rules.min_group

    def walk(self, item: Any) -> Any:
        if item is None or isinstance(item, bool):
            self._spend(1)
            return item
        if isinstance(item, int):
            self._spend(1)
            if self._small(item):
                self.suppressed += 1
                return None
            return item
        if isinstance(item, float):
            self._spend(1)
            return item
        if isinstance(item, str):
            raise EgressBlocked("the result contains a string; only numbers may leave this party")
        if isinstance(item, np.ndarray):
            return self._array(item)
        if isinstance(item, list):
            self._numbers(item)
            return [self.walk(element) for element in item]
        if isinstance(item, dict):
            out = {}
            for key, value in item.items():
                self._spend(1)
                if not isinstance(key, int):
                    _plain_name(key, "dict key")
                out[key] = self.walk(value)
            self._numbers(list(item.values()))
            return out
        raise EgressBlocked(f"the result contains a {type(item).__name__}")

    def _numbers(self, items: list[Any]) -> None:
        """A list (or dict values) of plain numbers may be a raw row: check it as an array."""
        if items and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            self._rows(np.asarray(items, dtype=np.float64))

    def _rows(self, array: np.ndarray) -> None:
        reason = self.rows.find(array)
        if reason is not None:
            raise EgressBlocked(f"the result was refused: {reason}")

    def _array(self, array: np.ndarray) -> np.ndarray:
        if array.dtype.kind not in "biuf":
            raise EgressBlocked(f"an array of {array.dtype} may not leave this party")
        self._spend(int(array.size))
        self._rows(array)
        if array.dtype.kind in "iu":
            small = (array >= 1) & (array < self.rules.min_group)
            if small.any():
                self.suppressed += int(small.sum())
                out = array.astype(np.float64)
                out[small] = np.nan
                return out
        return array


class Guard:
    """Checks and rebuilds one party's replies; see the module docstring for the rules."""

    def __init__(self, party: str, datasets: Datasets, rules: EgressRules | None = None) -> None:
        self.party = party
        self.rules = rules or EgressRules()
        self.datasets = datasets
        self._rows: RowIndex | None = None
        self._vertical_rules: VerticalGuard | None = None
        info = datasets.describe()
        self._sizes = {name: int(split["examples"]) for name, split in info.items()}

    def reply(self, request: Message, reply: Message, *, masked: tuple[int, str] | None = None) -> tuple[Message, str]:
        """The reply that may leave, and a note for the audit log; EgressBlocked when none may.

        ``masked`` is (length, dtype name) of the masked vector the approved secure round allows.
        """
        if reply.type == "error":
            return self.error(request, reply), ""
        if reply.type != "result":
            raise EgressBlocked(f"a {reply.type!r} reply may not leave")
        content = reply.content
        if request.type == "secagg" or (request.type == "train" and request.content.get("secagg") is not None):
            return self._secure(request, reply, masked), ""
        if request.type == "train":
            examples = content.get("examples")
            problem = check_update(self._train_template(request, reply), reply.arrays, examples)
            if problem:
                raise EgressBlocked(f"the update does not fit the approved model: {problem}")
            out = {"examples": _examples(examples, self._sizes.get("train", 0)),
                   "metrics": _metrics(content.get("metrics"), self.rules.max_metrics, "train metrics"),
                   "seconds": _seconds(content.get("seconds"))}
            dp = request.content.get("dp")
            if dp is not None:
                out.update(self._private(dp, request, reply))
            evaluation = content.get("evaluation")
            if request.content.get("evaluate") and evaluation is not None:
                out["evaluation"] = self._evaluation(evaluation)
            return request.reply("result", out, dict(reply.arrays)), ""
        if request.type == "evaluate":
            if reply.arrays:
                raise EgressBlocked("an evaluation may return metrics only, not tensors")
            out = {**self._evaluation(content), "seconds": _seconds(content.get("seconds"))}
            return request.reply("result", out), ""
        if request.type == "run":
            return self._run(request, reply)
        if request.type == "vertical":
            return self._vertical(request, reply), ""
        raise EgressBlocked(f"no rule lets a reply to {request.type!r} out")

    @staticmethod
    def _train_template(request: Message, reply: Message) -> Template:
        """What a train reply's tensors must match: the weights sent, and Δc_i where SCAFFOLD was asked."""
        if request.content.get("scaffold") is True and request.content.get("dp") is not None:
            raise EgressBlocked("a SCAFFOLD reply under DP has no rule to leave by")
        try:
            return reply_template(request.arrays, request.content.get("scaffold") is True, reply.arrays)
        except ValueError as exc:
            raise EgressBlocked(str(exc)) from None

    def _vertical(self, request: Message, reply: Message) -> Message:
        if self._vertical_rules is None:
            train = self.datasets["train"]
            self._vertical_rules = VerticalGuard(len(train.x), int(np.prod(train.x.shape[1:])))
        try:
            content, arrays = self._vertical_rules.reply(request, reply)
        except (Blocked, ValueError, KeyError, IndexError, TypeError) as exc:
            raise EgressBlocked(f"vertical step {request.content.get('step')}: {exc}") from None
        return request.reply("result", {"vertical": content, "seconds": _seconds(reply.content.get("seconds"))},
                             arrays)

    @staticmethod
    def _private(dp: Any, request: Message, reply: Message) -> dict[str, Any]:
        """Under differential privacy: no training metrics (measured without noise), and a DP-FedAvg update
        within its clip, with at most its clipped bit."""
        out: dict[str, Any] = {"metrics": {}}
        if dp.get("kind") != "dpfedavg":
            return out
        clip = float(dp.get("clip") or 0.0)
        norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(reply.arrays[k], dtype=np.float64)
                                                     - np.asarray(a, dtype=np.float64))))
                             for k, a in request.arrays.items()))
        if not norm <= clip * (1 + 1e-5) + 1e-6:  # float32 weights round the clipped difference
            raise EgressBlocked(f"the update's norm {norm:.4g} exceeds the DP-FedAvg clip {clip:.4g}")
        clipped = (reply.content.get("dp") or {}).get("clipped")
        if dp.get("adaptive") and clipped in (0, 1) and not isinstance(clipped, bool):
            out["dp"] = {"clipped": int(clipped)}
        return out

    def _secure(self, request: Message, reply: Message, masked: tuple[int, str] | None) -> Message:
        """A secure stage's reply, rebuilt from what its stage implies (see the module docstring)."""
        content = reply.content
        out: dict[str, Any] = {"seconds": _seconds(content.get("seconds"))}
        stage = request.content.get("stage") if request.type == "secagg" else "keys"
        answer = content.get("secagg")
        if stage != "masked" and reply.arrays:
            raise EgressBlocked(f"the {stage} stage of a secure round returns no tensors")
        if stage == "keys":
            keys = _exactly(answer, {"encryption_key", "masking_key", "signing_key"}, "advertised keys")
            out["secagg"] = {name: _b64(value, masking.KEY, name) for name, value in keys.items()}
            evaluation = content.get("evaluation")
            if request.content.get("evaluate") and evaluation is not None:
                out["evaluation"] = self._evaluation(evaluation)
            return request.reply("result", out)
        payload = request.content.get("request") or {}
        if stage == "shares":
            fields = _exactly(answer, {"shares", "commitment", "model_hash", "transcript", "signature"}, "shares")
            advertised = set(payload.get("keys") or {}) - {self.party}
            sealed = fields["shares"]
            if not isinstance(sealed, dict) or not set(sealed) <= advertised:
                raise EgressBlocked("shares may be addressed only to parties that advertised keys")
            for name in ("model_hash", "transcript"):
                if not isinstance(fields[name], str) or not _HEX64.fullmatch(fields[name]):
                    raise EgressBlocked(f"the {name.replace('_', ' ')} must be a 256-bit hash in hex")
            out["secagg"] = {"shares": {peer: _b64(text, SEALED, "sealed share") for peer, text in sealed.items()},
                             "commitment": _b64(fields["commitment"], 32, "commitment"),
                             "model_hash": fields["model_hash"], "transcript": fields["transcript"],
                             "signature": _b64(fields["signature"], masking.SIGNATURE, "signature")}
            return request.reply("result", out)
        if stage == "masked":
            if answer or set(reply.arrays) != {"masked"} or masked is None:
                raise EgressBlocked("the masked stage returns one masked vector and nothing else")
            vector = reply.arrays["masked"]
            length, dtype = masked
            if vector.dtype != np.dtype(dtype) or vector.shape != (length,):
                raise EgressBlocked(f"the masked vector must be {length} {dtype} values (the approved model's "
                                    f"size + 1), not {vector.size} {vector.dtype}")
            out["secagg"] = {}
            return request.reply("result", out, {"masked": vector})
        if stage == "unmask":
            fields = _exactly(answer, {"self_mask_shares", "masking_key_shares"}, "unmasking shares")
            survivors, dropped = set(payload.get("survivors") or ()), set(payload.get("dropped") or ())
            tables = {}
            allowed_by = {"self_mask_shares": survivors - dropped, "masking_key_shares": dropped - survivors}
            for name, allowed in allowed_by.items():
                table = fields[name]
                if not isinstance(table, dict) or not set(table) <= allowed:
                    raise EgressBlocked("unmasking shares may be only of the survivors' self masks and the dropped "
                                        "parties' masking keys named, never both of one party")
                tables[name] = {owner: _b64(text, SHARE, "share") for owner, text in table.items()}
            out["secagg"] = tables
            return request.reply("result", out)
        raise EgressBlocked(f"no rule lets a reply to the secure stage {stage!r} out")

    def _evaluation(self, content: Any) -> dict[str, Any]:
        """The example count (at most the test split's size) and the metrics of one evaluation."""
        if not isinstance(content, dict):
            raise EgressBlocked("an evaluation must be an object of examples and metrics")
        return {"examples": _examples(content.get("examples"), self._sizes.get("test", 0)),
                "metrics": _metrics(content.get("metrics"), self.rules.max_metrics, "evaluation metrics")}

    def _run(self, request: Message, reply: Message) -> tuple[Message, str]:
        try:
            value = unpack_value(reply.content.get("value"), reply.arrays)
        except (WireError, ValueError, TypeError) as exc:
            raise EgressBlocked(f"the result is malformed: {exc}") from None
        if self._rows is None:
            self._rows = RowIndex(self.datasets)
        check = _RunCheck(self.rules, self._rows)
        cleaned = check.walk(value)
        packed, arrays = pack_value(cleaned)
        note = f"suppressed {check.suppressed} count(s) under {self.rules.min_group}" if check.suppressed else ""
        content = {"value": packed, "seconds": _seconds(reply.content.get("seconds"))}
        return request.reply("result", content, arrays), note

    def error(self, request: Message, reply: Message) -> Message:
        """An error's type, and its message only when the party's own code wrote it."""
        content = reply.content
        error_type = content.get("error_type")
        if not isinstance(error_type, str) or error_type not in _BUILTIN_ERRORS | _PARTY_ERRORS:
            error_type = "Exception"
        origin, line = content.get("origin"), content.get("line")
        raw = content.get("message")
        message = raw if isinstance(raw, str) else ""
        if origin == "cell":
            where = {"train": "the training cell or model source", "evaluate": "the model source",
                     "run": "the cell"}.get(request.type, "the code")
            at = f", line {line}" if isinstance(line, int) and not isinstance(line, bool) else ""
            message = f"raised in {where}{at}; the message and traceback stay in {self.party}'s log"
        elif len(message) > self.rules.max_message:
            message = message[: self.rules.max_message] + " …"
        return request.reply("error", {"error_type": error_type, "message": message})
