"""The extension's build step for hatch-jupyter-builder, with an off switch.

``pip install .`` and ``pip install -e .`` run ``jlpm install`` and ``jlpm build:prod``
here (through ``hatch_jupyter_builder.npm_builder``, which skips both when the built files
are newer than ``labextension/src``). ``FEDNB_SKIP_JS=1`` skips the JS build for
Python-only work: no node needed, and the wheel ships no JupyterLab extension.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

BUILT = ("fednb/labextension/package.json", "fednb/labextension/install.json", "fednb/labextension/static/style.js")
NODE_MAJOR = 18  # the oldest Node.js that JupyterLab 4's build supports
SKIP = "set FEDNB_SKIP_JS=1 to build fednb without its JupyterLab extension"


def node_problem(path: str | None = None) -> str | None:
    """Why the extension cannot be built here (no node, or one too old), in one line; None when it can."""
    node = shutil.which("node", path=path)
    if node is None:
        return f"fednb: building the JupyterLab extension needs Node.js >= {NODE_MAJOR}, and node is not on PATH: " \
               f"install it (e.g. apt-get install nodejs), or {SKIP}"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"fednb: {node} --version failed ({exc}): install Node.js >= {NODE_MAJOR}, or {SKIP}"
    major = re.match(r"v?(\d+)\.", version)
    if major is None or int(major.group(1)) < NODE_MAJOR:
        return f"fednb: building the JupyterLab extension needs Node.js >= {NODE_MAJOR}, and {node} is " \
               f"{version or 'of unknown version'}: upgrade it, or {SKIP}"
    return None


def build(target_name: str, version: str, **kwargs: Any) -> None:
    if os.environ.get("FEDNB_SKIP_JS", "").strip() not in ("", "0"):
        print("fednb: FEDNB_SKIP_JS is set, so the JupyterLab extension is not built", file=sys.stderr)
        return
    problem = node_problem()
    if problem is not None:
        # SystemExit, not an exception: its one line ends the build output, with no traceback above it.
        raise SystemExit(problem)
    from hatch_jupyter_builder import npm_builder

    npm_builder(target_name, version, **kwargs)
    missing = [path for path in BUILT if not Path(path).exists()]
    if missing:
        raise SystemExit(f"fednb: the JupyterLab extension build left out {', '.join(missing)}; "
                         f"run `jlpm build:prod` in labextension/ to see why, or {SKIP}")
