"""The fuzz's generators: each spoils valid messages (tests/fuzzing_frames.py) one way, seeded by its rng.

Part of the fuzz of tests/fuzzing.py, whose docstring lists them; tests/fuzzing_mix.py weighs them into the mix.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from fednb.privacy import masking
from fednb.wire import MESSAGE_TYPES
from tests.fuzzing_frames import Aim, Frames, _frames, dump, rid, valid

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
                                 "config": {"bits": number()}, "dimension": number(),
                                 "prg": masking.PRG}
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
