"""Chaos over many rounds: 8 `fednb party` processes, a checkpointing coordinator, a seeded fault thread.

    python bench/chaos.py                 # 100 rounds, seed 0
    python bench/chaos.py --rounds 300 --seed 4 --json out.json

The harness is tests/chaos.py (the short run of ``make test`` is tests/test_chaos.py): parties are
SIGKILLed and restarted, SIGSTOPped and SIGCONTed after longer than the round timeout, once enough
of them at once that a round must abort, and the coordinator is SIGKILLed twice and resumed from its
checkpoint. Prints the faults injected, the rounds completed and aborted (and why), the late replies
the coordinator discarded, the resume times and the coordinator's RSS, then every check that failed
(exit status 1 when one did).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos import CHECKS, Chaos, Plan  # noqa: E402 - after the path


def table(rows: list[tuple[str, object]]) -> str:
    if not rows:  # a short run may see no resume, say
        return "  (none)"
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-timeout", type=float, default=3.0)
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    parser.add_argument("--keep", metavar="DIR", help="copy the run's logs and events here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the harness stops what it started
    summary = Chaos(Plan(rounds=args.rounds, seed=args.seed, round_timeout=args.round_timeout,
                         deadline=args.deadline, keep=args.keep)).run()
    print(f"chaos: {summary['parties']} parties, {summary['rounds']} rounds, min_parties {summary['min_parties']}, "
          f"round timeout {summary['round_timeout']:g} s, seed {summary['seed']}, {summary['seconds']:.0f} s\n")
    setup = summary["setup"]
    print(f"set-up: 8 parties listening after {setup.get('parties_started_s', 0):.0f} s, the warm-up round took "
          f"{setup.get('warm_up_round_s', 0):.1f} s\n")
    print("faults injected")
    print(table(sorted(summary["faults"].items())))
    aborted = summary["rounds_aborted"]
    print("\nrounds")
    print(table([("completed", f"{summary['rounds_completed']} of {summary['rounds']}"),
                 ("aborted (RoundError, then resumed)", len(aborted))]
                + [(f"  round {a['round']} aborted", ", ".join(f"{n} {k}" for k, n in a["why"].items()))
                   for a in aborted]))
    print("\nparties dropped from completed rounds, by reason")
    print(table([(kind, n) for n, kind in sorted(((n, k) for k, n in summary["dropped"].items()), reverse=True)]))
    print("\nlate replies discarded:", summary["late_replies"], json.dumps(summary["late_by_party"]))
    print("\ncoordinator resumes")
    print(table([(f"at round {r['at_round']} (attempt {r['attempt']})",
                  f"connected {r['connect_s']:.1f} s, first round done {r['first_round_s']:.1f} s after start")
                 for r in summary["resumes"]]))
    print("\nparties back from a fault: seconds until they next contributed")
    print(table([(f"after {'a restart' if k == 'restart' else 'SIGCONT'}",
                  f"{len(v)} times, median {sorted(v)[len(v) // 2]:.1f} s, max {max(v):.1f} s" if v else "-")
                 for k, v in summary["rejoin_s"].items()]))
    print("\ncoordinator RSS (kB)")
    print(table([(name, f"{r['rounds']} rounds: first {r['first_kb']}, last {r['last_kb']}, max first half "
                        f"{r['max_first_half_kb']}, max second half {r['max_second_half_kb']}")
                 for name, r in summary["rss"].items()]))
    check = summary["aggregation"]
    print(f"\naggregation check: largest error {check['max_error']:.2g}; one update counted twice would move the "
          f"result by {check['double_count_shift_median']:.2g} (median; smallest {check['double_count_shift_min']:.2g})"
          f", visible for {check['double_counts_visible']:.1%} of contributions")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    problems = summary["problems"]
    print(f"\nchecks: {'FAILED' if problems else f'all {len(CHECKS)} held'}")
    for problem in problems:
        print("  -", problem)
    if not problems:
        print("  " + "; ".join(CHECKS))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
