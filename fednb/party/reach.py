"""What a contained worker can reach: the report of ``fednb party --check-containment``.

A throw-away child is contained exactly as a worker is (:mod:`fednb.party.containment`) and
tries what coordinator code might: connect to a listener on 127.0.0.1, resolve a name, read
the party's files, the party's /proc entry and the home directory, and list its open file
descriptors. The party runs it at start-up and tells coordinators the level it found.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from fednb.errors import GateError
from fednb.party.containment import ContainmentUnavailable, Sandbox, contain, weaken

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What a contained worker can and cannot reach: ``fednb party --check-containment``."""

    level: str  # "full" or "weak"
    reason: str = ""
    checks: dict[str, str] = field(default_factory=dict)



def probe(mountpoint: str, paths: Sequence[str] = (), *, devices: Sequence[str] = ()) -> Report:
    """Contain a throw-away child and let it try what coordinator code might: reach the network,
    resolve a name, read ``paths`` (the party's directory, its key, the home directory), look
    at the party's /proc entry, and list its open file descriptors.

    Run by ``fednb party --check-containment`` and at the party's start-up.
    """
    paths = [*paths, *_home_files()]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    party = os.getpid()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child, reports through the pipe
        code = 0
        try:
            os.close(reader)
            listener.close()
            report = _probe_child(Sandbox(mountpoint, devices=tuple(devices), keep_fds=(writer,)), port, party, paths)
            os.write(writer, json.dumps(report.__dict__).encode())
        except BaseException as exc:  # noqa: BLE001 - the child must exit, never return into the party
            try:
                os.write(writer, json.dumps({"level": "weak", "reason": f"the probe failed: {exc}", "checks": {}}).encode())
            except OSError:
                code = 1
        finally:
            os._exit(code)
    os.close(writer)
    chunks = []
    while True:
        chunk = os.read(reader, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(reader)
    os.waitpid(child, 0)
    listener.setblocking(False)
    try:
        connection, _ = listener.accept()
        connection.close()
        reached = True
    except BlockingIOError:
        reached = False
    listener.close()
    document = json.loads(b"".join(chunks) or b'{"level": "weak", "reason": "the probe said nothing", "checks": {}}')
    report = Report(document["level"], document.get("reason", ""), dict(document.get("checks", {})))
    if reached:
        report.checks["network"] = "REACHED a listener on 127.0.0.1"
    return report


def _probe_child(sandbox: Sandbox, port: int, party: int, paths: Sequence[str]) -> Report:
    try:
        contain(sandbox)
        report = Report("full")
    except ContainmentUnavailable as exc:
        weaken(sandbox)
        report = Report("weak", str(exc))
    checks = report.checks
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            checks["network"] = "REACHED a listener on 127.0.0.1"
    except OSError as exc:
        checks["network"] = f"blocked ({exc.strerror or exc})"
    try:
        socket.getaddrinfo("localhost", 80)
        checks["dns"] = "RESOLVED localhost"
    except OSError as exc:
        checks["dns"] = f"blocked ({exc.strerror or exc})"
    for path in [*paths, f"/proc/{party}/environ"]:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as handle:
                    handle.read(1)
            checks[path] = "READABLE"
        except OSError as exc:
            checks[path] = f"blocked ({exc.strerror or exc})"
    try:
        checks["open file descriptors"] = ", ".join(sorted(os.listdir("/proc/self/fd"), key=int))
    except OSError as exc:
        checks["open file descriptors"] = f"unknown ({exc.strerror})"
    return report


def check_start(party: str, policy: str, found: Report, *, allow_weak: bool) -> None:
    """Say in one line how the party's workers are contained; refuse (GateError) to serve a
    policy that needs them contained where they cannot be, unless the owner accepts it."""
    if found.level == "full":
        log.info("party %s: workers fully contained: no network, nothing but their datasets", party)
        return
    if found.level == "none":
        log.info("party %s: %s", party, found.reason)
        return
    if policy in ("review", "allowlist") and not allow_weak:
        raise GateError(f"{party}: workers cannot be contained here ({found.reason}), so code could reach "
                        f"the network and the party's files; under policy {policy} the party does not start "
                        "(give the party user namespaces, or accept it with --allow-weak-containment)")
    log.warning("party %s: workers only WEAKLY contained (%s): code may reach the network and files",
                party, found.reason)


def _home_files(most: int = 2) -> list[str]:
    """A few of the party user's own files in its home directory, to try from inside (the home
    directory itself may show up, holding only the bound Python installation)."""
    home = os.path.expanduser("~")
    try:
        names = sorted(entry.name for entry in os.scandir(home) if entry.is_file(follow_symlinks=False))
    except OSError:
        return []
    return [os.path.join(home, name) for name in names[:most]]
