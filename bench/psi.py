"""Throughput of fednb's ECDH-PSI: N × N ids with half of them in common, both roles on this machine.

Runs the three stages (Blind, DoubleBlind, Intersect) of :mod:`fednb.privacy.psi` for two
parties one after the other, each using every core (``--workers``), checks the result, and
prints ids per second per core: the ids of both parties (2N) over wall time × workers, and
over the CPU seconds that all processes spent (which does not depend on other load on the
machine). Each id costs one hash to the curve and two scalar multiplications (its owner's
blinding and the other party's double blinding).

    .venv/bin/python bench/psi.py --n 100000 [--group ed25519|x25519] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time

from fednb.privacy import psi


def cpu_seconds(pool: object = None) -> float:
    """CPU time of this process, and of the pool's worker processes (the pool's forked workers, read from /proc)."""
    t = os.times()
    total = t.user + t.system
    for pid in getattr(pool, "pids", ()):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="ids per party (default 1,000,000)")
    parser.add_argument("--group", choices=["ed25519", "x25519"], default="ed25519")
    parser.add_argument("--workers", type=int, default=None, help="processes per party (default: every core)")
    args = parser.parse_args()
    n = args.n
    config = psi.PSIConfig(group=args.group, workers=args.workers)
    # Party A holds ids 0 … n-1 as integers, party B n/2 … 3n/2-1 as strings: half in common,
    # and the canonical form must make 7 and "7" meet.
    ids_a = list(range(n))
    ids_b = [str(i) for i in range(n // 2, n + n // 2)]
    stages: dict[str, float] = {}
    wall, cpu = time.perf_counter(), cpu_seconds()
    pool = psi.open_pool(config)

    t = time.perf_counter()
    state_a, blinded_a = psi.blind(ids_a, config, pool=pool)
    state_b, blinded_b = psi.blind(ids_b, config, pool=pool)
    stages["blind"] = time.perf_counter() - t
    t = time.perf_counter()
    twice_a = psi.double_blind(state_b, blinded_a, pool=pool)
    twice_b = psi.double_blind(state_a, blinded_b, pool=pool)
    stages["double_blind"] = time.perf_counter() - t
    t = time.perf_counter()
    result_a = psi.intersect(state_a, twice_a, twice_b)
    result_b = psi.intersect(state_b, twice_b, twice_a)
    size = psi.intersection_size(twice_a, twice_b)
    stages["intersect"] = time.perf_counter() - t

    wall, cpu = time.perf_counter() - wall, cpu_seconds(pool) - cpu
    pool.shutdown()
    expected = n - n // 2
    assert result_a.size == result_b.size == size == expected, (result_a.size, result_b.size, size)
    assert all(ids_a[i] == int(ids_b[j]) for i, j in zip(result_a.rows, result_b.rows))
    cores = config.cores
    print(f"ECDH-PSI ({args.group}), {n:,} × {n:,} ids, {expected:,} in common, {cores} worker(s) per party")
    print("  " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items()))
    print(f"  wall {wall:.1f} s, CPU {cpu:.1f} s")
    print(f"  {2 * n / wall / cores:,.0f} ids/s per core (2N ids / wall / cores)")
    print(f"  {2 * n / cpu:,.0f} ids per CPU-second (2N ids / CPU seconds of all processes)")


if __name__ == "__main__":
    main()
