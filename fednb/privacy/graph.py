"""Who shares secrets and masks with whom: the complete graph, or SecAgg+'s sparse random graph.

Bonawitz et al. (CCS 2017) pair every two parties, which costs each party O(n) masks and the
coordinator O(n^2) work. Bell et al. ("Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", SecAgg+, CCS 2020) replace it by a random k-regular graph with k = O(log n): a party
masks with, and shares its secrets among, its k neighbours only, and the coordinator still
learns only the sum over all survivors.

The graph is a Harary graph (each party joined to the k/2 next and k/2 previous ones around a
cycle) over a random order of the parties. The order comes from a seed that no single party
chooses: the hash of every party's advertised public keys (see ``secagg``), so each party
computes the same graph on its own; a coordinator can sway it only by leaving parties out of
the round, and grinding that way buys it no more than choosing whom to invite.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

#: Up to this many parties the graph is complete, as in Bonawitz et al.
COMPLETE_UP_TO = 64


def degree(parties: int, neighbours: int | None = None) -> int:
    """The number of neighbours each of ``parties`` parties has.

    ``neighbours=None`` gives the complete graph up to 64 parties and 2·⌈1.5·log2 n⌉ beyond
    (20 at 100 parties, 40 at 10,000); a given k is rounded up to even (a Harary graph of even
    degree exists for every n) and capped at n - 1, the complete graph.
    """
    if parties < 1:
        raise ValueError("a graph needs at least one party")
    if neighbours is None:
        k = parties - 1 if parties <= COMPLETE_UP_TO else 2 * math.ceil(1.5 * math.log2(parties))
    else:
        k = neighbours + (neighbours % 2)
    return min(k, parties - 1)


def neighbours(parties: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each party's neighbours (itself excluded) in the Harary graph of degree ``k`` over a seeded random order."""
    names = sorted(set(parties))
    if len(names) != len(parties):
        raise ValueError("party names must be distinct")
    n = len(names)
    if k >= n - 1:
        everyone = frozenset(names)
        return {name: everyone - {name} for name in names}
    if k < 2 or k % 2:
        raise ValueError("a sparse graph's degree is an even number of at least 2")
    # sorting by a keyed hash is a uniformly random permutation that everyone computes alike
    order = sorted(names, key=lambda name: hashlib.sha256(seed + name.encode()).digest())
    half = k // 2
    return {
        name: frozenset(order[(i + step) % n] for step in range(-half, half + 1) if step)
        for i, name in enumerate(order)
    }
