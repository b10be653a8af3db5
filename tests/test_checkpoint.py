"""Checkpoints: written each round, refused when corrupt or from another run, resumed after kill -9 of a coordinator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fednb
from fednb.federation import checkpoint as ckpt
from fednb.federation.history import PartyRound, RoundRecord
from tests.conftest import MLP, build, cli, kill_when


def sample(path) -> ckpt.Checkpoint:
    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float64)}
    record = RoundRecord(3, {"a": PartyRound(10, {"loss": 0.5}, 0.1)}, {"b": "timeout"}, {"loss": float("nan")},
                         {"accuracy": 0.9})
    checkpoint = ckpt.Checkpoint("ab" * 16, 1, 5, 3, {"source": "x"}, weights,
                                 {"steps": 3, "m": {"w": np.full((3, 4), 0.5)}, "v": np.zeros(2)}, [record])
    ckpt.save(path, checkpoint)
    return checkpoint


def test_a_checkpoint_round_trips_arrays_state_and_history(tmp_path) -> None:
    path = tmp_path / "run.ckpt"
    written = sample(path)
    read = ckpt.load(path)
    assert (read.run, read.first, read.last, read.round) == (written.run, 1, 5, 3)
    assert read.weights["w"].dtype == np.float32 and np.array_equal(read.weights["w"], written.weights["w"])
    assert read.strategy["steps"] == 3 and np.array_equal(read.strategy["m"]["w"], np.full((3, 4), 0.5))
    assert np.array_equal(read.strategy["v"], np.zeros(2))
    (record,) = read.history
    assert record.parties["a"].examples == 10 and record.dropped == {"b": "timeout"} and np.isnan(record.metrics["loss"])
    assert not [p for p in tmp_path.iterdir() if p.name != "run.ckpt"]  # the temporary file is gone


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "other"])
def test_a_corrupt_checkpoint_is_refused_whole(tmp_path, damage) -> None:
    path = tmp_path / "run.ckpt"
    sample(path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"PK\x03\x04 not a checkpoint at all")
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt|not a fednb checkpoint"):
        ckpt.load(path)


def test_a_changed_run_is_named_and_refused(tmp_path) -> None:
    path = tmp_path / "run.ckpt"
    saved = sample(path)
    with pytest.raises(ckpt.CheckpointError, match="the model source differ"):
        ckpt.check(saved, {"source": "y"}, path)


def test_resuming_in_process_continues_the_run_and_matches_an_uninterrupted_one(tmp_path) -> None:
    """Two rounds, then the same call with rounds=4 continues at round 3 (same run id, the parties accept it);
    the weights equal those of four rounds in one go, from the same seed, on the same parties."""
    path = tmp_path / "run.ckpt"
    options = {"lr": 0.05, "epochs": 1, "batch_size": 16, "seed": 3, "strategy": "fedavgm"}
    with fednb.simulate(2, dataset="digits", partition="iid", seed=0) as fed:
        model = build(seed=1)
        fed.train(model, MLP, rounds=2, checkpoint=path, **options)
        first = ckpt.load(path)
        assert first.round == 2 and len(first.history) == 2
        again = build(seed=7)  # a fresh model object, as after a kernel restart: the checkpoint's weights win
        fed.history.rounds.clear()
        history = fed.train(again, MLP, rounds=4, checkpoint=path, **options)
        assert [r.round for r in history] == [1, 2, 3, 4] and ckpt.load(path).run == first.run
        resumed = {k: v.detach().numpy().copy() for k, v in again.state_dict().items()}
        with pytest.raises(ckpt.CheckpointError, match="the model source differ"):
            fed.train(build(seed=1), MLP + "model.eval()\n", rounds=4, checkpoint=path, **options)
        with pytest.raises(ckpt.CheckpointError, match="the configuration differ"):
            fed.train(build(seed=1), MLP, rounds=4, checkpoint=path, **{**options, "lr": 0.1})
        straight = build(seed=1)
        fed.history.rounds.clear()
        fed.train(straight, MLP, rounds=4, checkpoint=tmp_path / "straight.ckpt", **options)
    for key, value in straight.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), resumed[key])


COORDINATOR = """
import sys, numpy as np, fednb
sys.path.insert(0, {root!r})
from tests.conftest import MLP, build
with fednb.connect({toml!r}, key={key!r}, timeout=30) as fed:
    model = build(seed=1)
    fed.train(model, MLP, rounds=5, lr=0.05, epochs=1, batch_size=16, seed=3, min_parties=2,
              checkpoint={checkpoint!r}, train_cell={cell!r})
    np.savez({out!r}, **{{k: v.detach().numpy() for k, v in model.state_dict().items()}})
"""
#: a plain training loop with a pause, so that the coordinator can be killed between rounds at a known place
CELL = ("import time, torch\ntime.sleep(0.3)\nopt = torch.optim.SGD(model.parameters(), lr=config['lr'])\n"
        "for x, y in train:\n    opt.zero_grad()\n    torch.nn.functional.cross_entropy(model(x), y).backward()\n"
        "    opt.step()\n")


def test_a_coordinator_killed_with_sigkill_resumes_from_its_checkpoint_over_tcp_and_curve(tmp_path, cli_parties,
                                                                                         digits_parts) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli("keys", "new", str(tmp_path / "coordinator"))
    key = cli("keys", "show", str(tmp_path / "coordinator")).stdout.strip()
    (tmp_path / "authorized_keys").write_text(f"{key} coordinator\n")
    lines = []
    for i in range(2):
        np.savez(tmp_path / f"p{i}.npz", x=digits_parts[i].x_train, y=digits_parts[i].y_train)
        cli("keys", "new", str(tmp_path / f"p{i}"))
        party = cli_parties("--name", f"p{i}", "--listen", "tcp://127.0.0.1:*", "--key", str(tmp_path / f"p{i}"),
                            "--authorized-keys", str(tmp_path / "authorized_keys"), "--data",
                            f"train={tmp_path / f'p{i}.npz'}", "--threads", "1", "--policy", "open",
                            "--dir", str(tmp_path / f"dir{i}"))
        lines.append(f'[[party]]\nname = "p{i}"\nendpoint = "{party.wait_listening()}"\npublic_key = "p{i}.key"\n')
    (tmp_path / "parties.toml").write_text("".join(lines))

    def coordinator(checkpoint: str, out: str) -> subprocess.Popen[str]:
        script = textwrap.dedent(COORDINATOR).format(root=root, toml=str(tmp_path / "parties.toml"),
                                                     key=str(tmp_path / "coordinator"), checkpoint=checkpoint,
                                                     out=out, cell=CELL)
        return subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    path = str(tmp_path / "run.ckpt")
    kill_when(coordinator(path, str(tmp_path / "never.npz")), lambda: os.path.exists(path) and ckpt.load(path).round >= 2)
    killed_at = ckpt.load(path).round
    assert 2 <= killed_at < 5
    started = time.monotonic()
    second = coordinator(path, str(tmp_path / "resumed.npz"))
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err
    resume_seconds = time.monotonic() - started
    done = ckpt.load(path)
    assert done.round == 5 and [r.round for r in done.history] == [1, 2, 3, 4, 5]
    straight = coordinator(str(tmp_path / "straight.ckpt"), str(tmp_path / "straight.npz"))
    out, err = straight.communicate(timeout=180)
    assert straight.returncode == 0, err
    resumed, reference = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "straight.npz")
    for name in reference.files:
        np.testing.assert_array_equal(resumed[name], reference[name])
    print(f"resumed at round {killed_at + 1} of 5; the resumed coordinator finished in {resume_seconds:.1f} s")


def test_dp_fedavg_checkpoints_the_wrapped_strategys_state_and_its_adaptive_clip(tmp_path) -> None:
    """DP-FedAvg wraps the strategy: its checkpoint carries the inner server momentum and the clip as
    adaptive clipping moved it, so a resumed run continues both."""
    from fednb.federation.privacy import PrivateStrategy
    from fednb.privacy.dpfedavg import DPFedAvg
    from fednb.strategies import FedAvgM

    dp = DPFedAvg(clip=1.0, noise_multiplier=1.0, adaptive=True, clipped_count_stddev=1.0)
    running = PrivateStrategy(FedAvgM(server_momentum=0.9), dp, 1.0)
    current = {"w": np.zeros(3, np.float32)}
    aggregation = running.inner.start_round(1, current)
    aggregation.add({"w": np.ones(3, np.float32)}, 10)
    aggregation.result()  # one momentum step: the velocity is no longer zero
    running.clip = 0.37
    path = tmp_path / "run.ckpt"
    ckpt.save(path, ckpt.Checkpoint("ab" * 16, 1, 5, 1, {"source": "x"}, current, running.state(), []))

    resumed = PrivateStrategy(FedAvgM(server_momentum=0.9), dp, 1.0)
    resumed.load_state(ckpt.load(path).strategy)
    assert resumed.clip == 0.37
    assert resumed.inner.state()["steps"] == running.inner.state()["steps"] == 1
    assert np.array_equal(resumed.inner.state()["velocity/w"], running.inner.state()["velocity/w"])
    with pytest.raises(ValueError, match="clip"):
        resumed.load_state({"dp.clip": -1.0})
