"""Robust aggregation against closed-form values and attacks; the new strategies through real parties."""

from __future__ import annotations

import numpy as np
import pytest

import fednb
from fednb.strategies import Bulyan, FedAvg, Krum, Median, MultiKrum, TrimmedMean, get_strategy
from fednb.strategies.robust_aggregate import (bulyan, closest_to_median_mean, coordinate_median, krum_scores,
                                               multi_krum, squared_distances, trimmed_mean)
from tests.conftest import MLP, build


def _updates(*rows: list[float], key: str = "w") -> list[dict[str, np.ndarray]]:
    out = []
    for row in rows:
        a = np.array(row, dtype=np.float64)
        a.flags.writeable = False
        out.append({key: a})
    return out


# ------------------------------------------------------------------------- closed forms


def test_coordinate_median_and_trimmed_mean_closed_form() -> None:
    three = _updates([1, 10, 3], [2, -5, 3], [100, 0, 3])
    np.testing.assert_array_equal(coordinate_median(three)["w"], [2, 0, 3])
    four = [*three, *_updates([4, 4, 4])]
    # sorted per coordinate: [1, 2, 4, 100], [-5, 0, 4, 10], [3, 3, 3, 4]
    np.testing.assert_array_equal(coordinate_median(four)["w"], [3, 2, 3])
    np.testing.assert_array_equal(trimmed_mean(four, 0.25)["w"], [3, 2, 3])  # ⌊0.25·4⌋ = 1 cut at each end
    np.testing.assert_array_equal(trimmed_mean(four, 0.2)["w"], [107 / 4, 9 / 4, 13 / 4])  # ⌊0.8⌋ = 0: the mean
    five = [*four, *_updates([-50, 1, 3])]
    # ⌊0.4·5⌋ = 2 cut at each end: the median
    np.testing.assert_array_equal(trimmed_mean(five, 0.4)["w"], coordinate_median(five)["w"])
    assert trimmed_mean(five, 0.2)["w"][0] == pytest.approx((1 + 2 + 4) / 3)


def test_rules_keep_dtypes_and_round_integer_tensors() -> None:
    updates = [{"w": np.array([1.0, 2.0], np.float32), "n": np.array(n, np.int64), "s": np.float32(n / 10),
                "empty": np.zeros((0, 3))} for n in (10, 11, 14, 15)]
    for rule in (coordinate_median, lambda u: trimmed_mean(u, 0.25), lambda u: bulyan(u, 0)[0],
                 lambda u: multi_krum(u + [u[0]], 1)[0]):
        out = rule(updates)
        assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and out["s"].shape == ()
        assert out["empty"].shape == (0, 3)
    assert int(coordinate_median(updates)["n"]) == 12  # 12.5, half to even
    assert int(trimmed_mean(updates, 0.25)["n"]) == 12


def test_krum_and_multi_krum_closed_form() -> None:
    # two tensors: an update's distance sums over both. n = 5, f = 1: each score sums the 2 closest.
    points = [(0, 0), (1, 3), (2, 0), (3, 0), (100, 0)]
    updates = [{"a": np.array([a], float), "b": np.array([b], float)} for a, b in points]
    distances = squared_distances(updates)
    assert distances[0, 1] == distances[1, 0] == 10 and distances[1, 3] == 13 and distances[0, 4] == 10_000
    # 0: 4 + 9; 1: 10 + 10; 2: 1 + 4; 3: 1 + 9; 4: 97² + 98²
    np.testing.assert_array_equal(krum_scores(distances, 2), [13, 20, 5, 10, 97**2 + 98**2])
    krum, chosen = multi_krum(updates, byzantine=1, select=1)
    assert chosen == [2] and (krum["a"][0], krum["b"][0]) == (2, 0)
    three, chosen = multi_krum(updates, byzantine=1, select=3)
    assert chosen == [2, 3, 0] and three["a"][0] == pytest.approx(5 / 3) and three["b"][0] == 0
    default, chosen = multi_krum(updates, byzantine=1)  # m = n − f = 4
    assert chosen == [2, 3, 0, 1] and default["a"][0] == 1.5 and default["b"][0] == 0.75
    agg = Krum(byzantine=1).start_round(1, {"a": np.zeros(1), "b": np.zeros(1)})
    for u, examples in zip(updates, (1, 1, 1, 1, 10**6)):  # unweighted: the outlier's claim does not count
        agg.add(u, examples)
    assert float(agg.result()["a"][0]) == 2.0


def test_bulyan_closed_form() -> None:
    # n = 7, f = 1: θ = 5 picks by Krum over what is left, then β = 3 closest to each median.
    # pick 1 (4 neighbours): scores 30, 15, 10, 10, 15, 30, … -> 2 (the earlier of 2 and 3)
    # pick 2 (3 neighbours) from 0, 1, 3, 4, 5, 100: 26, 14, 9, 11, 21, … -> 3
    # pick 3 (2) from 0, 1, 4, 5, 100: 17, 10, 10, 17, … -> 1;  pick 4 (1) from 0, 4, 5, 100: 16, 1, 1 -> 4
    # pick 5 (1, the floor) from 0, 5, 100: 25, 25, … -> 0.   Selected 2, 3, 1, 4, 0: median 2, closest 2, 3, 1
    updates = _updates(*([v] for v in (0, 1, 2, 3, 4, 5, 100)))
    out, chosen = bulyan(updates, byzantine=1)
    assert chosen == [2, 3, 1, 4, 0] and out["w"][0] == 2.0
    # the coordinate-wise step: per column, the mean of the β values closest to the median
    selected = np.array([[0.0, 5.0], [1.0, -1.0], [2.0, 0.0], [3.0, 0.0], [10.0, 100.0]])
    np.testing.assert_allclose(closest_to_median_mean(selected, 3), [2.0, -1 / 3], rtol=0, atol=1e-15)
    zero, _ = bulyan(updates, byzantine=0)  # f = 0: θ = β = n, the plain mean
    assert zero["w"][0] == pytest.approx(115 / 7)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda u: multi_krum(u[:4], byzantine=1, select=1), r"Krum needs n > 2f \+ 2 updates: this round has n = 4"),
        (lambda u: multi_krum(u, byzantine=2), r"Multi-Krum needs n > 2f \+ 2 .*at least 7\)"),
        (lambda u: multi_krum(u, byzantine=1, select=6), r"select= .* \[1, n = 5\]"),
        (lambda u: bulyan(u, byzantine=1), r"Bulyan needs n ≥ 4f \+ 3 updates: this round has n = 5 for f = 1"),
        (lambda u: multi_krum(u, byzantine=-1), "byzantine="),
        (lambda u: trimmed_mean(u, 0.5), "trim="),
        (lambda u: coordinate_median([]), "no updates"),
    ],
)
def test_too_few_updates_and_bad_options_are_clear_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_updates(*([v] for v in range(5))))


def test_robust_strategies_by_name_and_their_checks() -> None:
    assert isinstance(get_strategy("median"), Median)
    assert get_strategy("trimmed_mean", trim=0.1).trim == 0.1
    assert get_strategy("krum", byzantine=2).min_updates == 7
    multi = get_strategy("multi-krum", byzantine=1, select=None)
    assert isinstance(multi, MultiKrum) and multi.select is None and multi.min_updates == 5
    assert get_strategy("bulyan", byzantine=2).min_updates == 11
    assert all(getattr(cls, "individual_updates", False) for cls in (Median, TrimmedMean, Krum, MultiKrum, Bulyan))
    assert not getattr(FedAvg, "individual_updates", False)
    for name, options, match in [("krum", {"select": 2}, "does not take select"), ("median", {"trim": 0.1}, "trim"),
                                 ("bulyan", {"byzantine": 1.5}, "byzantine="), ("multi-krum", {"select": 0}, "select="),
                                 ("trimmed-mean", {"trim": -0.1}, "trim=")]:
        with pytest.raises(ValueError, match=match):
            get_strategy(name, **options)
    agg = Bulyan(byzantine=1).start_round(1, {"w": np.zeros(1)})
    for v in range(6):
        agg.add({"w": np.array([float(v)])}, 1)
    with pytest.raises(ValueError, match="at least 7"):
        agg.result()
    with pytest.raises(ValueError, match="examples"):
        agg.add({"w": np.zeros(1)}, 0)
    with pytest.raises(ValueError, match="shape"):
        agg.add({"w": np.zeros(2)}, 1)


def test_collected_updates_are_copies() -> None:
    buffer = np.array([1.0, 2.0])
    agg = Median().start_round(1, {"w": np.zeros(2)})
    agg.add({"w": buffer}, 1)
    buffer[:] = 100  # the caller reuses its buffer
    agg.add({"w": np.array([3.0, 4.0])}, 1)
    np.testing.assert_array_equal(agg.result()["w"], [2.0, 3.0])


# ------------------------------------------------------------------------------ attacks

ROBUST = [("median", {}), ("trimmed-mean", {"trim": 0.2}), ("krum", {"byzantine": 2}),
          ("multi-krum", {"byzantine": 2}), ("bulyan", {"byzantine": 2})]


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize(("name", "options"), ROBUST)
def test_robust_rules_resist_two_attackers_where_fedavg_fails(name, options, attack) -> None:
    """8 honest parties (9 for Bulyan, which needs n ≥ 4f + 3 = 11 for f = 2) and 2 attackers sending
    their update scaled by 100 or with its sign flipped: the robust rule stays near the honest mean,
    FedAvg does not."""
    rng = np.random.default_rng(7)
    size = 200
    current = {"w": rng.normal(size=size), "b": rng.normal(size=(2, 3))}
    direction = {k: rng.normal(size=v.shape) for k, v in current.items()}  # the honest update's mean
    honest_n = 9 if name == "bulyan" else 8

    def update(scale: float) -> dict[str, np.ndarray]:
        return {k: current[k] + scale * (direction[k] + 0.1 * rng.normal(size=v.shape)) for k, v in current.items()}

    honest = [update(1.0) for _ in range(honest_n)]
    attackers = [update(100.0 if attack == "scaled" else -1.0) for _ in range(2)]
    updates = attackers + honest  # the attackers reply first

    def distance(out: dict[str, np.ndarray]) -> float:
        mean = {k: np.mean([u[k] for u in honest], axis=0) for k in current}
        return float(np.sqrt(sum(np.sum((out[k] - mean[k]) ** 2) for k in current)))

    norm = float(np.sqrt(sum(np.sum(d**2) for d in direction.values())))  # the honest update's size

    def aggregate(strategy) -> dict[str, np.ndarray]:
        agg = strategy.start_round(1, current)
        for u in updates:
            agg.add(u, 100)
        return agg.result()

    robust, plain = distance(aggregate(get_strategy(name, **options))), distance(aggregate(FedAvg()))
    assert robust < 0.2 * norm, (robust, norm)
    assert plain > (10 * norm if attack == "scaled" else 0.35 * norm), (plain, norm)
    assert plain > 1.5 * robust


def test_bulyan_refuses_ten_parties_for_two_attackers() -> None:
    agg = Bulyan(byzantine=2).start_round(1, {"w": np.zeros(1)})
    for v in range(10):
        agg.add({"w": np.array([float(v)])}, 1)
    with pytest.raises(ValueError, match=r"n ≥ 4f \+ 3 .* n = 10 for f = 2 \(at least 11\)"):
        agg.result()


# ------------------------------------------------------------------------ the magic's options


def test_fed_train_strategy_options_reach_the_strategy() -> None:
    from IPython.core.error import UsageError

    from fednb.notebook.arguments import STRATEGY_FLAGS, parse, strategy_options
    from fednb.notebook.magics import FedMagics

    flags = {action.option_strings[0] for action in FedMagics.fed_train.parser._actions if action.option_strings}
    assert set(STRATEGY_FLAGS.values()) <= flags
    args = parse(FedMagics.fed_train, "--strategy multi-krum --byzantine 2 --select 5  # robust")
    options = strategy_options(args)
    assert options["byzantine"] == 2 and options["select"] == 5 and options["mu"] is None
    built = get_strategy(args.strategy, **options)
    assert (built.byzantine, built.select) == (2, 5)
    args = parse(FedMagics.fed_train, "--strategy fedadam --server-lr 0.05 --beta1 0.8 --beta2 0.9 --tau 1e-2")
    adam = get_strategy(args.strategy, **strategy_options(args))
    assert (adam.optimizer.server_lr, adam.optimizer.beta1, adam.optimizer.beta2, adam.optimizer.tau) == (
        0.05, 0.8, 0.9, 0.01)
    args = parse(FedMagics.fed_train, "--strategy fedavgm --server-momentum 0.5 --momentum 0.0")
    assert get_strategy(args.strategy, **strategy_options(args)).server_momentum == 0.5
    assert args.momentum == 0.0  # the local optimizer's, untouched
    for line, match in [("--strategy fedavg --trim 0.1", r"'fedavg' does not take --trim \(it takes: no options\)"),
                        ("--strategy krum --select 3", r"does not take --select \(it takes: --byzantine\)"),
                        ("--strategy fedadam --server-lr 0", r"--server-lr must be a number in \(0, ∞\), got 0"),
                        ("--strategy trimmed-mean --trim 0.6", "--trim"),
                        ("--strategy nope", "unknown strategy 'nope'")]:
        with pytest.raises(UsageError, match=match):
            strategy_options(parse(FedMagics.fed_train, line))


# ------------------------------------------------------------------------- through real parties

# each party moves every parameter by its example count / 1000, so a round's outcome is known in closed form
SHIFT = "with torch.no_grad():\n    for p in model.parameters():\n        p.add_(len(train.dataset) / 1000)\n"


@pytest.fixture(scope="module")
def fed5():
    with fednb.simulate(5, dataset="digits", partition="dirichlet", alpha=0.5, seed=0) as fed:
        yield fed


def test_fedadam_through_real_parties_matches_algorithm_2(fed5) -> None:
    model = build(seed=1)
    before = {k: v.double().numpy().copy() for k, v in model.state_dict().items()}
    n = np.array([row.examples for row in fed5.status()], dtype=np.float64)
    shift = (n**2).sum() / (1000 * n.sum())  # Δ of every coordinate, each round
    history = fed5.train(model, MLP, rounds=2, strategy="fedadam", server_lr=0.05, tau=1e-2, train_cell=SHIFT,
                         evaluate_every=0)
    assert len(history) >= 2 and len(history[-1].parties) == 5
    m = v = None
    step_total = 0.0
    for _ in range(2):
        m = 0.1 * shift if m is None else 0.9 * m + 0.1 * shift
        v = 0.99 * 1e-4 + 0.01 * shift**2 if v is None else 0.99 * v + 0.01 * shift**2
        step_total += 0.05 * m / (np.sqrt(v) + 1e-2)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), before[key] + step_total, rtol=0, atol=1e-5)


def test_krum_through_real_parties_keeps_one_partys_update(fed5) -> None:
    model = build(seed=2)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    shifts = [row.examples / 1000 for row in fed5.status()]
    fed5.train(model, MLP, rounds=1, strategy="krum", byzantine=1, train_cell=SHIFT, evaluate_every=0)
    # every party's update is before + its shift on all coordinates: Krum picks as it would on the shifts
    _, chosen = multi_krum(_updates(*([s] for s in shifts)), byzantine=1, select=1)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), before[key] + shifts[chosen[0]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_robust_strategies_refuse_secure_aggregation(fed5, name) -> None:
    with pytest.raises(ValueError, match=f"strategy '{name}' needs every party's update, which secure aggregation "
                                         "hides"):
        fed5.train(build(), MLP, rounds=1, strategy=name, secure_aggregation=True)


def test_an_adaptive_strategy_takes_the_secure_sum(fed5) -> None:
    """FedAdam needs only the round's mean, which secure aggregation gives as one pre-summed update."""
    model = build(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = fed5.train(model, MLP, rounds=1, strategy="fedadam", secure_aggregation=True, evaluate_every=0)[-1]
    assert record.secure["parties"] == 5
    assert any(not (value == before[key]).all() for key, value in model.state_dict().items())


def test_too_few_parties_for_krum_is_a_clear_error(fed5) -> None:
    # refused before any party trains: krum with f = 2 needs n ≥ 2f + 3 = 7 updates a round
    with pytest.raises(ValueError, match="'krum' needs at least 7 updates a round, and a round here has at most 5"):
        fed5.train(build(), MLP, rounds=1, strategy="krum", byzantine=2, train_cell=SHIFT, evaluate_every=0)
    assert not fed5.training
