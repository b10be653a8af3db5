"""The datasets a party's owner registers: named splits, never sent anywhere as such."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednb.data.files import load_file

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """One named split: features and labels as numpy arrays owned by the party."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def describe(self) -> dict[str, Any]:
        """What a coordinator may know of a split: its size, feature shape, label kind."""
        info: dict[str, Any] = {"examples": int(len(self.y)), "features": [int(n) for n in self.x.shape[1:]]}
        if np.issubdtype(self.y.dtype, np.integer):
            info["classes"] = int(self.y.max()) + 1 if len(self.y) else 0
        return info


class Datasets:
    """A party's registered splits; ``train`` is required, ``test`` is held out of train when absent."""

    def __init__(self, splits: Mapping[str, Split]) -> None:
        if "train" not in splits:
            raise ValueError("a party needs a 'train' dataset (--data train=FILE)")
        self.splits = dict(splits)
        self.held_out = "test" not in self.splits
        if self.held_out:
            train = self.splits["train"]
            order = np.random.default_rng(0).permutation(len(train.y))
            cut = max(1, int(round(len(order) * HOLDOUT_FRACTION))) if len(order) > 1 else 0
            test_rows, train_rows = np.sort(order[:cut]), np.sort(order[cut:])
            self.splits["train"] = Split(train.x[train_rows], train.y[train_rows])
            self.splits["test"] = Split(train.x[test_rows], train.y[test_rows])

    @classmethod
    def from_files(cls, specs: Mapping[str, str | os.PathLike[str]], *, label: str | None = None) -> Datasets:
        """Load ``{"train": path, "test": path}`` files (.npz with x, y; .csv with a label column)."""
        return cls({name: Split(*load_file(path, label=label)) for name, path in specs.items()})

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: split.describe() for name, split in self.splits.items()}
