"""Small displays for magics: tables and per-party results, as HTML in notebooks and text elsewhere."""

from __future__ import annotations

import html
import math
import pprint
from collections.abc import Mapping, Sequence
from typing import Any

from fednb.errors import PartyError


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


class Table:
    """Rows under a header: an HTML table in a notebook, aligned columns in a terminal."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str = "") -> None:
        self.columns = list(columns)
        self.rows = [[_cell(v) for v in row] for row in rows]
        self.title = title

    def __repr__(self) -> str:
        widths = [max([len(c), *(len(r[i]) for r in self.rows)]) for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip())
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f'<table class="fednb-table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def parties_table(rows: Sequence[Any]) -> Table:
    """``Federation.status()`` rows as a table."""
    return Table(["party", "endpoint", "status", "containment", "examples", "last round", "last error"],
                 [[r.name, r.endpoint, r.status, getattr(r, "containment", "unknown"), r.examples, r.last_round,
                   r.last_error] for r in rows])


def evaluation_table(evaluation: Any) -> Table:
    """An :class:`~fednb.federation.Evaluation`: one row per party, then the weighted global row."""
    names = sorted({k for m in evaluation.parties.values() for k in m if k != "examples"})
    rows: list[list[Any]] = [[party, int(m.get("examples", 0)), *(m.get(k) for k in names)]
                             for party, m in evaluation.parties.items()]
    rows.append(["(global)", sum(int(m.get("examples", 0)) for m in evaluation.parties.values()),
                 *(evaluation.metrics.get(k) for k in names)])
    rows += [[party, "", f"dropped: {reason}"] for party, reason in evaluation.dropped.items()]
    return Table(["party", "examples", *names], rows)


class PartyOutputs:
    """What ``%%fed_run`` returned, grouped under each party's name; errors per party."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        self.results = dict(results)

    def _text(self, value: Any) -> str:
        if isinstance(value, PartyError):
            return f"{value.error_type}: {value.message}"
        return pprint.pformat(value, width=100, compact=True)

    def __repr__(self) -> str:
        return "\n".join(f"[{party}]\n{self._text(value)}" for party, value in self.results.items())

    def _repr_html_(self) -> str:
        parts = []
        for party, value in self.results.items():
            style = ' style="color: var(--jp-error-color1, #d32f2f)"' if isinstance(value, PartyError) else ""
            parts.append(f'<div class="fednb-party-output" data-party="{html.escape(party)}">'
                         f"<strong>{html.escape(party)}</strong><pre{style}>{html.escape(self._text(value))}</pre></div>")
        return "".join(parts)
