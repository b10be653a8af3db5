"""Contained execution that contains, across real parties: `fednb party` and simulate(contained=True).

Coordinator code in a worker cannot reach the network, cannot read the party's files, its
/proc entry or the home directory, cannot exhaust processes or disk, and sees only its own
file descriptors; training, evaluation and cells still work.
"""

from __future__ import annotations

import os
import socket

import pytest

import fednb
from fednb.errors import PartyError
from fednb.transport import write_keypair
from tests.conftest import MLP, build
from tests.test_serve import kernel  # noqa: F401 - the real ipykernel fixture


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that no contained cell may reach."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def reached(listener: socket.socket) -> bool:
    try:
        connection, _ = listener.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def errors(results) -> dict[str, PartyError]:
    assert not results.ok, f"a contained cell succeeded: {results.ok}"
    return results.errors


def check_contained(fed, listener: socket.socket, party_pid: int, files: list[str]) -> None:
    port = listener.getsockname()[1]
    connect = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
               "s.sendall(b'exfiltrated rows')\n'sent'")
    for error in errors(fed.run(connect)).values():
        assert "unreachable" in error.message.lower(), error
    assert not reached(listener)
    for error in errors(fed.run("import socket\nsocket.getaddrinfo('example.org', 443)")).values():
        assert error.error_type == "gaierror", error
    for path in [*files, f"/proc/{party_pid}/environ", os.path.expanduser("~/.bashrc"), "/etc/hostname"]:
        results = fed.run(f"open({path!r}, 'rb').read(1)")
        for error in errors(results).values():
            assert error.error_type in ("FileNotFoundError", "PermissionError"), (path, error)
    fds = fed.run("import os\nsorted(int(fd) for fd in os.listdir('/proc/self/fd'))")
    for value in fds.values():
        assert not isinstance(value, PartyError), value
        assert len(value) <= 5, value  # stdio, the worker's pipe, the listing itself
    bomb = ("import os, time\npids = []\ntry:\n    while len(pids) < 100000:\n        pid = os.fork()\n"
            "        if pid == 0:\n            time.sleep(30)\n            os._exit(0)\n        pids.append(pid)\n"
            "except OSError as exc:\n    stopped = len(pids)\nfor pid in pids:\n    os.kill(pid, 9)\nstopped\n")
    for value in fed.run(bomb, timeout=120).values():
        assert not isinstance(value, PartyError), value
        assert value < 1000
    fill = ("chunk = b'x' * (1 << 20)\nwritten = 0\ntry:\n    with open('/tmp/fill', 'wb') as handle:\n"
            "        while written < (8 << 30):\n            handle.write(chunk)\n            written += 1\n"
            "except OSError as exc:\n    stopped = exc.errno\nwritten\n")
    for value in fed.run(fill, timeout=120).values():
        assert not isinstance(value, PartyError), value
        assert value <= 512  # MiB: the file-size cap, long before the disk
    assert fed.run("1 + 1").ok == dict.fromkeys(fed.parties, 2)  # the party goes on serving


def test_a_contained_simulation_contains(listener):
    with fednb.simulate(2, dataset="digits", partition="iid", contained=True) as fed:
        assert {row.containment for row in fed.status()} == {"full"}
        host = fed.simulation  # type: ignore[attr-defined]
        check_contained(fed, listener, int(host.parties[0]["pid"]), [str(host.directory)])
        model = build()
        history = fed.train(model, MLP, rounds=2)
        assert history.metric("accuracy")[-1] > 0.5


def test_a_cli_party_contains_its_workers(cli_parties, tmp_path, listener, digits_parts):
    import numpy as np

    data = tmp_path / "train.npz"
    np.savez(data, x=digits_parts[0].x_train, y=digits_parts[0].y_train)
    party_key, coordinator_key = tmp_path / "party", tmp_path / "coordinator"
    party_pair, coordinator_pair = write_keypair(party_key), write_keypair(coordinator_key)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"{coordinator_pair.public.decode()} coordinator\n")
    directory = tmp_path / "clinic"
    party = cli_parties("--name", "clinic", "--listen", "tcp://127.0.0.1:0", "--key", str(party_key),
                        "--authorized-keys", str(authorized), "--data", f"train={data}", "--dir", str(directory),
                        "--policy", "open", "--threads", "1")
    endpoint = party.wait_listening()
    spec = [{"name": "clinic", "endpoint": endpoint, "public_key": party_pair.public}]
    with fednb.connect(spec, key=coordinator_key) as fed:
        assert fed.status()[0].containment == "full"
        files = [str(party_key) + "_secret", str(directory / "audit.jsonl"), str(directory / "approvals.json"),
                 str(directory), str(authorized)]
        check_contained(fed, listener, party.process.pid, files)


def test_fed_serve_in_a_real_kernel_contains_its_workers(kernel, tmp_path, private_dir, listener, digits_parts):
    import numpy as np

    from tests.test_serve import execute

    data = tmp_path / "clinic.npz"
    np.savez(data, x=digits_parts[1].x_train, y=digits_parts[1].y_train)
    directory = tmp_path / "clinic"
    endpoint = f"ipc://{private_dir}/clinic.sock"
    shown = execute(kernel, "\n".join([
        "%load_ext fednb",
        f"widget = %fed_serve --name clinic --listen {endpoint} --data train={data} --dir {directory} --policy open",
        "import os; print(os.getpid())",
    ]), timeout=120)
    kernel_pid = int([m["content"]["text"] for m in shown if m["msg_type"] == "stream"][-1].split()[-1])
    try:
        with fednb.connect([{"name": "clinic", "endpoint": endpoint}]) as fed:
            assert fed.status()[0].containment == "full"
            check_contained(fed, listener, kernel_pid, [str(directory), str(directory / "audit.jsonl")])
    finally:
        execute(kernel, "widget.server.stop()")


AFTER_TORCH = """
import logging, sys, tempfile
import torch
from fednb.party.sandbox import can_fork

assert can_fork(), "a fresh process may fork"
a = torch.randn(800, 800)
for _ in range(3):
    a @ a  # starts OpenMP's thread pool
if torch.get_num_threads() > 1:
    assert not can_fork(), "OpenMP's pool runs"
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

import fednb
from fednb.data import federated_split, load_dataset
from fednb.party.server import PartyServer
from tests.conftest import MLP, build, party_datasets

parts = federated_split(load_dataset("digits"), 2, "iid", seed=0)
with tempfile.TemporaryDirectory(prefix="fednb-t-") as directory:
    servers = [PartyServer(f"party-{i}", f"ipc://{directory}/p{i}.sock", party_datasets(parts[i]), policy="open",
                           heartbeat=0.2) for i in range(2)]
    try:
        for server in servers:
            server.start()
        specs = [{"name": s.name, "endpoint": s.endpoint} for s in servers]
        with fednb.connect(specs, heartbeat=0.2, heartbeat_timeout=5.0) as fed:
            history = fed.train(build(), MLP, rounds=1, evaluate_every=0, round_timeout=120)
            print("trained", len(history))
    finally:
        for server in servers:
            server.stop()
"""


def test_a_party_started_where_torch_already_ran_spawns_its_zygote_and_trains():
    """OpenMP's pool does not survive a fork (the child's first parallel operation waits forever):
    a party started in a process that already ran parallel torch work (a test session, a script)
    spawns its worker zygote instead of forking it, and its workers train."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", AFTER_TORCH], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained 1" in done.stdout
    assert "party party-0: worker zygote" in done.stdout and "(spawned)" in done.stdout, done.stdout[-3000:]
