"""A vertical party's part survives the party's own restart: hetero LR and SecureBoost stopped after a checkpoint,
both `fednb party` processes killed with SIGKILL and started again on their directories, and the resumed runs end
as uninterrupted ones; what a party keeps never travels, its file is private, and a corrupt one refuses the resume."""

from __future__ import annotations

import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import fednb
from fednb.errors import FederationError
from fednb.federation import checkpoint as hckpt
from fednb.federation.events import VerticalProgress
from fednb.party.directory import open_directory
from fednb.party.inprocess import InProcess
from fednb.party.keep import Keep, Kept, coordinator_key
from fednb.party.keep_vertical import KeptParts
from fednb.party.vertical_egress import Blocked, VerticalGuard
from fednb.vertical import checkpoint as vckpt
from fednb.vertical.parts import PACKED
from fednb.wire import Message
from tests.test_vertical_parties import FATE, approve, parties, tables  # noqa: F401 - the parties fixture

pytestmark = pytest.mark.skipif(not FATE.is_dir(), reason=f"FATE's tables are not at {FATE}")
RUN = "ab" * 16
LR = {"epochs": 3, "lr": 0.05, "batch_size": 128, "l2": 0.01, "optimizer": "rmsprop", "key_bits": 1024}
SB = {"trees": 3, "depth": 2, "bins": 8, "min_child_weight": 1e-3, "key_bits": 1024}


# -- what a party keeps never travels, and is private --------------------------------------------------------

def test_kept_parts_are_refused_on_the_way_in_blocked_on_the_way_out_and_written_0600_in_0700(tmp_path) -> None:
    guest, _host = tables("breast")
    runner = KeptParts(InProcess("bank", guest), Keep(None))
    start = {"run": RUN, "step": "lr.start", "request": {"model": "m", "training": RUN, "resume": 2}}
    smuggled = Message("vertical", start, arrays={PACKED: np.zeros(8, np.uint8)})
    refused = runner.run("coordinator", smuggled)  # refused before any worker sees it
    assert refused.type == "error" and "may not carry keep/ arrays" in refused.content["message"]
    assert runner.run("coordinator", Message("run", {"source": "1"}, arrays={"keep/x": np.zeros(1)})).type == "error"

    guard = VerticalGuard(rows=10, columns=2)
    for step, arrays in (("lr.finish", {}), ("psi.keep", {"keep.partner": np.arange(3, dtype=np.int64)})):
        request = Message("vertical", {"run": RUN, "step": step, "request": {"model": "m", "epoch": 0}})
        answer = {"size": 3} if step == "psi.keep" else {}
        guard.reply(request, request.reply("result", {"vertical": answer}, arrays))  # as the step returns it
        with pytest.raises(Blocked, match="never leaves it"):
            guard.reply(request, request.reply("result", {"vertical": answer},
                                               {**arrays, PACKED: np.zeros(8, np.uint8)}))

    (tmp_path / "keep").mkdir(mode=0o755)  # a keep directory left open is closed before a key is written into it
    os.chmod(tmp_path / "keep", 0o755)
    keep = Keep(tmp_path)
    keep.put("coordinator", "vertical", Kept({"runs": [RUN]}, {RUN: np.arange(5, dtype=np.uint8)}))
    path = keep.path("coordinator", "vertical")
    assert path == tmp_path / "keep" / coordinator_key("coordinator") / "vertical.bundle"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [stat.S_IMODE(d.stat().st_mode) for d in (path.parent, path.parent.parent)] == [0o700, 0o700]


def test_a_simulation_keeps_parts_in_memory_and_no_reply_carries_them(parties, monkeypatch) -> None:
    """Parties without directories and without the egress guard (a simulation, kernels in process): the parts are
    taken out of every reply all the same, and kept in each party process's memory."""
    from fednb.vertical import federation as vfederation

    names: set[str] = set()
    per_party = vfederation.Vertical._per_party

    def recording(self, step, requests, arrays=None):
        replies = per_party(self, step, requests, arrays)
        names.update(name for reply in replies.values() for name in reply.arrays)
        return replies

    monkeypatch.setattr(vfederation.Vertical, "_per_party", recording)
    with parties("breast", policy="simulation", contained=False) as fed:
        vfl = fed.vertical(id_column="id", label_party="bank")
        vfl.train_logistic(epochs=1, encrypted=False)
        vfl.train_boosting(trees=1, depth=2, bins=8, encrypted=False)
        for server in parties.started:  # type: ignore[attr-defined]
            runner = server.admission.runner
            assert isinstance(runner, KeptParts) and runner.keep.directory is None
            kept = runner.keep.get("local", "vertical")
            assert kept is not None and len(kept.content["runs"]) == 2  # the LR run's and the boosting run's
    assert names and not any(name.startswith("keep/") for name in names), names


# -- across real party processes -------------------------------------------------------------------------------

class _Party:
    """A `fednb party` process whose log goes to a file (a long run would fill a pipe); stopped by PID."""

    def __init__(self, name: str, sockets: Path, directory: Path, *data: str) -> None:
        self.endpoint = f"ipc://{sockets}/{name}.sock"
        self.log = open(directory.parent / f"{name}.stderr", "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fednb.cli", "--log-level", "WARNING", "party", "--name", name, "--listen",
             self.endpoint, *data, "--id-column", "id", "--policy", "review", "--dir", str(directory),
             "--allow-weak-containment", "--threads", "1", "--heartbeat", "0.5", "--timeout", "10"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)

    def wait_listening(self, timeout: float = 60.0) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the party exited with {self.process.returncode}"
            if select.select([self.process.stdout], [], [], 0.5)[0] and re.search(
                    r"listening on", self.process.stdout.readline()):
                return
        raise AssertionError("the party did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def test_both_parties_killed_and_restarted_resume_lr_and_secureboost_as_uninterrupted_runs(tmp_path) -> None:
    """Hetero LR stopped after epoch 1 of 3 and SecureBoost after tree 1 of 3, both checkpointed; SIGKILL of both
    guarded, sandboxed parties; restarted on their directories, they hand their workers the parts they kept, and the
    resumed runs equal runs never stopped. A corrupt kept file then refuses the resume, naming the party, which
    serves on."""
    dirs = {name: tmp_path / name for name in ("bank", "partner")}
    data = {"bank": ("--data", f"train={FATE / 'breast_hetero_mini_guest.csv'}", "--label", "y"),
            "partner": ("--data", f"train={FATE / 'breast_hetero_mini_host.csv'}")}
    for directory in dirs.values():
        open_directory(directory, create=True)
        approve(directory, "setup", "lr.start", "sb.start")
    started: list[_Party] = []
    running: dict[str, _Party] = {}
    lr, sb = tmp_path / "lr.ckpt", tmp_path / "sb.ckpt"

    def stop_at(stage: str, count: int):
        def interrupt(event) -> None:
            if isinstance(event, VerticalProgress) and event.stage == stage and \
                    (event.epoch if stage == "epoch" else event.tree) == count:
                raise KeyboardInterrupt
        return interrupt

    with tempfile.TemporaryDirectory(prefix="fednb-r-") as sockets:
        def start(*names: str):
            for name in names:
                running[name] = _Party(name, Path(sockets), dirs[name], *data[name])
                started.append(running[name])
            for name in names:
                running[name].wait_listening()
            return fednb.connect([{"name": n, "endpoint": running[n].endpoint} for n in ("bank", "partner")],
                                 heartbeat=0.5, heartbeat_timeout=5.0)

        def kill(*names: str) -> None:
            for name in names:
                running.pop(name).stop(signal.SIGKILL)  # nothing is written on the way out

        try:
            with start("bank", "partner") as fed:
                vfl = fed.vertical(id_column="id", label_party="bank")
                vfl.split(0.2, seed=0)
                for train, options, path, stage in ((vfl.train_logistic, LR, lr, "epoch"),
                                                    (vfl.train_boosting, SB, sb, "tree")):
                    detach = fed.subscribe(stop_at(stage, 1))
                    with pytest.raises(KeyboardInterrupt):
                        train(**options, checkpoint=path)
                    detach()
                    assert vckpt.load(path).done == 1
            kill("bank", "partner")
            kept = {name: d / "keep" / coordinator_key("local") / "vertical.bundle" for name, d in dirs.items()}
            for path in kept.values():  # the label party's holds its SecureBoost key
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

            with start("bank", "partner") as fed:  # fresh processes: no session holds the runs
                vfl = fed.vertical(id_column="id", label_party="bank")
                vfl.split(0.2, seed=0)
                resumed = vfl.train_logistic(**LR, checkpoint=lr)
                assert vckpt.load(lr).done == LR["epochs"] and len(resumed.losses) == LR["epochs"]
                straight = vfl.train_logistic(**LR)
                np.testing.assert_array_equal(vfl.predict(resumed), vfl.predict(straight))
                assert resumed.losses == straight.losses
                trees: list[int] = []
                detach = fed.subscribe(lambda e: trees.append(e.tree) if getattr(e, "stage", "") == "tree" else None)
                boosted = vfl.train_boosting(**SB, checkpoint=sb)
                detach()
                assert trees == [2, 3]  # the first tree came from the parts the parties kept
                again = vfl.train_boosting(**SB)
                np.testing.assert_array_equal(vfl.predict(boosted), vfl.predict(again))
                assert vfl.evaluate(boosted) == vfl.evaluate(again)
                assert vfl.importance(boosted) == vfl.importance(again)
            kill("partner")
            kept["partner"].write_bytes(b"\x00" * 40)

            with start("partner") as fed:
                vfl = fed.vertical(id_column="id", label_party="bank")
                vfl.split(0.2, seed=0)
                with pytest.raises(FederationError, match="partner: .*may not carry keep/ arrays"):  # over the wire
                    vfl._step("lr.start", ["partner"], {"model": "m", "config": {}, "training": RUN, "resume": 1},
                              arrays={"partner": {PACKED: np.zeros(8, np.uint8)}})
                with pytest.raises(hckpt.CheckpointError, match="partner: .*cannot read the parts of vertical runs "
                                                                "it keeps"):
                    vfl.train_logistic(**LR, checkpoint=lr)
                assert len(vfl.train_logistic(**{**LR, "epochs": 1}).losses) == 1  # the party serves on
            assert f"{kept['partner']} cannot be read" in (dirs["partner"] / "party.log").read_text()
        finally:
            for party in started:
                party.stop()
