"""clipx.autoclip against a float64 NumPy reference, and in the optax machinery."""

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
    AutoClipOracle,
    assert_matches,
    assert_steps_match,
    gradient_sequence,
    run_oracle,
    run_transform,
)

import clipx

SHAPES = {"b": (2,), "s": (), "w": (3, 2)}


@pytest.mark.parametrize(
    ("quantile", "history", "per_tensor", "seed"),
    [
        (0.9, 1000, False, 0),  # history longer than the run
        (0.9, 50, False, 1),  # the ring wraps many times
        (0.5, 7, False, 2),
        (0.9, 1000, True, 3),
        (0.25, 30, True, 4),
        (1.0, 5, False, 5),
        (0.0, 5, True, 6),
    ],
)
def test_matches_reference(quantile, history, per_tensor, seed):
    grads = gradient_sequence(seed, 500, SHAPES)
    tx = clipx.autoclip(quantile, history, per_tensor)
    updates, stats, _ = run_transform(tx, grads)
    expected_updates, expected_stats = run_oracle(AutoClipOracle(quantile, history, per_tensor), grads)
    assert_matches(updates, stats, expected_updates, expected_stats)
    assert stats["threshold"][0] == stats["norm"][0] and not stats["clipped"][0]
    assert stats["clipped"].any() and not stats["clipped"].all()


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.filterwarnings("ignore::RuntimeWarning")
    def test_steps_match_reference(self):
        grads = gradient_sequence(7, 12, SHAPES, spike=0.2, nonfinite=0.1)
        for per_tensor in (False, True):
            tx = clipx.autoclip(0.5, 4, per_tensor)
            state = tx.init({k: jnp.zeros(v) for k, v in SHAPES.items()})
            assert_steps_match(self.variant(tx.update), state, AutoClipOracle(0.5, 4, per_tensor), grads)


def test_state_is_fixed_size_and_per_tensor_mirrors_the_tree():
    params = {"a": jnp.zeros((4, 3)), "b": [jnp.zeros(2, jnp.bfloat16)]}
    state = clipx.autoclip(history=16).init(params)
    assert state.norms.shape == (16,) and state.count.shape == ()
    state = clipx.autoclip(history=16, per_tensor=True).init(params)
    assert jax.tree.structure(state.norms) == jax.tree.structure(params)
    assert all(b.shape == (16,) and b.dtype == jnp.float32 for b in jax.tree.leaves(state.norms))


def test_per_tensor_rejects_a_state_from_another_tree():
    tx = clipx.autoclip(per_tensor=True)
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="structures differ"):
        tx.update({"a": jnp.ones(2)}, state)


def test_count_folds_and_never_overflows():
    tx = clipx.autoclip(0.5, history=3)
    state = tx.init(jnp.zeros(1))
    step = jax.jit(tx.update)
    for g in range(1, 11):
        _, state = step(jnp.array([float(g)]), state)
        assert int(state.count) == (g if g < 6 else 3 + g % 3)
    np.testing.assert_allclose(state.stats.threshold, 8.0)  # median of 7, 8, 9


def test_no_recompilation_as_the_buffer_fills():
    traces = []
    tx = clipx.autoclip(0.9, history=8)

    @jax.jit
    def step(g, state):
        traces.append(None)
        return tx.update(g, state)

    state = tx.init(jnp.zeros(3))
    for t in range(20):
        _, state = step(jnp.full(3, 1.0 + t), state)
    assert len(traces) == 1 and step._cache_size() == 1


def test_empty_tree():
    for per_tensor in (False, True):
        tx = clipx.autoclip(per_tensor=per_tensor)
        updates, state = tx.update({}, tx.init({}))
        assert updates == {} and not bool(state.stats.clipped)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"quantile": 1.5}, ValueError),
        ({"quantile": -0.1}, ValueError),
        ({"quantile": float("nan")}, ValueError),
        ({"history": 0}, ValueError),
        ({"history": 2.0}, TypeError),
        ({"per_tensor": 1}, TypeError),
    ],
)
def test_validates_arguments(kwargs, error):
    with pytest.raises(error):
        clipx.autoclip(**kwargs)


# --- properties -----------------------------------------------------------------------------------

STEPS = 24
NORMS = st.lists(
    st.one_of(
        st.floats(1e-3, 1e3),
        st.sampled_from([float("nan"), float("inf")]),
    ),
    min_size=STEPS,
    max_size=STEPS,
)


@functools.cache
def _property_runner(per_tensor):
    """Both leaves are unit vectors times the step's norm, so per tensor they share one history."""
    tx = clipx.autoclip(0.8, history=6, per_tensor=per_tensor)
    direction = {"a": jnp.array([0.6, 0.8]), "b": jnp.array([[1.0]])}

    @jax.jit
    def run(norms):
        def body(state, norm):
            updates, state = tx.update(jax.tree.map(lambda d: norm * d, direction), state)
            return state, (updates, state.stats)

        return jax.lax.scan(body, tx.init(direction), norms)

    return run


@given(NORMS, st.booleans())
def test_properties(norms, per_tensor):
    norms = np.asarray(norms, np.float32)
    state, (updates, stats) = _property_runner(per_tensor)(norms)
    finite = np.isfinite(norms)
    seen_before = np.cumsum(finite) - finite > 0
    threshold = np.asarray(stats.threshold)
    # Positive and finite once a finite norm has been recorded, the step's own norm before (at most
    # the largest float, so that a norm that overflows is above it).
    assert np.all(threshold[seen_before] > 0) and np.all(np.isfinite(threshold[seen_before]))
    own = np.minimum(np.asarray(stats.norm), np.finfo(np.float32).max)
    np.testing.assert_array_equal(threshold[~seen_before], own[~seen_before])
    # The clipped update (each leaf, per tensor) never exceeds its threshold.
    leaf_norms = [np.sqrt(np.sum(np.square(v).reshape(STEPS, -1), axis=1)) for v in updates.values()]
    clipped = [np.sqrt(sum(n**2 for n in leaf_norms))] if not per_tensor else leaf_norms
    for out in clipped:
        assert np.all(out[finite] <= threshold[finite] * (1 + 1e-5))
    # Statistics stay finite whatever came in.
    assert all(np.all(np.isfinite(b)) for b in jax.tree.leaves(state.norms))


# --- inside the optax machinery -------------------------------------------------------------------


GRADS = {k: jnp.asarray(v) for k, v in gradient_sequence(11, 30, SHAPES).items()}
PARAMS = {k: jnp.zeros(v) for k, v in SHAPES.items()}
CLEAN = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), GRADS)


def test_inject_hyperparams_traced_quantile():
    kwargs = {"quantile": 0.5, "history": 8}
    check_traced_hyperparameter(
        clipx.autoclip, kwargs, ("history",), GRADS, PARAMS, 30, "quantile", 1.0, 50.0
    )


def test_multisteps_advances_statistics_once_per_real_step():
    tx = optax.MultiSteps(clipx.autoclip(0.5, 16), every_k_schedule=3)
    _, state = run_steps(tx, CLEAN, PARAMS, 30)
    assert int(state.inner_opt_state.count) == 10
    # The recorded norms are those of the averaged micro-batch gradients.
    mean = jax.tree.map(lambda g: g.reshape(10, 3, *g.shape[1:]).mean(axis=1), CLEAN)
    _, direct = run_steps(clipx.autoclip(0.5, 16), mean, PARAMS, 10)
    np.testing.assert_allclose(state.inner_opt_state.norms, direct.norms, rtol=1e-5)
    assert "autoclip/threshold" in clipx.stats(state)


def test_masked_leaves_pass_through():
    mask = {"b": False, "s": True, "w": True}
    for per_tensor in (False, True):
        tx = optax.masked(clipx.autoclip(0.5, 8, per_tensor), mask)
        updates, state = run_steps(tx, GRADS, PARAMS, 30)
        for t, u in enumerate(updates):
            np.testing.assert_array_equal(u["b"], GRADS["b"][t])
        assert set(clipx.stats(state)) == {f"autoclip/{f}" for f in ("norm", "threshold", "scale", "clipped")}


@CHAINED_OPTIMIZERS
def test_chains_with_optimizers(optimizer):
    tx = optax.chain(clipx.autoclip(0.9, 8), optimizer)
    updates, state = run_steps(tx, CLEAN, PARAMS, 30)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert np.isfinite(clipx.stats(state)["autoclip/threshold"])


@pytest.mark.parametrize("per_tensor", [False, True])
def test_checkpoint_round_trip_resumes_bit_identically(per_tensor):
    tx = optax.chain(clipx.autoclip(0.7, 8, per_tensor), optax.adam(1e-2))
    grads = [jax.tree.map(lambda g: g[t], GRADS) for t in range(30)]  # noqa: B023
    run_resumed(tx, grads, PARAMS, split=15)


@pytest.mark.parametrize("step", [0, 1])
def test_per_tensor_reports_a_nan_norm_at_any_step(step):
    """A NaN leaf is reported (norm NaN), on the first step too, where its threshold is its own norm."""
    tx = clipx.autoclip(history=3, per_tensor=True)
    clean = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    poisoned = {"a": jnp.array([jnp.nan, 2.0]), "b": jnp.array([3.0])}
    state = tx.init(clean)
    for grads in [clean] * step + [poisoned]:
        _, state = jax.jit(tx.update)(grads, state)
    assert np.isnan(float(clipx.stats(state)["autoclip/norm"]))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_an_overflowing_norm_is_scaled_to_zero_from_the_first_step(per_tensor):
    # Before, the empty history's threshold was the step's own norm, ∞, and the step passed unscaled.
    tx = clipx.autoclip(per_tensor=per_tensor)
    grads = jnp.array([3e19, 4e19], jnp.float32)  # finite, ‖g‖ = ∞ in float32
    updates, state = tx.update(grads, tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    assert bool(state.stats.clipped)
    assert int(jax.tree.leaves(state.count)[0]) == 0  # not recorded
    updates, _ = tx.update(jnp.array([3.0, 4.0]), state)
    np.testing.assert_array_equal(updates, [3.0, 4.0])  # the next first finite norm is not clipped


def test_per_tensor_reports_no_tensor_clipped_before_the_first_step():
    """Per tensor, scale is the fraction of tensors clipped (0 before any step); globally the factor 1."""
    params = {"w": jnp.zeros(2)}
    assert float(clipx.stats(clipx.autoclip(per_tensor=True).init(params))["autoclip/scale"]) == 0.0
    assert float(clipx.stats(clipx.autoclip().init(params))["autoclip/scale"]) == 1.0
