"""The %fed_* magics through a real IPython shell, against real local party processes."""

from __future__ import annotations

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from tests.conftest import wait_until


@pytest.fixture(scope="module")
def ip():
    """One IPython shell for the module, with fednb loaded and 3 simulated parties."""
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fednb")
    shell.run_cell("import torch\nimport torch.nn as nn\nHIDDEN = 32\ntorch.manual_seed(0)")
    shell.run_line_magic("fed_sim", "3 --dataset digits --partition iid --seed 1")
    yield shell
    shell.run_line_magic("fed_close", "")
    InteractiveShell.clear_instance()


def define_model(ip, name: str = "model") -> None:
    ip.run_cell_magic("fed_model", f"--name {name}",
                      f"{name} = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))")


def test_fed_sim_binds_fed_and_lists_the_parties(ip, capsys):
    fed = ip.user_ns["fed"]
    assert fed.parties == ["party-0", "party-1", "party-2"]
    table = ip.run_line_magic("fed_parties", "")
    assert "party-2" in repr(table) and "online" in table._repr_html_()
    ip.run_line_magic("fed_status", "")
    assert "idle" in capsys.readouterr().out


def test_fed_model_records_a_self_contained_source(ip, capsys):
    define_model(ip)
    magics = ip.magics_manager.registry["FedMagics"]
    source = magics.session.sources["model"]
    assert "from torch import nn" in source and "HIDDEN = 32" in source  # what the cell used from the notebook
    assert "2,410 parameters" in capsys.readouterr().out


def test_fed_train_trains_and_leaves_the_global_weights_in_the_model(ip, capsys):
    define_model(ip)
    model = ip.user_ns["model"]
    before = model[0].weight.detach().clone()
    ip.run_line_magic("fed_train", "--rounds 3 --lr 0.1 --momentum 0.9 --epochs 2 --batch-size 16")
    out = capsys.readouterr().out
    assert out.count("s\n") >= 3 and "test accuracy" in out  # terminal: one line per round
    fed = ip.user_ns["fed"]
    assert len(fed.history) >= 3 and fed.history.metric("accuracy")[-1] > 0.8
    assert not np.array_equal(before.numpy(), model[0].weight.detach().numpy())
    evaluation = fed.evaluate(model, ip.magics_manager.registry["FedMagics"].session.sources["model"])
    assert evaluation["accuracy"] == pytest.approx(fed.history.metric("accuracy")[-1])
    frame = fed.history.to_frame()
    assert set(frame["party"]) >= {"(global)", "party-0", "party-1", "party-2"}
    table = ip.run_line_magic("fed_eval", "")
    assert "(global)" in repr(table) and "accuracy" in repr(table)


def test_fed_train_cell_is_the_local_training_step(ip):
    define_model(ip)
    fed = ip.user_ns["fed"]
    done = len(fed.history)
    ip.run_cell_magic("fed_train", "--rounds 2 --lr 0.05", (
        "opt = torch.optim.SGD(model.parameters(), lr=config['lr'])\n"
        "for x, y in train:\n"
        "    opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()\n"
        "report(loss=loss.item(), custom=1)\n"))
    assert len(fed.history) == done + 2
    assert all(p.metrics["custom"] == 1 for p in fed.history[-1].parties.values())


def test_background_training_and_fed_stop(ip, capsys):
    define_model(ip)
    fed = ip.user_ns["fed"]
    done = len(fed.history)
    ip.run_line_magic("fed_train", "--rounds 200 --background --lr 0.01")
    assert "background" in capsys.readouterr().out
    assert wait_until(lambda: len(fed.history) >= done + 2, timeout=30)
    with pytest.raises(UsageError, match="already running"):
        ip.run_line_magic("fed_train", "--rounds 1")
    ip.run_line_magic("fed_stop", "")
    assert "stopped after round" in capsys.readouterr().out
    trained = len(fed.history) - done
    assert 2 <= trained < 200 and not fed.training
    # the model holds exactly the weights of the last completed round
    source = ip.magics_manager.registry["FedMagics"].session.sources["model"]
    assert fed.evaluate(ip.user_ns["model"], source)["accuracy"] == pytest.approx(fed.history.metric("accuracy")[-1])
    ip.run_line_magic("fed_stop", "")
    assert "nothing is training" in capsys.readouterr().out


def test_fed_run_groups_results_per_party(ip, capsys):
    ip.run_cell_magic("fed_run", "-o counts", "label_counts(train)")
    counts = ip.user_ns["counts"]
    assert set(counts) == {"party-0", "party-1", "party-2"} and all(sum(c.values()) > 0 for c in counts.values())
    ip.run_cell_magic("fed_run", "--parties party-1 -o bad", "1 / 0")
    assert ip.user_ns["bad"].errors["party-1"].error_type == "ZeroDivisionError"
    out = capsys.readouterr().out
    assert "[party-0]" in out and "[party-1]\nZeroDivisionError" in out


@pytest.mark.parametrize("magic, line, cell, match", [
    ("fed_sim", "0", None, "between 1 and"),
    ("fed_sim", "two", None, "invalid int"),
    ("fed_sim", "2 --dataset imagenet", None, "unknown dataset"),
    ("fed_sim", "2 --partition sorted", None, "unknown partition"),
    ("fed_connect", "/nonexistent/parties.toml", None, "cannot read"),
    ("fed_model", "", "x = 1", "torch.nn.Module"),
    ("fed_model", "", "model = nn.Linear(", "failed"),
    ("fed_model", "--name 9x", "x = 1", "variable name"),
    ("fed_train", "--rounds 0", None, "rounds"),
    ("fed_train", "--strategy nope", None, "unknown strategy"),
    ("fed_train", "--min-parties 9", None, "min_parties"),
    ("fed_train", "--model missing", None, "no model named"),
    ("fed_train", "--parties nobody", None, "unknown parties"),
    ("fed_train", "--rounds", None, "expected one argument"),
    ("fed_train", "", "   ", "empty"),
    ("fed_run", "-o 1x", "1", "variable name"),
    ("fed_run", "--parties nobody", "1", "unknown parties"),
    ("fed_eval", "--model missing", None, "no model named"),
    ("fed_close", "now", None, "no arguments"),
])
def test_user_errors_are_one_line_usage_errors(ip, magic, line, cell, match):
    define_model(ip)
    with pytest.raises(UsageError, match=match) as info:
        if cell is None:
            ip.run_line_magic(magic, line)
        else:
            ip.run_cell_magic(magic, line, cell)
    assert "\n" not in str(info.value)


def test_a_failing_round_is_a_usage_error_not_a_traceback(ip, capsys):
    define_model(ip)
    with pytest.raises(UsageError, match="min_parties"):
        ip.run_cell_magic("fed_train", "--rounds 1 --min-parties 3", "raise RuntimeError('no GPU here')")
    captured = capsys.readouterr()
    # the error is the UsageError's alone; the progress lines say where it is
    assert "only 0 of 3" not in captured.out + captured.err and "see the error below" in captured.out


def test_magics_have_real_help():
    from fednb.notebook.magics import FedMagics

    for name in ("fed_sim", "fed_connect", "fed_model", "fed_train", "fed_stop", "fed_run", "fed_eval"):
        doc = getattr(FedMagics, name).__doc__
        assert doc and "usage:" in doc.lower() or "%" + name in doc, name
    assert "--background" in FedMagics.fed_train.__doc__ and "local training step" in FedMagics.fed_train.__doc__


def test_without_a_federation_magics_say_how_to_start_one():
    shell = InteractiveShell()
    try:
        shell.run_line_magic("load_ext", "fednb")
        for magic in ("fed_train", "fed_parties", "fed_status", "fed_eval"):
            with pytest.raises(UsageError, match="%fed_sim"):
                shell.run_line_magic(magic, "")
    finally:
        shell.run_line_magic("unload_ext", "fednb")


def test_a_second_fed_sim_replaces_and_closes_the_first():
    shell = InteractiveShell()
    try:
        shell.run_line_magic("load_ext", "fednb")
        shell.run_line_magic("fed_sim", "2 --dataset synthetic --partition iid")
        first = shell.user_ns["fed"]
        pids = first.simulation.pids
        shell.run_line_magic("fed_sim", "2 --dataset synthetic --partition iid")
        assert shell.user_ns["fed"] is not first
        with pytest.raises(Exception, match="closed"):
            first.run("1")
        from tests.test_sim import alive

        assert wait_until(lambda: not any(alive(p) for p in pids), timeout=5)
        shell.run_line_magic("fed_close", "")
        assert "fed" not in shell.user_ns
    finally:
        shell.run_line_magic("unload_ext", "fednb")


def test_fed_connect_reaches_real_parties_from_a_toml_file(start_party, tmp_path):
    """%fed_connect with a parties file and a coordinator key, against a CURVE party on tcp."""
    from fednb.transport import AllowList, generate, write_keypair

    party_key, coordinator = generate(), write_keypair(tmp_path / "me")
    party = start_party("tcp://127.0.0.1:*", keypair=party_key, allow=AllowList(keys={coordinator.public: "me"}))
    toml = tmp_path / "parties.toml"
    toml.write_text(f'[[party]]\nname = "clinic"\nendpoint = "{party.endpoint}"\npublic_key = "{party_key.public.decode()}"\n')
    shell = InteractiveShell()
    try:
        shell.run_line_magic("load_ext", "fednb")
        table = shell.run_line_magic("fed_connect", f"{toml} --key {tmp_path / 'me'}")
        assert "clinic" in repr(table) and "online" in repr(table)
        assert shell.user_ns["fed"].run("6 * 7") == {"clinic": 42}
        with pytest.raises(UsageError, match="CURVE") as info:
            shell.run_line_magic("fed_connect", str(toml))  # no key for a CURVE party: said in one line
        assert "--key" in str(info.value) and "key=" not in str(info.value)  # in the magic's words
    finally:
        shell.run_line_magic("unload_ext", "fednb")


@pytest.mark.parametrize("line, expected", [
    ("4 --dataset digits   # or: %fed_connect parties.toml --key ~/.fednb/me", "4 --dataset digits"),
    ("# only a comment", ""),
    ("--name 'a # b' --data train=x.npz", "--name 'a # b' --data train=x.npz"),
    ('--name "a #b" # why', '--name "a #b"'),
    ("--name a#b", "--name a#b"),  # a # inside a word, as in a shell
    (r"--name a\ \#b # c", r"--name a\ \#b"),
    ("--rounds 5", "--rounds 5"),
])
def test_a_trailing_comment_is_not_an_argument(line, expected):
    from fednb.notebook.arguments import strip_comment

    assert strip_comment(line) == expected


def test_magic_lines_accept_trailing_comments(ip, capsys):
    define_model(ip)
    ip.run_line_magic("fed_parties", "   # the parties")
    ip.run_line_magic("fed_train", "--rounds 1 --lr 0.05   # or: --lr 0.1")
    ip.run_cell_magic("fed_run", "-o where   # runs at every party", "'#' + str(len(train))")
    assert all(value.startswith("#") for value in ip.user_ns["where"].values())
    with pytest.raises(UsageError, match="unrecognized arguments: --nope"):
        ip.run_line_magic("fed_train", "--nope # a comment after a mistake")


def test_the_magics_training_defaults_are_the_apis():
    """%fed_train and Federation.train train alike when given nothing (rounds aside: one API call
    trains one round, one magic line trains ten)."""
    import inspect

    from fednb.federation import Federation
    from fednb.notebook.magics import FedMagics

    parameters = inspect.signature(Federation.train).parameters
    defaults = {action.dest: action.default for action in FedMagics.fed_train.parser._actions}
    shared = {name for name in defaults if name in parameters} - {"rounds", "model"}  # --model: a variable name
    assert {"lr", "epochs", "batch_size", "optimizer", "momentum", "loss", "strategy"} <= shared
    assert {name: defaults[name] for name in shared} == {name: parameters[name].default for name in shared}
    for shown in ("--lr", "default: 0.05", "default: 16", "default: 0.9"):
        assert shown in FedMagics.fed_train.__doc__


def test_fed_train_checkpoints_resumes_and_samples(ip, tmp_path):
    """--checkpoint FILE writes after each round and the same magic continues the run; --parties-per-round samples."""
    from fednb.federation.checkpoint import load

    define_model(ip)
    fed = ip.user_ns["fed"]
    path = tmp_path / "run.ckpt"
    before = len(fed.history)
    ip.run_line_magic("fed_train", f"--rounds 2 --lr 0.05 --checkpoint {path} --parties-per-round 2")
    saved = load(path)
    assert saved.round == before + 2 and all(len(r.parties) == 2 for r in saved.history)
    ip.run_line_magic("fed_train", f"--rounds 3 --lr 0.05 --checkpoint {path} --parties-per-round 2")
    assert load(path).round == before + 3 and load(path).run == saved.run and len(fed.history) == before + 3
    with pytest.raises(UsageError, match="the configuration differ"):
        ip.run_line_magic("fed_train", f"--rounds 3 --lr 0.5 --checkpoint {path} --parties-per-round 2")
