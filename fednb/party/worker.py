"""The processes that run coordinator code: a zygote, and one worker per coordinator session.

::

    party process ──control (seqpacket)──> zygote: imports torch, maps the datasets, forks
         │                                   └── worker (one per coordinator): Kernel, namespace
         └───────────── messages (seqpacket + sealed memfd)   ────────┘

The zygote is single-threaded, so forking it is safe where forking the party (sockets,
threads) is not; it is forked from the party before the party starts any thread, or started
as ``python -m fednb.party.zygote`` where the party cannot fork (inside a notebook kernel).
A worker limits the memory it may allocate (``RLIMIT_DATA``) and dies with the zygote, the
zygote with the party: when the party closes the control socket or dies, the zygote kills its
workers and exits. The party enforces wall-clock limits by killing a worker.
A spawned zygote runs ``python -m fednb.party.zygote`` (a module the party never imports).

Control messages are JSON: ``{"op": "fork", "identity", "memory", "threads"}`` is answered with
``{"pid"}`` and the worker's socket (SCM_RIGHTS); the zygote reports ``{"exited": pid, "status"}``
for each worker that ends (status: exit code, or −signal).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import logging
import os
import resource
import select
import signal
import socket
from typing import Any

log = logging.getLogger("fednb.party.worker")

_PR_SET_PDEATHSIG = 1
MAX_CONTROL = 1 << 20


def die_with_parent(signum: int) -> None:
    """Ask Linux to send ``signum`` when the parent (thread) that forked us ends."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError) as exc:  # not Linux: the control socket's EOF still stops us
        log.debug("PR_SET_PDEATHSIG unavailable: %s", exc)


def send_control(sock: socket.socket, value: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(value).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def zygote_main(control_fd: int, config: dict[str, Any]) -> int:
    """Serve fork requests until the control socket closes; returns the exit code."""
    die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the party's to handle
    _log_to_stderr()
    control = socket.socket(fileno=control_fd)
    children: set[int] = set()

    def stop(*_: object) -> None:
        for pid in children:
            _kill(pid)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        from fednb.party.shared import map_datasets

        datasets = map_datasets(config["splits"])
        import fednb.party.kernel  # noqa: F401 - torch and the kernel, imported once for every worker

        report = _check_containment(config)
        send_control(control, {"ready": os.getpid(), "containment": report})
    except Exception as exc:  # noqa: BLE001 - reported to the party, which refuses work with it
        log.exception("the party's zygote could not start")
        send_control(control, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    while True:
        readable, _, _ = select.select([control], [], [], 0.5)
        for pid in list(children):
            done, status = _reap(pid)
            if done:
                children.discard(pid)
                send_control(control, {"exited": pid, "status": status})
        if not readable:
            continue
        raw = control.recv(MAX_CONTROL)
        if not raw:
            stop()
        request = json.loads(raw)
        if request.get("op") != "fork":
            continue
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                parent_end.close()
                code = worker_main(child_end, config, datasets, request)
            except BaseException:  # noqa: BLE001 - logged, then the worker exits
                log.exception("worker failed")
            finally:
                os._exit(code)
        child_end.close()
        children.add(pid)
        send_control(control, {"pid": pid}, [parent_end.fileno()])
        parent_end.close()


def _log_to_stderr() -> None:
    """Log to file descriptor 2 only: handlers inherited from a forked party (its log file, a
    notebook's or a test runner's capture) belong to that process and may not work here."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _reap(pid: int) -> tuple[bool, int]:
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True, 0
    if not done:
        return False, 0
    return True, (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        return


def limit_memory(extra: int) -> None:
    """Let this process allocate at most ``extra`` more bytes of private writable memory (0: no cap).

    ``RLIMIT_DATA`` rather than ``RLIMIT_AS``: since Linux 4.7 it counts every private writable
    mapping (heap, numpy and torch buffers), but not shared read-only data (the datasets), code,
    or address space merely reserved — which CUDA reserves by the terabyte, so that a GPU party
    would fail under an address-space cap of any sensible size.
    """
    if extra <= 0:
        return
    current = 0
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmData:"):
                current = int(line.split()[1]) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = current + extra if hard == resource.RLIM_INFINITY else min(current + extra, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def worker_main(sock: socket.socket, config: dict[str, Any], datasets: Any, request: dict[str, Any]) -> int:
    """Answer requests from the party with the kernel until the socket closes."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from fednb.errors import WireError
    from fednb.party.kernel import Kernel
    from fednb.party.pipe import PipeClosed, receive_message, send_message

    threads = int(request.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    limit_memory(int(request.get("memory") or 0))
    _enter_sandbox(config, sock.fileno())
    kernel = Kernel(str(config.get("name", "party")), datasets, min_aggregate=int(config.get("min_aggregate") or 3))
    identity = str(request.get("identity", ""))
    while True:
        try:
            message, _ = receive_message(sock)
        except PipeClosed:
            return 0
        except WireError as exc:  # the party is trusted; a bad frame here means a bug: say so and stop
            log.error("worker got a malformed message from the party: %s", exc)
            return 1
        reply = kernel.handle(identity, message)
        try:
            send_message(sock, reply)
        except ValueError as exc:  # the reply cannot be encoded (too large, not JSON)
            send_message(sock, message.reply("error", {"error_type": "ValueError", "origin": "party",
                                                       "message": f"the reply cannot be sent: {exc}"}))


def _check_containment(config: dict[str, Any]) -> dict[str, Any]:
    """What the workers will be: the probe's report, which the zygote remembers for its forks."""
    from fednb.party.reach import probe

    settings = config.get("containment")
    if not settings:
        return {"level": "none", "reason": "containment is off", "checks": {}}
    report = probe(settings["mountpoint"], settings.get("check", ()), devices=settings.get("devices", ()))
    settings["level"] = report.level
    if report.level != "full":
        log.warning("workers cannot be fully contained here: %s", report.reason)
    return {"level": report.level, "reason": report.reason, "checks": report.checks}


def _enter_sandbox(config: dict[str, Any], pipe: int) -> None:
    """Contain this worker (no network, only its datasets) or, where the kernel refuses, weaken it."""
    from fednb.party.containment import ContainmentUnavailable, Sandbox, contain, weaken

    settings = config.get("containment")
    if not settings:
        return
    sandbox = Sandbox(settings["mountpoint"], devices=tuple(settings.get("devices", ())), keep_fds=(pipe,))
    if settings.get("level") == "full":
        try:
            contain(sandbox)
            return
        except ContainmentUnavailable as exc:  # the probe said yes; something changed since
            log.error("this worker could not be contained (%s); it runs weakly contained", exc)
    weaken(sandbox)


def main(argv: list[str] | None = None) -> int:
    """``python -m fednb.party.zygote --control FD``: a zygote started where the party cannot fork."""
    parser = argparse.ArgumentParser(prog="python -m fednb.party.zygote")
    parser.add_argument("--control", type=int, required=True)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=os.dup(args.control))
    raw = control.recv(MAX_CONTROL)
    control.close()
    if not raw:
        return 0
    return zygote_main(args.control, json.loads(raw))

