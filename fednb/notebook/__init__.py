"""The notebook layer: magics, dashboard widget, display helpers.

``%load_ext fednb`` calls :func:`load_ipython_extension`; nothing here is imported by
``import fednb``, so parties and scripts never pay for IPython or widgets.
"""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%fed_*`` magics (``%load_ext fednb``) and, in a kernel, the JupyterLab sidebar's comm target."""
    from fednb.notebook.magics import FedMagics
    from fednb.notebook.sidebar import install

    ipython.register_magics(FedMagics)
    session = ipython.magics_manager.registry[FedMagics.__name__].session
    session.quiet_logs(True)
    install(ipython, session)
    if getattr(ipython, "kernel", None) is not None:
        from fednb.notebook.transform import await_training

        if await_training not in ipython.input_transformers_cleanup:
            ipython.input_transformers_cleanup.append(await_training)


def unload_ipython_extension(ipython: Any) -> None:
    """Close the session's federation and stop any party it serves when the extension is unloaded."""
    from fednb.notebook.magics import FedMagics
    from fednb.notebook.sidebar import uninstall

    uninstall(ipython)
    from fednb.notebook.transform import await_training

    if await_training in getattr(ipython, "input_transformers_cleanup", []):
        ipython.input_transformers_cleanup.remove(await_training)
    magics = ipython.magics_manager.registry.get(FedMagics.__name__)
    if magics is not None:
        magics.session.close_federation()
        magics.session.stop_serving()
        magics.session.quiet_logs(False)
