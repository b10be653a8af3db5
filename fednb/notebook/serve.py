"""A party inside the data owner's own notebook (``%fed_serve``), with an approvals widget.

:func:`serve_in_notebook` starts a :class:`~fednb.party.server.PartyServer` in the background of
this kernel (its coordinator code runs in worker processes, never in the kernel) and returns it
with an :class:`ApprovalsWidget`: the requests that wait for the owner, each with its code, who
asked and what it would return, and Approve / Deny buttons. The widget reads and writes the
party directory, as ``fednb approve`` does, so either may decide. A party with a privacy budget
(``dp_epsilon``) also shows its owner the ledger, read again whenever the file changes: ε spent,
budget and left, and the latest charges (what ``fednb privacy PARTY_DIR`` prints).
"""

from __future__ import annotations

import html
import logging
import math
import os
import pathlib
import threading
from collections.abc import Mapping
from typing import Any

import anywidget
import traitlets as t

from fednb.errors import FednbError
from fednb.party import Datasets, EgressRules, PartyServer
from fednb.party.approvals import Approvals, Pending, check_hash, parse_until
from fednb.party.directory import default_directory, open_directory
from fednb.party.sandbox import DEFAULT_MEMORY_LIMIT, DEFAULT_TIME_LIMIT
from fednb.privacy.ledger import Ledger, LedgerError, ledger_path
from fednb.transport import AllowList, check_security, key_paths, load_keypair

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between looks at the party directory
RECENT_CHARGES = 5  # charges of the ledger the widget lists, newest last


def _row(entry: Pending) -> dict[str, Any]:
    return {"hash": entry.hash, "kind": entry.kind, "coordinator": entry.coordinator, "requested": entry.requested,
            "count": entry.count, "returns": entry.returns, "code": dict(entry.code), "refused": entry.refused}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def ledger_view(path: pathlib.Path, *, budget: bool) -> dict[str, Any]:
    """The privacy ledger at ``path`` as the widget shows it: ``state`` "ok" with ε spent, budget,
    left, δ, the number of charges and the latest ones; "none" (no ledger yet) or "error" with a
    ``message``; ``{}`` for a party with no budget and no ledger."""
    if not path.exists():
        return {"state": "none", "message": "no ledger yet"} if budget else {}
    try:
        summary = Ledger(path).summary()
    except LedgerError as exc:
        if not path.exists():  # moved aside between the two looks
            return {"state": "none", "message": "no ledger yet"} if budget else {}
        return {"state": "error", "message": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    history = summary.get("history") or []
    recent = []
    for entry in history[-RECENT_CHARGES:]:
        label, coordinator = entry.get("label"), str(entry.get("coordinator") or "")
        recent.append({"time": str(entry.get("time") or "")[:19].replace("T", " "),
                       "by": f"{label} ({coordinator[:12]})" if label else coordinator[:12],
                       "run": str(entry.get("run") or "")[:12],
                       "round": entry.get("round") if isinstance(entry.get("round"), int) else None,
                       "mechanism": str(entry.get("mechanism") or ""),
                       "epsilon_after": _finite(entry.get("epsilon_after"))})
    return {"state": "ok", "epsilon_spent": _finite(summary.get("epsilon_spent")),
            "epsilon_budget": _finite(summary.get("epsilon_budget")),
            "epsilon_remaining": _finite(summary.get("epsilon_remaining")), "delta": _finite(summary.get("delta")),
            "charges": len(history), "recent": recent}


def _epsilon(value: Any) -> str:
    return "?" if value is None else f"{value:.4g}"


class ApprovalsWidget(anywidget.AnyWidget):
    """Requests awaiting the owner of one party, with Approve / Deny; a text summary outside a browser."""

    _esm = pathlib.Path(__file__).with_name("approvals.js")
    _css = pathlib.Path(__file__).with_name("approvals.css")

    party = t.Unicode("").tag(sync=True)
    policy = t.Unicode("").tag(sync=True)
    endpoint = t.Unicode("").tag(sync=True)
    pending = t.List(t.Dict()).tag(sync=True)  # rows: hash, kind, coordinator, requested, count, returns, code, refused
    decided = t.List(t.Unicode()).tag(sync=True)  # the latest decisions, newest last
    error = t.Unicode("").tag(sync=True)
    ledger = t.Dict().tag(sync=True)  # the party's privacy ledger (see ledger_view); {} without a budget

    def __init__(self, directory: str | os.PathLike[str], *, party: str = "", policy: str = "review",
                 endpoint: str = "", budget: bool = False, **kwargs: Any) -> None:
        """``budget``: the party has a privacy budget, so a missing ledger is worth saying."""
        super().__init__(party=party, policy=policy, endpoint=endpoint, **kwargs)
        self.server: PartyServer | None = None
        where = open_directory(directory, create=False)
        self.approvals = Approvals(where, party)
        self._ledger_path = ledger_path(where)
        self._budget = budget
        self._ledger_seen: tuple[int, int, int] | None = None  # (inode, size, mtime) of the ledger last read
        self._lock = threading.Lock()
        self.on_msg(self._on_message)
        self.refresh()

    def refresh(self) -> None:
        """Read the pending requests again, and the ledger if it changed (the watcher thread calls
        this twice a second)."""
        rows = [_row(entry) for entry in self.approvals.pending()]
        with self._lock:
            if rows != self.pending:
                self.pending = rows
        self._refresh_ledger()

    def _refresh_ledger(self) -> None:
        try:
            info = os.stat(self._ledger_path)
            seen: tuple[int, int, int] | None = (info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen is not None and seen == self._ledger_seen:
                return  # every write replaces the file: the same inode, size and time mean the same ledger
            view = ledger_view(self._ledger_path, budget=self._budget)
            self._ledger_seen = seen
            if view != self.ledger:
                self.ledger = view

    def approve(self, code_hash: str, *, rounds: int | None = None, until: str | None = None) -> None:
        """Approve a pending request's code (optionally for ``rounds`` uses, or ``until`` a date)."""
        full = self.approvals.resolve(code_hash)
        self.approvals.approve(full, rounds=rounds, until=parse_until(until) if until else None,
                               by="the %fed_serve widget")
        self._decided(f"approved {full[:12]}" + (f" for {rounds} round(s)" if rounds else ""))

    def deny(self, code_hash: str) -> None:
        """Deny a pending request's code: it and later requests with it are refused."""
        full = self.approvals.resolve(code_hash)
        self.approvals.deny(full, by="the %fed_serve widget")
        self._decided(f"denied {full[:12]}")

    def _decided(self, line: str) -> None:
        log.info("%s: %s", self.party, line)
        self.decided = [*self.decided[-9:], line]
        self.error = ""
        self.refresh()

    def _on_message(self, widget: Any, content: Any, buffers: Any) -> None:
        """A button: ``{"action": "approve" | "deny", "hash": HASH, "rounds": N | null}``."""
        try:
            if not isinstance(content, dict) or content.get("action") not in ("approve", "deny"):
                raise ValueError(f"unknown message {str(content)[:80]!r}")
            code_hash = check_hash(content.get("hash", ""))
            rounds = content.get("rounds")
            if rounds is not None and (not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1):
                raise ValueError("rounds must be a positive whole number")
            if content["action"] == "approve":
                self.approve(code_hash, rounds=rounds)
            else:
                self.deny(code_hash)
        except (ValueError, FednbError) as exc:
            log.warning("approvals widget: %s", exc)
            self.error = str(exc)

    def summary_text(self) -> str:
        head = f"party {self.party} (policy {self.policy}) on {self.endpoint or '…'}"
        if not self.pending:
            lines = [head + ": nothing awaits approval"]
        else:
            lines = [head + f": {len(self.pending)} request(s) await approval"]
            for row in self.pending:
                code = (row["code"].get("cell") or row["code"].get("model") or "").strip()
                first = code.splitlines()[0][:60] if code else ""
                lines.append(f"  {row['kind']} {row['hash'][:12]} from {row['coordinator']}: {first}")
            lines.append("  approve with widget.approve(HASH) or `fednb approve DIR --approve HASH`")
        return "\n".join(lines + self._ledger_lines())

    def _ledger_lines(self) -> list[str]:
        ledger = self.ledger
        if not ledger:
            return []
        if ledger.get("state") != "ok":
            return [f"privacy ledger: {ledger.get('message', '')}"]
        lines = [f"privacy budget: ε {_epsilon(ledger['epsilon_spent'])} spent of {_epsilon(ledger['epsilon_budget'])} "
                 f"(δ = {_epsilon(ledger['delta'])}); ε {_epsilon(ledger['epsilon_remaining'])} left; "
                 f"{ledger['charges']} charge(s)"]
        for entry in ledger.get("recent", []):
            where = f"round {entry['round']}" if entry["round"] is not None else "no round"
            lines.append(f"  {entry['time']}  {entry['mechanism']} for {entry['by']}, run {entry['run']}, {where}: "
                         f"ε {_epsilon(entry['epsilon_after'])} after")
        return lines

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle or {}, {})
        data = dict(data)
        data["text/plain"] = self.summary_text()
        data.setdefault("text/html", f"<pre>{html.escape(self.summary_text())}</pre>")
        return data, metadata


def _watch(server: PartyServer, widget: ApprovalsWidget) -> None:
    """Keep the widget's pending list current until the party stops."""
    while not server.stopped.wait(POLL):
        try:
            widget.refresh()
        except (OSError, FednbError) as exc:
            log.warning("approvals widget: %s", exc)


def serve_in_notebook(name: str, listen: str, data: Mapping[str, str], *, key: str | None = None,
                      authorized_keys: str | None = None, policy: str = "review", label: str | None = None,
                      directory: str | os.PathLike[str] | None = None, time_limit: float = DEFAULT_TIME_LIMIT,
                      memory_limit: int = DEFAULT_MEMORY_LIMIT, egress: EgressRules | None = None,
                      devices: tuple[str, ...] = (), allow_weak_containment: bool = False,
                      require_secure_aggregation: bool = False, min_aggregate: int = 3,
                      dp_epsilon: float | None = None, dp_delta: float = 1e-5,
                      ) -> tuple[PartyServer, ApprovalsWidget]:
    """Serve this notebook's data as party ``name`` on ``listen`` in the background.

    ``data`` maps ``train`` (required) and ``test`` to .npz/.csv files; ``key`` and
    ``authorized_keys`` as for ``fednb party`` (a tcp endpoint needs both). Approvals, pending
    requests and the audit log live in ``directory`` (default ``~/.fednb/NAME``). Returns the
    running server (``server.stop()`` ends it) and the widget to display. Coordinator code runs
    contained as with ``fednb party`` (``devices`` bound in; ``allow_weak_containment`` as its flag);
    ``require_secure_aggregation`` and ``min_aggregate`` as ``fednb party``'s flags of those names.
    ``dp_epsilon`` and ``dp_delta``: the privacy budget of the training data, kept in the
    directory's ledger (``fednb party --dp-epsilon/--dp-delta``); the widget shows the ledger.
    """
    if listen.startswith("tcp://") and not (key and authorized_keys):
        raise ValueError("a tcp endpoint needs key= and authorized_keys=: every TCP endpoint uses CURVE")
    if authorized_keys and not key:
        raise ValueError("authorized_keys needs key= (the party's own keypair)")
    if set(data) - {"train", "test"} or "train" not in data:
        raise ValueError("data maps 'train' (required) and 'test' to files")
    keypair = load_keypair(key) if key else None
    check_security(listen, keypair is not None)
    allow = AllowList(authorized_keys) if authorized_keys else None
    datasets = Datasets.from_files(dict(data), label=label)
    where = open_directory(directory or default_directory(name), create=True)
    private = tuple(str(p) for p in (*(key_paths(key)[1:] if key else ()), authorized_keys) if p)
    budget: dict[str, Any] = {} if dp_epsilon is None else {"dp_epsilon": dp_epsilon, "dp_delta": dp_delta}
    server = PartyServer(name, listen, datasets, keypair=keypair, allow=allow, policy=policy, directory=where,
                         egress=egress, time_limit=time_limit, memory_limit=memory_limit, devices=tuple(devices),
                         allow_weak_containment=allow_weak_containment, private_paths=private,
                         require_secure_aggregation=require_secure_aggregation, min_aggregate=min_aggregate,
                         **budget)
    server.start()
    try:
        widget = ApprovalsWidget(where, party=name, policy=policy, endpoint=server.endpoint,
                                 budget=dp_epsilon is not None)
    except BaseException:
        server.stop()
        raise
    widget.server = server  # not synced: `widget.server.stop()` ends the party shown
    watcher = threading.Thread(target=_watch, args=(server, widget), name=f"fednb-approvals-{name}", daemon=True)
    watcher.start()
    return server, widget
