"""The worker side of :mod:`fednb.privacy.pool`: the task registry, forking the workers, and their loop.

A worker is forked with one socket (its end of a socketpair); it closes every other pool's
parent end, dies with the thread that forked it (``PR_SET_PDEATHSIG``), and serves calls of
registered tasks until its socket reaches EOF. Frames are :mod:`fednb.privacy.pool_frames`'.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from fednb.errors import FednbError
from fednb.privacy.pool_frames import Value, _encode, _read_frame, _Reader, _send

F = TypeVar("F", bound=Callable[..., Any])

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None)
#: Exceptions that come back as themselves (callers catch them); any other becomes PoolError.
_SAME_TYPE: dict[str, type[Exception]] = {"ValueError": ValueError, "TypeError": TypeError}

_REGISTRY: dict[str, Callable[..., Any]] = {}
#: The parent's ends of every pool's sockets: a new worker closes them all, so that a worker sees
#: EOF when its own parent end closes, not only once every later worker has exited too.
_PARENT_ENDS: set[socket.socket] = set()
#: One pool forks at a time, so that no child inherits another pool's child end.
_FORK_LOCK = threading.Lock()


class PoolError(FednbError, RuntimeError):
    """A task failed in a worker (other than with ValueError or TypeError), or the worker running it died."""


def task(function: F) -> F:
    """Register a module-level function to run in a :class:`ForkPool`, under ``module:qualname``; returns it as is.

    Register at import time: a pool's workers know the functions registered when it forked.
    """
    name = _task_name(function)
    if name is None or not callable(function):
        raise TypeError(f"{function!r} is not a function that a pool can run")
    if "<" in name:  # <locals>, <lambda>: two of them would share one name
        raise ValueError(f"{name} is not a module-level function: only those can be pool tasks")
    _REGISTRY[name] = function
    return function


def _task_name(function: object) -> str | None:
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", None)
    return f"{module}:{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None


def _fork_workers(count: int) -> list[_Worker]:
    parent = os.getpid()
    started: list[_Worker] = []
    try:
        for _ in range(count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            _PARENT_ENDS.add(ours)
            try:
                with warnings.catch_warnings():
                    # Python ≥ 3.12 warns of forking while threads run: see "Fork safety" in fednb.privacy.pool
                    warnings.filterwarnings("ignore", r".*fork\(\)", DeprecationWarning)
                    pid = os.fork()
            except OSError as exc:  # RLIMIT_NPROC, most likely
                _PARENT_ENDS.discard(ours)
                ours.close()
                theirs.close()
                raise PoolError(f"could not fork pool worker {len(started) + 1} of {count}: {exc}") from exc
            if pid == 0:
                code = 1
                try:
                    code = _serve(theirs, parent)
                finally:
                    os._exit(code)  # never back into the caller's code
            theirs.close()
            started.append(_Worker(pid, ours))
    except BaseException:
        for worker in started:
            worker.close()
            worker.kill()
        raise
    return started


def _serve(sock: socket.socket, parent: int) -> int:
    """A worker's loop: read a call, run the registered function, write its result or error; 0 at EOF."""
    for end in list(_PARENT_ENDS):
        end.close()
    _FORK_LOCK.release()  # held by the pool that forked us, in this copy too: a task may start a pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which shuts the pool down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # where it fails, EOF on the socket still ends us
    if os.getppid() != parent:  # the parent died before prctl
        return 1
    while (frame := _read_frame(sock)) is not None:
        try:
            reader = _Reader(frame)
            name = reader.text()
            args = [reader.value() for _ in range(reader.count())]
            result, parts = _REGISTRY[name](*args), [b"R"]
            try:
                _encode(result, parts)
            except TypeError as exc:
                raise TypeError(f"the result of {name}: {exc}") from None
        except Exception as exc:  # the task's error goes back to its future; the worker serves on
            kind = next((key for key, base in _SAME_TYPE.items() if isinstance(exc, base)), "")
            message = str(exc).encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates
            parts = [b"E"]
            for text in (kind, type(exc).__name__, message):
                _encode(text, parts)
        _send(sock, b"".join(parts))
    return 0


def _outcome(frame: bytearray) -> tuple[Value, Exception | None]:
    """A reply frame as (result, None) or (None, the exception to raise)."""
    reader = _Reader(frame)
    if bytes(reader.take(1)) == b"R":
        return reader.value(), None
    kind, type_name, message = reader.text(), reader.text(), reader.text()
    if kind in _SAME_TYPE:
        return None, _SAME_TYPE[kind](message if type_name == kind else f"{type_name}: {message}")
    return None, PoolError(f"{type_name}: {message}")


class _Worker:
    """One forked worker: its pid, the parent's end of its socket, and its exit code once reaped."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid, self.sock = pid, sock
        self.reaped = False
        self.exitcode: int | None = None  # -N when killed by signal N; None until reaped, or if reaped elsewhere
        self._lock = threading.Lock()

    def close(self) -> None:
        _PARENT_ENDS.discard(self.sock)
        self.sock.close()

    def reap(self, deadline: float) -> None:
        """Wait for the worker to exit until ``deadline`` (time.monotonic), then SIGKILL it."""
        delay = 0.001
        while True:
            with self._lock:
                if self.reaped:
                    return
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid == 0 and time.monotonic() >= deadline:
                        os.kill(self.pid, signal.SIGKILL)
                        pid, status = os.waitpid(self.pid, 0)
                except ChildProcessError:  # reaped by someone else (SIGCHLD ignored): its status is lost
                    self.reaped = True
                    return
                if pid:
                    self.reaped, self.exitcode = True, os.waitstatus_to_exitcode(status)
                    return
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def kill(self) -> None:
        self.reap(deadline=0.0)

    def describe(self) -> str:
        if self.exitcode is None:
            return "exit status unknown"
        if self.exitcode < 0:
            return f"exit status {self.exitcode}, killed by {signal.Signals(-self.exitcode).name}"
        return f"exit status {self.exitcode}"
