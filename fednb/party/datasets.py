"""The datasets a party's owner registers: named splits, never sent anywhere as such.

A split of a horizontal federation holds features and labels. A split of a vertical
federation also holds each row's id (canonical bytes, see :func:`fednb.data.files.id_array`),
by which private set intersection aligns the parties' rows; at a *feature party* it holds no
label (``y`` is ``None``): the label lives at one party only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednb.data.files import load_file
from fednb.errors import DataError

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """One named split, owned by the party: features, labels (``None`` at a feature party), row ids (or ``None``)."""

    x: np.ndarray
    y: np.ndarray | None
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.y is not None and len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")
        if self.ids is not None:
            if not isinstance(self.ids, np.ndarray) or self.ids.dtype.kind != "S" or self.ids.ndim != 1:
                raise ValueError("ids must be a 1-D numpy bytes array (dtype S<k>) of canonical ids")
            if len(self.ids) != len(self.x):
                raise ValueError(f"x has {len(self.x)} rows but ids has {len(self.ids)}")
        if self.y is None and self.ids is None:
            raise ValueError("a split without labels needs ids: only a party of a vertical federation, "
                             "aligned by id, may hold no label")

    def rows(self, index: np.ndarray) -> Split:
        """The split restricted to the rows ``index`` (in that order)."""
        return Split(self.x[index], None if self.y is None else self.y[index],
                     None if self.ids is None else self.ids[index])

    def describe(self) -> dict[str, Any]:
        """What a coordinator may know of a split: size, feature shape, whether it has ids and a label, label kind."""
        info: dict[str, Any] = {"examples": int(len(self.x)), "features": [int(n) for n in self.x.shape[1:]],
                                "ids": self.ids is not None, "label": self.y is not None}
        if self.y is not None and np.issubdtype(self.y.dtype, np.integer):
            info["classes"] = int(self.y.max()) + 1 if len(self.y) else 0
        return info


class Datasets:
    """A party's registered splits; ``train`` is required.

    Without ids, ``test`` is held out of ``train`` when absent: a ``holdout`` fraction of its
    rows, drawn with ``seed``.
    A table with ids is not split here: the parties of a vertical federation split their
    aligned rows jointly, after private set intersection.
    """

    def __init__(self, splits: Mapping[str, Split], *, holdout: float = HOLDOUT_FRACTION, seed: int = 0) -> None:
        if "train" not in splits:
            raise ValueError("a party needs a 'train' dataset (--data train=FILE)")
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
        self.splits = dict(splits)
        with_ids = {name for name, split in self.splits.items() if split.ids is not None}
        if with_ids and with_ids != set(self.splits):
            raise DataError(f"split(s) {', '.join(sorted(with_ids))} have ids and "
                            f"{', '.join(sorted(set(self.splits) - with_ids))} do not: a party's splits "
                            "all have an id column (a vertical federation's) or none do")
        self.held_out = "test" not in self.splits and not with_ids
        if self.held_out:
            train = self.splits["train"]
            order = np.random.default_rng(seed).permutation(len(train.x))
            cut = max(1, int(round(len(order) * holdout))) if len(order) > 1 else 0
            test_rows, train_rows = np.sort(order[:cut]), np.sort(order[cut:])
            self.splits["train"] = train.rows(train_rows)
            self.splits["test"] = train.rows(test_rows)

    @classmethod
    def from_files(cls, specs: Mapping[str, str | os.PathLike[str]], *, label: str | None = None,
                   id_column: str | None = None, holdout: float = HOLDOUT_FRACTION, seed: int = 0) -> Datasets:
        """Load ``{"train": path, "test": path}`` files (.npz with x, y; .csv with a label column).

        With ``id_column`` every file has row ids (the CSV column, or an .npz array ``ids``) and
        the label is optional: a file without the ``label`` column is a feature party's.
        """
        return cls({name: Split(*load_file(path, label=label, id_column=id_column)) for name, path in specs.items()},
                   holdout=holdout, seed=seed)

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: split.describe() for name, split in self.splits.items()}
