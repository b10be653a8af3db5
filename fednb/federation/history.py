"""What training leaves behind: per round, per party metrics, examples and times."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class PartyRound:
    """One party's part in one round."""

    examples: int
    metrics: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class RoundRecord:
    """One completed round: who contributed, who dropped, and the aggregated metrics.

    ``metrics`` are the example-weighted train metrics the parties reported; ``evaluation``
    the example-weighted metrics of the new global model on the parties' test splits.
    ``stages`` holds each stage's seconds; ``privacy`` the DP asked of the parties (mechanism,
    noise multiplier, clip); ``secure``, for a round under secure aggregation,
    what the coordinator saw ("sum of N parties", the examples behind it, the quantization
    error bound of each coordinate, and the stage each dropped party missed).
    """

    round: int
    parties: dict[str, PartyRound]
    dropped: dict[str, str]
    metrics: dict[str, float]
    evaluation: dict[str, float] | None
    party_evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    secure: dict[str, Any] = field(default_factory=dict)
    #: Under differential privacy: the round's mechanism, noise multiplier and clip, as the parties were asked.
    privacy: dict[str, Any] = field(default_factory=dict)


class History:
    """The rounds trained so far, oldest first; grows across calls to ``train``."""

    def __init__(self) -> None:
        self.rounds: list[RoundRecord] = []

    def append(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def set_evaluation(self, round: int, evaluation: dict[str, float], party_evaluation: dict[str, dict[str, float]]) -> None:
        """Fill in a round's evaluation, which arrives with the next round's replies (or after the last)."""
        for index in range(len(self.rounds) - 1, -1, -1):
            if self.rounds[index].round == round:
                self.rounds[index] = replace(self.rounds[index], evaluation=evaluation, party_evaluation=party_evaluation)
                return
        raise KeyError(f"no round {round} in the history")

    def __len__(self) -> int:
        return len(self.rounds)

    def __iter__(self) -> Iterator[RoundRecord]:
        return iter(self.rounds)

    def __getitem__(self, index: int) -> RoundRecord:
        return self.rounds[index]

    def __repr__(self) -> str:
        if not self.rounds:
            return "History(no rounds)"
        last = self.rounds[-1]
        summary = ", ".join(f"{k}={v:.4g}" for k, v in (last.evaluation or last.metrics).items())
        return f"History({len(self.rounds)} rounds; last: {summary})"

    @property
    def last_round(self) -> int:
        return self.rounds[-1].round if self.rounds else 0

    def metric(self, name: str, *, evaluation: bool = True) -> list[float]:
        """One global metric per round (NaN where a round lacks it)."""
        values = []
        for record in self.rounds:
            source = record.evaluation if evaluation else record.metrics
            values.append((source or {}).get(name, float("nan")))
        return values

    def records(self) -> list[dict[str, Any]]:
        """One flat row per (round, party) plus one per round for the global values."""
        rows: list[dict[str, Any]] = []
        for record in self.rounds:
            global_row: dict[str, Any] = {"round": record.round, "party": "(global)", "seconds": record.seconds,
                                          "examples": sum(p.examples for p in record.parties.values())}
            global_row.update({f"train_{k}": v for k, v in record.metrics.items()})
            global_row.update({f"eval_{k}": v for k, v in (record.evaluation or {}).items()})
            rows.append(global_row)
            for name, part in record.parties.items():
                row: dict[str, Any] = {"round": record.round, "party": name, "seconds": part.seconds,
                                       "examples": part.examples}
                row.update({f"train_{k}": v for k, v in part.metrics.items()})
                row.update({f"eval_{k}": v for k, v in record.party_evaluation.get(name, {}).items()})
                rows.append(row)
            for name, reason in record.dropped.items():
                rows.append({"round": record.round, "party": name, "dropped": reason})
        return rows

    def to_frame(self) -> Any:
        """The history as a pandas DataFrame (pandas is imported only here)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records())
