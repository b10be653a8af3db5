"""How the magics read their arguments: trailing comments, the API's errors as UsageErrors, defaults.

A magic line is split as a shell splits it, so a ``#`` that begins a word outside quotes
starts a comment (``%fed_sim 4   # four parties``), while ``--name 'a # b'`` keeps its ``#``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from fednb.errors import FednbError

#: The built-in training loop's defaults, the same as ``Federation.train``'s (a test keeps them
#: equal): SGD with momentum on small batches, which trains the README's MLP on the bundled
#: datasets in a few rounds (digits, 4 parties: ~0.90 test accuracy after 10 rounds with label
#: skew, Dirichlet 0.5; ~0.96 with an IID split).
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.05, "epochs": 1, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9,
                                  "loss": "cross_entropy", "strategy": "fedavg", "round_timeout": 300.0}


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` at the start of a word, outside quotes."""
    quote: str | None = None
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line


def parse(magic: Callable[..., Any], line: str) -> Any:
    """The magic's arguments from ``line`` (its first line, for a cell magic), comments left out."""
    return parse_argstring(magic, strip_comment(line))


def no_arguments(name: str, line: str) -> None:
    if strip_comment(line).strip():
        raise UsageError(f"%{name} takes no arguments")


@contextmanager
def usage_errors(magic: Callable[..., Any] | None = None) -> Iterator[None]:
    """Turn the API's errors for bad input into one-line UsageErrors, in the magic's words:
    an API keyword the message names (``key=``) becomes the magic's option (``--key``)."""
    try:
        yield
    except (ValueError, FednbError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(_option_names(magic, message)) from None


def _option_names(magic: Callable[..., Any] | None, message: str) -> str:
    parser = getattr(magic, "parser", None)
    for action in getattr(parser, "_actions", ()):
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if flags:  # "pass key= (...)" -> "pass --key (...)"; a value after the "=" is left as it is
            message = re.sub(rf"\b{re.escape(action.dest)}=(?=[\s),;]|$)", flags[0], message)
    return message


def parties(text: str | None) -> list[str] | None:
    """``--parties a,b`` as a list (None: all)."""
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def secure_aggregation(on: bool, clip: float | None) -> Any:
    """``--secure-aggregation [--clip C]`` as ``train``'s ``secure_aggregation=`` (False: plain rounds)."""
    if not on:
        if clip is not None:
            raise UsageError("--clip applies to secure aggregation: add --secure-aggregation")
        return False
    from fednb.federation.secure import SecureAggregation

    try:
        return SecureAggregation() if clip is None else SecureAggregation(clip=clip)
    except ValueError as exc:
        raise UsageError(f"--clip: {exc}") from None
