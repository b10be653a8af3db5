"""Seeded hostile frames for a party's and a coordinator's decoder, and the harness that sends them.

Shared by ``tests/test_fuzz.py`` (the short fuzz of ``make test``) and ``bench/fuzz.py``. Each
generator takes a ``random.Random`` and an :class:`Aim` (who receives, whom the frames answer,
the receiver's limits) and returns one multipart message as a list of ``bytes``; the same seed
gives the same frames. :func:`mix` interleaves the generators by weight:

``random``       1-3 frames of random bytes
``mutated``      a valid message with bytes flipped, deleted or repeated and tokens inserted
                 (lone-surrogate escapes, NaN, 1e999, huge ints, deep nesting, duplicate keys)
``truncated``    a valid message cut short: its header, a buffer, or a whole buffer frame
``oversized``    headers over the receiver's limit, more buffers than allowed, sizes it may not hold
``descriptors``  buffer descriptors with the wrong count, lengths, dtypes, shapes and names
``hostile_json`` 10,000-deep arrays and objects, 1 MB strings, 10,000 keys, huge ints, bad UTF-8
``wrong_content`` a valid envelope of every type in ``fednb.wire.MESSAGE_TYPES`` with fields
                 missing, unexpected or of the wrong type, at the top or nested
``hostile_values`` a valid envelope whose values are legal but hostile above the wire: configs at
                 their bounds, spoilt weights (NaN, shapes, dtypes), odd returned values

:data:`FOUND` holds the frames that once broke a receiver (tests/test_fuzz.py sends each on purpose,
and the mix draws them too); :data:`KNOWN_DEFECTS` names what still does, which :func:`mix` draws
again (none is known).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

import fednb
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
                          **({"secagg": {"run": run, "round": aim.round, "config": {"bits": 32}, "dimension": 15}}
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


# -- the generators ---------------------------------------------------------------------------------

HUGE_INT = b"9" * 4000  # under Python's 4300-digit limit: json.loads makes it an int
TOO_HUGE_INT = b"9" * 5000  # over it: json.loads raises ValueError
TOKENS = (b"\\ud800", b"\\udfff", b"\\udc00\\ud800", b"\\u0000", b"NaN", b"Infinity", b"-Infinity", b"1e999",
          b"-1e999", HUGE_INT, TOO_HUGE_INT, b"[" * 2000, b'{"a":' * 50, b'"', b"{", b"}", b"[", b"]", b",", b":",
          b"null", b"true", b"-0", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x00", b"\\", b'"v":1,', b'"id":"' +
          b"a" * 32 + b'",', b'"type":"run",', b'"content":{},', b'"buffers":[],', b'"round":2147483648,')


def random_bytes(rng: random.Random, aim: Aim) -> Frames:
    frames = [rng.randbytes(int(2 ** rng.uniform(0, 12))) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        frames[0] = b'{"v":1,' + frames[0]
    return frames


def mutated(rng: random.Random, aim: Aim) -> Frames:
    header, arrays = valid(rng, aim)
    data = bytearray(dump(header))
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.4:
            data[at:at] = rng.choice(TOKENS)
        elif kind < 0.7:
            data[at] = rng.randrange(256)
        elif kind < 0.85:
            del data[at:at + rng.randint(1, 16)]
        else:
            data[at:at] = data[at:at + rng.randint(1, 64)]
    frames = [bytes(data), *(a.tobytes() for a in arrays)]
    if len(frames) > 1 and rng.random() < 0.2:
        frames[-1] = frames[-1] + b"\x01"
    return frames


def truncated(rng: random.Random, aim: Aim) -> Frames:
    header, arrays = valid(rng, aim, rng.choice(("train", "evaluate")) if rng.random() < 0.5 else None)
    frames = _frames(header, arrays)
    cut = rng.random()
    if cut < 0.5 or len(frames) == 1:
        frames[0] = frames[0][:rng.randrange(len(frames[0]))]
    elif cut < 0.75:
        frames.pop(rng.randrange(1, len(frames)))
    else:
        at = rng.randrange(1, len(frames))
        frames[at] = frames[at][:rng.randrange(len(frames[at]))]
    return frames


def oversized(rng: random.Random, aim: Aim) -> Frames:
    limits = aim.limits
    header, arrays = valid(rng, aim, "run" if aim.to == "party" else "result")
    kind = rng.randrange(4)
    if kind == 0:  # a header just over the limit, valid JSON otherwise
        pad = limits.max_header_bytes - len(dump(header)) + rng.randint(1, 4096)
        header["content"]["message" if aim.to == "coordinator" else "source"] = "x" * pad
        return _frames(header, arrays)
    if kind == 1:  # more buffer descriptors than allowed, none sent
        header["buffers"] = [{"name": f"b{i}", "dtype": "uint8", "shape": [0], "nbytes": 0}
                             for i in range(limits.max_buffers + 1)]
        return [dump(header)]
    if kind == 2:  # one buffer over the limit, and buffers that add up to more than a message
        over = [{"name": "big", "dtype": "uint8", "shape": [limits.max_buffer_bytes + 1],
                 "nbytes": limits.max_buffer_bytes + 1}]
        count = limits.max_message_bytes // limits.max_buffer_bytes + 1
        sum_over = [{"name": f"b{i}", "dtype": "uint8", "shape": [limits.max_buffer_bytes],
                     "nbytes": limits.max_buffer_bytes} for i in range(count)]
        header["buffers"] = rng.choice((over, sum_over))
        return [dump(header), *([b""] * len(header["buffers"]))]
    return [rng.randbytes(64) * ((limits.max_header_bytes // 64) + 1)]  # a header of noise


WRONG_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 2**31, 2**63, 2**64 + 1, 1.5, -0.0, 1e308, float("inf"),
                                 float("nan"), "", "x" * 300, "\ud800", "\x00", [], [1, 2], [[[]]], {}, {"a": 1},
                                 {"$array": "missing"}, {"$float": "nope"}, {"$items": [[1]]})


def _wrong(rng: random.Random) -> Any:
    return rng.choice(WRONG_VALUES)


def descriptors(rng: random.Random, aim: Aim) -> Frames:
    header, arrays = valid(rng, aim, rng.choice(("train", "evaluate", "result", "run")))
    if not header["buffers"]:
        header["buffers"], arrays = [{"name": "w", "dtype": "float32", "shape": [2, 2], "nbytes": 16}], [
            np.zeros((2, 2), np.float32)]
    frames = _frames(header, arrays)
    buffers, one = header["buffers"], rng.choice(header["buffers"])
    corruption = rng.randrange(9)
    if corruption == 0:  # the count: a descriptor too few or too many, or a frame too many
        if rng.random() < 0.5:
            buffers.pop()
        elif rng.random() < 0.5:
            buffers.append({"name": "extra", "dtype": "uint8", "shape": [1], "nbytes": 1})
        else:
            frames.append(b"\x00")
    elif corruption == 1:  # a frame's length against its descriptor
        at = buffers.index(one) + 1
        frames[at] = frames[at][:-1] if rng.random() < 0.5 else frames[at] + b"\x00" * rng.randint(1, 9)
    elif corruption == 2:
        one["dtype"] = rng.choice(("object", "float128", "<f4", ">f8", "complex64", "", "V8", "datetime64", "str",
                                   "O", 7, None, ["float32"], "float32\x00"))
    elif corruption == 3:
        one["shape"] = rng.choice(([-1, 4], [True, 4], [1.5, 8], "12", None, {}, [1] * 17, [2**63], [3],
                                   [2, 2, 2, 2, 2, 2, 2, 2], [0], [[3], [4]]))
    elif corruption == 4:
        one["nbytes"] = rng.choice((-1, 2**64, 1.0, "48", True, None, one["nbytes"] + 1, 0,
                                    aim.limits.max_buffer_bytes + 1))
    elif corruption == 5:
        one["name"] = rng.choice(("", "x" * (aim.limits.max_name_length + 1), 5, None, ["w"], "\ud800"))
    elif corruption == 6 and len(buffers) > 1:
        buffers[1]["name"] = buffers[0]["name"]
    elif corruption == 7:
        if rng.random() < 0.5:
            one.pop(rng.choice(sorted(one)))
        else:
            one[rng.choice(("extra", "offset", "strides"))] = 0
    else:
        header["buffers"] = rng.choice(({}, "x", None, 3, [None], [[]], ["weight"]))
    frames[0] = dump(header)
    return frames


def _nest(depth: int, kind: str) -> bytes:
    return b"[" * depth + b"]" * depth if kind == "array" else b'{"a":' * depth + b"1" + b"}" * depth


def hostile_json(rng: random.Random, aim: Aim) -> Frames:
    header, _ = valid(rng, aim, "run" if aim.to == "party" else rng.choice(("result", "error")))
    head = dump({**header, "content": {}, "buffers": []})
    kind = rng.randrange(10)
    if kind == 0:  # 10,000 levels of arrays or objects, where the content goes
        return [head.replace(b'"content":{}', b'"content":{"deep":' + _nest(10_000, rng.choice(("array", "object")))
                             + b"}")]
    if kind == 1:  # just at and just over the depth limit
        depth = aim.limits.max_json_depth - 1 + rng.randint(0, 2)
        return [head.replace(b'"content":{}', b'"content":{"deep":' + _nest(depth, "array") + b"}")]
    if kind == 2:  # a 1 MB string in a field the type has, or in one it has not (few distinct: see SOURCES)
        big = "x" * 1_000_000 + str(rng.randrange(3))
        field_ = {"party": "source", "coordinator": "message"}[aim.to] if rng.random() < 0.5 else "junk"
        return [dump({**header, "content": {**header["content"], field_: big}})]
    if kind == 3:  # 10,000 keys, or an array of 50,000 numbers (each costs a decoder ~50 ms)
        many = b"{" + b",".join(b'"k%d":0' % i for i in range(10_000)) + b"}" if rng.random() < 0.5 else \
            b"[" + b"0," * 49_999 + b"0]"
        return [head.replace(b'"content":{}', b'"content":{"many":' + many + b"}")]
    if kind == 4:  # huge ints where ints go, and where they do not
        place = rng.choice((b'"round":null', b'"v":1', b'"content":{}', b'"buffers":[]'))
        number = rng.choice((HUGE_INT, TOO_HUGE_INT, b"-" + HUGE_INT, b"1e999", b"NaN", b"-Infinity"))
        if place == b'"content":{}':
            return [head.replace(place, b'"content":{"n":' + number + b"}")]
        if place == b'"buffers":[]':
            return [head.replace(place, b'"buffers":[{"name":"w","dtype":"uint8","shape":[' + number +
                                 b'],"nbytes":' + number + b"}]"), b""]
        return [head.replace(place, place.split(b":")[0] + b":" + number)]
    if kind == 5:  # the same key twice, at the top or nested
        if rng.random() < 0.5:
            return [head.replace(b'"content":{}', b'"content":{"a":1,"a":2}')]
        return [head[:-1] + b',"type":"hello"}']
    if kind == 6:  # encodings that are not UTF-8 JSON
        text = head.decode()
        return [rng.choice((b"\xef\xbb\xbf" + head, text.encode("utf-16"), text.encode("utf-32"),
                            head.replace(b'"v"', b'"\xff"'), head.replace(b"{", b"\xc0\xfb", 1)))]
    if kind == 7:  # lone surrogates in keys and values, escaped and raw
        content = rng.choice((b'{"\\ud800":1}', b'{"a":"\\udfff"}', b'{"a":["\\ud83d"]}', b'{"\xed\xa0\x80":1}'))
        return [head.replace(b'"content":{}', b'"content":' + content)]
    if kind == 8:  # not an object, or nothing at all
        return [rng.choice((b"", b" ", b"null", b"[]", b"1", b'"header"', b"[" + head + b"]", head + head,
                            head + b"x"))]
    return [head.replace(b'"content":{}', b'"content":' + rng.choice((b"[]", b"null", b'"x"', b"1", b"true")))]


def _poke(rng: random.Random, value: Any) -> Any:
    """``value`` with one nested part (or itself) replaced by a value of the wrong type."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(sorted(value))
        return {**value, key: _poke(rng, value[key])} if rng.random() < 0.8 else \
            {k: v for k, v in value.items() if k != key}
    if isinstance(value, list) and value and rng.random() < 0.7:
        at = rng.randrange(len(value))
        return [*value[:at], _poke(rng, value[at]), *value[at + 1:]]
    return _wrong(rng)


def wrong_content(rng: random.Random, aim: Aim) -> Frames:
    header, arrays = valid(rng, aim, rng.choice(sorted(MESSAGE_TYPES)))
    content = header["content"]
    change = rng.random()  # nested changes first: they keep the envelope valid and reach the code above it
    if change < 0.5 and content:
        key = rng.choice(sorted(content))
        content[key] = _poke(rng, content[key])
    elif change < 0.6 and content:
        content.pop(rng.choice(sorted(content)))
    elif change < 0.7:
        content[rng.choice(("junk", "Source", "", "source ", "value", "examples"))] = _wrong(rng)
    elif change < 0.85:
        header[rng.choice(("round", "reply_to", "id", "v"))] = rng.choice(
            (None, -1, 2**31, True, "1", 1.0, "A" * 32, rid(rng).upper(), rid(rng)[:31]))
    else:
        content.update({"run": rng.choice((rid(rng)[:31], rid(rng).upper(), "x" * 32))} if "run" in content else
                       {"step": "lr.nonsense", "stage": "setup"})
    return _frames(header, arrays)


HOSTILE_NUMBERS: tuple[Any, ...] = (-1, 0, 1, 2**31, 2**62, 2**63 - 1, 2**63, 10**30, 1e308, -1e308, 5e-324, -0.0)
HOSTILE_VALUES: tuple[Any, ...] = (
    {"$items": [[1, 2], ["a", 3], [1, 4]]}, {"$items": [[[1], 2]]}, {"$dict": {"$x": 1}}, {"$float": "nan"},
    {"$float": 1}, {"$array": "weight"}, {"$array": ["v0"]}, "x" * 1025, "é" * 600, [0] * 100_001,
    [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]], {"$a": 1}, {str(i): i for i in range(64)}, 2**200, -(2**63),
    [None, True, 1.5, "s"])


def _hostile_arrays(rng: random.Random, aim: Aim) -> dict[str, np.ndarray]:
    """Arrays like the request's (or a small model's), spoilt: non-finite, reshaped, retyped, extra, missing."""
    like = aim.buffers or (("weight", "float32", (3, 4)), ("bias", "float32", (3,)))
    arrays = {name: np.zeros(shape, np.dtype(dtype)) for name, dtype, shape in like}
    name = rng.choice(sorted(arrays))
    spoil = rng.randrange(7)
    if spoil == 0 and arrays[name].size and arrays[name].dtype.kind == "f":
        arrays[name] = arrays[name].copy()
        arrays[name].reshape(-1)[rng.randrange(arrays[name].size)] = rng.choice((np.nan, np.inf, -np.inf))
    elif spoil == 1:
        arrays[name] = np.zeros(tuple(n + 1 for n in arrays[name].shape) or (1,), arrays[name].dtype)
    elif spoil == 2:
        arrays[name] = arrays[name].astype(rng.choice(("int8", "float64", "bool", "uint64", "float16")))
    elif spoil == 3:
        arrays["extra"] = np.zeros(3, np.float32)
    elif spoil == 4:
        arrays.pop(name)
    elif spoil == 5:
        arrays = {f"t{i}": np.zeros(0, np.uint8) for i in range(rng.choice((0, 1, 1000)))}
    else:
        arrays[name] = np.asarray(np.float32(rng.choice((0.0, 1e38))))  # a 0-d array
    return arrays


def hostile_values(rng: random.Random, aim: Aim) -> Frames:
    """A valid envelope whose values are legal JSON but hostile to the code above the wire."""
    if aim.to == "coordinator":
        type_ = rng.choices(("result", "status", "error"), (6, 1, 1))[0]
    else:
        type_ = rng.choice(("train", "evaluate", "run", "vertical", "secagg", "cancel", "hello"))
    header, _ = valid(rng, aim, type_)
    content = header["content"]
    arrays = _hostile_arrays(rng, aim) if type_ in ("train", "evaluate", "result") else {}
    number = lambda: rng.choice(HOSTILE_NUMBERS)  # noqa: E731
    if type_ == "result":
        content.update(examples=rng.choice((-1, 0, 1, 2**62, 2**63, 10**30, None)),
                       seconds=rng.choice((0, -1.0, 1e308)),
                       metrics={f"m{i}" * rng.choice((1, 60)): number() for i in range(rng.choice((0, 1, 16)))},
                       evaluation={"examples": rng.choice((0, 1, 2**63, 10**30)), "metrics": {"loss": number()}},
                       value=rng.choice(HOSTILE_VALUES))
        for key in ("secagg", "privacy", "dp", "vertical"):
            if rng.random() < 0.2:
                content[key] = _poke(rng, {"epsilon_spent": number(), "clipped": number(), "keys": {"a": 1}})
    elif type_ == "status":
        content.update(state=rng.choice(("awaiting approval", "running", "", "x" * 256)), detail="d" * 65_536)
    elif type_ == "error":
        content.update(error_type=rng.choice(("", "x" * 256, "ReplayError", "\n")), message="m" * 65_536)
    elif type_ == "train":
        content["config"] = {key: number() for key in rng.sample(
            ["epochs", "batch_size", "lr", "momentum", "weight_decay", "mu", "seed", "max_steps"], 3)}
        content["config"].update(optimizer=rng.choice(("adam", "x", "")), loss=rng.choice(("mse", "x")))
        if rng.random() < 0.5:
            content["secagg"] = {"run": content["run"], "round": header["round"],
                                 "config": {"bits": number()}, "dimension": number()}
        if rng.random() < 0.5:
            content["dp"] = {"kind": rng.choice(("dpsgd", "dpfedavg", "x")), "noise_multiplier": number(),
                             "max_grad_norm": number(), "delta": number(), "target_epsilon": number(),
                             "rounds": number()}
    elif type_ == "evaluate":
        content["config"] = {"batch_size": number(), "loss": rng.choice(("mse", "x", "")), "seed": number()}
    elif type_ in ("vertical", "secagg"):
        content["request"] = _poke(rng, content["request"])
        if type_ == "vertical" and rng.random() < 0.3:
            content["step"] = "lr.start"
    elif type_ == "cancel":
        content["target"] = rng.choice((aim.reply_to or rid(rng), "", "x" * 256))
    elif type_ == "hello":
        content.update(coordinator="c" * 256, version=rng.choice(("0.0.0", "99.0", "")))
    header["buffers"] = [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape), "nbytes": a.nbytes}
                         for n, a in arrays.items()]
    return _frames(header, list(arrays.values()))


Generator = Callable[[random.Random, Aim], Frames]
#: Every generator, with its weight in :func:`mix` (the costly ones, 1-4 MB a message, weigh less).
GENERATORS: dict[str, tuple[Generator, float]] = {
    "random": (random_bytes, 1.0), "mutated": (mutated, 3.0), "truncated": (truncated, 1.0),
    "oversized": (oversized, 0.1), "descriptors": (descriptors, 1.5), "hostile_json": (hostile_json, 0.5),
    "wrong_content": (wrong_content, 2.0), "hostile_values": (hostile_values, 1.0),
}


# -- what once broke a receiver ---------------------------------------------------------------------
# Each: a generator of frames that triggered a defect (tests/test_fuzz.py sends them) and a test that
# tells such frames apart (for KNOWN_DEFECTS, should one be found again).

def _header(frames: Frames, needle: bytes) -> dict[str, Any]:
    """The header as JSON where it holds ``needle`` (a cheap test first: most frames do not), else {}."""
    if needle not in frames[0]:
        return {}
    try:
        header = json.loads(frames[0])
    except (ValueError, RecursionError):
        return {}
    return header if isinstance(header, dict) else {}


def _huge_empty_shape(rng: random.Random, aim: Aim) -> Frames:
    header, _ = valid(rng, aim, "run" if aim.to == "party" else "result")
    shape = rng.choice(([0, 2**70], [0, 2**40, 2**40], [2**63, 0], [0, 10**30, 3]))
    header["buffers"] = [{"name": "v0", "dtype": rng.choice(("uint8", "float32")), "shape": shape, "nbytes": 0}]
    return [dump(header), b""]


def _is_huge_empty_shape(frames: Frames) -> bool:
    """A zero-size buffer whose other dimensions numpy cannot hold: every descriptor check passes, reshape raises."""
    buffers = _header(frames, b"shape").get("buffers")
    return isinstance(buffers, list) and any(
        isinstance(b, dict) and isinstance(b.get("shape"), list) and 0 in b["shape"]
        and math.prod(n for n in b["shape"] if isinstance(n, int) and n > 0) >= 2**60 for b in buffers)


def _vertical_config(rng: random.Random, aim: Aim) -> Frames:
    header, _ = valid(rng, aim, "vertical")
    header["content"].update(step="lr.start", request={"config": rng.choice(([1], "x", 5, 1.5, True))})
    return [dump(header)]


def _is_vertical_config(frames: Frames) -> bool:
    """A vertical lr.start whose request's config is truthy but not an object: the gate calls .get on it."""
    header = _header(frames, b"lr.start")
    content = header.get("content")
    if header.get("type") != "vertical" or not isinstance(content, dict) or content.get("step") != "lr.start":
        return False
    request = content.get("request")
    return isinstance(request, dict) and bool(request.get("config")) and not isinstance(request["config"], dict)


def _welcome_datasets(rng: random.Random, aim: Aim) -> Frames:
    header, _ = valid(rng, replace(aim, to="coordinator"), "welcome")
    header["content"]["datasets"] = {"train": rng.choice((5, [], "x", True))}
    return [dump(header)]


def _is_welcome_datasets(frames: Frames) -> bool:
    """A welcome whose datasets' train entry is not an object: Federation.status() calls .get on it."""
    header = _header(frames, b"datasets")
    content = header.get("content")
    datasets = content.get("datasets") if isinstance(content, dict) else None
    return header.get("type") == "welcome" and isinstance(datasets, dict) and "train" in datasets \
        and not isinstance(datasets["train"], dict)


#: Frames that once broke a receiver (each now a regression test in tests/test_fuzz.py, and part of the mix).
FOUND: dict[str, Generator] = {"huge_empty_shape": _huge_empty_shape, "vertical_config": _vertical_config,
                               "welcome_datasets": _welcome_datasets}
#: What still breaks a receiver: mix() draws again where a generator made one (none known now).
KNOWN_DEFECTS: dict[str, tuple[Generator, Callable[[Frames], bool]]] = {}


def found(rng: random.Random, aim: Aim) -> Frames:
    """One of the frames that once broke a receiver."""
    return FOUND[rng.choice(sorted(FOUND))](rng, aim)


GENERATORS["found"] = (found, 0.2)


def known_defect(frames: Frames) -> str | None:
    """The known defect ``frames`` would trigger, if any."""
    return next((name for name, (_, triggers) in KNOWN_DEFECTS.items() if triggers(frames)), None)


def draw(rng: random.Random, aim: Aim, generators: dict[str, tuple[Generator, float]] = GENERATORS,
         avoided: Counter[str] | None = None) -> tuple[str, Frames]:
    """One message from a generator chosen by weight, drawn again while it would trigger a known defect."""
    names = sorted(generators)
    name = rng.choices(names, [generators[n][1] for n in names])[0]
    while True:
        frames = generators[name][0](rng, aim)
        defect = known_defect(frames)
        if defect is None:
            return name, frames
        if avoided is not None:
            avoided[defect] += 1


def mix(seed: int, count: int, aim: Aim = Aim(), generators: dict[str, tuple[Generator, float]] = GENERATORS,
        avoided: Counter[str] | None = None) -> Iterator[tuple[str, Frames]]:
    """``count`` messages of :func:`draw`: (generator name, frames), the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        yield draw(rng, aim, generators, avoided)


# -- the harness ------------------------------------------------------------------------------------

def rss(pid: int | str = "self") -> int:
    """A process's resident set size in bytes (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


@dataclass
class Tally:
    """What one fuzz run sent (by generator) and got back (by reply type, errors by error_type)."""

    sent: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    welcomed: bool = False

    def count(self, frames: list[bytes]) -> None:
        header = json.loads(frames[0])
        self.replies[header["type"]] += 1
        if header["type"] == "error":
            self.errors[header["content"]["error_type"]] += 1


def hello(rng: random.Random) -> Frames:
    """A hello: what a party answers with its welcome, after everything sent before it."""
    return [dump({"v": 1, "id": rid(rng), "type": "hello", "round": None, "reply_to": None,
                  "content": {"version": fednb.__version__}, "buffers": []})]


def fuzz_party(sock: zmq.Socket, messages: Iterator[tuple[str, Frames]], *, timeout: float = 60.0) -> Tally:
    """Send every message through ``sock`` (a DEALER at a party), reading replies as they come.

    Then a hello: a party handles one connection's messages in order, so its welcome comes after
    its answers to everything before; ``Tally.welcomed`` says whether it came within ``timeout``.
    """
    tally = Tally()
    started = time.monotonic()
    for name, frames in messages:
        sock.send_multipart(frames)
        tally.sent[name] += 1
        while sock.poll(0):
            tally.count(sock.recv_multipart())
    frames = hello(random.Random())
    asked = json.loads(frames[0])["id"]
    sock.send_multipart(frames)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            reply = sock.recv_multipart()
            tally.count(reply)
            header = json.loads(reply[0])
            if header["reply_to"] == asked:
                tally.welcomed = header["type"] == "welcome"
                break
    tally.seconds = time.monotonic() - started
    return tally


class FakeParty:
    """A ROUTER that passes for a party (welcome, heartbeats) and answers each request with hostile frames.

    Every request gets ``burst`` messages of :func:`draw`, aimed at it (``reply_to``, ``round``, its
    weights' names and shapes), then, except every ``silent_every``-th request, one malformed frame
    that fails it at once: the silent ones leave the coordinator to its timeout.
    """

    def __init__(self, endpoint: str, *, seed: int, burst: int = 20, silent_every: int = 25,
                 generators: dict[str, tuple[Generator, float]] = GENERATORS, heartbeat: float = 0.3) -> None:
        self.endpoint, self.burst, self.silent_every, self.heartbeat = endpoint, burst, silent_every, heartbeat
        self.generators = generators
        self.rng = random.Random(seed)  # the bursts: the same for a seed, request after request
        self._ids = random.Random(seed + 1)  # welcomes and heartbeats, as many as time makes
        self.sent: Counter[str] = Counter()
        self.avoided: Counter[str] = Counter()
        self.requests = 0
        #: Frames to send instead of the next request's burst (a known defect, on purpose).
        self.next_burst: list[Frames] = []
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._peers: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fuzz-fake-party", daemon=True)

    def __enter__(self) -> FakeParty:
        sock = self._context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(self.endpoint)
        self._socket = sock
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._socket is not None:
            self._socket.close(linger=0)
        self._context.term()

    def _serve(self) -> None:
        assert self._socket is not None
        sock, next_beat = self._socket, 0.0
        while not self._stop.is_set():
            if sock.poll(50):
                routing, *frames = sock.recv_multipart()
                self._peers.add(routing)
                self._answer(sock, routing, json.loads(frames[0]))  # the coordinator under test: trusted JSON
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat
                beat = dump({"v": 1, "id": rid(self._ids), "type": "heartbeat", "round": None, "reply_to": None,
                             "content": {}, "buffers": []})
                for peer in self._peers:
                    sock.send_multipart([peer, beat])

    def _answer(self, sock: zmq.Socket, routing: bytes, request: dict[str, Any]) -> None:
        if request["type"] == "hello":
            header, _ = valid(self._ids, Aim("coordinator"), "welcome")
            sock.send_multipart([routing, dump({**header, "reply_to": request["id"]})])
            return
        if request["type"] in ("heartbeat", "cancel"):
            return
        self.requests += 1
        if self.next_burst:
            burst, self.next_burst = self.next_burst, []
            for frames in burst:
                sock.send_multipart([routing, *frames])
            return
        aim = Aim("coordinator", reply_to=request["id"], round=request["round"],
                  buffers=tuple((b["name"], b["dtype"], tuple(b["shape"])) for b in request["buffers"]))
        for _ in range(self.burst):
            name, frames = draw(self.rng, aim, self.generators, self.avoided)
            sock.send_multipart([routing, *frames])
            self.sent[name] += 1
        if self.requests % self.silent_every:
            sock.send_multipart([routing, b"not a header"])
            self.sent["final"] += 1
