"""clipx.zclip against a float64 NumPy reference, and in the optax machinery."""

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from machinery import CHAINED_OPTIMIZERS, check_traced_hyperparameter, run_resumed, run_steps
from oracles import (
    ZClipOracle,
    assert_matches,
    assert_steps_match,
    gradient_sequence,
    run_oracle,
    run_transform,
)

import clipx

SHAPES = {"b": (2,), "s": (), "w": (3, 2)}
FIELDS = {f"zclip/{f}" for f in ("norm", "threshold", "scale", "clipped")}


@pytest.mark.parametrize(
    ("kwargs", "seed"),
    [
        ({}, 0),  # the defaults: cap 1.0 clips most steps
        ({"max_norm": 10.0}, 1),
        ({"max_norm": None}, 2),
        ({"max_norm": None, "clip_option": "mean"}, 3),
        ({"max_norm": 20.0, "clip_option": "mean", "skip_update_on_spike": True}, 4),
        ({"max_norm": None, "clip_factor": 0.7, "skip_update_on_spike": True}, 5),
        ({"max_norm": None, "mode": "percentile"}, 6),
        ({"max_norm": 5.0, "mode": "percentile", "skip_update_on_spike": True, "z_thresh": 1.5}, 7),
        ({"max_norm": None, "alpha": 0.8, "warmup_steps": 1, "eps": 1e-3}, 8),
    ],
)
def test_matches_reference(kwargs, seed):
    grads = gradient_sequence(seed, 500, SHAPES)
    updates, stats, state = run_transform(clipx.zclip(**kwargs), grads)
    oracle = ZClipOracle(**kwargs)
    expected_updates, expected_stats = run_oracle(oracle, grads)
    assert_matches(updates, stats, expected_updates, expected_stats)
    np.testing.assert_allclose(state.mean, oracle.mean, rtol=1e-5)
    np.testing.assert_allclose(state.var, oracle.var, rtol=1e-4)
    assert stats["clipped"].any()


def test_warmup_statistics():
    tx = clipx.zclip(max_norm=2.9, warmup_steps=3)
    state = tx.init(jnp.zeros(1))
    for n in [1.0, np.nan, 2.0, 3.0]:  # the NaN step does not count
        updates, state = tx.update(jnp.array([n]), state)
        np.testing.assert_allclose(state.stats.threshold, 2.9)
    assert int(state.warmup_count) == 3
    np.testing.assert_allclose([state.mean, state.var], [2.0, 2.0 / 3.0], rtol=1e-6)
    updates, state = tx.update(jnp.array([10.0]), state)  # z ≈ 9.8: a spike, T = 2 + 2.5σ/(z/2.5) ≈ 2.52
    std = np.sqrt(2.0 / 3.0)
    z = 8.0 / (std + 1e-6)
    np.testing.assert_allclose(state.stats.threshold, 2.0 + 2.5 * std / (z / 2.5), rtol=1e-6)
    np.testing.assert_allclose(np.abs(updates), state.stats.threshold, rtol=1e-6)
    np.testing.assert_allclose(state.mean, 0.97 * 2.0 + 0.03 * float(state.stats.threshold), rtol=1e-6)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_steps_match_reference(self):
        grads = gradient_sequence(9, 16, SHAPES, spike=0.2, nonfinite=0.1)
        kwargs = {"max_norm": None, "warmup_steps": 4}
        tx = clipx.zclip(**kwargs)
        state = tx.init({k: jnp.zeros(v) for k, v in SHAPES.items()})
        assert_steps_match(self.variant(tx.update), state, ZClipOracle(**kwargs), grads)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"alpha": 1.0}, ValueError),
        ({"alpha": 0.0}, ValueError),
        ({"z_thresh": 0.0}, ValueError),
        ({"max_norm": -1.0}, ValueError),
        ({"warmup_steps": 0}, ValueError),
        ({"warmup_steps": 2.5}, TypeError),
        ({"mode": "zcore"}, ValueError),
        ({"clip_option": "median"}, ValueError),
        ({"clip_factor": 0.0}, ValueError),
        ({"skip_update_on_spike": 1}, TypeError),
        ({"eps": -1e-6}, ValueError),
    ],
)
def test_validates_arguments(kwargs, error):
    with pytest.raises(error):
        clipx.zclip(**kwargs)


# --- properties -----------------------------------------------------------------------------------

STEPS = 24
WARMUP = 5
NORMS = st.lists(
    st.one_of(st.floats(1e-3, 1e3), st.sampled_from([float("nan"), float("inf")])),
    min_size=STEPS,
    max_size=STEPS,
)
CONFIGS = [
    {"max_norm": None},
    {"max_norm": 50.0, "clip_option": "mean"},
    {"max_norm": None, "mode": "percentile", "skip_update_on_spike": True},
]


@functools.cache
def _property_runner(config):
    tx = clipx.zclip(warmup_steps=WARMUP, **CONFIGS[config])
    direction = {"a": jnp.array([0.6, 0.8]), "b": jnp.array([[0.0]])}

    @jax.jit
    def run(norms):
        def body(state, norm):
            updates, state = tx.update(jax.tree.map(lambda d: norm * d, direction), state)
            return state, (updates, state.stats, state.warmup_count)

        return jax.lax.scan(body, tx.init(direction), norms)

    return run


@given(NORMS, st.integers(0, len(CONFIGS) - 1))
def test_properties(norms, config):
    norms = np.asarray(norms, np.float32)
    state, (updates, stats, warmup_count) = _property_runner(config)(norms)
    finite = np.isfinite(norms)
    ready = np.concatenate([[False], np.asarray(warmup_count)[:-1] >= WARMUP])
    threshold = np.asarray(stats.threshold)
    assert np.all(threshold[ready] > 0) and np.all(np.isfinite(threshold[ready]))
    out = np.sqrt(sum(np.sum(np.square(v).reshape(STEPS, -1), axis=1) for v in updates.values()))
    assert np.all(out[finite] <= threshold[finite] * (1 + 1e-5))
    assert all(np.all(np.isfinite(x)) for x in (state.mean, state.var, state.warmup_norms))
    assert float(state.var) >= 0


# --- inside the optax machinery -------------------------------------------------------------------

GRADS = {k: jnp.asarray(v) for k, v in gradient_sequence(11, 40, SHAPES).items()}
CLEAN = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), GRADS)
PARAMS = {k: jnp.zeros(v) for k, v in SHAPES.items()}


def test_inject_hyperparams_traced_z_thresh():
    kwargs = {"z_thresh": 1.5, "max_norm": None, "warmup_steps": 5}
    check_traced_hyperparameter(
        clipx.zclip, kwargs, ("warmup_steps",), GRADS, PARAMS, 40, "z_thresh", 1000.0, 100.0
    )


def test_multisteps_advances_statistics_once_per_real_step():
    kwargs = {"max_norm": None, "warmup_steps": 4}
    tx = optax.MultiSteps(clipx.zclip(**kwargs), every_k_schedule=4)
    _, state = run_steps(tx, CLEAN, PARAMS, 40)
    mean = jax.tree.map(lambda g: g.reshape(10, 4, *g.shape[1:]).mean(axis=1), CLEAN)
    _, direct = run_steps(clipx.zclip(**kwargs), mean, PARAMS, 10)
    inner = state.inner_opt_state
    assert int(inner.warmup_count) == 4
    np.testing.assert_allclose([inner.mean, inner.var], [direct.mean, direct.var], rtol=1e-5)
    assert set(clipx.stats(state)) == FIELDS


def test_masked_leaves_pass_through():
    tx = optax.masked(clipx.zclip(max_norm=0.5, warmup_steps=3), {"b": False, "s": True, "w": True})
    updates, state = run_steps(tx, CLEAN, PARAMS, 10)
    for t, u in enumerate(updates):
        np.testing.assert_array_equal(u["b"], CLEAN["b"][t])
        assert optax.tree.norm({"s": u["s"], "w": u["w"]}) <= 0.5 * (1 + 1e-6)
    assert set(clipx.stats(state)) == FIELDS


@CHAINED_OPTIMIZERS
def test_chains_with_optimizers(optimizer):
    tx = optax.chain(clipx.zclip(warmup_steps=5), optimizer)
    updates, state = run_steps(tx, CLEAN, PARAMS, 40)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert np.isfinite(clipx.stats(state)["zclip/threshold"])


def test_checkpoint_round_trip_resumes_bit_identically():
    tx = optax.chain(clipx.zclip(max_norm=None, warmup_steps=8), optax.adam(1e-2))
    grads = [jax.tree.map(lambda g: g[t], GRADS) for t in range(40)]  # noqa: B023
    run_resumed(tx, grads, PARAMS, split=5)  # stop mid warm-up: the buffer must survive too


def test_warmup_variance_of_huge_norms_does_not_overflow():
    # Population variance 8.1e37 of norms 1.8e19 and 0: the sum of the squares (4.9e38) overflows float32.
    tx = clipx.zclip(max_norm=None, warmup_steps=6)
    state = tx.init(jnp.zeros(1))
    for norm in [1.8e19, 0.0] * 3:
        _, state = tx.update(jnp.array([norm], jnp.float32), state)
    assert float(state.var) == pytest.approx(8.1e37, rel=1e-5)


def test_without_a_cap_an_overflowing_norm_is_scaled_to_zero_in_warmup():
    # Before, with no cap a warm-up step was clipped to its own norm, ∞, and passed unscaled.
    tx = clipx.zclip(max_norm=None)
    updates, state = tx.update(jnp.array([3e19, 4e19], jnp.float32), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert bool(state.stats.clipped)
    updates, _ = tx.update(jnp.array([3.0, 4.0]), state)
    np.testing.assert_array_equal(updates, [3.0, 4.0])


def test_percentile_mode_compares_with_mean_plus_z_sigma_without_eps():
    """mode="percentile": a spike is a norm above μ + z·σ (ε plays no part); after two equal norms
    σ = 0, so 1.5 is a spike, clipped to the boundary μ = 1, however large ε."""
    tx = clipx.zclip(mode="percentile", eps=1.0, warmup_steps=2, max_norm=None)
    state = tx.init({"w": jnp.zeros(1)})
    for norm in (1.0, 1.0):
        _, state = tx.update({"w": jnp.array([norm])}, state)
    updates, state = tx.update({"w": jnp.array([1.5])}, state)
    np.testing.assert_allclose(updates["w"], [1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_factor": 3e38},
        {"clip_factor": 1e20},
        {"z_thresh": 3e38},
        {"eps": 3e38},
        {"mode": "percentile", "z_thresh": 3e38},
    ],
    ids=["factor-3e38", "factor-1e20", "z-3e38", "eps-3e38", "percentile-z-3e38"],
)
def test_huge_factors_keep_statistics_and_thresholds_finite(kwargs):
    # Before, a spike's T = (μ + z·σ/η)·factor overflowed into the statistics (μ = ∞, σ² = NaN: the
    # rule was off for good), or σ² overflowed from (x − μ)², or the reported boundary was ∞.
    tx = clipx.zclip(warmup_steps=2, max_norm=None, **kwargs)
    state = tx.init(jnp.zeros(2))
    for grads in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0], [1.0, 1.0], [300.0, 400.0]):
        _, state = jax.jit(tx.update)(jnp.array(grads), state)
        values = [state.mean, state.var, *jax.tree.leaves(clipx.stats(state))]
        assert all(np.isfinite(np.asarray(v)).all() for v in values), (grads, values)
