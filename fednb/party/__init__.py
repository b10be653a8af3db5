"""The party: a server next to the data, its gate (policy, egress guard, audit), and its datasets.

Importing this package does not import torch: the party process only routes, gates and
records; coordinator code and torch run in its worker processes (:mod:`fednb.party.sandbox`).
"""

from __future__ import annotations

from fednb.party.datasets import Datasets, Split
from fednb.party.egress import EgressRules
from fednb.party.server import POLICIES, PartyServer, serve

__all__ = ["POLICIES", "Datasets", "EgressRules", "PartyServer", "Split", "serve"]
