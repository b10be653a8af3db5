"""What the sandbox asks the operating system about processes, and the tidying up it does there.

How many threads this process runs (:mod:`fednb.party.sandbox` forks only while none has
started since the imports), whose child a PID is, how a worker ended, which descriptors a
freshly forked zygote closes, and the empty mount points that killed parties left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

log = logging.getLogger("fednb.party.sandbox")  # the sandbox's messages, under its name as before


def _os_threads() -> int:
    """The threads of this process as the kernel counts them (native ones included); 0 without /proc."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


MOUNTPOINT = "fednb-worker-root-"


def sweep_mountpoints() -> None:
    """Remove the empty mount points left by parties of this user that were killed (SIGKILL leaves no
    way to clean up): those whose PID no longer runs. One in use, or not empty, is left alone."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{MOUNTPOINT}*-*"):
        pid = path.name[len(MOUNTPOINT):].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            if path.stat().st_uid == os.getuid():
                path.rmdir()
        except OSError as exc:  # another user's, not empty, or removed by another party meanwhile
            log.debug("left %s: %s", path, exc)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        return


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "it died"
    if status == -signal.SIGKILL:
        return "killed, most likely out of memory"
    if status == -signal.SIGSEGV:
        return "a crash (SIGSEGV), e.g. a write to the read-only datasets"
    if status < 0:
        return f"signal {signal.Signals(-status).name}"
    return f"exit code {status}"


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue
