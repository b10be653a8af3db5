#!/usr/bin/env bash
# Anchor environment for bench/flower_anchor.py: Flower 1.42 (Ray simulation)
# in its own venv at bench/.flower-venv, kept apart from fednb's .venv.
# Idempotent: creates and fills the venv only when it is missing.
# torch is pinned to the CPU build on this machine's disk (an unpinned torch
# would pull a multi-GB CUDA build).
set -euo pipefail
venv="$(cd "$(dirname "$0")" && pwd)/.flower-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install torch==2.13.0 "flwr[simulation]==1.42.*" scikit-learn
fi
echo "$venv/bin/python"
