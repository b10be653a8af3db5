"""The kernel's side of the JupyterLab Federation sidebar: a comm target that pushes state.

``%load_ext fednb`` installs a :class:`SidebarBridge` in a kernel. It registers the comm
target ``fednb.sidebar`` (each JupyterLab notebook with the extension opens its own comm
there) and rings a doorbell: a kernel-opened comm on the same target that tells the
front ends "fednb is loaded here", and that ``comm_info`` lists for front ends that attach
later (a page reload, a second notebook on the kernel). The panel never runs code in the
kernel to read state: it renders the snapshots sent here and asks only for ``refresh``,
``stop``, ``approve`` and ``deny`` (see :mod:`fednb.notebook.sidebar_state`).

Federation events arrive on background threads; they only mark the state dirty. One
thread sends at most one snapshot per ``interval`` (the last change always goes out), and
one every ``refresh_every`` seconds while there is a federation, so "last seen" stays fresh.
Comm messages go out over ipykernel's IOPub thread, which is safe from any thread. The
panel's requests may arrive on another thread (JupyterLab 4.6 sends comm messages to an
ipykernel 7 subshell), and a foreground ``%fed_train`` awaits its run, so a stop is heard
while it trains; the panel interrupts a busy kernel that does not answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fednb.errors import FednbError
from fednb.notebook.session import Session
from fednb.notebook.sidebar_state import (TARGET, VERSION, Request, RunTracker, approval_rows, parse_request,
                                          listed, party_rows, secure_badge, snapshot)

log = logging.getLogger(__name__)

MAX_COMMS = 16  # comms of front ends that went away (page reloads) are never closed; keep the newest


class SidebarBridge:
    """Sends the session's federation, training run and pending approvals to JupyterLab panels."""

    def __init__(self, session: Session, comm_manager: Any, create_comm: Callable[..., Any], *,
                 interval: float = 0.15, refresh_every: float = 5.0) -> None:
        self._session = session
        self._unwatch: Callable[[], None] | None = None
        self._manager = comm_manager
        self._create_comm = create_comm
        self._interval = interval
        self._refresh_every = refresh_every
        self._lock = threading.Condition()
        self._comms: list[Any] = []
        self._doorbell: Any = None
        self._dirty = False
        self._closed = False
        self._seq = 0
        self._federation: Any = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tracker = RunTracker()
        self._approvals: Any = None
        self._approvals_unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="fednb-sidebar", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SidebarBridge:
        self._manager.register_target(TARGET, self._opened)
        self._unwatch = self._session.subscribe(self.changed)
        self._thread.start()
        self.changed()
        return self

    def close(self) -> None:
        """Unregister the target, close every comm and stop the sending thread (waits for it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            comms, doorbell = list(self._comms), self._doorbell
            self._comms, self._doorbell = [], None
            self._lock.notify_all()
        if self._unwatch is not None:
            self._unwatch()
        self._follow(None)
        self.serve_approvals(None)
        self._manager.unregister_target(TARGET, self._opened)
        for comm in [*comms, doorbell]:
            if comm is not None:
                comm.close()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    # -- what changed -------------------------------------------------------------------------

    def changed(self) -> None:
        """The session's federation or training run changed (the session calls this)."""
        self._follow(self._session.federation)
        with self._lock:
            ring = self._doorbell is None and not self._closed
        if ring:
            self._ring()
        self._mark_dirty()

    def serve_approvals(self, source: Any) -> None:
        """Show ``source``'s pending approval requests (a party served with ``%fed_serve``), or none.

        ``source`` needs ``pending() -> list[dict]`` (id, coordinator, kind, code, hash, age),
        ``approve(id)``, ``deny(id)`` and ``subscribe(callback) -> unsubscribe``.
        """
        if self._approvals_unsubscribe is not None:
            self._approvals_unsubscribe()
        self._approvals, self._approvals_unsubscribe = source, None
        if source is not None:
            self._approvals_unsubscribe = source.subscribe(lambda *_: self._mark_dirty())
        self._mark_dirty()

    def _follow(self, federation: Any) -> None:
        if federation is self._federation:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._federation, self._tracker = federation, RunTracker()
        if federation is not None:
            tracker = self._tracker

            def on_event(event: Any) -> None:
                tracker(event)
                self._mark_dirty()

            self._unsubscribe = federation.subscribe(on_event)

    def _mark_dirty(self) -> None:
        with self._lock:
            self._dirty = True
            self._lock.notify_all()

    # -- comms ----------------------------------------------------------------------------------

    def _ring(self) -> None:
        """Open the doorbell comm: front ends with the extension answer it by opening their own."""
        doorbell = self._create_comm(target_name=TARGET, data={"type": "hello", "version": VERSION})
        doorbell.on_msg(lambda msg: self._received(doorbell, msg))
        doorbell.on_close(lambda msg: self._forget(doorbell))
        with self._lock:
            if self._closed or self._doorbell is not None:
                stale = doorbell
            else:
                self._doorbell, stale = doorbell, None
        if stale is not None:
            stale.close()

    def _opened(self, comm: Any, msg: Any) -> None:
        """The comm target: a panel opened a comm to this kernel."""
        comm.on_msg(lambda message: self._received(comm, message))
        comm.on_close(lambda message: self._forget(comm))
        with self._lock:
            if self._closed:
                refused = True
            else:
                refused = False
                self._comms.append(comm)
                dropped, self._comms = self._comms[:-MAX_COMMS], self._comms[-MAX_COMMS:]
        if refused:
            comm.close()
            return
        for old in dropped:
            old.close()
        self._mark_dirty()

    def _forget(self, comm: Any) -> None:
        with self._lock:
            if comm in self._comms:
                self._comms.remove(comm)
            if comm is self._doorbell:
                self._doorbell = None  # a front end without the extension closed it; ring again on the next change

    def _received(self, comm: Any, msg: Any) -> None:
        data = (msg.get("content") or {}).get("data") if isinstance(msg, dict) else None
        try:
            request = parse_request(data)
        except ValueError as exc:
            log.warning("bad message from the fednb sidebar: %s", exc)
            self._reply(comm, "invalid", False, str(exc))
            return
        ok, message = self._act(request)
        self._reply(comm, request.type, ok, message)
        self._mark_dirty()

    def _act(self, request: Request) -> tuple[bool, str]:
        if request.type == "refresh":
            return True, ""
        if request.type == "stop":
            return self._stop()
        source = self._approvals
        if source is None:
            return False, "this kernel serves no party (start one with %fed_serve)"
        try:
            (source.approve if request.type == "approve" else source.deny)(request.id)
        except (KeyError, ValueError, FednbError) as exc:
            return False, f"cannot {request.type} {str(request.id)[:12]}: {str(exc).strip(chr(39))}"
        return True, f"{request.type}d {str(request.id)[:12]}"

    def _stop(self) -> tuple[bool, str]:
        if not self._session.stop_training():
            return False, "nothing is training"
        self._tracker.stopping()
        return True, "training will stop after the round in progress"

    def _reply(self, comm: Any, request: str, ok: bool, message: str) -> None:
        self._send([comm], {"type": "result", "request": request, "ok": ok, "message": message})

    def _send(self, comms: list[Any], data: dict[str, Any]) -> None:
        for comm in comms:
            try:
                comm.send(data)
            except (OSError, RuntimeError, ValueError) as exc:  # a closing kernel; the comm is gone
                log.warning("could not send to the fednb sidebar: %s", exc)
                self._forget(comm)

    # -- the sending thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                timeout = self._refresh_every if self._federation is not None else None
                self._lock.wait_for(lambda: self._dirty or self._closed, timeout)
                if self._closed:
                    return
                self._dirty = False
                comms = list(self._comms)
                self._seq += 1
                seq = self._seq
            took = 0.0
            if comms:
                started = time.monotonic()
                self._send(comms, self._snapshot(seq))
                took = time.monotonic() - started
            # throttle: at most one snapshot per interval, and at most a tenth of the time on snapshots (a
            # population of 10,000 parties takes tens of milliseconds to read)
            with self._lock:
                self._lock.wait_for(lambda: self._closed, max(self._interval, 10 * took))

    def _snapshot(self, seq: int) -> dict[str, Any]:
        federation = self._federation
        run, activity = self._tracker.view()
        parties = population = None
        if federation is not None:
            status, population = listed(federation.status(), activity)
            parties = party_rows(status, {row.name: row.silent_for for row in status}, activity)
            if run is not None:
                run = {**run, "secure": secure_badge(getattr(federation, "history", None), run["rounds_done"])}
        approvals = None
        if self._approvals is not None:
            approvals = approval_rows(self._approvals.pending())
        return snapshot(seq, parties=parties, run=run, background=self._session.background,
                        approvals=approvals, population=population)


# -- one bridge per shell -------------------------------------------------------------------------

_bridges: dict[int, SidebarBridge] = {}


def install(shell: Any, session: Session) -> SidebarBridge | None:
    """Start the sidebar bridge in a kernel (nothing in a terminal IPython)."""
    if getattr(shell, "kernel", None) is None or id(shell) in _bridges:
        return _bridges.get(id(shell))
    from comm import create_comm, get_comm_manager

    bridge = SidebarBridge(session, get_comm_manager(), create_comm).start()
    _bridges[id(shell)] = bridge
    return bridge


def bridge_for(shell: Any) -> SidebarBridge | None:
    """The shell's bridge, for ``%fed_serve`` to hand its approvals to."""
    return _bridges.get(id(shell))


def uninstall(shell: Any) -> None:
    bridge = _bridges.pop(id(shell), None)
    if bridge is not None:
        bridge.close()


# -- a party served in this kernel (%fed_serve) -----------------------------------------------------

class WidgetApprovals:
    """The pending requests of an :class:`~fednb.notebook.serve.ApprovalsWidget`, as the bridge reads them.

    The widget stays the one place that decides (its ``approve``/``deny`` write the party
    directory, as ``fednb approve`` does); the panel is a second pair of buttons on it.
    """

    def __init__(self, widget: Any, server: Any = None) -> None:
        self.widget = widget
        self.server = server

    def pending(self) -> list[dict[str, Any]]:
        if self.server is not None and self.server.stopped.is_set():
            return []
        return [_approval_row(row) for row in self.widget.pending]

    def approve(self, ident: str) -> None:
        self._check(ident)
        self.widget.approve(ident)

    def deny(self, ident: str) -> None:
        self._check(ident)
        self.widget.deny(ident)

    def _check(self, ident: str) -> None:
        if ident not in {row["hash"] for row in self.widget.pending}:
            raise KeyError("no such pending request (decided already?)")

    def subscribe(self, callback: Callable[..., None]) -> Callable[[], None]:
        def changed(change: Any) -> None:
            callback()

        self.widget.observe(changed, names=["pending"])
        return lambda: self.widget.unobserve(changed, names=["pending"])


def _approval_row(row: dict[str, Any]) -> dict[str, Any]:
    import datetime as dt

    code = row.get("code") or {}
    parts = [(part, code.get(part)) for part in ("model", "cell", "loop") if code.get(part)]
    text = parts[0][1] if len(parts) == 1 else "\n".join(f"# -- {part} --\n{source}" for part, source in parts)
    try:
        age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(row.get("requested", ""))).total_seconds()
    except (TypeError, ValueError):
        age = None
    return {"id": row.get("hash"), "hash": row.get("hash"), "kind": row.get("kind"),
            "coordinator": row.get("coordinator"), "code": text, "returns": row.get("returns"), "age": age}


def show_approvals(widget: Any, *, server: Any = None, shell: Any = None) -> bool:
    """Show a served party's pending requests in the JupyterLab panel (``%fed_serve`` calls this).

    ``widget`` is the :class:`~fednb.notebook.serve.ApprovalsWidget`; ``server`` its
    PartyServer (once it stops, nothing is shown). False where there is no panel (no kernel,
    or ``%load_ext fednb`` not run).
    """
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    bridge = bridge_for(shell)
    if bridge is None:
        return False
    bridge.serve_approvals(WidgetApprovals(widget, server))
    return True
