"""How the magics read their arguments: trailing comments, the API's errors as UsageErrors, defaults.

A magic line is split as a shell splits it, so a ``#`` that begins a word outside quotes
starts a comment (``%fed_sim 4   # four parties``), while ``--name 'a # b'`` keeps its ``#``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from fednb.errors import FednbError

#: The built-in training loop's defaults, the same as ``Federation.train``'s (a test keeps them
#: equal): SGD with momentum on small batches, which trains the README's MLP on the bundled
#: datasets in a few rounds (digits, 4 parties: ~0.90 test accuracy after 10 rounds with label
#: skew, Dirichlet 0.5; ~0.96 with an IID split).
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.05, "epochs": 1, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9,
                                  "loss": "cross_entropy", "strategy": "fedavg", "round_timeout": 300.0}


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` at the start of a word, outside quotes."""
    quote: str | None = None
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line


def parse(magic: Callable[..., Any], line: str) -> Any:
    """The magic's arguments from ``line`` (its first line, for a cell magic), comments left out."""
    return parse_argstring(magic, strip_comment(line))


def no_arguments(name: str, line: str) -> None:
    if strip_comment(line).strip():
        raise UsageError(f"%{name} takes no arguments")


@contextmanager
def usage_errors(magic: Callable[..., Any] | None = None, words: dict[str, str] | None = None) -> Iterator[None]:
    """Turn the API's errors for bad input into one-line UsageErrors, in the magic's words:
    an API keyword the message names (``key=``) becomes the magic's option (``--key``), and so
    does each of ``words`` (``{"label_party": "--label-party"}``) wherever the message names it."""
    try:
        yield
    except (ValueError, FednbError) as exc:
        message = _option_names(magic, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        for word, flag in (words or {}).items():
            message = re.sub(rf"(?<![-\w]){re.escape(word)}\b", flag, message)
        raise UsageError(message) from None


def _option_names(magic: Callable[..., Any] | None, message: str) -> str:
    parser = getattr(magic, "parser", None)
    for action in getattr(parser, "_actions", ()):
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if flags:  # "pass key= (...)" -> "pass --key (...)"; a value after the "=" is left as it is
            message = re.sub(rf"\b{re.escape(action.dest)}=(?=[\s),;]|$)", flags[0], message)
    return message


def budget(epsilon: float | None, delta: float | None) -> dict[str, Any]:
    """``--dp-epsilon E [--dp-delta D]`` as ``dp_epsilon=``/``dp_delta=`` keywords (none without a budget)."""
    if epsilon is None:
        if delta is not None:
            raise UsageError("--dp-delta applies to a privacy budget: add --dp-epsilon E")
        return {}
    return {"dp_epsilon": epsilon, **({} if delta is None else {"dp_delta": delta})}


def parties(text: str | None) -> list[str] | None:
    """``--parties a,b`` as a list (None: all)."""
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def secure_aggregation(on: bool, clip: float | None) -> Any:
    """``--secure-aggregation [--clip C]`` as ``train``'s ``secure_aggregation=`` (False: plain rounds)."""
    if not on:
        if clip is not None:
            raise UsageError("--clip applies to secure aggregation: add --secure-aggregation")
        return False
    from fednb.federation.secure import SecureAggregation

    try:
        return SecureAggregation() if clip is None else SecureAggregation(clip=clip)
    except ValueError as exc:
        raise UsageError(f"--clip: {exc}") from None


#: The strategies' options (``train(strategy=…, **options)``) as ``%fed_train`` spells them.
STRATEGY_FLAGS = {"mu": "--mu", "server_lr": "--server-lr", "server_momentum": "--server-momentum",
                  "beta1": "--beta1", "beta2": "--beta2", "tau": "--tau", "trim": "--trim", "byzantine": "--byzantine",
                  "select": "--select"}


def strategy_options(args: Any) -> dict[str, Any]:
    """``%fed_train --strategy NAME``'s options as ``train``'s keywords (None: the strategy's default),
    checked as ``get_strategy`` checks them before anything is shown or sent, its errors in the flags' names."""
    from fednb.strategies import get_strategy

    options = {name: getattr(args, name) for name in STRATEGY_FLAGS}
    try:
        get_strategy(args.strategy, **options)
    except ValueError as exc:
        names = "|".join(STRATEGY_FLAGS)
        message = re.sub(rf"(?<![-\w])({names})\b=?", lambda m: STRATEGY_FLAGS[m.group(1)], str(exc).splitlines()[0])
        raise UsageError(message) from None
    return options


#: ``DPSGD``'s and ``DPFedAvg``'s field names as ``%fed_train`` spells them, for their errors.
DP_FLAGS = {"noise_multiplier": "--dp-noise", "target_epsilon": "--dp-epsilon", "max_grad_norm": "--dp-clip",
            "clip": "--dp-clip", "delta": "--dp-delta", "clipped_count_stddev": "--clipped-count-stddev"}


def differential_privacy(*, noise: float | None, epsilon: float | None, clip: float | None, delta: float | None,
                         fedavg: bool, adaptive: bool, count_stddev: float | None, secure: bool) -> Any:
    """``%fed_train``'s DP flags as ``train``'s ``dp=``: None, a ``DPSGD`` or a ``DPFedAvg``.

    Record-level DP-SGD: ``--dp-noise Z`` or ``--dp-epsilon E`` (noise calibrated so the whole
    run fits in ε), with ``--dp-clip C`` (per-sample gradient norm) and ``--dp-delta D``.
    Update-level DP-FedAvg: ``--dp-fedavg --dp-noise Z --dp-clip C`` (update norm), with
    ``--adaptive-clip --clipped-count-stddev S``; under ``--secure-aggregation`` the parties
    split its noise between them (the coordinator sees only the sum), else the coordinator adds it.
    """
    from fednb.privacy.dpfedavg import DPFedAvg
    from fednb.privacy.dpsgd import DPSGD

    settings: dict[str, Any] = {} if delta is None else {"delta": delta}
    if fedavg:
        if epsilon is not None:
            raise UsageError("--dp-epsilon calibrates DP-SGD's noise; DP-FedAvg takes --dp-noise Z and --dp-clip C")
        if noise is None or clip is None:
            raise UsageError("--dp-fedavg needs --dp-noise Z and --dp-clip C (the L2 norm each update is clipped to)")
        if count_stddev is not None and not adaptive:
            raise UsageError("--clipped-count-stddev applies to adaptive clipping: add --adaptive-clip")
        if adaptive and count_stddev is None:
            raise UsageError("--adaptive-clip needs --clipped-count-stddev S (noise on the clipped count, above "
                             "--dp-noise / 2; about the parties per round / 20)")
        if adaptive and secure:
            raise UsageError("--adaptive-clip needs each party's clipped bit, which --secure-aggregation hides: "
                             "use a fixed --dp-clip")
        where: Literal["coordinator", "parties"] = "parties" if secure else "coordinator"
        return _in_flags(lambda: DPFedAvg(clip=clip, noise_multiplier=noise, adaptive=adaptive,
                                          clipped_count_stddev=count_stddev, noise_at=where, **settings))
    for flag, given in (("--adaptive-clip", adaptive), ("--clipped-count-stddev", count_stddev is not None)):
        if given:
            raise UsageError(f"{flag} applies to DP-FedAvg: add --dp-fedavg --dp-noise Z --dp-clip C")
    if noise is None and epsilon is None:
        for flag, value in (("--dp-clip", clip), ("--dp-delta", delta)):
            if value is not None:
                raise UsageError(f"{flag} applies to differential privacy: add --dp-noise Z or --dp-epsilon E "
                                 "(DP-SGD), or --dp-fedavg --dp-noise Z")
        return None
    if noise is not None and epsilon is not None:
        raise UsageError("give one of --dp-noise and --dp-epsilon: --dp-epsilon calibrates the noise to that ε")
    if clip is not None:
        settings["max_grad_norm"] = clip
    return _in_flags(lambda: DPSGD(noise_multiplier=noise, target_epsilon=epsilon, **settings))


def _in_flags(build: Callable[[], Any], flags: dict[str, str] = DP_FLAGS) -> Any:
    """``build()``, its ValueError a UsageError that names the flags instead of the fields."""
    try:
        return build()
    except ValueError as exc:
        names = "|".join(flags)
        message = re.sub(rf"(?<![-\w])({names})\b", lambda m: flags[m.group(1)], str(exc).splitlines()[0])
        raise UsageError(message) from None


# -- vertical learning (%fed_sim --data, %fed_vtrain) ---------------------------------------------

def simulation_source(args: Any) -> dict[str, Any]:
    """``%fed_sim``'s N parties on a bundled dataset, or its ``--data`` tables, as ``simulate``'s keywords."""
    if args.data:
        if args.n is not None or args.dataset or args.partition or args.alpha != 0.5:
            raise UsageError("--data starts one party per table: leave out N, --dataset, --partition and --alpha")
        return {"data": party_tables(args.data), "id_column": args.id_column, "label": args.label}
    if args.n is None:
        raise UsageError("give the number of parties (%fed_sim 4) or each party's table (--data NAME=FILE)")
    if args.id_column is not None or args.label is not None:
        raise UsageError("--id-column and --label describe the tables of --data NAME=FILE")
    return {"n": args.n, "dataset": args.dataset or "digits", "partition": args.partition or "dirichlet",
            "alpha": args.alpha}


def pool_options(args: Any) -> dict[str, Any]:
    """``%fed_sim``'s ``--backend``, ``--workers`` and ``--examples-per-party`` as ``simulate``'s keywords."""
    if args.backend == "process":
        if args.workers is not None or args.examples_per_party is not None:
            raise UsageError("--workers and --examples-per-party go with --backend pool or ray")
        return {}
    return {"backend": args.backend, **({"workers": args.workers} if args.workers is not None else {}),
            **({"examples_per_party": args.examples_per_party} if args.examples_per_party is not None else {})}


def party_tables(specs: list[str]) -> dict[str, str]:
    """``--data NAME=FILE`` (repeated) as ``simulate``'s ``data=``: {party name: file}."""
    tables: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.strip("'\"").partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--data expects NAME=FILE (a party and its table), got {spec!r}")
        if name in tables:
            raise UsageError(f"--data names party {name!r} twice")
        tables[name] = path
    return tables


def class_labels(text: str | None) -> list[int] | None:
    """``--classes 0,1,2,3`` as a list of distinct integers (None: a binary model)."""
    if text is None:
        return None
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--classes expects comma-separated integer class labels, got {text!r}") from None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise UsageError(f"--classes needs at least two distinct class labels, got {text!r}")
    return labels


#: ``LogisticConfig``'s and ``PaillierConfig``'s field names as ``%fed_vtrain`` spells them, for their errors.
LOGISTIC_FLAGS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "l2": "--l2",
                  "optimizer": "--optimizer", "key_bits": "--key-bits"}


def logistic_options(*, epochs: int, lr: float, batch_size: int, l2: float, optimizer: str, key_bits: int,
                     plaintext: bool, classes: list[int] | None, seed: int) -> dict[str, Any]:
    """``%fed_vtrain logistic``'s flags as ``Vertical.train_logistic``'s keywords, checked as the API checks
    them (before anything is shown or sent), its errors in the flags' names."""
    from fednb.privacy.paillier import PaillierConfig
    from fednb.vertical.logistic import LogisticConfig

    _in_flags(lambda: LogisticConfig(epochs=epochs, lr=lr, batch_size=batch_size, l2=l2, optimizer=optimizer,  # type: ignore[arg-type]
                                     encrypted=not plaintext, paillier=PaillierConfig(key_bits=key_bits), seed=seed),
              LOGISTIC_FLAGS)
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2, "optimizer": optimizer,
            "key_bits": key_bits, "encrypted": not plaintext, "classes": classes, "seed": seed}


#: ``Vertical.train_logistic``'s and ``Vertical.train_boosting``'s defaults, as ``%fed_vtrain`` fills them in for
#: the options left out (a test keeps them equal to the API's); ``--key-bits``, ``--plaintext`` and ``--seed``
#: are both algorithms' and default to the same values.
LOGISTIC_DEFAULTS: dict[str, Any] = {"epochs": 20, "lr": 0.15, "batch_size": 240, "l2": 0.01, "optimizer": "sgd"}
BOOSTING_DEFAULTS: dict[str, Any] = {"trees": 10, "depth": 3, "bins": 32, "lr": 0.3, "l2": 1.0,
                                     "min_child_weight": 1.0, "objective": "binary"}

#: ``BoostingConfig``'s field names as ``%fed_vtrain boosting`` spells them, for its errors.
BOOSTING_FLAGS = {"trees": "--trees", "depth": "--depth", "bins": "--bins", "lr": "--lr", "l2": "--l2",
                  "min_child_weight": "--min-child-weight", "objective": "--objective", "key_bits": "--key-bits"}


def vertical_options(args: Any) -> dict[str, Any]:
    """``%fed_vtrain ALGORITHM``'s flags as the keywords of ``train_logistic`` or ``train_boosting``: the other
    algorithm's options refused, the ones left out the API's defaults."""
    mine, theirs = ((BOOSTING_DEFAULTS, LOGISTIC_DEFAULTS) if args.algorithm == "boosting"
                    else (LOGISTIC_DEFAULTS, BOOSTING_DEFAULTS))
    other = "logistic" if args.algorithm == "boosting" else "boosting"
    for name in [*(n for n in theirs if n not in mine), *(["classes"] if other == "logistic" else [])]:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            hint = " (boosting: --objective multiclass)" if name == "classes" else ""
            raise UsageError(f"{flag} applies to %fed_vtrain {other}, not {args.algorithm}{hint}")
    given = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in mine.items()}
    shared = {"key_bits": args.key_bits, "plaintext": args.plaintext}
    if args.algorithm == "boosting":
        if args.seed:
            raise UsageError("--seed applies to %fed_vtrain logistic (its batches), not boosting: SecureBoost's "
                             "shuffles draw from the system's CSPRNG and nothing else in it is random")
        return boosting_options(**given, **shared)
    return logistic_options(**given, **shared, seed=args.seed, classes=class_labels(args.classes))


def boosting_options(*, trees: int, depth: int, bins: int, lr: float, l2: float, min_child_weight: float,
                     objective: str, key_bits: int, plaintext: bool) -> dict[str, Any]:
    """``%fed_vtrain boosting``'s flags as ``Vertical.train_boosting``'s keywords, checked as ``BoostingConfig``
    checks them (before anything is shown or sent), its errors in the flags' names."""
    from fednb.vertical.boosting import BoostingConfig

    settings: dict[str, Any] = {"trees": trees, "depth": depth, "bins": bins, "lr": lr, "l2": l2,
                                "min_child_weight": min_child_weight, "objective": objective, "key_bits": key_bits,
                                "encrypted": not plaintext}
    _in_flags(lambda: BoostingConfig(**settings), BOOSTING_FLAGS)
    return settings
