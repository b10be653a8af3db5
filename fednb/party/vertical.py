"""A party's side of a vertical federation: private set intersection and hetero logistic regression.

Each ``vertical`` request names one built-in protocol step (:data:`fednb.wire.vertical.STEPS`); the kernel hands it
here with the coordinator's session, which keeps what the steps share: the PSI secret and the
aligned rows, the split, each model's weights (they never leave this worker), the seal keys.

::

    setup           role (label / features), the parties ──> this party's seal key, its table's size
    psi.blind       ──> its ids blinded, in a secret order            (uint8 [n, 32])
    psi.double      a peer's blinded points ──> blinded again          (uint8 [m, 32])
    psi.match       its own points double-blinded by the peer, the peer's by itself ──> match count
    psi.keep        (label party) ──> for each peer, which of their matched rows all peers share
    psi.restrict    (feature party) the positions to keep ──> the aligned size
    split           test fraction, seed ──> train/test sizes over the aligned rows
    lr.start        a model: settings, Paillier public key, the class (one-vs-rest), its vertical run id; with
                    ``resume``: the epochs done, and the model is rebuilt from this party's kept part
    lr.forward      (feature party) update with the last batch's gradient, then [[u_h]] sealed for the label party
    lr.residual     (label party) update, then [[d]] sealed for each feature party, [[B·loss]], its masked gradient
    lr.gradient     (feature party) [[d]] sealed ──> its masked gradient [[X_hᵀ·d + r]]
    lr.finish       an epoch's last decrypted gradient ──> applied: the epoch's model can be scored (and is kept)
    lr.scores       u_p = X_p·w_p for test rows only
    lr.evaluate     (label party) Σ of the other parties' u for the test rows ──> AUC, accuracy, KS, loss

The ``lr.*`` steps are :class:`fednb.party.vertical_logistic.LogisticSteps`, mixed in here; the ``sb.*``
steps are :class:`fednb.party.boosting.Boosting`'s.

A party never sends a plaintext feature, label, weight or score of a training row: ciphertexts
(sealed when they travel between parties through the coordinator, which holds the Paillier key),
masked gradients, blinded points, counts, and scores of test rows.

Each model's weights are kept after every epoch (:mod:`fednb.vertical.parts`), per vertical run id,
for the coordinator's session, and handed packed to the party process, which keeps them across its own
restarts (:mod:`fednb.party.keep_vertical`): a coordinator that resumes a checkpointed run (after its
own restart, with the same key) re-attaches to them, even after aligning again, as long as the rows
align the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednb.party.boosting import Boosting
from fednb.party.datasets import Split
from fednb.party.vertical_logistic import LogisticSteps, _blob, _bytes, _Model
from fednb.privacy import psi, seal
from fednb.privacy.pool import ForkPool
from fednb.vertical.parts import PACKED, Parts, alignment_of
from fednb.wire.vertical import STEPS

log = logging.getLogger(__name__)


@dataclass
class VerticalState:
    """What one coordinator's vertical federation keeps at this party (in its kernel session)."""

    run: str
    name: str
    role: str
    label_party: str
    parties: tuple[str, ...]
    key: Any = field(default_factory=seal.new_key)
    peers: dict[str, Any] = field(default_factory=dict)
    psi: dict[str, psi.PSIState] = field(default_factory=dict)
    matched: dict[str, np.ndarray] = field(default_factory=dict)
    rows: np.ndarray | None = None  # this party's table rows, in the order every party agrees on
    split: dict[str, np.ndarray] = field(default_factory=dict)  # positions into rows
    models: dict[str, _Model] = field(default_factory=dict)


def _points(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != np.uint8 or value.ndim != 2 or value.shape[1] != psi.POINT:
        raise ValueError(f"{name!r} must be a uint8 array of 32-byte points")
    return value


class Vertical(LogisticSteps):
    """The steps of one party, on its ``train`` table (ids, features, and labels at the label party)."""

    def __init__(self, name: str, table: Split) -> None:
        if table.ids is None:
            raise ValueError(f"{name}'s training table has no id column (fednb party --id-column), so it cannot "
                             "take part in a vertical federation")
        self.name, self.table = name, table
        self.state: VerticalState | None = None
        self.boosting = Boosting(self)
        self.parts = Parts()  # what each vertical run keeps here between epochs and trees
        self._pool: Any = None

    def pool(self) -> Any:
        """Worker processes for this party's curve and Paillier work (forked inside its sandbox on first need; none
        on one core), shared by PSI, hetero LR and SecureBoost for the worker's lifetime."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self._pool is None and cores > 1:
            self._pool = ForkPool(cores)
        return self._pool

    def handle(self, content: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any],
                                                                                        dict[str, np.ndarray]]:
        step, request = content["step"], content["request"]
        if step not in STEPS:
            raise ValueError(f"unknown vertical step {step!r}")
        if step == "setup":
            return self._setup(content["run"], request)
        state = self.state
        if state is None or state.run != content["run"]:
            raise ValueError(f"{self.name} has no vertical federation of this run (its setup step opens one)")
        self.parts.stepped()
        if step in ("lr.start", "sb.start") and PACKED in arrays:  # the party process kept the run's parts
            self.parts.attach(self.name, request, _blob(arrays, PACKED))
        if step.startswith("sb."):
            answer, out = self.boosting.handle(state, step, request, arrays)
        else:
            answer, out = getattr(self, "_" + step.replace(".", "_"))(state, request, arrays)
        run = self.parts.stepped()  # a snapshot was kept: the party process keeps the run's, should this one go
        if run is not None:
            try:
                out = {**out, PACKED: _bytes(self.parts.pack(run))}
            except ValueError as exc:  # over a bundle's limits: the step stands, its part stays in this session
                log.warning("the parts of vertical run %s cannot be packed for the party to keep: %s", run[:8], exc)
        return answer, out

    # -- setup and alignment ------------------------------------------------------------------------

    def _setup(self, run: str, request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        parties = tuple(str(p) for p in request["parties"])
        label_party = str(request["label_party"])
        if self.name not in parties or label_party not in parties or len(set(parties)) != len(parties):
            raise ValueError("the vertical federation's parties must be distinct and include this party and the "
                             "label party")
        role = "label" if self.name == label_party else "features"
        if role == "label" and self.table.y is None:
            raise ValueError(f"{self.name} is named the label party, but its table has no label column (--label)")
        self.state = VerticalState(run, self.name, role, label_party, parties)
        return {"vertical": {"seal_key": seal.public_text(self.state.key), "rows": int(len(self.table.x)),
                             "features": int(np.prod(self.table.x.shape[1:])), "role": role}}, {}

    def _psi_blind(self, state: VerticalState, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        peers = {str(name): key for name, key in dict(request["keys"]).items()}
        if set(peers) != set(state.parties) - {self.name}:
            raise ValueError("the seal keys relayed are not those of the other parties")
        state.peers = {name: seal.read_public(key) for name, key in peers.items()}
        peer = self._peer(state, request)
        config = psi.PSIConfig(group="x25519")
        pool = self.pool() if len(self.table.ids) >= config.serial_below else None  # type: ignore[arg-type]
        state.psi[peer], points = psi.blind(list(self.table.ids), config, pool=pool)  # type: ignore[arg-type]
        return {"vertical": {"points": int(len(points))}}, {"points": points}

    def _peer(self, state: VerticalState, request: Mapping[str, Any]) -> str:
        """The peer this alignment step is with: feature parties align with the label party, it with each."""
        peer = str(request.get("peer"))
        allowed = [p for p in state.parties if p != self.name] if state.role == "label" else [state.label_party]
        if peer not in allowed:
            raise ValueError(f"{self.name} aligns with {', '.join(allowed)}, not {peer!r}")
        return peer

    def _psi_double(self, state: VerticalState, request: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        peer = self._peer(state, request)
        theirs = _points(arrays, "points")
        pool = self.pool() if len(theirs) >= state.psi[peer].config.serial_below else None
        twice = psi.double_blind(state.psi[peer], theirs, pool=pool)
        return {"vertical": {"points": int(len(twice))}}, {"points": twice}

    def _psi_match(self, state: VerticalState, request: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        peer = self._peer(state, request)
        alignment = psi.intersect(state.psi.pop(peer), _points(arrays, "mine"), _points(arrays, "theirs"))
        state.matched[peer] = alignment.rows
        if state.role == "features":
            state.rows = alignment.rows
        return {"vertical": {"matched": alignment.size}}, {}

    def _psi_keep(self, state: VerticalState, request: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The label party: the rows every feature party matched, and for each peer the positions (in its own
        order of matched rows, which is the order of the ids) that stay."""
        if state.role != "label" or set(state.matched) != set(state.parties) - {self.name}:
            raise ValueError("only the label party keeps rows, once it matched every other party")
        common = set.intersection(*(set(rows.tolist()) for rows in state.matched.values()))
        ids = self.table.ids
        assert ids is not None
        state.rows = np.array(sorted(common, key=lambda r: bytes(ids[r])), dtype=np.int64)
        out = {}
        for peer, rows in state.matched.items():
            keep = np.array([k for k, row in enumerate(rows.tolist()) if row in common], dtype=np.int64)
            out[f"keep.{peer}"] = keep
        return {"vertical": {"size": int(len(state.rows))}}, out

    def _psi_restrict(self, state: VerticalState, request: Mapping[str, Any],
                      arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        keep = arrays.get("keep")
        if state.rows is None or keep is None or keep.dtype != np.int64 or keep.ndim != 1:
            raise ValueError("restrict needs this party's matched rows and an int64 'keep' array")
        if len(keep) and (keep.min() < 0 or keep.max() >= len(state.rows) or np.any(np.diff(keep) <= 0)):
            raise ValueError("'keep' must be increasing positions into this party's matched rows")
        state.rows = state.rows[keep]
        return {"vertical": {"size": int(len(state.rows))}}, {}

    def _split(self, state: VerticalState, request: Mapping[str, Any],
               arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if state.rows is None:
            raise ValueError("split before alignment")
        fraction, seed = float(request["test_fraction"]), int(request["seed"])
        if not 0 < fraction < 1:
            raise ValueError("test_fraction must lie in (0, 1)")
        order = np.random.default_rng(seed).permutation(len(state.rows))  # a shared split, not a secret
        cut = int(round(len(order) * fraction))
        state.split = {"test": np.sort(order[:cut]), "train": np.sort(order[cut:])}
        state.models.clear()
        self.boosting.models.clear()
        return {"vertical": {name: int(len(rows)) for name, rows in state.split.items()}}, {}

    # -- the aligned rows and the seals, which the lr.* and sb.* steps share ------------------------

    def rows_of(self, state: VerticalState, split: str) -> np.ndarray:
        if split not in state.split or state.rows is None:
            raise ValueError(f"no {split} split yet (the coordinator splits the aligned rows first)")
        return state.rows[state.split[split]]

    def alignment(self, state: VerticalState) -> str:
        """The digest of this party's rows as aligned and split now (kept with each part, compared on resume)."""
        return alignment_of(self.rows_of(state, "train"), self.rows_of(state, "test"))

    def seal_for(self, state: VerticalState, to: str, data: bytes, context: Mapping[str, Any]) -> np.ndarray:
        """``data`` sealed for party ``to`` (X25519 + ChaCha20-Poly1305, bound to the run, both names, ``context``)."""
        return _bytes(seal.seal(state.key, state.peers[to], data, run=state.run, sender=self.name, receiver=to,
                                context=context))

    def open_from(self, state: VerticalState, sender: str, arrays: Mapping[str, np.ndarray], name: str,
                  context: Mapping[str, Any]) -> bytes:
        """The sealed array ``name`` from ``sender``, opened (ValueError when it was not sealed for this context)."""
        return self._open(state, sender, _blob(arrays, name), context)

    def _open(self, state: VerticalState, sender: str, blob: bytes, context: Mapping[str, Any]) -> bytes:
        return seal.open_sealed(state.key, state.peers[sender], blob, run=state.run, sender=sender,
                                receiver=self.name, context=context)
