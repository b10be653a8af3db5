"""The owner's privacy budget at the gate: what runs on the training data is accounted, and paid for first.

::

    train request ──dp?──no──> refused: a budget party trains only what it can account
                     │ yes
                     ├─ custom train cell ──> refused (its privacy cannot be accounted)
                     ├─ DP-FedAvg with noise at the coordinator ──> refused (the party cannot see it added)
                     ├─ DP-SGD calibrated to a target ε that this party's run would exceed ──> refused
                     └─ ledger.preview: ε after > budget ──> refused, naming ε spent, cost and left
    admitted (the gate's verdict is RUN) ──> ledger.charge, before the worker starts;
                                             the ledger's new head goes into the audit line
    run request ──> refused: a cell sees the training data, and its output cannot be accounted

The charge comes before the work, so a request that fails or is cancelled after it started has
still been paid for: ε is spent when the data is touched, whatever becomes of the reply. Each
charge's ledger head is written into the request's audit line, and :class:`Budget` checks the
ledger against the last recorded head when the party starts (a ledger cut back or replaced is
found, and the party does not serve).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fednb.party.policy import Decision, Verdict
from fednb.privacy.accountant import Mechanism
from fednb.privacy.ledger import BudgetExceeded, Ledger, LedgerError, ledger_path
from fednb.privacy.request import DPRequest, check_target, mechanism_for, read_dp
from fednb.wire import Message
from fednb.wire.config import check_config

log = logging.getLogger(__name__)

#: How many of the latest charges a party's privacy summary carries.
SUMMARY_HISTORY = 64


class Budget:
    """One party's ε budget over its training data: its ledger, and the checks of each request."""

    def __init__(self, party: str, directory: str | os.PathLike[str], epsilon: float, delta: float, *,
                 train_examples: int, audited_head: str | None) -> None:
        self.party = party
        self.examples = train_examples
        self.ledger = Ledger(ledger_path(directory), epsilon, delta)
        if audited_head is not None:
            after = self.ledger.check_head(audited_head)  # LedgerError: lines removed, or the ledger replaced
            if after:
                log.warning("the privacy ledger holds %d charge(s) the audit log did not record (a crash between "
                            "the two writes); they count as spent", after)
        log.info("party %s: privacy budget ε = %g at δ = %g; ε spent %.4g", party, epsilon, delta, self.ledger.spent)

    def admit(self, message: Message) -> tuple[Decision | None, Mechanism | None, DPRequest | None]:
        """(a refusal or None, the mechanism to charge if the request runs, its DP settings)."""
        if message.type == "run":
            return self._refuse("a cell run on the training data cannot be accounted against its privacy budget; "
                                "it runs only evaluations and DP training"), None, None
        if message.type == "vertical" and message.content["step"] == "lr.start":
            return self._refuse("vertical training is not accounted against a privacy budget"), None, None
        if message.type != "train":
            return None, None, None
        content = message.content
        if content.get("dp") is None:
            return self._refuse("it trains only with differential privacy: train with dp=fednb.DPSGD(...) "
                                "(%fed_train --dp-noise / --dp-epsilon) or dp=fednb.DPFedAvg(...)"), None, None
        if content.get("train_cell") is not None:
            return self._refuse("a custom training cell's privacy cannot be accounted: only the built-in DP loop "
                                "runs under a privacy budget (drop the %%fed_train cell)"), None, None
        try:
            request = read_dp(content["dp"])
            config = check_config(content["config"])
            mechanism = mechanism_for(request, config, self.examples)
        except (ValueError, TypeError) as exc:
            return self._refuse(f"its differential privacy settings cannot be used: {exc}"), None, None
        if request.kind == "dpfedavg" and request.noise_at != "parties":
            return self._refuse("DP-FedAvg with the noise added by the coordinator cannot be accounted here (the "
                                "party cannot see it added): use noise_at='parties' with secure aggregation"), None, None
        problem = check_target(request, config, self.examples)
        if problem is not None:
            return self._refuse(problem), None, None
        spent, after = self.ledger.preview(mechanism)
        budget = self.ledger.epsilon_budget
        if not after <= budget:
            exceeded = BudgetExceeded(spent=spent, after=after, budget=budget, delta=self.ledger.delta,
                                      party=self.party, round=message.round)
            return Decision(Verdict.REFUSE, str(exceeded)), None, None
        return None, mechanism, request

    def charge(self, mechanism: Mechanism, *, coordinator: str, label: str, message: Message) -> dict[str, Any] | str:
        """Record the charge for a request about to run: its ledger entry, or the reason it is refused after all
        (another request spent the budget in between, or the ledger cannot be written)."""
        try:
            return self.ledger.charge(mechanism, coordinator=coordinator, run=str(message.content.get("run")),
                                      round=message.round, label=label or None, party=self.party)
        except BudgetExceeded as exc:
            return str(exc)
        except LedgerError as exc:
            log.error("could not charge the privacy ledger: %s", exc)
            return f"{self.party} could not write its privacy ledger, so it runs no training (see its log)"

    def summary(self) -> dict[str, Any]:
        """What the party says about its budget: spent, budget, remaining, δ and its latest charges
        (without which coordinator asked for them)."""
        summary = self.ledger.summary()
        history = [{k: v for k, v in entry.items() if k not in ("coordinator", "label")}
                   for entry in summary["history"][-SUMMARY_HISTORY:]]
        # RDP adds up step by step, so equal (kind, q, noise) charges fold into one: a coordinator can
        # then forecast exactly what a run would leave
        grouped: dict[tuple[str, float, float], int] = {}
        for mechanism in self.ledger.history:
            key = (mechanism.kind, mechanism.sampling_rate, mechanism.noise_multiplier)
            grouped[key] = grouped.get(key, 0) + mechanism.steps
        out = {"epsilon_spent": summary["epsilon_spent"], "epsilon_budget": summary["epsilon_budget"],
               "epsilon_remaining": summary["epsilon_remaining"], "delta": summary["delta"], "history": history}
        if len(grouped) <= SUMMARY_HISTORY:
            out["mechanisms"] = [{"kind": k, "sampling_rate": q, "noise_multiplier": z, "steps": n}
                                 for (k, q, z), n in grouped.items()]
        return out

    def _refuse(self, why: str) -> Decision:
        return Decision(Verdict.REFUSE, f"{self.party} has a privacy budget (ε {self.ledger.epsilon_budget:g}), and "
                                        f"{why}")
