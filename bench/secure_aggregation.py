"""Plain FedAvg rounds against secure-aggregation rounds, in the same run, on the same parties.

For each cell (N parties × P float32 parameters) one simulation (``fednb.simulate``, ipc, the
parties running coordinator code in their own process) trains the same model with rounds that
alternate: one plain round, one secure round (``secure_aggregation=True``: keys, shares, masked,
unmask), so drift of the machine hits both columns alike. Each party's "training" is a cell that
moves every weight a little (so the secure round masks a real, non-zero update); the first pair
of rounds is discarded as warm-up. Times are ``RoundRecord.seconds`` (medians); the secure
round's stages are medians of ``RoundRecord.stages``. ``paired`` is the median over pairs of each
secure round over the plain round just before it: on a machine whose speed drifts from minute to
minute, it is steadier than the ratio of the two medians.

Upload per party: plain, the float32 weights (4·P bytes); secure, the masked vector of P + 1
uint32 values plus the public keys, the sealed shares (one per neighbour) and the unmasking
shares, as the stages' replies carry them (base64 in JSON), computed from the protocol's sizes.

Usage::

    .venv/bin/python bench/secure_aggregation.py                      # 10 × 1M, 50 × 1M, 100 × 100k
    .venv/bin/python bench/secure_aggregation.py --cells 10x1M --rounds 5
    .venv/bin/python bench/secure_aggregation.py --cells 50x1M --neighbours 16   # a sparse graph at 50
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

CELL = "with torch.no_grad():\n    for p in model.parameters():\n        p.add_(0.001)\n"


def size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1000, "M": 1000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def model_source(params: int) -> str:
    """A stack of bias-free linear layers of ``params`` values: 1000×1000 layers, or one 1000×k."""
    if params >= 1000_000:
        layers = params // 1000_000
        return (f"import torch.nn as nn\nmodel = nn.Sequential(*[nn.Linear(1000, 1000, bias=False) "
                f"for _ in range({layers})])\n")
    return f"import torch.nn as nn\nmodel = nn.Sequential(nn.Linear(1000, {params // 1000}, bias=False))\n"


def upload_bytes(parties: int, params: int, neighbours: int | None = None) -> tuple[int, int]:
    """(plain, secure) bytes one party uploads in one round, payloads only."""
    from fednb.privacy import graph
    from fednb.privacy.secagg import SEALED, SHARE

    def b64(n: int) -> int:
        return 4 * math.ceil(n / 3)

    k = graph.degree(parties, neighbours)
    plain = 4 * params
    keys = 3 * (b64(32) + 20)
    shares = k * (b64(SEALED) + 16) + b64(32) + 64 + 64 + b64(64) + 80
    masked = 4 * (params + 1)
    unmask = (k + 1) * (b64(SHARE) + 16)
    return plain, keys + shares + masked + unmask


def run_cell(parties: int, params: int, rounds: int, neighbours: int | None = None) -> dict[str, object]:
    import torch

    import fednb

    source = model_source(params)
    namespace: dict[str, object] = {}
    exec(source, namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    plain: list[float] = []
    secure: list[float] = []
    stages: dict[str, list[float]] = {}
    timeout = 600.0
    with fednb.simulate(parties, dataset="synthetic", partition="iid", timeout=300.0) as fed:
        for i in range(rounds + 1):
            p = fed.train(model, source, rounds=1, train_cell=CELL, evaluate_every=0, round_timeout=timeout)[-1]
            s = fed.train(model, source, rounds=1, train_cell=CELL, evaluate_every=0, round_timeout=timeout,
                          secure_aggregation=fednb.SecureAggregation(neighbours=neighbours))[-1]
            if i == 0:
                continue  # warm-up: connections, building the model at the parties
            plain.append(p.seconds)
            secure.append(s.seconds)
            for name, seconds in s.stages.items():
                stages.setdefault(name, []).append(seconds)
            assert s.secure["parties"] == parties, s.secure
    up_plain, up_secure = upload_bytes(parties, params, neighbours)
    return {"parties": parties, "params": params, "plain": statistics.median(plain),
            "secure": statistics.median(secure), "stages": {k: statistics.median(v) for k, v in stages.items()},
            "upload": up_secure / up_plain, "error_bound": s.secure["error_bound"],
            "paired": statistics.median(b / a for a, b in zip(plain, secure))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="10x1M,50x1M,100x100k", help="comma-separated NxP cells")
    parser.add_argument("--rounds", type=int, default=9, help="measured rounds of each kind per cell")
    parser.add_argument("--neighbours", type=int, default=None,
                        help="SecAgg+ degree (default: fednb's, all pairs up to 64 parties)")
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cores; times in seconds, medians of {args.rounds} rounds each; "
          "the machine may be shared with other work")
    header = (f"{'parties':>7} {'params':>9} {'plain':>7} {'secure':>7} {'ratio':>6} {'keys':>6} {'shares':>6} "
              f"{'masked':>6} {'unmask':>6} {'upload':>7} {'paired':>6}")
    print(header)
    for cell in args.cells.split(","):
        n_text, p_text = cell.lower().split("x")
        started = time.perf_counter()
        row = run_cell(int(n_text), size(p_text), args.rounds, args.neighbours)
        st = row["stages"]
        assert isinstance(st, dict)
        print(f"{row['parties']:>7} {row['params']:>9,} {row['plain']:>7.3f} {row['secure']:>7.3f} "
              f"{float(row['secure']) / float(row['plain']):>5.2f}x {st.get('keys', 0):>6.3f} "
              f"{st.get('shares', 0):>6.3f} {st.get('masked', 0):>6.3f} {st.get('unmask', 0):>6.3f} "
              f"{row['upload']:>6.3f}x {row['paired']:>5.2f}x   ({time.perf_counter() - started:.0f} s for the cell)",
              flush=True)


if __name__ == "__main__":
    main()
