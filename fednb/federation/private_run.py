"""One training run under differential privacy, as the coordinator drives it.

:class:`PrivateRun` is made when ``train(..., dp=…)`` is checked, before round 1: it resolves
the noise (a target ε is calibrated there, for every party's whole run), wraps the strategy
when DP-FedAvg's noise is added here, and sizes secure aggregation's clip for the noise the
parties add. Each round it gives the request's ``dp`` object, takes the parties' clipped
bits, and accounts what the round cost each party that keeps no budget of its own (parties with
a budget report theirs; see :mod:`fednb.federation.privacy`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fednb.federation.privacy import PrivacyBook, PrivateStrategy, check_dp, run_mechanisms
from fednb.federation.secure import SecureAggregation
from fednb.privacy.dpfedavg import DPFedAvg, update_noise_multiplier
from fednb.privacy.dpsgd import DPSGD
from fednb.privacy.request import mechanism_for, read_dp, wire_dp
from fednb.strategies import Strategy

log = logging.getLogger(__name__)

#: A noised update's norm stays below clip + σ·(√d + NOISE_MARGIN) but with probability < e^(-NOISE_MARGIN²/2).
NOISE_MARGIN = 10.0


class PrivateRun:
    """The DP of one run (see the module docstring). ``examples`` are the parties' training-set sizes."""

    def __init__(self, dp: DPSGD | DPFedAvg, *, rounds: int, config: Mapping[str, Any], examples: Mapping[str, int],
                 strategy: Strategy, secure: SecureAggregation | None, dimension: int, book: PrivacyBook,
                 train_cell: str | None) -> None:
        check_dp(dp, secure=secure is not None, train_cell=train_cell)
        self.dp, self.rounds, self.config, self.book = dp, rounds, dict(config), book
        self.examples = dict(examples)
        self.strategy: Strategy = strategy
        self.secure = secure
        self._bits: list[int] = []
        if isinstance(dp, DPSGD):
            self._fixed = wire_dp(dp, rounds=rounds, config=config, examples=self.examples)
            log.info("DP-SGD: noise multiplier %.4g for %d rounds", self._fixed["noise_multiplier"], rounds)
            return
        self._fixed = {}
        if dp.noise_at == "coordinator":
            self.strategy = PrivateStrategy(strategy, dp, update_noise_multiplier(dp))
        elif secure is not None:
            # each party adds N(0, (zC)²/t) with t ≥ 2: the sum's range must hold that noise, never clip it
            sigma = update_noise_multiplier(dp) * dp.clip / math.sqrt(2)
            needed = dp.clip + sigma * (math.sqrt(dimension) + NOISE_MARGIN)
            if secure.clip < needed:
                self.secure = dataclasses.replace(secure, clip=needed)
                log.info("secure aggregation's clip raised to %.4g for the parties' DP noise", needed)

    @property
    def clip(self) -> float:
        """DP-FedAvg's clip for the next round (adaptive clipping moves it)."""
        return self.strategy.clip if isinstance(self.strategy, PrivateStrategy) else getattr(self.dp, "clip", 0.0)

    def round_dp(self, online: Sequence[str]) -> dict[str, Any]:
        """The ``dp`` object of the next round's train request."""
        if self._fixed:
            return dict(self._fixed)
        assert isinstance(self.dp, DPFedAvg)
        parties = None
        if self.secure is not None:
            _k, parties, _q = self.secure.config().plan(max(len(online), 2))
        return wire_dp(self.dp, rounds=self.rounds, config=self.config, examples=self.examples,
                       noise_parties=parties, clip=self.clip)

    def forecast(self, parties: Sequence[str]) -> list[tuple[str, float, float]]:
        """(party, ε after this run, budget) for each party the whole run would take past its budget."""
        dp = self.round_dp(parties)
        over = []
        for party in parties:
            forecast = self.book.forecast(party, run_mechanisms(dp, self.config, self.examples.get(party), self.rounds))
            if forecast is not None and forecast[0] > forecast[1]:
                over.append((party, *forecast))
        return over

    def observe(self, party: str, content: Mapping[str, Any]) -> None:
        """A train reply's content: DP-FedAvg's clipped bit, for adaptive clipping."""
        clipped = (content.get("dp") or {}).get("clipped") if isinstance(content.get("dp"), Mapping) else None
        if clipped in (0, 1) and not isinstance(clipped, bool):
            self._bits.append(int(clipped))

    def finish_round(self, dp: Mapping[str, Any], *, run: str, round: int, parties: Sequence[str]) -> None:
        """After a round: move the adaptive clip, and account the round at parties without a budget."""
        if isinstance(self.strategy, PrivateStrategy):
            self.strategy.adapt(self._bits)
        self._bits = []
        request = read_dp(dp)
        for party in parties:
            examples = self.examples.get(party)
            if party in self.book.reported or not examples:
                continue
            self.book.charged(party, mechanism_for(request, self.config, examples), request.delta,
                              run=run, round=round)
