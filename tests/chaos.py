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
"""

from __future__ import annotations

import heapq
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARK = "FEDNB_CHAOS_RUN"  # in the environment of every process the harness starts, and so of their children

#: A fixed random projection of a model's state, in float64; the same text runs at the parties.
PROJECT = """
def project(model):
    import numpy as np
    flat = np.concatenate([v.detach().cpu().numpy().astype(np.float64).ravel() for v in model.state_dict().values()])
    return float(flat @ np.random.default_rng(20240607).standard_normal(flat.size))
"""
#: The parties' training cell: plain SGD, reporting the round it was sent and what it received and sent.
CELL = PROJECT + """
import torch
w0 = project(model)
sent_for = torch.initial_seed() - config['seed']
opt = torch.optim.SGD(model.parameters(), lr=config['lr'])
for x, y in train:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
report(round=sent_for, w0=w0, w1=project(model), loss=loss)
"""
CHECKS = ("every round 1..N completed, once, in order", "each round had >= min_parties contributions",
          "no party both contributed to and was dropped from a round", "each contribution's example count is its party's",
          "each contribution was trained for its round, from that round's global weights",
          "each round's weights are the example-weighted mean of exactly its contributions",
          "late replies happened and none was taken", "every abort names who was missing, none is a refused retry",
          "the coordinator was killed twice and resumed each time", "every party back from a fault took part again",
          "the coordinator's RSS stayed flat", "no process left")


def project(model: Any) -> float:
    namespace: dict[str, Any] = {}
    exec(PROJECT, namespace)  # noqa: S102 - our own text, the one the parties run
    return float(namespace["project"](model))


@dataclass
class Plan:
    """One chaos run: its size, its seed, and how hard the fault thread hits."""

    rounds: int = 20
    seed: int = 0
    parties: int = 8
    min_parties: int = 4
    round_timeout: float = 3.0
    coordinator_kills: int = 2
    party_every: tuple[int, int] = (1, 3)  # rounds between party faults
    restart_after: tuple[float, float] = (0.5, 3.0)  # a killed party is started again after this long
    stop_extra: tuple[float, float] = (0.5, 2.5)  # a stopped party is continued round_timeout + this later
    max_faulty: int = 3  # parties killed, restarting or stopped at once (outside the outage)
    outage: bool = True
    # The coordinator's RSS may grow by design: its history (~3 kB a round) and the checkpoint, which rewrites
    # the whole history every round, so that its serialisation's high-water mark grows with it (18 kB a round
    # measured without faults, 8 simulated parties, 240 rounds). Allowed: this much a round, plus allocator steps.
    rss_per_round_kb: int = 30
    rss_margin_kb: int = 1024
    deadline: float = 600.0  # seconds for the whole run
    stall: float = 60.0  # seconds without a completed round that end the run as stuck
    keep: str | None = None  # copy the run's logs and events here at the end

    def __post_init__(self) -> None:
        if not 1 <= self.min_parties <= self.parties - self.max_faulty:
            raise ValueError("max_faulty parties down must leave min_parties")
        if self.rounds < 8:
            raise ValueError("a chaos run needs at least 8 rounds (two coordinator kills, an outage)")


# -- the coordinator process --------------------------------------------------------------------------------

def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def coordinate(spec: dict[str, Any]) -> int:
    """The coordinator: train to the last round, continuing from the checkpoint after every RoundError."""
    emit("start", pid=os.getpid())
    sys.path.insert(0, str(ROOT))
    import fednb
    from fednb.errors import RoundError
    from fednb.federation import checkpoint as ckpt
    from fednb.federation.events import RoundAggregated
    from tests.conftest import MLP, build

    path, min_parties = Path(spec["checkpoint"]), spec["min_parties"]
    if spec.get("warm_up"):
        # One round at every party with all the time it needs, before the faults start: a worker's first
        # request (a fresh process's first torch steps) is slower than the round timeout when eight start
        # at once, and a cancel at the deadline kills that worker, so without this round 1 never ends.
        with fednb.connect(spec["parties"], timeout=120) as fed:
            fed.train(build(seed=spec["model_seed"]), MLP, rounds=1, train_cell=CELL, evaluate_every=0,
                      min_parties=len(spec["parties"]), round_timeout=300)
        emit("warm", seconds=fed.history.rounds[-1].seconds)
        return 0
    with fednb.connect(spec["parties"], timeout=spec["connect_timeout"], require_all=False) as fed:
        emit("connected", online=fed._connections.online())

        def late() -> dict[str, int]:
            return {name: link["late"] for name, link in fed._connections.snapshot().items()}

        def on_event(event: object) -> None:
            if isinstance(event, RoundAggregated):
                record = fed.history.rounds[-1]  # appended (and checkpointed) before the event
                emit("round", round=event.round, rss_kb=rss_kb(), proj=project(model), late=late(),
                     parties=sorted(record.parties), dropped=record.dropped)

        model = build(seed=spec["model_seed"])
        fed.subscribe(on_event)
        while True:
            saved = ckpt.load(path) if path.exists() else None
            emit("train", next_round=saved.round + 1 if saved else 1, attempt=saved.attempt + 1 if saved else 0)
            try:
                fed.train(model, MLP, rounds=spec["rounds"], checkpoint=path, min_parties=min_parties,
                          round_timeout=spec["round_timeout"], train_cell=CELL, evaluate_every=0, lr=0.05,
                          batch_size=16, seed=7)
                break
            except RoundError as exc:
                emit("aborted", round=exc.round, message=str(exc), dropped=exc.dropped, late=late())
                time.sleep(0.5)
                deadline = time.monotonic() + 5.0  # give a moment for parties to come back, as a user would
                while len(fed._connections.online()) < min_parties and time.monotonic() < deadline:
                    time.sleep(0.1)
        emit("done", late=late(), rss_kb=rss_kb(), proj=project(model))
    return 0


# -- processes ----------------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    state = _stat(pid)
    return state is not None and state[0] not in "ZX"


def descendants(pids: set[int]) -> set[int]:
    """Every live process below ``pids``, however deep (a party's zygote and its workers)."""
    parents = {int(e): s[1] for e in os.listdir("/proc") if e.isdigit() and (s := _stat(int(e))) and s[0] != "Z"}
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def marked(token: str) -> set[int]:
    """Live processes whose environment carries this run's mark: ours and their children, wherever they went."""
    found = set()
    needle = f"{MARK}={token}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or not alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            continue
    return found


class Process:
    """One child process with its output in a file (no pipes to fill or leave open)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                          cwd=ROOT)
        self.pid = self.popen.pid
        self.started = time.monotonic()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGCONT, SIGTERM, then SIGKILL: by PID, and always reaped."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class State:
    """What the harness saw: faults, the coordinator's events, every PID it started."""

    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, str]] = field(default_factory=list)
    returns: list[tuple[float, str, str]] = field(default_factory=list)  # (when, restart | continue, party)
    events: list[dict[str, Any]] = field(default_factory=list)  # each with "process": the coordinator's index
    pids: set[int] = field(default_factory=set)
    progress: int = 0  # the last round a coordinator reported done
    timings: dict[str, float] = field(default_factory=dict)  # set-up: parties started, warm-up round
    problems: list[str] = field(default_factory=list)


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


# -- the checks and the summary -----------------------------------------------------------------------------

def reason_kind(reason: str) -> str:
    """A drop reason in a word or two, for the tables."""
    for needle, kind in (("does not move forward", "refused as a replay"), ("no reply within", "timeout"),
                         ("Cancelled", "cancelled"), ("unreachable", "unreachable"), ("connect", "offline"),
                         ("offline", "offline"), ("went ", "offline")):
        if needle in reason:
            return kind
    return reason[:60]


#: How far two projections of the same weights may differ: float32 rounding of ~2,400 values (seen: 2e-7).
TOLERANCE = 2e-6


def _aggregation(history: list[Any], final: float | None, initial: float, examples: dict[str, int],
                 problems: list[str]) -> dict[str, float]:
    """Each round's contributions against its global weights: trained for it, from it, counted once each."""
    worst, shifts = 0.0, []
    start: float | None = initial
    for index, record in enumerate(history):
        parties = record.parties
        for name, contribution in parties.items():
            metrics = contribution.metrics
            if contribution.examples != examples.get(name):
                problems.append(f"round {record.round}: {name} counted {contribution.examples} examples, "
                                f"not its {examples.get(name)}")
            if metrics.get("round") != record.round:
                problems.append(f"round {record.round}: {name}'s update was trained for round {metrics.get('round')}")
            if start is not None and not abs(metrics.get("w0", np.nan) - start) <= TOLERANCE:
                problems.append(f"round {record.round}: {name} trained from other weights than the round's "
                                f"({metrics.get('w0')} != {start})")
        n = np.array([parties[p].examples for p in parties], dtype=np.float64)
        w1 = np.array([parties[p].metrics.get("w1", np.nan) for p in parties])
        mean = float(n @ w1 / n.sum())
        after = history[index + 1] if index + 1 < len(history) else None
        result = (next(iter(after.parties.values())).metrics.get("w0") if after is not None and after.parties
                  else final)  # the next round's start, as its parties received it (or the coordinator's end)
        if result is not None:
            error = abs(result - mean)
            worst = max(worst, error)
            # the shift that one party counted twice would make: what the check must be able to see
            shifts.extend(n * np.abs(w1 - mean) / (n.sum() + n))
            if not error <= TOLERANCE:
                problems.append(f"round {record.round}: the global weights are not the example-weighted mean of "
                                f"its {len(parties)} contributions ({result} != {mean})")
        start = result
    seen = np.array(shifts) if shifts else np.zeros(1)
    return {"max_error": worst, "double_count_shift_min": float(seen.min()),
            "double_count_shift_median": float(np.median(seen)),
            "double_counts_visible": float(np.mean(seen > 2 * TOLERANCE))}


def summarize(plan: Plan, state: State, history: list[Any], examples: dict[str, int],
              seconds: float) -> dict[str, Any]:
    """The run's table and every check of :data:`CHECKS` that failed, as ``problems``."""
    problems = list(state.problems)
    events = state.events
    rounds = [r.round for r in history]
    if rounds != list(range(1, plan.rounds + 1)):
        problems.append(f"the checkpoint holds rounds {rounds}, not 1..{plan.rounds}")
    done = [e["round"] for e in events if e["event"] == "round"]
    if done != sorted(set(done)):
        problems.append(f"rounds were reported done out of order or twice: {done}")
    for record in history:
        if len(record.parties) < plan.min_parties:
            problems.append(f"round {record.round} completed with {len(record.parties)} < {plan.min_parties} parties")
        if set(record.parties) & set(record.dropped):
            problems.append(f"round {record.round}: {sorted(set(record.parties) & set(record.dropped))} both "
                            "contributed and were dropped")
        refused = sorted(name for name, why in record.dropped.items() if reason_kind(why) == "refused as a replay")
        if refused:
            problems.append(f"round {record.round}: {refused} refused the coordinator's own retry as a replay")
    import torch  # noqa: F401 - the model is built here only to know its starting projection

    from tests.conftest import build

    finals = [e for e in events if e["event"] == "done"]
    checked = _aggregation(history, finals[-1]["proj"] if finals else None, project(build(seed=plan.seed)),
                           examples, problems)
    if checked["double_counts_visible"] < 0.95:  # the check must be able to see a party counted twice
        problems.append(f"the aggregation check would miss a party counted twice in "
                        f"{1 - checked['double_counts_visible']:.0%} of contributions")
    # late replies: each coordinator process counts its own; the last count each one printed
    late: Counter[str] = Counter()
    for index in {e["process"] for e in events}:
        last = [e["late"] for e in events if e["process"] == index and "late" in e]
        late.update(last[-1] if last else {})
    if sum(late.values()) == 0:
        problems.append("no late reply was seen: the SIGSTOPs did not test that late replies are discarded")
    aborted = [e for e in events if e["event"] == "aborted"]
    for event in aborted:
        missing = event["dropped"]
        if len(missing) < plan.parties - plan.min_parties + 1 or not all(p in event["message"] for p in missing):
            problems.append(f"round {event['round']} aborted without naming who was missing: {event['message']}")
        refused = sorted(p for p, why in missing.items() if reason_kind(why) == "refused as a replay")
        if refused and not any("refused the coordinator's own retry" in p for p in problems):
            problems.append(f"round {event['round']} aborted because {refused} refused the coordinator's own "
                            "retry as a replay (the attempt of a resumed run is not kept past a failed round: "
                            "tests/test_chaos.py::test_a_round_that_failed_twice_can_still_be_resumed)")
    if plan.outage and not aborted:
        problems.append("the outage aborted no round")
    kills = state.faults["coordinator SIGKILL + resume"]
    starts = {e["process"]: e["t"] for e in events if e["event"] == "start"}
    resumes: list[dict[str, Any]] = []
    for index in range(1, kills + 1):
        trains = [e for e in events if e["process"] == index and e["event"] == "train"]
        first = next((e for e in events if e["process"] == index and e["event"] == "round"), None)
        if not trains or trains[0]["next_round"] < 2 or first is None:
            problems.append(f"coordinator-{index} did not resume the run from its checkpoint")
            continue
        connected = next(e["t"] for e in events if e["process"] == index and e["event"] == "connected")
        resumes.append({"at_round": trains[0]["next_round"], "attempt": trains[0]["attempt"],
                        "connect_s": round(connected - starts[index], 2),
                        "first_round_s": round(first["t"] - starts[index], 2)})
    if kills != plan.coordinator_kills:
        problems.append(f"the coordinator was killed {kills} times, not {plan.coordinator_kills}")
    rss = {}
    for index in sorted({e["process"] for e in events}):
        values = [e["rss_kb"] for e in events if e["process"] == index and e["event"] == "round"]
        if values:
            rss[f"coordinator-{index}"] = {"rounds": len(values), "first_kb": values[0], "last_kb": values[-1],
                                           "max_first_half_kb": max(values[: max(1, len(values) // 2)]),
                                           "max_second_half_kb": max(values[len(values) // 2:])}
    longest = max(rss.values(), key=lambda r: r["rounds"], default=None)
    if longest is None or longest["rounds"] < 4:
        problems.append("no coordinator ran enough rounds to judge its memory")
    elif longest["max_second_half_kb"] > (longest["max_first_half_kb"] + plan.rss_margin_kb
                                          + plan.rss_per_round_kb * (longest["rounds"] // 2)):
        problems.append(f"the coordinator's RSS grew past {plan.rss_per_round_kb} kB a round: {longest}")
    # a party back from a fault must take part again: else a fault would cost a party for the rest of the run
    rejoin: dict[str, list[float]] = {"restart": [], "continue": []}
    rounds_done = [e for e in events if e["event"] == "round"]
    for when, action, name in state.returns:
        back = next((e["t"] - when for e in rounds_done if e["t"] > when and name in e["parties"]), None)
        if back is not None:
            rejoin[action].append(round(back, 1))
        elif sum(1 for e in rounds_done if e["t"] > when + 30) >= 3:  # the run went on for long enough
            why = Counter(reason_kind(e["dropped"][name]) for e in rounds_done if e["t"] > when and name in e["dropped"])
            hint = (" (each round's cancel killed its fresh worker: tests/test_chaos.py::"
                    "test_a_party_slower_than_the_round_timeout_once_takes_part_later)" if why["timeout"] else "")
            problems.append(f"{name} never took part again after its {action}; dropped since: {dict(why)}{hint}")
    dropped = Counter(reason_kind(why) for record in history for why in record.dropped.values())
    return {"seed": plan.seed, "parties": plan.parties, "rounds": plan.rounds, "min_parties": plan.min_parties,
            "round_timeout": plan.round_timeout, "seconds": round(seconds, 1), "faults": dict(state.faults),
            "rounds_completed": len(history),
            "rounds_aborted": [{"round": e["round"], "why": dict(Counter(reason_kind(w) for w in e["dropped"].values()))}
                               for e in aborted],
            "dropped": dict(dropped), "late_replies": sum(late.values()), "late_by_party": dict(sorted(late.items())),
            "resumes": resumes, "rejoin_s": rejoin, "rss": rss, "aggregation": checked, "setup": dict(state.timings),
            "problems": problems}


if __name__ == "__main__":
    sys.exit(coordinate(json.loads(Path(sys.argv[1]).read_text())))
