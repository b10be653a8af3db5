"""The ``fednb`` command: ``keys``, ``party``, ``approve``, ``audit``, ``privacy``, ``sim`` and ``demo``.

::

    fednb keys new ~/.fednb/party                       # CURVE keypair: party.key + party.key_secret (0600)
    fednb party --name clinic-a --listen tcp://0.0.0.0:7410 --key ~/.fednb/party \\
          --authorized-keys ~/.fednb/authorized_keys --data train=clinic_a.npz   # --policy review
    fednb approve ~/.fednb/clinic-a                      # pending requests: code, who asked, what returns
    fednb approve ~/.fednb/clinic-a --approve 3f2a9c1e --rounds 20
    fednb audit ~/.fednb/clinic-a                        # every request; is the hash chain intact?
    fednb party ... --data train=bank.csv --id-column id --label y   # a vertical federation's table
    fednb party ... --dp-epsilon 3 --dp-delta 1e-5       # a privacy budget for the party's training data
    fednb privacy ~/.fednb/clinic-a                      # the ε spent, request by request (--json)
    fednb sim 4 --dataset digits --partition dirichlet --alpha 0.5   # local parties until Ctrl-C
    fednb demo                                           # federated vs centralized, one line per round

An error is one line on stderr, ``fednb COMMAND: error: …``, with exit status 2 (the party's
full tracebacks go to its party.log); output into a pipe whose reader left (``| head``) ends
quietly with status 141, as a tool killed by SIGPIPE does. A log that does not verify (``fednb
audit``'s broken chain, ``fednb privacy``'s edited ledger) is exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

import zmq

from fednb.cli_parser import DEFAULT_DELTA, build_parser
from fednb.errors import FednbError

log = logging.getLogger("fednb")


def _keys(args: argparse.Namespace) -> int:
    from fednb.transport import key_paths, load_public_key, write_keypair

    if args.keys_command == "new":
        keypair = write_keypair(args.path, overwrite=args.force)
        public, secret = key_paths(args.path)
        key = keypair.public.decode()
        print(f"public key  {key}\n"
              f"written to  {public} (the public key: give it to the peers that must trust you)\n"
              f"            {secret} (mode 0600: keep it private)\n"
              f"a coordinator's key: each party lets it in with this line in its authorized-keys file\n"
              f"            {key} {public.stem}\n"
              f"            (or the content of {public.name} pasted as it is, or {public.name} copied into an "
              f"authorized-keys directory)\n"
              f'a party\'s key: coordinators pin it in their parties.toml as  public_key = "{key}"')
    else:
        print(load_public_key(args.path).decode())
    return 0


def _party(args: argparse.Namespace) -> int:
    from fednb.party import Datasets, EgressRules, PartyServer
    from fednb.party.directory import default_directory, open_directory
    from fednb.transport import AllowList, check_security, load_keypair

    if args.check_containment:
        return _check_containment(args)
    missing = [flag for flag, value in (("--name", args.name), ("--listen", args.listen), ("--data", args.data))
               if not value]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}")
    dp_epsilon, dp_delta = _budget(args)
    where = args.dir or default_directory(args.name)
    if dp_epsilon is not None:  # the ledger lives in the directory: a directory that cannot hold it fails first
        open_directory(where, create=True)

    if args.listen.startswith("tcp://") and not (args.key and args.authorized_keys):
        raise ValueError("a tcp endpoint needs --key and --authorized-keys: every TCP endpoint uses CURVE")
    if args.authorized_keys and not args.key:
        raise ValueError("--authorized-keys needs --key (the party's own keypair)")
    keypair = load_keypair(args.key) if args.key else None
    check_security(args.listen, keypair is not None)  # before the data is read: fail fast
    allow = AllowList(args.authorized_keys) if args.authorized_keys else None
    egress = EgressRules(max_values=args.max_values, min_group=args.min_group)
    datasets = Datasets.from_files(dict(args.data), label=args.label, id_column=args.id_column)
    directory = open_directory(where, create=True)
    log_file = logging.FileHandler(directory / "party.log")  # full tracebacks stay here, never on the wire
    log_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(log_file)
    server = PartyServer(args.name, args.listen, datasets, keypair=keypair, allow=allow, policy=args.policy,
                         directory=directory, egress=egress, time_limit=args.time_limit,
                         memory_limit=args.memory_limit, threads=args.threads,
                         heartbeat=args.heartbeat, timeout=args.timeout, max_message_bytes=args.max_message_bytes,
                         devices=tuple(args.device), allow_weak_containment=args.allow_weak_containment,
                         private_paths=_private_paths(args),
                         require_secure_aggregation=args.require_secure_aggregation, min_aggregate=args.min_aggregate,
                         dp_epsilon=dp_epsilon, dp_delta=dp_delta)
    del datasets  # the server keeps its data in shared read-only memory once it starts: hold no second copy

    def on_signal(signum: int, frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        server.stop(timeout=0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    listening = threading.Event()

    def on_ready(endpoint: str) -> None:
        listening.set()
        key = f" public key {keypair.public.decode()}" if keypair else ""
        print(f"party {args.name} listening on {endpoint}{key}", flush=True)
        if args.policy == "review":
            print(f"policy review: new code waits for you; see and decide with: fednb approve {directory}", flush=True)
        elif args.policy == "allowlist":
            print(f"policy allowlist: only code approved with `fednb approve {directory}` runs", flush=True)
        else:
            print("policy OPEN: every authorized coordinator's code runs here unreviewed", file=sys.stderr, flush=True)
        if dp_epsilon is not None:
            print(f"privacy budget ε = {dp_epsilon:g} (δ = {dp_delta:g}); see what is spent with: "
                  f"fednb privacy {directory}", flush=True)

    try:
        server.serve_forever(on_ready)
    except zmq.ZMQError as exc:
        if listening.is_set():
            raise  # not a bind error: main() reports it
        reasons: dict[int | None, str] = {
            zmq.EADDRINUSE: "the address is in use (another party or program has it; choose another port)",
            zmq.EADDRNOTAVAIL: "this machine has no such address"}
        why = reasons.get(exc.errno, str(exc.strerror))
        raise OSError(f"cannot listen on {args.listen}: {why}") from None
    return 0


def _budget(args: argparse.Namespace) -> tuple[float | None, float]:
    """``--dp-epsilon`` and ``--dp-delta`` as numbers; ValueError (one line) for values no budget can have."""
    if args.dp_epsilon is None:
        if args.dp_delta is not None:
            raise ValueError("--dp-delta goes with --dp-epsilon (the budget it is the δ of)")
        return None, DEFAULT_DELTA

    def number(flag: str, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{flag} expects a number, got {text!r}") from None

    epsilon = number("--dp-epsilon", args.dp_epsilon)
    delta = DEFAULT_DELTA if args.dp_delta is None else number("--dp-delta", args.dp_delta)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"--dp-epsilon must be a finite number > 0, got {args.dp_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"--dp-delta must be a number in (0, 1), got {args.dp_delta}")
    return epsilon, delta


def _sim(args: argparse.Namespace) -> int:
    from fednb.sim import start_host
    from fednb.transport import generate, write_keypair

    keypair = generate() if args.secure else None
    host = start_host(args.n, dataset=args.dataset, partition=args.partition, alpha=args.alpha, seed=args.seed,
                      authorized=keypair.public if keypair else None)
    try:
        lines = []
        for party in host.parties:
            lines += ["[[party]]", f'name = "{party["name"]}"', f'endpoint = "{party["endpoint"]}"']
            if party.get("public_key"):
                lines.append(f'public_key = "{party["public_key"]}"')
            lines.append("")
        toml = host.directory / "parties.toml"
        toml.write_text("\n".join(lines))
        connect = f'fednb.connect("{toml}"'
        if keypair is not None:
            write_keypair(host.directory / "coordinator", keypair)
            connect += f', key="{host.directory / "coordinator"}"'
        print(f"{args.n} parties ready in {host.ready_seconds:.1f} s; from Python on this machine:\n"
              f"    {connect})\nCtrl-C stops them.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5) and host.process.poll() is None:
                pass
        except KeyboardInterrupt:
            pass
    finally:
        host.stop()
    return 0


def _approve(args: argparse.Namespace) -> int:
    from fednb.party.owner import approve_command

    return approve_command(args.dir, approve=args.approve, deny=args.deny, rounds=args.rounds, until=args.until,
                           out=sys.stdout)


def _private_paths(args: argparse.Namespace) -> tuple[str, ...]:
    """The party's own files that no worker may read: its secret key and its authorized keys."""
    from fednb.transport import key_paths

    paths = [str(key_paths(args.key)[1])] if args.key else []
    return tuple(paths + ([args.authorized_keys] if args.authorized_keys else []))


def _check_containment(args: argparse.Namespace) -> int:
    """``fednb party --check-containment``: contain a throw-away worker and report what it reached."""
    import tempfile

    from fednb.party.directory import default_directory
    from fednb.party.reach import probe

    paths = list(_private_paths(args))
    directory = args.dir or (default_directory(args.name) if args.name else None)
    if directory is not None:
        paths.append(str(Path(directory).expanduser()))
    with tempfile.TemporaryDirectory(prefix="fednb-worker-root-") as mountpoint:
        report = probe(mountpoint, paths, devices=tuple(args.device))
    print(f"containment: {report.level}" + (f" ({report.reason})" if report.reason else ""))
    for what, outcome in report.checks.items():
        print(f"  {what:<40} {outcome}")
    return 0 if report.level == "full" else 1


def _audit(args: argparse.Namespace) -> int:
    from fednb.party.owner import audit_command

    return audit_command(args.dir, out=sys.stdout, new_chain=args.new_chain)


def _privacy(args: argparse.Namespace) -> int:
    """``fednb privacy``: the party's ledger, read without writing anything; exit 1 when it does not verify."""
    from fednb.party.directory import open_directory
    from fednb.privacy.ledger import Ledger, LedgerError, ledger_path

    directory = open_directory(args.dir, create=False)
    path = ledger_path(directory)
    if not path.exists():
        raise ValueError(f"there is no privacy ledger in {directory}: the party has no privacy budget "
                         "(fednb party --dp-epsilon E)")
    try:
        ledger = Ledger(path)
    except LedgerError as exc:  # there, but not as fednb wrote it: as a broken audit chain is, status 1
        _report(args.command, exc)
        return 1
    print(json.dumps(ledger.summary(), indent=2, allow_nan=False) if args.json else ledger.format_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fednb import demo

    demo.run(parties=args.parties, rounds=args.rounds, dataset=args.dataset, alpha=args.alpha, seed=args.seed,
             out=sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "demo" and args.log_level == "INFO":
        logging.getLogger("fednb").setLevel(logging.WARNING)
    handlers = {"keys": _keys, "party": _party, "approve": _approve, "audit": _audit, "privacy": _privacy,
                "sim": _sim, "demo": _demo}
    try:
        status = handlers[args.command](args)
        sys.stdout.flush()  # here, not at exit: a reader that went away (| head) is handled below
        return status
    except BrokenPipeError:
        # The reader of our output stopped (`fednb audit DIR | head`): not an error, so be
        # quiet, as a C tool killed by SIGPIPE is; point stdout at /dev/null so that the
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
    except (FednbError, ValueError, OSError, zmq.ZMQError) as exc:
        _report(args.command, exc)
        return 2


def _report(command: str, exc: BaseException) -> None:
    """The error as one line on stderr, ``fednb COMMAND: error: …``; any further lines go to the debug log."""
    first, *more = _describe(exc).splitlines() or [type(exc).__name__]
    print(f"fednb {command}: error: {first}", file=sys.stderr)
    if more:
        log.debug("%s", "\n".join(more))


def _describe(exc: BaseException) -> str:
    """An error as a user reads it: an OSError names its file, a ZMQError says what libzmq said."""
    if isinstance(exc, zmq.ZMQError):
        return str(exc.strerror)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc).strip()


if __name__ == "__main__":
    sys.exit(main())
