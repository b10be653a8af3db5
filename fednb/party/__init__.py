"""The party: a server next to the data, a kernel that runs coordinator code, and its datasets."""

from __future__ import annotations

from fednb.party.datasets import Datasets, Split
from fednb.party.server import PartyServer, serve

__all__ = ["Datasets", "PartyServer", "Split", "serve"]
