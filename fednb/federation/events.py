"""What a federation tells its displays: events, and the bus that delivers them.

The round loop and the connection thread publish; the dashboard, the CLI progress lines and
the JupyterLab sidebar subscribe. No display code lives in the round loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartyStatus:
    """A party's connection changed: ``status`` is connecting, online, offline or refused."""

    party: str
    status: str
    detail: str = ""


@dataclass(frozen=True)
class TrainingStarted:
    rounds: int
    strategy: str
    parties: tuple[str, ...]
    first_round: int = 1


@dataclass(frozen=True)
class RoundStarted:
    round: int
    rounds: int
    parties: tuple[str, ...]
    #: with party sampling: the online parties the round's were drawn from (the others are "not sampled")
    sampled_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartyDone:
    round: int
    party: str
    examples: int
    metrics: dict[str, float]
    seconds: float
    stage: str = "train"


@dataclass(frozen=True)
class StageStarted:
    """A stage of a round's protocol began: plain FedAvg has one ("train"); secure aggregation several."""

    round: int
    stage: str
    parties: tuple[str, ...]


@dataclass(frozen=True)
class PartyDropped:
    round: int
    party: str
    reason: str
    late: bool = False


@dataclass(frozen=True)
class RoundAggregated:
    round: int
    rounds: int
    metrics: dict[str, float]
    evaluation: dict[str, float] | None
    party_evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class RoundEvaluated:
    """The evaluation of round ``round``'s global model, which may arrive after its ``RoundAggregated``."""

    round: int
    evaluation: dict[str, float]
    party_evaluation: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyUpdated:
    """A party reported its privacy budget (on connecting, and with each train reply): ε spent,
    budget, remaining, δ and its latest charges, as :func:`fednb.federation.privacy.check_summary` checked it."""

    party: str
    privacy: dict[str, Any]


@dataclass(frozen=True)
class PrivacyWarning:
    """Before a run: its accounted cost would take ``party`` past its budget (it will refuse the round that would)."""

    party: str
    message: str
    epsilon_after: float
    epsilon_budget: float


@dataclass(frozen=True)
class VerticalProgress:
    """A vertical federation moved on: ``stage`` is "aligned", "epoch" (of ``model``), "trained", or for boosting
    "level" (level ``level`` of ``depth`` of round ``tree`` of ``trees``) and "tree" (a round's trees done)."""

    stage: str
    message: str
    model: str = ""
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    seconds: float = 0.0
    roles: dict[str, str] = field(default_factory=dict)
    #: the test split's AUC and accuracy after this epoch, as the label party scored them (binary models)
    metrics: dict[str, float] = field(default_factory=dict)
    tree: int = 0
    trees: int = 0
    level: int = 0
    depth: int = 0


@dataclass(frozen=True)
class TrainingFinished:
    rounds_done: int
    stopped: bool
    error: str | None = None


Event = Union[PartyStatus, TrainingStarted, RoundStarted, StageStarted, PartyDone, PartyDropped, RoundAggregated,
              RoundEvaluated, PrivacyUpdated, PrivacyWarning, VerticalProgress, TrainingFinished]
Subscriber = Callable[[Event], Any]


class EventBus:
    """Delivers each event to every subscriber, on the publishing thread, in order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:  # a broken display must not stop training
                log.exception("event subscriber %r failed on %s", subscriber, type(event).__name__)
