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


def population_table(federation: Any) -> Table:
    """A pool simulation's parties by shared endpoint: how many, how many online, their training examples."""
    groups: dict[str, list[Any]] = {}
    for row in federation.status():
        groups.setdefault(row.endpoint, []).append(row)
    rows = []
    for endpoint, members in groups.items():
        examples = sorted(int(r.examples or 0) for r in members)
        rows.append([endpoint, len(members), sum(r.status == "online" for r in members), sum(examples),
                     examples[len(examples) // 2] if examples else 0])
    return Table(["endpoint", "parties", "online", "examples", "median examples"], rows)


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


# -- privacy budgets (%fed_privacy) ---------------------------------------------------------------

#: Tableau 10, as the dashboard colours parties.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
NO_BUDGET = "no budget"
TEXT_CHARGES = 12  # ε values per party in the text chart; older ones are counted, not listed


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _epsilons(history: Sequence[Mapping[str, Any]]) -> list[float]:
    """ε after each charge, oldest first (entries without a finite ε are left out)."""
    values = [_finite(entry.get("epsilon_after")) for entry in history if isinstance(entry, Mapping)]
    return [v for v in values if v is not None]


class PrivacyView:
    """A :class:`~fednb.federation.privacy.PrivacyReport` as ``%fed_privacy`` shows it: a table of
    ε spent, budget, remaining, δ and charges per party, and ε after each charge as an SVG chart
    (text in a terminal)."""

    WIDTH, HEIGHT = 560, 220
    LEFT, RIGHT, TOP, BOTTOM = 48, 120, 14, 30

    def __init__(self, report: Mapping[str, Any]) -> None:
        #: per party: name, ε spent, budget, remaining, δ, ε after each charge, number of charges
        self.parties: list[tuple[str, float | None, float | None, float | None, float | None, list[float], int]] = []
        for name, entry in report.items():
            history = tuple(getattr(entry, "history", ()) or ())
            self.parties.append((str(name), _finite(getattr(entry, "epsilon_spent", None)),
                                 _finite(getattr(entry, "epsilon_budget", None)),
                                 _finite(getattr(entry, "epsilon_remaining", None)),
                                 _finite(getattr(entry, "delta", None)), _epsilons(history), len(history)))

    def table(self) -> Table:
        rows = []
        for name, spent, budget, remaining, delta, _, charges in self.parties:
            if budget is None:
                rows.append([name, spent if charges else "", NO_BUDGET, "", delta, charges])
            else:
                rows.append([name, spent, budget, remaining, delta, charges])
        return Table(["party", "ε spent", "budget", "remaining", "δ", "charges"], rows)

    def _charted(self) -> list[tuple[int, str, float | None, list[float]]]:
        return [(i, name, budget, values) for i, (name, _, budget, _, _, values, _) in enumerate(self.parties) if values]

    def __repr__(self) -> str:
        lines = [repr(self.table())]
        charted = self._charted()
        if charted:
            lines += ["", "ε after each charge:"]
        for _, name, budget, values in charted:
            shown = values[-TEXT_CHARGES:]
            older = f"({len(values) - len(shown)} earlier) " if len(shown) < len(values) else ""
            limit = f" (budget {budget:.4g})" if budget is not None else ""
            lines.append(f"  {name}: {older}{', '.join(f'{v:.4g}' for v in shown)}{limit}")
        if not self.parties:
            lines.append("no parties")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        chart = self.chart_svg()
        note = "" if chart else '<p class="fednb-privacy-empty">no privacy charges yet</p>'
        return f'<div class="fednb-privacy">{self.table()._repr_html_()}{chart or note}</div>'

    def chart_svg(self) -> str:
        """ε after each charge per party, with each party's budget as a dashed line ('' without charges)."""
        charted = self._charted()
        if not charted:
            return ""
        width, height = self.WIDTH, self.HEIGHT
        left, right, top, bottom = self.LEFT, width - self.RIGHT, self.TOP, height - self.BOTTOM
        most = max(len(values) for _, _, _, values in charted)
        high = max([v for _, _, _, values in charted for v in values]
                   + [b for _, _, b, _ in charted if b is not None]) * 1.05 or 1.0

        def x(charge: int) -> float:
            return left + (charge - 1) / (most - 1) * (right - left) if most > 1 else (left + right) / 2

        def y(value: float) -> float:
            return bottom - value / high * (bottom - top)

        parts = [f'<svg class="fednb-privacy-chart" viewBox="0 0 {width} {height}" '
                 f'width="{width}" height="{height}" role="img" aria-label="ε after each charge, per party" '
                 'style="font: 11px sans-serif">',
                 f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#999"/>',
                 f'<text x="{left - 6}" y="{bottom + 4}" text-anchor="end">0</text>',
                 f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{high:.3g}</text>',
                 f'<text x="{left - 34}" y="{(top + bottom) / 2:.1f}">ε</text>',
                 f'<text x="{right}" y="{bottom + 24}" text-anchor="end">charge</text>',
                 f'<text x="{left}" y="{bottom + 14}" text-anchor="middle">1</text>']
        if most > 1:
            parts.append(f'<text x="{right}" y="{bottom + 14}" text-anchor="middle">{most}</text>')
        for row, (index, name, budget, values) in enumerate(charted):
            color, who = PALETTE[index % len(PALETTE)], html.escape(name, quote=True)
            if budget is not None:
                parts.append(f'<line class="fednb-privacy-budget" data-party="{who}" x1="{left}" x2="{right}" '
                             f'y1="{y(budget):.1f}" y2="{y(budget):.1f}" stroke="{color}" stroke-dasharray="4 3">'
                             f'<title>{who}: budget ε {budget:.4g}</title></line>')
            points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values, 1))
            parts.append(f'<polyline class="fednb-privacy-line" data-party="{who}" points="{points}" fill="none" '
                         f'stroke="{color}" stroke-width="1.5"/>')
            for i, value in enumerate(values, 1):
                parts.append(f'<circle class="fednb-privacy-point" data-party="{who}" data-charge="{i}" '
                             f'data-epsilon="{value:.6g}" cx="{x(i):.1f}" cy="{y(value):.1f}" r="2.5" fill="{color}">'
                             f'<title>{who}, charge {i}: ε {value:.4g}</title></circle>')
            parts.append(f'<text x="{right + 8}" y="{top + 12 + 14 * row}" fill="{color}">{who}</text>')
        parts.append("</svg>")
        return "".join(parts)
