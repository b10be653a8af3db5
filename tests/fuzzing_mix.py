"""The fuzz's mix: every generator by weight, the frames that once broke a receiver, and the draw.

Part of the fuzz of tests/fuzzing.py. :data:`GENERATORS` and :data:`KNOWN_DEFECTS` live here only (the harness and
the tests reach them through tests/fuzzing.py, which hands on these same objects).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from tests.fuzzing_frames import Aim, Frames, dump, valid
from tests.fuzzing_generators import (descriptors, hostile_json, hostile_values, mutated, oversized, random_bytes,
                                      truncated, wrong_content)


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
