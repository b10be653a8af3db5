"""SCAFFOLD: control variates that correct each party's drift away from the global model.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 with option II. The coordinator keeps a server control
variate ``c``, each party ``i`` its own ``c_i`` (one array per float tensor of the model, zeros at
first). One round, for the sampled parties S of the run's N::

    coordinator ── x, c ──> party i: K local steps  y ← y − η_l · (g_i(y) + c − c_i)
                                     c_i⁺ = c_i − c + (x − y_K) / (K · η_l)            (option II)
    party i ── y_K, Δc_i = c_i⁺ − c_i ──> coordinator         (c_i⁺ itself never leaves the party)
    x ← x + η_g · mean_S(y_i − x)
    c ← c + (|S| / N) · mean_S(Δc_i)

so that ``c`` stays the mean of every party's ``c_i``, the parties that sat the round out included.
Both means are the paper's plain means over S, not FedAvg's example-weighted ones: ``c = mean_i c_i``
is what makes the correction unbiased. ``server_lr`` is η_g (1.0: the new weights are the mean of the
parties' weights). N is the number of parties of the run, online or not, sampled in a round or
not, which ``train()`` gives :meth:`Scaffold.configure_run` before the run's first round.

On the wire a SCAFFOLD train request says ``"scaffold": true`` and carries ``c`` beside the weights as
``scaffold.c/<tensor>``; the reply carries ``Δc_i`` as ``scaffold.dc/<tensor>``, same shapes and dtypes.
``scaffold.ci/<tensor>`` is ``c_i`` between a party process and its worker only
(:mod:`fednb.party.keep`); its egress guard never lets it out. Integer tensors (BatchNorm's
``num_batches_tracked``) have no control variate and take the plain mean. Secure aggregation and
DP are refused (``plain_rounds_only``): ``Δc_i`` would need a masked and noised sum of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from fednb.strategies.aggregate import RunningMean
from fednb.strategies.base import Aggregation, Strategy
from fednb.strategies.fedavg import check_examples
from fednb.strategies.server_step import check_number, float_dtype, pack_state, same_model, unpack_state
from fednb.tensors import Template, check_update, template_of

__all__ = ["C", "CI", "DC", "PREFIX", "Scaffold", "ScaffoldAggregation", "effective_steps", "party_variate",
           "prefixed", "reply_template", "server_step", "split", "variate_template"]

#: The server control variate in a train request, one array per float tensor.
C = "scaffold.c/"
#: A party's change of its control variate, Δc_i, in its train reply.
DC = "scaffold.dc/"
#: A party's own control variate: between the party process and its worker only, never on the wire.
CI = "scaffold.ci/"
#: What every SCAFFOLD array's name starts with.
PREFIX = "scaffold."


def variate_template(template: Template) -> Template:
    """The names, shapes and dtypes of a control variate for weights of ``template``: its float tensors."""
    return {name: (shape, dtype) for name, (shape, dtype) in template.items() if np.dtype(dtype).kind == "f"}


def prefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` under ``prefix`` + name, for the wire."""
    return {prefix + name: array for name, array in arrays.items()}


def split(arrays: Mapping[str, np.ndarray], prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(the arrays not under prefix, those under it with the prefix taken off)``; no array is copied."""
    rest: dict[str, np.ndarray] = {}
    taken: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith(prefix):
            taken[name[len(prefix):]] = array
        else:
            rest[name] = array
    return rest, taken


def reply_template(request: Mapping[str, np.ndarray], asked: bool, reply: Iterable[str]) -> Template:
    """What the tensors of a reply to a train request carrying ``request`` arrays must match: the weights
    sent, and ``Δc_i`` (``scaffold.dc/…``, one per ``scaffold.c/…`` sent) where the request ``asked`` for
    SCAFFOLD. ValueError for a ``scaffold.`` array among the ``reply`` names that may not leave a party."""
    names = list(reply)
    if any(name.startswith(CI) for name in names):
        raise ValueError("the party's own SCAFFOLD control variate (scaffold.ci/…) never leaves it")
    if not asked:
        if any(name.startswith(PREFIX) for name in names):
            raise ValueError("SCAFFOLD arrays (scaffold.…) may leave only in reply to a request that asked for "
                             "SCAFFOLD")
        return template_of(request)
    weights, c = split(request, C)
    expected = variate_template(template_of(weights))
    if template_of(c) != expected:
        raise ValueError("the SCAFFOLD request's scaffold.c/… arrays are not one per float tensor of its weights")
    return {**template_of(weights), **{DC + name: spec for name, spec in expected.items()}}


def effective_steps(steps: int, momentum: float = 0.0) -> float:
    """How many plain steps ``steps`` steps of SGD with (undampened) momentum β move the weights by,
    for a constant gradient: Σ_{k=1..K} (1 − β^k)/(1 − β), which is K for plain SGD.

    Option II divides the weights' change by η_l times this count, so that it reads the mean
    corrected gradient exactly when the gradient is constant, momentum or not.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    beta = check_number("momentum", momentum, 0.0, 1.0)
    if beta == 0.0:
        return float(steps)
    return (steps - beta * (1.0 - beta ** steps) / (1.0 - beta)) / (1.0 - beta)


def party_variate(ci: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray, step_sum: float) -> np.ndarray:
    """Option II for one tensor: ``c_i⁺ = c_i − c + (x − y) / step_sum`` in float64, a new array.

    ``step_sum`` is K · η_l for K plain SGD steps of rate η_l (:func:`effective_steps` for momentum);
    a tensor that took no step (``step_sum`` 0) keeps its ``c_i``.
    """
    s = check_number("step_sum", step_sum, 0.0)
    ci64 = np.asarray(ci, dtype=np.float64)
    if s == 0.0:
        return ci64.copy()
    return ci64 - np.asarray(c, dtype=np.float64) + (np.asarray(x, dtype=np.float64)
                                                     - np.asarray(y, dtype=np.float64)) / s


def server_step(x: Mapping[str, np.ndarray], mean_y: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray],
                mean_dc: Mapping[str, np.ndarray], *, server_lr: float, sampled: int,
                parties: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Algorithm 1's server update: ``(new weights, new c)``, inputs untouched.

    ``x ← x + η_g · (mean_y − x)`` for float tensors (integer ones take ``mean_y``), and
    ``c ← c + (sampled / parties) · mean_dc``. Computed in float32, or float64 for float64 weights;
    the weights keep their dtypes, ``c`` is kept in the computing dtype.
    """
    if isinstance(sampled, bool) or not isinstance(sampled, int) or not 1 <= sampled <= parties:
        raise ValueError(f"sampled must be an integer from 1 to parties ({parties}), got {sampled!r}")
    eta = check_number("server_lr", server_lr, 0.0, low_open=True)
    new_x: dict[str, np.ndarray] = {}
    new_c: dict[str, np.ndarray] = {}
    share = sampled / parties
    for key, w in x.items():
        if w.dtype.kind != "f":
            new_x[key] = np.array(mean_y[key], copy=True)
            continue
        dtype = float_dtype(w.dtype)
        t = dtype.type
        w_acc = w.astype(dtype, copy=False)
        new_x[key] = (w_acc + t(eta) * (np.asarray(mean_y[key], dtype=dtype) - w_acc)).astype(w.dtype, copy=False)
        new_c[key] = np.asarray(c[key], dtype=dtype) + t(share) * np.asarray(mean_dc[key], dtype=dtype)
    return new_x, new_c


class ScaffoldAggregation(Aggregation):
    """One SCAFFOLD round: each reply's weights and ``Δc_i`` go into plain means, then :func:`server_step`."""

    def __init__(self, owner: Scaffold, current: Mapping[str, np.ndarray], parties: int) -> None:
        # a private copy: the caller may load the weights into a model and change them
        self._owner = owner
        self._current = {k: np.array(v, copy=True) for k, v in current.items()}
        self._template = template_of(self._current)
        self._variates = variate_template(self._template)
        self._parties = parties
        self._y = RunningMean(self._current)
        self._dc = RunningMean({k: self._current[k] for k in self._variates})
        self._result: dict[str, np.ndarray] | None = None

    @property
    def count(self) -> int:
        """How many parties' replies were added."""
        return self._y.count

    def add(self, update: Mapping[str, np.ndarray], examples: int) -> None:
        """Fold in one reply: its weights and its ``scaffold.dc/…`` arrays, each party counted once."""
        if self._result is not None:
            raise ValueError("this round's result was already taken; start a new round")
        check_examples(examples)
        if not isinstance(update, Mapping):
            raise ValueError(f"an update must be a mapping of name -> array, got {type(update).__name__}")
        weights, dc = split(update, DC)
        problem = check_update(self._template, weights)
        if problem:
            raise ValueError(f"update {problem}")
        if not dc:
            raise ValueError("a SCAFFOLD reply must carry the party's Δc_i (scaffold.dc/<tensor>) beside its weights")
        problem = check_update(self._variates, dc)
        if problem:
            raise ValueError(f"Δc_i (scaffold.dc/…): {problem}")
        if self.count >= self._parties:
            raise ValueError(f"more replies than the round's {self._parties} parties")
        self._y.add(weights, 1.0)
        self._dc.add(dc, 1.0)

    def result(self) -> dict[str, np.ndarray]:
        # the step moves the strategy's c, so it runs once per round
        if self._result is None:
            if self.count == 0:
                raise ValueError("no updates to aggregate: add() was never called")
            owner = self._owner
            c = owner.c if same_model(owner.c, self._current) else owner.zeros(self._current)
            self._result, owner.c = server_step(self._current, self._y.result(), c, self._dc.result(),
                                                server_lr=owner.server_lr, sampled=self.count,
                                                parties=self._parties)
            owner.steps += 1
        return {k: v.copy() for k, v in self._result.items()}


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., ICML 2020): the coordinator's ``c`` and each party's ``c_i``
    correct local steps for the drift between parties' data."""

    name = "scaffold"
    plain_rounds_only: ClassVar[bool] = True

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = check_number("server_lr", server_lr, 0.0, low_open=True)
        self.c: dict[str, np.ndarray] = {}
        self.steps = 0
        self.parties: int | None = None  # N, the run's parties
        self._asked: int | None = None  # the round of the last train request

    @staticmethod
    def zeros(current: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A control variate of zeros for ``current``'s float tensors, in the dtype ``c`` is kept in."""
        return {k: np.zeros(v.shape, float_dtype(v.dtype)) for k, v in current.items() if v.dtype.kind == "f"}

    def configure_run(self, parties: int) -> None:
        """N, the number of parties of the run (``c ← c + (|S| / N) · mean Δc``); a run starts from c = 0,
        as every party starts its c_i of a new run from zeros (a resumed run loads its c afterwards)."""
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError(f"parties must be a positive integer, got {parties!r}")
        self.parties = parties
        self.c, self.steps = {}, 0

    def train_request(self, round: int,
                      current: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``{"scaffold": True}`` and ``c`` as ``scaffold.c/<tensor>``, in the weights' dtypes."""
        if self.parties is None:
            raise ValueError("SCAFFOLD needs the run's number of parties first (configure_run)")
        if not same_model(self.c, current):  # the first round, or a model of other names or shapes
            self.c, self.steps = self.zeros(current), 0
        self._asked = round
        return {"scaffold": True}, prefixed(C, {k: self.c[k].astype(current[k].dtype, copy=False) for k in self.c})

    def start_round(self, round: int, current: Mapping[str, np.ndarray]) -> Aggregation:
        if self._asked != round or self.parties is None:
            raise ValueError("SCAFFOLD sends its control variate with each train request, which only the plain "
                             "train round does: it does not run under secure aggregation or DP")
        return ScaffoldAggregation(self, current, self.parties)

    def reset(self) -> None:
        """Forget ``c``, as before the first round."""
        self.c, self.steps = {}, 0

    def state(self) -> dict[str, Any]:
        """``{"c/<tensor>": array, "steps": rounds aggregated}``: numpy arrays and an int, for a checkpoint."""
        return pack_state({"c": self.c}, self.steps)

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (e.g. read back from a checkpoint); ValueError for anything else."""
        slots, steps = unpack_state(state, ("c",))
        self.c, self.steps = slots["c"], steps

    def __repr__(self) -> str:
        return f"Scaffold(server_lr={self.server_lr!r})"
