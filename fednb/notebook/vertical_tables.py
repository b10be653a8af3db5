"""The static views of a vertical federation: its alignment, a model's test metrics, its feature importance.

What ``%fed_align`` and ``%fed_veval`` show (:func:`alignment_table`, :func:`metrics_table`,
:class:`Importance` as horizontal SVG bars, :class:`TreeScores` for a boosting model), each a
:class:`~fednb.notebook.display.Table` or an HTML block with a text form beside it; the live view
of training (:mod:`fednb.notebook.vertical_view`) draws its importance table with them too.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fednb.notebook.display import Table

#: Features drawn in an importance chart, the largest gains first; the others are counted.
IMPORTANCE_SHOWN = 20
#: The metrics of ``Vertical.evaluate``, in the order the view shows them, with their names there.
METRICS = {"auc": "AUC", "accuracy": "accuracy", "ks": "KS", "logloss": "log-loss", "mse": "MSE", "r2": "R²"}
#: The same colours as vertical_view.js's, one per party in importance charts.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def _number(value: Any) -> float | None:
    """A value as the comm can carry it: a finite float, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def importance_rows(importance: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """``Vertical.importance`` as rows (party, feature, splits, gain), the largest gain first."""
    rows = [{"party": party, "feature": str(feature), "splits": int(v.get("splits", 0)),
             "gain": _number(v.get("gain")) or 0.0} for party, features in importance.items()
            for feature, v in features.items()]
    return sorted(rows, key=lambda r: (-r["gain"], r["party"], int(r["feature"]) if r["feature"].isdigit() else 0))


def metrics_table(metrics: Mapping[str, Any], *, model: str = "", test_rows: int | None = None) -> Table:
    """``Vertical.evaluate``'s metrics as one row: the model, its test rows, then each metric."""
    names = [k for k in METRICS if k in metrics] + [k for k in metrics if k not in METRICS]
    return Table(["model", "test rows", *(METRICS.get(k, k) for k in names)],
                 [[model, "" if test_rows is None else test_rows, *(_number(metrics[k]) for k in names)]])


def alignment_table(vertical: Any) -> Table:
    """Each party of an aligned vertical federation: its role, its table's rows, the rows it shares."""
    return Table(["party", "role", "table rows", "aligned rows"],
                 [[p, vertical.roles.get(p, ""), vertical.sizes.get(p, ""), vertical.size] for p in vertical.parties])


class Importance:
    """Feature importance by party (``Vertical.importance``): the gain of each feature's splits as horizontal bars,
    one colour per party, in a notebook (SVG); a table of splits and gain elsewhere."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], *, parties: Sequence[str] = ()) -> None:
        self.rows = [dict(r) for r in rows]
        named = [*parties, *sorted({r["party"] for r in self.rows} - set(parties))]
        self.colours = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(named)}

    @classmethod
    def of(cls, importance: Mapping[str, Mapping[str, Mapping[str, Any]]], *, parties: Sequence[str] = ()) -> Importance:
        return cls(importance_rows(importance), parties=parties)

    def table(self) -> Table:
        return Table(["party", "feature", "splits", "gain"],
                     [[r["party"], r["feature"], r["splits"], r["gain"]] for r in self.rows],
                     title="feature importance: total gain of each feature's splits (features by column index)")

    def svg(self) -> str:
        """The chart: a bar per feature (the largest gains first), labelled party:feature, each party's colour."""
        shown, row, label, width = self.rows[:IMPORTANCE_SHOWN], 16, 120, 600
        bar, top = width - label - 110, 34
        high = max([r["gain"] for r in shown] or [1.0]) or 1.0
        height = top + row * len(shown) + (18 if len(self.rows) > len(shown) else 6)
        esc = html.escape
        parts = [f'<svg class="fednb-importance" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="11" '
                 'fill="currentColor"><text x="0" y="12" font-weight="600">feature importance: gain of each '
                 "feature's splits</text>"]
        for i, (party, colour) in enumerate(self.colours.items()):
            parts.append(f'<rect x="{i * 110}" y="19" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{i * 110 + 14}" y="28">{esc(party)}</text>')
        for i, r in enumerate(shown):
            y, size = top + i * row, max(bar * r["gain"] / high, 1.0)
            parts.append(f'<text x="{label - 6}" y="{y + 11}" text-anchor="end">{esc(r["party"])}:{esc(r["feature"])}'
                         f'</text><rect x="{label}" y="{y + 2}" width="{size:.1f}" height="{row - 4}" '
                         f'fill="{self.colours[r["party"]]}"><title>{esc(r["party"])}:{esc(r["feature"])}: gain '
                         f'{r["gain"]:.4g}, {r["splits"]} splits</title></rect><text x="{label + size + 4:.1f}" '
                         f'y="{y + 11}">{r["gain"]:.4g} ({r["splits"]} split{"s" if r["splits"] != 1 else ""})</text>')
        if len(self.rows) > len(shown):
            parts.append(f'<text x="{label}" y="{height - 4}">… and {len(self.rows) - len(shown)} more features</text>')
        return "".join(parts) + "</svg>"

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return f'<div class="fednb-importance-chart">{self.svg()}</div>'


class TreeScores:
    """What ``%fed_veval`` shows of a boosting model: its metrics, then its feature importance."""

    def __init__(self, metrics: Table, importance: Importance) -> None:
        self.metrics, self.importance = metrics, importance

    def __repr__(self) -> str:
        return f"{self.metrics!r}\n\n{self.importance!r}"

    def _repr_html_(self) -> str:
        return self.metrics._repr_html_() + self.importance._repr_html_()
