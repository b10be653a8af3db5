"""What coordinator code a party runs: code hashes, the three policies, and the decision on a request.

Every request that carries code is named by the SHA-256 of its canonical code (see
:func:`request_code`). The policy decides what happens to a name the owner has not approved:

``review``     it waits until the owner approves or denies it (``fednb approve PARTY_DIR``,
               or the ``%fed_serve`` widget); the coordinator is told that it waits.
``allowlist``  it is refused at once; only hashes in the approvals file run.
``open``       everything runs (trusted lab set-ups); the party warns loudly at start-up.

``simulation`` is ``open`` for a local simulation, where the coordinator and every party are
the same user: code is auto-approved and nothing is printed about it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fednb.party.execution import LOOP_NAME, LOOP_VERSION, code_hash
from fednb.wire.vertical import STEPS

#: Policies an owner may choose (``fednb party --policy``).
POLICIES = ("review", "allowlist", "open")
#: Policies a party accepts: the owner's, and the simulation's auto-approval.
ALL_POLICIES = (*POLICIES, "simulation")
#: Policies under which the egress guard checks every reply.
GUARDED = frozenset({"review", "allowlist"})
#: The built-in loop as it enters a code hash.
LOOP = f"{LOOP_NAME} v{LOOP_VERSION}"
#: SCAFFOLD's part of a train request's code: the control-variate correction and what it returns.
SCAFFOLD_LOOP = "fednb.scaffold v1"


def check_policy(policy: str) -> str:
    """``policy`` when a party accepts it, else ValueError naming the choices."""
    if policy not in ALL_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class RequestCode:
    """The code a request would run: its hash, its parts as the owner reviews them, its kind.

    ``companions`` are hashes an approval of this one also approves: approving the training
    of a model approves evaluating the same model with the built-in evaluation, which runs
    no other code.
    """

    hash: str
    kind: str
    model: str | None
    cell: str | None
    loop: str | None
    companions: tuple[str, ...] = ()

    def parts(self) -> dict[str, str | None]:
        return {"model": self.model, "cell": self.cell, "loop": self.loop}


def _hash(kind: str, model: str | None, cell: str | None, loop: str | None) -> str:
    # Each part carries a tag, so a cell whose text equals the loop's name hashes differently.
    tagged = [kind]
    for tag, part in (("model", model), ("cell", cell), ("loop", loop)):
        if part is not None:
            tagged += [tag, part]
    return code_hash(*tagged)


def request_code(type_: str, content: Mapping[str, Any]) -> RequestCode:
    """The canonical code of a ``train``, ``evaluate``, ``run`` or ``vertical`` request (content already checked).

    train:    model source + training cell, or model source + the built-in loop's name and version;
              under SCAFFOLD also its name and version (its rounds return the change of the party's
              control variate too: an approval of the plain training does not cover them)
    evaluate: model source + the built-in loop's name and version (its evaluation)
    run:      the cell
    A one-byte change to any part is a new hash.
    """
    if type_ == "train":
        model, cell = content["source"], content.get("train_cell")
        loop = LOOP if cell is None else None
        if content.get("scaffold") is True:
            loop = f"{loop} + {SCAFFOLD_LOOP}" if loop else SCAFFOLD_LOOP
        evaluate = _hash("evaluate", model, None, LOOP)
        return RequestCode(_hash("train", model, cell, loop), "train", model, cell, loop, (evaluate,))
    if type_ == "evaluate":
        model = content["source"]
        return RequestCode(_hash("evaluate", model, None, LOOP), "evaluate", model, None, LOOP)
    if type_ == "run":
        cell = content["source"]
        return RequestCode(_hash("run", None, cell, None), "run", None, cell, None)
    if type_ == "vertical":  # a built-in protocol: approved once by its versioned name, for all its steps
        protocol = STEPS.get(content["step"])
        if protocol is None:
            raise ValueError(f"unknown vertical step {content['step']!r}")
        loop = f"fednb vertical {protocol}"
        return RequestCode(_hash("vertical", None, None, loop), "vertical", None, None, loop)
    raise ValueError(f"a {type_!r} request carries no code")


class Verdict(enum.Enum):
    """What the gate does with a request."""

    RUN = "run"
    REFUSE = "refuse"
    WAIT = "wait"


@dataclass(frozen=True)
class Decision:
    """A verdict with its reason as the audit log and the coordinator see it."""

    verdict: Verdict
    reason: str


def decide(policy: str, standing: str, party: str, code: RequestCode) -> Decision:
    """The decision on ``code`` under ``policy`` given the owner's ``standing`` of its hash.

    ``standing`` is ``approved``, ``denied`` or ``unknown`` (see :class:`~fednb.party.approvals.Approvals`).
    """
    short = code.hash[:12]
    if policy in ("open", "simulation"):
        return Decision(Verdict.RUN, policy)
    if standing == "approved":
        return Decision(Verdict.RUN, "approved")
    if standing == "denied":
        return Decision(Verdict.REFUSE, f"the owner of {party} denied this code (hash {short})")
    if policy == "allowlist":
        return Decision(Verdict.REFUSE, f"{party} runs only approved code (policy allowlist) and code hash {short} "
                                        "is not approved; ask its owner to approve it")
    return Decision(Verdict.WAIT, f"awaiting approval at {party} (code hash {short})")
