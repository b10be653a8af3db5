"""The checks over a chaos run's outcome (:data:`CHECKS`) and its summary table.

Part of the chaos harness of tests/chaos.py: what the parties trained on, checked against the checkpoint's history.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from tests.chaos_coordinator import project
from tests.chaos_plan import Plan, State

CHECKS = ("every round 1..N completed, once, in order", "each round had >= min_parties contributions",
          "no party both contributed to and was dropped from a round", "each contribution's example count is its party's",
          "each contribution was trained for its round, from that round's global weights",
          "each round's weights are the example-weighted mean of exactly its contributions",
          "late replies happened and none was taken", "every abort names who was missing, none is a refused retry",
          "the coordinator was killed twice and resumed each time", "every party back from a fault took part again",
          "the coordinator's RSS stayed flat", "no process left")


# -- the checks and the summary -----------------------------------------------------------------------------

def reason_kind(reason: str) -> str:
    """A drop reason in a word or two, for the tables."""
    for needle, kind in (("does not move forward", "refused as a replay"), ("no reply within", "timeout"),
                         ("Cancelled", "cancelled"), ("unreachable", "unreachable"), ("connect", "offline"),
                         ("offline", "offline"), ("went ", "offline")):
        if needle in reason:
            return kind
    return reason[:60]


#: How far two projections of the same weights may differ: float32 rounding of ~2,400 values (seen: 2e-7).
TOLERANCE = 2e-6


def _aggregation(history: list[Any], final: float | None, initial: float, examples: dict[str, int],
                 problems: list[str]) -> dict[str, float]:
    """Each round's contributions against its global weights: trained for it, from it, counted once each."""
    worst, shifts = 0.0, []
    start: float | None = initial
    for index, record in enumerate(history):
        parties = record.parties
        for name, contribution in parties.items():
            metrics = contribution.metrics
            if contribution.examples != examples.get(name):
                problems.append(f"round {record.round}: {name} counted {contribution.examples} examples, "
                                f"not its {examples.get(name)}")
            if metrics.get("round") != record.round:
                problems.append(f"round {record.round}: {name}'s update was trained for round {metrics.get('round')}")
            if start is not None and not abs(metrics.get("w0", np.nan) - start) <= TOLERANCE:
                problems.append(f"round {record.round}: {name} trained from other weights than the round's "
                                f"({metrics.get('w0')} != {start})")
        n = np.array([parties[p].examples for p in parties], dtype=np.float64)
        w1 = np.array([parties[p].metrics.get("w1", np.nan) for p in parties])
        mean = float(n @ w1 / n.sum())
        after = history[index + 1] if index + 1 < len(history) else None
        result = (next(iter(after.parties.values())).metrics.get("w0") if after is not None and after.parties
                  else final)  # the next round's start, as its parties received it (or the coordinator's end)
        if result is not None:
            error = abs(result - mean)
            worst = max(worst, error)
            # the shift that one party counted twice would make: what the check must be able to see
            shifts.extend(n * np.abs(w1 - mean) / (n.sum() + n))
            if not error <= TOLERANCE:
                problems.append(f"round {record.round}: the global weights are not the example-weighted mean of "
                                f"its {len(parties)} contributions ({result} != {mean})")
        start = result
    seen = np.array(shifts) if shifts else np.zeros(1)
    return {"max_error": worst, "double_count_shift_min": float(seen.min()),
            "double_count_shift_median": float(np.median(seen)),
            "double_counts_visible": float(np.mean(seen > 2 * TOLERANCE))}


def summarize(plan: Plan, state: State, history: list[Any], examples: dict[str, int],
              seconds: float) -> dict[str, Any]:
    """The run's table and every check of :data:`CHECKS` that failed, as ``problems``."""
    problems = list(state.problems)
    events = state.events
    rounds = [r.round for r in history]
    if rounds != list(range(1, plan.rounds + 1)):
        problems.append(f"the checkpoint holds rounds {rounds}, not 1..{plan.rounds}")
    done = [e["round"] for e in events if e["event"] == "round"]
    if done != sorted(set(done)):
        problems.append(f"rounds were reported done out of order or twice: {done}")
    for record in history:
        if len(record.parties) < plan.min_parties:
            problems.append(f"round {record.round} completed with {len(record.parties)} < {plan.min_parties} parties")
        if set(record.parties) & set(record.dropped):
            problems.append(f"round {record.round}: {sorted(set(record.parties) & set(record.dropped))} both "
                            "contributed and were dropped")
        refused = sorted(name for name, why in record.dropped.items() if reason_kind(why) == "refused as a replay")
        if refused:
            problems.append(f"round {record.round}: {refused} refused the coordinator's own retry as a replay")
    import torch  # noqa: F401 - the model is built here only to know its starting projection

    from tests.conftest import build

    finals = [e for e in events if e["event"] == "done"]
    checked = _aggregation(history, finals[-1]["proj"] if finals else None, project(build(seed=plan.seed)),
                           examples, problems)
    if checked["double_counts_visible"] < 0.95:  # the check must be able to see a party counted twice
        problems.append(f"the aggregation check would miss a party counted twice in "
                        f"{1 - checked['double_counts_visible']:.0%} of contributions")
    # late replies: each coordinator process counts its own; the last count each one printed
    late: Counter[str] = Counter()
    for index in {e["process"] for e in events}:
        last = [e["late"] for e in events if e["process"] == index and "late" in e]
        late.update(last[-1] if last else {})
    if sum(late.values()) == 0:
        problems.append("no late reply was seen: the SIGSTOPs did not test that late replies are discarded")
    aborted = [e for e in events if e["event"] == "aborted"]
    for event in aborted:
        missing = event["dropped"]
        if len(missing) < plan.parties - plan.min_parties + 1 or not all(p in event["message"] for p in missing):
            problems.append(f"round {event['round']} aborted without naming who was missing: {event['message']}")
        refused = sorted(p for p, why in missing.items() if reason_kind(why) == "refused as a replay")
        if refused and not any("refused the coordinator's own retry" in p for p in problems):
            problems.append(f"round {event['round']} aborted because {refused} refused the coordinator's own "
                            "retry as a replay (the attempt of a resumed run is not kept past a failed round: "
                            "tests/test_chaos.py::test_a_round_that_failed_twice_can_still_be_resumed)")
    if plan.outage and not aborted:
        problems.append("the outage aborted no round")
    kills = state.faults["coordinator SIGKILL + resume"]
    starts = {e["process"]: e["t"] for e in events if e["event"] == "start"}
    resumes: list[dict[str, Any]] = []
    for index in range(1, kills + 1):
        trains = [e for e in events if e["process"] == index and e["event"] == "train"]
        first = next((e for e in events if e["process"] == index and e["event"] == "round"), None)
        if not trains or trains[0]["next_round"] < 2 or first is None:
            problems.append(f"coordinator-{index} did not resume the run from its checkpoint")
            continue
        connected = next(e["t"] for e in events if e["process"] == index and e["event"] == "connected")
        resumes.append({"at_round": trains[0]["next_round"], "attempt": trains[0]["attempt"],
                        "connect_s": round(connected - starts[index], 2),
                        "first_round_s": round(first["t"] - starts[index], 2)})
    if kills != plan.coordinator_kills:
        problems.append(f"the coordinator was killed {kills} times, not {plan.coordinator_kills}")
    rss = {}
    for index in sorted({e["process"] for e in events}):
        values = [e["rss_kb"] for e in events if e["process"] == index and e["event"] == "round"]
        if values:
            rss[f"coordinator-{index}"] = {"rounds": len(values), "first_kb": values[0], "last_kb": values[-1],
                                           "max_first_half_kb": max(values[: max(1, len(values) // 2)]),
                                           "max_second_half_kb": max(values[len(values) // 2:])}
    longest = max(rss.values(), key=lambda r: r["rounds"], default=None)
    if longest is None or longest["rounds"] < 4:
        problems.append("no coordinator ran enough rounds to judge its memory")
    elif longest["max_second_half_kb"] > (longest["max_first_half_kb"] + plan.rss_margin_kb
                                          + plan.rss_per_round_kb * (longest["rounds"] // 2)):
        problems.append(f"the coordinator's RSS grew past {plan.rss_per_round_kb} kB a round: {longest}")
    # a party back from a fault must take part again: else a fault would cost a party for the rest of the run
    rejoin: dict[str, list[float]] = {"restart": [], "continue": []}
    rounds_done = [e for e in events if e["event"] == "round"]
    for when, action, name in state.returns:
        back = next((e["t"] - when for e in rounds_done if e["t"] > when and name in e["parties"]), None)
        if back is not None:
            rejoin[action].append(round(back, 1))
        elif sum(1 for e in rounds_done if e["t"] > when + 30) >= 3:  # the run went on for long enough
            why = Counter(reason_kind(e["dropped"][name]) for e in rounds_done if e["t"] > when and name in e["dropped"])
            hint = (" (each round's cancel killed its fresh worker: tests/test_chaos.py::"
                    "test_a_party_slower_than_the_round_timeout_once_takes_part_later)" if why["timeout"] else "")
            problems.append(f"{name} never took part again after its {action}; dropped since: {dict(why)}{hint}")
    dropped = Counter(reason_kind(why) for record in history for why in record.dropped.values())
    return {"seed": plan.seed, "parties": plan.parties, "rounds": plan.rounds, "min_parties": plan.min_parties,
            "round_timeout": plan.round_timeout, "seconds": round(seconds, 1), "faults": dict(state.faults),
            "rounds_completed": len(history),
            "rounds_aborted": [{"round": e["round"], "why": dict(Counter(reason_kind(w) for w in e["dropped"].values()))}
                               for e in aborted],
            "dropped": dict(dropped), "late_replies": sum(late.values()), "late_by_party": dict(sorted(late.items())),
            "resumes": resumes, "rejoin_s": rejoin, "rss": rss, "aggregation": checked, "setup": dict(state.timings),
            "problems": problems}
