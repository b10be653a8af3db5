"""A worker's sandbox: no network, a file system of the Python environment and nothing else.

A worker runs coordinator code. The gate decides what may leave in a reply; this module makes
sure nothing leaves any other way, and that the code sees nothing of the party but the
datasets it was handed (sealed memfds, mapped before this runs)::

    worker (forked from the zygote, one thread)
      unshare(user, mount, network, pid, ipc, uts)   # unprivileged: a user namespace maps us to "root" inside
      fork ──> pid 1 of a new pid namespace (an init: reaps, passes the exit on) ──fork──> the code
                 tmpfs root  ── read-only binds: the Python environment, fednb, system libraries
                             ── /dev/{null,zero,full,random,urandom} (+ devices the owner allows)
                             ── /tmp: private tmpfs, size-capped;  /proc: this pid namespace only
                 pivot_root, old root detached; loopback down, no other interface
                 every inherited fd closed but the pipe and the datasets; environment scrubbed
                 no_new_privs, capabilities dropped, RLIMIT_NPROC and RLIMIT_FSIZE

The processes between wait and pass the exit status on (a signal as the same signal), so
killing the worker's pid (what the party does on a time limit or a cancel) kills the code with
it (PDEATHSIG down the chain), and when pid 1 ends the kernel kills everything left in its
namespace (a fork bomb included).

Where the kernel refuses namespaces (a container without user namespaces), :func:`contain`
raises :class:`ContainmentUnavailable`; the party then runs weakly contained (rlimits only)
and says so (:mod:`fednb.party.reach` reports what a worker can reach: ``fednb party --check-containment``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_CAPSET = {"x86_64": 126, "aarch64": 91}

#: The system paths a Python process with numpy and torch needs, bound read-only when they exist.
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
#: What a worker may create: this many processes and threads (its own counted, torch's threads
#: included), files up to this size, and this much in its private /tmp and /dev/shm.
MAX_PROCESSES = 256
MAX_FILE_BYTES = 256 * 1024 * 1024
TMP_BYTES = 256 * 1024 * 1024
SCRUBBED_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
_KEEP_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                   "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "PYTHONHASHSEED",
                   "FEDNB_TEST_RUN")


class ContainmentUnavailable(OSError):
    """The kernel (or the container around it) refuses what the sandbox needs."""


@dataclass(frozen=True)
class Sandbox:
    """What to let a worker see: its mount point (an empty directory the party owns), read-only
    paths beyond the Python environment, devices, and the file descriptors to keep."""

    mountpoint: str
    read_only: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    keep_fds: tuple[int, ...] = ()
    tmp_bytes: int = TMP_BYTES
    max_processes: int = MAX_PROCESSES
    max_file_bytes: int = MAX_FILE_BYTES

    def python_paths(self) -> list[str]:
        """The interpreter's prefixes (its standard library and site-packages) and fednb's own
        package directory (an editable install lives outside them). Never the working directory
        or a sys.path entry beyond these: the party's own files may live there."""
        paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                 os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
                 str(Path(__file__).resolve().parents[1])}
        return _outermost(p for p in map(os.path.realpath, paths) if p != "/")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise ContainmentUnavailable(code, f"{what}: {os.strerror(code)}")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


def _outermost(paths: Iterable[str]) -> list[str]:
    """Drop paths that lie inside another path of the list (binding the outer one covers them)."""
    ordered = sorted(set(paths))
    kept: list[str] = []
    for path in ordered:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


#: Inside the namespace, the code runs as this uid and gid. For a party that runs as root they
#: map to ``nobody`` outside: Linux exempts real root from RLIMIT_NPROC, so a fork bomb could
#: otherwise fill the machine.
INNER_ID = 1
NOBODY = 65534


def _map_ids(pid: int, uid: int, gid: int) -> None:
    """Write the id maps of ``pid``'s new user namespace, from outside it (only a process in the
    parent namespace may map more than its own id, which the root case needs)."""
    _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/uid_map", f"0 {uid} 1" + (f"\n{INNER_ID} {NOBODY} 1" if uid == 0 else ""))
    _write(f"/proc/{pid}/gid_map", f"0 {gid} 1" + (f"\n{INNER_ID} {NOBODY} 1" if gid == 0 else ""))


def _wait_and_exit(child: int, keep: Iterable[int], *, from_init: bool = False) -> None:
    """Be the outer end of a chain of processes: close our copies of the worker's descriptors
    (their EOF must follow the code's process), wait for ``child``, exit with its status.

    ``from_init``: the child is a sandbox's pid 1, which cannot die of a signal it passes on and
    reports one as exit status 128 + n; the chain dies of signal n again from here on.
    """
    for fd in keep:
        try:
            os.close(fd)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    died_of = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    if from_init and os.WIFEXITED(status) and 128 < os.WEXITSTATUS(status) < 128 + signal.NSIG:
        died_of = os.WEXITSTATUS(status) - 128
    if died_of:  # die of the same signal, so that the party reads the same cause
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = _libc()
    _check(libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None), f"mount {source or fstype} on {target}")


def _bind(source: str, root: str, *, writable: bool = False) -> None:
    """Bind ``source`` at the same path under ``root``, read-only unless ``writable``."""
    target = root + source
    if os.path.islink(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "wb").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    if not writable:
        # a remount keeps the flags the kernel locked on the original mount (nosuid, nodev, noexec)
        noexec = os.statvfs(source).f_flag & os.ST_NOEXEC
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | (MS_NOEXEC if noexec else 0))


def build_root(sandbox: Sandbox) -> None:
    """Make ``sandbox.mountpoint`` the root of this process's mount namespace (in a new pid namespace)."""
    root = os.path.realpath(sandbox.mountpoint)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    # the private /tmp and /dev/shm first: a Python installation that lives under /tmp (a fresh
    # clone's virtual environment) is then bound inside them rather than hidden by them
    for private in ("/tmp", "/dev/shm"):
        os.makedirs(root + private, exist_ok=True)
        _mount("tmpfs", root + private, "tmpfs", MS_NOSUID | MS_NODEV, f"size={sandbox.tmp_bytes},mode=1777")
    for path in _outermost([*SYSTEM_PATHS, *sandbox.python_paths(), *sandbox.read_only]):
        if root == path or root.startswith(path.rstrip("/") + "/"):
            raise ContainmentUnavailable(errno.EINVAL, f"the sandbox's mount point {root} lies inside {path}")
        if os.path.lexists(path):
            _bind(path, root)
    os.makedirs(root + "/dev", exist_ok=True)
    for device in (*DEVICES, *sandbox.devices):
        if os.path.exists(device):
            _bind(device, root, writable=True)
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/.old", exist_ok=True)
    os.chdir(root)
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise ContainmentUnavailable(errno.ENOSYS, f"pivot_root is not known on {platform.machine()}")
    _check(_libc().syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(_libc().umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def close_fds(keep: Iterable[int]) -> None:
    """Close every file descriptor but ``keep`` (and 0-2, reopened on /dev/null except stderr)."""
    kept = sorted({fd for fd in keep if fd > 2})
    low = 3
    for fd in [*kept, 1 << 20]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def scrub_environment() -> None:
    kept = {name: os.environ[name] for name in _KEEP_VARIABLES if name in os.environ}
    os.environ.clear()
    os.environ.update(SCRUBBED_ENVIRONMENT)
    os.environ.update(kept)


def drop_privileges(max_processes: int, max_file_bytes: int, *, was_root: bool) -> None:
    """No new privileges, no capabilities (not even inside our namespace), process and file-size caps."""
    libc = _libc()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for capability in range(64):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    if was_root:
        os.setresgid(INNER_ID, INNER_ID, INNER_ID)
        os.setresuid(INNER_ID, INNER_ID, INNER_ID)
    # a change of credentials clears the parent-death signal; without it this process would
    # outlive its chain (its pid namespace also ends with pid 1, but not if this were pid 1)
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "parent-death signal")
    number = _CAPSET.get(platform.machine())
    if number is not None:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable × 2: all zero
        _check(libc.syscall(number, header, data), "capset")
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG, not a kill


def _init(code: int) -> None:
    """Pid 1 of a sandbox: hold no descriptor of the worker's, reap every orphan, and end with
    the code's process (the kernel then kills whatever is left in the namespace)."""
    close_fds(())
    while True:
        try:
            pid, status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(1)
        if pid == code:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status))


def contain(sandbox: Sandbox) -> None:
    """Move this (single-threaded, freshly forked) process's work into its sandbox.

    Returns in the sandboxed process, pid 1 of its namespace; this process and one between stay
    outside only to wait and pass the exit status on (each dies with its parent). Raises
    :class:`ContainmentUnavailable`, with nothing changed, where namespaces are refused.
    """
    was_root = os.getuid() == 0
    uid, gid = os.getuid(), os.getgid()
    keep = set(sandbox.keep_fds)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - the middle process
        os.close(ready_r)
        os.close(go_w)
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if _libc().unshare(flags) != 0:
            os.write(ready_w, f"unshare: {os.strerror(ctypes.get_errno())}".encode())
            os._exit(1)
        # new credentials clear the parent-death signal: set it again after every change
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.write(ready_w, b"ok")
        os.close(ready_w)
        if os.read(go_r, 2) != b"go":
            os._exit(1)
        os.close(go_r)
        inner = os.fork()
        if inner:
            _wait_and_exit(inner, keep, from_init=True)
        # pid 1 of the new namespace from here on (getppid() is 0: the parent lives outside):
        # it builds the root, then only reaps, as an init does, so that the code runs as an
        # ordinary process (pid 2: signals and orphans behave as they do outside)
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        build_root(sandbox)
        socket.sethostname("fednb-worker")
        code = os.fork()
        if code:
            _init(code)
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        close_fds(keep)
        scrub_environment()
        drop_privileges(sandbox.max_processes, sandbox.max_file_bytes, was_root=was_root)
        return
    os.close(ready_w)
    os.close(go_r)
    answer = os.read(ready_r, 512)
    os.close(ready_r)
    if answer != b"ok":
        os.close(go_w)
        os.waitpid(middle, 0)
        raise ContainmentUnavailable(errno.EPERM, answer.decode(errors="replace") or "the sandbox did not start")
    try:
        _map_ids(middle, uid, gid)
    except OSError as exc:
        os.close(go_w)
        os.kill(middle, signal.SIGKILL)
        os.waitpid(middle, 0)
        raise ContainmentUnavailable(exc.errno or errno.EPERM, f"mapping the sandbox's ids: {exc}") from None
    os.write(go_w, b"go")
    os.close(go_w)
    _wait_and_exit(middle, keep)


def weaken(sandbox: Sandbox) -> None:
    """What is left where namespaces are refused: closed fds, scrubbed environment, rlimits."""
    close_fds(sandbox.keep_fds)
    scrub_environment()
    resource.setrlimit(resource.RLIMIT_NPROC, (sandbox.max_processes, sandbox.max_processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (sandbox.max_file_bytes, sandbox.max_file_bytes))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
