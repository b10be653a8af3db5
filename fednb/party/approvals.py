"""The owner's decisions by code hash, and the requests that wait for one.

``approvals.json`` maps hashes to approvals (optionally for ``rounds`` uses or ``until`` a
time) and denials; ``pending/HASH.json`` describes a request the owner has not decided: its
code, who asked, what it would return. The party and the owner's tools (``fednb approve``,
the ``%fed_serve`` widget) may be different processes: every change happens under the
directory's lock and is written atomically, and the party notices a new file by its stamp.

A malformed approvals file approves nothing (fail closed) and is reported, never rewritten.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednb.errors import GateError
from fednb.party.directory import locked, read_json, stamp, write_json
from fednb.party.policy import RequestCode

log = logging.getLogger(__name__)

VERSION = 1
MAX_PENDING = 256  # requests kept for review; beyond them a request is refused, not kept waiting unseen
_HASH = re.compile(r"[0-9a-f]{64}")
_KINDS = ("train", "evaluate", "run", "unknown")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_until(text: str) -> dt.datetime:
    """``--until``: an ISO date (valid to the end of that day, local time) or date and time."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            day = dt.date.fromisoformat(text.strip())
            moment = dt.datetime.combine(day, dt.time(23, 59, 59)).astimezone()
        else:
            moment = dt.datetime.fromisoformat(text.strip())
            if moment.tzinfo is None:
                moment = moment.astimezone()
    except ValueError:
        raise ValueError(f"--until needs a date like 2026-06-30 or 2026-06-30T18:00, got {text!r}") from None
    if moment <= now():
        raise ValueError(f"--until {text} is in the past")
    return moment.astimezone(dt.timezone.utc)


def check_hash(text: str) -> str:
    if not isinstance(text, str) or not _HASH.fullmatch(text):
        raise ValueError(f"a code hash is 64 lowercase hex digits, got {str(text)[:80]!r}")
    return text


@dataclass(frozen=True)
class Pending:
    """A request the owner has not decided, as ``fednb approve`` and the widget show it."""

    hash: str
    kind: str
    coordinator: str
    requested: str
    count: int
    code: dict[str, str | None]
    returns: str
    companions: tuple[str, ...]
    refused: bool  # under allowlist it was refused at once; approving it lets it run next time

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "hash": self.hash, "kind": self.kind, "coordinator": self.coordinator,
                "requested": self.requested, "count": self.count, "code": dict(self.code), "returns": self.returns,
                "companions": list(self.companions), "refused": self.refused}

    @classmethod
    def from_json(cls, raw: Any, source: Path) -> Pending:
        def fail(why: str) -> GateError:
            return GateError(f"{source} is not a pending request: {why}")

        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise fail("not an object of version 1")
        fields = {k: raw.get(k) for k in ("hash", "kind", "coordinator", "requested", "returns")}
        text = {k: v for k, v in fields.items() if isinstance(v, str)}
        if len(text) != len(fields):
            raise fail("hash, kind, coordinator, requested and returns must be strings")
        if not _HASH.fullmatch(text["hash"]) or text["kind"] not in _KINDS:
            raise fail("bad hash or kind")
        code, companions = raw.get("code"), raw.get("companions")
        if not isinstance(code, dict) or set(code) != {"model", "cell", "loop"} or \
                not all(v is None or isinstance(v, str) for v in code.values()):
            raise fail("code must have model, cell and loop (strings or null)")
        if not isinstance(companions, list) or not all(isinstance(c, str) and _HASH.fullmatch(c) for c in companions):
            raise fail("companions must be a list of hashes")
        count, refused = raw.get("count"), raw.get("refused")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1 or not isinstance(refused, bool):
            raise fail("count must be a positive integer and refused a boolean")
        return cls(text["hash"], text["kind"], text["coordinator"], text["requested"], count, code,
                   text["returns"], tuple(companions), refused)


def _empty() -> dict[str, Any]:
    return {"version": VERSION, "approved": {}, "denied": {}}


def _check_time(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("times must be ISO strings")
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return moment


def check_approvals(raw: Any, source: Path) -> dict[str, Any]:
    """``raw`` when it is a well-formed approvals document, else GateError saying what is wrong."""
    try:
        if not isinstance(raw, dict) or set(raw) != {"version", "approved", "denied"} or raw["version"] != VERSION:
            raise ValueError("expected an object with version 1, approved and denied")
        for section in ("approved", "denied"):
            if not isinstance(raw[section], dict):
                raise ValueError(f"{section} must be an object")
            for key, entry in raw[section].items():
                check_hash(key)
                if not isinstance(entry, dict) or not isinstance(entry.get("by", ""), str) or \
                        entry.get("kind", "unknown") not in _KINDS:
                    raise ValueError(f"{section} entry {key[:12]} is malformed")
                _check_time(entry.get("at"))
                if section == "approved":
                    rounds = entry.get("rounds")
                    if rounds is not None and (not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0):
                        raise ValueError(f"approval {key[:12]}: rounds must be a non-negative integer or null")
                    _check_time(entry.get("until"))
    except ValueError as exc:
        raise GateError(f"{source} is malformed ({exc}); fix it or move it away "
                        "(nothing is approved meanwhile)") from None
    return raw


class Approvals:
    """The approvals file and pending requests of one party directory."""

    def __init__(self, directory: Path, party: str = "") -> None:
        self.directory = directory
        self.party = party
        self.path = directory / "approvals.json"
        self.pending_dir = directory / "pending"
        self._stamp: tuple[int, int, int] | None = None
        self._data = _empty()
        self._broken = False
        self._load(strict=True)

    # -- reading ------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return _empty()
        return check_approvals(read_json(self.path), self.path)

    def _load(self, strict: bool) -> None:
        self._stamp = stamp(self.path)
        try:
            self._data = self._read()
            self._broken = False
        except GateError as exc:
            if strict:
                raise
            if not self._broken:
                log.error("%s", exc)
            self._data, self._broken = _empty(), True

    def refresh(self) -> bool:
        """Reload the approvals when their file changed; True when it did."""
        if stamp(self.path) == self._stamp:
            return False
        self._load(strict=False)
        return True

    def standing(self, code_hash: str, at: dt.datetime | None = None) -> str:
        """``approved``, ``denied`` or ``unknown`` (never decided, expired, or its rounds used up)."""
        self.refresh()
        if code_hash in self._data["denied"]:
            return "denied"
        entry = self._data["approved"].get(code_hash)
        if entry is None or entry.get("rounds") == 0:
            return "unknown"
        until = _check_time(entry.get("until"))
        if until is not None and (at or now()) > until:
            return "unknown"
        return "approved"

    def approved(self) -> dict[str, dict[str, Any]]:
        self.refresh()
        return {k: dict(v) for k, v in self._data["approved"].items()}

    def denied(self) -> dict[str, dict[str, Any]]:
        self.refresh()
        return {k: dict(v) for k, v in self._data["denied"].items()}

    # -- deciding -----------------------------------------------------------------------------

    def _change(self, edit: Any) -> Any:
        with locked(self.directory):
            data = self._read()  # strict: never overwrite a file we could not read
            result = edit(data)
            write_json(self.path, data)
            self._load(strict=False)
        return result

    def use(self, code_hash: str) -> None:
        """Count one round (train) or one run against an approval limited by ``rounds``."""
        def edit(data: dict[str, Any]) -> None:
            entry = data["approved"].get(code_hash)
            if entry is not None and entry.get("rounds"):
                entry["rounds"] -= 1
                if entry["rounds"] == 0:
                    del data["approved"][code_hash]

        entry = self._data["approved"].get(code_hash)
        if entry is not None and entry.get("rounds"):
            self._change(edit)

    def approve(self, code_hash: str, *, rounds: int | None = None, until: dt.datetime | None = None,
                by: str = "") -> list[str]:
        """Approve a hash (and its companions, for the pending request it names); returns them all."""
        check_hash(code_hash)
        if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
            raise ValueError("--rounds must be a positive integer")
        request = self.find_pending(code_hash)
        kind = request.kind if request else "unknown"
        stamp_ = now().isoformat(timespec="seconds")
        hashes = [code_hash, *(request.companions if request else ())]

        def edit(data: dict[str, Any]) -> None:
            for index, key in enumerate(hashes):
                data["denied"].pop(key, None)
                data["approved"][key] = {
                    "kind": kind if index == 0 else "evaluate", "at": stamp_, "by": by,
                    "rounds": rounds if index == 0 else None,
                    "until": until.isoformat(timespec="seconds") if until else None,
                }

        self._change(edit)
        for key in hashes:
            self.drop_pending(key)
        return hashes

    def deny(self, code_hash: str, *, by: str = "") -> None:
        """Deny a hash: requests with it are refused at once, and any approval of it ends."""
        check_hash(code_hash)
        request = self.find_pending(code_hash)

        def edit(data: dict[str, Any]) -> None:
            data["approved"].pop(code_hash, None)
            data["denied"][code_hash] = {"kind": request.kind if request else "unknown",
                                         "at": now().isoformat(timespec="seconds"), "by": by}

        self._change(edit)
        self.drop_pending(code_hash)

    def resolve(self, prefix: str) -> str:
        """The full hash a prefix (at least 8 hex digits) names among pending and decided hashes."""
        prefix = prefix.strip().lower()
        if _HASH.fullmatch(prefix):
            return prefix
        if not re.fullmatch(r"[0-9a-f]{8,63}", prefix):
            raise ValueError(f"{prefix!r} is not a code hash (64 hex digits, or a unique prefix of at least 8)")
        pending = self.pending()
        known = {p.hash for p in pending} | set(self.approved()) | set(self.denied())
        matches = sorted(h for h in known if h.startswith(prefix))
        if len(matches) > 1:
            raise ValueError(f"{prefix} matches {len(matches)} code hashes ({', '.join(h[:16] for h in matches[:4])}"
                             f"{', …' if len(matches) > 4 else ''}); give more digits")
        if not matches:
            waiting = "; ".join(f"{p.hash[:12]} ({p.kind} from {p.coordinator})" for p in pending[:8])
            more = f" and {len(pending) - 8} more" if len(pending) > 8 else ""
            raise ValueError(f"no pending request matches {prefix}: " +
                             (f"pending in {self.directory}: {waiting}{more}" if pending
                              else f"nothing is pending in {self.directory}"))
        return matches[0]

    # -- pending requests -----------------------------------------------------------------------

    def add_pending(self, code: RequestCode, coordinator: str, returns: str, *, refused: bool = False) -> bool:
        """Record a request for the owner to review; False when too many wait already."""
        path = self.pending_dir / f"{code.hash}.json"
        with locked(self.directory):
            previous = self._read_pending(path) if path.exists() else None
            if previous is None and len(list(self.pending_dir.glob("*.json"))) >= MAX_PENDING:
                log.warning("%d requests await review already; not recording %s", MAX_PENDING, code.hash[:12])
                return False
            entry = Pending(code.hash, code.kind, coordinator, now().isoformat(timespec="seconds"),
                            (previous.count + 1) if previous else 1, code.parts(), returns, code.companions, refused)
            write_json(path, entry.to_json())
        return True

    def _read_pending(self, path: Path) -> Pending | None:
        try:
            return Pending.from_json(read_json(path), path)
        except GateError as exc:
            log.warning("ignoring %s", exc)
            return None

    def pending(self) -> list[Pending]:
        """Requests awaiting a decision, oldest first (decided or malformed files are left out)."""
        decided = set(self.approved()) | set(self.denied())
        found = []
        for path in sorted(self.pending_dir.glob("*.json")):
            entry = self._read_pending(path)
            if entry is not None and entry.hash not in decided and path.stem == entry.hash:
                found.append(entry)
        return sorted(found, key=lambda p: p.requested)

    def find_pending(self, code_hash: str) -> Pending | None:
        path = self.pending_dir / f"{code_hash}.json"
        return self._read_pending(path) if path.exists() else None

    def drop_pending(self, code_hash: str) -> None:
        try:
            (self.pending_dir / f"{check_hash(code_hash)}.json").unlink()
        except FileNotFoundError:
            return
