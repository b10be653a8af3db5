"""The built-in local loop a party runs for ``train`` and ``evaluate`` requests.

Plain supervised learning: mini-batches from the party's train split, SGD or Adam, cross-
entropy (classification) or mean squared error (regression), with FedProx's proximal term
(Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) when ``mu > 0``,
and SCAFFOLD's correction (Karimireddy et al., ICML 2020) when the request asks for it
(:class:`Correction`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

from fednb.party.execution import LOOP_NAME, LOOP_VERSION  # noqa: F401 - the loop's identity lives beside code_hash
from fednb.strategies.scaffold import C, CI, DC, PREFIX, party_variate, split
from fednb.wire.config import LOSSES, OPTIMIZERS, TRAIN_SETTINGS, check_config  # noqa: F401 - the loop's settings

#: The names a training cell finds SCAFFOLD's control variates under, and sets its new one by.
SCOPE = ("scaffold_c", "scaffold_ci", "scaffold_ci_new")


def loss_and_hits(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> tuple[torch.Tensor, int | None]:
    """Mean loss of a batch and, for classification, the number of correct predictions."""
    if loss == "cross_entropy":
        if outputs.ndim != 2 or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"cross-entropy needs outputs of shape [batch, classes] and integer labels; "
                f"got outputs {tuple(outputs.shape)} and labels of {targets.dtype}"
            )
        return F.cross_entropy(outputs, targets.long()), int((outputs.argmax(dim=1) == targets).sum())
    if outputs.ndim == 2 and outputs.shape[1] == 1 and targets.ndim == 1:
        outputs = outputs.squeeze(1)
    if outputs.shape != targets.shape:
        raise ValueError(f"mse needs outputs shaped like the targets; got {tuple(outputs.shape)} vs {tuple(targets.shape)}")
    return F.mse_loss(outputs, targets.to(outputs.dtype)), None


def seed(value: int) -> None:
    """``torch.manual_seed(value)``, without its per-call cost where no accelerator is present.

    ``torch.manual_seed`` also queues the seeding of CUDA for whenever CUDA starts, and records
    the whole call stack for that each time (``traceback.format_stack``, which reads every
    frame's source file): 0.1 ms in a quiet process, 5–10 ms of a party's request on a busy
    machine, at every round. Without CUDA or MPS the CPU generator is all it seeds.
    """
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        torch.manual_seed(value)
    else:
        torch.random.default_generator.manual_seed(value)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model lives: a training cell may have moved it to a GPU, and the built-in
    loops then feed it batches there."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def fit(model: torch.nn.Module, loader: DataLoader, config: Mapping[str, Any],
        correction: Correction | None = None) -> dict[str, float]:
    """Train ``model`` in place for ``config['epochs']`` passes; mean loss (and accuracy).

    With a SCAFFOLD ``correction``, ``c − c_i`` goes on every gradient before each optimizer step.
    """
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if config["optimizer"] == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"])
    else:
        optimizer = torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    mu = config["mu"]
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    model.train()
    total_loss, hits, seen, steps = 0.0, 0, 0, 0
    for _ in range(config["epochs"]):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss, correct = loss_and_hits(model(inputs), targets, config["loss"])
            objective = loss
            if mu > 0:
                objective = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            objective.backward()
            if correction is not None:
                correction.correct()
            optimizer.step()
            batch = len(targets)
            total_loss += float(loss.detach()) * batch
            hits += correct or 0
            seen += batch
            steps += 1
            if config["max_steps"] and steps >= config["max_steps"]:
                break
        if config["max_steps"] and steps >= config["max_steps"]:
            break
    metrics = {"loss": total_loss / max(seen, 1)}
    if config["loss"] == "cross_entropy":
        metrics["accuracy"] = hits / max(seen, 1)
    return metrics


def batches(data: TensorDataset, size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``data`` in order, ``size`` rows at a time, as slices (views) of its tensors."""
    rows = len(data)
    for start in range(0, rows, size):
        yield tuple(tensor[start:start + size] for tensor in data.tensors)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Any], loss: str) -> tuple[dict[str, float], int]:
    """Mean loss (and accuracy) of ``model`` on ``loader``, with the number of examples."""
    model.eval()
    total_loss, hits, seen = 0.0, 0, 0
    device = model_device(model)
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        batch_loss, correct = loss_and_hits(model(inputs), targets, loss)
        total_loss += float(batch_loss) * len(targets)
        hits += correct or 0
        seen += len(targets)
    metrics = {"loss": total_loss / max(seen, 1)}
    if loss == "cross_entropy":
        metrics["accuracy"] = hits / max(seen, 1)
    return metrics, seen


# -- SCAFFOLD at the party ---------------------------------------------------------------------------------


def read_variates(arrays: Mapping[str, np.ndarray], asked: bool) -> tuple[dict[str, np.ndarray],
                                                                           dict[str, np.ndarray] | None,
                                                                           dict[str, np.ndarray] | None]:
    """A train request's arrays as ``(weights, c, c_i)``: SCAFFOLD's ``scaffold.c/`` and ``scaffold.ci/``
    arrays only where the request ``asked`` for SCAFFOLD (else ValueError), None without it."""
    weights, c = split(arrays, C)
    weights, ci = split(weights, CI)
    other = [name for name in weights if name.startswith(PREFIX)]
    if not asked:
        if c or ci or other:
            raise ValueError("the request carries SCAFFOLD control variates (scaffold.…) but does not ask for "
                             "SCAFFOLD")
        return weights, None, None
    if other:
        raise ValueError(f"unexpected tensor {other[0]!r}: a SCAFFOLD request carries the weights and scaffold.c/…")
    return weights, c, ci


class Correction:
    """SCAFFOLD at the party for one train request (Karimireddy et al., ICML 2020, option II).

    ``c`` (the coordinator's) and ``c_i`` (this party's, handed in by the party process) hold one
    array per float state entry of the model. ``c − c_i`` corrects the gradient of every trainable
    parameter: the built-in loop adds it before each optimizer step (:meth:`correct`); a custom cell
    finds ``scaffold_c`` and ``scaffold_ci`` (dicts of tensors by parameter name, on the model's device)
    in scope and adds it itself. While the loop or the cell runs (:meth:`counting`), every step of a
    ``torch.optim.SGD`` over the model's parameters adds ``lr · (1 − β^k)/(1 − β)`` to each stepped
    parameter's step sum (β its momentum, k its k-th step: ``K · η_l`` for K plain SGD steps), which
    option II divides the weights' change by: ``c_i⁺ = c_i − c + (x − y_K) / Σ``. A cell that steps
    another optimizer (Adam, Nesterov, dampened momentum) sets ``scaffold_ci_new`` to its own ``c_i⁺``
    (a dict of tensors by parameter name), and may do so with SGD too. Buffers and frozen parameters
    keep their ``c_i``.
    """

    def __init__(self, model: torch.nn.Module, c: Mapping[str, np.ndarray], ci: Mapping[str, np.ndarray]) -> None:
        self.c = {name: np.asarray(a) for name, a in c.items()}
        self.ci = {name: np.asarray(a) for name, a in ci.items()}
        self.params = {name: p for name, p in model.named_parameters() if name in self.c and p.requires_grad}
        self._names = {id(p): name for name, p in self.params.items()}
        self.delta = {name: _tensor(np.asarray(self.c[name], np.float64) - self.ci[name], p)
                      for name, p in self.params.items()}
        self.step_sum = dict.fromkeys(self.params, 0.0)
        self._steps = dict.fromkeys(self.params, 0)
        self.unknown: set[str] = set()  # optimizers whose steps option II cannot read

    def correct(self) -> None:
        """Add ``c − c_i`` to every trainable parameter's gradient (one without a gradient gets it as one)."""
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    p.grad = self.delta[name].clone()
                else:
                    p.grad.add_(self.delta[name])

    def scope(self) -> dict[str, Any]:
        """What a custom training cell finds in scope: ``scaffold_c`` and ``scaffold_ci``."""
        return {"scaffold_c": {name: _tensor(self.c[name], p) for name, p in self.params.items()},
                "scaffold_ci": {name: _tensor(self.ci[name], p) for name, p in self.params.items()}}

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the optimizer steps taken on the model's parameters while the block runs."""
        handle = register_optimizer_step_post_hook(self._stepped)
        try:
            yield
        finally:
            handle.remove()

    def _stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            names = [self._names[id(p)] for p in group["params"] if id(p) in self._names and p.grad is not None]
            if not names:
                continue  # another model's optimizer, or parameters without a gradient this step
            if (not isinstance(optimizer, torch.optim.SGD) or group.get("nesterov") or group.get("dampening")
                    or group.get("maximize")):
                self.unknown.add(type(optimizer).__name__)
                continue
            lr, beta = float(group["lr"]), float(group.get("momentum") or 0.0)
            for name in names:
                self._steps[name] += 1
                k = self._steps[name]
                self.step_sum[name] += lr * ((1.0 - beta ** k) / (1.0 - beta) if beta else 1.0)

    def new_ci(self, x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray],
               given: Any = None) -> dict[str, np.ndarray]:
        """``c_i⁺`` by state name in the weights' dtypes: ``given`` (a cell's ``scaffold_ci_new``) for the
        trainable parameters when set, else option II from the received ``x`` and trained ``y``."""
        chosen = self._given(given) if given is not None else None
        if chosen is None and self.unknown:
            raise ValueError(f"option II reads c_i⁺ from the weights' change over SGD steps, and the cell stepped "
                             f"{', '.join(sorted(self.unknown))}: set scaffold_ci_new (a dict of tensors by parameter "
                             "name) to this party's new control variate")
        out: dict[str, np.ndarray] = {}
        for name, ci in self.ci.items():
            if name not in self.params:
                value: np.ndarray = np.array(ci, copy=True)
            elif chosen is not None:
                value = chosen[name]
            else:
                value = party_variate(ci, self.c[name], x[name], y[name], self.step_sum[name])
            out[name] = value.astype(ci.dtype, copy=False)
        return out

    def _given(self, given: Any) -> dict[str, np.ndarray]:
        if not isinstance(given, Mapping) or set(given) != set(self.params):
            raise ValueError("scaffold_ci_new must be a dict of tensors by parameter name, one for each trainable "
                             f"parameter ({', '.join(list(self.params)[:4])}{', …' if len(self.params) > 4 else ''})")
        out = {}
        for name, value in given.items():
            array = (value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor)
                     else np.asarray(value, dtype=np.float64))
            if array.shape != self.ci[name].shape or not np.isfinite(array).all():
                raise ValueError(f"scaffold_ci_new[{name!r}] must be finite and of shape {self.ci[name].shape}, like "
                                 f"the parameter")
            out[name] = array
        return out

    def reply_arrays(self, new_ci: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``Δc_i`` for the coordinator (``scaffold.dc/…``), ``c_i⁺`` for the party process (``scaffold.ci/``)."""
        out: dict[str, np.ndarray] = {}
        for name, ci in self.ci.items():
            out[DC + name] = (new_ci[name].astype(np.float64) - ci.astype(np.float64)).astype(ci.dtype)
            out[CI + name] = new_ci[name]
        return out


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a new tensor on ``like``'s device, in its dtype."""
    return torch.from_numpy(np.array(array, copy=True)).to(device=like.device, dtype=like.dtype)
