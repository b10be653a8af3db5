"""Record-level DP-SGD for the party's built-in loop (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016).

Each step includes each training record with probability ``sample_rate`` (Poisson sampling,
which the accountant's amplification by sampling assumes), clips each record's gradient to L2
norm ``max_grad_norm`` and adds Gaussian noise of standard deviation ``noise_multiplier ·
max_grad_norm`` to their sum. Opacus does the per-sample gradients, clipping, noise and
sampling; :func:`fit_private` mirrors :func:`fednb.party.training.fit` around it and reports
exactly the steps it took, which is what the party's ledger charges as a
:class:`fednb.privacy.accountant.Mechanism` (use :func:`planned_steps` to charge before
running).

:class:`DPSGD` is what the coordinator sends: a noise multiplier, or a target ε from which
the noise is calibrated for the whole run.

Randomness. The noise and the sampling must be unknown to the coordinator, so by default
both come from a generator seeded with 64 bits from ``os.urandom`` at the party, never from the
request's ``seed``. Opacus's ``secure_mode`` (a CSPRNG for every draw, and protection against
floating-point attacks on the Gaussian sampler, Mironov, CCS 2012) needs ``torchcsprng``, which
has no release for torch 2, so it is not used: the noise comes from torch's Philox/Mersenne
generator, unpredictable only through its seed.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fednb.privacy.accountant import Mechanism, calibrate
from fednb.wire.config import check_config

if TYPE_CHECKING:
    import torch
    from torch.utils.data import TensorDataset

    from fednb.privacy.dpfedavg import DPFedAvg


#: One DP-SGD loop at a time per process. A party's worker runs one request at a time anyway; parties
#: simulated in one process share it, and two loops on two threads of one process get each other's
#: batches in Opacus's per-sample gradients (a shape error at best), so they take turns.
_ONE_AT_A_TIME = threading.Lock()


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPSGD:
    """Record-level DP-SGD at each party: exactly one of ``noise_multiplier`` and ``target_epsilon``.

    With ``target_epsilon`` the noise multiplier is calibrated (:meth:`noise_for`) so that the
    whole run, all rounds, spends at most that ε at ``delta``.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DPSGD needs exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None:
            object.__setattr__(self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier))
        if self.target_epsilon is not None:
            object.__setattr__(self, "target_epsilon", _positive("target_epsilon", self.target_epsilon))
        object.__setattr__(self, "max_grad_norm", _positive("max_grad_norm", self.max_grad_norm))
        delta = self.delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
        object.__setattr__(self, "delta", float(delta))

    def noise_for(self, sampling_rate: float, steps: int) -> float:
        """The noise multiplier for a run of ``steps`` steps at ``sampling_rate``: the given one, or the
        one calibrated to ``target_epsilon`` (within 0.5 % below it)."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.target_epsilon is not None  # __post_init__ guarantees one of the two
        return calibrate(self.target_epsilon, self.delta, sampling_rate, steps)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "dpsgd", "noise_multiplier": self.noise_multiplier, "target_epsilon": self.target_epsilon,
                "max_grad_norm": self.max_grad_norm, "delta": self.delta}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DPSGD:
        """The settings in ``value`` as :meth:`to_dict` writes them; ValueError on anything else."""
        fields = {"kind", "noise_multiplier", "target_epsilon", "max_grad_norm", "delta"}
        if not isinstance(value, Mapping) or value.get("kind") != "dpsgd" or not set(value) <= fields:
            raise ValueError(f"not DPSGD settings: {value!r}")
        return cls(noise_multiplier=value.get("noise_multiplier"), target_epsilon=value.get("target_epsilon"),
                   max_grad_norm=value.get("max_grad_norm", 1.0), delta=value.get("delta", 1e-5))


def dp_from_dict(value: Mapping[str, Any]) -> DPSGD | DPFedAvg:
    """DPSGD or DPFedAvg settings from the wire, by their ``kind``."""
    from fednb.privacy.dpfedavg import DPFedAvg

    kind = value.get("kind") if isinstance(value, Mapping) else None
    if kind == "dpsgd":
        return DPSGD.from_dict(value)
    if kind == "dpfedavg":
        return DPFedAvg.from_dict(value)
    raise ValueError(f"unknown differential privacy settings {kind!r}: expected 'dpsgd' or 'dpfedavg'")


def sample_rate_for(batch_size: int, examples: int) -> float:
    """Poisson sampling rate with ``batch_size`` records per step on average (capped at 1)."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be an integer >= 1, got {examples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return min(1.0, batch_size / examples)


def planned_steps(sample_rate: float, epochs: int, max_steps: int = 0) -> int:
    """The steps :func:`fit_private` takes: ``int(1 / q)`` per epoch (an epoch is as many Poisson
    batches as Opacus's sampler draws), at most ``max_steps`` when that is set."""
    Mechanism("dpsgd", sample_rate, 1.0, 1)  # the same checks, the same words
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    steps = epochs * int(1 / sample_rate)
    return min(steps, max_steps) if max_steps else steps


def check_model(model: torch.nn.Module) -> None:
    """ValueError naming each layer DP-SGD cannot train (Opacus's ModuleValidator) and its fix."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    problems = []
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if not errors:
            continue
        layer = f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
        if "BatchNorm" in type(module).__name__:
            problems.append(f"{layer}: BatchNorm mixes the records of a batch, so no record's gradient can be "
                            f"clipped alone; use nn.GroupNorm(num_groups, {getattr(module, 'num_features', 'C')}) "
                            "(or LayerNorm / InstanceNorm) instead")
        else:
            problems.append(f"{layer}: " + "; ".join(str(e) for e in errors))
    if problems:
        raise ValueError("DP-SGD cannot train this model: " + " | ".join(problems))


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS's CSPRNG: noise no one can replay."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def fit_private(
    model: torch.nn.Module,
    dataset: TensorDataset,
    config: Mapping[str, Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    generator: torch.Generator | None = None,
    accountant: Any = None,
) -> tuple[dict[str, float], int]:
    """Train ``model`` in place with DP-SGD; (mean loss and accuracy, steps taken).

    ``config`` is the built-in loop's (:func:`fednb.wire.config.check_config`): ``epochs``,
    ``max_steps``, ``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``loss``;
    ``batch_size`` is replaced by ``sample_rate``, and FedProx's ``mu`` is refused (its term
    would be dropped by the per-sample clipping). ``generator`` drives sampling and noise; leave it
    None at a party (see the module docstring) and pass a seeded one only in tests. An Opacus
    ``accountant`` passed in is stepped as well.

    The metrics are computed from the training records without noise, outside the DP
    guarantee, as :func:`fednb.party.training.fit`'s are: whether they leave the party is its
    decision. RuntimeError when Opacus took another number of noised steps than planned, since
    the ledger charges the planned ones.
    """
    import torch
    from opacus.accountants import RDPAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    from fednb.party.training import loss_and_hits, model_device

    config = check_config(config)
    if config["mu"] > 0:
        raise ValueError("FedProx's proximal term (mu > 0) is not supported with DP-SGD: set mu = 0")
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    max_grad_norm = _positive("max_grad_norm", max_grad_norm)
    steps_planned = planned_steps(sample_rate, config["epochs"], config["max_steps"])
    examples = len(dataset)
    if examples < 1:
        raise ValueError("the training split is empty")
    check_model(model)
    device = model_device(model)
    sampling = generator if generator is not None else secure_generator("cpu")
    if device.type == "cpu":
        noise = sampling
    elif generator is not None:  # reproducible in tests: the device generator seeded from the given one
        noise = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    else:
        noise = secure_generator(device)

    params = [p for p in model.parameters() if p.requires_grad]
    if config["optimizer"] == "adam":
        base: torch.optim.Optimizer = torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"])
    else:
        base = torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    model.train()
    try:
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    except NotImplementedError as exc:  # Opacus refuses modules with buffers it cannot account for
        raise ValueError(f"DP-SGD cannot train this model: {exc}") from None
    hooks.forbid_grad_accumulation()  # Poisson sampling: one backward pass per step
    # mean loss over a Poisson batch: Opacus divides the noisy sum by the expected batch size
    optimizer = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                            expected_batch_size=max(1, int(examples * sample_rate)), loss_reduction="mean",
                            generator=noise)
    # Opacus keeps one step hook per optimizer: ours steps both accountants
    check = RDPAccountant()
    hook_fns = [a.get_optimizer_hook_fn(sample_rate=sample_rate) for a in (check, accountant) if a is not None]

    def step_hook(dp_optimizer: DPOptimizer) -> None:
        for fn in hook_fns:
            fn(dp_optimizer)

    optimizer.attach_step_hook(step_hook)
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=sampling)
    total_loss, hits, seen, steps = 0.0, 0, 0, 0
    # torch warns that a full backward hook fires with no input needing a gradient (the first layer's
    # input is data); Opacus only needs the gradients of the layer outputs. A filter for the process:
    # catch_warnings() would race with the party's other threads.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    _ONE_AT_A_TIME.acquire()
    try:
        while steps < steps_planned:
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                # an empty Poisson batch still takes its step: noise alone, as the accountant assumes
                loss, correct = loss_and_hits(model(inputs), targets, config["loss"])
                loss.backward()
                optimizer.step()
                steps += 1
                batch = len(targets)
                if batch:
                    total_loss += float(loss.detach()) * batch
                    hits += correct or 0
                    seen += batch
                if steps >= steps_planned:
                    break
    finally:
        optimizer.zero_grad(set_to_none=True)  # before cleanup: Opacus's zero_grad sets p.grad_sample again
        hooks.cleanup()  # the model is the party's cached one: it leaves without Opacus's hooks
        _ONE_AT_A_TIME.release()
    taken = sum(n for _z, _q, n in check.history)
    if (check.history and {(z, q) for z, q, _n in check.history} != {(noise_multiplier, sample_rate)}) \
            or taken != steps_planned:
        raise RuntimeError(f"DP-SGD took {taken} noised steps ({check.history}), not the {steps_planned} "
                           f"at noise {noise_multiplier} and sampling rate {sample_rate} that were accounted")
    metrics = {"loss": total_loss / max(seen, 1)}
    if config["loss"] == "cross_entropy":
        metrics["accuracy"] = hits / max(seen, 1)
    return metrics, steps
