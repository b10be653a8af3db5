"""The fork pool (fednb.privacy.pool): real worker processes, frames without pickle, no process left behind.

Results come back in order and equal to a serial run; only registered functions and the values
frames can carry get in; a task's ValueError stays a ValueError; a killed worker fails the task
it ran and the others go on; shutdown and a dropped pool reap every worker; and the pool works
inside a party's sandboxed worker.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import threading
import time

import pytest

import fednb
from fednb.errors import FednbError
from fednb.privacy.pool import ForkPool, PoolError, open_pool, task
from tests.conftest import wait_until


@task
def digest(data: bytes) -> bytes:
    """An order-revealing result; payloads of some lengths take longer, so that replies overtake each other."""
    time.sleep((len(data) % 5) / 1000)
    return hashlib.sha256(data).digest() + data[-3:]


@task
def identity(value: object) -> object:
    return value


@task
def echo(*values: object) -> tuple[object, ...]:
    return values


@task
def as_list(*values: object) -> list[object]:
    return list(values)


@task
def half(value: int) -> float:
    return value / 2


@task
def fail(kind: str, message: str) -> None:
    if kind == "json":
        json.loads(message)
    raise {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}[kind](message)


@task
def nap(milliseconds: int, value: int) -> list[int]:
    time.sleep(milliseconds / 1000)
    return [value, os.getpid()]


@task
def note_pid_then_sleep(path: str, seconds: int) -> None:
    """Say which worker runs this (in the file ``path``), then hang long enough to be killed."""
    with open(path + ".part", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(path + ".part", path)
    time.sleep(seconds)


def registered_late(value: int) -> int:
    return value


def not_a_task(value: int) -> int:
    return value


def reaped(pid: int) -> bool:
    """Whether ``pid`` is gone: no child of ours (waited for, not a zombie) and no process at all."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
    return False


def running_on(path, timeout: float = 10.0) -> int:
    """The pid of the worker that started note_pid_then_sleep with ``path``."""
    assert wait_until(path.exists, timeout=timeout)
    return int(path.read_text())


@pytest.fixture(scope="module")
def pool():
    with ForkPool(2) as shared:
        yield shared


def test_map_keeps_the_order_and_equals_a_serial_run(pool):
    payloads = [hashlib.sha512(str(i).encode()).digest() * (i % 9) + bytes([i % 256]) for i in range(200)]
    assert list(pool.map(digest, payloads)) == [digest(p) for p in payloads]
    many = list(range(-1000, 1000))
    assert list(pool.map(identity, many)) == many


def test_values_round_trip_through_arguments_and_results(pool):
    values = [0, 1, -1, 127, 128, -128, -129, 255, 256, 2**63, -(2**63) - 1, 2**2048 + 12345, -(2**2100) + 7,
              "", "fednb ✓ é 中", None, b"", bytes(range(256)) * 1000]
    back = pool.submit(echo, *values).result()
    assert back == tuple(values) and [type(v) for v in back] == [type(v) for v in values]
    assert pool.submit(as_list, *values).result() == values
    for value in values:
        result = pool.submit(identity, value).result()
        assert result == value and type(result) is type(value)
    bounds = [sign * (2**k + delta) for k in range(0, 2200, 41) for delta in (-1, 0, 1) for sign in (1, -1)]
    assert list(pool.map(identity, bounds)) == bounds
    assert pool.submit(identity, [1, "a", None, b"b"]).result() == [1, "a", None, b"b"]  # one level of list
    assert pool.submit(identity, (2, "c")).result() == (2, "c")


def test_only_registered_functions_and_frame_values_get_in(pool):
    with pytest.raises(TypeError, match="not_a_task"):
        pool.submit(not_a_task, 1)
    with pytest.raises(TypeError, match="not a pool task"):
        pool.submit(lambda: 1)
    for bad in ([1.0, 2.0], {"a": 1}, 1.5, True, bytearray(b"x"), object(), [[1]], ([b"x"],)):
        with pytest.raises(TypeError, match="cannot cross the pool"):
            pool.submit(identity, bad)
    with pytest.raises(TypeError, match="positional"):
        pool.submit(identity, value=1)
    with pytest.raises(TypeError, match="the result of .*half: a float cannot cross"):
        pool.submit(half, 3).result()  # a result frames cannot carry fails in the worker, which serves on
    with pytest.raises(ValueError, match="module-level"):
        task(lambda: 1)
    assert pool.submit(identity, 5).result() == 5


def test_a_function_registered_after_the_pool_started_is_refused_by_it():
    with ForkPool(1) as early:
        task(registered_late)
        with pytest.raises(TypeError, match="registered_late"):
            early.submit(registered_late, 1)
    with ForkPool(1) as later:
        assert later.submit(registered_late, 2).result() == 2


def test_errors_in_a_task_come_back_and_the_pool_serves_on(pool):
    with pytest.raises(ValueError, match="^bad input$"):
        pool.submit(fail, "ValueError", "bad input").result()
    with pytest.raises(TypeError, match="^wrong type$"):
        pool.submit(fail, "TypeError", "wrong type").result()
    with pytest.raises(ValueError, match="^JSONDecodeError: Expecting"):  # a ValueError subclass: a ValueError
        pool.submit(fail, "json", "{").result()
    with pytest.raises(PoolError, match="^KeyError: 'gone'$") as caught:
        pool.submit(fail, "KeyError", "gone").result()
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, FednbError)
    assert list(pool.map(identity, range(10))) == list(range(10))


def test_work_spreads_over_the_workers_from_one_dispatcher_thread():
    threads = threading.active_count()
    with open_pool(3) as three:
        assert three.workers == 3 and len(set(three.pids)) == 3
        assert threading.active_count() == threads + 1
        done = list(three.map(nap, [50] * 9, range(9)))
        assert [value for value, _ in done] == list(range(9))
        assert {pid for _, pid in done} == set(three.pids)
        assert os.getpid() not in three.pids


def test_a_pool_forks_while_other_threads_run():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with ForkPool(1) as forked:  # no warning escapes (filterwarnings = error), and the work runs
            assert forked.submit(identity, 3).result() == 3
    finally:
        stop.set()
        other.join()


def test_a_killed_worker_fails_its_task_and_the_pool_goes_on(tmp_path):
    with ForkPool(2) as pair:
        hung = pair.submit(note_pid_then_sleep, str(tmp_path / "first"), 60)
        victim = running_on(tmp_path / "first")
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(PoolError, match=rf"worker {victim} died .*exit status -9, killed by SIGKILL"):
            hung.result(timeout=10)
        assert reaped(victim)
        (survivor,) = [pid for pid in pair.pids if pid != victim]
        done = list(pair.map(nap, [0] * 20, range(20)))
        assert done == [[i, survivor] for i in range(20)]
        last = pair.submit(note_pid_then_sleep, str(tmp_path / "second"), 60)
        assert running_on(tmp_path / "second") == survivor
        os.kill(survivor, signal.SIGKILL)
        with pytest.raises(PoolError, match=rf"worker {survivor} died"):
            last.result(timeout=10)
        with pytest.raises(PoolError, match="every pool worker has died"):
            pair.submit(identity, 1)
    assert all(reaped(pid) for pid in pair.pids)


def test_shutdown_finishes_the_queue_then_reaps_every_worker():
    pool = ForkPool(2)
    pids = pool.pids
    futures = [pool.submit(nap, 10, i) for i in range(20)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0)[0] for f in futures] == list(range(20))
    assert all(reaped(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(identity, 1)


def test_shutdown_can_cancel_the_queue_or_not_wait():
    pool = ForkPool(1)
    futures = [pool.submit(nap, 100, i) for i in range(10)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert futures[-1].cancelled()
    assert all(f.cancelled() or f.result(timeout=0)[0] == i for i, f in enumerate(futures))
    assert reaped(pool.pids[0])
    pool = ForkPool(2)
    queued = pool.submit(nap, 200, 7)
    pool.shutdown(wait=False)
    assert queued.result(timeout=10)[0] == 7
    assert wait_until(lambda: all(reaped(pid) for pid in pool.pids))


def test_a_dropped_pool_leaves_no_worker(tmp_path):
    pool = ForkPool(2)
    pids = pool.pids
    hung = pool.submit(note_pid_then_sleep, str(tmp_path / "marker"), 60)
    running_on(tmp_path / "marker")
    del pool
    gc.collect()
    assert all(reaped(pid) for pid in pids)
    with pytest.raises(PoolError, match="dropped"):
        hung.result(timeout=10)


CELL = """
import os
import time

from fednb.privacy import psi
from fednb.privacy.pool import ForkPool, task


@task
def worker_pid(_):
    time.sleep(0.02)
    return os.getpid()


state, points = psi.blind([f"id-{i}" for i in range(40)], psi.PSIConfig(group="x25519"))
data = points.tobytes()
chunks = [data[i:i + 32 * 6] for i in range(0, len(data), 32 * 6)]
with ForkPool(2) as pool:
    twice = b"".join(pool.map(psi._blind_chunk, ["x25519"] * len(chunks), [state.secret] * len(chunks), chunks))
    pids = set(pool.map(worker_pid, range(8)))
[len(twice) // 32, twice == psi._blind_chunk("x25519", state.secret, data), len(pids), os.getpid() in pids]
"""


def test_the_pool_runs_inside_a_sandboxed_party_worker():
    with fednb.simulate(1, dataset="digits", partition="iid", contained=True) as fed:
        containment = {row.containment for row in fed.status()}
        if "weak" in containment:
            pytest.skip("the party is weakly contained here (no user namespaces): no sandbox to fork in")
        assert containment == {"full"}
        results = fed.run(CELL, timeout=120)
    assert list(results.values()) == [[40, True, 2, False]]
