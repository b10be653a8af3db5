"""The data owner's tools: decide pending requests (``fednb approve``), read the audit log (``fednb audit``).

Both work on the party directory, whether the party runs or not; a decision reaches a
running party within a fraction of a second (it watches its approvals file).
"""

from __future__ import annotations

import getpass
import os
import textwrap
from pathlib import Path
from typing import TextIO

from fednb.party.approvals import Approvals, Pending, parse_until
from fednb.party.audit import new_chain as start_new_chain
from fednb.party.audit import verify, who
from fednb.party.directory import open_directory


def _by() -> str:
    try:
        return f"{getpass.getuser()} (fednb approve)"
    except (KeyError, OSError):
        return "fednb approve"


def describe_pending(entry: Pending, *, code_width: int = 100) -> str:
    """A pending request as the owner reads it: what, who, when, what it returns, and its code."""
    state = "refused under policy allowlist; approve to let it run next time" if entry.refused else "waiting"
    lines = [f"{entry.kind} request  {entry.hash}  ({state})",
             f"  asked by   {entry.coordinator}",
             f"  first at   {entry.requested}" + (f"  ({entry.count} requests)" if entry.count > 1 else ""),
             f"  returns    {entry.returns}"]
    for label, key in (("model source", "model"), ("cell", "cell"), ("built-in loop", "loop")):
        text = entry.code.get(key)
        if text is None:
            continue
        if key == "loop":
            lines.append(f"  {label}: {text}")
            continue
        lines.append(f"  {label}:")
        for line in text.splitlines() or [""]:
            lines.append("    | " + (line if len(line) <= code_width else line[:code_width] + " …"))
    return "\n".join(lines)


def approve_command(directory: str | os.PathLike[str], *, approve: str | None = None, deny: str | None = None,
                    rounds: int | None = None, until: str | None = None, out: TextIO) -> int:
    """``fednb approve``: list pending requests, or approve / deny one by hash (or unique prefix)."""
    path = open_directory(directory, create=False)
    approvals = Approvals(path)
    if approve and deny:
        raise ValueError("give --approve or --deny, not both")
    if (rounds is not None or until is not None) and not approve:
        raise ValueError("--rounds and --until go with --approve")
    if approve:
        moment = parse_until(until) if until else None
        full = approvals.resolve(approve)
        hashes = approvals.approve(full, rounds=rounds, until=moment, by=_by())
        limits = [f"for {rounds} round(s)" if rounds else "", f"until {moment.isoformat()}" if moment else ""]
        print(f"approved {full}" + "".join(f" {part}" for part in limits if part), file=out)
        for extra in hashes[1:]:
            print(f"  and {extra} (evaluating the same model with the built-in evaluation)", file=out)
        return 0
    if deny:
        full = approvals.resolve(deny)
        approvals.deny(full, by=_by())
        print(f"denied {full}: requests with this code are refused", file=out)
        return 0
    pending = approvals.pending()
    if not pending:
        print(f"nothing awaits a decision in {path}", file=out)
        return 0
    print(f"{len(pending)} request(s) await a decision in {path}:\n", file=out)
    for entry in pending:
        print(describe_pending(entry) + "\n", file=out)
    example = pending[0].hash[:12]
    print(textwrap.dedent(f"""\
        approve: fednb approve {path} --approve {example} [--rounds N] [--until YYYY-MM-DD]
        deny:    fednb approve {path} --deny {example}"""), file=out)
    return 0


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def audit_command(directory: str | os.PathLike[str], *, out: TextIO, new_chain: bool = False) -> int:
    """``fednb audit``: print the log, one line per request, and whether its chain is intact (exit 1 if not).

    ``new_chain`` sets a broken log aside and starts a new chain (GateError when the log is intact).
    """
    path = open_directory(Path(directory), create=False)
    if new_chain:
        moved = start_new_chain(path)
        print(f"set the broken audit log aside as {moved.name}; the new chain starts with its SHA-256", file=out)
        return 0
    result = verify(path)
    for number, entry in enumerate(result.entries, 1):
        code = entry.get("code_hash")
        print(f"{number:>5} {str(entry.get('time', '?')):<29} {who(entry):<28} "
              f"{str(entry.get('type', '?')):<8} r{entry.get('round') if entry.get('round') is not None else '-':<4} "
              f"{(code or '-')[:12]:<12} {str(entry.get('decision', '-')):<7} in {_size(entry.get('bytes_in')):>8} "
              f"out {_size(entry.get('bytes_out')):>8}  {entry.get('outcome', '')}", file=out)
    if result.intact:
        print(f"audit chain intact: {len(result.entries)} entries", file=out)
        return 0
    print(f"audit chain BROKEN: {result.problem}", file=out)
    return 1
