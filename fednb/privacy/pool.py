"""A process pool for the crypto work that speaks frames of its own: no pickle crosses its sockets.

``concurrent.futures.ProcessPoolExecutor`` pickles the function and its arguments, which the
project refuses everywhere (``tests/test_package.py``), and inside a party's sandboxed worker it
cannot even pickle a function defined there. :class:`ForkPool` forks its workers instead, so
that they hold the caller's code already: a call crosses a ``socketpair`` as the name a task was
registered under (:func:`task`) and its arguments, a result comes back the same way, and only
registered functions can run. A frame is a u64 length and a body of tagged values::

    call    name, u32 count, that many values
    reply   R value  |  E kind, type name, message        (kind: "ValueError", "TypeError" or "")
    value   N                                             None
            B | S | I, u64 length, data                   bytes, UTF-8 str, int (two's complement)
            L | T, u32 count, that many of the above      list, tuple (one level deep)

Anything else is refused with TypeError before it is sent: in the parent for arguments, in
the worker for results.

Fork safety: create a pool where forking is safe, as :func:`fednb.party.sandbox.can_fork` checks
it: only the main thread running. Created while other threads run, it still forks (the children
only run registered functions over bytes), but a lock another thread held at the fork stays
held in every child, so a task that takes it (logging, an import) would hang. Linux kills the
workers when the *thread* that created the pool ends (``PR_SET_PDEATHSIG``): create a pool in a
thread that outlives it. Besides its workers a pool costs one thread (the dispatcher), which
matters under a sandbox's ``RLIMIT_NPROC``.

Failures: an exception in a task fails its future, ValueError and TypeError as themselves
(callers rely on ValueError for bad input), any other as :class:`PoolError`; a worker that dies
fails the future it was running with PoolError naming its pid and exit status, and the pool
goes on with the others (submit raises PoolError once none are left).
"""

from __future__ import annotations

import os
import selectors
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from fednb.privacy.pool_frames import _U32, _encode, _read_frame, _send
from fednb.privacy.pool_workers import (_FORK_LOCK, _REGISTRY, PoolError, _fork_workers, _outcome, _task_name,
                                        _Worker, task)

__all__ = ["ForkPool", "PoolError", "open_pool", "task"]

#: Seconds a worker has to exit once its socket closes, before SIGKILL.
GRACE = 5.0

P = ParamSpec("P")
T = TypeVar("T")


class ForkPool(Executor):
    """``workers`` forked processes that run registered tasks, fed by one dispatcher thread.

    ``map`` is Executor's (results in order). Use the pool as a context manager or call
    :meth:`shutdown`; a pool dropped without either kills its workers.
    """

    def __init__(self, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, not {workers!r}")
        self.workers = workers
        with _FORK_LOCK:
            self._tasks = dict(_REGISTRY)  # what the workers know
            started = _fork_workers(workers)
        self._dispatcher = _Dispatcher(started)  # its thread starts only now that every worker is forked
        weakref.finalize(self, self._dispatcher.abandon)

    @property
    def pids(self) -> tuple[int, ...]:
        """The process ids of the workers the pool forked (dead ones included)."""
        return tuple(worker.pid for worker in self._dispatcher.workers)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue ``fn(*args)`` for the next idle worker.

        TypeError for a function not registered before the pool started, or an argument frames cannot carry.
        """
        name = _task_name(fn)
        if name is None or self._tasks.get(name) is not fn:
            raise TypeError(f"{name or repr(fn)} is not a pool task: decorate it with @fednb.privacy.pool.task "
                            "at module level, before the pool starts")
        if kwargs:
            raise TypeError(f"{name}: pool tasks take positional arguments only, not {', '.join(sorted(kwargs))}")
        parts: list[bytes] = []
        _encode(name, parts)
        parts.append(_U32.pack(len(args)))
        for index, value in enumerate(args):
            try:
                _encode(value, parts)
            except TypeError as exc:
                raise TypeError(f"{name}, argument {index}: {exc}") from None
        return self._dispatcher.put(name, b"".join(parts))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Finish the queued work (or cancel it), then close the sockets and reap every worker (SIGKILL after GRACE)."""
        self._dispatcher.close(wait, cancel_futures)


def open_pool(workers: int) -> ForkPool:
    """A :class:`ForkPool` of ``workers`` processes (close it after, or use it in a ``with`` block)."""
    return ForkPool(workers)


@dataclass(eq=False)
class _Job:
    future: Future[Any]
    name: str
    frame: bytes
    running: bool = False  # set_running_or_notify_cancel was called (a job can go back to the queue)


def _fail(job: _Job, error: Exception) -> None:
    if job.running or job.future.set_running_or_notify_cancel():
        job.future.set_exception(error)


class _Dispatcher:
    """The parent's side of a pool: queued jobs, idle and busy workers, and the one thread that moves them.

    It holds no reference to its pool, so that a dropped pool is collected (and kills its
    workers). Only its thread touches the sockets; futures are completed outside the lock.
    """

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = tuple(workers)
        self._lock = threading.Lock()
        self._pending: deque[_Job] = deque()
        self._idle = deque(workers)  # first in, first out: jobs go round the workers
        self._busy: dict[_Worker, _Job] = {}
        self._closing = self._abandoned = self._done = False
        self._broken = ""  # why no more work can run: every worker died
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        for worker in workers:
            self._selector.register(worker.sock, selectors.EVENT_READ, worker)
        self._thread = threading.Thread(target=self._run, name="fednb-fork-pool", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:  # no thread to spare (RLIMIT_NPROC)
            self._finish()
            raise PoolError(f"could not start the pool's dispatcher thread: {exc}") from exc

    def put(self, name: str, frame: bytes) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot submit to a pool after shutdown")
            if self._broken or self._done:
                raise PoolError(self._broken or "the pool's dispatcher has stopped")
            self._pending.append(_Job(future, name, frame))
            self._wake()
        return future

    def close(self, wait: bool, cancel_futures: bool) -> None:
        cancelled: list[_Job] = []
        with self._lock:
            self._closing = True
            if cancel_futures:
                cancelled = [job for job in self._pending if not job.running]
                self._pending = deque(job for job in self._pending if job.running)
            if not self._done:
                self._wake()
        for job in cancelled:
            job.future.cancel()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def abandon(self) -> None:
        """The pool was dropped without shutdown: cancel its queue and kill its workers now."""
        with self._lock:
            if self._closing:
                return
            self._abandoned = True
        self.close(wait=False, cancel_futures=True)
        for worker in self.workers:
            worker.kill()  # the thread then sees every socket close, fails what ran, and ends

    def _wake(self) -> None:
        """Make the thread's select return (called under the lock, before the pipe closes)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups the thread has yet to read
            return

    def _run(self) -> None:
        try:
            while self._step():
                continue
        finally:
            self._finish()

    def _step(self) -> bool:
        """Hand out jobs, then wait for a reply, a death or a wake-up; False once the pool is done."""
        self._dispatch()
        with self._lock:
            if not self._idle and not self._busy:
                return False
            if self._closing and not self._pending and not self._busy:
                return False
        for key, _ in self._selector.select():
            if key.data is None:
                os.read(self._wake_r, 1 << 16)  # a pipe's whole buffer: what is left wakes us again
            else:
                self._receive(key.data)
        return True

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if not self._pending or not self._idle:
                    return
                job, worker = self._pending.popleft(), self._idle.popleft()
                self._busy[worker] = job
            if not (job.running or job.future.set_running_or_notify_cancel()):  # cancelled while queued
                with self._lock:
                    del self._busy[worker]
                    self._idle.appendleft(worker)
                continue
            job.running = True
            try:
                _send(worker.sock, job.frame)
                job.frame = b""  # the worker has it: free the memory while it computes
            except OSError:  # the worker died idle, before the job reached it: the job waits for another
                with self._lock:
                    del self._busy[worker]
                    self._pending.appendleft(job)
                self._lost(worker, None)

    def _receive(self, worker: _Worker) -> None:
        with self._lock:
            job = self._busy.pop(worker, None)
        if job is None:  # an idle worker's socket is readable only at EOF: it died
            self._lost(worker, None)
            return
        try:
            frame = _read_frame(worker.sock)
        except OSError:
            frame = None
        if frame is None:  # EOF: the worker died running the job
            self._lost(worker, job)
            return
        with self._lock:
            self._idle.append(worker)
        result, error = _outcome(frame)
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def _lost(self, worker: _Worker, job: _Job | None) -> None:
        """Reap a worker whose socket closed, fail its job, and fail the queue if it was the last."""
        self._selector.unregister(worker.sock)
        worker.close()
        worker.reap(time.monotonic() + GRACE)
        orphans: list[_Job] = []
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
            if not self._idle and not self._busy:
                self._broken = f"every pool worker has died (the last, {worker.pid}: {worker.describe()})"
                orphans, self._pending = list(self._pending), deque()
            abandoned = self._abandoned
        if job is not None:
            _fail(job, PoolError(f"the pool was dropped while worker {worker.pid} ran {job.name}" if abandoned else
                                 f"pool worker {worker.pid} died running {job.name} ({worker.describe()})"))
        for orphan in orphans:
            _fail(orphan, PoolError(self._broken))

    def _finish(self) -> None:
        """Close every socket (a worker exits at EOF), reap every worker, release the pipe, fail what is left."""
        self._selector.close()
        for worker in self.workers:
            worker.close()
        deadline = time.monotonic() + GRACE
        for worker in self.workers:
            worker.reap(deadline)
        with self._lock:
            self._done = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            left = [*self._pending, *self._busy.values()]
            self._pending.clear()
            self._busy.clear()
        for job in left:  # only after a bug in this class: no future may wait forever
            _fail(job, PoolError("the pool stopped before this task ran"))
