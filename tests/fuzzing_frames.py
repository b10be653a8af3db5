"""Valid messages for the fuzz, the raw material its generators spoil: whom they aim at, and how they are written.

Part of the fuzz of tests/fuzzing.py: :func:`valid` makes a well-formed header and its arrays, :func:`dump`
writes JSON as a hostile peer would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

import fednb
from fednb.privacy import masking
from fednb.wire import DEFAULT_LIMITS, MESSAGE_TYPES, Limits
from fednb.wire.vertical import STEPS

Frames = list[bytes]


@dataclass(frozen=True)
class Aim:
    """Whom the frames go to (``party`` or ``coordinator``), the request they answer, and its limits."""

    to: str = "party"
    reply_to: str | None = None
    round: int | None = None
    limits: Limits = DEFAULT_LIMITS
    #: The request's buffer descriptors (name, dtype, shape), for replies that mirror its weights.
    buffers: tuple[tuple[str, str, tuple[int, ...]], ...] = ()


def party_limits(max_message_bytes: int) -> Limits:
    """A party's limits for ``--max-message-bytes`` (as PartyServer derives them)."""
    return replace(DEFAULT_LIMITS, max_message_bytes=max_message_bytes,
                   max_buffer_bytes=min(DEFAULT_LIMITS.max_buffer_bytes, max_message_bytes),
                   max_header_bytes=min(DEFAULT_LIMITS.max_header_bytes, max_message_bytes))


def rid(rng: random.Random) -> str:
    """A message or run id drawn from ``rng`` (uuid4 would not repeat with the seed)."""
    return f"{rng.getrandbits(128):032x}"


# -- valid messages, the raw material ------------------------------------------------------------

TO_PARTY = ("hello", "train", "secagg", "vertical", "evaluate", "run", "cancel", "heartbeat")
TO_COORDINATOR = ("welcome", "result", "error", "status", "heartbeat")
#: A few sources only: a party under review or allowlist files each new code hash it refuses.
SOURCES = ("6 * 7", "model = 1", "import torch.nn as nn\nmodel = nn.Linear(4, 3)\n")


def _content(type_: str, rng: random.Random, aim: Aim) -> dict[str, Any]:
    run = rid(rng)
    config = {"lr": 0.1, "epochs": 1, "batch_size": 16, "optimizer": "sgd", "seed": 3}
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "hello": lambda: {"coordinator": "fuzz", "version": fednb.__version__},
        "welcome": lambda: {"party": "fuzz", "version": fednb.__version__, "policy": "open",
                            "datasets": {"train": {"examples": 10, "features": [4], "ids": False, "label": True}},
                            "containment": "none"},
        "heartbeat": lambda: {},
        "train": lambda: {"source": rng.choice(SOURCES), "config": config, "run": run, "evaluate": rng.random() < 0.5,
                          **({"secagg": {"run": run, "round": aim.round, "config": {"bits": 32}, "dimension": 15,
                                        "prg": masking.PRG}}
                             if rng.random() < 0.3 else {})},
        "secagg": lambda: {"run": run, "stage": rng.choice(("shares", "masked", "unmask")),
                           "request": {"keys": {"a": "k"}, "parties": ["a", "b", "c"], "survivors": ["a"]}},
        "evaluate": lambda: {"source": rng.choice(SOURCES), "config": {"batch_size": 256, "loss": "cross_entropy"}},
        "vertical": lambda: {"run": run, "step": rng.choice(sorted(STEPS)),
                             "request": {"config": {"encrypted": True, "epochs": 1}, "rows": [0, 1]}},
        "run": lambda: {"source": rng.choice(SOURCES)},
        "cancel": lambda: {"target": rid(rng)},
        "result": lambda: {"examples": 10, "metrics": {"loss": 0.5, "accuracy": 0.75}, "seconds": 0.1,
                           "value": rng.choice([42, [1, 2], {"a": 1.5}, {"$array": "v0"}, None]),
                           "evaluation": {"examples": 5, "metrics": {"loss": 0.4}}},
        "error": lambda: {"error_type": "ValueError", "message": "no", "traceback": "Traceback (most recent ...)"},
        "status": lambda: {"state": rng.choice(("awaiting approval", "running")), "detail": "fuzz"},
    }
    return makers[type_]()


def _arrays(type_: str, rng: random.Random) -> dict[str, np.ndarray]:
    if type_ in ("train", "evaluate") or (type_ == "result" and rng.random() < 0.5):
        return {"weight": np.ones((3, 4), np.float32), "bias": np.zeros(3, np.float32)}
    if type_ == "result":
        return {"v0": np.arange(4, dtype=np.int64)}
    return {}


def valid(rng: random.Random, aim: Aim, type_: str | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A well-formed header (as a dict) and its arrays, of a type the receiver expects (mostly)."""
    if type_ is None:
        pool = TO_PARTY if aim.to == "party" else TO_COORDINATOR
        type_ = rng.choice(pool) if rng.random() < 0.9 else rng.choice(sorted(MESSAGE_TYPES))
    arrays = _arrays(type_, rng)
    round_ = aim.round if aim.round is not None else (rng.randint(1, 50) if type_ in ("train", "secagg") else None)
    reply_to = aim.reply_to if aim.to == "coordinator" and rng.random() < 0.8 else None
    descriptors = [{"name": name, "dtype": str(a.dtype), "shape": list(a.shape), "nbytes": a.nbytes}
                   for name, a in arrays.items()]
    header = {"v": 1, "id": rid(rng), "type": type_, "round": round_, "reply_to": reply_to,
              "content": _content(type_, rng, replace(aim, round=round_)), "buffers": descriptors}
    return header, list(arrays.values())


def dump(header: Any) -> bytes:
    """JSON as a hostile peer writes it: ensure_ascii escapes lone surrogates, NaN is allowed."""
    return json.dumps(header, separators=(",", ":")).encode()


def _frames(header: Any, arrays: list[np.ndarray]) -> Frames:
    return [dump(header), *(a.tobytes() for a in arrays)]
