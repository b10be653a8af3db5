"""The simulation host: imports torch once, then forks one party process per silo.

Started by :func:`fednb.simulate` as ``python -m fednb.party.host``. Forking after the
imports and the data split makes N parties ready in about the time one takes to start.
The host lives exactly as long as its coordinator: it reads its stdin, and when that pipe
closes (the coordinator closed the federation, exited, or its kernel was killed) it stops
every party it forked, by PID, and exits. Each party also dies with the host
(``PR_SET_PDEATHSIG``), so no process outlives the coordinator.

With ``--data NAME=FILE`` (once per party) each party serves its own file instead of a
partition of a bundled dataset: a horizontal party's table (features and a ``--label``,
``--test-fraction`` of it held out), or, with ``--id-column``, a vertical federation's
(row ids; the label only where the file has that column). Every file is read before any
party starts: a file that cannot be used stops the simulation with the file's error.

With ``--dp-epsilon`` every party has a privacy budget and a party directory of its own,
``DIR/NAME/`` (mode 0700), for its ledger and audit log; ``DIR`` goes with the simulation.

Protocol: one JSON line on stdout once every party listens,
``{"host": pid, "parties": [{"name", "endpoint", "public_key", "pid"}, …]}``, or
``{"error": "…"}`` (with ``"data": true`` when a party's file is at fault, ``"usage": true`` when the
arguments ask what the data cannot give, such as more parties than a partition can fill).
With ``--pool-workers W`` the ``--n`` parties are one population (:mod:`fednb.party.population`)
and the host forks W pool workers instead, each serving every W-th party on one shared endpoint;
the line then lists ``"workers"``, each with the ``"parties"`` it serves.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fednb.sim.host")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError) as exc:  # not Linux: the host's lifeline still stops us
        log.debug("PR_SET_PDEATHSIG unavailable: %s", exc)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fednb.party.host")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--n", type=int, default=None, help="parties on a bundled dataset (without --data)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=FILE",
                        help="one party named NAME on its own .npz or .csv file (repeated: one per party)")
    parser.add_argument("--id-column", default=None, help="with --data: the id column of vertical tables")
    parser.add_argument("--label", default=None, help="with --data: the label column (or .npz array)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--authorized", default=None, help="coordinator public key (Z85): turns CURVE on")
    parser.add_argument("--tcp", action="store_true", help="bind tcp://127.0.0.1 ports instead of ipc sockets")
    parser.add_argument("--contained", action="store_true", help="run coordinator code in worker processes")
    parser.add_argument("--require-secure-aggregation", action="store_true",
                        help="every party refuses plain train requests")
    parser.add_argument("--dp-epsilon", type=float, default=None, help="every party's privacy budget (ε)")
    parser.add_argument("--dp-delta", type=float, default=1e-5, help="the δ of that budget")
    parser.add_argument("--pool-workers", type=int, default=0,
                        help="serve the --n parties as a population: this many worker processes, each one shared "
                             "endpoint for its share of the parties (0: one process per party)")
    parser.add_argument("--examples-per-party", type=int, default=0,
                        help="with --pool-workers: each party draws this many training rows with replacement "
                             "(a population larger than the dataset); 0: a partition of the dataset")
    parser.add_argument("--members", type=int, default=64,
                        help="with --pool-workers: parties each worker keeps warm (kernel, gate, data)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    return parser.parse_args(argv)


def _party_data(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(name, Datasets) of every party: partitions of a bundled dataset, or each ``--data`` file.

    DataError (naming the file) for a file that cannot be used.
    """
    from fednb.errors import DataError
    from fednb.party import Datasets, Split

    if not args.data:
        from fednb.data import federated_split, load_dataset

        parts = federated_split(load_dataset(args.dataset, seed=args.seed), args.n, args.partition, alpha=args.alpha,
                                shards_per_party=args.shards, seed=args.seed, test_fraction=args.test_fraction)
        return [(part.name, Datasets({"train": Split(part.x_train, part.y_train),
                                      "test": Split(part.x_test, part.y_test)})) for part in parts]
    parties = []
    for entry in args.data:
        name, _, path = entry.partition("=")
        parties.append((name, Datasets.from_files({"train": path}, label=args.label, id_column=args.id_column,
                                                  holdout=args.test_fraction, seed=args.seed)))
    if args.id_column is not None and args.label is not None and \
            not any(datasets["train"].y is not None for _, datasets in parties):
        raise DataError(f"no party's file has the label column {args.label!r}: a vertical federation needs its "
                        "labels at one party")
    return parties


def _party_main(index: int, ready_fd: int, *, name: str, datasets: Any, args: argparse.Namespace) -> None:
    """A forked party: serve until SIGTERM, report readiness through ``ready_fd``."""
    _die_with_parent()
    import torch

    from fednb.party import PartyServer
    from fednb.party.directory import open_directory
    from fednb.transport import AllowList, generate

    torch.set_num_threads(max(1, args.threads))
    keypair = generate() if args.authorized else None
    allow = AllowList(keys={args.authorized.encode(): "coordinator"}) if args.authorized else None
    endpoint = "tcp://127.0.0.1:*" if args.tcp else f"ipc://{args.dir}/{name}.sock"
    # a budget is kept in a ledger, and a ledger in the party's own directory (its audit log goes there too)
    directory = open_directory(os.path.join(args.dir, name), create=True) if args.dp_epsilon is not None else None
    # The coordinator and every party are the local user: code is auto-approved ("simulation").
    server = PartyServer(name, endpoint, datasets, keypair=keypair, allow=allow, policy="simulation",
                         directory=directory, threads=max(1, args.threads), heartbeat=args.heartbeat,
                         timeout=args.timeout, contained=args.contained,
                         require_secure_aggregation=args.require_secure_aggregation,
                         dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(timeout=0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_ready(endpoint: str) -> None:
        line = {"index": index, "name": name, "endpoint": endpoint, "pid": os.getpid(),
                "public_key": keypair.public.decode() if keypair else None}
        os.write(ready_fd, (json.dumps(line) + "\n").encode())
        os.close(ready_fd)

    server.serve_forever(on_ready)


def population(args: argparse.Namespace) -> Any:
    """The parties of a pool simulation as one :class:`~fednb.party.population.Population`: a partition of
    the bundled dataset (the same rows as one process per party gets), or drawn with replacement."""
    from fednb.data import federated_indices, load_dataset, sample_population
    from fednb.party.population import Population, Rows

    dataset = load_dataset(args.dataset, seed=args.seed)
    if args.examples_per_party:
        train, test = sample_population(dataset.y, args.n, args.examples_per_party, alpha=args.alpha,
                                        test_fraction=args.test_fraction, seed=args.seed)
        rows = [Rows(f"party-{k}", train[k], test[k]) for k in range(args.n)]
    else:
        parts = federated_indices(dataset.y, args.n, args.partition, alpha=args.alpha, shards_per_party=args.shards,
                                  seed=args.seed, test_fraction=args.test_fraction)
        rows = [Rows(f"party-{k}", train, test) for k, (train, test) in enumerate(parts)]
    return Population(dataset.x, dataset.y, rows)


def _pool_main(index: int, ready_fd: int, *, shard: Any, args: argparse.Namespace) -> None:
    """A forked pool worker: serve its share of the population on one shared endpoint until SIGTERM."""
    _die_with_parent()
    import torch

    from fednb.party.population_server import PopulationServer
    from fednb.transport import AllowList, generate

    torch.set_num_threads(max(1, args.threads))
    keypair = generate() if args.authorized else None
    allow = AllowList(keys={args.authorized.encode(): "coordinator"}) if args.authorized else None
    name = f"pool-{index}"
    endpoint = "tcp://127.0.0.1:*" if args.tcp else f"ipc://{args.dir}/{name}.sock"
    server = PopulationServer(name, endpoint, shard, keypair=keypair, allow=allow, heartbeat=args.heartbeat,
                              timeout=args.timeout, members=args.members,
                              require_secure_aggregation=args.require_secure_aggregation,
                              directory=os.path.join(args.dir, "parties"))
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_ready(endpoint: str) -> None:
        line = {"index": index, "name": name, "endpoint": endpoint, "pid": os.getpid(),
                "public_key": keypair.public.decode() if keypair else None, "parties": list(shard.parties)}
        os.write(ready_fd, (json.dumps(line) + "\n").encode())
        os.close(ready_fd)

    server.serve_forever(on_ready)


def _stop_children(children: dict[int, int], grace: float = 3.0) -> None:
    for pid in children.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + grace
    remaining = dict(children)
    while remaining and time.monotonic() < deadline:
        for index, pid in list(remaining.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del remaining[index]
        time.sleep(0.02)
    for pid in remaining.values():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            continue


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (the host's death signal) must run the clean-up below from the very start
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = _parse(argv)
    try:
        return _host(args)
    finally:
        if not _STARTUP_FAILED:
            # however the coordinator ended (close(), exit, SIGKILL), its simulation's private
            # directory goes with it; after a failed start-up the coordinator reads the log first
            shutil.rmtree(args.dir, ignore_errors=True)


_STARTUP_FAILED = False


def _host(args: argparse.Namespace) -> int:
    global _STARTUP_FAILED
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s[{os.getpid()}] %(levelname)s %(message)s")
    _die_with_parent()
    import torch
    import torch._dynamo  # noqa: F401 - creating any optimizer imports it: 1.5 s, paid once here, not per party

    import fednb.party  # noqa: F401 - the party code, imported once before forking
    from fednb.errors import DataError

    try:
        work: list[tuple[str, Callable[[int, int], None]]]
        if args.pool_workers:
            shared = population(args)
            count = min(args.pool_workers, len(shared))
            work = [(f"pool-{i}", functools.partial(_pool_main, shard=shared.shard(i, count), args=args))
                    for i in range(count)]
        else:
            work = [(name, functools.partial(_party_main, name=name, datasets=datasets, args=args))
                    for name, datasets in _party_data(args)]
    except (DataError, ValueError) as exc:
        _STARTUP_FAILED = True
        # a DataError names a party's file; a ValueError, what the call asked that the data cannot give
        print(json.dumps({"error": str(exc), "data": isinstance(exc, DataError),
                          "usage": isinstance(exc, ValueError)}), flush=True)
        return 1
    ready_r, ready_w = os.pipe()
    children: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for index, (name, main_of) in enumerate(work):
        pid = os.fork()
        if pid == 0:  # the party, or a pool worker
            code = 0
            try:
                os.close(ready_r)
                main_of(index, ready_w)
            except BaseException:  # noqa: BLE001 - reported on stderr, then the child exits
                log.exception("%s failed", name)
                code = 1
            finally:
                os._exit(code)
        children[index] = pid
    os.close(ready_w)

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        ready = _collect_ready(ready_r, len(work), children)
        print(json.dumps({"host": os.getpid(), "parties" if not args.pool_workers else "workers": ready}), flush=True)
        _wait_for_lifeline(children, lambda: stopping)
        return 0
    except RuntimeError as exc:
        _STARTUP_FAILED = True
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    finally:
        _stop_children(children)


def _collect_ready(fd: int, count: int, children: dict[int, int], timeout: float = 120.0) -> list[dict[str, Any]]:
    lines: dict[int, dict[str, Any]] = {}
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(lines)} of {count} parties started within {timeout:.0f} s")
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk and len(lines) < count:
                raise RuntimeError(f"{count - len(lines)} parties exited before listening; see the log above")
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                entry = json.loads(raw)
                lines[entry.pop("index")] = entry
    return [lines[i] for i in sorted(lines)]


def _wait_for_lifeline(children: dict[int, int], stopping: Any) -> None:
    """Serve until stdin closes or a signal arrives; reap parties that exit on their own."""
    while not stopping():
        try:
            readable, _, _ = select.select([sys.stdin], [], [], 0.5)
        except InterruptedError:
            continue
        if readable and not os.read(sys.stdin.fileno(), 4096):
            log.info("the coordinator is gone; stopping the parties")
            return
        for index, pid in list(children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                log.warning("party #%d (pid %d) exited with status %d", index, pid, status)
                del children[index]


if __name__ == "__main__":
    sys.exit(main())
