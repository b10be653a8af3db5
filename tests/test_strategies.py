"""Strategies and aggregation arithmetic, checked against closed-form values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednb.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    RunningMean,
    Strategy,
    get_strategy,
    weighted_mean,
    weighted_metrics,
)


def _readonly(**arrays: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        a = np.array(a)
        a.flags.writeable = False
        out[name] = a
    return out


# ------------------------------------------------------------------------- weighted mean


def test_fedavg_closed_form() -> None:
    agg = FedAvg().start_round(1, {"w": np.zeros(2)})
    agg.add({"w": np.array([1.0, 2.0])}, 1)
    agg.add({"w": np.array([3.0, 4.0])}, 3)
    np.testing.assert_allclose(agg.result()["w"], [2.5, 3.5])
    np.testing.assert_allclose(weighted_mean([{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 4.0])}], [1, 3])["w"], [2.5, 3.5])


_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    shapes=st.lists(_shapes | st.sampled_from([(5000,), (70, 80)]), min_size=1, max_size=4),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    parties=st.integers(1, 6),
)
def test_fedavg_equals_weighted_mean(data, shapes, dtype, parties) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    examples = data.draw(st.lists(st.integers(1, 10_000), min_size=parties, max_size=parties))
    updates = []
    for _ in range(parties):
        u = {f"t{i}": np.asarray(rng.standard_normal(shape), dtype=dtype) for i, shape in enumerate(shapes)}
        for a in u.values():
            a.flags.writeable = False
        updates.append(u)
    copies = [{k: v.copy() for k, v in u.items()} for u in updates]
    agg = FedAvg().start_round(0, updates[0])
    for u, n in zip(updates, examples):
        agg.add(u, n)
    got, ref = agg.result(), weighted_mean(updates, examples)
    assert list(got) == list(ref) == [f"t{i}" for i in range(len(shapes))]
    tol = 2e-2 if dtype == np.float16 else 1e-5
    for key in ref:
        assert got[key].dtype == ref[key].dtype == dtype and got[key].shape == ref[key].shape
        np.testing.assert_allclose(got[key], ref[key], rtol=tol, atol=tol)
        assert got[key].flags.writeable
    for u, c in zip(updates, copies):  # inputs untouched
        for k in u:
            np.testing.assert_array_equal(u[k], c[k])


def test_non_contiguous_and_zero_dim_arrays() -> None:
    big = np.arange(20000, dtype=np.float32).reshape(100, 200)
    a, b = big.T, (big * 3).T  # non-contiguous views
    mean = RunningMean()
    mean.add({"w": a, "s": np.float32(2.0)}, 1)
    mean.add({"w": b, "s": np.float32(4.0)}, 1)
    out = mean.result()
    np.testing.assert_allclose(out["w"], 2 * big.T)
    assert out["s"].shape == () and float(out["s"]) == 3.0


def test_integer_tensors_round_to_nearest() -> None:
    mean = RunningMean()
    mean.add({"num_batches_tracked": np.array(10, dtype=np.int64)}, 1)
    mean.add({"num_batches_tracked": np.array(13, dtype=np.int64)}, 2)
    out = mean.result()["num_batches_tracked"]
    assert out.dtype == np.int64 and int(out) == 12  # (10 + 26) / 3 = 12
    ref = weighted_mean([{"n": np.array([1, 2], np.int32)}, {"n": np.array([2, 4], np.int32)}], [1, 3])["n"]
    assert ref.dtype == np.int32 and ref.tolist() == [2, 4]  # 1.75 -> 2, 3.5 -> 4 (half to even)


def test_result_is_repeatable_and_running() -> None:
    mean = RunningMean()
    mean.add({"w": np.ones(3, np.float32)}, 1)
    first = mean.result()
    first["w"][:] = 100  # the caller owns the result
    np.testing.assert_array_equal(mean.result()["w"], np.ones(3))
    mean.add({"w": np.full(3, 4, np.float32)}, 2)
    np.testing.assert_array_equal(mean.result()["w"], np.full(3, 3))
    assert mean.count == 2 and mean.total_weight == 3


def test_a_lone_update_is_its_own_mean_exactly_and_the_result_is_a_copy() -> None:
    """A mean of one update (a secure round's pre-summed mean) is that update bit for bit, in every dtype,
    and a second update makes it a running mean again."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5)) * 1e-7 + 1  # float64: w·x / w need not round-trip, the mean of one is x
    update = _readonly(w=x, h=x[:, 1].astype(np.float16), n=np.array([7], np.int64))
    mean = RunningMean()
    mean.add(update, 3)
    out = mean.result()
    for name, value in update.items():
        assert out[name].dtype == value.dtype and out[name].flags.writeable and not np.shares_memory(out[name], value)
        np.testing.assert_array_equal(out[name], value)
    second = {"w": np.zeros((4, 5)), "h": np.zeros(4, np.float16), "n": np.array([1], np.int64)}
    mean.add(second, 1)
    np.testing.assert_allclose(mean.result()["w"], x * 0.75, rtol=1e-15)
    assert mean.result()["n"].tolist() == [6]  # (3·7 + 1·1) / 4 = 5.5, rounded half to even


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"w": np.zeros(2, np.float32)}, "missing tensor 'b'"),
        ({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32), "x": np.zeros(1)}, "unexpected tensor 'x'"),
        ({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, r"'w' has shape \(3,\), expected \(2,\)"),
        ({"w": np.zeros(2, np.float64), "b": np.zeros(1, np.float32)}, "'w' has dtype float64, expected float32"),
        ([np.zeros(2)], "mapping"),
    ],
)
def test_mismatched_updates_are_rejected(update, match: str) -> None:
    template = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    for make in (lambda: RunningMean(template), lambda: FedAvg().start_round(0, template)):
        agg = make()
        agg.add({"w": np.ones(2, np.float32), "b": np.ones(1, np.float32)}, 1)
        with pytest.raises(ValueError, match=match):
            agg.add(update, 1)
        # the bad update left nothing behind
        np.testing.assert_array_equal(agg.result()["w"], [1, 1])
    with pytest.raises(ValueError, match=match):
        weighted_mean([template, update], [1, 1])


def test_first_update_sets_the_shape_without_template() -> None:
    mean = RunningMean()
    mean.add({"w": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shape"):
        mean.add({"w": np.zeros(3)}, 1)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), "x"])
def test_bad_weights_are_rejected(weight) -> None:
    with pytest.raises(ValueError, match="weight"):
        RunningMean().add({"w": np.zeros(1)}, weight)
    with pytest.raises(ValueError, match="weight"):
        weighted_mean([{"w": np.zeros(1)}], [weight])


@pytest.mark.parametrize("examples", [0, -3, 1.5, True, None])
def test_bad_example_counts_are_rejected(examples) -> None:
    agg = FedAvg().start_round(0, {"w": np.zeros(1)})
    with pytest.raises(ValueError, match="examples"):
        agg.add({"w": np.zeros(1)}, examples)


def test_empty_aggregations_raise() -> None:
    with pytest.raises(ValueError, match="no updates"):
        RunningMean().result()
    with pytest.raises(ValueError):
        FedAvg().start_round(0, {"w": np.zeros(1)}).result()
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="2 weights"):
        weighted_mean([{"w": np.zeros(1)}], [1, 2])
    with pytest.raises(ValueError, match="complex"):
        RunningMean({"w": np.zeros(1, np.complex64)})


# ------------------------------------------------------------------------------ metrics


def test_weighted_metrics_closed_form() -> None:
    results = [
        (10, {"loss": 1.0, "acc": 0.5}),
        (30, {"loss": 3.0}),
        (20, {"loss": float("nan"), "acc": 0.8}),
        (0, {"loss": 100.0, "f1": 1.0}),
    ]
    assert weighted_metrics(results) == pytest.approx({"loss": 2.5, "acc": (5 + 16) / 30})
    assert weighted_metrics([]) == {}
    with pytest.raises(ValueError, match="example count"):
        weighted_metrics([(-1, {"loss": 1.0})])
    with pytest.raises(ValueError, match="metric 'loss'"):
        weighted_metrics([(1, {"loss": "high"})])
    assert FedAvg().aggregate_metrics(1, results) == weighted_metrics(results)


# --------------------------------------------------------------------------- strategies


def test_fedprox_adds_mu_without_mutating() -> None:
    config = {"lr": 0.1, "epochs": 1}
    out = FedProx(mu=0.5).configure_train(3, config)
    assert out == {"lr": 0.1, "epochs": 1, "mu": 0.5}
    assert config == {"lr": 0.1, "epochs": 1} and out is not config
    base = FedAvg().configure_train(1, config)
    assert base == config and base is not config
    agg = FedProx().start_round(1, {"w": np.zeros(2)})
    agg.add({"w": np.array([1.0, 2.0])}, 1)
    agg.add({"w": np.array([3.0, 4.0])}, 3)
    np.testing.assert_allclose(agg.result()["w"], [2.5, 3.5])


def test_fedavgm_closed_form_over_two_rounds() -> None:
    strategy = FedAvgM(server_lr=0.5, server_momentum=0.9)
    w0 = _readonly(w=np.array([1.0, 1.0], np.float32), n=np.array(4, np.int64))
    agg = strategy.start_round(1, w0)
    agg.add(_readonly(w=np.array([0.0, 2.0], np.float32), n=np.array(5, np.int64)), 1)
    agg.add(_readonly(w=np.array([0.0, 0.0], np.float32), n=np.array(7, np.int64)), 1)
    # mean [0, 1]; d1 = [1, 0]; v1 = d1; w1 = w0 - 0.5 v1 = [0.5, 1]
    w1 = agg.result()
    np.testing.assert_allclose(w1["w"], [0.5, 1.0])
    assert w1["w"].dtype == np.float32 and int(w1["n"]) == 6  # integers: plain mean
    np.testing.assert_array_equal(agg.result()["w"], w1["w"])  # result twice: one momentum step
    agg = strategy.start_round(2, w1)
    agg.add({"w": np.array([0.25, 2.0], np.float32), "n": np.array(6, np.int64)}, 2)
    # d2 = [0.25, -1]; v2 = 0.9 [1, 0] + d2 = [1.15, -1]; w2 = w1 - 0.5 v2 = [-0.075, 1.5]
    np.testing.assert_allclose(agg.result()["w"], [-0.075, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(w0["w"], [1.0, 1.0])


def test_fedavgm_without_momentum_is_fedavg_and_resets_on_new_model() -> None:
    strategy = FedAvgM(server_lr=1.0, server_momentum=0.0)
    agg = strategy.start_round(1, {"w": np.zeros(2)})
    agg.add({"w": np.array([1.0, 2.0])}, 1)
    agg.add({"w": np.array([3.0, 4.0])}, 3)
    np.testing.assert_allclose(agg.result()["w"], [2.5, 3.5])
    strategy = FedAvgM(server_lr=1.0, server_momentum=0.5)
    for shape in ((2,), (3,)):  # a new model shape starts again from zero velocity
        agg = strategy.start_round(1, {"w": np.zeros(shape)})
        agg.add({"w": np.ones(shape)}, 1)
        np.testing.assert_allclose(agg.result()["w"], np.ones(shape))


def test_fedavgm_current_is_copied() -> None:
    current = {"w": np.zeros(2)}
    agg = FedAvgM(server_momentum=0.0).start_round(1, current)
    current["w"][:] = 5  # the caller reuses its buffer
    agg.add({"w": np.ones(2)}, 1)
    np.testing.assert_allclose(agg.result()["w"], [1, 1])


def test_fedavgm_state_survives_a_checkpoint(tmp_path) -> None:
    rounds = [{"w": np.array([0.0, 2.0]), "b": np.array([1.0])}, {"w": np.array([0.5, 1.0]), "b": np.array([3.0])}]
    a, b = FedAvgM(server_lr=0.5, server_momentum=0.9), FedAvgM(server_lr=0.5, server_momentum=0.9)
    w = {"w": np.array([1.0, 1.0]), "b": np.array([0.0])}
    for mean in rounds:
        agg = a.start_round(1, w)
        agg.add(mean, 1)
        w = agg.result()
    state = a.state()
    assert set(state) == {"velocity/w", "velocity/b", "steps"} and state["steps"] == 2
    np.savez(tmp_path / "fedavgm.npz", **state)
    with np.load(tmp_path / "fedavgm.npz", allow_pickle=False) as saved:
        b.load_state(dict(saved))
    outs = []
    for strategy in (a, b):
        agg = strategy.start_round(3, w)
        agg.add({"w": np.array([2.0, 0.0]), "b": np.array([1.0])}, 1)
        outs.append(agg.result())
    np.testing.assert_array_equal(outs[0]["w"], outs[1]["w"])
    a.reset()
    assert a.state() == {"steps": 0}


# ------------------------------------------------------------------ adaptive (Reddi et al.)


def _reddi(rule: str, x0: np.ndarray, means: list[np.ndarray], eta: float, b1: float, b2: float, tau: float):
    """Algorithm 2 of Reddi et al. (ICLR 2021), written out: the weights after each round."""
    m, v, x, out = np.zeros_like(x0), np.full_like(x0, tau**2), x0, []
    for mean in means:
        d = mean - x
        m = b1 * m + (1 - b1) * d
        if rule == "adagrad":
            v = v + d**2
        elif rule == "adam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + eta * m / (np.sqrt(v) + tau)
        out.append(x)
    return out, m, v


ADAPTIVE = [("adam", FedAdam, {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
            ("yogi", FedYogi, {"server_lr": 0.1, "beta1": 0.8, "beta2": 0.9, "tau": 1e-2}),
            ("adagrad", FedAdagrad, {"server_lr": 0.5, "beta1": 0.5, "tau": 1e-3})]


@pytest.mark.parametrize(("rule", "cls", "options"), ADAPTIVE)
def test_adaptive_strategies_closed_form_over_three_rounds(rule, cls, options) -> None:
    x0 = np.array([1.0, -2.0, 0.5])
    # two parties a round, weighted by examples; for Yogi, Δ² is above v in rounds 1-2 and below it in round 3
    replies = [[(np.array([0.0, -1.0, 0.5]), 1), (np.array([2.0, -2.0, 0.5]), 3)],
               [(np.array([1.5, -1.0, 0.4]), 2), (np.array([1.5, -1.0, 0.4]), 2)],
               [(np.array([1.2, -1.7, 0.401]), 1), (np.array([1.22, -1.68, 0.402]), 1)]]
    strategy, x, got = cls(**options), _readonly(w=x0, n=np.array(4, np.int64)), []
    means = []
    for r, parties in enumerate(replies, 1):
        agg = strategy.start_round(r, x)
        for w, n in parties:
            agg.add(_readonly(w=w, n=np.array(2 * r, np.int64)), n)
        means.append(sum(w * n for w, n in parties) / sum(n for _, n in parties))
        x = agg.result()
        assert x["w"].dtype == np.float64 and int(x["n"]) == 2 * r  # integers: the plain mean
        got.append(x["w"])
    b2 = options.get("beta2", 0.0)
    expected, m, v = _reddi(rule, x0, means, options["server_lr"], options["beta1"], b2, options["tau"])
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12)
    state = strategy.state()
    np.testing.assert_allclose(state["m/w"], m, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state["v/w"], v, rtol=0, atol=1e-12)
    assert state["steps"] == 3 and set(state) == {"m/w", "v/w", "steps"}
    np.testing.assert_array_equal(x0, [1.0, -2.0, 0.5])  # inputs untouched


def test_fedadam_first_step_by_hand() -> None:
    # Δ = [-1, 1]; m = 0.1 Δ; v = 0.99 τ² + 0.01 Δ² = 0.01 + 0.99e-6; x1 = x0 + η m / (√v + τ)
    agg = FedAdam(server_lr=0.01, tau=1e-3).start_round(1, {"w": np.array([1.0, 1.0])})
    agg.add({"w": np.array([0.0, 2.0])}, 5)
    step = 0.01 * 0.1 / (np.sqrt(0.01 + 0.99e-6) + 1e-3)
    np.testing.assert_allclose(agg.result()["w"], [1 - step, 1 + step], rtol=0, atol=1e-15)
    assert 0.0098 < step < 0.01  # ≈ η: Adam's first step is about η per coordinate


@pytest.mark.parametrize(("rule", "cls", "options"), ADAPTIVE)
def test_adaptive_strategies_keep_float32(rule, cls, options) -> None:
    x0 = np.array([[1.0, -2.0], [0.5, 0.0]], np.float32)
    strategy, x, x64 = cls(**options), {"w": x0}, [x0.astype(np.float64)]
    for r in range(1, 3):
        agg = strategy.start_round(r, x)
        agg.add({"w": x["w"] + np.float32(0.25 * r)}, 1)
        x = agg.result()
        assert x["w"].dtype == np.float32
        assert strategy.state()["m/w"].dtype == np.float32 == strategy.state()["v/w"].dtype
    means = [x0.astype(np.float64) + 0.25]
    first, _, _ = _reddi(rule, x64[0], means, options["server_lr"], options["beta1"], options.get("beta2", 0.0),
                         options["tau"])
    second, _, _ = _reddi(rule, x64[0], [means[0], first[0] + 0.5], options["server_lr"], options["beta1"],
                          options.get("beta2", 0.0), options["tau"])
    np.testing.assert_allclose(x["w"], second[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_adaptive_state_survives_a_checkpoint_and_resets(cls, tmp_path) -> None:
    a, b = cls(), cls()
    x = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
    for r in (1, 2):
        agg = a.start_round(r, x)
        agg.add({"w": x["w"] * 0.9, "b": x["b"] + 0.1}, 3)
        x = agg.result()
    np.savez(tmp_path / "opt.npz", **a.state())
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as saved:
        b.load_state(dict(saved))
    assert b.state()["steps"] == 2
    outs = []
    for strategy in (a, b):
        agg = strategy.start_round(3, x)
        agg.add({"w": np.array([0.0, 0.0]), "b": np.array([1.0])}, 1)
        outs.append(agg.result())
    for key in ("w", "b"):
        np.testing.assert_array_equal(outs[0][key], outs[1][key])
    # a fresh strategy (or reset, or a new model shape) starts from m = 0, v = τ²
    fresh = cls()
    agg = fresh.start_round(3, x)
    agg.add({"w": np.array([0.0, 0.0]), "b": np.array([1.0])}, 1)
    assert not np.allclose(agg.result()["w"], outs[0]["w"])
    a.reset()
    assert a.state() == {"steps": 0}
    agg = b.start_round(4, {"w": np.zeros(3)})  # another model: the moments start again
    agg.add({"w": np.ones(3)}, 1)
    agg.result()
    assert b.state()["steps"] == 1 and b.state()["m/w"].shape == (3,)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"m/w": np.zeros(2)}, "do not cover the same tensors"),
        ({"m/w": np.zeros(2), "v/w": np.zeros(3)}, "do not cover the same tensors"),
        ({"m/w": np.zeros(2), "v/w": -np.ones(2)}, ">= 0"),
        ({"m/w": np.zeros(2), "v/w": np.full(2, np.nan)}, "finite float"),
        ({"m/w": np.zeros(2, np.int64), "v/w": np.zeros(2)}, "finite float"),
        ({"momentum/w": np.zeros(2)}, "unexpected state entry 'momentum/w'"),
        ({"steps": -1}, "steps"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_adaptive_states_are_refused(state, match: str) -> None:
    strategy = FedAdam()
    with pytest.raises(ValueError, match=match):
        strategy.load_state(state)
    assert strategy.state() == {"steps": 0}  # nothing half-loaded


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: FedProx(mu=-1), "mu"),
        (lambda: FedProx(mu=float("nan")), "mu"),
        (lambda: FedAvgM(server_lr=0), "server_lr"),
        (lambda: FedAvgM(server_momentum=1.0), "server_momentum"),
        (lambda: FedAvgM(server_momentum=-0.1), "server_momentum"),
        (lambda: FedAvgM(server_momentum="0.9"), "server_momentum"),
        (lambda: FedAdam(server_lr=0), "server_lr"),
        (lambda: FedAdam(beta1=1.0), "beta1"),
        (lambda: FedYogi(beta2=-0.5), "beta2"),
        (lambda: FedYogi(tau=0), "tau"),
        (lambda: FedAdagrad(tau=float("inf")), "tau"),
    ],
)
def test_constructor_arguments_are_validated(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_get_strategy() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median",
                               "trimmed-mean", "krum", "multi-krum", "bulyan", "scaffold"}
    assert all(issubclass(c, Strategy) and c.name == n for n, c in STRATEGIES.items())
    assert isinstance(get_strategy("fedavg"), FedAvg)
    assert get_strategy("FedProx", mu=0.3).mu == 0.3
    assert isinstance(get_strategy("fedavg", mu=None, momentum=None), FedAvg)
    m = get_strategy("fedavgm", server_lr=0.5, server_momentum=None, momentum=None)
    assert (m.server_lr, m.server_momentum) == (0.5, 0.9)
    with pytest.raises(ValueError, match="does not take momentum"):  # the local optimizer's, not the server's
        get_strategy("fedavgm", momentum=0.5)
    instance = FedProx()
    assert get_strategy(instance) is instance
    assert get_strategy(instance, mu=None) is instance
    with pytest.raises(ValueError, match="known strategies: fedavg, fedprox, fedavgm, fedadam"):
        get_strategy("fednova")
    with pytest.raises(ValueError, match="does not take mu"):
        get_strategy("fedavg", mu=0.1)
    with pytest.raises(ValueError, match="existing"):
        get_strategy(instance, mu=0.1)
    with pytest.raises(ValueError, match="name or a Strategy"):
        get_strategy(3)  # type: ignore[arg-type]


def test_strategies_do_not_import_torch() -> None:
    code = "import sys, fednb.strategies; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
