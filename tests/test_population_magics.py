"""%fed_sim --backend pool in an IPython shell: thousands of parties, summarised, trained sampled."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "fednb")
    shell.run_cell("import torch\nimport torch.nn as nn\ntorch.manual_seed(0)")
    try:
        yield shell
    finally:
        shell.run_line_magic("fed_close", "")
        InteractiveShell.clear_instance()


def test_fed_sim_starts_a_pool_of_a_thousand_parties_and_fed_train_samples_them(ip):
    table = ip.run_line_magic("fed_sim", "1000 --backend pool --workers 2 --examples-per-party 32")
    fed = ip.user_ns["fed"]
    assert len(fed.parties) == 1000
    text = repr(table)
    assert text.count("ipc://") == 2 and "500" in text  # two shared endpoints of 500 parties each
    ip.run_cell_magic("fed_model", "", "model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))")
    ip.run_line_magic("fed_train", "--rounds 2 --parties-per-round 25 --lr 0.05")
    assert [len(r.parties) for r in fed.history] == [25, 25]
    with pytest.raises(UsageError, match="--workers"):
        ip.run_line_magic("fed_sim", "4 --workers 3")
