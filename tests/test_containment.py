"""The worker's sandbox on its own: a forked child contained by fednb.party.containment."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fednb.party import containment, reach


@pytest.fixture
def mountpoint() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="fednb-root-")
    try:
        yield directory
    finally:
        os.rmdir(directory)


def in_sandbox(mountpoint: str, body: Callable[[], object], read_only: tuple[str, ...] = ()) -> object:
    """Run ``body`` in a contained child and return what it returned (JSON), or raise its error."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(reader)
            containment.contain(containment.Sandbox(mountpoint, read_only=read_only, keep_fds=(writer,)))
            value = {"value": body()}
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            value = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            os.write(writer, json.dumps(value).encode())
        finally:
            os._exit(code)
    os.close(writer)
    data = b""
    while chunk := os.read(reader, 65536):
        data += chunk
    os.close(reader)
    os.waitpid(pid, 0)
    result = json.loads(data)
    if "error" in result:
        raise AssertionError(result["error"])
    return result["value"]


def test_the_probe_finds_no_network_and_none_of_the_party(mountpoint, tmp_path):
    secret = tmp_path / "party.key_secret"
    secret.write_text("secret")
    home_file = os.path.expanduser("~/.bashrc")
    report = reach.probe(mountpoint, [str(secret), str(tmp_path), home_file, "/etc/hostname"])
    assert report.level == "full", report.reason
    assert report.checks["network"].startswith("blocked")
    assert report.checks["dns"].startswith("blocked")
    for path in (str(secret), str(tmp_path), home_file, "/etc/hostname"):
        assert report.checks[path].startswith("blocked"), (path, report.checks[path])
    assert all(check.startswith("blocked") for name, check in report.checks.items() if name.endswith("/environ"))
    # stdin, stdout, stderr, the probe's pipe and the listing's own directory handle
    assert len(report.checks["open file descriptors"].split(", ")) <= 5


def test_a_fork_bomb_and_a_disk_filling_write_are_stopped(mountpoint):
    def fork_bomb() -> str:
        children = []
        try:
            for _ in range(containment.MAX_PROCESSES * 2):
                pid = os.fork()
                if pid == 0:
                    time.sleep(5)
                    os._exit(0)
                children.append(pid)
        except OSError as exc:
            return f"stopped after {len(children)}: {exc.strerror}"
        return f"forked {len(children)}"

    outcome = in_sandbox(mountpoint, fork_bomb)
    assert isinstance(outcome, str) and outcome.startswith("stopped after"), outcome

    def fill_disk() -> str:
        chunk = b"x" * (1 << 20)
        written = 0
        try:
            with open("/tmp/fill", "wb") as handle:
                while written < 4 * containment.MAX_FILE_BYTES:
                    handle.write(chunk)
                    written += len(chunk)
        except OSError as exc:
            return f"stopped after {written >> 20} MiB: {exc.strerror}"
        return f"wrote {written >> 20} MiB"

    outcome = in_sandbox(mountpoint, fill_disk)
    assert isinstance(outcome, str) and outcome.startswith("stopped after"), outcome


def test_the_python_environment_works_inside(mountpoint):
    def compute() -> float:
        import numpy as np
        import torch

        return float(torch.from_numpy(np.arange(4.0)).sum())

    assert in_sandbox(mountpoint, compute) == 6.0


def test_where_namespaces_are_refused_the_party_says_so_and_review_refuses_to_start(mountpoint, monkeypatch, caplog):
    import fednb.party.reach as reach_module
    from fednb.errors import GateError

    def refused(sandbox: containment.Sandbox) -> None:
        raise containment.ContainmentUnavailable(1, "unshare: Operation not permitted")

    monkeypatch.setattr(reach_module, "contain", refused)  # the probe's child inherits this
    report = reach.probe(mountpoint, [])
    assert report.level == "weak" and "Operation not permitted" in report.reason
    assert report.checks["network"].startswith("REACHED")  # said plainly, not hidden
    with pytest.raises(GateError, match="--allow-weak-containment"):
        reach.check_start("clinic", "review", report, allow_weak=False)
    with pytest.raises(GateError, match="policy allowlist"):
        reach.check_start("clinic", "allowlist", report, allow_weak=False)
    with caplog.at_level("WARNING"):
        reach.check_start("clinic", "review", report, allow_weak=True)
        reach.check_start("clinic", "open", report, allow_weak=False)
    assert [r.getMessage().count("WEAKLY") for r in caplog.records] == [1, 1]


def test_check_containment_from_the_command_line(tmp_path):
    from tests.conftest import cli

    (tmp_path / "clinic").mkdir()
    done = cli("party", "--check-containment", "--dir", str(tmp_path / "clinic"))
    lines = done.stdout.splitlines()
    assert lines[0] == "containment: full"
    checked = dict(line.split(None, 1) for line in lines[1:])
    assert checked["network"].startswith("blocked") and checked[str(tmp_path / "clinic")].startswith("blocked")


def test_a_python_installation_under_tmp_stays_visible_beside_the_private_tmp(mountpoint):
    """A fresh clone's virtual environment may live under /tmp: the worker's private /tmp must
    not hide it (it is bound inside), and the worker still writes only to its own /tmp."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="fednb-venv-") as venv:
        os.chmod(venv, 0o755)  # as a virtual environment is
        Path(venv, "module.py").write_text("VALUE = 7\n")

        def read() -> list[object]:
            text = Path(venv, "module.py").read_text()
            Path("/tmp/mine").write_text("x")
            try:
                Path(venv, "written").write_text("x")
                wrote = True
            except OSError:
                wrote = False
            return [text, wrote, sorted(os.listdir("/tmp"))]

        text, wrote, listing = in_sandbox(mountpoint, read, read_only=(venv,))
        assert text == "VALUE = 7\n" and wrote is False
        assert "mine" in listing and not Path(venv, "written").exists()



def test_the_empty_mount_points_of_killed_parties_are_swept_and_live_ones_kept(tmp_path, monkeypatch) -> None:
    import subprocess
    import tempfile

    from fednb.party.sandbox import MOUNTPOINT, sweep_mountpoints

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID that no longer runs (a party killed with SIGKILL)
    dead = tmp_path / f"{MOUNTPOINT}{gone.pid}-abc"
    alive = tmp_path / f"{MOUNTPOINT}{os.getpid()}-def"
    busy = tmp_path / f"{MOUNTPOINT}{gone.pid}-ghi"
    for path in (dead, alive, busy):
        path.mkdir()
    (busy / "left").write_text("x")
    sweep_mountpoints()
    assert not dead.exists() and alive.exists() and busy.exists()
