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
import textwrap
import threading
from pathlib import Path

import zmq

from fednb import __version__
from fednb.errors import FednbError

log = logging.getLogger("fednb")

DEFAULT_DELTA = 1e-5  # the δ of a privacy budget unless --dp-delta says otherwise


def _authorized_keys_help() -> str:
    """The authorized-keys format, for ``fednb party --help`` (the text the party's errors quote)."""
    from fednb.transport.auth import AUTHORIZED_KEYS_FORMAT

    return "\n\n".join([
        textwrap.fill(f"An authorized-keys file (--authorized-keys FILE) lists, as ssh's does, "
                      f"{AUTHORIZED_KEYS_FORMAT}.", 90),
        "    # coordinators allowed to connect\n"
        "    6U:afnnRP+-q/<u.BMx=}y&J3RdL!xjzS/Cez2O+ alice@lab\n"
        "    -tZ%84uS=d<vQ.4xJs^bNGPmZSH.eQkPYn[bHhq/ bob",
        textwrap.fill("Or a directory (--authorized-keys DIR) of coordinators' .key files, labelled by file name. "
                      "The list is read again when it changes: a removed key's sessions end.", 90)])


def _data_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in ("train", "test") or not path:
        raise argparse.ArgumentTypeError(f"expected train=FILE or test=FILE, got {text!r}")
    return name, path


def _size(text: str) -> int:
    """``4G``, ``512M``, ``0`` (no limit): a byte count."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("B").rstrip("I"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4G or 512M, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a size cannot be negative")
    return int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fednb", description="Federated learning that lives in Jupyter.")
    parser.add_argument("--version", action="version", version=f"fednb {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    keys = commands.add_parser("keys", help="create or show CURVE keypairs")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="write PATH.key (public) and PATH.key_secret (mode 0600)")
    new.add_argument("path")
    new.add_argument("--force", action="store_true", help="overwrite an existing keypair")
    show = key_commands.add_parser("show", help="print the public key of PATH.key")
    show.add_argument("path")

    party = commands.add_parser("party", help="serve this silo's data to authorized coordinators",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_authorized_keys_help())
    party.add_argument("--name", help="the party's name, as coordinators will see it (required)")
    party.add_argument("--listen", help="endpoint to bind: tcp://HOST:PORT or ipc:///PATH (required)")
    party.add_argument("--key", help="base path of this party's keypair (fednb keys new); required for tcp")
    party.add_argument("--authorized-keys", metavar="FILE_OR_DIR",
                       help="who may connect: a file, one coordinator's public key per line (format below), "
                            "or a directory of .key files")
    party.add_argument("--data", action="append", type=_data_spec, metavar="SPLIT=FILE",
                       help="train=FILE (required) and test=FILE: .npz with arrays x and y, or .csv with --label")
    party.add_argument("--label", help="label column of .csv data (or label array of .npz data); with --id-column, "
                                       "a file without that column is a feature party's")
    party.add_argument("--id-column", metavar="NAME",
                       help="the column of row ids (of .npz data: the array ids) by which a vertical federation "
                            "aligns its parties' rows; such a table needs no label and holds no test split")
    party.add_argument("--policy", default="review", choices=["review", "allowlist", "open"],
                       help="what coordinator code may run: review (the owner approves each new code hash), "
                            "allowlist (only approved hashes), open (everything; trusted set-ups only)")
    party.add_argument("--dir", help="the party's directory: approvals, pending requests, audit log (~/.fednb/NAME)")
    party.add_argument("--time-limit", type=float, default=3600.0, help="seconds one request may run")
    party.add_argument("--memory-limit", type=_size, default="4G",
                       help="memory one request may allocate, e.g. 4G or 512M (0: no limit)")
    party.add_argument("--max-message-bytes", type=_size, default="1G",
                       help="largest message accepted, e.g. 1G (the default: models up to 256M float32 parameters, "
                            "as much as --memory-limit 4G trains); larger frames drop the sender")
    party.add_argument("--max-values", type=int, default=1000, help="most numbers a %%%%fed_run result may hold")
    party.add_argument("--min-group", type=int, default=5, help="counts below this leave as None (review, allowlist)")
    party.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    party.add_argument("--timeout", type=float, default=10.0, help="seconds of silence before a peer counts as gone")
    party.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    party.add_argument("--device", action="append", default=[], metavar="PATH",
                       help="a device workers may use, bound into their sandbox (e.g. /dev/nvidia0, /dev/nvidiactl, "
                            "/dev/nvidia-uvm for a GPU); nothing else of /dev is there")
    party.add_argument("--allow-weak-containment", action="store_true",
                       help="serve under review or allowlist even where workers cannot be contained (no user "
                            "namespaces): their code could then reach the network and the party's files")
    party.add_argument("--check-containment", action="store_true",
                       help="report what a worker can and cannot reach here (network, files, /proc), then exit")
    party.add_argument("--require-secure-aggregation", action="store_true",
                       help="refuse plain train requests: this party's update leaves only masked, in a secure sum")
    party.add_argument("--min-aggregate", type=int, default=3, metavar="K",
                       help="take part in a secure round only when at least K parties are in the sum (default 3)")
    party.add_argument("--dp-epsilon", metavar="E",
                       help="a differential-privacy budget for the training data over the party's lifetime: "
                            "training runs only as DP that the party accounts (ε, in its directory's ledger; "
                            "see fednb privacy DIR), and a request that would spend past E is refused")
    party.add_argument("--dp-delta", metavar="D",
                       help=f"the δ of the privacy budget, in (0, 1) (default {DEFAULT_DELTA:g}); fixed for the "
                            "life of the party's ledger")

    sim = commands.add_parser("sim", help="run N local parties on bundled data until Ctrl-C")
    sim.add_argument("n", type=int)
    sim.add_argument("--dataset", default="digits")
    sim.add_argument("--partition", default="dirichlet")
    sim.add_argument("--alpha", type=float, default=0.5)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--secure", action="store_true", help="CURVE on the ipc sockets too")

    approve = commands.add_parser("approve", help="list requests awaiting the owner, or approve / deny one")
    approve.add_argument("dir", help="the party's directory (fednb party --dir)")
    decision = approve.add_mutually_exclusive_group()
    decision.add_argument("--approve", metavar="HASH", help="approve this code hash (or a unique prefix of 8+)")
    decision.add_argument("--deny", metavar="HASH", help="deny this code hash: its requests are refused")
    approve.add_argument("--rounds", type=int, help="the approval covers N training rounds (or N runs)")
    approve.add_argument("--until", metavar="DATE", help="the approval ends after DATE (YYYY-MM-DD or ISO time)")

    audit = commands.add_parser("audit", help="print a party's audit log and check its hash chain")
    audit.add_argument("dir", help="the party's directory (fednb party --dir)")
    audit.add_argument("--new-chain", action="store_true",
                       help="the way out of a broken chain: set the log aside (kept, with its SHA-256 recorded) and "
                            "start a new chain; the party refuses to serve until then")

    privacy = commands.add_parser("privacy", help="print a party's privacy ledger: ε spent of its budget, per request")
    privacy.add_argument("dir", help="the party's directory (fednb party --dir)")
    privacy.add_argument("--json", action="store_true", help="the ledger's summary as JSON (spent, budget, history)")

    demo = commands.add_parser("demo", help="federated vs centralized training on a local federation")
    demo.add_argument("--parties", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=15)
    demo.add_argument("--dataset", default="digits")
    demo.add_argument("--alpha", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    return parser


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
    args = _parser().parse_args(argv)
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
