"""What ``Federation.status()`` and ``Federation.run()`` return, one row or result per party."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fednb.errors import PartyError


@dataclass(frozen=True)
class PartyInfo:
    """One row of ``Federation.status()``."""

    name: str
    endpoint: str
    status: str
    examples: int | None
    last_round: int | None
    last_error: str
    #: Seconds since the party was last heard from (heartbeats included); None if never.
    silent_for: float | None = None
    #: How the party contains coordinator code, as it said: "full" (no network, only its
    #: datasets), "weak" (limits only), "none" (a simulation's own process), or "unknown".
    containment: str = "unknown"
    #: The party's privacy budget as it last reported it (ε spent, budget, remaining, δ, latest
    #: charges); None where its owner set none.
    privacy: dict[str, Any] | None = None


class PartyResults(dict):  # type: ignore[type-arg]
    """``Federation.run`` results: party name → returned value, or the :class:`PartyError` it raised."""

    @property
    def errors(self) -> dict[str, PartyError]:
        return {name: value for name, value in self.items() if isinstance(value, PartyError)}

    @property
    def ok(self) -> dict[str, Any]:
        return {name: value for name, value in self.items() if not isinstance(value, PartyError)}
