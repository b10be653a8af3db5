"""The steps of fednb's built-in vertical protocols, by the protocol whose approval covers them.

A ``vertical`` request names one step; the party's owner approves a protocol (its name carries
a version: a change to a protocol is a new name, approved anew), not each step. What each step
does is in :mod:`fednb.party.vertical`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PROTOCOLS: dict[str, tuple[str, ...]] = {
    "psi/2": ("setup", "psi.blind", "psi.double", "psi.match", "psi.keep", "psi.restrict", "split"),
    "hetero-lr/1": ("lr.start", "lr.forward", "lr.residual", "lr.gradient", "lr.finish", "lr.scores",
                    "lr.evaluate"),
    "secureboost/1": ("sb.start", "sb.gradients", "sb.histograms", "sb.split", "sb.apply", "sb.grow",
                      "sb.evaluate", "sb.predict", "sb.importance"),
}
#: step → the protocol it belongs to
STEPS: dict[str, str] = {step: protocol for protocol, steps in PROTOCOLS.items() for step in steps}
#: What each protocol lets out, in the owner's words (the approval prompt).
RETURNS = {
    "psi/2": "its ids blinded on Curve25519 (never in the clear), counts, and which matched rows to keep",
    "hetero-lr/1": "Paillier ciphertexts sealed for the other party, masked gradients, the loss in ciphertext, "
                   "scores w·x of test rows only, and test metrics; no feature, label or weight",
    "secureboost/1": "Paillier ciphertexts of gradient sums and which rows go left at its own splits, sealed for "
                     "the other party; the label party: test metrics and predictions of test rows; split counts and "
                     "gains of its own features; no feature, label, gradient or threshold in the clear",
}


def scored_positions(arrays: Mapping[str, np.ndarray], count: int) -> np.ndarray | None:
    """The ``positions`` array a scoring step may carry (rows of the test split, of ``count``), checked; None if absent."""
    positions = arrays.get("positions")
    if positions is not None and (positions.dtype != np.int64 or positions.ndim != 1 or (len(positions) and (
            positions.min() < 0 or positions.max() >= count))):
        raise ValueError("'positions' must be int64 positions into the test split")
    return positions
