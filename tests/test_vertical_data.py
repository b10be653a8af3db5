"""Tables of a vertical federation: row ids, label-less feature parties, sharing them with workers, simulating them.

On FATE's ``breast_hetero`` tables (guest: id, y, x0..x9; host: id, x0..x19; the same 569 ids)
and small files made to be wrong.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

import fednb
from fednb.data import load_file
from fednb.errors import DataError, RoundError
from fednb.party import Datasets, PartyServer, Split
from fednb.party.shared import close_specs, map_datasets, share_datasets
from fednb.privacy.psi import canonical_ids
from tests.conftest import MLP, build

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"
GUEST, HOST = DATA / "breast_hetero_guest.csv", DATA / "breast_hetero_host.csv"


def fate_ids(path: Path) -> list[int]:
    return [int(line.split(",", 1)[0]) for line in path.read_text().splitlines()[1:]]


# -- loading --------------------------------------------------------------------------------------

def test_the_label_party_and_the_feature_party_of_breast_hetero_load_with_their_ids():
    x, y, ids = load_file(GUEST, label="y", id_column="id")
    assert (x.shape, x.dtype, y.dtype) == ((569, 10), np.float32, np.int64)
    assert (int(y.sum()), int(len(y) - y.sum())) == (357, 212)  # breast_cancer's benign / malignant
    assert ids.dtype.kind == "S" and ids.shape == (569,)
    assert ids.tolist() == canonical_ids(fate_ids(GUEST))  # as PSI hashes them: integers as decimal text
    hx, hy, hids = load_file(HOST, label="y", id_column="id")  # no label column at the feature party: not an error
    assert hy is None and hx.shape == (569, 20) and hids.tolist() == ids.tolist()
    first = np.array(GUEST.read_text().splitlines()[1].split(",")[2:], dtype=np.float32)
    np.testing.assert_array_equal(x[0], first)  # the id and the label are not features
    hx2, hy2, hids2 = load_file(HOST, id_column="id")  # no --label at all
    assert hy2 is None and np.array_equal(hx2, hx) and hids2.tolist() == hids.tolist()


def test_ids_of_an_npz_meet_those_of_a_csv_whether_integers_or_strings(tmp_path):
    x, y, ids = load_file(GUEST, label="y", id_column="id")
    numbers = np.array(fate_ids(GUEST), dtype=np.int64)
    np.savez(tmp_path / "ints.npz", x=x, y=y, ids=numbers)
    np.savez(tmp_path / "strings.npz", x=x, ids=numbers.astype(str))
    np.savez(tmp_path / "named.npz", x=x, id=numbers.astype(np.uint32))  # the array named by the id column
    for name in ("ints.npz", "strings.npz", "named.npz"):
        gx, _, gids = load_file(tmp_path / name, id_column="id")
        assert gids.tolist() == ids.tolist() and np.array_equal(gx, x), name
    _, gy, gids = load_file(tmp_path / "ints.npz")  # an ids array is read without id_column too
    assert gids.tolist() == ids.tolist() and np.array_equal(gy, y)
    _, gy, gids = load_file(tmp_path / "strings.npz")  # ... and then a table with ids needs no label
    assert gy is None and gids is not None
    np.savez(tmp_path / "names.npz", x=np.zeros((2, 1)), ids=np.array(["ana", "bé"]))
    assert load_file(tmp_path / "names.npz", id_column="id")[2].tolist() == [b"ana", "bé".encode()]


def test_datasets_with_ids_are_not_split_and_say_what_they_hold():
    bank = Datasets.from_files({"train": GUEST}, label="y", id_column="id")
    partner = Datasets.from_files({"train": HOST}, label="y", id_column="id")
    assert not bank.held_out and set(bank.splits) == {"train"}  # vertical parties split jointly, after PSI
    assert bank.describe() == {"train": {"examples": 569, "features": [10], "ids": True, "label": True, "classes": 2}}
    assert partner.describe() == {"train": {"examples": 569, "features": [20], "ids": True, "label": False}}
    horizontal = Datasets.from_files({"train": GUEST}, label="y")  # without ids: held out as ever; id a feature
    assert horizontal.held_out and horizontal.describe()["test"] == {
        "examples": 114, "features": [11], "ids": False, "label": True, "classes": 2}
    assert horizontal["train"].ids is None and len(horizontal["train"].x) == 455
    again = Datasets.from_files({"train": GUEST}, label="y", seed=1)  # the hold-out is seeded
    assert not np.array_equal(again["test"].x, horizontal["test"].x)


def test_a_split_checks_its_ids_and_needs_labels_or_ids():
    x = np.zeros((3, 2), np.float32)
    ids = np.array([b"a", b"b", b"c"])
    assert Split(x, None, ids).describe() == {"examples": 3, "features": [2], "ids": True, "label": False}
    with pytest.raises(ValueError, match="without labels needs ids"):
        Split(x, None)
    with pytest.raises(ValueError, match="bytes array"):
        Split(x, None, np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="ids has 2"):
        Split(x, None, ids[:2])
    with pytest.raises(DataError, match="have ids and test do not"):
        Datasets({"train": Split(x, np.zeros(3, np.int64), ids), "test": Split(x, np.zeros(3, np.int64))})


# -- errors that name the file, the row and the value ---------------------------------------------

@pytest.mark.parametrize(("text", "match"), [
    ("id,y,a\n1,0,0.5\n2,1,0.1\n1,0,0.3\n",
     r"bad\.csv, line 4, column 'id': duplicate id '1' \(also at line 2, column 'id'\)"),
    ("id,y,a\n1,0,0.5\n,1,0.1\n", r"bad\.csv, line 3, column 'id': missing id"),
    ("id,y,a\n1,0,0.5\nNaN,1,0.1\n", r"bad\.csv, line 3, column 'id': missing id \('NaN'\)"),
    ("id,y,a\n7,0,0.5\n1.5,1,0.1\n", r"bad\.csv, line 3, column 'id': id '1\.5' is a float"),
    ("id,y,a\n1.0,0,0.5\n", r"line 2, column 'id': id '1\.0' is a float"),  # would meet 1 at no party
    ("key,y,a\n1,0,0.5\n", r"bad\.csv: no id column 'id'; the header has 'key', 'y', 'a'"),
    ("id,id,y,a\n1,1,0,0.5\n", "id column 'id' appears more than once"),
    ("id,y\n1,0\n", "no feature columns besides the id column 'id' and the label column 'y'"),
    ("id,y,a\n1,0,x\n", r"line 2, column 'a': 'x' is not a number"),
])
def test_bad_id_tables_are_data_errors(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        load_file(path, label="y", id_column="id")


def test_a_table_without_ids_still_needs_its_label(tmp_path):
    with pytest.raises(DataError, match=r"breast_hetero_host\.csv: no label column 'y'; the header has 'id', 'x0'"):
        load_file(HOST, label="y")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"a\.npz: missing array\(s\) 'y'"):
        load_file(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="both 'id'"):
        load_file(GUEST, label="id", id_column="id")


@pytest.mark.parametrize(("arrays", "match"), [
    ({"x": np.zeros((3, 1)), "ids": np.array([7, 8, 7])},
     r"bad\.npz, array 'ids', row 2: duplicate id '7' \(also at array 'ids', row 0\)"),
    ({"x": np.zeros((2, 1)), "ids": np.array(["a", "a"])}, r"row 1: duplicate id 'a'"),
    ({"x": np.zeros((2, 1)), "ids": np.array(["a", ""])}, r"array 'ids', row 1: missing id"),
    ({"x": np.zeros((2, 1)), "ids": np.array(["a", "2.5"])}, r"row 1: id '2\.5' is a float"),
    ({"x": np.zeros((2, 1)), "ids": np.array([1.0, 2.0])}, r"array 'ids', row 0: id 1\.0 is a float"),
    ({"x": np.zeros((2, 1)), "ids": np.array([1.0, np.nan])}, r"array 'ids', row 0: id 1\.0 is a float"),
    ({"x": np.zeros((2, 1)), "ids": np.array([True, False])}, r"row 0: id True is a boolean"),
    ({"x": np.zeros((2, 1)), "ids": np.array([1, 2, 3])}, "x has 2 samples but ids has 3"),
    ({"x": np.zeros((2, 1)), "ids": np.array([[1], [2]])}, "ids must be 1-D"),
    ({"x": np.zeros((2, 1)), "ids": np.array([1 + 2j, 3j])}, "integers or strings, got dtype complex"),
    ({"x": np.zeros((2, 1)), "ids": np.array(["a", "b"], dtype=object)}, "pickle"),
    ({"x": np.zeros((2, 1)), "y": np.zeros(2)}, r"missing array 'ids' \(the row ids, for the id column 'id'\)"),
])
def test_bad_npz_ids_are_data_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_file(tmp_path / "bad.npz", id_column="id")


def test_a_party_refuses_a_bad_id_table_in_one_line(tmp_path):
    from tests.conftest import cli

    path = tmp_path / "dup.csv"
    path.write_text("id,a\n5,0.1\n5,0.2\n")
    done = cli("party", "--name", "p", "--listen", f"ipc://{tmp_path}/p.sock", "--data", f"train={path}",
               "--id-column", "id", "--dir", str(tmp_path / "p"), check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"fednb party: error: {path}, line 3, column 'id': duplicate id '5' "
                                   "(also at line 2, column 'id'); ids must be unique")


# -- shared with the workers ----------------------------------------------------------------------

def test_ids_and_a_missing_label_travel_to_workers_read_only():
    partner = Datasets.from_files({"train": HOST}, id_column="id")
    specs = share_datasets(partner)
    try:
        assert set(specs["train"]) == {"x", "ids"}  # no y to share at a feature party
        mapped = map_datasets(specs)
        train = mapped["train"]
        assert train.y is None and train.ids.tolist() == partner["train"].ids.tolist()
        assert not train.ids.flags.writeable and not train.x.flags.writeable
        assert mapped.describe() == partner.describe() and not mapped.held_out
        bad = {"train": {**specs["train"], "ids": {**specs["train"]["ids"], "dtype": "<f8"}}}
        with pytest.raises(DataError, match="malformed shared array spec"):
            map_datasets(bad)
        with pytest.raises(DataError, match="malformed shared split"):
            map_datasets({"train": {**specs["train"], "weights": specs["train"]["x"]}})
    finally:
        close_specs(specs)


def test_a_contained_feature_party_serves_and_refuses_horizontal_training(private_dir):
    """A label-less id table through the sandbox: the zygote maps its ids, a worker answers."""
    partner = Datasets.from_files({"train": HOST}, id_column="id")
    server = PartyServer("partner", f"ipc://{private_dir}/partner.sock", partner, contained=True, threads=1,
                         heartbeat=0.2, timeout=2.0)
    server.start()
    try:
        with fednb.connect([{"name": "partner", "endpoint": server.endpoint}], heartbeat=0.2,
                           heartbeat_timeout=2.0) as fed:
            (row,) = fed.status()
            assert (row.name, row.status, row.examples) == ("partner", "online", 569)
            assert server.sandbox.datasets["train"].ids.tolist() == partner["train"].ids.tolist()
            model = "import torch.nn as nn\nmodel = nn.Linear(20, 2)\n"
            with pytest.raises(RoundError) as refused:
                fed.train(build(model), model, rounds=1, evaluate_every=0)
            assert "no label column" in refused.value.dropped["partner"]
    finally:
        server.stop()


# -- simulated parties on their own files ---------------------------------------------------------

@pytest.mark.parametrize("contained", [False, True], ids=["in-process", "contained"])
def test_a_vertical_simulation_has_a_party_per_file(contained):
    with fednb.simulate(data={"bank": GUEST, "partner": str(HOST)}, id_column="id", label="y",
                        contained=contained) as fed:
        rows = {row.name: row for row in fed.status()}
        assert set(rows) == {"bank", "partner"}
        assert {name: (row.status, row.examples) for name, row in rows.items()} == {
            "bank": ("online", 569), "partner": ("online", 569)}  # all rows: no hold-out before alignment
        info = {name: fed._connections.snapshot()[name]["info"]["datasets"]["train"] for name in rows}
        assert (info["bank"]["label"], info["partner"]["label"], info["bank"]["ids"], info["partner"]["ids"]) == \
            (True, False, True, True)
        # the ids reached the code that answers (a worker, when contained) intact: every one meets its match
        assert fed.vertical(id_column="id", label_party="bank").size == 569


def test_a_simulation_on_arrays_writes_them_privately_and_checks_them_at_the_party(tmp_path):
    x, y, ids = load_file(GUEST, label="y", id_column="id")
    arrays = {"x": x[:100], "y": y[:100], "ids": np.array(fate_ids(GUEST)[:100])}
    with fednb.simulate(data={"bank": arrays, "partner": HOST}, id_column="id", label="y") as fed:
        assert {row.name: row.examples for row in fed.status()} == {"bank": 100, "partner": 569}
        written = fed.simulation.directory / "bank.data.npz"
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    dup = {"x": x[:3], "ids": [1, 2, 1]}
    with pytest.raises(DataError, match=r"bank\.data\.npz, array 'ids', row 2: duplicate id '1'"):
        fednb.simulate(data={"bank": dup, "partner": HOST}, id_column="id")
    with pytest.raises(DataError, match="no party's file has the label column 'target'"):
        fednb.simulate(data={"bank": GUEST, "partner": HOST}, id_column="id", label="target")


def test_a_horizontal_simulation_on_per_party_npz_files_trains(tmp_path, digits_parts):
    data = {}
    for k, part in enumerate(digits_parts[:2]):
        data[f"clinic-{k}"] = tmp_path / f"clinic_{k}.npz"
        np.savez(data[f"clinic-{k}"], x=part.x_train, y=part.y_train)
    with fednb.simulate(data=data) as fed:
        sizes = {row.name: row.examples for row in fed.status()}
        expected = {f"clinic-{k}": len(p.y_train) - round(0.2 * len(p.y_train)) for k, p in enumerate(digits_parts[:2])}
        assert sizes == expected  # 20 % of each file held out for testing, as `fednb party` does
        history = fed.train(build(), MLP, rounds=1, lr=0.05, epochs=1)
        assert set(history[-1].parties) == set(data) and history[-1].evaluation["accuracy"] > 0.5


@pytest.mark.parametrize(("kwargs", "match", "error"), [
    ({"n": 3}, r"n=3 does not apply", ValueError),
    ({"dataset": "digits", "partition": "iid"}, r"dataset='digits', partition='iid' does not apply", ValueError),
    ({"alpha": 0.1}, "alpha=0.1", ValueError),
    ({"data": {}}, "1 to 512 entries", ValueError),
    ({"data": {"a/b": GUEST}}, "party name 'a/b'", ValueError),
    ({"data": {"bank": 3}}, "must be a path", ValueError),
    ({"data": {"bank": {"y": [1]}}}, "needs an array 'x'", ValueError),
    ({"data": {"bank": {"x": [[1.0]], "weights": [1]}}}, "unknown array 'weights'", ValueError),
    ({"data": {"bank": {"x": [[1.0]], "ids": [object()]}}}, "array of Python objects", ValueError),
    ({"data": {"bank": "missing.csv"}}, r"missing\.csv: no such file", DataError),
    ({"data": {"bank": "bank.parquet"}}, "unsupported file type '.parquet'", DataError),
    ({"label": "y", "id_column": "y"}, "both 'y'", ValueError),
    ({"data": None, "id_column": "id"}, "id_column and label describe the files of data", ValueError),
])
def test_simulate_on_data_refuses_what_cannot_work_before_starting_a_party(kwargs, match, error):
    from tests.conftest import fednb_processes

    before = set(fednb_processes())
    with pytest.raises(error, match=match):
        fednb.simulate(**{"data": {"bank": GUEST, "partner": HOST}, **kwargs})
    assert set(fednb_processes()) <= before
