"""A torch model's state as named numpy arrays, and back: the bridge between torch and the wire.

Sending is zero-copy (numpy views of the state_dict tensors); receiving copies exactly once,
from the read-only frame into the model's own tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

Template = dict[str, tuple[tuple[int, ...], str]]


def state_arrays(model: torch.nn.Module | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy views of a model's (or a state_dict's) tensors, in state_dict order.

    CPU tensors are shared, not copied; bfloat16 travels as float32 (numpy has no bfloat16).
    """
    import torch

    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        arrays[name] = tensor.contiguous().numpy()
    return arrays


def template_of(arrays: Mapping[str, np.ndarray]) -> Template:
    """Names, shapes and dtypes: what an update must match."""
    return {name: (tuple(array.shape), array.dtype.name) for name, array in arrays.items()}


def mismatch(template: Template, arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why ``arrays`` do not match ``template`` (names, order-free; shapes; dtypes), or None."""
    missing = [name for name in template if name not in arrays]
    extra = [name for name in arrays if name not in template]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensor {missing[0]!r}" + _more(missing))
        if extra:
            parts.append(f"unexpected tensor {extra[0]!r}" + _more(extra))
        return "; ".join(parts)
    for name, (shape, dtype) in template.items():
        array = arrays[name]
        if not isinstance(array, (np.ndarray, np.generic)):
            return f"tensor {name!r} is a {type(array).__name__}, not an array"
        if tuple(array.shape) != tuple(shape):
            return f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if array.dtype.name != dtype:
            return f"tensor {name!r} has dtype {array.dtype.name}, expected {dtype}"
    return None


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_update(
    template: Template | Mapping[str, np.ndarray],
    arrays: Mapping[str, np.ndarray],
    examples: Any = None,
) -> str | None:
    """Why an update cannot be used, or None: the one check every update passes on its way.

    ``template`` is a :data:`Template` or the arrays it is taken from (the weights that were
    sent). The update must have the template's names (in any order), shapes and dtypes, and
    finite float values; ``examples``, when given, must be a positive integer.
    """
    if not isinstance(arrays, Mapping):
        return f"an update must be a mapping of name -> array, got {type(arrays).__name__}"
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, (int, np.integer))
                                 or examples <= 0):
        return f"the example count must be a positive integer, not {examples!r}"
    spec: Template = {name: (tuple(value.shape), value.dtype.name) if isinstance(value, np.ndarray) else value
                      for name, value in template.items()}
    problem = mismatch(spec, arrays)
    if problem:
        return problem
    for name, array in arrays.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return f"tensor {name!r} has non-finite values (NaN or infinity)"
    return None


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's tensors in place (the one copy on receipt)."""
    import torch

    state = model.state_dict()
    problem = mismatch(template_of(state_arrays(state)), arrays)
    if problem:
        raise ValueError(f"weights do not fit the model: {problem}")
    with torch.no_grad():
        for name, tensor in state.items():
            source = arrays[name]
            if tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16 and tensor.is_contiguous():
                np.copyto(tensor.numpy(), source, casting="no")
            else:
                tensor.copy_(torch.from_numpy(np.array(source)))
