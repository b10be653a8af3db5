"""The egress guard's rules for SecureBoost's steps: sealed payloads no larger than the protocol implies, metrics,
predictions of test rows only, and importance of the party's own features.

A sealed payload cannot be read by the guard (it is sealed for the peer inside the worker), so
its size is what the guard bounds: the ciphertexts a step implies (rows or candidates times the
width of n² for the run's key size, per margin and per node of the level) plus a bundle header.
Plaintext runs (g and h in the clear) are refused here: a guarded party boosts encrypted only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fednb.party.boosting import read_config
from fednb.privacy.seal import NONCE, TAG
from fednb.vertical.boosting import BoostingConfig
from fednb.wire import Message
from fednb.wire.bundle import LENGTH, LIMITS

#: a sealed bundle's bytes beyond its arrays: the seal, the bundle's header and frame lengths
OVERHEAD = NONCE + TAG + LIMITS.max_header_bytes + LENGTH * (LIMITS.max_buffers + 1)
MAX_METRICS = 8


class Blocked(ValueError):
    """A vertical reply that does not fit its step."""


class BoostingRules:
    """Mixed into :class:`fednb.party.vertical_egress.VerticalGuard` (which keeps the split sizes)."""

    rows: int
    columns: int
    train: dict[str, int]
    test: dict[str, int]

    def _boosters(self) -> dict[tuple[str, str], tuple[BoostingConfig, int]]:
        if not hasattr(self, "_booster_models"):
            self._booster_models: dict[tuple[str, str], tuple[BoostingConfig, int]] = {}
        return self._booster_models

    def _booster(self, run: str, asked: Any) -> tuple[BoostingConfig, int]:
        model = self._boosters().get((run, str(asked.get("model"))))
        if model is None:
            raise Blocked("no boosting model of this run was started here")
        return model

    @staticmethod
    def _sealed(arrays: Mapping[str, np.ndarray], names: list[str], most: int) -> None:
        if not names or set(arrays) != set(names):
            raise Blocked(f"this step returns sealed payloads only ({', '.join(names) or 'none'})")
        for name in names:
            value = arrays[name]
            if value.dtype != np.uint8 or value.ndim != 1 or not NONCE + TAG < value.size <= most + OVERHEAD:
                raise Blocked(f"{name!r} must be a sealed payload of at most {most + OVERHEAD} bytes")

    @staticmethod
    def _peers(arrays: Mapping[str, np.ndarray]) -> list[str]:
        return [name for name in arrays if name.startswith("sealed.")]

    def _width(self, config: BoostingConfig) -> int:
        return config.key_bits // 4  # bytes of n² for an n of key_bits bits

    def _level(self, asked: Any, config: BoostingConfig) -> int:
        level = asked.get("level", 0)
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < config.depth:
            raise Blocked("a level of the tree is required")
        return level

    def _sb_start(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config = read_config(asked.get("config") or {})
        if not config.encrypted:
            raise Blocked("a guarded party boosts encrypted only (plaintext mode is for development data)")
        classes = answer.get("classes", 1)
        if arrays or not set(answer) <= {"rows", "classes"} or answer.get("rows") != self.train.get(run) or \
                isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= 256:
            raise Blocked("starting a boosting model returns its training rows (and classes) only")
        self._boosters()[(run, str(asked["model"]))] = (config, classes)
        return answer

    def _sb_gradients(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config, classes = self._booster(run, asked)
        self._sealed(arrays, self._peers(arrays), classes * self.train[run] * self._width(config))
        return {}

    def _sb_histograms(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config, classes = self._booster(run, asked)
        candidates = self.columns * (config.bins - 1)
        self._sealed(arrays, ["sealed"], classes * 2 ** self._level(asked, config) * candidates * self._width(config))
        return {}

    def _sb_split(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        self._booster(run, asked)
        self._sealed(arrays, self._peers(arrays), 0)
        return {}

    def _sb_apply(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config, classes = self._booster(run, asked)
        nodes = classes * 2 ** self._level(asked, config)
        rows = self.train[run] + self.test.get(run, 0)
        self._sealed(arrays, ["sealed"], classes * (rows // 8) + 2 * nodes * 2)
        return {}

    def _sb_grow(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        config, classes = self._booster(run, asked)
        if answer.get("done") is True:
            if arrays or set(answer) != {"done", "metrics"}:
                raise Blocked("a finished round returns its metrics only")
            return {"done": True, "metrics": self._metrics(answer)}
        if answer != {"done": False}:
            raise Blocked("a level returns the next level's membership only")
        self._sealed(arrays, self._peers(arrays), classes * (self.train[run] + self.test.get(run, 0)) * 4)
        return {"done": False}

    def _metrics(self, answer: Mapping[str, Any]) -> dict[str, float]:
        metrics = answer.get("metrics")
        if not isinstance(metrics, Mapping) or len(metrics) > MAX_METRICS or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in metrics.items()):
            raise Blocked("metrics are a few finite numbers")
        return dict(metrics)

    def _sb_evaluate(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        self._booster(run, asked)
        if arrays or set(answer) != {"metrics"}:
            raise Blocked("evaluation returns a few finite metrics only")
        return {"metrics": self._metrics(answer)}

    def _sb_predict(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        _config, classes = self._booster(run, asked)
        positions = request.arrays.get("positions")
        test = self.test.get(run, 0)
        count = test if positions is None else int(positions.size)
        value = arrays.get("predictions")
        shapes = {(count,)} if classes == 1 else {(count, classes)}
        if value is None or set(arrays) != {"predictions"} or value.dtype != np.float64 or value.shape not in shapes \
                or count > test or not np.all(np.isfinite(value)):
            raise Blocked("predictions leave only for rows of the test split")
        return {"rows": count}

    def _sb_importance(self, run: str, asked: Any, request: Message, answer: dict, arrays: dict) -> dict[str, Any]:
        self._booster(run, asked)
        importance = answer.get("importance")
        if arrays or set(answer) != {"importance"} or not isinstance(importance, Mapping) or not all(
                isinstance(k, str) and k.isdigit() and int(k) < self.columns and isinstance(v, list) and len(v) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                for k, v in importance.items()):
            raise Blocked("importance returns split counts and gains of this party's own features only")
        return {"importance": dict(importance)}
