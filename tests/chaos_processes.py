"""The chaos run's processes: children with their output in a file, and what /proc says of them and theirs.

Part of the chaos harness of tests/chaos.py: by PID only, never by name, so that nothing outside the run is hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "FEDNB_CHAOS_RUN"  # in the environment of every process the harness starts, and so of their children


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
