"""fednb: federated learning that lives in Jupyter.

``fednb.simulate(4)`` starts a local federation; ``fednb.connect("parties.toml", key=…)``
reaches real parties; both return a :class:`Federation` to ``train``, ``evaluate`` and
``run`` on. In IPython, ``%load_ext fednb`` adds the ``%fed_*`` magics.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fednb.errors import FederationError, FednbError, PartyError, RoundError, WireError  # noqa: E402
from fednb.federation import Evaluation, Federation, History, PartyResults, connect  # noqa: E402
from fednb.sim import simulate  # noqa: E402

__all__ = [
    "Evaluation",
    "Federation",
    "FederationError",
    "FednbError",
    "History",
    "PartyError",
    "PartyResults",
    "RoundError",
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
