"""The vertical learning magics: parties holding different columns of the same rows.

::

    %fed_align --id-column id --label-party bank        # private set intersection: `vfl`
    %fed_vtrain logistic --epochs 20 --key-bits 1024     # hetero logistic regression: `vmodel`
    %fed_vtrain boosting --trees 10 --depth 3            # SecureBoost's gradient-boosted trees: `vmodel`
    %fed_vtrain logistic --checkpoint lr.ckpt            # written every epoch (tree); run again to resume
    %fed_veval                                           # test metrics; for trees, feature importance too

They are methods of :class:`VerticalMagics`, which :class:`~fednb.notebook.magics.FedMagics`
takes in and marks as line magics: one magics class, one session per shell. Each parses its
arguments (:mod:`fednb.notebook.arguments`) and makes one call into
:class:`~fednb.vertical.federation.Vertical`; what they show lives in
:mod:`fednb.notebook.vertical_view`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from fednb.notebook.arguments import BOOSTING_DEFAULTS as BOOSTING
from fednb.notebook.arguments import LOGISTIC_DEFAULTS as LOGISTIC
from fednb.notebook.arguments import parse, parties, usage_errors, vertical_options
from fednb.vertical.boosted import BoostingModel
from fednb.vertical.federation import LogisticModel, Vertical

if TYPE_CHECKING:
    from fednb.federation import Federation
    from fednb.notebook.session import Session

#: What ``%fed_align`` calls the API's keywords in its errors.
ALIGN_WORDS = {"label_party": "--label-party", "id_column": "--id-column", "test_fraction": "--test-fraction"}


def _both(name: str) -> str:
    """The defaults of an option both algorithms take, as its help says them."""
    return f"default: {LOGISTIC[name]:g} logistic, {BOOSTING[name]:g} boosting"


class VerticalMagics:
    """``%fed_align``, ``%fed_vtrain`` and ``%fed_veval``, for :class:`FedMagics` (which holds the state they use)."""

    shell: Any
    session: Session
    vertical: Vertical | None  # the last %fed_align's, while its federation is the session's

    if TYPE_CHECKING:
        def _require(self) -> Federation: ...

    @magic_arguments()
    @argument("--id-column", default="id", help="the id column every party's table has (default: %(default)s)")
    @argument("--label-party", required=True, help="the party that holds the label column")
    @argument("--parties", default=None, help="comma-separated parties to align (default: all)")
    @argument("--test-fraction", type=float, default=0.2, help="aligned rows held out for testing (default: %(default)s)")
    @argument("--seed", type=int, default=0, help="seed of the train/test split, shared by the parties")
    @argument("--timeout", type=float, default=600.0, help="seconds to wait for the parties at each step")
    def fed_align(self, line: str) -> Any:
        """Align the parties' rows by private set intersection on their ids and split them; binds `vfl`."""
        args = parse(self.fed_align, line)
        federation = self._require()
        if self.session.is_training:
            raise UsageError("training is already running; %fed_stop ends it")
        if not 0 < args.test_fraction < 1:
            raise UsageError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
        started = time.perf_counter()
        with usage_errors(self.fed_align, ALIGN_WORDS):
            vfl = federation.vertical(id_column=args.id_column, label_party=args.label_party,
                                      parties=parties(args.parties), timeout=args.timeout)
            split = vfl.split(test_fraction=args.test_fraction, seed=args.seed)
        self.vertical = self.shell.user_ns["vfl"] = vfl
        from fednb.notebook.vertical_tables import alignment_table  # widgets' imports only where they are used

        print(f"vfl: {vfl.size} rows in common, found by private set intersection in "
              f"{time.perf_counter() - started:.1f} s; train {split['train']}, test {split['test']} (seed {args.seed})")
        return alignment_table(vfl)

    @magic_arguments()
    @argument("algorithm", choices=["logistic", "boosting"],
              help="the model: logistic (hetero logistic regression) or boosting (SecureBoost's trees)")
    @argument("--epochs", type=int, default=None,
              help=f"logistic: passes over the training rows (default: {LOGISTIC['epochs']})")
    @argument("--batch-size", type=int, default=None, help=f"logistic: rows per batch (default: {LOGISTIC['batch_size']})")
    @argument("--optimizer", default=None, help=f"logistic: sgd or rmsprop (default: {LOGISTIC['optimizer']})")
    @argument("--classes", default=None, help="logistic: comma-separated class labels: one-vs-rest, one model per class")
    @argument("--trees", type=int, default=None,
              help=f"boosting: rounds of trees, one tree per class each round for multiclass (default: {BOOSTING['trees']})")
    @argument("--depth", type=int, default=None, help=f"boosting: levels of each tree (default: {BOOSTING['depth']})")
    @argument("--bins", type=int, default=None, help=f"boosting: quantile bins per feature (default: {BOOSTING['bins']})")
    @argument("--min-child-weight", type=float, default=None,
              help=f"boosting: least hessian sum on each side of a split (default: {BOOSTING['min_child_weight']:g})")
    @argument("--objective", default=None,
              help=f"boosting: binary, multiclass or regression (default: {BOOSTING['objective']})")
    @argument("--lr", type=float, default=None, help=f"learning rate, or boosting's shrinkage ({_both('lr')})")
    @argument("--l2", type=float, default=None, help=f"L2 regularisation λ ({_both('l2')})")
    @argument("--key-bits", type=int, default=2048, help="the Paillier key: 1024, 2048 or 3072 bits, the coordinator's "
                                                         "(logistic) or the label party's (boosting; default: %(default)s)")
    @argument("--plaintext", action="store_true", help="no encryption: the baseline (parties that guard their "
                                                        "data refuse it; a simulation allows it)")
    @argument("--seed", type=int, default=0, help="logistic: seed of the batches (default: %(default)s)")
    @argument("--name", default="vmodel", help="the variable the trained model is bound to (default: %(default)s)")
    @argument("--checkpoint", default=None, metavar="FILE",
              help="write the run's state to FILE after every epoch (tree); the same command again resumes it")
    def fed_vtrain(self, line: str) -> None:
        """Train a model across the aligned parties of `vfl` (%fed_align), with live progress; binds `vmodel`."""
        args = parse(self.fed_vtrain, line)
        vfl = self._vertical()
        if not args.name.isidentifier():
            raise UsageError(f"--name must be a variable name, got {args.name!r}")
        if self.session.is_training:
            raise UsageError("training is already running; %fed_stop ends it")
        settings = vertical_options(args)
        from fednb.notebook.vertical_view import Following

        view = Following(self.shell, vfl, settings)
        train = vfl.train_boosting if args.algorithm == "boosting" else vfl.train_logistic
        try:
            with usage_errors(self.fed_vtrain):
                model = train(**settings, checkpoint=args.checkpoint)
        except BaseException as exc:
            view.failed(exc)
            raise
        self.shell.user_ns[args.name] = model
        view.trained(model, vfl)
        print(view.summary(args.name, model))

    @magic_arguments()
    @argument("--model", default="vmodel", help="the notebook variable holding the model (default: %(default)s)")
    def fed_veval(self, line: str) -> Any:
        """The model's AUC, accuracy, KS and log-loss on the aligned test rows, scored by the label party (for trees,
        the metrics of their objective and each party's feature importance)."""
        args = parse(self.fed_veval, line)
        vfl = self._vertical()
        model = self.shell.user_ns.get(args.model)
        if not isinstance(model, (LogisticModel, BoostingModel)):
            raise UsageError(f"no vertical model named `{args.model}`: train one with %fed_vtrain logistic or boosting")
        with usage_errors(self.fed_veval):
            metrics = vfl.evaluate(model)
            importance = vfl.importance(model) if isinstance(model, BoostingModel) else None
        from fednb.notebook.vertical_tables import Importance, TreeScores, metrics_table

        table = metrics_table(metrics, model=args.model, test_rows=vfl.splits.get("test"))
        if importance is None:
            return table
        return TreeScores(table, Importance.of(importance, parties=vfl.parties))

    # -- plumbing ---------------------------------------------------------------------------

    def _vertical(self) -> Vertical:
        """The notebook's `vfl` (or the last %fed_align's): an aligned vertical federation."""
        vfl = self.shell.user_ns.get("vfl")
        vfl = vfl if isinstance(vfl, Vertical) else self.vertical
        if vfl is None:
            raise UsageError("no aligned vertical federation yet: run %fed_align --label-party NAME first")
        return vfl

    def _forget_vertical(self) -> None:
        """The session's federation changed: a vertical federation of the one before is gone with it."""
        vfl = self.vertical
        if vfl is not None and vfl.federation is not self.session.federation:
            self.vertical = None
            if self.shell.user_ns.get("vfl") is vfl:
                del self.shell.user_ns["vfl"]
