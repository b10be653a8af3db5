"""The model's source: what parties execute to build the same architecture.

Code travels as source text, never as pickled objects. When the caller gives no source, a
user-defined model class is captured from the file or notebook cell that defined it, with
that file's imports, and checked locally: it must rebuild a model whose parameters have the
same names, shapes and dtypes.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import textwrap
from typing import TYPE_CHECKING

from fednb.tensors import mismatch, state_arrays, template_of

if TYPE_CHECKING:
    import torch

_ASK = ("pass source= (code that defines a variable `model`), or define the model in a %%fed_model cell")


def model_source(model: torch.nn.Module, source: str | None = None) -> str:
    """The code that builds ``model`` at a party; ValueError when it cannot be found."""
    if source is not None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("source must be Python code that defines `model`")
        return source
    cls = type(model)
    if cls.__module__.split(".")[0] == "torch":
        raise ValueError(f"fednb cannot tell how this {cls.__name__} was built; {_ASK}")
    captured = _class_source(cls)
    if captured is None:
        raise ValueError(f"fednb could not find the source of class {cls.__qualname__}; {_ASK}")
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and any(
        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()
    ):
        raise ValueError(f"{cls.__name__}() needs constructor arguments, so fednb cannot rebuild it; {_ASK}")
    imports, body = captured
    code = "\n".join([*imports, "", body, "", f"model = {cls.__name__}()", ""])
    _check_rebuilds(model, code)
    return code


def _class_source(cls: type) -> tuple[list[str], str] | None:
    """``(module imports, class source)`` from the file or cell that holds the class."""
    filename = None
    for member in vars(cls).values():
        function = getattr(member, "__func__", member)
        code = getattr(function, "__code__", None)
        if code is not None:
            filename = code.co_filename
            break
    if filename is None:
        try:
            filename = inspect.getsourcefile(cls)
        except TypeError:
            return None
    if filename is None:
        return None
    lines = linecache.getlines(filename)
    if not lines:
        return None
    text = "".join(lines)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    imports = [ast.get_source_segment(text, node) or "" for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            segment = ast.get_source_segment(text, node, padded=True)
            if segment is None:
                return None
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            header = "".join(lines[start - 1 : node.lineno - 1]) if node.decorator_list else ""
            return [i for i in imports if i], textwrap.dedent(header + segment.lstrip())
    return None


def _check_rebuilds(model: torch.nn.Module, code: str) -> None:
    namespace: dict[str, object] = {"__name__": "__fednb_check__"}
    try:
        exec(compile(code, "<fednb model source>", "exec"), namespace)  # noqa: S102 - the user's own code
    except Exception as exc:
        raise ValueError(f"the captured source of {type(model).__name__} does not run on its own ({exc}); {_ASK}") from None
    import torch

    rebuilt = namespace.get("model")
    if isinstance(rebuilt, torch.nn.Module):
        problem = mismatch(template_of(state_arrays(model)), state_arrays(rebuilt))
    else:
        problem = "it defines no torch module named `model`"
    if problem:
        raise ValueError(f"the captured source builds a different model ({problem}); {_ASK}")
