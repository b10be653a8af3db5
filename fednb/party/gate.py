"""The party's gate: policy on the way in, egress guard on the way out, the audit log throughout.

::

    request ──> admit: code hash ──policy + approvals──> run | refuse | wait (for the owner)
                secure stages: no code; covered by the approved train request that opened the round
    reply   <── release: egress guard (review/allowlist) ──< worker's reply
    every request ──> record: one audit line (who, what, decision, bytes, outcome)

The gate holds no sockets and runs no code; :class:`~fednb.party.server.PartyServer` calls it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fednb.errors import GateError, WireError
from fednb.party.approvals import Approvals
from fednb.party.audit import AuditLog
from fednb.party.budget import Budget
from fednb.party.datasets import Datasets
from fednb.party.directory import open_directory
from fednb.party.egress import EgressBlocked, EgressRules, Guard
from fednb.party.policy import GUARDED, Decision, RequestCode, Verdict, check_policy, decide, request_code
from fednb.strategies.scaffold import PREFIX, split
from fednb.wire import Message, check_content
from fednb.wire.vertical import RETURNS, STEPS

MIN_AGGREGATE = 3  # the fewest parties whose sum a party takes part in (``--min-aggregate``)


@dataclass(frozen=True)
class SecureGrant:
    """A secure round one coordinator opened with an approved train request: what its later stages may do."""

    run: str
    round: int
    code_hash: str
    masked: tuple[int, str]  # the masked vector's length (the model's size + 1) and dtype


def _secure_setup(message: Message) -> tuple[int, str] | str:
    """(masked length, dtype) that a secure train request sets up, or why its setup does not fit its weights."""
    setup = message.content["secagg"]
    config = setup.get("config") or {}
    size = sum(int(np.prod(a.shape)) for a in message.arrays.values())
    dimension, bits = setup.get("dimension"), config.get("bits")
    if dimension != size:
        return f"the secure aggregation setup masks {dimension} values but the model sent has {size}"
    if isinstance(bits, bool) or not isinstance(bits, int) or not 16 <= bits <= 62:
        return "the secure aggregation setup has no valid bits"
    return size + 1, ("uint32" if bits <= 32 else "uint64")

log = logging.getLogger(__name__)

_BANNER = """
************************************************************************************
  party {party} runs with policy OPEN: every authorized coordinator's code runs
  here unreviewed, and what it returns leaves unchecked. Use --policy review (the
  default) or allowlist unless every coordinator is trusted with the data itself.
************************************************************************************"""


def who(identity: str, label: str = "") -> str:
    """A coordinator as the owner reads it: its authorized-keys label, and its key's first digits."""
    return f"{label} ({identity[:12]})" if label else identity[:12]


@dataclass
class Ticket:
    """One request on its way through the gate."""

    identity: str
    message: Message
    bytes_in: int
    label: str = ""  # the coordinator's name in the authorized keys, for the owner's eyes
    code: RequestCode | None = None
    decision: Decision | None = None
    notes: list[str] = field(default_factory=list)
    privacy_head: str | None = None  # the ledger's head after this request's charge

    @property
    def who(self) -> str:
        return who(self.identity, self.label)


class Gate:
    """Policy, approvals, egress guard and audit log of one party."""

    def __init__(self, party: str, policy: str, datasets: Datasets, *, directory: str | os.PathLike[str] | None = None,
                 rules: EgressRules | None = None, require_secure_aggregation: bool = False,
                 min_aggregate: int = MIN_AGGREGATE, dp_budget: tuple[float, float] | None = None) -> None:
        if isinstance(min_aggregate, bool) or not isinstance(min_aggregate, int) or min_aggregate < 2:
            raise ValueError(f"min_aggregate must be an integer of at least 2, not {min_aggregate!r}")
        self.party = party
        self.require_secure_aggregation = require_secure_aggregation
        self.min_aggregate = min_aggregate
        #: per coordinator identity, the secure round its last approved secure train request opened
        self.secure: dict[str, SecureGrant] = {}
        #: Called with each ticket once its end is recorded, and whether a result left with it: what the
        #: party keeps from a reply (SCAFFOLD's c_i, :mod:`fednb.party.keep`) advances only then.
        self.on_recorded: Callable[[Ticket, bool], None] | None = None
        self.policy = check_policy(policy)
        self.guarded = policy in GUARDED
        if self.guarded and directory is None:
            raise ValueError(f"policy {policy} needs a party directory for its approvals (directory=...)")
        if dp_budget is not None and directory is None:
            raise ValueError("a privacy budget needs a party directory for its ledger (directory=...)")
        self.budget: Budget | None = None
        self.directory: Path | None = open_directory(directory, create=True) if directory is not None else None
        self._serving_fd: int | None = None
        self.approvals: Approvals | None = None
        self.audit: AuditLog | None = None
        if self.directory is not None:
            self._claim(self.directory)
            try:
                self.approvals = Approvals(self.directory, party)
                self.audit = AuditLog(self.directory)  # GateError when the log does not verify
                if dp_budget is not None:  # LedgerError when the ledger does not verify against the log
                    train = datasets.splits.get("train")
                    self.budget = Budget(party, self.directory, *dp_budget,
                                         train_examples=len(train.x) if train is not None else 0,
                                         audited_head=self.audit.privacy_head)
            except BaseException:
                self.close()
                raise
        self.guard = Guard(party, datasets, rules)
        if policy == "open":
            log.warning(_BANNER.format(party=party))

    def _claim(self, directory: Path) -> None:
        """Hold the directory for this party's lifetime: two parties on one audit log would fork its chain."""
        fd = os.open(directory / ".serving", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GateError(f"another party is serving from {directory}") from None
        self._serving_fd = fd

    def close(self) -> None:
        if self._serving_fd is not None:
            os.close(self._serving_fd)
            self._serving_fd = None

    # -- the way in -------------------------------------------------------------------------------

    def admit(self, ticket: Ticket, *, again: bool = False) -> Decision:
        """Decide on a request; a waiting one is recorded for the owner, a run one uses up its approval.

        ``again``: a waiting request looked at anew after the owner's decisions changed. When the
        party directory cannot be read or written, the request is refused (and that is logged).
        """
        if self.audit is not None and self.audit.failed:  # fail closed: nothing runs that the log cannot record
            ticket.decision = Decision(Verdict.REFUSE, f"{self.party} cannot write its audit log, so it runs nothing "
                                                       "until its owner fixes that (see its log)")
            return ticket.decision
        try:
            return self._admit(ticket, again)
        except (OSError, GateError) as exc:
            log.error("could not decide on %s request %s: %s", ticket.message.type, ticket.message.id[:8], exc)
            ticket.decision = Decision(Verdict.REFUSE, f"{self.party} could not decide on this request (see its log)")
            return ticket.decision

    def _admit(self, ticket: Ticket, again: bool) -> Decision:
        message = ticket.message
        if message.type == "secagg":
            ticket.decision = self._secure_stage(ticket)
            return ticket.decision
        masked: tuple[int, str] | str | None = None
        if message.type == "train":
            if message.content.get("secagg") is None and self.require_secure_aggregation:
                ticket.code = request_code(message.type, message.content)
                ticket.decision = Decision(Verdict.REFUSE, f"{self.party} releases updates only under secure "
                                                           "aggregation")
                return ticket.decision
            if message.content.get("secagg") is not None:
                masked = _secure_setup(message)
                if isinstance(masked, str):
                    ticket.code = request_code(message.type, message.content)
                    ticket.decision = Decision(Verdict.REFUSE, f"{self.party} refuses this round: {masked}")
                    return ticket.decision
        if ticket.code is None:
            ticket.code = request_code(message.type, message.content)
        code = ticket.code
        mechanism = None
        if self.budget is not None:
            refusal, mechanism, _dp = self.budget.admit(message)
            if refusal is not None:
                ticket.decision = refusal
                return refusal
        if message.type == "vertical" and self.guarded and message.content["step"] in ("lr.start", "sb.start"):
            config = message.content["request"].get("config")
            why = None
            if not isinstance(config, dict):
                why = f"{message.content['step']} must carry its settings as an object"
            elif not config.get("encrypted", True):
                why = (f"{self.party} trains vertical models encrypted only (plaintext mode would let scores or "
                       "gradients of training rows out)")
            if why is not None:
                ticket.decision = Decision(Verdict.REFUSE, why)
                return ticket.decision
        standing = self.approvals.standing(code.hash) if self.approvals is not None else "unknown"
        ticket.decision = decision = decide(self.policy, standing, self.party, code)
        if self.approvals is not None and standing == "unknown" and decision.verdict is not Verdict.RUN and not again:
            who = f"{ticket.label} ({ticket.identity})" if ticket.label else ticket.identity
            recorded = self.approvals.add_pending(code, who, self.returns(message),
                                                  refused=decision.verdict is Verdict.REFUSE)
            if not recorded and decision.verdict is Verdict.WAIT:  # the owner could not see it: never wait unseen
                ticket.decision = decision = Decision(Verdict.REFUSE, f"too many requests await review at {self.party}")
        if decision.verdict is Verdict.RUN and mechanism is not None:
            assert self.budget is not None
            entry = self.budget.charge(mechanism, coordinator=ticket.identity, label=ticket.label, message=message)
            if isinstance(entry, str):
                ticket.decision = decision = Decision(Verdict.REFUSE, entry)
                return decision
            ticket.privacy_head = entry["hash"]
            ticket.notes.append(f"privacy: {mechanism.kind} charged (q {mechanism.sampling_rate:.4g}, noise "
                                f"{mechanism.noise_multiplier:.4g}, {mechanism.steps} steps); ε after "
                                f"{entry['epsilon_after']:.4g} of {entry['epsilon_budget']:g}")
        if decision.verdict is Verdict.RUN and standing == "approved" and code.kind in ("train", "run"):
            assert self.approvals is not None
            self.approvals.use(code.hash)
        if decision.verdict is Verdict.RUN and isinstance(masked, tuple):
            # the later stages of this round are covered by this approval (and only they: a new
            # secure train request from this coordinator replaces the grant)
            self.secure[ticket.identity] = SecureGrant(message.content["run"], message.round or 0, code.hash, masked)
        return decision

    def _secure_stage(self, ticket: Ticket) -> Decision:
        """A later stage of a secure round: runs only within the round an approved train request opened."""
        message = ticket.message
        content = message.content
        grant = self.secure.get(ticket.identity)
        if grant is None or grant.run != content["run"] or grant.round != message.round:
            return Decision(Verdict.REFUSE, f"{self.party} has no approved secure round {message.round} of this run "
                                            "from this coordinator (its train request opens one)")
        ticket.code = RequestCode(grant.code_hash, "secagg", None, None, None)
        payload = content["request"]
        stage = content["stage"]
        named = {"shares": payload.get("keys"), "masked": payload.get("parties"), "unmask": payload.get("survivors")}
        parties = named.get(stage)
        count = len(parties) if isinstance(parties, (dict, list)) else 0
        if count < self.min_aggregate:
            self.secure.pop(ticket.identity, None)
            what = {"shares": "advertised keys", "masked": "shared keys", "unmask": "survived"}[stage]
            return Decision(Verdict.REFUSE, f"{self.party} takes part only in sums of at least {self.min_aggregate} "
                                            f"parties; {count} {what} in round {message.round}")
        return Decision(Verdict.RUN, f"covered by the approval of code {grant.code_hash[:12]} (secure round "
                                     f"{message.round}, stage {stage})")

    def changed(self) -> bool:
        """Whether the owner's decisions changed since the last look (cheap: one stat)."""
        return self.approvals is not None and self.approvals.refresh()

    def returns(self, message: Message) -> str:
        """What a request would return, in the owner's words."""
        rules = self.guard.rules
        if message.type == "train" and message.content.get("secagg") is not None:
            values = sum(int(np.prod(a.shape)) for a in message.arrays.values())
            return (f"under secure aggregation: public keys, encrypted shares for the other parties, one masked "
                    f"vector of {values + 1:,} integers and unmasking shares; no update, example count or metrics "
                    "in the clear")
        if message.type == "train":
            weights = split(message.arrays, PREFIX)[0]  # SCAFFOLD's c travels beside the weights
            values = sum(int(np.prod(a.shape)) for a in weights.values())
            scaffold = (", the change of its SCAFFOLD control variate (one array per float tensor, shaped alike; "
                        "the variate itself stays here)" if message.content.get("scaffold") else "")
            return (f"the model's weights ({len(weights)} tensors, {values:,} values, names, shapes and dtypes "
                    f"as sent){scaffold}, the example count and at most {rules.max_metrics} scalar metrics, and when "
                    "asked the example count and metrics of the weights sent on the test split")
        if message.type == "evaluate":
            return "the example count and scalar metrics (loss, accuracy) of the model on the test split"
        if message.type == "vertical":
            return RETURNS[STEPS[message.content["step"]]]
        return (f"numbers, or lists/dicts/arrays of numbers (at most {rules.max_values:,} values; counts from 1 to "
                f"{rules.min_group - 1} suppressed); no strings, no raw rows")

    # -- the way out ------------------------------------------------------------------------------

    def release(self, ticket: Ticket, reply: Message) -> tuple[Message, str]:
        """The reply that may leave, and its outcome for the audit log. The unmasking stage closes its secure
        round here: nothing of that round runs again."""
        try:
            return self._release(ticket, reply)
        finally:
            if ticket.message.type == "secagg" and ticket.message.content.get("stage") == "unmask":
                self.secure.pop(ticket.identity, None)

    def _release(self, ticket: Ticket, reply: Message) -> tuple[Message, str]:
        request = ticket.message
        if reply.type == "error":
            trace = reply.content.get("traceback")
            log.warning("%s request %s from %s failed: %s: %s%s", request.type, request.id[:8], ticket.who,
                        reply.content.get("error_type"), reply.content.get("message"),
                        f"\n{trace}" if isinstance(trace, str) and trace else "")
        try:
            if self.guarded:
                grant = self.secure.get(ticket.identity)
                masked = grant.masked if grant is not None and request.type == "secagg" else None
                out, note = self.guard.reply(request, reply, masked=masked)
            else:
                out, note = self._plain(request, reply), ""
        except EgressBlocked as exc:
            log.warning("egress guard blocked the reply to %s request %s from %s: %s", request.type, request.id[:8],
                        ticket.who, exc.reason)
            message = f"{self.party}'s egress guard blocked the reply: {exc.reason}"
            return request.reply("error", {"error_type": "EgressBlocked", "message": message}), f"blocked: {exc.reason}"
        if note:
            log.info("%s request %s: %s", request.type, request.id[:8], note)
        if out.type == "error":
            return out, f"error: {out.content.get('error_type')}"
        if self.budget is not None and request.type == "train":  # every train reply says what is left
            out = request.reply(out.type, {**out.content, "privacy": self.budget.summary()}, dict(out.arrays))
        return out, "ok" + (f" ({note})" if note else "")

    @staticmethod
    def _plain(request: Message, reply: Message) -> Message:
        """A worker's reply as the wire allows it, without the guard (open and simulation)."""
        content = dict(reply.content)
        if reply.type == "error":
            content = {k: content[k] for k in ("error_type", "message", "traceback") if k in content}
        out = request.reply(reply.type, content, dict(reply.arrays))
        try:
            return check_content(out)
        except WireError as exc:
            log.warning("the worker's reply to %s does not fit the wire: %s", request.id[:8], exc)
            return request.reply("error", {"error_type": "WireError", "message": f"the reply was malformed: {exc}"})

    def refusal(self, ticket: Ticket) -> Message:
        assert ticket.decision is not None
        return ticket.message.reply("error", {"error_type": "PolicyRefused", "message": ticket.decision.reason})

    # -- the record -------------------------------------------------------------------------------

    def record(self, ticket: Ticket, outcome: str, bytes_out: int = 0) -> None:
        """One audit line for a request that is finished (answered, refused, cancelled or abandoned).

        Raises GateError when the line cannot be written: the caller withholds the reply. Either way
        :attr:`on_recorded` hears of the end: a result leaves when ``outcome`` is ``ok`` and its line was written.
        """
        released = outcome == "ok" or outcome.startswith("ok (")
        try:
            if self.audit is not None:
                self._append(ticket, outcome, bytes_out)
        except BaseException:
            released = False
            raise
        finally:
            if self.on_recorded is not None:
                self.on_recorded(ticket, released)

    def _append(self, ticket: Ticket, outcome: str, bytes_out: int) -> None:
        assert self.audit is not None
        message = ticket.message
        self.audit.append({
            "coordinator": ticket.identity, "label": ticket.label or None, "type": message.type, "request": message.id, "round": message.round,
            "code_hash": ticket.code.hash if ticket.code else None,
            "decision": ticket.decision.verdict.value if ticket.decision else None,
            "reason": ticket.decision.reason if ticket.decision else None, "notes": ticket.notes or None,
            "bytes_in": ticket.bytes_in, "bytes_out": bytes_out, "outcome": outcome,
            **({"privacy_head": ticket.privacy_head} if ticket.privacy_head else {}),
        })
