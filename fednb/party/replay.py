"""Replay memory: a party refuses a request it has seen before, and a round that goes back.

CURVE drops a replayed frame inside one connection, but not a recorded request sent again on
a new one. So a party remembers, per coordinator identity (the ZAP User-Id), the ids of the
last ``ids`` requests it accepted and, per training run id, the last round it accepted with the
run's attempt (how many times the coordinator resumed it from its checkpoint). A request id
seen before, or a ``train`` whose (attempt, round) is not past the last one of its run, is
refused: a resumed run (same run id, next attempt) may train again the round its crashed
coordinator had sent, never an older attempt's. A new run starts fresh.

Memory is bounded: ``ids`` ids and ``runs`` runs per identity, ``identities`` identities
(least recently heard from forgotten first). With a party directory, each run's last round is
also written there (``replay.json``, atomically, once per round) and read back at start-up, so
a restarted party still refuses a round its run already trained, and a coordinator that
reconnects with the same key after its own restart resumes where the party knows it was. Request
ids are remembered for the process's lifetime only (CURVE drops a frame replayed in another session).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from fednb.atomic import write_atomic

from fednb.wire import Message

MAX_IDS = 4096
MAX_RUNS = 64
MAX_IDENTITIES = 256
FILE = "replay.json"

log = logging.getLogger(__name__)


@dataclass
class _Memory:
    ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    runs: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)  # run → (attempt, round)


class Replays:
    """What each coordinator sent lately; :meth:`check` refuses what would replay it."""

    def __init__(self, *, ids: int = MAX_IDS, runs: int = MAX_RUNS, identities: int = MAX_IDENTITIES,
                 directory: Path | None = None) -> None:
        if min(ids, runs, identities) < 1:
            raise ValueError("replay memory sizes must be at least 1")
        self.ids, self.runs, self.identities = ids, runs, identities
        self._memory: OrderedDict[str, _Memory] = OrderedDict()
        self._path = Path(directory) / FILE if directory is not None else None
        if self._path is not None and self._path.exists():
            self._load(self._path)

    def _load(self, path: Path) -> None:
        """The runs' last rounds as the party wrote them; ValueError (the party does not start) when unreadable."""
        try:
            saved = json.loads(path.read_text())
            for identity, runs in list(saved.items())[-self.identities:]:
                memory = self._memory[str(identity)] = _Memory()
                for run, (attempt, round_) in list(runs.items())[-self.runs:]:
                    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (attempt, round_)):
                        raise ValueError("a round is not an integer")
                    memory.runs[str(run)] = (attempt, round_)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} cannot be read ({exc}): the party would forget which rounds it trained; "
                             "restore it, or remove it to forget them") from None

    def _save(self) -> None:
        if self._path is not None:
            data = {identity: {run: list(last) for run, last in memory.runs.items()}
                    for identity, memory in self._memory.items() if memory.runs}
            write_atomic(self._path, json.dumps(data).encode())

    def check(self, identity: str, message: Message) -> str | None:
        """Why ``message`` is a replay (and it is not remembered), or None (and it is)."""
        memory = self._memory.get(identity)
        if memory is None:
            memory = self._memory[identity] = _Memory()
            if len(self._memory) > self.identities:
                self._memory.popitem(last=False)
        self._memory.move_to_end(identity)
        if message.id in memory.ids:
            return f"request {message.id[:8]} was received before: a replayed message is not run again"
        run = message.content.get("run") if message.type == "train" else None
        if message.type == "train":
            if not isinstance(run, str) or message.round is None:
                return "a train request must carry its run id and round"
            attempt = message.content.get("attempt") or 0
            last = memory.runs.get(run)
            if last is not None and (attempt, message.round) <= last:
                return (f"round {message.round} of run {run[:8]} does not move forward: round {last[1]} of that run "
                        f"was already received (attempt {last[0]}; start a new run to train again, or resume it "
                        "from its checkpoint)")
        memory.ids[message.id] = None
        if len(memory.ids) > self.ids:
            memory.ids.popitem(last=False)
        if isinstance(run, str) and message.round is not None:
            memory.runs[run] = (int(message.content.get("attempt") or 0), message.round)
            memory.runs.move_to_end(run)
            if len(memory.runs) > self.runs:
                memory.runs.popitem(last=False)
            self._save()
        return None
