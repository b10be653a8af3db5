"""The ``%fed_*`` magics: each one parses its arguments and makes one call into the Python API.

::

    %fed_sim 4 --dataset digits --partition dirichlet --alpha 0.5
    %%fed_model
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    %fed_train --rounds 20 --lr 0.05
    %%fed_run
    label_counts(train)

Mistakes a user can make (bad arguments, no federation yet, a party error ending a round)
become :class:`~IPython.core.error.UsageError`: one line, no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from fednb.errors import FednbError
from fednb.federation import Federation
from fednb.federation.background import TrainingRun
from fednb.federation.events import TrainingFinished
from fednb.notebook.display import PartyOutputs, evaluation_table, parties_table


@contextmanager
def _usage_errors() -> Iterator[None]:
    """Turn the API's errors for bad input into one-line UsageErrors."""
    try:
        yield
    except (ValueError, FednbError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _parties(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


@magics_class
class FedMagics(Magics):
    """The session's federation, its model definitions and its training run, driven by magics."""

    shell: Any  # the IPython shell, set by Magics.__init__

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.federation: Federation | None = None
        self.sources: dict[str, str] = {}
        self.training: TrainingRun | None = None
        self.background = False  # whether self.training runs with --background (the sidebar's Stop needs to know)
        self.listeners: list[Callable[[], None]] = []  # told when the federation or training run changes
        self.served: list[Any] = []  # parties this kernel serves (%fed_serve), stopped on unload

    # -- the federation ---------------------------------------------------------------------

    @magic_arguments()
    @argument("n", type=int, help="number of party processes")
    @argument("--dataset", default="digits", help="bundled dataset: digits, breast_cancer or synthetic")
    @argument("--partition", default="dirichlet", help="iid, dirichlet (label skew) or shards")
    @argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed")
    @argument("--seed", type=int, default=0, help="seed of the data split")
    @argument("--secure", action="store_true", help="CURVE on the local sockets too")
    @argument("--contained", action="store_true", help="run party code in worker processes with limits, as real parties do")
    @line_magic
    def fed_sim(self, line: str) -> Any:
        """Start N local party processes on a bundled dataset; they become this session's `fed`."""
        args = parse_argstring(self.fed_sim, line)
        import fednb

        with _usage_errors():
            federation = fednb.simulate(args.n, dataset=args.dataset, partition=args.partition, alpha=args.alpha,
                                        seed=args.seed, secure=args.secure, contained=args.contained)
        self._adopt(federation)
        return parties_table(federation.status())

    @magic_arguments()
    @argument("parties", help="TOML file of [[party]] tables (name, endpoint, public_key)")
    @argument("--key", default=None, help="base path of your keypair (fednb keys new PATH)")
    @argument("--timeout", type=float, default=30.0, help="seconds to wait for every party")
    @line_magic
    def fed_connect(self, line: str) -> Any:
        """Connect to the parties listed in a TOML file; they become this session's `fed`."""
        args = parse_argstring(self.fed_connect, line)
        import fednb

        with _usage_errors():
            federation = fednb.connect(args.parties.strip("'\""), key=args.key, timeout=args.timeout)
        self._adopt(federation)
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
    @line_magic
    def fed_serve(self, line: str) -> Any:
        """Serve this notebook's data as a party in the background; shows requests awaiting your approval."""
        args = parse_argstring(self.fed_serve, line)
        from fednb.notebook.serve import serve_in_notebook

        data = {}
        for spec in args.data:
            split, sep, path = spec.strip("'\"").partition("=")
            if not sep or split not in ("train", "test") or not path:
                raise UsageError(f"--data expects train=FILE or test=FILE, got {spec!r}")
            data[split] = path
        with _usage_errors():
            server, widget = serve_in_notebook(args.name, args.listen, data, key=args.key,
                                               authorized_keys=args.authorized_keys, policy=args.policy,
                                               label=args.label, directory=args.dir)
        self.served.append(server)
        from fednb.notebook.sidebar import show_approvals

        show_approvals(widget, server=server, shell=self.shell)  # the JupyterLab panel too, where there is one
        return widget

    @line_magic
    def fed_close(self, line: str) -> None:
        """Stop any training, close the connections and stop local parties."""
        if line.strip():
            raise UsageError("%fed_close takes no arguments")
        if self.federation is None:
            print("no federation to close")
            return
        self.close_federation()
        print("federation closed")

    @line_magic
    def fed_parties(self, line: str) -> Any:
        """A table of the parties: endpoint, status, examples, last round, last error."""
        return parties_table(self._require().status())

    @line_magic
    def fed_status(self, line: str) -> Any:
        """The parties' table and what the federation is doing now."""
        federation = self._require()
        history = federation.history
        if federation.training:
            print(f"training: round {history.last_round + 1} in progress ({len(history)} rounds done)")
        else:
            print(f"idle; {len(history)} rounds trained" + (f", last accuracy {history.metric('accuracy')[-1]:.4f}"
                                                           if len(history) else ""))
        return parties_table(federation.status())

    # -- the model --------------------------------------------------------------------------

    @magic_arguments()
    @argument("--name", default="model", help="the variable the cell binds the model to")
    @cell_magic
    def fed_model(self, line: str, cell: str) -> None:
        """Run the cell here and record it as the model definition the parties will build."""
        args = parse_argstring(self.fed_model, line)
        from fednb.federation.source import _check_rebuilds, cell_source

        if not args.name.isidentifier():
            raise UsageError(f"--name must be a variable name, got {args.name!r}")
        before = self.shell.user_ns.get(args.name)
        outcome = self.shell.run_cell(cell, store_history=False)
        if not outcome.success:
            raise UsageError("the model cell failed (see above); nothing was recorded")
        model = self.shell.user_ns.get(args.name)
        import torch

        if model is before or not isinstance(model, torch.nn.Module):
            raise UsageError(f"the cell must bind a torch.nn.Module to `{args.name}` (use --name for another variable)")
        with _usage_errors():
            source = cell_source(cell, self.shell.user_ns, args.name)
            _check_rebuilds(model, source)
        self.sources[args.name] = source
        count = sum(p.numel() for p in model.parameters())
        print(f"{args.name}: {type(model).__name__} with {count:,} parameters; parties will build it from this cell")

    # -- training ---------------------------------------------------------------------------

    @magic_arguments()
    @argument("--rounds", type=int, default=10, help="rounds of training")
    @argument("--strategy", default="fedavg", help="fedavg, fedprox or fedavgm")
    @argument("--mu", type=float, default=None, help="FedProx proximal weight")
    @argument("--lr", type=float, default=0.05, help="learning rate of the local optimizer")
    @argument("--epochs", type=int, default=1, help="local epochs per round")
    @argument("--batch-size", type=int, default=32, help="local batch size")
    @argument("--optimizer", default="sgd", help="sgd or adam (built-in loop)")
    @argument("--momentum", type=float, default=0.0, help="SGD momentum (built-in loop)")
    @argument("--loss", default="cross_entropy", help="cross_entropy or mse (built-in loop)")
    @argument("--min-parties", type=int, default=None, help="replies a round needs (default: a majority)")
    @argument("--round-timeout", type=float, default=300.0, help="seconds before a silent party is dropped")
    @argument("--parties", default=None, help="comma-separated parties to train with (default: all)")
    @argument("--model", default="model", help="the notebook variable holding the model")
    @argument("--background", action="store_true", help="return at once; %%fed_stop ends training")
    @line_cell_magic
    def fed_train(self, line: str, cell: str | None = None) -> None:
        """Train the model across the parties; as a cell magic, the cell is each party's local training step."""
        run = self._start_training(line, cell)
        if run is not None:
            self._wait(run)

    async def train_async(self, line: str, cell: str | None = None) -> None:
        """A foreground ``%fed_train`` in a kernel, awaited so that the kernel keeps handling
        widget messages (the dashboard's Stop button) while the rounds run."""
        run = self._start_training(self.shell.var_expand(line), cell)
        if run is None:
            return
        import asyncio

        try:
            while not run.done:
                await asyncio.sleep(0.1)
        except BaseException:  # an interrupt or a cancelled cell: cancel the parties' work, then re-raise
            self._interrupted()
            raise
        with _usage_errors():
            run.result()

    def _start_training(self, line: str, cell: str | None) -> TrainingRun | None:
        """Check the arguments, show the dashboard, start the run; None when it goes on in the background."""
        args = parse_argstring(self.fed_train, line)
        federation = self._require()
        if self.training is not None and not self.training.done:
            raise UsageError("training is already running; %fed_stop ends it")
        model = self.shell.user_ns.get(args.model)
        import torch

        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"no model named `{args.model}`: define it in a %%fed_model cell first")
        if cell is not None and not cell.strip():
            raise UsageError("the %%fed_train cell is empty; write the local training step, or use %fed_train")
        options = {"rounds": args.rounds, "strategy": args.strategy, "lr": args.lr, "epochs": args.epochs,
                   "batch_size": args.batch_size, "optimizer": args.optimizer, "momentum": args.momentum,
                   "loss": args.loss, "min_parties": args.min_parties, "round_timeout": args.round_timeout,
                   "parties": _parties(args.parties), "train_cell": cell, "mu": args.mu}
        follow = self._follow(federation)
        self.background = args.background
        try:
            with _usage_errors():
                run = federation.train_in_background(model, self.sources.get(args.model), **options)
        except BaseException:
            follow(False)
            raise
        self.training = run
        follow(True)
        if args.background:
            print(f"training {args.rounds} rounds in the background; `{args.model}` gets the global weights after "
                  "each round; %fed_stop ends it after the round in progress")
            return None
        return run

    @magic_arguments()
    @argument("--now", action="store_true", help="also cancel the work running at the parties: end at once")
    @argument("--no-wait", action="store_true", help="return at once instead of waiting for the round to end")
    @line_magic
    def fed_stop(self, line: str) -> None:
        """End training after the round in progress (--now: cancel the parties' running work too)."""
        args = parse_argstring(self.fed_stop, line)
        run = self.training
        if run is None or run.done:
            print("nothing is training")
            return
        self._require().stop(now=args.now)
        if args.no_wait:
            print("training will stop after the round in progress")
            return
        run.wait()
        federation = self._require()
        print(f"training stopped after round {federation.history.last_round}")

    # -- cells and evaluation ---------------------------------------------------------------

    @magic_arguments()
    @argument("--parties", default=None, help="comma-separated parties to run at (default: all)")
    @argument("-o", "--out", default=None, help="keep the results in this variable: {party: value}")
    @argument("--timeout", type=float, default=300.0, help="seconds to wait for the parties")
    @cell_magic
    def fed_run(self, line: str, cell: str) -> None:
        """Run the cell at each party; show each party's result (or error) under its name."""
        args = parse_argstring(self.fed_run, line)
        federation = self._require()
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.out!r}")
        with _usage_errors():
            results = federation.run(cell, parties=_parties(args.parties), timeout=args.timeout)
        if args.out is not None:
            self.shell.user_ns[args.out] = results
        display(PartyOutputs(results))

    @magic_arguments()
    @argument("--model", default="model", help="the notebook variable holding the model")
    @argument("--parties", default=None, help="comma-separated parties (default: all)")
    @argument("--loss", default="cross_entropy", help="cross_entropy or mse")
    @line_magic
    def fed_eval(self, line: str) -> Any:
        """Loss and accuracy of the model on each party's test split, and their weighted mean."""
        args = parse_argstring(self.fed_eval, line)
        federation = self._require()
        model = self.shell.user_ns.get(args.model)
        if model is None:
            raise UsageError(f"no model named `{args.model}`: define it in a %%fed_model cell first")
        with _usage_errors():
            evaluation = federation.evaluate(model, self.sources.get(args.model), parties=_parties(args.parties),
                                             loss=args.loss)
        return evaluation_table(evaluation)

    # -- plumbing ---------------------------------------------------------------------------

    def _require(self) -> Federation:
        if self.federation is None:
            raise UsageError("no federation yet: start one with %fed_sim N or %fed_connect parties.toml")
        return self.federation

    def _adopt(self, federation: Federation) -> None:
        self.close_federation()
        self.federation = federation
        self.shell.user_ns["fed"] = federation
        self._changed()

    def close_federation(self) -> None:
        """Stop training and close the session's federation (a new one replaces it, or unload)."""
        run, federation = self.training, self.federation
        self.training, self.federation = None, None
        self._changed()
        if run is not None and not run.done:
            run.stop()
        if federation is not None:
            federation.close()
            if self.shell.user_ns.get("fed") is federation:
                del self.shell.user_ns["fed"]
        if run is not None:
            run.wait(10)

    def stop_serving(self) -> None:
        """Stop the parties this kernel serves through %fed_serve."""
        while self.served:
            self.served.pop().stop()

    def _interrupted(self) -> None:
        """Ctrl-C during training: cancel the work running at the parties; the model keeps the
        last completed round's weights."""
        if self.federation is not None:
            self.federation.stop(now=True)
        print("training interrupted: work at the parties cancelled; the model keeps the last completed round",
              file=sys.stderr, flush=True)

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _follow(self, federation: Federation) -> Callable[[bool], None]:
        """Subscribe a display to the next training run; call the result with whether it started.

        In a kernel the display is the dashboard widget, shown once the run has started and
        shown again (with its final summary) when it ends; in a terminal, one line per round.
        """
        handle: Any = None
        if getattr(self.shell, "kernel", None) is None:
            from fednb.federation.progress import RoundLines

            widget = None
            detach = federation.subscribe(RoundLines(sys.stdout))
        else:
            from fednb.notebook.dashboard import Dashboard

            widget = Dashboard(title=f"{len(federation.parties)} parties", on_stop=federation.stop)
            detach = widget.attach(federation)

        def on_finished(event: Any) -> None:
            if isinstance(event, TrainingFinished):
                stop_following()
                if handle is not None:
                    handle.update(widget)  # static outputs (nbconvert, papermill) keep the final summary

        unsubscribe = federation.subscribe(on_finished)

        def stop_following() -> None:
            detach()
            unsubscribe()

        def started(ok: bool) -> None:
            nonlocal handle
            if not ok:
                stop_following()
            elif widget is not None:
                handle = display(widget, display_id=True)

        return started

    def _wait(self, run: TrainingRun) -> None:
        """Block until training ends; Ctrl-C (interrupt) cancels the parties' work and ends it at once."""
        try:
            run.wait()
        except KeyboardInterrupt:
            self._interrupted()
            run.wait(30)
            raise
        with _usage_errors():
            run.result()
