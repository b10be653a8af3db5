"""Fuzzing at scale: 100,000 hostile frames at a live ``fednb party``, 20,000 hostile replies at a coordinator.

The long version of tests/test_fuzz.py, with the same generators (tests/fuzzing.py).

- party: a ``fednb party`` process (policy allowlist; ``--transport curve``: tcp + CURVE with an
  authorized key, policy review and a privacy budget) gets every generator's frames through one
  DEALER. Afterwards: does it answer a hello, its RSS (VmRSS) before, at its highest and after,
  whether its audit log verifies and holds one line per request that reached its gate, and any
  traceback in its log.
- coordinator: ``fednb.connect`` to a real party (a ``fednb party`` process, policy open) and a
  fake one that answers every request with 20 hostile messages; ``run`` calls (with an ``evaluate``
  and a training round now and then) until the fake has sent the frames asked for. Afterwards: the real party's result
  was kept every time, how the fake's calls ended, the slowest call against its timeout, this
  process's RSS and whether the socket thread is alive.

Frames that trigger a known defect (tests/fuzzing.py's KNOWN_DEFECTS, none now) are drawn again, and counted;
those that once did (FOUND) are part of the mix.

Usage::

    .venv/bin/python bench/fuzz.py                         # 100,000 frames at a party, 20,000 at a coordinator
    .venv/bin/python bench/fuzz.py --party-frames 10000 --coordinator-frames 2000 --transport curve
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/fuzzing.py: the generators the short fuzz uses too

MiB = 1 << 20
SAMPLES = 20  # RSS readings over a party run


def table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def spread(samples: list[int]) -> str:
    """RSS readings in MiB, at most 11 of them evenly picked."""
    step = max(1, (len(samples) - 1) // 10)
    return " ".join(f"{sample / MiB:.0f}" for sample in samples[::step]) + " MiB"


def counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in counter.most_common()) or "none"


# -- a party process ------------------------------------------------------------------------------

@dataclass
class Running:
    """A ``fednb party`` process, its endpoint, and its log lines, read as they come (a full pipe would
    stop the party's logging, and then the party)."""

    process: subprocess.Popen[str]
    endpoint: str
    lines: list[str]
    reader: threading.Thread

    def stop(self) -> int:
        """SIGTERM, as its owner stops it; its exit status (its last log lines read)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(10)
        return code


def start_party(work: Path, name: str, *args: str) -> Running:
    """``fednb party --name NAME ARGS`` over the digits data, once it listens."""
    import numpy as np

    from fednb.data import load_dataset

    if not (work / "train.npz").exists():
        data = load_dataset("digits")
        np.savez(work / "train.npz", x=data.x, y=data.y)
    process = subprocess.Popen([sys.executable, "-m", "fednb.cli", "party", "--name", name, "--data",
                                f"train={work / 'train.npz'}", "--dir", str(work / name), "--threads", "1", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.stdout, process.stderr
    assert stdout is not None and stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([stdout], [], [], 0.5)[0]:
            match = re.search(r"listening on (\S+)", stdout.readline())
            if match:
                return Running(process, match.group(1), lines, reader)
    process.kill()
    process.wait()
    raise RuntimeError(f"the party did not start: {''.join(lines[-5:])}")


def bench_party(frames: int, seed: int, transport: str) -> None:
    import zmq

    from fednb.party.audit import verify
    from fednb.transport import write_keypair
    from tests.fuzzing import Aim, Tally, fuzz_party, mix, party_limits, rss

    with tempfile.TemporaryDirectory(prefix="fednb-fuzz-") as name:
        work = Path(name)
        os.chmod(work, 0o700)
        keys: tuple[Any, ...] = ()
        if transport == "ipc":
            args = ["--listen", f"ipc://{work}/c.sock", "--policy", "allowlist"]
        else:
            party_key, coordinator = write_keypair(work / "party"), write_keypair(work / "coordinator")
            args = ["--listen", "tcp://127.0.0.1:*", "--key", str(work / "party"), "--authorized-keys",
                    str(work / "coordinator.key"), "--policy", "review", "--dp-epsilon", "8"]
            keys = (coordinator, party_key.public)
        party = start_party(work, "clinic", *args)
        process, context = party.process, None
        try:
            context = zmq.Context()
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            if keys:
                sock.curve_secretkey, sock.curve_publickey = keys[0].secret, keys[0].public
                sock.curve_serverkey = keys[1]
            sock.connect(party.endpoint)
            aim = Aim("party", limits=party_limits(1 << 30))
            warm = fuzz_party(sock, mix(seed + 1, 500, aim))
            before = rss(process.pid)
            samples = [before]
            avoided: Counter[str] = Counter()
            total, chunk = Tally(), max(1, frames // SAMPLES)
            for start in range(0, frames, chunk):
                part = fuzz_party(sock, mix(seed + start, min(chunk, frames - start), aim, avoided=avoided))
                for mine, theirs in ((total.sent, part.sent), (total.replies, part.replies),
                                     (total.errors, part.errors)):
                    mine.update(theirs)
                total.seconds += part.seconds
                if not part.welcomed:
                    break
                samples.append(rss(process.pid))
            alive, after = process.poll() is None, rss(process.pid) if process.poll() is None else 0
            answered = alive and fuzz_party(sock, iter(())).welcomed
        finally:
            if context is not None:
                context.destroy(linger=0)
            code = party.stop()
        log_text = (work / "clinic" / "party.log").read_text()
        checked = verify(work / "clinic")
        waited = sum(str(e.get("outcome", "")).startswith("abandoned") for e in checked.entries)
        refused = sum(t.errors[k] for t in (warm, total) for k in ("PolicyRefused", "ReplayError"))

    sent = sum(total.sent.values())
    print(f"\n== a `fednb party` process over {transport}: {sent:,} hostile frames "
          f"(after 500 to warm up), seed {seed}\n")
    print(table([(name, f"{count:,}", f"{count / sent:.1%}") for name, count in sorted(total.sent.items())]
                + [("total", f"{sent:,}", "100%")], ("generator", "frames", "share")))
    print(f"\nreplies:              {counts(total.replies)}")
    print(f"errors:               {counts(total.errors)}")
    print(f"left out (known):     {counts(avoided)}")
    print(f"frames/s:             {sent / total.seconds:,.0f} ({total.seconds:.1f} s, replies read as they came)")
    print(f"party alive:          {alive}, answered a hello after: {answered}, exit status on SIGTERM: {code}")
    print(f"party RSS:            before {before / MiB:.1f} MiB, highest {max(samples) / MiB:.1f} MiB, after "
          f"{after / MiB:.1f} MiB (grew {(after - before) / MiB:+.1f} MiB)")
    print(f"  every {chunk:,} frames: {spread(samples)}")
    print(f"audit log:            intact {checked.intact}{' (' + checked.problem + ')' if checked.problem else ''}, "
          f"{len(checked.entries):,} lines; requests refused {refused:,} + abandoned at the stop {waited:,} = "
          f"{refused + waited:,}")
    print(f"tracebacks logged:    {log_text.count('Traceback')} in party.log, "
          f"{sum('Traceback' in line for line in party.lines)} on stderr")


# -- a coordinator --------------------------------------------------------------------------------

class Counted(logging.Handler):
    """fednb's log records counted by level (those with a traceback by message), not printed."""

    def __init__(self) -> None:
        super().__init__()
        self.levels: Counter[str] = Counter()
        self.exceptions: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        if record.exc_info:
            self.exceptions[f"{record.getMessage()[:60]}: {record.exc_info[1]!r}"[:160]] += 1


def bench_coordinator(frames: int, seed: int, timeout: float) -> None:
    import fednb
    from fednb.errors import PartyError
    from tests.fuzzing import FakeParty, rss

    logger = logging.getLogger("fednb")
    counted = Counted()
    logger.addHandler(counted)
    logger.propagate = False  # 20,000 warnings counted, not printed
    source = "import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    model = namespace["model"]
    calls: Counter[str] = Counter()
    fake_outcomes: Counter[str] = Counter()
    kept, slowest = 0, 0.0
    with tempfile.TemporaryDirectory(prefix="fednb-fuzz-") as name:
        os.chmod(name, 0o700)
        real = start_party(Path(name), "real", "--listen", f"ipc://{name}/real.sock", "--policy", "open")
        try:
            with FakeParty(f"ipc://{name}/fake.sock", seed=seed, burst=20) as fake, \
                    fednb.connect([{"name": "real", "endpoint": real.endpoint},
                                   {"name": "fake", "endpoint": fake.endpoint}], timeout=30) as fed:
                # torch's and the allocator's first growth is not a leak
                fed.train(model, source, rounds=1, min_parties=1, round_timeout=60, evaluate_every=0)
                fed.evaluate(model, source, timeout=timeout)
                for _ in range(50):
                    fed.run("1", timeout=timeout)
                warm = Counter(fake.sent)
                before = rss()
                samples = [before]
                started = time.monotonic()
                while sum((fake.sent - warm).values()) < frames:
                    index = sum(calls.values())
                    begun = time.monotonic()
                    if index % 50 == 49:
                        history = fed.train(model, source, rounds=1, min_parties=1, round_timeout=60,
                                            evaluate_every=0)
                        kind, ok = "train round", "real" in history[-1].parties
                        outcome = "counted in a round" if "fake" in history[-1].parties else "dropped from a round"
                    elif index % 10 == 9:
                        evaluation = fed.evaluate(model, source, timeout=timeout)
                        kind, ok = "evaluate", "real" in evaluation.parties
                        outcome = "evaluation kept" if "fake" in evaluation.parties else "dropped from an evaluation"
                    else:
                        results = fed.run("1", timeout=timeout)
                        kind, ok, theirs = "run", results["real"] == 1, results["fake"]
                        named = (theirs.error_type or "(no type)")[:24] if isinstance(theirs, PartyError) else ""
                        outcome = f"PartyError {named}" if named else "a value"
                    calls[kind] += 1
                    kept += ok
                    fake_outcomes[outcome] += 1
                    if kind != "train round":
                        slowest = max(slowest, time.monotonic() - begun)
                    if index % 10 == 0:
                        fed.status()
                    if index % 100 == 99:
                        samples.append(rss())
                seconds = time.monotonic() - started
                after = rss()
                alive = fed._connections._thread.is_alive()
                sent = fake.sent - warm
                avoided = fake.avoided
        finally:
            real.stop()  # a `fednb party` process: this process's RSS is the coordinator's alone
            logger.removeHandler(counted)
            logger.propagate = True

    total = sum(sent.values())
    made = sum(calls.values())
    print(f"\n== a coordinator with a real party and a fake one answering each request with 20 hostile messages: "
          f"{total:,} frames (after a round, an evaluation and 50 runs to warm up), seed {seed}\n")
    print(table([(name, f"{count:,}", f"{count / total:.1%}") for name, count in sorted(sent.items())]
                + [("total", f"{total:,}", "100%")], ("generator", "frames", "share")))
    print(f"\ncalls:                {counts(calls)}")
    print(f"real party kept:      {kept:,} of {made:,} calls")
    print(f"the fake's share:     {counts(fake_outcomes)}")
    print(f"left out (known):     {counts(avoided)}")
    print(f"slowest run/evaluate: {slowest:.2f} s (timeout {timeout:g} s)")
    print(f"frames/s:             {total / seconds:,.0f} ({seconds:.1f} s)")
    print(f"socket thread alive:  {alive}")
    print(f"coordinator RSS:      before {before / MiB:.1f} MiB, highest {max(samples) / MiB:.1f} MiB, after "
          f"{after / MiB:.1f} MiB (grew {(after - before) / MiB:+.1f} MiB)")
    print(f"  every 100 calls: {spread(samples)}")
    print(f"log records:          {counts(counted.levels)}; with a traceback: {counts(counted.exceptions)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--party-frames", type=int, default=100_000, help="frames at the party (default 100,000)")
    parser.add_argument("--coordinator-frames", type=int, default=20_000,
                        help="hostile frames the fake party sends the coordinator (default 20,000)")
    parser.add_argument("--transport", choices=["ipc", "curve"], default="ipc",
                        help="the party's: ipc, or tcp + CURVE with an authorized key (default ipc)")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds each coordinator call waits (default 1)")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    print(json.dumps({"python": sys.version.split()[0], "cpus": os.cpu_count(), "argv": sys.argv[1:]}))
    if args.party_frames:
        bench_party(args.party_frames, args.seed, args.transport)
    if args.coordinator_frames:
        bench_coordinator(args.coordinator_frames, args.seed, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
