"""Local simulation: N real party processes on private ipc sockets, one call away.

``fednb.simulate(4)`` starts a host process that imports torch once and forks four parties
(see :mod:`fednb.party.host`), each serving its own partition of a bundled dataset on an
``ipc://`` socket in a fresh 0700 directory, and connects to them. The parties are the same
code a deployment runs; only the data and the endpoints are local. ``secure=True`` adds
CURVE with generated keys. ``close()``, interpreter exit, and a killed kernel all stop the
parties and remove the private directory: the host holds the read end of a pipe from this
process, and when it closes the host stops its parties, removes the directory and exits.
``dp_epsilon=`` gives every party a privacy budget, with its ledger in a party directory of
its own inside the private directory (so it lasts as long as the simulation).

``data={"bank": "guest.csv", "partner": "host.csv"}`` starts one party per entry instead,
named by its key, each on its own file (or arrays, written into the private directory first):
a user's own horizontal silos, or, with ``id_column=``, the parties of a vertical federation.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import numpy as np

from fednb.data import DATASETS, PARTITIONS
from fednb.errors import DataError, FederationError
from fednb.federation import Federation, connect
from fednb.transport import generate

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[SimHost] = weakref.WeakSet()

MAX_PARTIES = 512
#: A simulated party's name names its socket and directory in the private directory too.
PARTY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: What a party of ``simulate(data=...)`` serves: a .npz or .csv file, or arrays {"x", "y", "ids"}.
PartyData = Union[str, "os.PathLike[str]", Mapping[str, Any]]

@dataclass(eq=False)
class SimHost:
    """The host process of a simulation and the parties it forked, stopped by PID."""

    process: subprocess.Popen[bytes]
    directory: Path
    log_file: IO[bytes]
    parties: list[dict[str, Any]] = field(default_factory=list)
    ready_seconds: float = 0.0
    _stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] + [int(p["pid"]) for p in self.parties]

    def stop(self, grace: float = 5.0) -> None:
        """Close the lifeline, wait for the host to stop its parties, then make sure by PID."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("the simulation host did not stop within %.0f s; killing it", grace)
                self.process.kill()
                self.process.wait()
            for party in self.parties:
                _kill_if_alive(int(party["pid"]))
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.log_file.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            _LIVE.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the host and its parties logged."""
        try:
            text = (self.directory / "parties.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _kill_if_alive(pid: int) -> None:
    """SIGKILL a party that outlived its host (its PID is not ours to reap)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return
    if state != "Z":
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def check_arguments(n: int | None, dataset: str, partition: str, alpha: float, *, dp_epsilon: float | None = None,
                    dp_delta: float = 1e-5) -> None:
    """ValueError for a simulation that cannot start, before anything is started."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PARTIES:
        raise ValueError(f"n must be an integer between 1 and {MAX_PARTIES}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; bundled: {', '.join(DATASETS)}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; known: {', '.join(PARTITIONS)}")
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    check_budget(dp_epsilon, dp_delta)


def check_data(data: Mapping[str, PartyData], *, id_column: str | None = None, label: str | None = None) -> None:
    """ValueError (DataError for a file that is not there) for a ``data=`` that cannot start a simulation."""
    if not isinstance(data, Mapping) or not 1 <= len(data) <= MAX_PARTIES:
        raise ValueError(f"data must be a dict of 1 to {MAX_PARTIES} entries, {{party name: file or arrays}}")
    for what, value in (("id_column", id_column), ("label", label)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{what} must be a column name, got {value!r}")
    if label is not None and label == id_column:
        raise ValueError(f"the label and the id column are both {label!r}; they must be different columns")
    for name, source in data.items():
        if not isinstance(name, str) or not PARTY_NAME.fullmatch(name):
            raise ValueError(f"party name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit")
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.suffix.lower() not in (".npz", ".csv"):
                raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r} for party {name!r}; "
                                "use .npz or .csv")
            if not path.is_file():
                raise DataError(f"{path}: no such file (the data of party {name!r})")
        elif isinstance(source, Mapping):
            if "x" not in source:
                raise ValueError(f"data[{name!r}] needs an array 'x' (and 'y', 'ids' as it has them)")
            known = {"x", "y", "ids", *([label] if label is not None else [])}
            for key in source:
                if key not in known:
                    raise ValueError(f"data[{name!r}]: unknown array {key!r}; a party's arrays are "
                                     f"{', '.join(map(repr, sorted(known)))}")
        else:
            raise ValueError(f"data[{name!r}] must be a path to a .npz or .csv file, or a dict of arrays "
                             f"{{'x': ..., 'y': ..., 'ids': ...}}; got {type(source).__name__}")


def check_budget(dp_epsilon: float | None, dp_delta: float) -> None:
    """ValueError for a privacy budget no party can have."""
    if dp_epsilon is not None:
        if isinstance(dp_epsilon, bool) or not isinstance(dp_epsilon, (int, float)) \
                or not (math.isfinite(dp_epsilon) and dp_epsilon > 0):
            raise ValueError(f"dp_epsilon must be a finite number > 0 (or None: no budget), got {dp_epsilon!r}")
        if isinstance(dp_delta, bool) or not isinstance(dp_delta, (int, float)) or not 0 < dp_delta < 1:
            raise ValueError(f"dp_delta must be a number in (0, 1), got {dp_delta!r}")


def start_host(n: int | None = None, *, dataset: str = "digits", partition: str = "dirichlet", alpha: float = 0.5,
               seed: int = 0, shards_per_party: int = 2, test_fraction: float = 0.2,
               data: Mapping[str, PartyData] | None = None, id_column: str | None = None, label: str | None = None,
               authorized: bytes | None = None, heartbeat: float = 1.0, heartbeat_timeout: float = 10.0,
               threads: int | None = None, tcp: bool = False, contained: bool = False, timeout: float = 120.0,
               require_secure_aggregation: bool = False, dp_epsilon: float | None = None,
               dp_delta: float = 1e-5) -> SimHost:
    """Start the host and wait until all parties listen; raise with their log otherwise.

    ``n`` parties on a partition of ``dataset``, or one party per entry of ``data`` (see
    :func:`simulate`); DataError when a party's file cannot be used.
    """
    if data is None:
        check_arguments(n, dataset, partition, alpha, dp_epsilon=dp_epsilon, dp_delta=dp_delta)
        assert n is not None  # checked
        count = n
    else:
        check_data(data, id_column=id_column, label=label)
        check_budget(dp_epsilon, dp_delta)
        count = len(data)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if tcp and authorized is None:
        raise ValueError("TCP endpoints always use CURVE: a simulation over tcp needs secure=True")
    threads = threads or max(1, (os.cpu_count() or 1) // count)
    options = ["--seed", str(seed), "--test-fraction", repr(test_fraction), "--threads",
               str(threads), "--heartbeat", repr(heartbeat), "--timeout", repr(heartbeat_timeout)]
    if data is None:
        options += ["--n", str(count), "--dataset", dataset, "--partition", partition, "--alpha", repr(alpha),
                    "--shards", str(shards_per_party)]
    # the "--flag=value" form: a column name, key or path may start with '-'
    options += [f"--id-column={id_column}"] * (id_column is not None) + [f"--label={label}"] * (label is not None)
    if authorized is not None:
        options.append(f"--authorized={authorized.decode()}")  # a Z85 key may start with '-'
    options += ["--tcp"] * tcp + ["--contained"] * contained
    options += ["--require-secure-aggregation"] * require_secure_aggregation
    if dp_epsilon is not None:
        options += ["--dp-epsilon", repr(float(dp_epsilon)), "--dp-delta", repr(float(dp_delta))]
    directory = Path(tempfile.mkdtemp(prefix="fednb-sim-"))  # mode 0700: the ipc sockets' privacy
    started = time.monotonic()
    try:
        if data is not None:
            options += [f"--data={name}={path}" for name, path in _data_files(data, directory)]
        log_file = open(directory / "parties.log", "wb")  # noqa: SIM115 - closed by SimHost.stop
        try:
            process = subprocess.Popen([sys.executable, "-m", "fednb.party.host", "--dir", str(directory), *options],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                       start_new_session=True)
        except BaseException:
            log_file.close()
            raise
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    host = SimHost(process, directory, log_file)
    _LIVE.add(host)
    try:
        ready = _read_ready(process, timeout)
    except BaseException:
        tail = host.log_tail()
        host.stop()
        if isinstance(tail, str) and tail:
            log.error("simulation host log:\n%s", tail)
        raise
    if "error" in ready:
        tail = host.log_tail()
        host.stop()
        if ready.get("data"):
            raise DataError(str(ready["error"]))
        raise FederationError(f"the simulation did not start: {ready['error']}\n{tail}")
    host.parties = ready["parties"]
    host.ready_seconds = time.monotonic() - started
    return host


def _data_files(data: Mapping[str, PartyData], directory: Path) -> list[tuple[str, str]]:
    """(party, file) for each entry of ``data``: paths as given, arrays written to ``directory`` as .npz (0600)."""
    files = []
    for name, source in data.items():
        if not isinstance(source, Mapping):
            files.append((name, str(Path(source).resolve())))
            continue
        arrays = {}
        for key, value in source.items():
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise ValueError(f"data[{name!r}][{key!r}] is an array of Python objects; give numbers "
                                 "(ids: integers or strings)")
            arrays[key] = array
        path = directory / f"{name}.data.npz"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)  # type: ignore[arg-type]
        files.append((name, str(path)))
    return files


def _read_ready(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FederationError(f"the simulation's parties did not start within {timeout:.0f} s")
        readable, _, _ = select.select([process.stdout], [], [], min(remaining, 0.5))
        if readable:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise FederationError(f"the simulation host exited with status {process.wait()}")
            line += chunk
    try:
        ready = json.loads(line)
    except ValueError:
        raise FederationError(f"the simulation host said something unexpected: {line[:200]!r}") from None
    if not isinstance(ready, dict):
        raise FederationError("the simulation host said something unexpected")
    return ready


def simulate(n: int | None = None, dataset: str | None = None, partition: str | None = None, alpha: float = 0.5,
             seed: int = 0, secure: bool = False, *, data: Mapping[str, PartyData] | None = None,
             id_column: str | None = None, label: str | None = None, transport: str = "ipc", contained: bool = False,
             shards_per_party: int = 2, test_fraction: float = 0.2,
             heartbeat: float = 1.0, heartbeat_timeout: float = 10.0, timeout: float = 120.0,
             require_secure_aggregation: bool = False, dp_epsilon: float | None = None,
             dp_delta: float = 1e-5) -> Federation:
    """Start ``n`` (default 4) local party processes on a partition of ``dataset`` and connect to them.

    ``dataset`` is a bundled one (default ``digits``); ``partition`` is ``iid``, ``dirichlet``
    (the default: label skew with concentration ``alpha``; smaller is more skewed) or
    ``shards``; each party also gets a test split. The result is an
    ordinary :class:`Federation`; closing it stops the parties. ``transport="tcp"`` binds
    loopback TCP ports instead of ipc sockets, and then CURVE is on whatever ``secure`` says.
    The parties run coordinator code in their own process (the local user is both coordinator
    and data owner); ``contained=True`` runs it in worker processes with time and memory
    limits, as real parties do, at the cost of two more copies of every tensor.
    ``require_secure_aggregation=True`` makes every party refuse plain train requests (train
    with ``secure_aggregation=True``) and secure rounds of fewer than 3 parties.
    ``dp_epsilon`` gives every party a privacy budget of that ε at ``dp_delta`` for its training
    data: each keeps a ledger in its own directory, trains only with ``dp=`` (DP-SGD or
    DP-FedAvg) and refuses a run that would spend past the budget.

    ``data={"bank": "bank.csv", "partner": arrays}`` starts one party per entry instead, named by
    its key, on its own data: the path of a ``.npz`` or ``.csv`` file, or a dict of arrays
    ``{"x": …, "y": …, "ids": …}``. Without ``id_column`` each is a horizontal party's table
    (features and the ``label`` column; ``test_fraction`` of it is held out, drawn with
    ``seed``). With ``id_column`` they are the tables of a vertical federation: each has row
    ids, and ``label`` is taken from the files that have that column (a feature party's does
    not). ``n``, ``dataset``, ``partition``, ``alpha`` and ``shards_per_party`` do not go with
    ``data`` (ValueError).
    """
    if data is None:
        if id_column is not None or label is not None:
            raise ValueError("id_column and label describe the files of data=...; a simulation on a bundled "
                             "dataset has neither")
        n, dataset, partition = 4 if n is None else n, dataset or "digits", partition or "dirichlet"
        check_arguments(n, dataset, partition, alpha, dp_epsilon=dp_epsilon, dp_delta=dp_delta)
    else:
        given = [f"{what}={value!r}" for what, value, default in
                 (("n", n, None), ("dataset", dataset, None), ("partition", partition, None), ("alpha", alpha, 0.5),
                  ("shards_per_party", shards_per_party, 2)) if value != default]
        if given:
            raise ValueError(f"simulate(data=...) starts one party per entry of data, each on its own file: "
                             f"{', '.join(given)} does not apply")
        check_data(data, id_column=id_column, label=label)
        check_budget(dp_epsilon, dp_delta)
    if transport not in ("ipc", "tcp"):
        raise ValueError("transport must be 'ipc' or 'tcp'")
    secure = secure or transport == "tcp"
    keypair = generate() if secure else None
    bundled: dict[str, Any] = {} if data is not None else {
        "dataset": dataset, "partition": partition, "alpha": alpha, "shards_per_party": shards_per_party}
    host = start_host(n, seed=seed, test_fraction=test_fraction, data=data, id_column=id_column, label=label,
                      authorized=keypair.public if keypair else None,
                      heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout, tcp=transport == "tcp",
                      contained=contained, require_secure_aggregation=require_secure_aggregation,
                      dp_epsilon=dp_epsilon, dp_delta=dp_delta, timeout=timeout, **bundled)
    specs = [{"name": p["name"], "endpoint": p["endpoint"], **({"public_key": p["public_key"]} if secure else {})}
             for p in host.parties]
    federation = connect(specs, keypair, timeout=timeout, heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout,
                         on_close=[host.stop], name="simulation")
    federation.simulation = host  # type: ignore[attr-defined]
    return federation


@atexit.register
def _stop_all() -> None:
    for host in list(_LIVE):
        host.stop(grace=2.0)
