"""Input transformation that lets a kernel keep serving widgets while ``%fed_train`` runs.

A kernel handles a widget's messages (the dashboard's Stop button) only between cells, or
while a cell awaits. So in a kernel, a foreground ``%fed_train`` line at the top level of a
cell, or a ``%%fed_train`` cell, is rewritten into an awaited call of the same magic; IPython
then runs the cell as a coroutine on the kernel's event loop. Indented lines (inside a loop
or function) stay plain blocking magics.
"""

from __future__ import annotations

import re

_LINE = re.compile(r"^%fed_train(?:\s(?P<args>.*))?$")
_CALL = "await get_ipython().magics_manager.registry['FedMagics'].train_async({line!r}, {cell!r})\n"


def await_training(lines: list[str]) -> list[str]:
    """Rewrite ``%fed_train`` / ``%%fed_train`` into an awaited call (an IPython cleanup transformer)."""
    if not lines:
        return lines
    first = lines[0].rstrip("\n")
    if first.startswith("%%fed_train") and (len(first) == 11 or first[11].isspace()):
        return [_CALL.format(line=first[11:].strip(), cell="".join(lines[1:]))]
    rewritten = []
    for line in lines:
        match = _LINE.match(line.rstrip("\n"))
        rewritten.append(_CALL.format(line=(match.group("args") or "").strip(), cell=None) if match else line)
    return rewritten
