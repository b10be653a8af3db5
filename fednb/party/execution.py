"""Running coordinator code at a party: compile with a readable filename, report errors briefly.

Code arrives as source text. It runs in the coordinator's own namespace at this party; the
value of a cell is its last expression, as in IPython.
"""

from __future__ import annotations

import ast
import hashlib
import linecache
import os
import traceback
from typing import Any

MAX_MESSAGE = 2000

#: The built-in local loop's identity: part of the code hash of requests that use it, so that a
#: new version of the loop needs a new approval, as changed code would.
LOOP_NAME = "fednb.supervised"
LOOP_VERSION = 1

_FEDNB_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_hash(*parts: str) -> str:
    """SHA-256 over code parts, each length-prefixed so that boundaries cannot shift."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def _filename(kind: str, source: str) -> str:
    name = f"<fednb {kind} {code_hash(source)[:8]}>"
    linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
    return name


def run_cell(source: str, namespace: dict[str, Any], *, kind: str = "cell") -> Any:
    """Execute ``source`` in ``namespace``; return its last expression's value, else None."""
    filename = _filename(kind, source)
    tree = ast.parse(source, filename=filename, mode="exec")
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    exec(compile(tree, filename, "exec"), namespace)  # noqa: S102 - running coordinator code is the party's job
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), filename, "eval"), namespace)  # noqa: S307


def describe_error(exc: BaseException) -> tuple[str, str, str]:
    """``(type, message, traceback)`` of an error in coordinator code, without fednb's own frames."""
    message = str(exc)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " …"
    frames = traceback.extract_tb(exc.__traceback__)
    user_frames = [frame for frame in frames if frame.filename.startswith("<fednb ")]
    lines = traceback.format_list(user_frames or frames[-3:])
    lines += traceback.format_exception_only(type(exc), exc)
    return type(exc).__name__, message, "".join(lines)


def error_origin(exc: BaseException) -> tuple[str, int | None]:
    """Where an error was raised: ``("party", line)`` when fednb's own code raised it (its message
    is the party's), else ``("cell", line)``; ``line`` is the last line of coordinator code on the way."""
    frames = traceback.extract_tb(exc.__traceback__)
    line = None
    for frame in frames:
        if frame.filename.startswith("<fednb "):
            line = frame.lineno
    if isinstance(exc, SyntaxError) and isinstance(exc.filename, str) and exc.filename.startswith("<fednb "):
        return "cell", exc.lineno
    raiser = frames[-1].filename if frames else ""
    own = os.path.abspath(raiser).startswith(_FEDNB_DIR + os.sep) if raiser and not raiser.startswith("<") else False
    return ("party" if own else "cell"), line
