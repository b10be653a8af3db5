"""The magics that start things: a federation of local parties, a federation of parties elsewhere, a party.

::

    %fed_sim 4 --dataset digits --partition dirichlet --alpha 0.5   # local party processes: `fed`
    %fed_sim 1000 --backend pool --examples-per-party 128           # a population of virtual parties
    %fed_connect parties.toml --key ~/.fednb/coordinator            # parties elsewhere: `fed`
    %fed_serve --name clinic --listen tcp://0.0.0.0:5555 --data train=clinic.npz --key clinic

They are methods of :class:`StartMagics`, which :class:`~fednb.notebook.magics.FedMagics` takes
in and marks as line magics, as it does :class:`~fednb.notebook.vertical_magics.VerticalMagics`'
ones: one magics class, one session per shell. Each parses its arguments
(:mod:`fednb.notebook.arguments`) and makes one call into the Python API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from fednb.notebook.arguments import budget, parse, pool_options, simulation_source, usage_errors
from fednb.notebook.display import parties_table, population_table

if TYPE_CHECKING:
    from fednb.notebook.session import Session


class StartMagics:
    """``%fed_sim``, ``%fed_connect`` and ``%fed_serve``, for :class:`FedMagics` (which holds the session they fill)."""

    shell: Any
    session: Session

    @magic_arguments()
    @argument("n", type=int, nargs="?", default=None, help="number of party processes (not with --data)")
    @argument("--dataset", default=None, help="bundled dataset: digits (default), breast_cancer or synthetic")
    @argument("--partition", default=None, help="iid, dirichlet (label skew; default) or shards")
    @argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed")
    @argument("--data", action="append", default=[], metavar="NAME=FILE",
              help="instead of N: a party NAME serving its own table FILE (.csv or .npz); once per party")
    @argument("--id-column", default=None,
              help="with --data: the tables' id column, for a vertical federation (then %%fed_align)")
    @argument("--label", default=None, help="with --data: the label column, in the tables that have it")
    @argument("--seed", type=int, default=0, help="seed of the data split")
    @argument("--secure", action="store_true", help="CURVE on the local sockets too")
    @argument("--contained", action="store_true", help="run party code in worker processes with limits, as real parties do")
    @argument("--dp-epsilon", type=float, default=None,
              help="give every party a privacy budget ε for its training data (it refuses training past it)")
    @argument("--dp-delta", type=float, default=None, help="with --dp-epsilon: the budget's δ (default 1e-5)")
    @argument("--backend", default="process", choices=("process", "pool", "ray"),
              help="process: one process per party (default); pool: worker processes serving virtual parties "
                   "(thousands); ray: those workers as Ray actors")
    @argument("--workers", type=int, default=None, help="with --backend pool or ray: worker processes (default 2)")
    @argument("--examples-per-party", type=int, default=None,
              help="with --backend pool or ray: training rows each party draws with replacement (a population "
                   "larger than the dataset)")
    def fed_sim(self, line: str) -> Any:
        """Start N local party processes on a bundled dataset, or one per --data table; they become this session's `fed`."""
        args = parse(self.fed_sim, line)
        import fednb

        source, limits = simulation_source(args), budget(args.dp_epsilon, args.dp_delta)
        pool = pool_options(args)
        with usage_errors(self.fed_sim):
            federation = fednb.simulate(**source, seed=args.seed, secure=args.secure, contained=args.contained,
                                        **limits, **pool)
        self.session.adopt(federation)
        if pool:  # thousands of rows say less than one: how many, where, and how they are reached
            return population_table(federation)
        return parties_table(federation.status())

    @magic_arguments()
    @argument("parties", help="TOML file of [[party]] tables (name, endpoint, public_key)")
    @argument("--key", default=None, help="base path of your keypair (fednb keys new PATH)")
    @argument("--timeout", type=float, default=30.0, help="seconds to wait for every party")
    def fed_connect(self, line: str) -> Any:
        """Connect to the parties listed in a TOML file; they become this session's `fed`."""
        args = parse(self.fed_connect, line)
        import fednb

        with usage_errors(self.fed_connect):
            federation = fednb.connect(args.parties.strip("'\""), key=args.key, timeout=args.timeout)
        self.session.adopt(federation)
        return parties_table(federation.status())

    @magic_arguments()
    @argument("--name", required=True, help="this party's name, as coordinators will see it")
    @argument("--listen", required=True, help="endpoint to bind: tcp://HOST:PORT or ipc:///PATH")
    @argument("--data", action="append", required=True, metavar="SPLIT=FILE",
              help="train=FILE (required) and test=FILE: .npz with x and y, or .csv with --label")
    @argument("--label", default=None, help="label column of .csv data (or label array of .npz data)")
    @argument("--key", default=None, help="base path of this party's keypair (fednb keys new); required for tcp")
    @argument("--authorized-keys", default=None, help="file or directory of the coordinator keys allowed to connect")
    @argument("--policy", default="review", choices=["review", "allowlist", "open"],
              help="what coordinator code may run: review (you approve each new code), allowlist, open")
    @argument("--dir", default=None, help="approvals, pending requests and audit log (default ~/.fednb/NAME)")
    @argument("--device", action="append", default=[], metavar="PATH",
              help="a device coordinator code may use (e.g. /dev/nvidia0), bound into its sandbox")
    @argument("--allow-weak-containment", action="store_true",
              help="serve even where coordinator code cannot be contained (no user namespaces)")
    @argument("--require-secure-aggregation", action="store_true",
              help="release updates only under secure aggregation (plain training requests are refused)")
    @argument("--min-aggregate", type=int, default=3,
              help="take part in a secure round only with at least this many parties (default 3)")
    @argument("--dp-epsilon", type=float, default=None,
              help="privacy budget ε of this party's training data over its lifetime (refuses training past it)")
    @argument("--dp-delta", type=float, default=None, help="with --dp-epsilon: the budget's δ (default 1e-5)")
    def fed_serve(self, line: str) -> Any:
        """Serve this notebook's data as a party in the background; shows requests awaiting your approval."""
        args = parse(self.fed_serve, line)
        from fednb.notebook.serve import serve_in_notebook

        data = {}
        for spec in args.data:
            split, sep, path = spec.strip("'\"").partition("=")
            if not sep or split not in ("train", "test") or not path:
                raise UsageError(f"--data expects train=FILE or test=FILE, got {spec!r}")
            data[split] = path
        limits = budget(args.dp_epsilon, args.dp_delta)
        with usage_errors(self.fed_serve):
            server, widget = serve_in_notebook(args.name, args.listen, data, key=args.key,
                                               authorized_keys=args.authorized_keys, policy=args.policy,
                                               label=args.label, directory=args.dir, devices=tuple(args.device),
                                               allow_weak_containment=args.allow_weak_containment,
                                               require_secure_aggregation=args.require_secure_aggregation,
                                               min_aggregate=args.min_aggregate, **limits)
        self.session.served.append(server)
        from fednb.notebook.sidebar import show_approvals

        show_approvals(widget, server=server, shell=self.shell)  # the JupyterLab panel too, where there is one
        return widget
