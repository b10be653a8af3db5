"""The ``fednb`` command's arguments: one parser, a subcommand each for what :mod:`fednb.cli` runs.

``build_parser()`` is the whole command line (``keys``, ``party``, ``sim``, ``approve``,
``audit``, ``privacy`` and ``demo``, with their help); the argument types here turn a
malformed value into argparse's one-line usage error before any command starts.
"""

from __future__ import annotations

import argparse
import textwrap

from fednb import __version__

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


def build_parser() -> argparse.ArgumentParser:
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
