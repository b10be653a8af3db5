"""The tables of ``bench/round_overhead.py``: one row per (parties, size, workload), printed."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from typing import Any

WORKLOADS = ("noop", "evaluated")


def size_label(params: int) -> str:
    return f"{params // 1_000_000}M"


def transport_label(tcp: bool) -> str:
    return "tcp+CURVE" if tcp else "ipc"


def median_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1000.0 if values else None


def iqr_ms(values: Sequence[float]) -> str:
    """The middle half of ``values`` in ms, as "25th–75th percentile"."""
    if len(values) < 2:
        return "—"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low * 1000:.0f}–{high * 1000:.0f}"


def build_rows(cells: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (N, size, workload) with every transport's medians, ratios and cross-checks."""
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}
    for cell in cells:
        name = "tcp_curve" if cell["transport"] != "ipc" else "ipc"
        measured = [(params, order, workload) for params in sizes for order, workload in enumerate(WORKLOADS)
                    if f"{params}:{workload}" in cell["sizes"]]
        for params, order, workload in measured:
            size = cell["sizes"][f"{params}:{workload}"]
            row = rows.setdefault((cell["parties"], params, order),
                                  {"parties": cell["parties"], "params": params, "workload": workload})
            raw, fed = size["raw"], size["fednb"]
            raw_ms, fed_ms = median_ms(raw["rounds_s"]), median_ms(fed["rounds_s"])
            row[f"{name}_rounds"] = len(fed["rounds_s"])
            row[f"raw_{name}_ms"], row[f"fednb_{name}_ms"] = raw_ms, fed_ms
            row[f"ratio_{name}"] = fed_ms / raw_ms if raw_ms and fed_ms else None
            row[f"raw_{name}_iqr"], row[f"fednb_{name}_iqr"] = iqr_ms(raw["rounds_s"]), iqr_ms(fed["rounds_s"])
            pairs = [f / r for f, r in zip(fed["rounds_s"], raw["rounds_s"]) if r > 0]
            row[f"paired_{name}"] = statistics.median(pairs) if pairs else None
            for key in ("outside_s", "record_of_outside_s", "party_mean_s", "party_max_s"):
                row[f"fednb_{name}_{key[:-2]}_ms"] = median_ms(fed[key])
            row[f"raw_{name}_peak_rss_mib"], row[f"fednb_{name}_peak_rss_mib"] = raw["peak_rss_mib"], fed["peak_rss_mib"]
            row[f"{name}_baseline_rss_mib"] = cell["baseline_rss_mib"]
    return [rows[key] for key in sorted(rows)]


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print(" | ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths)))


def print_report(rows: list[dict[str, Any]], cells: list[dict[str, Any]], transports: list[bool]) -> None:
    names = [("tcp_curve" if tcp else "ipc", transport_label(tcp)) for tcp in transports]

    headers = ["parties", "params", "workload", "rounds"]
    for _, label in names:
        headers += [f"raw {label} ms", "IQR", f"fednb {label} ms", "IQR", "ratio", "paired"]
    table = []
    for row in rows:
        line = [str(row["parties"]), size_label(row["params"]), row["workload"],
                str(row.get(f"{names[0][0]}_rounds", "—"))]
        for name, _ in names:
            line += [_fmt(row.get(f"raw_{name}_ms")), row.get(f"raw_{name}_iqr", "—"),
                     _fmt(row.get(f"fednb_{name}_ms")), row.get(f"fednb_{name}_iqr", "—"),
                     _fmt(row.get(f"ratio_{name}"), 2, "×"), _fmt(row.get(f"paired_{name}"), 2, "×")]
        table.append(line)
    _print_table("Median round time (ms) and interquartile range; ratio = fednb / raw medians; paired = median "
                 "of each fednb round over the raw round after it", headers, table)

    headers = ["parties", "params", "workload"]
    for _, label in names:
        headers += [f"{label}: party mean ms", "party max ms", "outside ms", "its record ms"]
    table = [[str(row["parties"]), size_label(row["params"]), row["workload"]]
             + [_fmt(row.get(f"fednb_{name}_{key}_ms"))
                for name, _ in names for key in ("party_mean", "party_max", "outside", "record_of_outside")]
             for row in rows]
    _print_table("fednb detail: party kernel time per request (PartyRound.seconds, median over rounds); "
                 "train(rounds=1) timed outside vs its RoundRecord.seconds", headers, table)

    headers = ["parties", "params", "workload"]
    for _, label in names:
        headers += [f"{label}: baseline MiB", "raw peak MiB", "fednb peak MiB"]
    table = [[str(row["parties"]), size_label(row["params"]), row["workload"]]
             + [_fmt(row.get(f"{key}"), 0) for name, _ in names
                for key in (f"{name}_baseline_rss_mib", f"raw_{name}_peak_rss_mib", f"fednb_{name}_peak_rss_mib")]
             for row in rows]
    resettable = all(cell.get("peak_rss_resettable") for cell in cells)
    _print_table("Coordinator RSS: baseline after start-up, and peak while each system's rounds ran"
                 + ("" if resettable else " (ru_maxrss: lifetime peak, not per system)"), headers, table)

    headers = ["parties", "transport", "raw workers listening s", "fednb ready_seconds", "fednb simulate() s"]
    table = [[str(c["parties"]), c["transport"], _fmt(c["raw_ready_s"], 2), _fmt(c["fednb_ready_s"], 2),
              _fmt(c["fednb_simulate_s"], 2)] for c in cells]
    _print_table("Time to ready: simulate()'s ready_seconds is host start → all parties listening; "
                 "simulate() s is the whole call, connect included", headers, table)
    sys.stdout.flush()
