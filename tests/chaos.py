"""Chaos over many rounds: a seeded fault thread against `fednb party` processes and a checkpointing coordinator.

Shared by ``tests/test_chaos.py`` (the short run of ``make test``) and ``bench/chaos.py`` (100 rounds).

Eight ``fednb party`` processes (digits split eight ways, the tiny MLP of tests/conftest.py) listen on
ipc sockets in a private 0700 directory, without CURVE (as tests/test_party_hardening.py's cli parties
do). A coordinator subprocess (``python -m tests.chaos SPEC``) trains ``rounds`` rounds with
``checkpoint=``, ``min_parties`` and a short ``round_timeout``; on :class:`~fednb.errors.RoundError` it
calls ``train`` again with the same checkpoint, which continues the run. It prints one JSON line per
event (connected, train called, round done with its RSS and the late counters, round aborted and why,
done). Meanwhile a seeded fault thread here SIGKILLs parties and restarts them after a delay, SIGSTOPs
parties and SIGCONTs them after longer than the round timeout, once stops enough parties at once that a
round must abort (an *outage*, continued when the coordinator reports that abort), and SIGKILLs the coordinator exactly twice, each time restarting it
from its checkpoint.

What the parties train tells us what they trained on: the training cell reports the round it was
sent (the party seeds torch with ``seed + round``), and a fixed random projection of the weights it
received (``w0``) and of those it sends back (``w1``). Projection is linear, so FedAvg's result
projects to the example-weighted mean of the contributions' ``w1``: the next round's ``w0`` checks that
each update was counted exactly once, and none from a dropped party, an earlier round or an earlier
request was taken. :func:`summarize` checks that and the rest (see :data:`CHECKS`) and lists what failed.

The parts, each importable from here as before: the processes and what /proc says of them
(tests/chaos_processes.py), the coordinator process and its training cell (tests/chaos_coordinator.py),
the plan and what the harness saw (tests/chaos_plan.py), the checks and the summary (tests/chaos_checks.py);
:class:`Chaos`, the run with its fault thread, is here.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tests.chaos_checks import CHECKS, TOLERANCE, reason_kind, summarize  # noqa: F401 - as before
from tests.chaos_coordinator import CELL, PROJECT, coordinate, emit, project, rss_kb  # noqa: F401 - as before
from tests.chaos_plan import Plan, State
from tests.chaos_processes import MARK, ROOT, Process, alive, descendants, marked


class Chaos:
    """One run of a :class:`Plan`; :meth:`run` returns the summary (its ``problems`` empty when all held)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, MARK: self.token, "PYTHONPATH": str(ROOT)}
        self.state = State()
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.parties: dict[str, Process] = {}
        self.health: dict[str, str] = {}  # party -> up | starting | killed | stopped
        self.coordinators: list[Process] = []
        self.directory = Path()
        self.examples: dict[str, int] = {}
        self.before: set[int] = set()

    # -- set-up ----------------------------------------------------------------------------------------

    def _party_args(self, name: str) -> list[str]:
        d = self.directory
        return [sys.executable, "-m", "fednb.cli", "party", "--name", name, "--listen", f"ipc://{d}/{name}.sock",
                "--data", f"train={d}/{name}.npz", "--data", f"test={d}/{name}-test.npz", "--policy", "open",
                "--dir", str(d / name), "--threads", "1"]

    def _start_party(self, name: str) -> None:
        starts = sum(1 for _, action, party in self.state.returns if party == name and action == "restart")
        process = Process(self._party_args(name), self.directory / f"{name}-{starts}.log", self.env)
        with self.lock:
            self.parties[name], self.health[name] = process, "up"
            self.state.pids.add(process.pid)

    def _start_coordinator(self, spec: str = "spec.json") -> Process:
        index = len(self.coordinators)
        process = Process([sys.executable, "-m", "tests.chaos", str(self.directory / spec)],
                          self.directory / f"coordinator-{index}.jsonl", self.env)
        with self.lock:
            self.coordinators.append(process)
            self.state.pids.add(process.pid)
        return process

    def _setup(self) -> None:
        from fednb.data import federated_split, load_dataset

        parts = federated_split(load_dataset("digits"), self.plan.parties, "iid", seed=self.plan.seed)
        names = [f"p{i}" for i in range(self.plan.parties)]
        for name, part in zip(names, parts):
            np.savez(self.directory / f"{name}.npz", x=part.x_train, y=part.y_train)
            np.savez(self.directory / f"{name}-test.npz", x=part.x_test, y=part.y_test)  # else it holds some out
            self.examples[name] = len(part.y_train)
        spec = {"parties": [{"name": n, "endpoint": f"ipc://{self.directory}/{n}.sock"} for n in names],
                "checkpoint": str(self.directory / "run.ckpt"), "rounds": self.plan.rounds,
                "min_parties": self.plan.min_parties, "round_timeout": self.plan.round_timeout,
                "connect_timeout": 5.0, "model_seed": self.plan.seed}
        (self.directory / "spec.json").write_text(json.dumps(spec))
        (self.directory / "warm-up.json").write_text(json.dumps({**spec, "warm_up": True}))
        for name in names:
            self._start_party(name)
        started = time.monotonic()
        deadline = started + 180
        for name, party in self.parties.items():
            while "listening on" not in party.log.read_text(errors="replace"):
                if party.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"party {name} did not start:\n{party.tail()}")
                time.sleep(0.1)
        self.state.timings["parties_started_s"] = round(time.monotonic() - started, 1)
        warm = Process([sys.executable, "-m", "tests.chaos", str(self.directory / "warm-up.json")],
                       self.directory / "warm-up.log", self.env)
        self.state.pids.add(warm.pid)
        try:
            code = warm.popen.wait(300)
        finally:
            warm.kill()
        if code != 0:
            raise RuntimeError(f"the warm-up round failed ({code}):\n{warm.tail()}")
        self.state.timings["warm_up_round_s"] = round(next(
            json.loads(line)["seconds"] for line in warm.log.read_text().splitlines()
            if line.startswith('{"event": "warm"')), 1)

    # -- the fault thread --------------------------------------------------------------------------------

    def _own_rounds(self) -> int:
        """Rounds the running coordinator has completed itself."""
        index = len(self.coordinators) - 1
        return sum(1 for e in self.state.events if e["process"] == index and e["event"] == "round")

    def _fault(self, kind: str, target: str) -> None:
        self.state.faults[kind] += 1
        self.state.fault_log.append((time.monotonic(), kind, target))

    def _kill_party(self, name: str) -> None:
        party = self.parties[name]
        self.state.pids |= descendants({party.pid})
        party.kill()
        self.health[name] = "killed"
        self._fault("party SIGKILL + restart", name)

    def _stop_party(self, name: str, kind: str | None = "party SIGSTOP + SIGCONT") -> None:
        self.parties[name].signal(signal.SIGSTOP)
        self.health[name] = "stopped"
        if kind is not None:
            self._fault(kind, name)

    def _kill_coordinator(self) -> None:
        coordinator = self.coordinators[-1]
        self.state.pids |= descendants({coordinator.pid})
        coordinator.kill()
        self._fault("coordinator SIGKILL + resume", f"coordinator-{len(self.coordinators) - 1}")

    def _faults(self) -> None:
        """Inject faults as the rounds go by (see the module docstring); every choice comes from the seeded RNG.

        Party faults come every 1-3 rounds (a kill, or a stop), never more than ``max_faulty`` at once;
        the coordinator is killed at two rounds of the run's first third, each time only once the
        coordinator then running has completed a round of its own; the outage comes in its middle."""
        plan, rng = self.plan, self.rng
        n = plan.rounds
        first = rng.randint(max(2, n // 10), max(3, n // 5))
        kills = [first, rng.randint(first + 2, max(first + 3, n // 3))][: plan.coordinator_kills]
        outage = rng.randint(int(0.45 * n), int(0.6 * n)) if plan.outage else None
        due: list[tuple[float, int, str, str]] = []  # (when, order, action, party)
        next_fault, order = 1 + rng.randint(*plan.party_every), 0
        held: list[tuple[int, str, str]] = []  # what waits for the outage to end
        outage_since: float | None = None
        while not self.stop.wait(0.02):
            now = time.monotonic()
            with self.lock:
                while due and due[0][0] <= now:
                    _, _, action, name = heapq.heappop(due)
                    if action == "restart":
                        self.state.returns.append((now, action, name))
                        self._start_party(name)
                        self.health[name] = "starting"
                    elif action == "continue":
                        self.parties[name].signal(signal.SIGCONT)
                        self.health[name] = "starting"  # up once it has said it listens (it may have been starting)
                        self.state.returns.append((now, action, name))
                    elif action == "kill coordinator":
                        if self.coordinators[-1].popen.poll() is None:
                            self._kill_coordinator()
                            heapq.heappush(due, (now + rng.uniform(0.2, 1.0), order, "start coordinator", ""))
                    else:
                        self._start_coordinator()
                for name, health in self.health.items():
                    if health == "starting" and "listening on" in self.parties[name].log.read_text(errors="replace"):
                        self.health[name] = "up"
                progress = self.state.progress
                if (progress < 1 or progress >= n) and outage_since is None:
                    continue  # the first round warms every party's worker up; after the last, nothing is left to hit
                up = [name for name, health in self.health.items() if health == "up"]
                coordinating = self.coordinators[-1].popen.poll() is None and self._own_rounds() >= 1 and not any(
                    action.endswith("coordinator") for _, _, action, _ in due)
                if kills and progress >= kills[0] and coordinating and outage_since is None:
                    kills.pop(0)  # sometimes between rounds, mostly inside one
                    heapq.heappush(due, (now + rng.uniform(0.0, 0.4), order, "kill coordinator", ""))
                elif outage is not None and progress >= outage and coordinating and len(up) >= plan.min_parties:
                    # All but min_parties - 1 parties silent at once, so a round must abort: stopped until the
                    # coordinator reports that abort (a round in flight may still complete; the next cannot),
                    # and parties down from earlier faults stay down as long.
                    silenced = sorted(set(self.health) - set(rng.sample(up, plan.min_parties - 1)))
                    held = [(o, action, name) for _, o, action, name in due if action in ("restart", "continue")]
                    due = [d for d in due if d[2] not in ("restart", "continue")]
                    heapq.heapify(due)
                    for name in silenced:
                        if self.health[name] in ("up", "starting"):
                            self._stop_party(name, None)
                            held.append((order, "continue", name))
                            order += 1
                    self._fault("outage: all but min_parties - 1 parties silent", ",".join(silenced))
                    outage, outage_since = None, now
                elif outage_since is not None:
                    aborted = any(e["event"] == "aborted" and e["t"] > outage_since for e in self.state.events)
                    if aborted or now > outage_since + 3 * plan.round_timeout + 2:
                        for o, action, name in held:  # as they were queued, now
                            heapq.heappush(due, (now, o, action, name))
                        held, outage_since = [], None
                elif progress >= next_fault:
                    kind, pick, delay = rng.random(), rng.random(), rng.random()
                    next_fault = progress + rng.randint(*plan.party_every)
                    if up and len(up) > plan.parties - plan.max_faulty:
                        name = up[int(pick * len(up))]
                        if kind < 0.5:
                            self._kill_party(name)
                            lo, hi = plan.restart_after
                            heapq.heappush(due, (now + lo + delay * (hi - lo), order, "restart", name))
                        else:
                            self._stop_party(name)
                            lo, hi = plan.stop_extra
                            heapq.heappush(due, (now + plan.round_timeout + lo + delay * (hi - lo), order,
                                                 "continue", name))
                order += 1

    # -- the run ---------------------------------------------------------------------------------------

    def _read_events(self, offsets: dict[int, int]) -> None:
        for index, coordinator in enumerate(list(self.coordinators)):
            data = coordinator.log.read_bytes()
            end = data.rfind(b"\n") + 1  # a line cut by SIGKILL is never half-read
            for line in data[offsets.get(index, 0):end].splitlines():
                if line.startswith(b'{"event"'):
                    event = {**json.loads(line), "process": index}
                    with self.lock:
                        self.state.events.append(event)
                        if event["event"] == "round":
                            self.state.progress = max(self.state.progress, event["round"])
            offsets[index] = end

    def _watch(self, deadline: float) -> None:
        offsets: dict[int, int] = {}
        progress, moved = 0, time.monotonic()
        while True:
            time.sleep(0.1)
            self._read_events(offsets)
            if self.state.progress > progress:
                progress, moved = self.state.progress, time.monotonic()
            elif time.monotonic() - moved > self.plan.stall:
                aborts = [e for e in self.state.events if e["event"] == "aborted"]
                self.state.problems.append(
                    f"no round completed for {self.plan.stall:.0f} s: stuck after round {progress} ({len(aborts)} "
                    "aborts in all; the last: " + (aborts[-1]["message"] if aborts else "none") + ")")
                return
            with self.lock:
                index, coordinator = len(self.coordinators) - 1, self.coordinators[-1]
                killed = sum(1 for _, kind, _ in self.state.fault_log if kind.startswith("coordinator"))
            code = coordinator.popen.poll()
            if code == 0:
                self._read_events(offsets)
                return
            if code is not None and killed <= index:  # not one we killed
                self.state.problems.append(f"coordinator-{index} failed with {code}:\n{coordinator.tail()}")
                return
            if time.monotonic() > deadline:
                self.state.problems.append(f"the run did not finish within {self.plan.deadline:.0f} s "
                                           f"(round {self.state.progress} of {self.plan.rounds})")
                return

    def _teardown(self) -> None:
        """Stop everything by PID, then check that nothing the harness started (or its children) is left."""
        with self.lock:
            processes = [*self.coordinators, *self.parties.values()]
            self.state.pids |= descendants({p.pid for p in processes})
        for process in processes:  # all at once: each may take seconds to stop on a busy machine
            process.signal(signal.SIGCONT)
            process.signal(signal.SIGTERM)
        for process in processes:
            process.stop()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and ([p for p in self.state.pids if alive(p)] or marked(self.token)):
            time.sleep(0.2)
        left = {p for p in self.state.pids if alive(p)} | marked(self.token)
        children = descendants({os.getpid()}) - self.before  # children of this (test) process, started since
        if left or children:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            self.state.problems.append(f"processes left behind: {sorted(left | children)}")

    def run(self) -> dict[str, Any]:
        """Run the plan; the summary of :func:`summarize`, with ``problems`` listing every check that failed."""
        started = time.monotonic()
        self.before = descendants({os.getpid()})
        with tempfile.TemporaryDirectory(prefix="fednb-chaos-") as directory:  # mkdtemp makes it 0700
            self.directory = Path(directory)
            thread = threading.Thread(target=self._faults, name="fednb-chaos-faults", daemon=True)
            try:
                self._setup()
                self._start_coordinator()
                thread.start()
                self._watch(started + self.plan.deadline)
            finally:
                self.stop.set()
                if thread.is_alive():
                    thread.join(30)
                self._teardown()
            from fednb.federation import checkpoint as ckpt

            path = self.directory / "run.ckpt"
            history = ckpt.load(path).history if path.exists() else []
            if self.plan.keep:
                shutil.copytree(self.directory, self.plan.keep, ignore=shutil.ignore_patterns("*.npz", "*.sock"),
                                dirs_exist_ok=True)
        summary = summarize(self.plan, self.state, history, self.examples, time.monotonic() - started)
        return summary


if __name__ == "__main__":
    sys.exit(coordinate(json.loads(Path(sys.argv[1]).read_text())))
