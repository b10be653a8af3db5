"""Per-round overhead of fednb against a raw pyzmq anchor, measured in the same run.

What is measured
----------------
For each party count N and model size P (float32 parameters), the *median wall time of one
round* of two systems that move the same bytes between the same number of processes:

raw pyzmq (the anchor)
    N echo worker processes, each binding a ROUTER; the coordinator holds one DEALER per
    worker. One round = send the model's tensors (one frame per 1000×1000 tensor, as fednb
    sends them, zero-copy) to every worker, then wait (poller) until all N echoes are back.
    Nothing is decoded, checked, copied into a model or averaged: the sockets alone.

fednb
    ``fednb.simulate(N, dataset="synthetic", partition="iid")`` and ``Federation.train``
    with ``train_cell="pass"``: each party loads the global weights into its model, trains
    nothing (workload ``noop``; ``evaluated`` also evaluates the incoming model on the
    party's test split, as ``train()`` does by default) and sends them back; the coordinator checks every reply, averages them (FedAvg)
    and loads the result into the model. The time is ``RoundRecord.seconds``, cross-checked
    against ``time.perf_counter`` around ``train(rounds=1)`` from the outside. By default
    the parties run the cell in their own process, as a simulation does; ``--contained``
    runs it in worker processes behind the egress guard, as ``fednb party`` does (two more
    copies of every tensor per request, through a sealed memfd).

Both run over ``ipc://`` sockets in a private 0700 directory without CURVE, and over
loopback ``tcp://`` with CURVE (a ZAP handler that admits only the coordinator's key).

How the comparison is kept fair
-------------------------------
- One coordinator process per (N, transport) holds both systems at once: the N raw echo
  workers and fednb's N party processes. Rounds strictly alternate within one
  ``train(rounds=…)`` call: an event subscriber runs one raw round after each fednb round
  (after fednb took the round's time, before the next one starts). Drift of the machine
  (other load, page cache, CPU clocks) thus hits both columns alike, and fednb is measured
  as a notebook uses it: one call, many rounds. The idle side's processes sleep in poll.
- Active process counts match: N party processes plus the coordinator. fednb also has its
  simulation host process, which forked the parties and then only waits on its lifeline
  pipe (no CPU during rounds).
- The first rounds of every cell are discarded as warm-up (connections, CURVE handshakes,
  building the model at the parties, first-touch page faults); that takes 3–4 rounds for
  fednb on a 2-core machine, hence the default of 3. The raw anchor settles more slowly:
  on this VM its first 10–15 exchanges of a new message size take 2–8× its steady time
  (fresh guest pages for ZeroMQ's buffers), so before each block it runs
  ``RAW_WARMUP_ROUNDS`` rounds of its own that count for nothing. Without them the anchor
  is measured while still warming and fednb looks faster than raw sockets.
- Both systems' rounds are shown with their interquartile range, and the *paired* ratio is
  the median over rounds of fednb's round over the raw round that followed it: drift that
  lasts a round or two hits both halves of a pair.
- Coordinator peak RSS is taken per system and size by resetting the kernel's high-water
  mark (``/proc/self/clear_refs``) before each block; it includes the process baseline
  (python, torch, both systems' sockets), printed alongside.

How to read it
--------------
``ratio = fednb / raw``; 1.0 would mean fednb adds nothing to the transfer. The targets at 10
parties × 1M over ipc: a ``noop`` round ≤ 1.2×, an ``evaluated`` round (train()'s default
evaluation of the incoming model rides on the train request) ≤ 1.4×. On a 2-core machine the parties and the
coordinator share the cores, so any per-byte work (a copy, a finiteness check, an extra
thread spinning) shows up in the round time, wherever it runs. The second table splits
fednb's round: the parties' own time per request (``PartyRound.seconds``: load the weights,
run the cell, check and return them) against the whole round.

Usage::

    .venv/bin/python bench/round_overhead.py              # 1, 10, 50 parties × 1M, 10M; ipc and tcp+CURVE
    .venv/bin/python bench/round_overhead.py --quick      # 1, 10 parties × 1M, few rounds (smoke run)
    .venv/bin/python bench/round_overhead.py --parties 10 --sizes 1M --no-tcp --rounds 20 --json out.json
    .venv/bin/python bench/round_overhead.py --contained  # party code in worker processes, as real parties
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raw_anchor import RawAnchor, raw_frames
from round_overhead_report import WORKLOADS, build_rows, print_report, size_label, transport_label

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fednb import Federation

SCRIPT = Path(__file__).resolve()
LAYER_WIDTH = 1000
PARAMS_PER_LAYER = LAYER_WIDTH * LAYER_WIDTH  # one nn.Linear(1000, 1000, bias=False): 4 MB of float32
MiB = 1024 * 1024

# Cells that move more than this per round (each way, all parties together) get fewer
# rounds, so that the default run stays within minutes: 50 × 10M is 2 GB each way.
HEAVY_BYTES = 256 * MiB
HUGE_BYTES = 1024 * MiB

CELL_TIMEOUT_S = 1500.0  # one coordinator process: one transport × N, all sizes
ROUND_TIMEOUT_S = 300.0
RAW_WARMUP_ROUNDS = 20  # raw rounds before each block, until the anchor is steady (see above)


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Rounds of one cell: warm-up (discarded), measured, and timed from the outside."""

    warmup: int
    measured: int
    outside: int  # extra fednb train(rounds=1) calls timed from the outside


def parse_size(text: str) -> int:
    """``"1M"`` → 1_000_000; sizes are whole multiples of one 1000×1000 layer."""
    raw = text.strip().upper()
    try:
        params = int(float(raw[:-1]) * 1_000_000) if raw.endswith("M") else int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number like 1M or 10M") from None
    if params <= 0 or params % PARAMS_PER_LAYER:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 1M parameters")
    return params


def plan_for(parties: int, params: int, rounds: int, quick: bool) -> Plan:
    """Fewer rounds where one round moves gigabytes; a median of 3+ is still a median."""
    if quick:
        return Plan(warmup=2, measured=rounds, outside=1)
    moved = parties * params * 4
    if moved > HUGE_BYTES:
        return Plan(warmup=1, measured=max(3, rounds // 3), outside=1)
    if moved > HEAVY_BYTES:
        return Plan(warmup=2, measured=max(4, rounds // 2), outside=1)
    return Plan(warmup=3, measured=rounds, outside=3)


#: What each party does in a measured round.
#: ``noop``: ``train_cell="pass"``, no evaluation: the round's plumbing alone.
#: ``evaluated``: ``train_cell="pass"`` with ``train()``'s default ``evaluate_every=1``: the
#: round also evaluates the incoming global model on each party's test split (a forward pass
#: over its 20 % of the data), which rides on the train request.
TARGETS = {"noop": 1.2, "evaluated": 1.4}
SYNTHETIC_FEATURES, SYNTHETIC_CLASSES = 20, 4


def model_source(params: int, workload: str = "noop") -> str:
    """Code that builds a bias-free MLP of ``params`` float32 parameters, one 4 MB tensor per 1M.

    The ``evaluated`` workload needs a model that takes the data: the same 1000×1000 layers
    between a 20 → 1000 input layer and a 1000 → 4 output layer (24k more parameters).
    """
    layers = params // PARAMS_PER_LAYER
    if workload == "noop":
        return ("import torch.nn as nn\n"
                f"model = nn.Sequential(*[nn.Linear({LAYER_WIDTH}, {LAYER_WIDTH}, bias=False) for _ in range({layers})])\n")
    return ("import torch.nn as nn\n"
            f"hidden = [m for _ in range({layers}) for m in (nn.Linear({LAYER_WIDTH}, {LAYER_WIDTH}, bias=False), nn.ReLU())]\n"
            f"model = nn.Sequential(nn.Linear({SYNTHETIC_FEATURES}, {LAYER_WIDTH}, bias=False), nn.ReLU(), *hidden,\n"
            f"                      nn.Linear({LAYER_WIDTH}, {SYNTHETIC_CLASSES}, bias=False))\n")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- coordinator memory -------------------------------------------------------------------


class PeakMemory:
    """Peak RSS of this process over a stretch of code.

    Linux (≥ 4.0) resets the high-water mark on ``echo 5 > /proc/self/clear_refs``, so each
    system's blocks get their own peak; elsewhere it falls back to the process's lifetime
    peak (``ru_maxrss``), which only grows.
    """

    def __init__(self) -> None:
        self.resettable = self.reset()

    def reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def peak_mib(self) -> float:
        if self.resettable:
            with open("/proc/self/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MiB if sys.platform == "darwin" else peak / 1024

    @staticmethod
    def current_mib() -> float | None:
        try:
            with open("/proc/self/statm", encoding="ascii") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
        except (OSError, ValueError):
            return None


# -- fednb ----------------------------------------------------------------------------------


@dataclass
class FednbSide:
    """A simulated federation of N parties and the model it trains."""

    parties: int
    tcp: bool
    contained: bool = False
    federation: Federation | None = None
    simulate_s: float = 0.0
    ready_s: float = 0.0

    def start(self) -> None:
        import fednb

        started = time.perf_counter()
        # 50 parties × iid over synthetic's 3000 examples: 60 each (48 train), above min_size 10
        self.federation = fednb.simulate(self.parties, dataset="synthetic", partition="iid", seed=0,
                                         transport="tcp" if self.tcp else "ipc", contained=self.contained)
        self.simulate_s = time.perf_counter() - started
        self.ready_s = float(self.federation.simulation.ready_seconds)  # type: ignore[attr-defined]

    def rounds(self, model: torch.nn.Module, source: str, count: int, workload: str = "noop") -> list[Any]:
        """Train ``count`` no-op rounds; their RoundRecords (a drop is an error here)."""
        assert self.federation is not None
        history = self.federation.history
        before = len(history)
        self.federation.train(model, source, rounds=count, train_cell="pass",
                              evaluate_every=1 if workload == "evaluated" else 0,
                              min_parties=self.parties, round_timeout=ROUND_TIMEOUT_S)
        records = history.rounds[before:]
        dropped = {party: reason for record in records for party, reason in record.dropped.items()}
        if dropped or len(records) != count:
            raise RuntimeError(f"a no-op round lost parties: {dropped}")
        return records

    def outside(self, model: torch.nn.Module, source: str, count: int,
                workload: str = "noop") -> tuple[list[float], list[float]]:
        """``train(rounds=1)`` timed around the call, and what its RoundRecord says."""
        outside, recorded = [], []
        for _ in range(count):
            started = time.perf_counter()
            (record,) = self.rounds(model, source, 1, workload)
            outside.append(time.perf_counter() - started)
            recorded.append(record.seconds)
        return outside, recorded

    def close(self) -> None:
        if self.federation is not None:
            self.federation.close()  # stops the host, which stops its parties by PID


def build_model(params: int, workload: str = "noop") -> tuple[torch.nn.Module, str]:
    source = model_source(params, workload)
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - our own model code
    return namespace["model"], source


# -- one cell: one transport × N, all sizes, both systems in this process ---------------------


@dataclass
class SystemSamples:
    rounds_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    # fednb only
    outside_s: list[float] = field(default_factory=list)
    record_of_outside_s: list[float] = field(default_factory=list)
    party_mean_s: list[float] = field(default_factory=list)
    party_max_s: list[float] = field(default_factory=list)


class RawBetweenRounds:
    """An event subscriber that runs one raw round after each fednb round.

    fednb publishes ``RoundAggregated`` on the training thread after it has taken the round's
    time and before the next round starts, so the raw round runs while fednb is idle and is
    not counted in fednb's ``RoundRecord.seconds``. The two systems thus strictly alternate
    within one ``train()`` call, which is how a notebook trains (one call, many rounds).
    """

    def __init__(self, raw: RawAnchor, frames: list[np.ndarray], memory: PeakMemory) -> None:
        self.raw, self.frames, self.memory = raw, frames, memory
        self.times: list[float] = []
        self.raw_peaks: list[float] = []
        self.fednb_peaks: list[float] = []
        self.error: BaseException | None = None
        self.stop: Any = None  # Federation.stop, set by the caller

    def __call__(self, event: object) -> None:
        from fednb.federation.events import RoundAggregated

        if not isinstance(event, RoundAggregated) or self.error is not None:
            return
        self.fednb_peaks.append(self.memory.peak_mib())  # since the reset after the last raw round
        try:
            self.memory.reset()
            self.times.extend(self.raw.rounds(self.frames, 1))
            self.raw_peaks.append(self.memory.peak_mib())
        except BaseException as exc:  # the bus would only log it: keep it, end training, re-raise
            self.error = exc
            self.stop()
        finally:
            self.memory.reset()


def measure_size(raw: RawAnchor, fed: FednbSide, params: int, plan: Plan, memory: PeakMemory,
                 workload: str = "noop") -> dict[str, Any]:
    assert fed.federation is not None
    model, source = build_model(params, workload)
    frames = raw_frames(model)
    between = RawBetweenRounds(raw, frames, memory)
    between.stop = fed.federation.stop
    raw.rounds(frames, RAW_WARMUP_ROUNDS)
    unsubscribe = fed.federation.subscribe(between)
    memory.reset()
    try:
        records = fed.rounds(model, source, plan.warmup + plan.measured, workload)
    except Exception:
        if between.error is not None:
            raise between.error from None
        raise
    finally:
        unsubscribe()
    samples = {"raw": SystemSamples(), "fednb": SystemSamples()}
    samples["raw"].warmup_s, samples["raw"].rounds_s = between.times[:plan.warmup], between.times[plan.warmup:]
    samples["raw"].peak_rss_mib = max(between.raw_peaks[plan.warmup:], default=0.0)
    fednb = samples["fednb"]
    fednb.warmup_s = [record.seconds for record in records[:plan.warmup]]
    fednb.peak_rss_mib = max(between.fednb_peaks[plan.warmup:], default=0.0)
    for record in records[plan.warmup:]:
        fednb.rounds_s.append(record.seconds)
        seconds = [party.seconds for party in record.parties.values()]
        fednb.party_mean_s.append(statistics.mean(seconds))
        fednb.party_max_s.append(max(seconds))
    fednb.outside_s, fednb.record_of_outside_s = fed.outside(model, source, plan.outside, workload)
    return {"plan": asdict(plan), **{system: asdict(s) for system, s in samples.items()}}


def cell_main(spec: dict[str, Any]) -> int:
    """One coordinator process: both systems for one transport × N, sizes ascending."""
    import torch  # noqa: F401 - imported before anything is timed, as a notebook has it

    parties, tcp = int(spec["parties"]), bool(spec["tcp"])
    label = f"{parties} parties {transport_label(tcp)}"
    memory = PeakMemory()
    raw, fed = RawAnchor(parties, tcp), FednbSide(parties, tcp, bool(spec.get("contained")))
    result: dict[str, Any] = {"parties": parties, "transport": transport_label(tcp), "sizes": {}}
    try:
        raw.start()
        fed.start()
        result.update(raw_ready_s=raw.ready_s, fednb_ready_s=fed.ready_s, fednb_simulate_s=fed.simulate_s,
                      baseline_rss_mib=PeakMemory.current_mib(), peak_rss_resettable=memory.resettable)
        for params in sorted(int(p) for p in spec["sizes"]):
            plan = Plan(**spec["plans"][str(params)])
            for workload in spec["workloads"]:
                progress(f"           {label} × {size_label(params)} {workload}: {plan.warmup} warm-up + "
                         f"{plan.measured} rounds each")
                result["sizes"][f"{params}:{workload}"] = measure_size(raw, fed, params, plan, memory, workload)
    finally:
        fed.close()
        raw.close()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# -- the orchestrating process (no zmq context, no torch: it only starts cells) --------------


def run_cell(parties: int, tcp: bool, sizes: list[int], plans: dict[int, Plan], contained: bool = False,
             workloads: Sequence[str] = WORKLOADS) -> dict[str, Any]:
    spec = {"parties": parties, "tcp": tcp, "sizes": sizes, "plans": {str(p): asdict(plans[p]) for p in sizes},
            "contained": contained, "workloads": list(workloads)}
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--_cell", json.dumps(spec)], stdout=subprocess.PIPE)
    try:
        out, _ = process.communicate(timeout=CELL_TIMEOUT_S)
    finally:
        if process.poll() is None:  # timed out or interrupted: its workers and parties follow their lifelines
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the {transport_label(tcp)} cell with {parties} parties failed "
                           f"(exit status {process.returncode}); see its output above")
    return json.loads(out.decode().strip().splitlines()[-1])


def run(parties: list[int], sizes: list[int], rounds: int, transports: list[bool], quick: bool,
        json_path: str | None, contained: bool = False, workloads: Sequence[str] = WORKLOADS) -> int:
    started = time.perf_counter()
    cells = []
    for n in parties:
        plans = {params: plan_for(n, params, rounds, quick) for params in sizes}
        for tcp in transports:
            progress(f"[{time.perf_counter() - started:6.1f} s] {n} parties over {transport_label(tcp)}: "
                     "raw anchor and fednb in one coordinator process")
            cells.append(run_cell(n, tcp, sizes, plans, contained, workloads))
    total = time.perf_counter() - started
    rows = build_rows(cells, sizes)
    print(f"fednb round overhead vs raw pyzmq ({platform.node()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}); party code run "
          + ("in worker processes (simulate(contained=True), as real parties do)" if contained
             else "in the party process (simulate()'s default)"))
    print_report(rows, cells, transports)
    for workload, limit in TARGETS.items():
        target = next((r for r in rows if r["parties"] == 10 and r["params"] == 1_000_000 and r["workload"] == workload),
                      None)
        if target is not None and target.get("ratio_ipc") is not None:
            verdict = "met" if target["ratio_ipc"] <= limit else "NOT met"
            print(f"target: a {workload} round at 10 parties × 1M over ipc ≤ {limit}× raw: "
                  f"{target['ratio_ipc']:.2f}× ({verdict})")
    print(f"total runtime {total:.1f} s")
    if json_path:
        document = {"machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
                    "config": {"parties": parties, "sizes": sizes, "rounds": rounds, "quick": quick, "contained": contained,
                               "transports": [transport_label(t) for t in transports]},
                    "rows": rows, "cells": cells, "total_seconds": total}
        Path(json_path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     epilog="See the module docstring for what is measured and how to read it.")
    parser.add_argument("--quick", action="store_true", help="1 and 10 parties × 1M, few rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per cell (default 10; quick 4)")
    parser.add_argument("--parties", default=None, help="comma-separated party counts (default 1,10,50)")
    parser.add_argument("--sizes", default=None, help="comma-separated model sizes (default 1M,10M)")
    parser.add_argument("--no-tcp", action="store_true", help="skip the tcp + CURVE columns")
    parser.add_argument("--contained", action="store_true",
                        help="parties run coordinator code in worker processes, as `fednb party` does")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads (default {','.join(WORKLOADS)}; see WORKLOADS)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--_cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._cell is not None:
        return cell_main(json.loads(args._cell))

    try:
        parties = [int(p) for p in (args.parties or ("1,10" if args.quick else "1,10,50")).split(",")]
        sizes = sorted({parse_size(s) for s in (args.sizes or ("1M" if args.quick else "1M,10M")).split(",")})
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    rounds = args.rounds if args.rounds is not None else (4 if args.quick else 10)
    if rounds < 1 or any(not 1 <= n <= 512 for n in parties):
        parser.error("--rounds must be positive and --parties between 1 and 512")
    transports = [False] if args.no_tcp else [False, True]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        parser.error(f"--workloads takes {', '.join(WORKLOADS)}")
    return run(parties, sizes, rounds, transports, args.quick, args.json, args.contained, workloads)


if __name__ == "__main__":
    sys.exit(main())
