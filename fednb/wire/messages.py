"""The content each message type carries, and the check that a decoded one conforms.

The envelope guarantees a well-formed header; this module guarantees that a message's
``content`` has the fields its type needs, with the right JSON types and bounded sizes,
so that code above the wire can index it without further checks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from fednb.errors import WireError
from fednb.wire.envelope import Message
from fednb.wire.limits import MAX_METRICS
from fednb.wire.vertical import STEPS

MAX_SOURCE = 1024 * 1024  # bytes of code in one request
MAX_TEXT = 64 * 1024  # error messages, tracebacks, details
MAX_NAME = 256

_Spec = dict[str, tuple[type | tuple[type, ...], bool]]  # field -> (JSON types, required)

_CONTENT: dict[str, _Spec] = {
    "hello": {"coordinator": (str, False), "version": (str, True)},
    "welcome": {
        "party": (str, True),
        "version": (str, True),
        "policy": (str, True),
        "datasets": (dict, True),
        # how the party contains coordinator code: "full" (no network, only its datasets),
        # "weak" (limits only: the kernel refused namespaces), "none" (a simulation's own process)
        "containment": (str, False),
        # the party's privacy budget (fednb.party.budget.Budget.summary), where its owner set one
        "privacy": (dict, False),
        # a shared endpoint's parties (fednb.party.population_server): {"parties": [names], "datasets":
        # {split: shape}}, with their example counts as the int64 arrays pool.train and pool.test
        "pool": (dict, False),
    },
    "heartbeat": {},
    # ``run``: the training run this round belongs to (a party refuses a round that does not move
    # forward within it); ``attempt``: how many times the run was resumed from its checkpoint (a resumed
    # run may train again a round its crashed coordinator had sent); ``evaluate``: first evaluate the
    # incoming weights, then train.
    # ``secagg``: train under secure aggregation; the round's setup (run, round, config, dimension, prg),
    # and the reply carries the party's advertised keys instead of its update.
    # ``scaffold``: SCAFFOLD's round; the request carries the server control variate beside the weights
    # (scaffold.c/<tensor>), the reply the party's change of its own (scaffold.dc/<tensor>)
    "train": {"source": (str, True), "train_cell": (str, False), "config": (dict, True), "run": (str, True),
              "evaluate": (bool, False), "secagg": (dict, False), "dp": (dict, False), "attempt": (int, False),
              "scaffold": (bool, False)},
    # a later stage of a secure round (see fednb.federation.secure): no code, only the stage's
    # relayed payload, for the round its ``train`` request opened
    "secagg": {"run": (str, True), "stage": (str, True), "request": (dict, True)},
    "evaluate": {"source": (str, True), "config": (dict, True)},
    # one step of a built-in vertical protocol (fednb.party.vertical.STEPS): no code, the step's
    # parameters, and its bulk data (blinded points, sealed or masked ciphertexts) as tensors
    "vertical": {"run": (str, True), "step": (str, True), "request": (dict, True)},
    "run": {"source": (str, True)},
    # ``finish``: the coordinator stopped waiting (a round's deadline) but the work may run to its end,
    # keeping the session it warmed; without it, the running work is stopped (Ctrl-C, a stop button)
    "cancel": {"target": (str, True), "finish": (bool, False)},
    "result": {
        "examples": (int, False),
        "metrics": (dict, False),
        "seconds": (float, False),
        "value": ((dict, list, str, int, float, bool, type(None)), False),
        "evaluation": (dict, False),  # a train reply's evaluation of the weights it was sent
        "secagg": (dict, False),  # a secure stage's answer (keys, shares, or unmasking shares)
        "privacy": (dict, False),  # a budget party's ε spent, budget and latest charges
        "dp": (dict, False),  # DP-FedAvg's adaptive clipping: {"clipped": 0 or 1}
        "vertical": (dict, False),  # a vertical step's answer (counts, sizes, keys, metrics)
    },
    "error": {"error_type": (str, True), "message": (str, True), "traceback": (str, False)},
    "status": {"state": (str, True), "detail": (str, False)},
}

_RUN_ID = re.compile(r"[0-9a-f]{32}")
#: The stages of a secure round after the first (which is a ``train`` request).
SECAGG_STAGES = ("shares", "masked", "unmask")
#: The fields of a secure round's setup (``fednb.privacy.secagg.RoundSetup`` reads it with the same set).
SECAGG_SETUP = frozenset({"run", "round", "config", "dimension", "prg"})

_LIMITS = {"source": MAX_SOURCE, "train_cell": MAX_SOURCE, "message": MAX_TEXT, "traceback": MAX_TEXT, "detail": MAX_TEXT}


def check_content(message: Message) -> Message:
    """Return ``message`` when its content fits its type, else raise WireError."""
    spec = _CONTENT.get(message.type)
    if spec is None:
        raise WireError(f"unknown message type {message.type!r}")
    content = message.content
    unknown = set(content) - set(spec)
    if unknown:
        raise WireError(f"{message.type}: unexpected field(s) {', '.join(sorted(unknown))}")
    for name, (types, required) in spec.items():
        if name not in content or content[name] is None:
            if required:
                raise WireError(f"{message.type}: missing field {name!r}")
            continue
        value = content[name]
        if types is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and types in (int, float)):
            raise WireError(f"{message.type}: field {name!r} has the wrong type {type(value).__name__}")
        limit = _LIMITS.get(name, MAX_NAME if isinstance(value, str) else None)
        if isinstance(value, str) and limit is not None and len(value) > limit:
            raise WireError(f"{message.type}: field {name!r} is longer than {limit} characters")
    if message.type == "train" and not 0 <= content.get("attempt", 0) <= 2**20:
        raise WireError("train: field 'attempt' must be an integer from 0 to 2^20")
    if message.type in ("train", "secagg", "vertical") and not _RUN_ID.fullmatch(content["run"]):
        raise WireError(f"{message.type}: field 'run' must be a run id of 32 lowercase hex digits")
    if message.type == "train" and content.get("secagg") is not None:
        setup = content["secagg"]
        if set(setup) != SECAGG_SETUP or setup["run"] != content["run"] or setup["round"] != message.round \
                or not isinstance(setup["config"], dict):
            raise WireError("train: field 'secagg' must be the round's setup (run, round, config, dimension, prg) "
                            "of this run and round")
    if message.type == "vertical" and content["step"] not in STEPS:
        raise WireError(f"vertical: unknown step {content['step']!r}")
    if message.type == "secagg":
        if content["stage"] not in SECAGG_STAGES:
            raise WireError(f"secagg: field 'stage' must be one of {', '.join(SECAGG_STAGES)}")
        if message.round is None:
            raise WireError("secagg: a secure stage belongs to a round")
        if message.arrays:
            raise WireError("secagg: a secure stage's request carries no tensors")
    if message.type == "welcome":
        check_datasets(content["datasets"])
        if content.get("pool") is not None:
            check_pool(content["pool"], message.arrays)
    if message.type == "result":
        if content.get("metrics") is not None:
            check_metrics(content["metrics"], where="result")
        if content.get("evaluation") is not None:
            check_evaluation(content["evaluation"], where="result")
    return message


def check_datasets(datasets: Any) -> None:
    """A welcome's datasets: each split a JSON object, its ``examples`` a count, its ``ids``/``label`` flags."""
    for name, split in datasets.items():
        if not isinstance(split, dict):
            raise WireError(f"welcome: dataset {name!r} must be an object")
        examples = split.get("examples")
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int)
                                     or not 0 <= examples <= 2**48):
            raise WireError(f"welcome: dataset {name!r} has no valid example count")


#: A name a party of a shared endpoint (and of a simulation) may have: its address frame, its directory.
PARTY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_POOL = 1_000_000


def check_pool(pool: Any, arrays: Mapping[str, Any]) -> None:
    """A shared endpoint's welcome: distinct party names that an address frame can carry, a shape per
    split, and one example count per party and split."""
    if set(pool) != {"parties", "datasets"} or not isinstance(pool["parties"], list) \
            or not isinstance(pool["datasets"], dict):
        raise WireError("welcome: field 'pool' must be {parties: [names], datasets: {split: shape}}")
    names = pool["parties"]
    if len(names) > MAX_POOL or not all(isinstance(n, str) and PARTY_NAME.fullmatch(n) for n in names) \
            or len(set(names)) != len(names):
        raise WireError(f"welcome: a pool's parties must be up to {MAX_POOL:,} distinct names of 1 to 64 letters, "
                        "digits, '.', '_' or '-'")
    check_datasets(pool["datasets"])
    for split in pool["datasets"]:
        counts = arrays.get(f"pool.{split}")
        if counts is None or counts.dtype.kind != "i" or counts.shape != (len(names),) \
                or (counts.size and (counts.min() < 0 or counts.max() > 2**48)):
            raise WireError(f"welcome: a pool needs one example count per party for {split!r} (pool.{split})")


def check_evaluation(evaluation: Any, *, where: str) -> dict[str, Any]:
    """Validate ``{"examples": int >= 0, "metrics": {name: number}}``: one evaluation in a train reply."""
    if not isinstance(evaluation, Mapping) or set(evaluation) != {"examples", "metrics"}:
        raise WireError(f"{where}: evaluation must be an object with exactly: examples, metrics")
    examples = evaluation["examples"]
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise WireError(f"{where}: evaluation examples must be a non-negative integer")
    return {"examples": examples, "metrics": check_metrics(evaluation["metrics"], where=f"{where} evaluation")}


def check_metrics(metrics: Any, *, where: str, limit: int = MAX_METRICS) -> dict[str, float]:
    """Validate a ``{name: number}`` mapping of at most ``limit`` finite scalars."""
    if not isinstance(metrics, Mapping):
        raise WireError(f"{where}: metrics must be an object")
    if len(metrics) > limit:
        raise WireError(f"{where}: {len(metrics)} metrics, more than {limit}")
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_NAME:
            raise WireError(f"{where}: metric names must be short strings")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WireError(f"{where}: metric {key!r} must be a finite number")
        checked[key] = float(value)
    return checked
