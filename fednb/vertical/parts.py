"""What a party keeps of a vertical training run between epochs or trees, so that a resumed run re-attaches to it.

A coordinator that checkpoints a vertical run (:mod:`fednb.vertical.checkpoint`) writes only what
it holds itself; each party's part of the model stays at the party: hetero logistic regression's
weights (and RMSprop's running squares) at every party, SecureBoost's thresholds at the feature
parties, its trees' leaves, margins and Paillier key at the label party. A party keeps, per vertical
training run id, a *snapshot* of its part after each completed step (epoch or round of trees):

- hetero LR: at ``lr.finish``, the epoch's last update applied;
- SecureBoost, label party: when ``sb.grow`` ends a round;
- SecureBoost, feature party: after each ``sb.apply``, as "the state after this round, if it ends
  here" (nothing reaches a feature party between its last apply of a round and the next round).

The last two snapshots of each model are kept: the coordinator may die between a party's step and
its own checkpoint, so a resumed run may ask for the step before the newest. A snapshot also
records the settings of its model (without the run's length: ``epochs`` and ``trees`` may grow on
resume) and the digest of the rows the party aligned and split, so that a resume on other settings
or another alignment is refused, naming the difference.

:class:`Parts` lives in the party's kernel session (per coordinator identity: a coordinator restarted
with the same key finds it), in a worker, which cannot write a file: a step that keeps a snapshot hands
its run's snapshots, packed (:meth:`Parts.pack`, :data:`PACKED`), to the party process, which keeps them
(:mod:`fednb.party.keep_vertical`) and hands them back to a resuming start whose session lacks the run
(:meth:`Parts.attach`: validated, then checked like the session's own).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from fednb.errors import WireError
from fednb.privacy import paillier
from fednb.vertical import boosting as bt
from fednb.vertical.logistic import Guest, Host
from fednb.vertical.secureboost import FeatureParty, LabelParty
from fednb.wire import bundle

#: vertical runs kept per coordinator session (the least recently stepped forgotten first)
MAX_RUNS = 8
#: snapshots kept per model: the newest step, and the one before it
KEEP = 2
#: the setting that is the run's length, by algorithm: it may grow when a run resumes
LENGTH = {"logistic": "epochs", "boosting": "trees"}
#: arrays a party keeps, passed between its worker and its party process only: never on the wire
KEPT = "keep/"
#: the packed snapshots of one run, in a worker's reply (to keep) or a start step's request (to resume)
PACKED = KEPT + "vertical"


def alignment_of(train: np.ndarray, test: np.ndarray) -> str:
    """A digest of the party's own rows in the aligned training and test splits (their order included)."""
    h = hashlib.sha256()
    for name, rows in (("train", train), ("test", test)):
        h.update(name.encode() + np.ascontiguousarray(rows, dtype="<i8").tobytes())
    return h.hexdigest()


def settings_differ(saved: Mapping[str, Any], asked: Mapping[str, Any], algorithm: str) -> list[str]:
    """The settings (other than the run's length) that differ, as "name saved → asked"."""
    length = LENGTH[algorithm]
    names = sorted((set(saved) | set(asked)) - {length})
    return [f"{n} {saved.get(n)!r} → {asked.get(n)!r}" for n in names if saved.get(n) != asked.get(n)]


@dataclass
class LogisticPart:
    """One party's hetero LR model after ``done`` epochs."""

    role: str                  # "label" or "features"
    settings: dict[str, Any]   # as lr.start sent them
    positive: int | None       # one-vs-rest: the class this model tells apart
    public_key: str | None     # the coordinator's n, hex (None in plaintext mode)
    alignment: str
    done: int
    weights: np.ndarray
    square: np.ndarray         # RMSprop's running mean of squared gradients (zeros for SGD)

    kind = "logistic"

    @classmethod
    def of(cls, role: Guest | Host, settings: Mapping[str, Any], positive: int | None, key: Any, alignment: str,
           done: int) -> LogisticPart:
        return cls("label" if isinstance(role, Guest) else "features", dict(settings), positive,
                   format(key.n, "x") if key is not None else None, alignment, done, role.weights.copy(),
                   role.optimizer.square.copy())

    def restore(self, role: Guest | Host) -> None:
        """Put the weights and optimizer state back into a freshly built role (the same shapes, or ValueError)."""
        if self.weights.shape != role.weights.shape or self.square.shape != role.optimizer.square.shape:
            raise ValueError(f"the kept weights have {self.weights.size} values, the model here {role.weights.size}")
        role.weights, role.optimizer.square = self.weights.copy(), self.square.copy()

    def header(self) -> dict[str, Any]:
        return {"role": self.role, "settings": self.settings, "positive": self.positive,
                "public_key": self.public_key}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "square": self.square}

    @classmethod
    def read(cls, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], alignment: str,
             done: int) -> LogisticPart:
        role, positive, key = header.get("role"), header.get("positive"), header.get("public_key")
        if role not in ("label", "features") or not (positive is None or _integer(positive)) or not (
                key is None or _hex(key)):
            raise ValueError("a kept LR part has a bad role, class or key")
        weights, square = _floats(arrays, "weights", 1), _floats(arrays, "square", 1)
        if weights.shape != square.shape:
            raise ValueError("a kept LR part's weights and optimizer state differ in size")
        return cls(str(role), _settings(header), positive, key, alignment, done, weights, square)


@dataclass
class LabelPart:
    """The label party's SecureBoost model after ``done`` rounds: margins, trees (with their leaf weights), the
    gains of its own splits, its Paillier key pair (p, q in hex; None in plaintext mode)."""

    settings: dict[str, Any]
    alignment: str
    done: int
    margins: np.ndarray
    test_margins: np.ndarray
    trees: list[bt.Tree]
    gains: dict[str, list[float]]
    key: tuple[str, str] | None

    kind = "label"

    @classmethod
    def of(cls, role: LabelParty, settings: Mapping[str, Any], alignment: str, done: int) -> LabelPart:
        key = None
        if role.suite is not None:
            private = role.suite.private
            assert private is not None, "the label party holds its key pair"
            key = (format(private.p, "x"), format(private.q, "x"))
        # a grown tree is never changed again: the snapshots share them (restore copies)
        return cls(dict(settings), alignment, done, role.margins.copy(), role.test_margins.copy(), list(role.trees),
                   {f: list(g) for f, g in role.gains.items()}, key)

    def keys(self) -> tuple[Any, Any] | None:
        """The label party's key pair, rebuilt (and checked by phe: p·q must be n)."""
        if self.key is None:
            return None
        p, q = (int(v, 16) for v in self.key)
        public = paillier.PublicKey(p * q)
        return public, paillier.PrivateKey(public, p, q)

    def restore(self, role: LabelParty) -> None:
        if self.margins.shape != role.margins.shape or self.test_margins.shape != role.test_margins.shape:
            raise ValueError("the kept margins do not fit the rows aligned here")
        if (self.key is None) != (role.suite is None):
            raise ValueError("the kept model and this one differ in encryption")
        role.margins, role.test_margins = self.margins.copy(), self.test_margins.copy()
        role.trees = [bt.Tree(t.k, {j: bt.Node(**vars(n)) for j, n in t.nodes.items()}) for t in self.trees]
        role.gains = {f: list(g) for f, g in self.gains.items()}

    def header(self) -> dict[str, Any]:
        trees = [{"k": t.k, "nodes": {str(j): [n.owner, n.feature, None if math.isnan(n.threshold) else n.threshold,
                                               n.gain, n.weight] for j, n in t.nodes.items()}} for t in self.trees]
        return {"settings": self.settings, "trees": trees, "gains": self.gains,
                "key": list(self.key) if self.key is not None else None}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"margins": self.margins, "test_margins": self.test_margins}

    @classmethod
    def read(cls, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], alignment: str, done: int) -> LabelPart:
        margins, test = _floats(arrays, "margins", 2), _floats(arrays, "test_margins", 2)
        if margins.shape[1:] != test.shape[1:]:
            raise ValueError("a kept label part's margins differ in width")
        key = header.get("key")
        if key is not None and not (isinstance(key, list) and len(key) == 2 and all(_hex(v) for v in key)):
            raise ValueError("a kept label part's key must be p and q in hex")
        trees = [_tree(raw) for raw in _list(header, "trees")]
        return cls(_settings(header), alignment, done, margins, test, trees, _gains(header, str),
                   (key[0], key[1]) if key is not None else None)


@dataclass
class FeaturePart:
    """A feature party's SecureBoost model after ``done`` rounds: its thresholds by (tree, node), the gains of its
    splits, and the label party's public key it saw (hex; None in plaintext mode)."""

    settings: dict[str, Any]
    alignment: str
    done: int
    n: str | None
    k: int
    splits: dict[tuple[int, int], tuple[int, float]]
    gains: dict[int, list[float]]

    kind = "features"

    @classmethod
    def of(cls, role: FeatureParty, settings: Mapping[str, Any], alignment: str, done: int) -> FeaturePart:
        return cls(dict(settings), alignment, done, format(role.n, "x") if role.n is not None else None, role.k,
                   dict(role.splits), {f: list(g) for f, g in role.gains.items()})

    def restore(self, role: FeatureParty) -> None:
        features = len(role.sizes)
        if any(not 0 <= f < features for f, _t in self.splits.values()) or any(not 0 <= f < features
                                                                               for f in self.gains):
            raise ValueError("the kept thresholds name features this table does not have")
        role.n = int(self.n, 16) if self.n is not None else None
        role.k, role.round = self.k, self.done - 1
        role.splits = dict(self.splits)
        role.gains = {f: list(g) for f, g in self.gains.items()}

    def header(self) -> dict[str, Any]:
        gains = {str(f): g for f, g in self.gains.items()}
        return {"settings": self.settings, "n": self.n, "k": self.k, "gains": gains}

    def arrays(self) -> dict[str, np.ndarray]:
        keys = sorted(self.splits)
        return {"splits": np.array([[t, j, self.splits[(t, j)][0]] for t, j in keys], dtype="<i8").reshape(-1, 3),
                "thresholds": np.array([self.splits[key][1] for key in keys], dtype="<f8")}

    @classmethod
    def read(cls, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], alignment: str,
             done: int) -> FeaturePart:
        n, k = header.get("n"), header.get("k")
        if not (n is None or _hex(n)) or not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 256:
            raise ValueError("a kept feature part has a bad key or number of margins")
        splits, thresholds = arrays.get("splits"), _floats(arrays, "thresholds", 1)
        if splits is None or splits.dtype != np.int64 or splits.ndim != 2 or splits.shape != (len(thresholds), 3) \
                or (len(splits) and splits.min() < 0):
            raise ValueError("a kept feature part's splits must be (tree, node, feature) rows, one per threshold")
        kept = {(int(t), int(j)): (int(f), float(v)) for (t, j, f), v in zip(splits.tolist(), thresholds.tolist())}
        return cls(_settings(header), alignment, done, n, k, kept, _gains(header, int))


Snapshot = Union[LogisticPart, LabelPart, FeaturePart]
KINDS: dict[str, type[LogisticPart] | type[LabelPart] | type[FeaturePart]] = {
    "logistic": LogisticPart, "label": LabelPart, "features": FeaturePart}


class Parts:
    """The parts of one coordinator's vertical runs at this party: run id → model → steps done → snapshot."""

    def __init__(self, runs: int = MAX_RUNS) -> None:
        self.runs = runs
        self._kept: OrderedDict[str, dict[str, dict[int, Snapshot]]] = OrderedDict()
        self._stepped: str | None = None

    def keep(self, run: str, model: str, part: Snapshot) -> None:
        """Keep ``part`` as ``model``'s snapshot after ``part.done`` steps (its two newest stay)."""
        self._stepped = run
        models = self._kept.setdefault(run, {})
        self._kept.move_to_end(run)
        steps = models.setdefault(model, {})
        steps[part.done] = part
        for old in sorted(steps)[:-KEEP]:
            del steps[old]
        while len(self._kept) > self.runs:
            self._kept.popitem(last=False)

    def find(self, party: str, run: str, model: str, done: int, kind: str) -> Snapshot:
        """``model``'s snapshot after ``done`` steps of ``run``, or a ValueError that says the run must start again."""
        steps = self._kept.get(run, {}).get(model)
        again = "the run must start again (train without this checkpoint, or with a new file)"
        if not steps:
            raise ValueError(f"{party} no longer holds its part of vertical run {run[:8]} (model {model}): it "
                             f"restarted, or forgot the run for newer ones; {again}")
        part = steps.get(done)
        if part is None:
            raise ValueError(f"{party} holds model {model} of vertical run {run[:8]} after step(s) "
                             f"{', '.join(map(str, sorted(steps)))}, not after {done}; {again}")
        if part.kind != kind:
            raise ValueError(f"{party} holds model {model} of vertical run {run[:8]} in another role; {again}")
        return part

    def resume(self, party: str, request: Mapping[str, Any], alignment: str, kind: str, algorithm: str) -> Any:
        """The snapshot a start step (``lr.start``, ``sb.start``) asks to resume from, or None for a fresh start;
        checked against the start's settings and the party's alignment now (ValueError naming what differs, or
        saying that the run must start again)."""
        training, done = request.get("training"), request.get("resume")
        if training is not None and not (isinstance(training, str) and len(training) == 32 and _hex(training)):
            raise ValueError("'training' must be a vertical run id of 32 lowercase hex digits")
        if done is None:
            return None
        if training is None or not _integer(done) or done < 1:
            raise ValueError("'resume' must be the steps a vertical run finished (at least 1), with its run id")
        model = str(request.get("model"))
        part = self.find(party, training, model, done, kind)
        differ = settings_differ(part.settings, dict(request.get("config") or {}), algorithm)
        if differ:
            raise ValueError(f"{party} kept model {model} with other settings ({'; '.join(differ)}): resume it "
                             "with the settings it was trained with")
        if part.alignment != alignment:
            raise ValueError(f"{party}'s rows align or split differently than when it kept model {model}: align "
                             "and split them as that run did")
        return part

    def runs_kept(self) -> list[str]:
        return list(self._kept)

    def stepped(self) -> str | None:
        """The run whose snapshots changed since the last call (its pack goes to the party process), or None."""
        run, self._stepped = self._stepped, None
        return run

    def attach(self, party: str, request: Mapping[str, Any], data: bytes) -> None:
        """Keep a resuming start's run as the party process kept it (``data``), unless this session holds the run
        (its own are as new); ValueError, saying the run must start again, for a bundle of no use."""
        training = request.get("training")
        if request.get("resume") is None or not isinstance(training, str) or training in self._kept:
            return
        try:
            self.unpack(data, expected=training)
        except (ValueError, WireError) as exc:
            raise ValueError(f"{party} cannot use the part it kept of vertical run {training[:8]} ({exc}); the run "
                             "must start again (train without this checkpoint, or with a new file)") from None

    def pack(self, run: str) -> bytes:
        """Every snapshot of ``run`` as one bundle (a party-side store writes it as it is)."""
        header: dict[str, Any] = {"run": run, "snapshots": []}
        arrays: dict[str, np.ndarray] = {}
        for model, steps in self._kept.get(run, {}).items():
            for done, part in steps.items():
                i = len(header["snapshots"])
                header["snapshots"].append({"model": model, "done": done, "kind": part.kind,
                                            "alignment": part.alignment, **part.header()})
                arrays.update({f"{i}.{name}": np.ascontiguousarray(a) for name, a in part.arrays().items()})
        return bundle.pack(header, arrays)

    def unpack(self, data: bytes, *, expected: str | None = None) -> str:
        """Keep the snapshots of one run (``expected``, if given) that :meth:`pack` wrote (all of them, or ValueError
        and none; WireError for bytes that are no bundle); its id."""
        header, arrays = bundle.unpack(data)
        run, snapshots = header.get("run"), header.get("snapshots")
        if not isinstance(run, str) or len(run) != 32 or not _hex(run) or not isinstance(snapshots, list):
            raise ValueError("a bundle of parts names its run and lists its snapshots")
        if expected is not None and run != expected:
            raise ValueError(f"the bundle holds vertical run {run[:8]}, not {expected[:8]}")
        read: list[tuple[str, Snapshot]] = []
        for i, raw in enumerate(snapshots):
            if not isinstance(raw, Mapping) or raw.get("kind") not in KINDS or not isinstance(raw.get("model"), str) \
                    or not _integer(raw.get("done")) or raw["done"] < 0 or not _hex(raw.get("alignment")):
                raise ValueError(f"snapshot {i} of the bundle is not a kept part")
            mine = {name[len(f"{i}."):]: a for name, a in arrays.items() if name.startswith(f"{i}.")}
            read.append((raw["model"], KINDS[raw["kind"]].read(raw, mine, raw["alignment"], raw["done"])))
        for model, part in read:
            self.keep(run, model, part)
        return run


# -- validation of what a bundle holds ---------------------------------------------------------------

def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hex(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 2048 and all(c in "0123456789abcdef" for c in value)


def _floats(arrays: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    value = arrays.get(name)
    if value is None or value.dtype != np.float64 or value.ndim != ndim or not np.all(np.isfinite(value)):
        raise ValueError(f"a kept part's {name!r} must be finite float64 values of {ndim} dimension(s)")
    return np.array(value)


def _settings(header: Mapping[str, Any]) -> dict[str, Any]:
    settings = header.get("settings")
    if not isinstance(settings, Mapping) or not all(isinstance(k, str) for k in settings):
        raise ValueError("a kept part names the settings of its model")
    return dict(settings)


def _list(header: Mapping[str, Any], name: str) -> list[Any]:
    value = header.get(name)
    if not isinstance(value, list):
        raise ValueError(f"a kept part's {name!r} must be a list")
    return value


def _gains(header: Mapping[str, Any], key: type) -> dict[Any, list[float]]:
    raw = header.get("gains")
    if not isinstance(raw, Mapping) or not all(
            isinstance(f, str) and f.isdigit() and isinstance(g, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in g)
            for f, g in raw.items()):
        raise ValueError("a kept part's gains must be lists of finite numbers by feature")
    return {key(f): [float(v) for v in g] for f, g in raw.items()}


def _tree(raw: Any) -> bt.Tree:
    if not isinstance(raw, Mapping) or not _integer(raw.get("k")) or not isinstance(raw.get("nodes"), Mapping):
        raise ValueError("a kept tree has a margin and nodes")
    nodes = {}
    for j, node in raw["nodes"].items():
        if not (isinstance(j, str) and j.isdigit() and isinstance(node, list) and len(node) == 5):
            raise ValueError("a kept tree's node is [owner, feature, threshold, gain, weight] under its id")
        owner, feature, threshold, gain, weight = node
        if not (owner is None or isinstance(owner, str)) or not _integer(feature) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in (gain, weight)) or not (threshold is None or isinstance(threshold, (int, float))):
            raise ValueError("a kept tree's node has a bad owner, feature or number")
        nodes[int(j)] = bt.Node(owner, feature, math.nan if threshold is None else float(threshold), float(gain),
                                float(weight))
    return bt.Tree(raw["k"], nodes)
