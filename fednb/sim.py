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
import os
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
from typing import IO, Any

import numpy as np

from fednb.errors import DataError, FederationError
from fednb.federation import Federation, connect
from fednb.sim_checks import BACKENDS, PartyData, check_arguments, check_budget, check_data, check_pool
from fednb.sim_checks import MAX_PARTIES, MAX_POOL_PARTIES  # noqa: F401 - importable from here, as before
from fednb.transport import generate

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[SimHost] = weakref.WeakSet()


@dataclass(eq=False)
class SimHost:
    """The host process of a simulation and the parties it forked, stopped by PID."""

    process: subprocess.Popen[bytes]
    directory: Path
    log_file: IO[bytes]
    parties: list[dict[str, Any]] = field(default_factory=list)
    #: A pool simulation's worker processes, each one shared endpoint for its share of the parties.
    workers: list[dict[str, Any]] = field(default_factory=list)
    ready_seconds: float = 0.0
    _stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] + [int(p["pid"]) for p in (*self.parties, *self.workers)]

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
            for child in (*self.parties, *self.workers):
                _kill_if_alive(int(child["pid"]))
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



def start_host(n: int | None = None, *, dataset: str = "digits", partition: str = "dirichlet", alpha: float = 0.5,
               seed: int = 0, shards_per_party: int = 2, test_fraction: float = 0.2,
               data: Mapping[str, PartyData] | None = None, id_column: str | None = None, label: str | None = None,
               authorized: bytes | None = None, heartbeat: float = 1.0, heartbeat_timeout: float = 10.0,
               threads: int | None = None, tcp: bool = False, contained: bool = False, timeout: float = 120.0,
               require_secure_aggregation: bool = False, dp_epsilon: float | None = None,
               dp_delta: float = 1e-5, workers: int = 0, examples_per_party: int | None = None,
               members: int = 64) -> SimHost:
    """Start the host and wait until all parties listen; raise with their log otherwise.

    ``n`` parties on a partition of ``dataset``, or one party per entry of ``data`` (see
    :func:`simulate`); DataError when a party's file cannot be used. ``workers`` > 0: the
    ``n`` parties are a population served by that many worker processes (the pool backend).
    """
    if data is None:
        check_arguments(n, dataset, partition, alpha, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
                        backend="pool" if workers else "process")
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
    threads = threads or max(1, (os.cpu_count() or 1) // (min(workers, count) if workers else count))
    options = ["--seed", str(seed), "--test-fraction", repr(test_fraction), "--threads",
               str(threads), "--heartbeat", repr(heartbeat), "--timeout", repr(heartbeat_timeout)]
    if data is None:
        options += ["--n", str(count), "--dataset", dataset, "--partition", partition, "--alpha", repr(alpha),
                    "--shards", str(shards_per_party)]
    if workers:
        options += ["--pool-workers", str(workers), "--members", str(members)]
        options += ["--examples-per-party", str(examples_per_party)] * (examples_per_party is not None)
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
        if ready.get("usage"):
            hint = "; examples_per_party=E gives each party E rows drawn with replacement" if workers else ""
            raise ValueError(f"{ready['error']}{hint}")
        raise FederationError(f"the simulation did not start: {ready['error']}\n{tail}")
    host.parties = ready.get("parties", [])
    host.workers = ready.get("workers", [])
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
             dp_delta: float = 1e-5, backend: str = "process", workers: int = 2,
             examples_per_party: int | None = None, members: int = 64,
             ray_address: str | None = None) -> Federation:
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

    ``backend="pool"`` simulates up to 100,000 *virtual* parties with ``workers`` processes: each
    worker serves its share of them on one shared endpoint, building a party's data, gate and
    kernel when a request names it and keeping the ``members`` most recently asked warm
    (:mod:`fednb.party.population`), so memory follows the workers, not the parties, and a round
    costs what its sampled parties cost (sample with ``train(..., parties_per_round=…)``). The
    same party code runs, so results match one process per party for the same seed.
    ``examples_per_party=E`` gives every party E training rows drawn with replacement under the
    same label skew (a population larger than the dataset); without it the parties partition
    the dataset as above. ``backend="ray"`` runs those workers as Ray actors
    (``pip install fednb[ray]``): a local Ray by default, or the cluster at ``ray_address``.
    The pool backends take bundled datasets only, and no ``contained`` or ``dp_epsilon``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend != "process":
        check_pool(data=data, contained=contained, dp_epsilon=dp_epsilon, workers=workers,
                   examples_per_party=examples_per_party, members=members, partition=partition)
    elif examples_per_party is not None or ray_address is not None:
        raise ValueError("examples_per_party and ray_address go with backend='pool' or 'ray'")
    if backend != "ray" and ray_address is not None:
        raise ValueError("ray_address goes with backend='ray'")
    if data is None:
        if id_column is not None or label is not None:
            raise ValueError("id_column and label describe the files of data=...; a simulation on a bundled "
                             "dataset has neither")
        n, dataset, partition = 4 if n is None else n, dataset or "digits", partition or "dirichlet"
        check_arguments(n, dataset, partition, alpha, dp_epsilon=dp_epsilon, dp_delta=dp_delta, backend=backend)
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
    if backend == "ray":
        from fednb.sim_ray import start_ray

        host: Any = start_ray(n, seed=seed, test_fraction=test_fraction, authorized=keypair.public if keypair else None,
                              heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout, tcp=transport == "tcp",
                              require_secure_aggregation=require_secure_aggregation, timeout=timeout,
                              workers=workers, examples_per_party=examples_per_party, members=members,
                              address=ray_address, **bundled)
    else:
        host = start_host(n, seed=seed, test_fraction=test_fraction, data=data, id_column=id_column, label=label,
                          authorized=keypair.public if keypair else None,
                          heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout, tcp=transport == "tcp",
                          contained=contained, require_secure_aggregation=require_secure_aggregation,
                          dp_epsilon=dp_epsilon, dp_delta=dp_delta, timeout=timeout,
                          workers=workers if backend == "pool" else 0, examples_per_party=examples_per_party,
                          members=members, **bundled)
    specs = [{"name": p["name"], "endpoint": p["endpoint"], **({"public_key": p["public_key"]} if secure else {})}
             for p in host.parties] + pool_specs(host.workers, secure)
    federation = connect(specs, keypair, timeout=timeout, heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout,
                         on_close=[host.stop], name="simulation")
    federation.simulation = host  # type: ignore[attr-defined]
    return federation



def pool_specs(workers: list[dict[str, Any]], secure: bool) -> list[dict[str, Any]]:
    """The parties of pool workers as connect() takes them, in the population's order (worker ``i``
    serves parties ``i``, ``i + W``, …)."""
    specs = []
    for turn in range(max((len(w["parties"]) for w in workers), default=0)):
        for worker in workers:
            if turn < len(worker["parties"]):
                specs.append({"name": worker["parties"][turn], "endpoint": worker["endpoint"], "shared": True,
                              **({"public_key": worker["public_key"]} if secure else {})})
    return specs


@atexit.register
def _stop_all() -> None:
    for host in list(_LIVE):
        host.stop(grace=2.0)
