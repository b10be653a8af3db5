"""The notebook layer: magics, dashboard widget, display helpers.

``%load_ext fednb`` calls :func:`load_ipython_extension`; nothing here is imported by
``import fednb``, so parties and scripts never pay for IPython or widgets.
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%fed_*`` magics with ``ipython`` (``%load_ext fednb``)."""
    from fednb.notebook.magics import FedMagics

    ipython.register_magics(FedMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Close the session's federation when the extension is unloaded."""
    from fednb.notebook.magics import FedMagics

    magics = ipython.magics_manager.registry.get(FedMagics.__name__)
    if magics is not None:
        magics.close_federation()
