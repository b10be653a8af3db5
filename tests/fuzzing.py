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

The parts, each importable from here as before: valid messages and their aim (tests/fuzzing_frames.py),
the generators (tests/fuzzing_generators.py), their mix with what once broke a receiver and the draw
(tests/fuzzing_mix.py); the harness that sends them, to a party or from a fake one, is here.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

import fednb
from tests.fuzzing_frames import (SOURCES, TO_COORDINATOR, TO_PARTY, Aim, Frames, dump,  # noqa: F401 - as before
                                  party_limits, rid, valid)
from tests.fuzzing_generators import (HOSTILE_NUMBERS, HOSTILE_VALUES, HUGE_INT, TOKENS,  # noqa: F401 - as before
                                      TOO_HUGE_INT, WRONG_VALUES, descriptors, hostile_json, hostile_values, mutated,
                                      oversized, random_bytes, truncated, wrong_content)
from tests.fuzzing_mix import (FOUND, GENERATORS, KNOWN_DEFECTS, Generator, draw, found,  # noqa: F401 - as before
                               known_defect, mix)


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
