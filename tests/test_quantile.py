"""clipx.quantile_clip against a float64 oracle, and its composition with optax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracles_adagc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from machinery import run_resumed

import clipx

NAMES = ("w", "b", "s")


def as_tree(leaves):
    return {name: jnp.asarray(leaf) for name, leaf in zip(NAMES, leaves, strict=True)}


def assert_matches_oracle(tx, update, steps, expected, rtol=1e-5):
    state = tx.init(as_tree(steps[0]))
    for t, (leaves, (want, used, after)) in enumerate(zip(steps, expected, strict=True)):
        updates, state = update(as_tree(leaves), state)
        np.testing.assert_allclose(float(clipx.stats(state)["quantile_clip/threshold"]), used, rtol=rtol)
        np.testing.assert_allclose(float(jnp.exp(state.log_threshold)), after, rtol=rtol, err_msg=f"step {t}")
        if want is None:
            assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), t
            continue
        for name, leaf in zip(NAMES, want, strict=True):
            np.testing.assert_allclose(updates[name], leaf, rtol=rtol, atol=0, err_msg=f"{name} at step {t}")


class QuantileOracleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_oracle_jit_and_eager(self):
        steps = oracles_adagc.random_steps(seed=3, num_steps=100)
        tx = clipx.quantile_clip()
        assert_matches_oracle(tx, self.variant(tx.update), steps, oracles_adagc.quantile_clip(steps))


CASES = [(4, {}), (5, {"target_quantile": 0.9, "learning_rate": 0.05, "initial_threshold": 3.0})]


@pytest.mark.parametrize("seed, kwargs", CASES)
def test_matches_oracle_over_520_steps_in_float64(seed, kwargs):
    with jax.enable_x64(True):
        steps = oracles_adagc.random_steps(seed=seed, num_steps=520, dtype=np.float64)
        tx = clipx.quantile_clip(**kwargs)
        assert_matches_oracle(tx, jax.jit(tx.update), steps, oracles_adagc.quantile_clip(steps, **kwargs))


@pytest.mark.parametrize("seed, kwargs", CASES)
def test_float32_rounding_stays_small_over_520_steps(seed, kwargs):
    # float32 additions to log C round by up to 1.2e-7 relative each step; they do not compound.
    steps = oracles_adagc.random_steps(seed=seed, num_steps=520)
    tx = clipx.quantile_clip(**kwargs)
    assert_matches_oracle(tx, jax.jit(tx.update), steps, oracles_adagc.quantile_clip(steps, **kwargs), 5e-5)


def test_settles_near_the_target_quantile():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(size=3000)).astype(np.float32)
    tx = clipx.quantile_clip(target_quantile=0.8, learning_rate=0.05, initial_threshold=1.0)

    def step(state, norm):
        _, state = tx.update(jnp.array([norm]), state)
        return state, jnp.exp(state.log_threshold)

    _, thresholds = jax.lax.scan(step, tx.init(jnp.zeros(1)), norms)
    np.testing.assert_allclose(np.median(thresholds[1000:]), np.exp(0.8416), rtol=0.15)


@jax.jit
def _quantile_step(grads, state, target_quantile, learning_rate):
    return clipx.quantile_clip(target_quantile, learning_rate).update(grads, state)


@given(
    norms=st.lists(
        st.one_of(st.floats(0, 1e6), st.sampled_from([float("nan"), float("inf")])), min_size=1, max_size=30
    ),
    target_quantile=st.floats(0, 1),
    learning_rate=st.floats(0, 1),
)
def test_property_threshold_stays_positive_and_clip_holds(norms, target_quantile, learning_rate):
    state = clipx.quantile_clip().init(jnp.zeros(1))
    for norm in norms:
        old = float(jnp.exp(state.log_threshold))
        updates, state = _quantile_step(
            jnp.array([norm], jnp.float32), state, jnp.float32(target_quantile), jnp.float32(learning_rate)
        )
        assert 0 < float(jnp.exp(state.log_threshold)) < np.inf
        if np.isfinite(norm):
            assert abs(float(updates[0])) <= old * (1 + 1e-6)
        else:
            assert float(jnp.exp(state.log_threshold)) == old


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="target_quantile"):
        clipx.quantile_clip(target_quantile=1.5)
    with pytest.raises(ValueError, match="initial_threshold"):
        clipx.quantile_clip(initial_threshold=0.0)
    with pytest.raises(ValueError, match="learning_rate"):
        clipx.quantile_clip(learning_rate=-0.1)


def test_inject_hyperparams_multisteps_and_serialization():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    grads = [jax.tree.map(lambda p, i=i: (i % 5 + 1) * 0.1 * p, params) for i in range(12)]
    inner = optax.chain(
        optax.inject_hyperparams(clipx.quantile_clip)(target_quantile=0.5, learning_rate=0.2),
        optax.sgd(0.1, momentum=0.9),
    )
    tx = optax.MultiSteps(inner, every_k_schedule=3)
    a = run_resumed(tx, grads, params, split=6)
    # 12 mini-steps of 3: the threshold moved 4 times, once per real step.
    moved = 0.1 * np.exp(0.2 * 0.5) ** 4  # every averaged norm is above C while C is small
    np.testing.assert_allclose(
        float(jnp.exp(a.inner_opt_state[0].inner_state.log_threshold)), moved, rtol=1e-5
    )


def test_a_run_of_zero_gradients_leaves_the_threshold_as_it_was():
    # Before, each zero norm counted as below C: after 2000 of them C was exp(-202) = 0 in
    # float32, and about 1500 later updates were zeroed.
    tx = clipx.quantile_clip(initial_threshold=1.0)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for _ in range(2000):
        _, state = update(jnp.zeros(2), state)
    assert float(state.log_threshold) == 0.0
    grads = jnp.array([0.3, 0.4])
    updates, _ = update(grads, state)
    np.testing.assert_array_equal(updates, grads)


def test_a_norm_equal_to_the_threshold_counts_as_below_it():
    """b = [‖g‖ ≤ C]: a norm of exactly C is at or below the quantile, so C shrinks by e^{−η(1−γ)}."""
    tx = clipx.quantile_clip(target_quantile=0.5, learning_rate=0.2, initial_threshold=0.5)
    state = tx.init({"w": jnp.zeros(1)})
    at_threshold = {"w": jnp.exp(state.log_threshold)[None]}  # a norm of exactly C, as the rule computes it
    updates, after = tx.update(at_threshold, state)
    chex.assert_trees_all_equal(updates, at_threshold)  # not clipped
    np.testing.assert_allclose(float(after.log_threshold), float(state.log_threshold) - 0.2 * 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_threshold": float(np.finfo(np.float32).max)},
        {"learning_rate": 100.0, "target_quantile": 0.99},
    ],
    ids=["largest-C0", "fast-growth"],
)
def test_the_threshold_stops_below_the_largest_float(kwargs):
    # Before, exp(log C) rounded past the largest float32 (C₀ = 3.4e38), or η = 100 grew log C to 92.7:
    # a threshold of ∞.
    tx = clipx.quantile_clip(**kwargs)
    state = tx.init(jnp.zeros(2))
    for _ in range(3):
        _, state = jax.jit(tx.update)(jnp.array([3.0, 4.0]), state)
        threshold = float(clipx.stats(state)["quantile_clip/threshold"])
        assert np.isfinite(threshold) and np.isfinite(float(jnp.exp(state.log_threshold)))
    assert threshold > 1e37
