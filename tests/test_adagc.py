"""clipx.adagc against a float64 oracle, its statistics, and its composition with optax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracles_adagc
import pytest
from hypothesis import given
from hypothesis import strategies as st

import clipx

NAMES = ("w", "b", "s")


def as_tree(leaves):
    return {name: jnp.asarray(leaf) for name, leaf in zip(NAMES, leaves, strict=False)}


def run(tx, steps, update=None):
    update = update or tx.update
    state = tx.init(as_tree(steps[0]))
    results = []
    for leaves in steps:
        updates, state = update(as_tree(leaves), state)
        results.append((updates, state))
    return results


def assert_matches_oracle(results, expected):
    for t, ((updates, state), (want, gamma)) in enumerate(zip(results, expected, strict=True)):
        got_gamma = [float(state.gamma[n]) for n in NAMES]
        np.testing.assert_allclose(got_gamma, gamma, rtol=1e-5, err_msg=f"gamma at step {t}")
        if want is None:
            assert not all(bool(jnp.all(jnp.isfinite(updates[n]))) for n in NAMES), t
            continue
        for name, leaf in zip(NAMES, want, strict=False):
            np.testing.assert_allclose(updates[name], leaf, rtol=1e-5, atol=0, err_msg=f"{name} at step {t}")


class AdaGCOracleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_oracle_jit_and_eager(self):
        # 60 steps hold every event of `random_steps` after the 20 of warm-up (the first NaN at
        # step 41, the first inf at 53); the 520-step runs below are jitted only.
        steps = oracles_adagc.random_steps(seed=0, num_steps=60)
        tx = clipx.adagc(warmup_steps=20)
        assert_matches_oracle(
            run(tx, steps, self.variant(tx.update)), oracles_adagc.adagc(steps, warmup_steps=20)
        )


@pytest.mark.parametrize("seed, warmup_steps", [(1, 60), (2, 100)])
def test_matches_oracle_over_520_steps(seed, warmup_steps):
    steps = oracles_adagc.random_steps(seed=seed, num_steps=520)
    tx = clipx.adagc(warmup_steps=warmup_steps)
    expected = oracles_adagc.adagc(steps, warmup_steps=warmup_steps)
    assert_matches_oracle(run(tx, steps, jax.jit(tx.update)), expected)


def test_stats_report_the_documented_quantities():
    tx = clipx.adagc(warmup_steps=1)
    grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([1.0])}
    state = tx.init(grads)
    _, state = tx.update(grads, state)
    s = clipx.stats(state)
    assert float(s["adagc/threshold"]) == 1.0  # warm-up: the global max norm
    np.testing.assert_allclose(float(s["adagc/norm"]), np.sqrt(1.25), rtol=1e-6)
    _, state = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, state)
    s = clipx.stats(state)
    gamma = np.array([0.5, 1.0]) / np.sqrt(1.25)
    np.testing.assert_allclose(float(s["adagc/threshold"]), np.linalg.norm(1.04 * gamma), rtol=1e-6)
    np.testing.assert_allclose(float(s["adagc/norm"]), np.sqrt(25.25), rtol=1e-6)
    assert float(s["adagc/scale"]) == 0.5
    assert bool(s["adagc/clipped"])


def test_nonfinite_step_changes_no_statistic():
    tx = clipx.adagc(warmup_steps=2)
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(params, state)
    bad = {"a": jnp.array([1.0, jnp.nan, 1.0]), "b": jnp.ones(2)}
    _, after = tx.update(bad, state)
    chex.assert_trees_all_equal(after.gamma, state.gamma)
    assert int(after.finite_steps) == int(state.finite_steps)


def test_a_tensor_with_zero_gradients_through_warm_up_trains_afterwards():
    # A LoRA factor whose partner starts at zero has no gradient at first: a zero norm must not
    # become its scale γ, or λ·γ = 0 would hold it at zero for the rest of the run.
    tx = clipx.adagc(warmup_steps=2)
    state = tx.init({"a": jnp.ones(2), "lora": jnp.ones(2)})
    for _ in range(3):
        _, state = tx.update({"a": jnp.array([0.3, 0.4]), "lora": jnp.zeros(2)}, state)
    assert float(state.gamma["lora"]) == 0.0 and float(state.gamma["a"]) == pytest.approx(0.5)
    updates, state = tx.update({"a": jnp.array([0.3, 0.4]), "lora": jnp.array([0.6, 0.8])}, state)
    # Still on the warm-up rule: clipped to the global norm 1 (‖g‖ = √1.25), and γ set from it.
    np.testing.assert_allclose(updates["lora"], np.array([0.6, 0.8]) / np.sqrt(1.25), rtol=1e-5)
    assert float(state.gamma["lora"]) == pytest.approx(1 / np.sqrt(1.25), rel=1e-5)
    gamma_a = float(state.gamma["a"])
    _, after = tx.update({"a": jnp.zeros(2), "lora": jnp.array([0.6, 0.8])}, state)
    assert float(after.gamma["a"]) == gamma_a  # a zero norm is no observation


def test_structure_mismatch_is_a_clear_error():
    tx = clipx.adagc()
    state = tx.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"clipx\.adagc"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(1)}, state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"relative_threshold": 0.0},
        {"decay": 1.0},
        {"warmup_steps": 0},
        {"warmup_max_norm": -1.0},
        {"eps": float("nan")},
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        clipx.adagc(**kwargs)


@jax.jit
def _adagc_step(grads, state, relative_threshold, decay):
    return clipx.adagc(relative_threshold, decay, warmup_steps=5).update(grads, state)


@given(
    seed=st.integers(0, 2**16),
    relative_threshold=st.floats(1.0, 2.0),
    decay=st.floats(0.0, 0.999),
)
def test_property_thresholds_stay_finite_and_clip_bounds_hold(seed, relative_threshold, decay):
    steps = oracles_adagc.random_steps(seed=seed, num_steps=40)
    state = clipx.adagc(warmup_steps=5).init(as_tree(steps[0]))
    for leaves in steps:
        old = state
        updates, state = _adagc_step(
            as_tree(leaves), state, jnp.float32(relative_threshold), jnp.float32(decay)
        )
        assert all(np.isfinite(float(g)) and float(g) >= 0 for g in jax.tree.leaves(state.gamma))
        if int(old.finite_steps) >= 5 and all(np.all(np.isfinite(leaf)) for leaf in leaves):
            for name in NAMES:
                bound = np.float32(relative_threshold) * float(old.gamma[name])
                assert float(jnp.linalg.norm(updates[name])) <= bound * (1 + 1e-5) + 1e-12


def test_under_inject_hyperparams_with_traced_thresholds():
    tx = optax.inject_hyperparams(clipx.adagc)(relative_threshold=1.04, decay=0.99, warmup_steps=3)
    steps = oracles_adagc.random_steps(seed=2, num_steps=60)
    expected = oracles_adagc.adagc(steps, warmup_steps=3)
    state = tx.init(as_tree(steps[0]))
    update = jax.jit(tx.update)
    for leaves, (want, _) in zip(steps, expected, strict=False):
        updates, state = update(as_tree(leaves), state)
        if want is not None:
            for name, leaf in zip(NAMES, want, strict=False):
                np.testing.assert_allclose(updates[name], leaf, rtol=1e-5)
    assert "adagc/threshold" in clipx.stats(state)


def test_masked_and_chained_with_optimizers():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    grads = {"w": jnp.full((3, 4), 0.1), "b": jnp.full(4, 0.2)}
    for opt in (optax.sgd(0.1, momentum=0.9), optax.rmsprop(1e-3), optax.adamw(1e-3)):
        tx = optax.chain(optax.masked(clipx.adagc(warmup_steps=2), {"w": True, "b": False}), opt)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(4):
            updates, state = update(grads, state, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        assert "adagc/scale" in clipx.stats(state)


def test_a_shrinking_gamma_never_underflows_back_to_warm_up():
    # λ_rel = 0.5 and no averaging halve γ at every step; at 0 the tensor would restart warm-up.
    tx = clipx.adagc(relative_threshold=0.5, decay=0.0, warmup_steps=1)
    update = jax.jit(tx.update)
    state = tx.init({"w": jnp.zeros(2)})
    sizes = []
    for _ in range(200):
        updates, state = update({"w": jnp.array([0.6, 0.8])}, state)
        sizes.append(float(jnp.linalg.norm(updates["w"])))
    assert float(state.gamma["w"]) == np.finfo(np.float32).tiny
    assert max(sizes[150:]) < 1e-30  # still clipped at the floor, never back to the warm-up norm


def test_the_fraction_of_tensors_clipped_starts_at_zero():
    for tx in (clipx.adagc(), clipx.autoclip(per_tensor=True)):
        stats = clipx.stats(tx.init({"w": jnp.zeros(2)}))
        assert float(next(v for k, v in stats.items() if k.endswith("/scale"))) == 0.0
    tx = clipx.autoclip(per_tensor=True)
    _, state = tx.update({}, tx.init({}))
    assert float(clipx.stats(state)["autoclip/scale"]) == 0.0  # no tensor, none clipped


@pytest.mark.parametrize("after_warm_up", [False, True])
def test_a_zero_tensor_is_never_counted_as_clipped(after_warm_up):
    # The global norm is above warmup_max_norm, so a tensor on the warm-up rule is scaled
    # down; a zero tensor (frozen, or never seen) is not changed by that.
    tx = clipx.adagc(warmup_steps=2, warmup_max_norm=10.0)
    state = tx.init({"w": jnp.zeros(2), "frozen": jnp.zeros(3)})
    for _ in range(2 if after_warm_up else 0):
        _, state = tx.update({"w": jnp.array([12.0, 16.0]), "frozen": jnp.zeros(3)}, state)
    grads = {
        "w": jnp.array([6.12, 8.16]) if after_warm_up else jnp.array([12.0, 16.0]),
        "frozen": jnp.zeros(3),
    }
    updates, state = tx.update(grads, state)
    clipped = not np.array_equal(updates["w"], grads["w"])
    assert clipped is not after_warm_up  # 10.2 is within 1.04 × γ = 10.4; 20 is above 10
    assert float(state.stats.scale) == (0.5 if clipped else 0.0)  # "w" alone, of two tensors
    assert bool(state.stats.clipped) is clipped


def test_the_count_of_finite_steps_stops_at_the_int32_limit():
    tx = clipx.adagc(warmup_steps=2)
    grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.3, 0.4])}
    state = tx.init(grads)
    for _ in range(3):
        _, state = tx.update(grads, state)
    state = state._replace(finite_steps=jnp.int32(2**31 - 2))
    for _ in range(3):  # a spike of "a", clipped by its own γ, never by the warm-up rule
        updates, state = tx.update({"a": jnp.array([30.0, 40.0]), "b": grads["b"]}, state)
        assert float(jnp.linalg.norm(updates["a"])) < 0.6
    assert int(state.finite_steps) == 2**31 - 1


def test_a_huge_relative_threshold_is_finite_and_clips_nothing():
    # λ·γ overflowed to ∞ in the thresholds and the statistics, which jax_debug_infs stops at;
    # it is now at most the largest float.
    tx = clipx.adagc(relative_threshold=3e38, warmup_steps=1)
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(params)
    with jax.debug_infs(True):
        for i in range(3):
            grads = {"w": jnp.full(2, 100.0 * (i + 1)), "b": jnp.full(3, 10.0 * (i + 1))}
            updates, state = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal(updates, grads)
    assert np.isfinite(float(state.stats.threshold)) and not bool(state.stats.clipped)
