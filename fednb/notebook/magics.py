"""The ``%fed_*`` magics: each one parses its arguments and makes one call into the Python API.

::

    %fed_sim 4 --dataset digits --partition dirichlet --alpha 0.5
    %%fed_model
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    %fed_train --rounds 20 --lr 0.05
    %%fed_run
    label_counts(train)
    %fed_train --rounds 20 --dp-epsilon 3     # record-level DP-SGD, the whole run within ε = 3
    %fed_privacy                               # each party's ε spent against its budget

    %fed_sim --data bank=guest.csv --data partner=host.csv --id-column id --label y
    %fed_align --id-column id --label-party bank   # private set intersection: `vfl`
    %fed_vtrain logistic --epochs 20 --key-bits 1024   # hetero logistic regression: `vmodel`
    %fed_vtrain boosting --trees 10 --depth 3      # SecureBoost's trees instead (vertical_magics.py)
    %fed_veval                                     # AUC, accuracy, KS and log-loss on the test rows

Mistakes a user can make (bad arguments, no federation yet, a party error ending a round)
become :class:`~IPython.core.error.UsageError`: one line, no traceback. A ``# comment`` may
end any magic line. What the magics set up lives in the shell's
:class:`~fednb.notebook.session.Session`, which the JupyterLab sidebar reads too.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from fednb.federation import Federation
from fednb.federation.background import TrainingRun
from fednb.notebook.arguments import TRAIN_DEFAULTS as DEFAULTS
from fednb.notebook.arguments import (differential_privacy, no_arguments, parse, parties, secure_aggregation,
                                      strategy_options, usage_errors)
from fednb.notebook.display import PartyOutputs, PrivacyView, evaluation_table, parties_table
from fednb.notebook.session import Session
from fednb.notebook.start_magics import StartMagics
from fednb.notebook.vertical_magics import VerticalMagics
from fednb.vertical.federation import Vertical


@magics_class
class FedMagics(StartMagics, VerticalMagics, Magics):
    """The ``%fed_*`` magics; what they set up is the shell's :class:`Session`."""

    shell: Any  # the IPython shell, set by Magics.__init__

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session = Session(shell)
        self.vertical: Vertical | None = None  # the last %fed_align's, while its federation is the session's
        self.session.subscribe(self._forget_vertical)

    # -- the federation ---------------------------------------------------------------------

    fed_sim = line_magic(StartMagics.fed_sim)  # these three live in start_magics.py
    fed_connect = line_magic(StartMagics.fed_connect)
    fed_serve = line_magic(StartMagics.fed_serve)

    @line_magic
    def fed_close(self, line: str) -> None:
        """Stop any training, close the connections and stop local parties."""
        no_arguments("fed_close", line)
        if self.session.federation is None:
            print("no federation to close")
            return
        self.session.close_federation()
        print("federation closed")

    @line_magic
    def fed_parties(self, line: str) -> Any:
        """A table of the parties: endpoint, status, examples, last round, last error."""
        no_arguments("fed_parties", line)
        return parties_table(self._require().status())

    @line_magic
    def fed_status(self, line: str) -> Any:
        """The parties' table and what the federation is doing now."""
        no_arguments("fed_status", line)
        federation = self._require()
        history = federation.history
        if federation.training:
            print(f"training: round {history.last_round + 1} in progress ({len(history)} rounds done)")
        else:
            print(f"idle; {len(history)} rounds trained" + (f", last accuracy {history.metric('accuracy')[-1]:.4f}"
                                                           if len(history) else ""))
        return parties_table(federation.status())

    @line_magic
    def fed_privacy(self, line: str) -> Any:
        """Each party's privacy budget: ε spent, budget, remaining, δ and charges, with ε after each charge."""
        no_arguments("fed_privacy", line)
        federation = self._require()
        with usage_errors():
            report = federation.privacy()
        return PrivacyView(report)

    # -- the model --------------------------------------------------------------------------

    @magic_arguments()
    @argument("--name", default="model", help="the variable the cell binds the model to")
    @cell_magic
    def fed_model(self, line: str, cell: str) -> None:
        """Run the cell here and record it as the model definition the parties will build."""
        args = parse(self.fed_model, line)
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
        with usage_errors(self.fed_model):
            source = cell_source(cell, self.shell.user_ns, args.name)
            _check_rebuilds(model, source)
        self.session.record_model(args.name, source)
        count = sum(p.numel() for p in model.parameters())
        print(f"{args.name}: {type(model).__name__} with {count:,} parameters; parties will build it from this cell")

    # -- training ---------------------------------------------------------------------------

    @magic_arguments()
    @argument("--rounds", type=int, default=10, help="rounds of training (default: %(default)s)")
    @argument("--strategy", default=DEFAULTS["strategy"],
              help="fedavg, fedprox, fedavgm; fedadam, fedyogi, fedadagrad (server optimizers); median, "
                   "trimmed-mean, krum, multi-krum, bulyan (robust; not with --secure-aggregation); scaffold "
                   "(control variates; plain rounds only) (default: %(default)s)")
    @argument("--mu", type=float, default=None, help="FedProx proximal weight (default: FedProx's, 0.01)")
    @argument("--server-lr", type=float, default=None,
              help="fedavgm, fedadam, fedyogi, fedadagrad, scaffold: the coordinator's learning rate η "
                   "(default: each one's)")
    @argument("--server-momentum", type=float, default=None, help="fedavgm: the coordinator's momentum (default 0.9)")
    @argument("--beta1", type=float, default=None, help="fedadam, fedyogi, fedadagrad: β1 (default 0.9; fedadagrad 0)")
    @argument("--beta2", type=float, default=None, help="fedadam, fedyogi: β2 (default 0.99)")
    @argument("--tau", type=float, default=None, help="fedadam, fedyogi, fedadagrad: the adaptivity τ (default 1e-3)")
    @argument("--trim", type=float, default=None, help="trimmed-mean: fraction β cut at each end (default 0.2)")
    @argument("--byzantine", type=int, default=None,
              help="krum, multi-krum, bulyan: Byzantine parties f tolerated (default 1)")
    @argument("--select", type=int, default=None, help="multi-krum: updates m averaged (default: n - f)")
    @argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate of the local optimizer (default: %(default)s)")
    @argument("--epochs", type=int, default=DEFAULTS["epochs"], help="local epochs per round (default: %(default)s)")
    @argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="local batch size (default: %(default)s)")
    @argument("--optimizer", default=DEFAULTS["optimizer"], help="sgd or adam (built-in loop; default: %(default)s)")
    @argument("--momentum", type=float, default=DEFAULTS["momentum"],
              help="SGD momentum (built-in loop; default: %(default)s)")
    @argument("--loss", default=DEFAULTS["loss"], help="cross_entropy or mse (built-in loop; default: %(default)s)")
    @argument("--min-parties", type=int, default=None, help="replies a round needs (default: a majority)")
    @argument("--round-timeout", type=float, default=DEFAULTS["round_timeout"],
              help="seconds before a silent party is dropped (default: %(default)s)")
    @argument("--parties", default=None, help="comma-separated parties to train with (default: all)")
    @argument("--parties-per-round", type=int, default=None,
              help="sample this many online parties each round (drawn from --seed and the round)")
    @argument("--fraction", type=float, default=None, help="sample this fraction of the parties each round")
    @argument("--checkpoint", default=None,
              help="write the run's state to FILE after every round; the same %%fed_train again continues it")
    @argument("--model", default="model", help="the notebook variable holding the model")
    @argument("--background", action="store_true", help="return at once; %%fed_stop ends training")
    @argument("--secure-aggregation", action="store_true",
              help="secure aggregation: the coordinator learns only the sum of the parties' updates")
    @argument("--clip", type=float, default=None,
              help="with --secure-aggregation: L2 norm each party's update is clipped to (default 10.0)")
    @argument("--dp-noise", type=float, default=None,
              help="differential privacy: noise multiplier of DP-SGD at each party (or of --dp-fedavg)")
    @argument("--dp-epsilon", type=float, default=None,
              help="DP-SGD with the noise calibrated so that the whole run spends at most this ε")
    @argument("--dp-clip", type=float, default=None,
              help="DP-SGD: per-example gradient L2 norm (default 1.0); --dp-fedavg: update L2 norm")
    @argument("--dp-delta", type=float, default=None, help="δ of the DP guarantee (default 1e-5)")
    @argument("--dp-fedavg", action="store_true",
              help="update-level DP-FedAvg (party-level ε) instead of record-level DP-SGD; its noise is added "
                   "by the coordinator, or split across the parties under --secure-aggregation")
    @argument("--adaptive-clip", action="store_true",
              help="--dp-fedavg: move the clip toward the median update norm (Andrew et al. 2021)")
    @argument("--clipped-count-stddev", type=float, default=None,
              help="--adaptive-clip: noise on the count of clipped updates (above --dp-noise / 2)")
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
            self.session.interrupted()
            raise
        with usage_errors(self.fed_train):
            run.result()

    def _start_training(self, line: str, cell: str | None) -> TrainingRun | None:
        """Check the arguments, show the dashboard, start the run; None when it goes on in the background."""
        args = parse(self.fed_train, line)
        federation = self._require()
        if self.session.is_training:
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
                   "parties": parties(args.parties), "train_cell": cell, **strategy_options(args),
                   "parties_per_round": args.parties_per_round, "fraction": args.fraction,
                   "checkpoint": args.checkpoint,
                   "secure_aggregation": secure_aggregation(args.secure_aggregation, args.clip),
                   "dp": differential_privacy(noise=args.dp_noise, epsilon=args.dp_epsilon, clip=args.dp_clip,
                                              delta=args.dp_delta, fedavg=args.dp_fedavg, adaptive=args.adaptive_clip,
                                              count_stddev=args.clipped_count_stddev, secure=args.secure_aggregation)}
        with usage_errors(self.fed_train):
            run = self.session.start_training(federation, model, args.model, options, background=args.background)
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
        args = parse(self.fed_stop, line)
        run = self.session.training
        if run is None or run.done:
            print("nothing is training")
            return
        self.session.stop_training(now=args.now)
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
        args = parse(self.fed_run, line)
        federation = self._require()
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"-o needs a variable name, got {args.out!r}")
        with usage_errors(self.fed_run):
            results = federation.run(cell, parties=parties(args.parties), timeout=args.timeout)
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
        args = parse(self.fed_eval, line)
        federation = self._require()
        model = self.shell.user_ns.get(args.model)
        if model is None:
            raise UsageError(f"no model named `{args.model}`: define it in a %%fed_model cell first")
        with usage_errors(self.fed_eval):
            evaluation = federation.evaluate(model, self.session.sources.get(args.model),
                                             parties=parties(args.parties), loss=args.loss)
        return evaluation_table(evaluation)

    # -- vertical learning: parties holding different columns of the same rows (vertical_magics.py) ---

    fed_align = line_magic(VerticalMagics.fed_align)
    fed_vtrain = line_magic(VerticalMagics.fed_vtrain)
    fed_veval = line_magic(VerticalMagics.fed_veval)

    # -- plumbing ---------------------------------------------------------------------------

    def _require(self) -> Federation:
        if self.session.federation is None:
            raise UsageError("no federation yet: start one with %fed_sim N or %fed_connect parties.toml")
        return self.session.federation

    def _wait(self, run: TrainingRun) -> None:
        """Block until training ends; Ctrl-C (interrupt) cancels the parties' work and ends it at once."""
        try:
            run.wait()
        except KeyboardInterrupt:
            self.session.interrupted()
            run.wait(30)
            raise
        with usage_errors(self.fed_train):
            run.result()
