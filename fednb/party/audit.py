"""The audit log: one JSON line per request a party received, each carrying the hash of the one before.

``audit.jsonl`` holds, for every request: time, coordinator key, type, code hash, decision,
bytes in and out, and outcome. Line *n* has ``prev`` = SHA-256 of line *n−1*'s bytes (64
zeros for the first), and ``audit.head`` (written atomically after each append) holds the
number of lines and the hash of the last one, so editing, inserting, deleting or reordering
any line, the last one included, breaks the chain. This makes a change evident; it cannot
stop someone who may write the directory from rewriting the whole chain and head together.

A broken chain stays broken: a party whose log does not verify at start-up refuses to serve
(a new entry chained onto a tampered line would make the log look intact again) until its
owner acts. :func:`new_chain` (``fednb audit DIR --new-chain``) sets the broken log aside,
under a name with the time, and starts a new chain whose first entry records the old log's
name, SHA-256 and problem. Appending fails closed: when a line cannot be written the log
raises, and stays failed, so the party refuses work it cannot record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednb.errors import GateError
from fednb.party.directory import read_json, write_json

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FIELDS = ("time", "coordinator", "type", "request", "round", "code_hash", "decision", "bytes_in", "bytes_out",
          "outcome")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@dataclass
class Verification:
    """What ``fednb audit`` reports: the entries, and whether the chain is intact (else where it breaks)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    intact: bool = True
    problem: str = ""
    line: int | None = None


@contextlib.contextmanager
def _locked(directory: Path, mode: int) -> Iterator[None]:
    """The log and its head change together under this lock; a reader never sees one without the other."""
    fd = os.open(directory / ".audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def verify(directory: Path) -> Verification:
    """Read the log and check every link and the head."""
    with _locked(directory, fcntl.LOCK_SH):
        return _verify(directory)


def _verify(directory: Path) -> Verification:
    path, head_path = directory / "audit.jsonl", directory / "audit.head"
    result = Verification()

    def broken(problem: str, line: int | None) -> Verification:
        if result.intact:
            result.intact, result.problem, result.line = False, problem, line
        return result

    previous = GENESIS
    count = 0
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                count = number
                line = raw.rstrip(b"\n")
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict):
                        raise ValueError("not an object")
                except ValueError:
                    broken(f"line {number} is not a JSON object", number)
                    entry = {"outcome": "(unreadable)"}
                if result.intact and entry.get("prev") != previous:
                    broken(f"line {number} does not carry the hash of line {number - 1}: "
                           f"line {number - 1 if number > 1 else 1} was changed, inserted or removed", number)
                result.entries.append(entry)
                previous = line_hash(line)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return broken(f"cannot read {path}: {exc.strerror}", None)
    try:
        head = read_json(head_path) if head_path.exists() else None
    except GateError as exc:
        return broken(str(exc), None)
    if head is None:
        if count:
            broken("audit.head is missing", None)
        return result
    if not isinstance(head, dict) or head.get("entries") != count or head.get("last") != previous:
        entries = head.get("entries") if isinstance(head, dict) else "?"
        broken(f"the head records {entries} entries ending in another hash than the {count} lines found: "
               "the last lines were changed, removed or appended by hand", count or None)
    return result


def who(entry: Mapping[str, Any]) -> str:
    """The coordinator of an entry as the owner reads it: its authorized-keys label and key prefix."""
    key = str(entry.get("coordinator") or "?")
    label = entry.get("label")
    return f"{label} ({key[:12]})" if isinstance(label, str) and label else key[:12]


def new_chain(directory: Path) -> Path:
    """Set a log that does not verify aside and start a new chain; returns where the old log went.

    The new chain's first entry records the old log's file name, SHA-256, entry count and
    problem. Refuses (GateError) when the log is intact or a party is serving the directory.
    """
    directory = Path(directory)
    fd = os.open(directory / ".serving", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GateError(f"a party is serving from {directory}; stop it first") from None
        with _locked(directory, fcntl.LOCK_EX):
            checked = _verify(directory)
            if checked.intact:
                raise GateError(f"the audit log in {directory} is intact; there is nothing to set aside")
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = directory / f"audit.broken-{stamp}.jsonl"
            number = 1
            while aside.exists() or aside.with_suffix(".head").exists():  # never overwrite an earlier one
                number += 1
                aside = directory / f"audit.broken-{stamp}-{number}.jsonl"
            log_path, head_path = directory / "audit.jsonl", directory / "audit.head"
            digest = hashlib.sha256(log_path.read_bytes()).hexdigest() if log_path.exists() else None
            if log_path.exists():
                os.replace(log_path, aside)
            if head_path.exists():
                os.replace(head_path, aside.with_suffix(".head"))
        AuditLog(directory).append({
            "type": "new-chain", "decision": None,
            "outcome": f"new chain: the previous log did not verify ({checked.problem})",
            "previous_log": aside.name, "previous_sha256": digest, "previous_entries": len(checked.entries),
        })
    finally:
        os.close(fd)
    log.warning("set the broken audit log of %s aside as %s and started a new chain", directory, aside.name)
    return aside


class AuditLog:
    """Appends hash-chained entries to one party directory's log (one writer: the party).

    GateError at construction when the log does not verify (see the module docstring).
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "audit.jsonl"
        self.head_path = directory / "audit.head"
        #: Set once an append failed: the log and its head may disagree, and nothing more is written.
        self.failed = False
        checked = verify(directory)
        if not checked.intact:
            raise GateError(f"the audit log in {directory} does not verify ({checked.problem}); the party will not "
                            f"serve until its owner looks: `fednb audit {directory}` shows it, and "
                            f"`fednb audit {directory} --new-chain` sets it aside and starts a new chain")
        self._count = len(checked.entries)
        #: The privacy ledger's head as the last charge recorded it (None: no charge recorded yet).
        self.privacy_head: str | None = next((e["privacy_head"] for e in reversed(checked.entries)
                                             if isinstance(e.get("privacy_head"), str)), None)
        self._last = GENESIS
        if self._count:
            with open(self.path, "rb") as handle:
                for raw in handle:
                    self._last = line_hash(raw.rstrip(b"\n"))

    def append(self, entry: Mapping[str, Any]) -> None:
        """Write one entry (``time`` and ``prev`` are added); GateError when it cannot be written."""
        if self.failed:
            raise GateError(f"the audit log {self.path} failed earlier; nothing more is written to it")
        record = {key: entry.get(key) for key in FIELDS if key != "time"}
        record.update({k: v for k, v in entry.items() if k not in record})
        record["time"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        record["prev"] = self._last
        line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str).encode()
        try:
            with _locked(self.path.parent, fcntl.LOCK_EX):
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._last = line_hash(line)
                self._count += 1
                write_json(self.head_path, {"entries": self._count, "last": self._last})
        except (OSError, GateError) as exc:
            self.failed = True
            log.error("could not append to the audit log %s: %s", self.path, exc)
            raise GateError(f"could not append to the audit log {self.path}: {exc}") from exc
