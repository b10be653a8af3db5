"""SCAFFOLD (Karimireddy et al., ICML 2020): the server update and the party's option II against closed
forms, the wire and the egress guard's rules for control variates, the party's keep, and real parties:
a federated run, a corrupt keep file, and a party's c_i across a SIGKILL and a restart."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import fednb
from fednb.errors import RoundError, WireError
from fednb.federation import checkpoint as ckpt
from fednb.party import Datasets, Split
from fednb.party.egress import EgressBlocked, Guard
from fednb.party.keep import Keep, KeepError, Kept, coordinator_key
from fednb.party.kernel import Kernel
from fednb.strategies import Scaffold, get_strategy, summable
from fednb.strategies.scaffold import effective_steps, party_variate, server_step
from fednb.wire import Message, check_content
from tests.conftest import MLP, build

RUN = "5caf" * 8
LINE = "import torch.nn as nn\nmodel = nn.Linear(1, 1, bias=False)\n"

#: a custom local loop: plain SGD with the correction added by hand; reports what it was handed
CELL = """
opt = torch.optim.SGD(model.parameters(), lr=config['lr'])
for x, y in train:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        p.grad += scaffold_c[name] - scaffold_ci[name]
    opt.step()
report(ci=float(sum(v.abs().sum() for v in scaffold_ci.values())),
       gap=float(max((scaffold_c[n] - scaffold_ci[n]).abs().max() for n in scaffold_c)))
"""


# -- the coordinator's arithmetic ------------------------------------------------------------------------------

def test_the_server_update_is_algorithm_1s_in_closed_form() -> None:
    x = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(4, np.int64)}
    s = Scaffold(server_lr=0.5)
    s.configure_run(4)
    content, arrays = s.train_request(1, x)
    assert content == {"scaffold": True} and set(arrays) == {"scaffold.c/w"}  # integers have no variate
    np.testing.assert_array_equal(arrays["scaffold.c/w"], [0.0, 0.0])
    assert arrays["scaffold.c/w"].dtype == np.float32
    round1 = s.start_round(1, x)
    round1.add({"w": np.array([3.0, 2.0], np.float32), "n": np.array(4), "scaffold.dc/w": np.array([1.0, -2.0],
                                                                                                   np.float32)}, 10)
    round1.add({"w": np.array([1.0, 6.0], np.float32), "n": np.array(6), "scaffold.dc/w": np.array([3.0, 2.0],
                                                                                                   np.float32)}, 30)
    new = round1.result()
    # x + η_g · (mean y − x), a plain mean (10 and 30 examples weigh alike): [1, 2] + 0.5 · ([2, 4] − [1, 2])
    np.testing.assert_array_equal(new["w"], [1.5, 3.0])
    assert new["w"].dtype == np.float32 and int(new["n"]) == 5
    # c + (|S| / N) · mean Δc = 0 + (2 / 4) · [2, 0]
    np.testing.assert_array_equal(s.c["w"], [1.0, 0.0])
    assert round1.result()["w"].tolist() == [1.5, 3.0] and s.c["w"].tolist() == [1.0, 0.0]  # the step ran once
    _, arrays = s.train_request(2, new)
    np.testing.assert_array_equal(arrays["scaffold.c/w"], [1.0, 0.0])
    round2 = s.start_round(2, new)
    round2.add({"w": new["w"], "n": new["n"], "scaffold.dc/w": np.array([-4.0, 8.0], np.float32)}, 1)
    round2.result()
    np.testing.assert_array_equal(s.c["w"], [0.0, 2.0])  # [1, 0] + (1 / 4) · [−4, 8]
    assert s.steps == 2


def test_the_pure_functions_match_their_closed_forms() -> None:
    assert effective_steps(3) == 3.0 and effective_steps(0, 0.9) == 0.0
    assert effective_steps(3, 0.5) == pytest.approx(1 + 1.5 + 1.75)  # Σ (1 − β^k) / (1 − β)
    ci, c, x, y = (np.array([v], np.float32) for v in (1.0, 3.0, 2.0, 0.5))
    np.testing.assert_allclose(party_variate(ci, c, x, y, 0.5), [1 - 3 + (2 - 0.5) / 0.5])
    np.testing.assert_array_equal(party_variate(ci, c, x, y, 0.0), ci)  # no step: c_i stays
    new_x, new_c = server_step({"w": np.array([2.0])}, {"w": np.array([4.0])}, {"w": np.array([1.0])},
                               {"w": np.array([6.0])}, server_lr=2.0, sampled=1, parties=3)
    assert new_x["w"].tolist() == [6.0] and new_c["w"].tolist() == [3.0]
    with pytest.raises(ValueError, match="sampled"):
        server_step({}, {}, {}, {}, server_lr=1.0, sampled=4, parties=3)


def test_the_strategy_refuses_what_it_cannot_use() -> None:
    x = {"w": np.zeros(2, np.float32)}
    s = Scaffold()
    with pytest.raises(ValueError, match="number of parties"):
        s.train_request(1, x)
    s.configure_run(1)
    with pytest.raises(ValueError, match="only the plain train round"):  # e.g. under secure aggregation
        s.start_round(1, x)
    s.train_request(1, x)
    aggregation = s.start_round(1, x)
    with pytest.raises(ValueError, match="Δc_i"):
        aggregation.add({"w": np.ones(2, np.float32)}, 5)
    with pytest.raises(ValueError, match="shape"):
        aggregation.add({"w": np.ones(2, np.float32), "scaffold.dc/w": np.ones(3, np.float32)}, 5)
    with pytest.raises(ValueError, match="non-finite"):
        aggregation.add({"w": np.ones(2, np.float32), "scaffold.dc/w": np.array([np.nan, 0], np.float32)}, 5)
    aggregation.add({"w": np.ones(2, np.float32), "scaffold.dc/w": np.ones(2, np.float32)}, 5)
    with pytest.raises(ValueError, match="more replies than the round's 1 parties"):
        aggregation.add({"w": np.ones(2, np.float32), "scaffold.dc/w": np.ones(2, np.float32)}, 5)
    with pytest.raises(ValueError, match="server_lr"):
        Scaffold(server_lr=0)
    assert "scaffold" not in summable() and Scaffold.plain_rounds_only
    assert get_strategy("scaffold", server_lr=0.5, mu=None).server_lr == 0.5
    with pytest.raises(ValueError, match="does not take mu"):
        get_strategy("scaffold", mu=0.1)


def test_a_checkpoint_carries_c(tmp_path) -> None:
    x = {"w": np.array([1.0, 2.0], np.float32)}
    s = Scaffold()
    s.configure_run(2)
    s.train_request(1, x)
    aggregation = s.start_round(1, x)
    aggregation.add({"w": x["w"], "scaffold.dc/w": np.array([0.25, -1.0], np.float32)}, 3)
    aggregation.result()
    path = tmp_path / "run.ckpt"
    ckpt.save(path, ckpt.Checkpoint(RUN, 1, 5, 1, {"source": "x"}, x, s.state(), []))
    resumed = Scaffold()
    resumed.configure_run(2)  # as train() does: the run is planned (c = 0), then its checkpoint loaded
    resumed.load_state(ckpt.load(path).strategy)
    np.testing.assert_array_equal(resumed.c["w"], [0.125, -0.5])
    assert resumed.steps == 1
    _, arrays = resumed.train_request(2, x)  # the resumed run sends the c it had
    np.testing.assert_array_equal(arrays["scaffold.c/w"], [0.125, -0.5])
    with pytest.raises(ValueError, match="finite"):
        resumed.load_state({"c/w": np.array([np.inf]), "steps": 1})


def test_the_magic_takes_scaffold_and_its_server_rate() -> None:
    from fednb.notebook.arguments import parse, strategy_options
    from fednb.notebook.magics import FedMagics

    args = parse(FedMagics.fed_train, "--strategy scaffold --server-lr 0.5")
    assert get_strategy(args.strategy, **strategy_options(args)).server_lr == 0.5


# -- the party's option II -------------------------------------------------------------------------------------

def _line_party() -> tuple[Kernel, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1)).astype(np.float32)
    y = (3.0 * x[:, 0] + rng.normal(scale=0.1, size=8)).astype(np.float32)
    return Kernel("p", Datasets({"train": Split(x, y), "test": Split(x, y)})), x, y


def _request(*, w0: float, c: float, ci: float, epochs: int, lr: float, momentum: float = 0.0,
             cell: str | None = None, **content) -> Message:
    config = {"lr": lr, "epochs": epochs, "batch_size": 8, "momentum": momentum, "loss": "mse", "seed": 0}
    arrays = {"weight": np.array([[w0]], np.float32), "scaffold.c/weight": np.array([[c]], np.float32),
              "scaffold.ci/weight": np.array([[ci]], np.float32)}
    return Message("train", {"source": LINE, "config": config, "run": RUN, "scaffold": True, "train_cell": cell,
                             **content}, round=1, arrays=arrays)


def _by_hand(x: np.ndarray, y: np.ndarray, *, w0: float, c: float, ci: float, epochs: int, lr: float,
             momentum: float = 0.0) -> tuple[float, float]:
    """K full-batch steps of (momentum) SGD on the mean squared error with the correction c − c_i, then option II."""
    w, buf = float(w0), 0.0
    x64, y64 = x[:, 0].astype(np.float64), y.astype(np.float64)
    for k in range(epochs):
        g = 2.0 * np.mean(x64 * (w * x64 - y64)) + (c - ci)
        buf = g if k == 0 else momentum * buf + g
        w -= lr * (buf if momentum else g)
    steps = sum((1 - momentum ** k) / (1 - momentum) if momentum else 1.0 for k in range(1, epochs + 1))
    return w, ci - c + (w0 - w) / (lr * steps)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_built_in_loop_corrects_every_step_and_computes_option_ii(momentum: float) -> None:
    kernel, x, y = _line_party()
    settings = {"w0": 0.5, "c": 0.8, "ci": -0.3, "epochs": 4, "lr": 0.1, "momentum": momentum}
    reply = kernel.handle("coordinator", _request(**settings))
    assert reply.type == "result", reply.content
    w, ci_new = _by_hand(x, y, **settings)
    assert set(reply.arrays) == {"weight", "scaffold.dc/weight", "scaffold.ci/weight"}
    np.testing.assert_allclose(reply.arrays["weight"], [[w]], rtol=1e-5)
    np.testing.assert_allclose(reply.arrays["scaffold.ci/weight"], [[ci_new]], rtol=1e-4)
    np.testing.assert_allclose(reply.arrays["scaffold.dc/weight"], [[ci_new - settings["ci"]]], rtol=1e-4)
    assert reply.arrays["scaffold.dc/weight"].dtype == np.float32


def test_a_custom_cell_gets_the_variates_and_may_set_its_own() -> None:
    kernel, x, y = _line_party()
    settings = {"w0": 0.5, "c": 0.8, "ci": -0.3, "epochs": 1, "lr": 0.1}
    cell = ("opt = torch.optim.SGD(model.parameters(), lr=config['lr'])\n"
            "for _ in range(3):\n"
            "    for xb, yb in train:\n"
            "        opt.zero_grad(); F.mse_loss(model(xb).squeeze(1), yb).backward()\n"
            "        for name, p in model.named_parameters():\n"
            "            p.grad += scaffold_c[name] - scaffold_ci[name]\n"
            "        opt.step()\n")
    reply = kernel.handle("coordinator", _request(**settings, cell=cell))
    assert reply.type == "result", reply.content
    w, ci_new = _by_hand(x, y, **{**settings, "epochs": 3})  # the party counted the cell's three SGD steps
    np.testing.assert_allclose(reply.arrays["weight"], [[w]], rtol=1e-5)
    np.testing.assert_allclose(reply.arrays["scaffold.ci/weight"], [[ci_new]], rtol=1e-4)
    assert "scaffold_c" not in kernel.session("coordinator").namespace  # gone once the cell ran

    chosen = kernel.handle("coordinator", _request(**settings, cell="scaffold_ci_new = {n: torch.full_like(v, 7.0) "
                                                                      "for n, v in scaffold_ci.items()}"))
    assert chosen.arrays["scaffold.ci/weight"].tolist() == [[7.0]]
    np.testing.assert_allclose(chosen.arrays["scaffold.dc/weight"], [[7.3]], rtol=1e-6)  # 7 − (−0.3)

    adam = ("opt = torch.optim.Adam(model.parameters())\nfor xb, yb in train:\n"
            "    opt.zero_grad(); F.mse_loss(model(xb).squeeze(1), yb).backward(); opt.step()\n")
    refused = kernel.handle("coordinator", _request(**settings, cell=adam))
    assert refused.type == "error" and "set scaffold_ci_new" in refused.content["message"]
    wrong = kernel.handle("coordinator", _request(**settings, cell="scaffold_ci_new = {'bias': torch.zeros(1)}"))
    assert wrong.type == "error" and "one for each trainable parameter" in wrong.content["message"]


def test_the_kernel_accepts_variates_only_when_scaffold_is_asked() -> None:
    kernel, _, _ = _line_party()
    settings = {"w0": 0.5, "c": 0.8, "ci": -0.3, "epochs": 1, "lr": 0.1}
    cases = {
        "not asked": (_request(**settings, scaffold=False), "does not ask for SCAFFOLD"),
        "under DP": (_request(**settings, dp={"kind": "dpsgd"}), "secure aggregation or DP"),
        "with Adam": (_request(**settings, config={"optimizer": "adam", "loss": "mse", "batch_size": 8}),
                      "optimizer='sgd'"),
    }
    odd = _request(**settings)
    cases["a c of another shape"] = (Message("train", odd.content, round=1, arrays={
        **odd.arrays, "scaffold.c/weight": np.zeros((1, 2), np.float32)}), "does not fit the model")
    cases["an unknown variate"] = (Message("train", odd.content, round=1, arrays={
        **odd.arrays, "scaffold.x/weight": np.zeros((1, 1), np.float32)}), "unexpected tensor")
    for name, (request, why) in cases.items():
        reply = kernel.handle("coordinator", request)
        assert reply.type == "error" and why in reply.content["message"], (name, reply.content)


# -- the wire and the egress guard -----------------------------------------------------------------------------

def test_the_wire_takes_a_scaffold_flag() -> None:
    content = {"source": "x", "config": {}, "run": RUN}
    assert check_content(Message("train", {**content, "scaffold": True}, round=1))
    with pytest.raises(WireError, match="scaffold"):
        check_content(Message("train", {**content, "scaffold": "yes"}, round=1))


def test_the_egress_guard_lets_dc_out_only_when_asked_and_ci_never() -> None:
    datasets = Datasets({"train": Split(np.zeros((8, 1), np.float32), np.zeros(8, np.float32))})
    guard = Guard("p", datasets)
    w, c = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    content = {"source": LINE, "config": {}, "run": RUN}
    asked = Message("train", {**content, "scaffold": True}, round=1, arrays={"weight": w, "scaffold.c/weight": c})
    plain = Message("train", content, round=1, arrays={"weight": w})

    def reply(request: Message, arrays: dict) -> Message:
        return request.reply("result", {"examples": 4, "metrics": {}}, arrays)

    out, _ = guard.reply(asked, reply(asked, {"weight": w, "scaffold.dc/weight": c + 0.5}))
    assert set(out.arrays) == {"weight", "scaffold.dc/weight"}
    blocked = {
        "Δc not asked for": (plain, {"weight": w, "scaffold.dc/weight": c}, "asked for SCAFFOLD"),
        "c_i": (asked, {"weight": w, "scaffold.dc/weight": c, "scaffold.ci/weight": c}, "never leaves"),
        "no Δc": (asked, {"weight": w}, "missing tensor 'scaffold.dc/weight'"),
        "Δc of another shape": (asked, {"weight": w, "scaffold.dc/weight": np.zeros(2, np.float32)}, "shape"),
        "Δc not finite": (asked, {"weight": w, "scaffold.dc/weight": c + np.inf}, "non-finite"),
    }
    for name, (request, arrays, why) in blocked.items():
        with pytest.raises(EgressBlocked, match=why):
            guard.reply(request, reply(request, arrays))
    odd = Message("train", asked.content, round=1, arrays={"weight": w, "scaffold.c/other": c})
    with pytest.raises(EgressBlocked, match="one per float tensor"):
        guard.reply(odd, reply(odd, {"weight": w, "scaffold.dc/other": c}))


# -- the party's keep -----------------------------------------------------------------------------------------

def test_the_keep_writes_reads_back_and_names_a_corrupt_file(tmp_path) -> None:
    keep = Keep(tmp_path)
    kept = Kept({"run": RUN, "round": 3}, {"after/w": np.arange(3, dtype=np.float32)})
    keep.put("coordinator-key", "scaffold", kept)
    path = tmp_path / "keep" / coordinator_key("coordinator-key") / "scaffold.bundle"
    assert keep.path("coordinator-key", "scaffold") == path and path.exists()
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    again = Keep(tmp_path).get("coordinator-key", "scaffold")  # a restarted party reads it back
    assert again is not None and again.content == {"run": RUN, "round": 3}
    np.testing.assert_array_equal(again.arrays["after/w"], [0, 1, 2])
    assert Keep(tmp_path).get("another-key", "scaffold") is None
    assert Keep(None).get("coordinator-key", "scaffold") is None
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(KeepError, match="cannot be read"):
        Keep(tmp_path).get("coordinator-key", "scaffold")
    other = tmp_path / "other"
    other.mkdir()
    Keep(other).put("someone-else", "scaffold", kept)  # a file moved under another coordinator's name
    moved = other / "keep" / coordinator_key("coordinator-key") / "scaffold.bundle"
    moved.parent.mkdir(mode=0o700)
    (other / "keep" / coordinator_key("someone-else") / "scaffold.bundle").rename(moved)
    with pytest.raises(KeepError, match="not the scaffold kept for this coordinator"):
        Keep(other).get("coordinator-key", "scaffold")
    with pytest.raises(ValueError, match="name"):
        keep.path("coordinator-key", "../x")


# -- real parties ------------------------------------------------------------------------------------------------

def test_a_small_federated_run_trains_and_each_partys_ci_moves() -> None:
    with fednb.simulate(3, dataset="digits", partition="dirichlet", alpha=0.3, seed=0) as fed:
        strategy = Scaffold()
        history = fed.train(build(seed=1), MLP, rounds=3, strategy=strategy, lr=0.05, momentum=0.0)
        accuracy = [record.evaluation["accuracy"] for record in history]
        assert accuracy[-1] > max(0.3, accuracy[0]), accuracy
        assert strategy.steps == 3 and all(np.abs(c).sum() > 0 for c in strategy.c.values())

        fed.history.rounds.clear()  # a new run: every c_i starts from zeros again, and moves after one round
        history = fed.train(build(seed=1), MLP, rounds=2, strategy="scaffold", train_cell=CELL, evaluate_every=0)
        first, second = history[0].parties, history[1].parties
        assert len(first) == len(second) == 3
        assert all(p.metrics["ci"] == 0.0 and p.metrics["gap"] == 0.0 for p in first.values())  # c = c_i = 0
        assert all(p.metrics["ci"] > 0.0 and p.metrics["gap"] > 0.0 for p in second.values())

        sampled = Scaffold()
        fed.history.rounds.clear()
        history = fed.train(build(seed=1), MLP, rounds=1, strategy=sampled, parties_per_round=2, evaluate_every=0)
        assert len(history[0].parties) == 2 and sampled.parties == 3  # N: the run's parties, sampled or not

        fed.history.rounds.clear()  # the first run's instance, used again: its c starts from zero, as the c_i do
        history = fed.train(build(seed=1), MLP, rounds=1, strategy=strategy, train_cell=CELL, evaluate_every=0)
        assert all(p.metrics["gap"] == 0.0 for p in history[0].parties.values())

        for options in ({"secure_aggregation": True}, {"dp": fednb.DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)}):
            with pytest.raises(ValueError, match="secure aggregation and DP do not carry yet"):
                fed.train(build(), MLP, rounds=1, strategy="scaffold", **options)


def test_a_blocked_reply_keeps_c_i_and_a_corrupt_keep_file_is_a_clear_error(start_party, private_dir, tmp_path,
                                                                             caplog) -> None:
    from tests.test_gate import approve

    directory = tmp_path / "clinic"
    options = {"policy": "allowlist", "directory": directory, "heartbeat": 0.2, "timeout": 5.0}
    party = start_party(f"ipc://{private_dir}/a.sock", **options)
    approve(directory, "train", source=MLP, scaffold=True)  # SCAFFOLD rounds: their own approval
    train = {"rounds": 1, "min_parties": 1, "evaluate_every": 0, "momentum": 0.0}
    with fednb.connect([{"name": "clinic", "endpoint": party.endpoint}], heartbeat=0.2, heartbeat_timeout=2.0,
                       timeout=30) as fed:
        fed.train(build(), MLP, strategy="scaffold", **train)  # through the sandbox and the egress guard
        path = directory / "keep" / coordinator_key("local") / "scaffold.bundle"
        kept = path.read_bytes()
        blocked = CELL + "report(**{'not a plain name': 1.0})\n"  # trains; its reply is the guard's to block
        approve(directory, "train", source=MLP, train_cell=blocked, scaffold=True)
        with pytest.raises(RoundError, match="egress guard blocked"):
            fed.train(build(), MLP, strategy="scaffold", train_cell=blocked, **train)
        assert path.read_bytes() == kept  # a reply that did not leave leaves c_i as it was
    party.stop()
    path.write_bytes(b"\x00" * 40)
    party = start_party(f"ipc://{private_dir}/b.sock", **options)
    with fednb.connect([{"name": "clinic", "endpoint": party.endpoint}], heartbeat=0.2, heartbeat_timeout=2.0,
                       timeout=30) as fed:
        caplog.set_level(logging.ERROR, logger="fednb.party.keep")
        with pytest.raises(RoundError, match="cannot read the SCAFFOLD control variate it keeps"):
            fed.train(build(), MLP, strategy="scaffold", **train)
        assert any(str(path) in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
        approve(directory, "train", source=MLP)
        fed.train(build(), MLP, strategy="fedavg", **train)  # the party serves on
        path.unlink()  # the owner removes it: SCAFFOLD starts afresh
        fed.train(build(), MLP, strategy="scaffold", **train)
    assert path.exists()


def test_a_partys_ci_survives_a_sigkill_and_a_restart(cli_parties, private_dir, tmp_path, digits_parts) -> None:
    """One round, SIGKILL, a restarted `fednb party` on the same directory; the run resumes from its checkpoint
    and round 2 starts from the c_i the party kept: with one party, exactly the coordinator's c (c = mean c_i)."""
    data = tmp_path / "p0.npz"
    np.savez(data, x=digits_parts[0].x_train, y=digits_parts[0].y_train)
    arguments = ("--name", "p0", "--listen", f"ipc://{private_dir}/p0.sock", "--data", f"train={data}",
                 "--threads", "1", "--policy", "open", "--dir", str(tmp_path / "dir"))
    checkpoint = tmp_path / "run.ckpt"
    train = {"strategy": "scaffold", "train_cell": CELL, "min_parties": 1, "evaluate_every": 0,
             "checkpoint": checkpoint}

    def connect(endpoint: str):
        return fednb.connect([{"name": "p0", "endpoint": endpoint}], heartbeat=0.2, heartbeat_timeout=2.0, timeout=60)

    party = cli_parties(*arguments)
    with connect(party.wait_listening()) as fed:
        fed.train(build(seed=1), MLP, rounds=1, **train)
        assert fed.history[0].parties["p0"].metrics["ci"] == 0.0
    kept = tmp_path / "dir" / "keep" / coordinator_key("local") / "scaffold.bundle"
    assert kept.exists()
    party.process.kill()  # SIGKILL: nothing is written on the way out
    party.process.wait(10)
    c = ckpt.load(checkpoint).strategy
    assert sum(float(np.abs(v).sum()) for k, v in c.items() if k.startswith("c/")) > 0

    restarted = cli_parties(*arguments)
    with connect(restarted.wait_listening()) as fed:
        history = fed.train(build(seed=1), MLP, rounds=2, **train)  # resumes the run at round 2
        second = history[-1]
        assert second.round == 2
        metrics = second.parties["p0"].metrics
        assert metrics["ci"] > 0.0 and metrics["gap"] == 0.0, metrics  # c_i as kept, equal to the checkpoint's c
