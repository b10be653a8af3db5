"""The party kernel: builds models from source, trains, evaluates and runs cells.

One namespace per coordinator identity, kept across requests, as a Jupyter kernel keeps its
user namespace. The kernel never touches sockets: it turns a request message into a reply.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fednb.party import training
from fednb.party.datasets import Datasets, Split
from fednb.party.execution import code_hash, describe_error, error_origin, run_cell
from fednb.party.vertical import Vertical
from fednb.privacy import RoundSetup, SecAggParty
from fednb.privacy.dpfedavg import clip_update, clipped_bit, noise_rng
from fednb.privacy.dpsgd import fit_private
from fednb.privacy.request import DPRequest, mechanism_for, read_dp, steps_for
from fednb.privacy.secagg import flat_update, model_hash
from fednb.strategies.scaffold import variate_template
from fednb.tensors import check_update, load_arrays, mismatch, state_arrays, template_of
from fednb.wire import Message, check_metrics
from fednb.wire.values import pack_value

log = logging.getLogger(__name__)


class Report:
    """``report(**metrics)`` inside a training cell: keeps the last value of each scalar."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def __call__(self, **metrics: Any) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"report({key}=…) needs a scalar, got a tensor of shape {tuple(value.shape)}")
                value = value.item()
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"report({key}=…) needs a number, got {type(value).__name__}")
            self.metrics[key] = float(value)


def label_counts(data: Any) -> dict[int, int]:
    """How many examples of each label a split (DataLoader, dataset or labels) holds."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        data = data.tensors[-1]
    labels = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


class _SecureRound:
    """A secure round in progress at this party: its protocol state and the update it will mask.

    Kept in the coordinator's session, in the worker: the update and the secrets never leave it
    except masked (see :mod:`fednb.privacy.secagg`).
    """

    def __init__(self, run: str, round: int, party: SecAggParty, update: np.ndarray, examples: int,
                 model_hash: bytes, dp: DPRequest | None = None) -> None:
        self.run, self.round, self.party = run, round, party
        self.update: np.ndarray | None = update
        self.examples = examples
        self.model_hash = model_hash
        self.dp = dp  # DP-FedAvg with noise at the parties: this party's share goes on before masking


class _Session:
    """What the party keeps for one coordinator: its namespace, built models, and a secure round."""

    def __init__(self, kernel: Kernel) -> None:
        self.namespace: dict[str, Any] = {
            "__name__": "__fednb__",
            "torch": torch,
            "nn": torch.nn,
            "F": torch.nn.functional,
            "np": np,
            "label_counts": label_counts,
        }
        self.models: dict[str, torch.nn.Module] = {}
        self.kernel = kernel
        self.secure: _SecureRound | None = None
        self.vertical: Vertical | None = None


class Kernel:
    """Turns ``train`` (plain, or opening a secure round), ``secagg``, ``evaluate`` and ``run`` requests
    into replies, one at a time."""

    def __init__(self, name: str, datasets: Datasets, *, min_aggregate: int = 3) -> None:
        self.name = name
        # the party process's gate enforces the owner's --min-aggregate on every secure stage;
        # this is the protocol's own floor, checked again here
        self.min_aggregate = min_aggregate
        self.datasets = datasets
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        with warnings.catch_warnings():
            # The party hands its data in read-only (see fednb.party.shared): torch warns that it
            # cannot mark a tensor so; a write to one faults the worker instead.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            # a feature party of a vertical federation holds no labels: its table is for vertical steps only
            self._tensors = {split: TensorDataset(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (s.x, s.y)))
                             for split, s in datasets.splits.items() if s.y is not None}

    def session(self, coordinator: str) -> _Session:
        with self._lock:
            if coordinator not in self._sessions:
                self._sessions[coordinator] = _Session(self)
            return self._sessions[coordinator]

    def handle(self, coordinator: str, request: Message) -> Message:
        """The reply to ``request``: a ``result``, or an ``error`` naming what went wrong."""
        started = time.perf_counter()
        try:
            session = self.session(coordinator)
            if request.type == "train" and request.content.get("secagg") is not None:
                content, arrays = self._train_secure(session, request)
            elif request.type == "train":
                content, arrays = self._train(session, request)
            elif request.type == "secagg":
                content, arrays = self._secagg(session, request)
            elif request.type == "evaluate":
                content, arrays = self._evaluate(session, request)
            elif request.type == "run":
                content, arrays = self._run(session, request)
            elif request.type == "vertical":
                if session.vertical is None:
                    session.vertical = Vertical(self.name, self.datasets["train"])
                content, arrays = session.vertical.handle(request.content, request.arrays)
            else:
                raise ValueError(f"the kernel does not handle {request.type!r} requests")
        except Exception as exc:  # noqa: BLE001 - any failure of coordinator code becomes an error reply
            error_type, message, trace = describe_error(exc)
            origin, line = error_origin(exc)
            log.warning("%s request %s failed: %s: %s", request.type, request.id[:8], error_type, message)
            # origin and line are for the party's egress guard, which removes them before the reply leaves
            return request.reply("error", {"error_type": error_type, "message": message, "traceback": trace,
                                           "origin": origin, "line": line})
        content["seconds"] = time.perf_counter() - started
        return request.reply("result", content, arrays)

    # -- requests ---------------------------------------------------------------------------

    def _model(self, session: _Session, source: str) -> torch.nn.Module:
        key = code_hash(source)
        model = session.models.get(key)
        if model is None:
            namespace = session.namespace
            namespace.pop("model", None)
            run_cell(source, namespace, kind="model")
            model = namespace.get("model")
            if not isinstance(model, torch.nn.Module):
                raise ValueError("the model source must define a torch.nn.Module named `model`")
            session.models[key] = model
        return model

    def _receive_weights(self, session: _Session, source: str, arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
        model = self._model(session, source)
        problem = mismatch(template_of(state_arrays(model)), arrays)
        if problem:
            raise ValueError(f"the weights sent do not fit the model built here ({problem}); "
                             "does the model source build the same architecture?")
        load_arrays(model, arrays)
        return model

    def _split(self, split: str) -> TensorDataset:
        if split not in self._tensors:
            raise ValueError(f"{self.name}'s {split} table has no label column: it takes part in vertical "
                             "federations only (fed.vertical(...))")
        return self._tensors[split]

    def _loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(self._split(split), batch_size=batch_size, shuffle=shuffle, generator=generator)

    def _train(self, session: _Session, request: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = training.check_config(request.content["config"])
        scaffold = request.content.get("scaffold") is True
        received, c, ci = training.read_variates(request.arrays, scaffold)
        model = self._receive_weights(session, request.content["source"], received)
        template = template_of(state_arrays(model))
        correction = self._correction(model, request, config, c, ci) if scaffold else None
        counting = correction.counting() if correction is not None else contextlib.nullcontext()
        given = None
        evaluation = None
        if request.content.get("evaluate"):  # the incoming weights are the last round's global model
            evaluation = self._test_metrics(model, config)
        seed = config["seed"] + (request.round or 0)
        training.seed(seed)
        loader = self._loader("train", config["batch_size"], shuffle=True, seed=seed)
        cell = request.content.get("train_cell")
        dp = read_dp(request.content["dp"]) if request.content.get("dp") is not None else None
        if dp is not None and dp.kind == "dpsgd":
            if cell is not None:
                raise ValueError("DP-SGD trains with the built-in loop only: a custom training cell cannot be "
                                 "made private record by record")
            examples = len(self._tensors["train"])
            rate, _steps = steps_for(config, examples)
            planned = mechanism_for(dp, config, examples)
            _metrics, steps = fit_private(model, self._tensors["train"], config, noise_multiplier=dp.noise_multiplier,
                                          max_grad_norm=dp.clip, sample_rate=rate)
            if steps != planned.steps:  # fit_private checks this too: the ledger charged the planned steps
                raise RuntimeError(f"DP-SGD took {steps} steps, not the {planned.steps} accounted")
            metrics: dict[str, float] = {}  # measured on the training records without noise: they stay here
        elif cell is None:
            with counting:
                metrics = training.fit(model, loader, config, correction)
        else:
            report = Report()
            namespace = session.namespace
            for name in training.SCOPE:  # a previous round's variates are gone
                namespace.pop(name, None)
            namespace.update(model=model, train=loader, config=dict(config), report=report,
                             test=self._loader("test", config["batch_size"], shuffle=False, seed=seed),
                             **(correction.scope() if correction is not None else {}))
            model.train()
            try:
                with counting:
                    run_cell(cell, namespace, kind="train")
                given = namespace.get("scaffold_ci_new")
            finally:
                for name in training.SCOPE:
                    namespace.pop(name, None)
            metrics = report.metrics
        arrays = state_arrays(model)
        problem = mismatch(template, arrays)
        if problem:  # the cell changed the cached model itself: build it afresh next time
            session.models.pop(code_hash(request.content["source"]), None)
            raise ValueError(f"after training the model no longer matches its architecture ({problem})")
        # finite values are checked once per hop: by the egress guard where one guards, and by the
        # coordinator's aggregation (fednb.tensors.check_update) on receipt
        metrics = check_metrics(metrics, where="report()")
        content: dict[str, Any] = {"examples": len(self._tensors["train"]), "metrics": metrics}
        if correction is not None:  # Δc_i for the coordinator, c_i⁺ for the party process (which keeps it)
            arrays = {**arrays, **correction.reply_arrays(correction.new_ci(received, arrays, given))}
        if dp is not None and dp.kind == "dpfedavg":
            arrays, clipped = self._clip(received, arrays, dp)
            content["metrics"] = {}  # what the training records scored is outside the update's guarantee
            if dp.adaptive:
                content["dp"] = {"clipped": clipped}
        if evaluation is not None:
            content["evaluation"] = evaluation
        return content, arrays

    @staticmethod
    def _correction(model: torch.nn.Module, request: Message, config: Mapping[str, Any],
                    c: Mapping[str, np.ndarray] | None, ci: Mapping[str, np.ndarray] | None) -> training.Correction:
        """SCAFFOLD's correction for this request, its control variates checked against the model."""
        if request.content.get("secagg") is not None or request.content.get("dp") is not None:
            raise ValueError("SCAFFOLD does not run under secure aggregation or DP yet: its Δc_i would need a masked "
                             "and noised sum of its own")
        if request.content.get("train_cell") is None and config["optimizer"] != "sgd":
            raise ValueError("SCAFFOLD's built-in loop trains with optimizer='sgd': option II reads the control "
                             "variate from the weights' change over SGD steps")
        variates = variate_template(template_of(state_arrays(model)))
        for what, arrays in (("the server control variate sent (scaffold.c/…)", c),
                             ("the party's control variate (scaffold.ci/…)", ci)):
            problem = check_update(variates, arrays or {})
            if problem:
                raise ValueError(f"{what} does not fit the model built here: {problem}")
        assert c is not None and ci is not None
        return training.Correction(model, c, ci)

    @staticmethod
    def _clip(received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray],
              dp: DPRequest) -> tuple[dict[str, np.ndarray], int]:
        """DP-FedAvg: the received weights moved by the update clipped to the round's L2 norm, and its clipped bit."""
        update = {k: np.asarray(trained[k], dtype=np.float64) - np.asarray(received[k], dtype=np.float64)
                  for k in received}
        clipped, norm = clip_update(update, dp.clip)
        out = {k: (np.asarray(received[k], dtype=np.float64) + clipped[k]).astype(np.asarray(received[k]).dtype)
               for k in received}
        return out, clipped_bit(norm, dp.clip)

    def _train_secure(self, session: _Session, request: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """AdvertiseKeys of a secure round: train, keep the update here, answer with public keys only."""
        session.secure = None  # a new round ends whatever round was in progress: its secrets go now
        setup = RoundSetup.from_dict(request.content["secagg"])
        if setup.run != request.content["run"] or setup.round != request.round:
            raise ValueError("the secure aggregation setup is for another run or round")
        received = request.arrays  # read-only views on the request's frames: training copies them into the model
        content, trained = self._train(session, request)
        update = flat_update(trained, received)
        if update.size != setup.dimension:
            raise ValueError(f"the round masks {setup.dimension} values, but the model has {update.size}")
        examples = int(content["examples"])
        if examples < 1:
            raise ValueError(f"{self.name} has no training examples to contribute")
        dp = read_dp(request.content["dp"]) if request.content.get("dp") is not None else None
        if dp is not None and dp.kind == "dpfedavg":
            if dp.adaptive:
                raise ValueError("adaptive clipping needs each party's clipped bit, which secure aggregation hides")
            examples = 1  # DP-FedAvg weighs every party alike: one party moves the sum by at most the clip
        party = SecAggParty(self.name, setup, min_parties=self.min_aggregate)
        session.secure = _SecureRound(setup.run, setup.round, party, update, examples, model_hash(received),
                                      dp if dp is not None and dp.noise_at == "parties" else None)
        out: dict[str, Any] = {"secagg": party.advertise_keys()}
        if "evaluation" in content:  # of the weights received: the global model, not this party's update
            out["evaluation"] = content["evaluation"]
        return out, {}

    def _secagg(self, session: _Session, request: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """ShareKeys, MaskedInputCollection and Unmasking of the secure round this session's train request opened."""
        secure, content = session.secure, request.content
        if secure is None or secure.run != content["run"] or secure.round != request.round:
            raise ValueError(f"{self.name} has no secure round {request.round} of this run in progress "
                             f"(its train request opens one)")
        stage, payload = content["stage"], content["request"]
        try:
            if stage == "shares":
                return {"secagg": secure.party.share_keys(payload, secure.model_hash)}, {}
            if stage == "masked":
                assert secure.update is not None
                update = secure.update if secure.dp is None else self._noised(secure)
                masked = secure.party.masked_input(payload, update, secure.examples)["masked"]
                secure.update = None  # never needed again; only masked has left
                return {"secagg": {}}, {"masked": masked}
            if stage == "unmask":
                shares = secure.party.unmask(payload)
                session.secure = None  # the round is over for this party
                return {"secagg": shares}, {}
        except BaseException:
            session.secure = None  # a stage that failed ends the round here: nothing more is revealed
            raise
        raise ValueError(f"unknown secure aggregation stage {stage!r}")

    @staticmethod
    def _noised(secure: _SecureRound) -> np.ndarray:
        """DP-FedAvg's share of the noise on this party's clipped update: N(0, (z·C)² / t), where t is the
        fewest inputs the unmasked sum can hold, so that the sum carries at least the full variance."""
        dp, update = secure.dp, secure.update
        assert dp is not None and update is not None
        parties = min(dp.noise_parties or 1, secure.party.fewest_inputs)
        stddev = dp.update_noise_multiplier * dp.clip / np.sqrt(parties)
        noised = update.astype(np.float64) + noise_rng().normal(0.0, stddev, size=update.shape)
        limit = secure.party.setup.config.clip
        norm = float(np.linalg.norm(noised))
        if norm > limit:  # secure aggregation would scale it down, and the noise with it: never
            raise ValueError(f"the noised update's norm ({norm:.4g}) exceeds the secure aggregation clip ({limit:g}); "
                             "the coordinator sizes that clip for the noise (SecureAggregation(clip=…) larger)")
        return noised

    def _test_metrics(self, model: torch.nn.Module, config: dict[str, Any]) -> dict[str, Any]:
        # in order, slices of the tensors: a DataLoader would fetch each example alone and collate them
        batches = training.batches(self._split("test"), max(config["batch_size"], 256))
        metrics, examples = training.evaluate(model, batches, config["loss"])
        return {"examples": examples, "metrics": metrics}

    def _evaluate(self, session: _Session, request: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = training.check_config(request.content["config"])
        model = self._receive_weights(session, request.content["source"], request.arrays)
        return self._test_metrics(model, config), {}

    def _run(self, session: _Session, request: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        namespace = session.namespace
        namespace.update(
            train=self._loader("train", 256, shuffle=False, seed=0),
            test=self._loader("test", 256, shuffle=False, seed=0),
            datasets=dict(self._tensors),
        )
        value = run_cell(request.content["source"], namespace, kind="run")
        packed, arrays = pack_value(_plain(value))
        return {"value": packed}, arrays


def _plain(value: Any) -> Any:
    """Tensors (also nested in lists and dicts) as numpy arrays, ready for the wire."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
