"""What a chaos run is asked to do (:class:`Plan`) and what its harness saw (:class:`State`).

Part of the chaos harness of tests/chaos.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
