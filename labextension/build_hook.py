"""The extension's build step for hatch-jupyter-builder, with an off switch.

``pip install .`` and ``pip install -e .`` run ``jlpm install`` and ``jlpm build:prod``
here (through ``hatch_jupyter_builder.npm_builder``, which skips both when the built files
are newer than ``labextension/src``). ``FEDNB_SKIP_JS=1`` skips the JS build for
Python-only work: no node needed, and the wheel ships no JupyterLab extension.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hatch_jupyter_builder import npm_builder

BUILT = ("fednb/labextension/package.json", "fednb/labextension/install.json", "fednb/labextension/static/style.js")


def build(target_name: str, version: str, **kwargs: Any) -> None:
    if os.environ.get("FEDNB_SKIP_JS", "").strip() not in ("", "0"):
        print("fednb: FEDNB_SKIP_JS is set, so the JupyterLab extension is not built", file=sys.stderr)
        return
    npm_builder(target_name, version, **kwargs)
    missing = [path for path in BUILT if not Path(path).exists()]
    if missing:
        raise RuntimeError(f"the JupyterLab extension build left out {', '.join(missing)}; "
                           "run `jlpm build:prod` in labextension/ to see why")
