"""Party sampling: k of the online parties per round, drawn from the seed and the round, shown in the run's state."""

from __future__ import annotations

import pytest

import fednb
from fednb.federation.events import RoundStarted
from fednb.federation.runstate import RunState
from fednb.federation.training import sample, sampled_count
from tests.conftest import MLP, build


def test_the_draw_depends_on_seed_and_round_only() -> None:
    online = [f"p{i}" for i in range(10)]
    draws = [sample(online, 3, seed=1, round_=r) for r in range(1, 6)]
    assert all(len(d) == 3 and d == sorted(d) for d in draws)
    assert draws == [sample(online, 3, seed=1, round_=r) for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1 and sample(online[:2], 3, seed=1, round_=1) == online[:2]
    assert sampled_count(10, None, 0.25) == 2 and sampled_count(10, 4, None) == 4 and sampled_count(10, None, None) is None
    for bad in ((0, None), (11, None), (None, 0.0), (None, 1.5), (2, 0.5)):
        with pytest.raises(ValueError):
            sampled_count(10, *bad)


def test_a_sampled_run_trains_k_parties_a_round_and_shows_the_others_not_sampled() -> None:
    with fednb.simulate(5, dataset="digits", partition="iid", seed=0) as fed:
        events: list = []
        fed.subscribe(events.append)
        history = fed.train(build(seed=1), MLP, rounds=3, parties_per_round=2, seed=4, evaluate_every=0)
        with pytest.raises(ValueError, match="the parties sampled per round"):
            fed.train(build(seed=1), MLP, rounds=1, parties_per_round=2, min_parties=3)
        with pytest.raises(ValueError, match="not both"):
            fed.train(build(seed=1), MLP, rounds=1, parties_per_round=2, fraction=0.5)
    started = [e for e in events if isinstance(e, RoundStarted)]
    assert [len(e.parties) for e in started] == [2, 2, 2] and all(len(e.sampled_from) == 5 for e in started)
    assert [sorted(r.parties) for r in history] == [list(e.parties) for e in started]
    assert [list(e.parties) for e in started] == [sample(list(e.sampled_from), 2, seed=4, round_=e.round)
                                                  for e in started]
    state = RunState()
    for event in events[:events.index(started[-1]) + 1]:
        state = state.apply(event)
    assert sorted(p.name for p in state.parties if p.status == "not sampled") == sorted(
        set(started[-1].sampled_from) - set(started[-1].parties))
