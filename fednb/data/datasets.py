"""Small bundled datasets that a simulated federation partitions among its parties.

``digits`` and ``breast_cancer`` are the copies that ship inside scikit-learn; they are
read straight from sklearn's package folder (found without importing sklearn, which
costs about two seconds) and come out equal to ``sklearn.datasets.load_digits`` /
``load_breast_cancer`` up to the scaling described below. ``synthetic`` is generated
from a seed.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "Dataset", "load_dataset"]

DATASETS: tuple[str, ...] = ("breast_cancer", "digits", "synthetic")

_CELL_MEASURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
# sklearn's order: ten means, ten standard errors, ten worst values
_BREAST_CANCER_FEATURES: tuple[str, ...] = (
    tuple(f"mean {m}" for m in _CELL_MEASURES)
    + tuple(f"{m} error" for m in _CELL_MEASURES)
    + tuple(f"worst {m}" for m in _CELL_MEASURES)
)
_DIGITS_FEATURES: tuple[str, ...] = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))

# synthetic: class means on orthonormal directions at this distance from the origin, unit
# Gaussian noise; a linear model reaches about 90 % accuracy (measured over seeds 0..5).
_SYNTHETIC_SAMPLES = 3000
_SYNTHETIC_FEATURES = 20
_SYNTHETIC_CLASSES = 4
_SYNTHETIC_RADIUS = 2.5


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset: ``x`` float32 ``[N, d]``, ``y`` int64 ``[N]``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    feature_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    """Load a bundled dataset by name; ``seed`` only affects ``synthetic``.

    - ``digits``: 1797 8×8 handwritten digits, 64 pixel features scaled to [0, 1] (/16), 10 classes.
    - ``breast_cancer``: 569 tumours, 30 features standardized to zero mean and unit
      variance, 2 classes (0 malignant, 1 benign, as in sklearn).
    - ``synthetic``: 3000 samples, 20 features, 4 Gaussian classes, deterministic per seed.
    """
    if name == "digits":
        return _digits()
    if name == "breast_cancer":
        return _breast_cancer()
    if name == "synthetic":
        return _synthetic(seed)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def _sklearn_data_dir() -> Path | None:
    """sklearn's ``datasets/data`` folder, located without importing sklearn."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def _digits() -> Dataset:
    data_dir = _sklearn_data_dir()
    path = data_dir / "digits.csv.gz" if data_dir is not None else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            raw = np.loadtxt(f, delimiter=",", dtype=np.float64)
        pixels, target = raw[:, :-1], raw[:, -1].astype(np.int64)
    else:  # pragma: no cover - only when sklearn's packaged files are gone
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.data, bunch.target.astype(np.int64)
    x = (pixels / 16.0).astype(np.float32)
    return Dataset("digits", np.ascontiguousarray(x), target, 10, _DIGITS_FEATURES)


def _breast_cancer() -> Dataset:
    data_dir = _sklearn_data_dir()
    path = data_dir / "breast_cancer.csv" if data_dir is not None else None
    if path is not None and path.is_file():
        # first row is "569,30,malignant,benign": sample and feature counts, class names
        raw = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
        features, target = raw[:, :-1], raw[:, -1].astype(np.int64)
    else:  # pragma: no cover - only when sklearn's packaged files are gone
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        features, target = bunch.data, bunch.target.astype(np.int64)
    # the same arithmetic as StandardScaler: population standard deviation
    x = (features - features.mean(axis=0)) / features.std(axis=0)
    return Dataset("breast_cancer", x.astype(np.float32), target, 2, _BREAST_CANCER_FEATURES)


def _synthetic(seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(_SYNTHETIC_SAMPLES, dtype=np.int64) % _SYNTHETIC_CLASSES)
    # orthonormal class directions keep every pair of classes equally far apart, so the
    # difficulty does not swing with the seed
    q, _ = np.linalg.qr(rng.standard_normal((_SYNTHETIC_FEATURES, _SYNTHETIC_CLASSES)))
    means = _SYNTHETIC_RADIUS * q.T
    x = means[y] + rng.standard_normal((_SYNTHETIC_SAMPLES, _SYNTHETIC_FEATURES))
    names = tuple(f"x{i}" for i in range(_SYNTHETIC_FEATURES))
    return Dataset("synthetic", x.astype(np.float32), y, _SYNTHETIC_CLASSES, names)
