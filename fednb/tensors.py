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
            parts.append("missing " + ", ".join(missing[:5]))
        if extra:
            parts.append("unexpected " + ", ".join(extra[:5]))
        return "; ".join(parts)
    for name, (shape, dtype) in template.items():
        array = arrays[name]
        if tuple(array.shape) != shape:
            return f"{name}: shape {tuple(array.shape)} instead of {shape}"
        if array.dtype.name != dtype:
            return f"{name}: dtype {array.dtype.name} instead of {dtype}"
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
