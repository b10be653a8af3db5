"""The model's source: what parties execute to build the same architecture.

Code travels as source text, never as pickled objects. When the caller gives no source, a
user-defined model class is captured from the file or notebook cell that defined it, with
that file's imports, and checked locally: it must rebuild a model whose parameters have the
same names, shapes and dtypes.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import linecache
import math
import textwrap
import traceback
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fednb.tensors import mismatch, state_arrays, template_of

if TYPE_CHECKING:
    import torch

_ASK = ("pass source= (code that defines a variable `model`), or define the model in a %%fed_model cell")


def model_source(model: torch.nn.Module, source: str | None = None) -> str:
    """The code that builds ``model`` at a party; ValueError when it cannot be found.

    Given source is checked here before any party sees it: it must compile, run, and build
    a model with ``model``'s parameter names, shapes and dtypes (each distinct source and
    architecture is checked once per process).
    """
    if source is not None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("source must be Python code that defines `model`")
        key = (hash(source), tuple(template_of(state_arrays(model)).items()))
        if key not in _CHECKED:
            check_code(source, "model source")
            _check_rebuilds(model, source, given=True)
            _CHECKED.add(key)
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


_CHECKED: set[tuple[int, tuple[Any, ...]]] = set()


def check_code(code: str, what: str) -> None:
    """ValueError naming the line when ``code`` (a train cell, a run cell, model source) does not compile."""
    try:
        compile(code, f"<{what}>", "exec")
    except SyntaxError as exc:
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        raise ValueError(f"the {what} does not compile: {exc.msg} ({where}){text}") from None
    except ValueError as exc:  # null bytes
        raise ValueError(f"the {what} does not compile: {exc}") from None


def _check_rebuilds(model: torch.nn.Module, code: str, *, given: bool = False) -> None:
    what = "the model source" if given else f"the captured source of {type(model).__name__}"
    namespace: dict[str, object] = {"__name__": "__fednb_check__"}
    try:
        exec(compile(code, "<fednb model source>", "exec"), namespace)  # noqa: S102 - the user's own code
    except Exception as exc:
        line = next((frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
                     if frame.filename == "<fednb model source>"), None)
        at = f" at line {line}" if line else ""
        raise ValueError(f"{what} fails{at} ({type(exc).__name__}: {exc})" + ("" if given else f"; {_ASK}")) from None
    import torch

    rebuilt = namespace.get("model")
    if not isinstance(rebuilt, torch.nn.Module):
        raise ValueError(f"{what} defines no torch.nn.Module named `model`" + ("" if given else f"; {_ASK}"))
    problem = mismatch(template_of(state_arrays(model)), state_arrays(rebuilt))
    if problem:
        raise ValueError(f"{what} builds a different model than the one given ({problem})" + ("" if given else f"; {_ASK}"))


def cell_source(cell: str, namespace: Mapping[str, Any], name: str = "model") -> str:
    """A notebook cell that builds a model, made self-contained for a party.

    Names the cell uses but does not define are taken from ``namespace`` (the notebook's):
    modules become ``import`` lines, plain constants become assignments, classes and
    functions defined in the notebook bring their source. When the model is bound to a
    name other than ``model``, ``model = <name>`` is appended. ValueError names anything
    that cannot travel as source.
    """
    try:
        tree = ast.parse(cell)
    except SyntaxError as exc:
        raise ValueError(f"the model cell is not valid Python: {exc.msg} (line {exc.lineno})") from None
    preamble: list[str] = []
    for free in _free_names(tree):
        if free not in namespace or free in vars(builtins):
            continue
        preamble.extend(_definition(free, namespace[free]))
    code = "\n".join([*dict.fromkeys(preamble), cell.rstrip(), *([f"model = {name}"] if name != "model" else []), ""])
    return code


def _free_names(tree: ast.AST) -> list[str]:
    """Names read by the code before (or without) being bound in it, in first-use order."""
    bound: set[str] = set()
    free: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
            free.setdefault(node.id)
    return list(free)


def _definition(name: str, value: Any) -> list[str]:
    """Source lines that give ``name`` its notebook value at a party."""
    if isinstance(value, types.ModuleType):
        module = value.__name__
        if name == module:
            return [f"import {module}"]
        if "." in module and name == module.rsplit(".", 1)[1]:
            return [f"from {module.rsplit('.', 1)[0]} import {name}"]
        return [f"import {module} as {name}"]
    if value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)
    ):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"the model cell uses {name} = {value!r}, which cannot travel as source")
        return [f"{name} = {value!r}"]
    if isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", "") not in ("__main__", None):
        module = value.__module__
        if module.split(".")[0] != "fednb" and value.__qualname__ == value.__name__:
            return [f"from {module} import {value.__name__}" + (f" as {name}" if name != value.__name__ else "")]
    if isinstance(value, type):
        captured = _class_source(value)
        if captured is not None:
            imports, body = captured
            return [*imports, body.rstrip()] + ([f"{name} = {value.__name__}"] if name != value.__name__ else [])
    if isinstance(value, types.FunctionType):
        try:
            function = textwrap.dedent(inspect.getsource(value))
        except (OSError, TypeError):
            function = ""
        if function:
            return [function.rstrip()] + ([f"{name} = {value.__name__}"] if name != value.__name__ else [])
    raise ValueError(f"the model cell uses {name!r} (a {type(value).__name__}) from the notebook, which fednb cannot "
                     f"send as source; define or import it inside the cell")
