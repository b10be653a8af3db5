"""A party's privacy ledger: the ε its training data has spent, request by request, against its owner's budget.

``PARTY_DIR/privacy.jsonl`` holds one JSON line per event. Each line carries ``hash``, the
SHA-256 of the line's own canonical JSON without that field, and ``prev``, the ``hash`` of the
line before it (64 zeros for the first): a hash chain, as in the audit log
(:mod:`fednb.party.audit`), where editing any line, the last one included, shows::

    {"kind": "budget", "epsilon_budget": 3.0, "delta": 1e-05, "accountant": "rdp", "time": …, "prev": …, "hash": …}
    {"kind": "charge", "coordinator": …, "label": …, "run": …, "round": 1, "mechanism": "dpsgd",
     "sampling_rate": …, "noise_multiplier": …, "steps": …, "epsilon_after": …, "epsilon_budget": …,
     "delta": …, "time": …, "prev": …, "hash": …}

A ``budget`` line opens the ledger and is written again whenever the owner opens it with
another ε budget; δ is fixed for a ledger's life (ε values accounted at one δ do not compare
with another's). ε spent is always recomputed from the recorded mechanisms with
:func:`fednb.privacy.accountant.epsilon`; the recorded ``epsilon_after`` is for people reading
the file.

Every write replaces the whole file atomically (a temporary file in the same directory,
fsync, rename, fsync of the directory), under a lock, after reading the file back and
verifying it: a crash leaves the old ledger or the new one, never half a line, and two
processes cannot both spend the last of a budget. A request that would pass the budget raises
:class:`BudgetExceeded` before anything is written. Opening a ledger verifies every line; a
malformed, edited, inserted, reordered or truncated line raises :class:`LedgerError`.
Removing whole lines from the end, or rewriting the whole chain, cannot be seen from the file
alone: the party writes :meth:`Ledger.head` into its audit log after each charge and checks it
with :meth:`Ledger.check_head` at start-up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fednb.atomic import write_atomic
from fednb.errors import FednbError, GateError
from fednb.privacy.accountant import KINDS, Mechanism, epsilon

GENESIS = "0" * 64
LEDGER_NAME = "privacy.jsonl"
ACCOUNTANT = "rdp"
MAX_LEDGER = 64 * 1024 * 1024  # bytes: far beyond any real ledger (one line ≈ 400 bytes)

_BUDGET_FIELDS = {"kind", "epsilon_budget", "delta", "accountant", "time", "prev", "hash"}
_CHARGE_FIELDS = {"kind", "coordinator", "label", "run", "round", "mechanism", "sampling_rate",
                  "noise_multiplier", "steps", "epsilon_after", "epsilon_budget", "delta", "time", "prev", "hash"}
#: What :meth:`Ledger.summary` shows of each charge.
HISTORY_FIELDS = ("time", "coordinator", "label", "run", "round", "mechanism", "sampling_rate",
                  "noise_multiplier", "steps", "epsilon_after")


class LedgerError(GateError):
    """A privacy ledger that cannot be used: unreadable, malformed, edited or truncated."""


class BudgetExceeded(FednbError):
    """A request whose accounted cost would take the party past its privacy budget; nothing was run or recorded.

    ``spent``, ``cost`` (ε after − ε spent), ``after``, ``budget`` and ``remaining`` are ε values;
    ``party`` and ``round`` say where and when, where known.
    """

    def __init__(self, *, spent: float, after: float, budget: float, delta: float,
                 party: str | None = None, round: int | None = None) -> None:
        self.spent, self.after, self.budget, self.delta = spent, after, budget, delta
        self.cost = after - spent
        self.remaining = max(budget - spent, 0.0)
        self.party, self.round = party, round
        where = f" at {party}" if party else ""
        super().__init__(
            f"privacy budget exceeded{where}: ε spent {spent:.4g} of {budget:.4g} (δ = {delta:g}); "
            f"this request would cost ε {self.cost:.4g} (ε {after:.4g} after); ε left {self.remaining:.4g}")


def ledger_path(directory: str | os.PathLike[str]) -> Path:
    """Where a party directory keeps its ledger."""
    return Path(directory) / LEDGER_NAME


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON, its own ``hash`` field left out."""
    return hashlib.sha256(_encode({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _encode(record: Mapping[str, Any]) -> bytes:
    # sorted keys and compact separators: one record has one byte string, so one hash;
    # floats are written by repr and read back bit for bit
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def check_budget(epsilon_budget: float, delta: float) -> tuple[float, float]:
    if isinstance(epsilon_budget, bool) or not isinstance(epsilon_budget, (int, float)) \
            or not math.isfinite(epsilon_budget) or epsilon_budget <= 0:
        raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(epsilon_budget), float(delta)


def _parse(path: Path, data: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record of a ledger file and the hash of each line; LedgerError at the first problem."""
    records: list[dict[str, Any]] = []
    hashes: list[str] = []
    if not data:
        return records, hashes
    if not data.endswith(b"\n"):
        raise LedgerError(f"the privacy ledger {path} ends in an incomplete line: it was truncated or edited")
    previous = GENESIS
    for number, line in enumerate(data[:-1].split(b"\n"), 1):

        def bad(problem: str) -> LedgerError:
            return LedgerError(f"the privacy ledger {path} does not verify: line {number} {problem}; "
                               "the party will not spend budget it cannot account")

        try:
            record = json.loads(line, parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError):
            raise bad("is not valid JSON") from None
        if not isinstance(record, dict):
            raise bad("is not a JSON object")
        if _encode(record) != line or record.get("hash") != record_hash(record):
            raise bad("was changed after it was written (its hash or its bytes are not those fednb wrote)")
        if record.get("prev") != previous:
            raise bad(f"does not carry the hash of line {number - 1}: a line before it was changed, inserted "
                      "or removed" if number > 1 else "is not the first line of a ledger")
        kind = record.get("kind")
        fields = _BUDGET_FIELDS if kind == "budget" else _CHARGE_FIELDS if kind == "charge" else None
        if fields is None:
            raise bad(f"has an unknown kind {kind!r}")
        if set(record) != fields:
            raise bad(f"has the fields {sorted(record)}, not those of a {kind} line")
        if number == 1 and kind != "budget":
            raise bad("is not a budget line")
        try:
            check_budget(record["epsilon_budget"], record["delta"])
            if kind == "charge":
                _mechanism(record)
                _check_charge_types(record)
                if record["delta"] != records[0]["delta"]:
                    raise ValueError(f"δ {record['delta']!r} differs from the ledger's {records[0]['delta']!r}")
            elif record["accountant"] != ACCOUNTANT:
                raise ValueError(f"accountant {record['accountant']!r} is not {ACCOUNTANT!r}")
            elif records and record["delta"] != records[0]["delta"]:
                raise ValueError(f"δ {record['delta']!r} differs from the ledger's {records[0]['delta']!r}")
        except (ValueError, TypeError) as exc:
            raise bad(f"holds a bad value: {exc}") from None
        records.append(record)
        previous = record["hash"]
        hashes.append(previous)
    return records, hashes


def _check_charge_types(record: Mapping[str, Any]) -> None:
    """The request fields of a charge line have the types :meth:`Ledger.charge` writes."""
    for key in ("coordinator", "run", "time"):
        if not isinstance(record[key], str):
            raise ValueError(f"{key} is not a string")
    if record["label"] is not None and not isinstance(record["label"], str):
        raise ValueError("label is neither a string nor null")
    if record["round"] is not None and (isinstance(record["round"], bool) or not isinstance(record["round"], int)):
        raise ValueError("round is neither an integer nor null")
    after = record["epsilon_after"]
    if isinstance(after, bool) or not isinstance(after, (int, float)) or not after >= 0:
        raise ValueError("epsilon_after is not a number >= 0")


def _mechanism(record: Mapping[str, Any]) -> Mechanism:
    if record["mechanism"] not in KINDS:
        raise ValueError(f"mechanism {record['mechanism']!r} is not one of {', '.join(KINDS)}")
    return Mechanism(kind=record["mechanism"], sampling_rate=record["sampling_rate"],
                     noise_multiplier=record["noise_multiplier"], steps=record["steps"])


class Ledger:
    """A party's privacy ledger in one file (see the module docstring).

    ``Ledger(path, epsilon_budget, delta)`` opens (or creates) the ledger the party spends
    from; ``Ledger(path)`` opens an existing one to read (``fednb privacy PARTY_DIR``), with
    the budget and δ it records. LedgerError when the file does not verify or was accounted at
    another δ; ValueError for bad arguments.
    """

    def __init__(self, path: str | os.PathLike[str], epsilon_budget: float | None = None,
                 delta: float | None = None) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(f".{self.path.name}.lock")
        if (epsilon_budget is None) != (delta is None):
            raise ValueError("give both epsilon_budget and delta (to spend), or neither (to read)")
        if epsilon_budget is not None and delta is not None:
            budget, checked_delta = check_budget(epsilon_budget, delta)
            with self._locked(fcntl.LOCK_EX):
                self._load()
                if not self._records:
                    self._append({"kind": "budget", "epsilon_budget": budget, "delta": checked_delta,
                                  "accountant": ACCOUNTANT})
                elif checked_delta != self.delta:
                    raise LedgerError(
                        f"the privacy ledger {self.path} accounts at δ = {self.delta:g}, not δ = {checked_delta:g}: "
                        f"open it with δ = {self.delta:g}, or move it aside to start a new budget")
                elif budget != self.epsilon_budget:  # the owner changed the budget: recorded, in order
                    self._append({"kind": "budget", "epsilon_budget": budget, "delta": checked_delta,
                                  "accountant": ACCOUNTANT})
        else:
            # no lock to read: every write is an atomic rename, so a reader sees the old file or the
            # new one, and the owner's tools may read a directory they cannot write
            self._load()
            if not self._records:
                raise LedgerError(f"there is no privacy ledger at {self.path}")

    # -- state ------------------------------------------------------------------------------

    @property
    def epsilon_budget(self) -> float:
        return float(self._budget_record()["epsilon_budget"])

    @property
    def delta(self) -> float:
        return float(self._records[0]["delta"])

    @property
    def history(self) -> list[Mechanism]:
        """Every mechanism charged, oldest first."""
        return [_mechanism(r) for r in self._records if r["kind"] == "charge"]

    @property
    def spent(self) -> float:
        return epsilon(self.history, self.delta)

    @property
    def remaining(self) -> float:
        return max(self.epsilon_budget - self.spent, 0.0)

    def head(self) -> str:
        """The ``hash`` of the last line (64 zeros for an empty ledger): what the audit log records."""
        return self._hashes[-1] if self._hashes else GENESIS

    def check_head(self, expected: str) -> int:
        """Check the ledger against a head the audit log recorded; returns how many lines came after it.

        Lines after ``expected`` are charges made after the last audit entry (a crash between the
        two writes): they only overstate what was spent, so they pass. A head not in the chain
        means lines were removed or the chain rewritten: LedgerError.
        """
        if expected == self.head():
            return 0
        if expected in self._hashes:
            return len(self._hashes) - 1 - self._hashes.index(expected)
        if expected == GENESIS:
            return len(self._hashes)
        raise LedgerError(f"the privacy ledger {self.path} does not contain the head {expected[:12]}… the audit log "
                          "recorded: lines were removed or the ledger was rewritten")

    # -- spending ---------------------------------------------------------------------------

    def preview(self, mechanism: Mechanism) -> tuple[float, float]:
        """(ε spent, ε after ``mechanism``) without recording anything."""
        history = self.history
        return epsilon(history, self.delta), epsilon([*history, mechanism], self.delta)

    def charge(self, mechanism: Mechanism, *, coordinator: str, run: str, round: int | None = None,
               label: str | None = None, party: str | None = None) -> dict[str, Any]:
        """Record ``mechanism`` as spent for this request and return its entry, or raise BudgetExceeded
        (leaving the file as it was) when ε after would pass the budget.

        The file is read back and verified under the lock first, so what is charged is
        accounted against every charge made so far, by any process.
        """
        if not isinstance(mechanism, Mechanism):
            raise ValueError(f"mechanism must be a Mechanism, got {type(mechanism).__name__}")
        if not isinstance(coordinator, str) or not isinstance(run, str):
            raise ValueError("coordinator and run must be strings")
        if round is not None and (isinstance(round, bool) or not isinstance(round, int)):
            raise ValueError(f"round must be an integer or None, got {round!r}")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"label must be a string or None, got {label!r}")
        with self._locked(fcntl.LOCK_EX):
            self._load()
            if not self._records:
                raise LedgerError(f"the privacy ledger {self.path} disappeared; the party will not spend without it")
            spent, after = self.preview(mechanism)
            budget = self.epsilon_budget
            if not after <= budget:  # also refuses an ε of inf or NaN
                raise BudgetExceeded(spent=spent, after=after, budget=budget, delta=self.delta,
                                     party=party, round=round)
            return self._append({
                "kind": "charge", "coordinator": coordinator, "label": label, "run": run, "round": round,
                "mechanism": mechanism.kind, "sampling_rate": mechanism.sampling_rate,
                "noise_multiplier": mechanism.noise_multiplier, "steps": mechanism.steps,
                "epsilon_after": after, "epsilon_budget": budget, "delta": self.delta,
            })

    # -- views ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Spent, budget, remaining and per-charge history as plain JSON values (for replies and ``fed.privacy()``)."""
        spent = self.spent
        return {
            "epsilon_spent": spent,
            "epsilon_budget": self.epsilon_budget,
            "epsilon_remaining": max(self.epsilon_budget - spent, 0.0),
            "delta": self.delta,
            "accountant": ACCOUNTANT,
            "head": self.head(),
            "history": [{key: r[key] for key in HISTORY_FIELDS} for r in self._records if r["kind"] == "charge"],
        }

    def format_table(self) -> str:
        """The ledger as ``fednb privacy PARTY_DIR`` prints it."""
        summary = self.summary()
        header = ("time", "coordinator", "run", "round", "mechanism", "q", "noise", "steps", "ε after")
        rows = [(
            str(h["time"])[:19].replace("T", " "),
            f"{h['label']} ({h['coordinator'][:12]})" if h["label"] else str(h["coordinator"])[:12],
            str(h["run"])[:12], "-" if h["round"] is None else str(h["round"]), str(h["mechanism"]),
            f"{h['sampling_rate']:.4g}", f"{h['noise_multiplier']:.4g}", str(h["steps"]), f"{h['epsilon_after']:.4g}",
        ) for h in summary["history"]]
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]
        lines = [
            f"privacy ledger {self.path}",
            f"ε spent {summary['epsilon_spent']:.4g} of {summary['epsilon_budget']:.4g} "
            f"(δ = {summary['delta']:g}, {ACCOUNTANT.upper()} accountant); ε left {summary['epsilon_remaining']:.4g}",
            "",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        if not rows:
            lines.append("(no charges yet)")
        return "\n".join(lines)

    # -- the file ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot lock the privacy ledger {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read(MAX_LEDGER + 1)
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc.strerror}") from None
        if len(data) > MAX_LEDGER:
            raise LedgerError(f"the privacy ledger {self.path} is larger than {MAX_LEDGER} bytes")
        self._data = data
        self._records, self._hashes = _parse(self.path, data)

    def _budget_record(self) -> dict[str, Any]:
        return next(r for r in reversed(self._records) if r["kind"] == "budget")

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one more line (``time`` and ``prev`` added); called under the exclusive lock."""
        record = {**record, "time": _now(), "prev": self.head()}
        record["hash"] = record_hash(record)
        line = _encode(record)
        try:
            write_atomic(self.path, self._data + line + b"\n")
        except OSError as exc:
            raise LedgerError(f"could not write the privacy ledger {self.path}: {exc}") from exc
        self._data += line + b"\n"
        self._records.append(record)
        self._hashes.append(record["hash"])
        return dict(record)


def history_of(records: Sequence[Mapping[str, Any]]) -> list[Mechanism]:
    """The mechanisms in ``summary()['history']`` entries (as replies carry them), oldest first."""
    return [_mechanism(r) for r in records]
