"""Data for simulated federations: bundled datasets, partitioners, party files.

Numpy only: nothing here imports torch, and sklearn is imported only as a fallback when
its packaged data files are missing.
"""

from __future__ import annotations

from fednb.data.datasets import DATASETS, Dataset, load_dataset
from fednb.data.federated import PartyData, federated_indices, federated_split, pooled
from fednb.data.files import load_file
from fednb.data.partition import PARTITIONS, partition, sample_population, train_test_split

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "PartyData",
    "federated_indices",
    "federated_split",
    "load_dataset",
    "load_file",
    "partition",
    "pooled",
    "sample_population",
    "train_test_split",
]
