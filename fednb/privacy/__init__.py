"""Privacy for fednb rounds: secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020).

Pure code, no sockets: :class:`SecAggParty` and :class:`SecAggCoordinator` hold one round's
state for each role, with one method per stage of the paper; the round loop carries their
messages. Parameters live in :class:`SecAggConfig`.
"""

from __future__ import annotations

from fednb.privacy.quantize import Quantizer
from fednb.privacy.secagg import (
    PublicKeys,
    RoundSetup,
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SecAggMessageError,
    SecAggResult,
)
from fednb.privacy.secagg_coordinator import SecAggCoordinator
from fednb.privacy.secagg_party import SecAggParty
from fednb.privacy.shamir import combine, split

__all__ = [
    "PublicKeys",
    "Quantizer",
    "RoundSetup",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggCoordinator",
    "SecAggError",
    "SecAggMessageError",
    "SecAggParty",
    "SecAggResult",
    "combine",
    "split",
]
