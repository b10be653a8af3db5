"""The raw pyzmq anchor of ``bench/round_overhead.py``: N echo worker processes and one DEALER each.

One round sends the model's tensors (one frame per tensor, zero-copy) to every worker and
waits until all N echoes are back; nothing is decoded, checked or copied. Over ``tcp://``
each worker is a CURVE server behind a ZAP handler that admits only the coordinator's key,
the same shape as a fednb party. A worker is this file run with ``--_worker ENDPOINT``; it
stops when its stdin (the lifeline) closes.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    import zmq

SCRIPT = Path(__file__).resolve()
READY_TIMEOUT_S = 120.0


# -- raw pyzmq: the echo worker (its own process) -----------------------------------------


class _AllowOne:
    """ZAP credentials provider admitting exactly one client key, as fednb's allow-list does."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


def worker_main(endpoint: str, client_key: str | None) -> int:
    """Bind a ROUTER, say where on stdout, echo every message until stdin (the lifeline) closes."""
    import zmq

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    authenticator = None
    public = b""
    try:
        if client_key:
            from zmq.auth.thread import ThreadAuthenticator

            # the same shape as a fednb party: ZAP handler first, CURVE server, enforced domain
            authenticator = ThreadAuthenticator(context)
            authenticator.start()
            authenticator.configure_curve_callback("bench", credentials_provider=_AllowOne(client_key.encode()))
            public, secret = zmq.curve_keypair()
            router.curve_secretkey = secret
            router.curve_publickey = public
            router.curve_server = True
            router.zap_domain = b"bench"
            router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        router.bind(endpoint)
        ready = {"endpoint": router.getsockopt_string(zmq.LAST_ENDPOINT), "public_key": public.decode()}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        _echo(router, sys.stdin.fileno())
    finally:
        router.close(linger=0)
        if authenticator is not None:
            authenticator.stop()
        context.term()
    return 0


def _echo(router: zmq.Socket, lifeline: int) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(lifeline, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if lifeline in events and not os.read(lifeline, 4096):
            return  # the coordinator closed our stdin, or died: stop
        if router in events:
            while True:
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                # routing id first, then the payload frames, all resent without copying
                router.send_multipart(frames, copy=False)


# -- raw pyzmq: the coordinator side --------------------------------------------------------


def _read_line(stream: IO[bytes], deadline: float) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"a raw worker did not listen within {READY_TIMEOUT_S:.0f} s")
        readable, _, _ = select.select([stream], [], [], remaining)
        if readable:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                raise RuntimeError("a raw worker exited before it listened")
            line += chunk
    return line


@dataclass
class RawAnchor:
    """N echo worker processes and one DEALER per worker in this process."""

    parties: int
    tcp: bool
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dealers: list[zmq.Socket] = field(default_factory=list)
    ready_s: float = 0.0
    _directory: str = ""
    _context: zmq.Context | None = None
    _poller: zmq.Poller | None = None

    def start(self) -> None:
        import zmq

        self._directory = tempfile.mkdtemp(prefix="fednb-bench-")  # mode 0700, like fednb's simulation dir
        public, secret = zmq.curve_keypair() if self.tcp else (b"", b"")
        started = time.perf_counter()
        for index in range(self.parties):
            endpoint = "tcp://127.0.0.1:*" if self.tcp else f"ipc://{self._directory}/w{index}.sock"
            command = [sys.executable, str(SCRIPT), "--_worker", endpoint]
            if self.tcp:
                command += ["--_client-key", public.decode()]
            self.workers.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        deadline = time.monotonic() + READY_TIMEOUT_S
        listening = []
        for worker in self.workers:
            assert worker.stdout is not None
            listening.append(json.loads(_read_line(worker.stdout, deadline)))
        self.ready_s = time.perf_counter() - started
        self._context = zmq.Context()
        self._poller = zmq.Poller()
        for ready in listening:
            dealer = self._context.socket(zmq.DEALER)
            dealer.linger = 0
            if self.tcp:
                dealer.curve_secretkey = secret
                dealer.curve_publickey = public
                dealer.curve_serverkey = ready["public_key"].encode()
            dealer.connect(ready["endpoint"])
            self._poller.register(dealer, zmq.POLLIN)
            self.dealers.append(dealer)

    def rounds(self, frames: list[np.ndarray], count: int) -> list[float]:
        return [self._round(frames) for _ in range(count)]

    def _round(self, frames: list[np.ndarray]) -> float:
        import zmq

        assert self._poller is not None
        expected = sum(frame.nbytes for frame in frames)
        started = time.perf_counter()
        for dealer in self.dealers:
            dealer.send_multipart(frames, copy=False)
        pending = len(self.dealers)
        while pending:
            for sock, _ in self._poller.poll():
                while True:
                    try:
                        echo = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    # a cheap check that the whole model came back; no byte is touched
                    if sum(len(frame) for frame in echo) != expected:
                        raise RuntimeError("a raw worker echoed the wrong number of bytes")
                    pending -= 1
        return time.perf_counter() - started

    def close(self) -> None:
        """Close the sockets, then each worker's lifeline, then make sure by PID."""
        for dealer in self.dealers:
            dealer.close(linger=0)
        if self._context is not None:
            self._context.term()
        for worker in self.workers:
            if worker.stdin is not None:
                try:
                    worker.stdin.close()
                except OSError:
                    pass
        for worker in self.workers:
            try:
                worker.wait(timeout=3)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)


def raw_frames(model: torch.nn.Module) -> list[np.ndarray]:
    """The bytes fednb moves for ``model``: one float32 array per tensor of its state, as fednb sends them."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal(tensor.numel(), dtype=np.float32) for tensor in model.state_dict().values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one raw echo worker (started by RawAnchor)")
    parser.add_argument("--_worker", required=True, help=argparse.SUPPRESS)
    parser.add_argument("--_client-key", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return worker_main(args._worker, args._client_key)


if __name__ == "__main__":
    sys.exit(main())
