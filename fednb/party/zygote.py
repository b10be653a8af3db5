"""``python -m fednb.party.zygote --control FD``: a party's worker zygote, spawned where the party cannot fork.

A module of its own, which the party never imports, so that ``-m`` runs it fresh (see
:mod:`fednb.party.worker`).
"""

from __future__ import annotations

import sys

from fednb.party.worker import main

if __name__ == "__main__":
    sys.exit(main())
