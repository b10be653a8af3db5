"""fednb: federated learning that lives in Jupyter.

``fednb.simulate(4)`` starts a local federation; ``fednb.connect("parties.toml", key=…)``
reaches real parties; both return a :class:`Federation` to ``train``, ``evaluate`` and
``run`` on. In IPython, ``%load_ext fednb`` adds the ``%fed_*`` magics.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

from fednb.errors import FederationError, FednbError, PartyError, RoundError, WireError  # noqa: E402

if TYPE_CHECKING:
    from fednb.federation import Evaluation, Federation, History, PartyResults, connect
    from fednb.federation.secure import SecureAggregation
    from fednb.privacy.dpfedavg import DPFedAvg
    from fednb.privacy.dpsgd import DPSGD
    from fednb.sim import simulate

# The coordinator's names load on first use, so that a party process (which imports
# fednb.party) never imports the coordinator, and `import fednb` stays cheap.
_LAZY = {"Evaluation": "fednb.federation", "Federation": "fednb.federation", "History": "fednb.federation",
         "PartyResults": "fednb.federation", "SecureAggregation": "fednb.federation.secure",
         "DPSGD": "fednb.privacy.dpsgd", "DPFedAvg": "fednb.privacy.dpfedavg",
         "connect": "fednb.federation", "simulate": "fednb.sim"}

__all__ = [
    "DPFedAvg",
    "DPSGD",
    "Evaluation",
    "Federation",
    "FederationError",
    "FednbError",
    "History",
    "PartyError",
    "PartyResults",
    "RoundError",
    "SecureAggregation",
    "WireError",
    "__version__",
    "connect",
    "simulate",
]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext fednb``: add the ``%fed_*`` magics (IPython is imported only now)."""
    from fednb.notebook import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext fednb``: close the session's federation."""
    from fednb.notebook import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fednb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
