"""The exceptions fednb raises.

Every error fednb raises on purpose derives from :class:`FednbError`::

    FednbError
    ├── WireError            a frame or header that breaks the protocol or its limits
    ├── KeyFileError         a CURVE key file that is missing, malformed or too open
    ├── DataError            a dataset file that cannot be used as training data
    ├── GateError            a party's gate cannot decide: approvals, pending or audit files unusable
    ├── PartyError           a party answered a request with an error (carries .party, .round)
    ├── RoundError           a round ended with fewer replies than min_parties (.round, .dropped)
    └── FederationError      the federation cannot serve the call (closed, unknown party, no reply)

Bad arguments to a public function raise :class:`ValueError` at the call, before any
message leaves the process.
"""

from __future__ import annotations


class FednbError(Exception):
    """Base of every error fednb raises on purpose."""


class WireError(FednbError):
    """A message that breaks the wire protocol: malformed, unknown, or over a limit."""


class KeyFileError(FednbError):
    """A CURVE key file that cannot be used: missing, malformed, or readable by others."""


class DataError(FednbError):
    """A dataset file that cannot be used: wrong format, missing arrays, non-numeric values."""


class GateError(FednbError):
    """A party's gate cannot work: its directory, approvals, pending requests or audit log are unusable."""


class PartyError(FednbError):
    """A party answered a request with an error.

    ``error_type`` and ``message`` are what the party reported; ``party`` and ``round``
    say where and when.
    """

    def __init__(
        self,
        message: str,
        *,
        party: str | None = None,
        round: int | None = None,
        error_type: str = "Error",
        traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.party = party
        self.round = round
        self.error_type = error_type
        self.traceback = traceback

    def __str__(self) -> str:
        where = f"at {self.party}" if self.party else "at a party"
        when = f" (round {self.round})" if self.round is not None else ""
        return f"{self.error_type} {where}{when}: {self.message}"


class RoundError(FednbError):
    """A round that could not complete: fewer than ``min_parties`` replied in time."""

    def __init__(self, message: str, *, round: int | None = None, dropped: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.round = round
        self.dropped = dict(dropped or {})


class FederationError(FednbError):
    """The federation cannot serve the call: it is closed, a party is unknown or silent."""

    def __init__(self, message: str, *, party: str | None = None) -> None:
        super().__init__(message)
        self.party = party
