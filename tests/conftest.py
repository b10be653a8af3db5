"""Shared fixtures: in-process parties on real sockets, simulated federations, leak checks."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fednb.data import federated_split, load_dataset
from fednb.party import Datasets, PartyServer, Split

MLP = "import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"


def build(source: str = MLP, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    namespace: dict[str, object] = {}
    exec(source, namespace)
    return namespace["model"]


# Every process this test run starts inherits this mark, so that the leak check below sees
# only our own processes, not those of another run on the same machine.
RUN_MARK = f"FEDNB_TEST_RUN={uuid.uuid4().hex}".encode()
os.environ["FEDNB_TEST_RUN"] = RUN_MARK.split(b"=", 1)[1].decode()


def fednb_processes() -> list[int]:
    """PIDs of this test run's simulation hosts and party processes still running."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ")
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
            if not (b"fednb.party.host" in command or b"fednb party" in command or b"fednb.cli party" in command
                    or b"fednb.party.zygote" in command
                    or b"bin/fednb party" in command):
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                ours = RUN_MARK in handle.read().split(b"\0")
        except OSError:
            continue
        if state != b"Z" and ours:
            found.append(int(entry))
    return found


def kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``process`` (a coordinator in a real subprocess) once ``ready()`` holds, as a crash would;
    it must still be running then. Reaps it and closes its pipes, whatever happens."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and not ready():
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind() -> Iterator[None]:
    def sim_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("fednb-sim-*"))

    def orphaned_dirs() -> list[Path]:
        """New simulation directories that no live process names (another run's live hosts do)."""
        named = b""
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    named += handle.read()
            except OSError:
                continue
        return [d for d in sim_dirs() - dirs_before if d.exists() and str(d).encode() not in named]

    before = set(fednb_processes())
    dirs_before = sim_dirs()
    yield
    wait_until(lambda: not [p for p in fednb_processes() if p not in before], timeout=10)
    leftover = [pid for pid in fednb_processes() if pid not in before]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"fednb processes left behind: {leftover}"
    wait_until(lambda: not orphaned_dirs(), timeout=5, interval=0.2)
    left_dirs = orphaned_dirs()
    for directory in left_dirs:
        shutil.rmtree(directory, ignore_errors=True)
    assert not left_dirs, f"simulation directories left behind: {sorted(map(str, left_dirs))}"


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A 0700 directory for ipc sockets (short path: ipc paths are limited to ~100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="fednb-t-") as directory:
        yield Path(directory)


@pytest.fixture(scope="session")
def digits_parts():
    return federated_split(load_dataset("digits"), 3, "iid", seed=0)


def party_datasets(part) -> Datasets:
    return Datasets({"train": Split(part.x_train, part.y_train), "test": Split(part.x_test, part.y_test)})


@pytest.fixture
def start_party(digits_parts):
    """Start in-process parties on real sockets; all are stopped at the end of the test."""
    servers: list[PartyServer] = []

    def start(endpoint: str, index: int = 0, **options) -> PartyServer:
        server = PartyServer(f"party-{index}", endpoint, party_datasets(digits_parts[index]), **options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


# -- the command line, as a data owner runs it ---------------------------------------------

FEDNB = [sys.executable, "-m", "fednb.cli"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*FEDNB, *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"fednb {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


class Party:
    """A `fednb party` process, stopped by PID at the end of the test."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([*FEDNB, "party", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.line = ""

    def wait_listening(self, timeout: float = 60.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"party exited with {self.process.returncode}: {self.process.stderr.read()}")
            readable, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if readable:
                self.line = self.process.stdout.readline()
                match = re.search(r"listening on (\S+)", self.line)
                if match:
                    return match.group(1)
        raise AssertionError("the party did not start listening")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return self.process.returncode


@pytest.fixture
def cli_parties():
    """Start `fednb party` processes; each is stopped by PID at the end of the test."""
    started: list[Party] = []

    def start(*args: str) -> Party:
        party = Party(*args)
        started.append(party)
        return party

    yield start
    for party in started:
        party.stop()
