"""Bundled datasets, partitioners, per-party splits and party data files."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednb.data import (
    DATASETS,
    PARTITIONS,
    Dataset,
    federated_split,
    load_dataset,
    load_file,
    partition,
    pooled,
    train_test_split,
)
from fednb.errors import DataError

# ---------------------------------------------------------------------------- datasets


def test_digits_equals_sklearn() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = load_dataset("digits")
    assert (d.name, d.num_classes, d.x.shape, d.x.dtype, d.y.dtype) == ("digits", 10, (1797, 64), np.float32, np.int64)
    np.testing.assert_allclose(d.x, ref.data / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d.y, ref.target)
    assert d.feature_names == tuple(ref.feature_names)
    assert 0.0 <= d.x.min() and d.x.max() <= 1.0


def test_breast_cancer_equals_sklearn() -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    ref = load_breast_cancer()
    d = load_dataset("breast_cancer")
    assert (d.x.shape, d.x.dtype, d.y.dtype, d.num_classes) == ((569, 30), np.float32, np.int64, 2)
    np.testing.assert_allclose(d.x, StandardScaler().fit_transform(ref.data), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d.y, ref.target)  # 0 malignant, 1 benign
    assert d.feature_names == tuple(str(n) for n in ref.feature_names)
    np.testing.assert_allclose(d.x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x.std(axis=0), 1, atol=1e-5)


def test_synthetic_is_seeded_and_linearly_learnable() -> None:
    a, b, c = load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=2)
    assert (a.x.shape, a.x.dtype, a.y.dtype, a.num_classes) == ((3000, 20), np.float32, np.int64, 4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert set(np.unique(a.y)) == {0, 1, 2, 3}
    # least squares on one-hot targets: a linear model, no sklearn needed
    xb = np.hstack([a.x, np.ones((len(a.x), 1), np.float32)]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(xb[:2000], np.eye(4)[a.y[:2000]], rcond=None)
    accuracy = float(np.mean(np.argmax(xb[2000:] @ coef, axis=1) == a.y[2000:]))
    assert 0.8 <= accuracy <= 0.97


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")
    assert set(DATASETS) == {"digits", "breast_cancer", "synthetic"}


def test_importing_fednb_data_loads_neither_torch_nor_sklearn() -> None:
    code = "import sys, fednb.data as d; d.load_dataset('digits'); print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -------------------------------------------------------------------------- partitions


def _check_partition(parts: list[np.ndarray], total: int, n: int, min_size: int) -> None:
    assert len(parts) == n
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
        assert len(p) >= min_size
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(total))


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(PARTITIONS),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.sampled_from([0.05, 0.5, 5.0]),
    classes=st.integers(1, 10),
)
def test_partition_properties(method: str, n: int, seed: int, alpha: float, classes: int) -> None:
    y = np.random.default_rng(seed).integers(0, classes, size=400)
    parts = partition(y, n, method, alpha=alpha, seed=seed, min_size=10)
    _check_partition(parts, len(y), n, 10)
    again = partition(y, n, method, alpha=alpha, seed=seed, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_partition_depends_on_seed() -> None:
    y = load_dataset("digits").y
    for method in PARTITIONS:
        a, b = partition(y, 5, method, seed=0), partition(y, 5, method, seed=1)
        assert not all(np.array_equal(p, q) for p, q in zip(a, b)), method


def _mean_label_entropy(parts: list[np.ndarray], y: np.ndarray, classes: int) -> float:
    entropies = []
    for p in parts:
        q = np.bincount(y[p], minlength=classes) / len(p)
        q = q[q > 0]
        entropies.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    y = load_dataset("digits").y
    skewed = _mean_label_entropy(partition(y, 10, "dirichlet", alpha=0.1, seed=3), y, 10)
    mixed = _mean_label_entropy(partition(y, 10, "dirichlet", alpha=100.0, seed=3), y, 10)
    assert skewed < mixed - 0.5
    assert mixed > 0.95 * np.log(10)


def test_dirichlet_meets_min_size_even_when_draws_keep_failing() -> None:
    # 20 parties, tiny alpha: the repair step after the bounded redraws must kick in
    y = np.repeat(np.arange(2), 200)
    parts = partition(y, 20, "dirichlet", alpha=0.01, seed=0, min_size=20)
    _check_partition(parts, len(y), 20, 20)


def test_shards_give_at_most_shards_per_party_labels() -> None:
    y = np.repeat(np.arange(10), 100)  # balanced: 20 shards of 50 never straddle a label
    for spp in (1, 2, 5):
        parts = partition(y, 10, "shards", shards_per_party=spp, seed=7)
        _check_partition(parts, len(y), 10, 10)
        assert all(len(np.unique(y[p])) <= spp for p in parts)


def test_iid_is_near_equal() -> None:
    sizes = [len(p) for p in partition(np.zeros(103), 10, "iid")]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 2.5}, "n must be"),
        ({"n": 11}, "at least 10"),
        ({"n": 2, "method": "zipf"}, "known methods"),
        ({"n": 2, "method": "dirichlet", "alpha": 0}, "alpha"),
        ({"n": 2, "method": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"n": 2, "method": "shards", "shards_per_party": 0}, "shards_per_party"),
        ({"n": 2, "min_size": 0}, "min_size"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(np.zeros(100, dtype=np.int64), **kwargs)


def test_partition_rejects_2d_labels() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        partition(np.zeros((10, 2)), 1)


# ------------------------------------------------------------------ train/test + parties


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 60), classes=st.integers(1, 6), frac=st.floats(0.05, 0.95), seed=st.integers(0, 1000))
def test_train_test_split_properties(size: int, classes: int, frac: float, seed: int) -> None:
    y = np.random.default_rng(seed).integers(0, classes, size=200)
    idx = np.sort(np.random.default_rng(seed + 1).choice(200, size=size, replace=False))
    train, test = train_test_split(idx, y, test_fraction=frac, seed=seed)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), idx)
    assert len(np.intersect1d(train, test)) == 0
    if size >= 2:
        assert len(train) > 0 and len(test) > 0
    _, counts = np.unique(y[idx], return_counts=True)
    if size >= 2 and counts.min() >= 2 and len(test) <= size - len(counts):
        assert set(y[train]) == set(y[idx])  # stratified: every class keeps a training example
    t2 = train_test_split(idx, y, test_fraction=frac, seed=seed)
    assert np.array_equal(train, t2[0]) and np.array_equal(test, t2[1])


def test_train_test_split_is_stratified() -> None:
    y = np.repeat([0, 1], [80, 20])
    train, test = train_test_split(np.arange(100), y, test_fraction=0.25, seed=0)
    assert len(test) == 25 and np.bincount(y[test]).tolist() == [20, 5]


def test_train_test_split_rejects_bad_fraction() -> None:
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            train_test_split(np.arange(10), np.zeros(10, np.int64), test_fraction=bad)


def test_federated_split_and_pooled() -> None:
    d = load_dataset("digits")
    parts = federated_split(d, 4, "dirichlet", alpha=0.5, seed=0)
    assert [p.name for p in parts] == ["party-0", "party-1", "party-2", "party-3"]
    for p in parts:
        assert p.x_train.dtype == np.float32 and p.y_train.dtype == np.int64
        assert len(p.x_train) == len(p.y_train) > 0 and len(p.x_test) == len(p.y_test) > 0
    x_train, y_train, x_test, y_test = pooled(parts)
    assert len(x_train) + len(x_test) == len(d)
    both = np.vstack([x_train, x_test])
    # every sample appears exactly once: compare sorted rows with the dataset's
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(both), key(d.x))
    again = federated_split(d, 4, "dirichlet", alpha=0.5, seed=0)
    assert all(np.array_equal(a.x_test, b.x_test) for a, b in zip(parts, again))
    with pytest.raises(ValueError):
        pooled([])


def test_dataset_is_frozen() -> None:
    d = Dataset("t", np.zeros((2, 1), np.float32), np.zeros(2, np.int64), 1)
    with pytest.raises(AttributeError):
        d.name = "u"  # type: ignore[misc]


# ---------------------------------------------------------------------------- files


def test_npz_round_trip(tmp_path) -> None:
    x = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    y = np.array([0, 1, 1, 0], dtype=np.int32)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    gx, gy, ids = load_file(tmp_path / "a.npz")
    assert ids is None and gx.dtype == np.float32 and gx.shape == (4, 2, 3) and gy.dtype == np.int64
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    np.savez_compressed(tmp_path / "r.npz", x=x.reshape(4, 6), target=np.array([0.5, 1, 2, 3]))
    gx, gy, _ = load_file(str(tmp_path / "r.npz"), label="target")
    assert gx.shape == (4, 6) and gy.dtype == np.float32


def test_csv_round_trip(tmp_path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("age,label,bmi\n30,1,22.5\n41,0,30.1\n\n55,2,27\n")
    x, y, ids = load_file(path, label="label")
    assert ids is None
    np.testing.assert_allclose(x, [[30, 22.5], [41, 30.1], [55, 27]], rtol=1e-6)
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.tolist() == [1, 0, 2]
    path.write_text("a,target\n1,0.5\n2,1.5\n")
    _, y, _ = load_file(path, label="target")
    assert y.dtype == np.float32 and y.tolist() == [0.5, 1.5]


def _bad_npz(tmp_path, name: str, **arrays) -> object:
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.array([[1, 2]], dtype=object), "y": np.array([0])}, "object array"),
        ({"x": np.zeros((2, 2))}, "missing array.*'y'"),
        ({"features": np.zeros((2, 2)), "y": np.zeros(2)}, "missing array.*'x'"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(2, np.int64)}, "3 samples but y has 2"),
        ({"x": np.array([[1.0, np.nan]]), "y": np.zeros(1, np.int64)}, "non-finite"),
        ({"x": np.zeros(3), "y": np.zeros(3, np.int64)}, "at least 2-D"),
        ({"x": np.zeros((2, 2)), "y": np.zeros((2, 1))}, "1-D"),
        ({"x": np.array([["a", "b"]]), "y": np.zeros(1, np.int64)}, "numeric"),
        ({"x": np.zeros((1, 2)), "y": np.array([np.inf])}, "non-finite"),
        ({"x": np.array([[1e300]]), "y": np.zeros(1, np.int64)}, "too large for float32"),
    ],
)
def test_bad_npz_is_a_data_error(tmp_path, arrays: dict, match: str) -> None:
    path = _bad_npz(tmp_path, "bad.npz", **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_file(path)
    assert "bad.npz" in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,label\n1,0\nx,1\n", r"line 3, column 'a': 'x' is not a number"),
        ("a,b\n1,0\n", r"no label column 'label'.*'a', 'b'"),
        ("a,label\n1,0\n2,nan\n", r"line 3, column 'label': non-finite"),
        ("a,label\n1,0\n2\n", r"line 3: 1 values but the header has 2"),
        ("a,label\n1,\n", r"line 2, column 'label': empty cell"),
        ("1,2\n3,4\n", "header row"),
        ("", "header row"),
        ("a,label\n", "no data rows"),
        ("label\n1\n", "no feature columns"),
        ("a,label\n1e300,0\n", "float32"),
    ],
)
def test_bad_csv_is_a_data_error(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        load_file(path, label="label")
    assert "bad.csv" in str(info.value)


def test_other_files_are_data_errors(tmp_path) -> None:
    (tmp_path / "a.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DataError, match="unsupported file type"):
        load_file(tmp_path / "a.pkl")
    with pytest.raises(DataError, match="cannot read"):
        load_file(tmp_path / "missing.npz")
    (tmp_path / "a.csv").write_text("a,label\n1,0\n")
    with pytest.raises(DataError, match="label="):
        load_file(tmp_path / "a.csv")
    (tmp_path / "z.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid .npz"):
        load_file(tmp_path / "z.npz")
    with pytest.raises(DataError, match="not a regular file"):
        load_file(tmp_path)


def test_size_guards(tmp_path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((100, 10)), y=np.zeros(100, np.int64))
    with pytest.raises(DataError, match="over the limit"):
        load_file(tmp_path / "a.npz", max_bytes=1000)
    # a compressed archive that is small on disk but large once read: refused from its header
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((1000, 1000)), y=np.zeros(1000, np.int64))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    with pytest.raises(DataError, match="in memory"):
        load_file(tmp_path / "bomb.npz", max_bytes=1_000_000)


def test_npz_with_a_pickled_member_is_refused(tmp_path) -> None:
    # an .npy member whose header declares an object dtype: loading it would unpickle
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "p.npz", "w") as z:
        z.write(tmp_path / "x.npy", "x.npy")
        z.write(tmp_path / "x.npy", "y.npy")
    with pytest.raises(DataError, match="pickle"):
        load_file(tmp_path / "p.npz")
