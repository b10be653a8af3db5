"""Contained execution: the party runs each coordinator's code in a worker process of its own.

A worker has the coordinator's namespace (kept across requests), the datasets read-only, a
limit on the memory it may allocate, and a wall-clock limit per request. A crash, an
out-of-memory kill or an endless loop costs that coordinator its worker (and namespace), which is started afresh at its
next request; the party itself keeps serving. A ``cancel`` from the coordinator kills the
worker running the request it names. See :mod:`fednb.party.worker` for the processes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednb.errors import GateError, WireError
from fednb.party.datasets import Datasets
from fednb.party.pipe import PipeClosed, receive_message, send_message
from fednb.party.processes import (MOUNTPOINT, _close_fds_except, _describe_exit, _drain, _os_threads, _parent_of,
                                   sweep_mountpoints)
from fednb.party.reach import Report
from fednb.party.shared import close_specs, map_datasets, share_datasets, spec_fds
from fednb.party.worker import MAX_CONTROL, zygote_main
from fednb.wire import DEFAULT_LIMITS, Limits, Message

log = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_TIME_LIMIT = 3600.0
DEFAULT_MEMORY_LIMIT = 4 * GiB
ZYGOTE_START = 120.0  # seconds for a fresh zygote to import torch and map the data


#: Threads the imports leave running (OpenBLAS's pool: it stops and restarts itself around a fork).
_IMPORT_THREADS = _os_threads()


def can_fork() -> bool:
    """Whether forking this process is safe: only the main thread runs, and no native pool has
    started since the imports. OpenMP's pool (started by the first parallel torch operation) does
    not survive a fork: the child's first parallel operation waits for its threads forever.
    """
    if threading.current_thread() is not threading.main_thread() or threading.active_count() != 1:
        return False
    return _os_threads() <= _IMPORT_THREADS


@dataclass
class _Worker:
    pid: int
    sock: socket.socket


def _party_error(request: Message, error_type: str, message: str) -> Message:
    return request.reply("error", {"error_type": error_type, "message": message, "origin": "party"})


class Sandbox:
    """Worker processes for one party; :meth:`run` is called from one thread, :meth:`cancel` from any."""

    def __init__(self, name: str, datasets: Datasets, *, time_limit: float = DEFAULT_TIME_LIMIT,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, threads: int = 0, limits: Limits = DEFAULT_LIMITS,
                 contain: bool = True, devices: tuple[str, ...] = (), check_paths: tuple[str, ...] = (),
                 min_aggregate: int = 3) -> None:
        if not time_limit > 0:
            raise ValueError("time_limit must be positive (seconds)")
        if not isinstance(memory_limit, int) or memory_limit < 0:
            raise ValueError("memory_limit must be a non-negative number of bytes (0: no limit)")
        self.name = name
        self.min_aggregate = min_aggregate  # the worker's own floor on a secure sum (the gate checks it too)
        self.time_limit = float(time_limit)
        self.memory_limit = memory_limit
        self.threads = threads
        self.limits = limits
        self._source = datasets
        self._specs: dict[str, Any] = {}
        self.datasets: Datasets | None = None
        self._zygote: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._ready = False
        self._workers: dict[str, _Worker] = {}
        self._exits: dict[int, int] = {}
        self._running: str | None = None
        self._cancel_target: str | None = None
        self._cancel_r, self._cancel_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._stopped = False
        self.contain = contain
        self.devices = tuple(devices)
        self.check_paths = tuple(check_paths)
        for device in self.devices:
            if not os.path.exists(device):
                raise ValueError(f"device {device} does not exist")
        #: What a worker can reach (fednb.party.reach): known once the zygote is ready.
        self.containment: Report = Report("unknown", "the workers have not started")
        self._mountpoint: str | None = None

    # -- the zygote ---------------------------------------------------------------------------

    def start(self) -> Datasets:
        """Share the datasets, start the zygote (forked when that is safe) and wait until it knows
        how well it can contain workers (:attr:`containment`); returns the read-only data."""
        if self.datasets is None:
            self._specs = share_datasets(self._source)
            self.datasets = map_datasets(self._specs)
            self._source = self.datasets  # the caller's arrays need not stay alive for us
        if self.contain and self._mountpoint is None:
            # each worker's root is a tmpfs mounted here inside its own mount namespace; the name carries
            # this party's PID, so that the empty mount point of a party that was killed is removed later
            sweep_mountpoints()
            self._mountpoint = tempfile.mkdtemp(prefix=f"{MOUNTPOINT}{os.getpid()}-")
        if self._control is None:
            self._launch()
        self._ensure_ready()
        return self.datasets

    def _config(self) -> dict[str, Any]:
        containment = None
        if self.contain and self._mountpoint is not None:
            containment = {"mountpoint": self._mountpoint, "devices": list(self.devices),
                           "check": list(self.check_paths)}
        return {"name": self.name, "splits": self._specs, "containment": containment,
                "min_aggregate": self.min_aggregate}

    def _launch(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ready = False
        if can_fork():
            # torch and the kernel are imported here, once: the zygote and every worker share
            # those pages, and the zygote is ready at once (as a spawned one is not, for seconds)
            import fednb.party.kernel  # noqa: F401

            keep = {0, 1, 2, child_end.fileno(), *spec_fds(self._specs)}
            pid = os.fork()
            if pid == 0:  # the zygote
                code = 1
                try:
                    _close_fds_except(keep)
                    code = zygote_main(child_end.detach(), self._config())
                finally:
                    os._exit(code)
            self._zygote, self._popen = pid, None
        else:
            root = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
            fd = child_end.fileno()
            self._popen = subprocess.Popen([sys.executable, "-m", "fednb.party.zygote", "--control", str(fd)],
                                           pass_fds=[fd, *spec_fds(self._specs)], stdin=subprocess.DEVNULL, env=env)
            self._zygote = self._popen.pid
            parent_end.send(json.dumps(self._config()).encode())
        child_end.close()
        self._control = parent_end
        log.info("party %s: worker zygote %d started (%s)", self.name, self._zygote,
                 "forked" if self._popen is None else "spawned")

    def _control_message(self, timeout: float) -> tuple[dict[str, Any], list[int]] | None:
        """The next message from the zygote, or None on timeout; GateError when it is gone."""
        assert self._control is not None
        readable, _, _ = select.select([self._control], [], [], max(0.0, timeout))
        if not readable:
            return None
        data, fds, _, _ = socket.recv_fds(self._control, MAX_CONTROL, 4)
        if not data:
            self._zygote_gone()
            raise GateError(f"the worker zygote of {self.name} exited")
        message = json.loads(data)
        if "exited" in message:
            self._exits[int(message["exited"])] = int(message.get("status", 0))
            while len(self._exits) > 64:  # notices of workers we killed ourselves are never asked for
                del self._exits[next(iter(self._exits))]
        return message, fds

    def _ensure_ready(self) -> None:
        if self._control is None:
            self._launch()
        deadline = time.monotonic() + ZYGOTE_START
        while not self._ready:
            received = self._control_message(deadline - time.monotonic())
            if received is None:
                raise GateError(f"the worker zygote of {self.name} did not start within {ZYGOTE_START:.0f} s")
            message, _ = received
            if "error" in message:
                self._zygote_gone()
                raise GateError(f"the worker zygote of {self.name} failed: {message['error']}")
            if "ready" in message:
                found = message.get("containment") or {}
                self.containment = Report(str(found.get("level", "unknown")), str(found.get("reason", "")),
                                          {str(k): str(v) for k, v in dict(found.get("checks") or {}).items()})
            self._ready = "ready" in message or self._ready

    def _zygote_gone(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        for worker in self._workers.values():
            worker.sock.close()
        self._workers.clear()
        self._reap_zygote(0.0)

    def _reap_zygote(self, timeout: float) -> None:
        """Collect the zygote's exit status within ``timeout`` seconds; it stays recorded while alive."""
        if self._zygote is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._popen is not None:
                    done = self._popen.poll() is not None
                else:
                    done = os.waitpid(self._zygote, os.WNOHANG)[0] != 0
            except ChildProcessError:
                done = True
            if done:
                self._zygote = None
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    # -- workers --------------------------------------------------------------------------------

    def _worker(self, identity: str) -> _Worker:
        worker = self._workers.get(identity)
        if worker is not None:
            return worker
        self._ensure_ready()
        assert self._control is not None
        self._control.send(json.dumps({"op": "fork", "identity": identity, "memory": self.memory_limit,
                                       "threads": self.threads}).encode())
        deadline = time.monotonic() + 30.0
        while True:
            received = self._control_message(deadline - time.monotonic())
            if received is None:
                raise GateError(f"the worker zygote of {self.name} did not fork within 30 s")
            message, fds = received
            if "pid" in message and len(fds) == 1:
                worker = self._workers[identity] = _Worker(int(message["pid"]), socket.socket(fileno=fds[0]))
                log.info("started worker %d for coordinator %s", worker.pid, identity[:12])
                return worker
            for fd in fds:
                os.close(fd)

    def _kill(self, identity: str) -> None:
        worker = self._workers.pop(identity, None)
        if worker is None:
            return
        worker.sock.close()
        if _parent_of(worker.pid) == self._zygote:  # still the zygote's child, not a recycled PID
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                return

    def _exit_status(self, pid: int, wait: float = 1.0) -> int | None:
        deadline = time.monotonic() + wait
        while pid not in self._exits and self._control is not None and time.monotonic() < deadline:
            try:
                self._control_message(deadline - time.monotonic())
            except GateError:
                break
        return self._exits.pop(pid, None)

    # -- running requests -----------------------------------------------------------------------

    def run(self, identity: str, request: Message) -> Message:
        """The worker's reply to ``request`` (its content unchecked), or an error the party made."""
        with self._lock:
            if self._stopped:
                return _party_error(request, "Cancelled", f"{self.name} is stopping")
            self._running, self._cancel_target = request.id, None
        try:
            return self._run(identity, request)
        finally:
            with self._lock:
                self._running = None

    def _run(self, identity: str, request: Message) -> Message:
        fresh = "; your session there starts afresh (earlier variables are gone)"
        try:
            worker = self._worker(identity)
        except (GateError, OSError, ValueError) as exc:
            log.error("%s", exc)
            return _party_error(request, "WorkerCrashed", f"{self.name} could not start a worker for this request")
        deadline = time.monotonic() + self.time_limit
        try:
            send_message(worker.sock, request, limits=self.limits, deadline=deadline)
            while True:
                waiting_on: list[Any] = [worker.sock, self._cancel_r]
                readable, _, _ = select.select(waiting_on, [], [], max(0.0, deadline - time.monotonic()))
                if self._cancel_r in readable:
                    _drain(self._cancel_r)
                    if self._stopped or self._cancel_target == request.id:
                        self._kill(identity)
                        return _party_error(request, "Cancelled", "cancelled by the coordinator" + fresh)
                if worker.sock in readable:
                    break
                if not readable:
                    raise socket.timeout("time limit")
            reply, _ = receive_message(worker.sock, limits=self.limits, deadline=deadline)
        except socket.timeout:
            self._kill(identity)
            log.warning("%s request %s ran past the time limit of %g s; its worker was killed",
                        request.type, request.id[:8], self.time_limit)
            return _party_error(request, "TimeLimit", f"the request ran past {self.name}'s time limit of "
                                                      f"{self.time_limit:g} s and was stopped" + fresh)
        except (PipeClosed, ConnectionError, OSError) as exc:
            pid = worker.pid
            self._kill(identity)
            status = self._exit_status(pid)
            why = _describe_exit(status)
            log.warning("the worker of %s (pid %d) ended during %s request %s: %s (%s)", identity[:12], pid,
                        request.type, request.id[:8], why, exc)
            return _party_error(request, "WorkerCrashed",
                                f"the process running it at {self.name} ended ({why})" + fresh)
        except WireError as exc:
            self._kill(identity)
            log.warning("the worker of %s sent a malformed reply: %s", identity[:12], exc)
            return _party_error(request, "WorkerCrashed", f"the worker at {self.name} sent a malformed reply" + fresh)
        if reply.reply_to != request.id or reply.type not in ("result", "error"):
            self._kill(identity)
            return _party_error(request, "WorkerCrashed", f"the worker at {self.name} answered out of turn" + fresh)
        return reply

    def cancel(self, message_id: str) -> bool:
        """Stop the request ``message_id`` if it is running now; True when it was."""
        with self._lock:
            if self._running != message_id:
                return False
            self._cancel_target = message_id
        os.write(self._cancel_w, b"x")
        return True

    def stop(self) -> None:
        """Kill every worker and the zygote; a running request ends as cancelled."""
        with self._lock:
            self._stopped = True
        try:
            os.write(self._cancel_w, b"x")
        except OSError as exc:
            log.debug("cancel pipe: %s", exc)
        for identity in list(self._workers):
            self._kill(identity)
        if self._control is not None:
            self._control.close()  # the zygote sees end of file, kills what is left and exits
            self._control = None
        if self._zygote is not None:
            try:  # and in case it is still importing torch: its SIGTERM handler does the same
                os.kill(self._zygote, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._reap_zygote(3.0)
            if self._zygote is not None:
                try:
                    os.kill(self._zygote, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap_zygote(3.0)
        close_specs(self._specs)
        self._specs = {}
        if self._mountpoint is not None:
            try:
                os.rmdir(self._mountpoint)
            except OSError as exc:
                log.warning("could not remove the workers' mount point %s: %s", self._mountpoint, exc)
            self._mountpoint = None
