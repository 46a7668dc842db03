"""clipx.value, global_norm, tensor_norm, block_rms: parity with optax, stats, jit, properties."""

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import clipx
from clipx import _numerics

rng = np.random.default_rng(0)


def random_tree(scale=3.0, dtype=np.float32):
    return {
        "w": jnp.asarray(scale * rng.standard_normal((3, 4)), dtype),
        "b": jnp.asarray(scale * rng.standard_normal(4), dtype),
        "s": jnp.asarray(scale * rng.standard_normal(()), dtype),
    }


def random_complex_tree(scale=3.0):
    real, imag = random_tree(scale), random_tree(scale)
    return jax.tree.map(lambda r, i: jax.lax.complex(r, i), real, imag)


def apply(tx, updates, params=None):
    return tx.update(updates, tx.init(updates if params is None else params), params)


# --- parity with optax where optax's result is finite --------------------------------------------------

PARITY = [
    ("value", clipx.value, optax.clip, 0.5),
    ("global_norm", clipx.global_norm, optax.clip_by_global_norm, 1.0),
    ("block_rms", clipx.block_rms, optax.clip_by_block_rms, 0.5),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "threshold"), PARITY, ids=[p[0] for p in PARITY])
@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_parity_with_optax(name, ours, theirs, threshold, scale):
    grads = random_tree(scale)
    expected, _ = apply(theirs(threshold), grads)
    actual, _ = apply(ours(threshold), grads)
    chex.assert_trees_all_close(actual, expected, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal_dtypes(actual, grads)


@pytest.mark.parametrize(("name", "ours", "theirs", "threshold"), PARITY[1:], ids=[p[0] for p in PARITY[1:]])
def test_parity_with_optax_complex(name, ours, theirs, threshold):
    grads = random_complex_tree()
    expected, _ = apply(theirs(threshold), grads)
    actual, _ = apply(ours(threshold), grads)
    chex.assert_trees_all_close(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "ours", "theirs", "threshold"), PARITY, ids=[p[0] for p in PARITY])
def test_parity_with_none_and_masked_leaves(name, ours, theirs, threshold):
    grads = {"a": jnp.array([3.0, -4.0]), "b": None, "c": jnp.array([[0.5, -2.0]]), "d": jnp.ones(3)}
    mask = {"a": True, "b": None, "c": True, "d": False}
    for wrap in (lambda tx: tx, lambda tx: optax.masked(tx, mask)):
        expected, _ = apply(wrap(theirs(threshold)), grads)
        actual, _ = apply(wrap(ours(threshold)), grads)
        chex.assert_trees_all_close(actual, expected, rtol=1e-6)
        assert actual["b"] is None


def test_tensor_norm_matches_global_norm_clip_leaf_by_leaf():
    grads = random_tree()
    actual, _ = apply(clipx.tensor_norm(1.0), grads)
    expected = {k: apply(optax.clip_by_global_norm(1.0), v)[0] for k, v in grads.items()}
    chex.assert_trees_all_close(actual, expected, rtol=1e-6)
    for leaf in actual.values():
        assert float(jnp.linalg.norm(leaf)) == pytest.approx(1.0, rel=1e-6)


def test_value_complex_clips_real_and_imaginary_parts():
    grads = jnp.array([3 + 4j, 0.5 - 2j, 0.1 + 0.1j], jnp.complex64)
    updates, state = apply(clipx.value(1.0), grads)
    np.testing.assert_array_equal(updates, jnp.array([1 + 1j, 0.5 - 1j, 0.1 + 0.1j], jnp.complex64))
    assert updates.dtype == jnp.complex64
    assert float(state.stats.norm) == 4.0
    assert float(state.stats.scale) == pytest.approx(2 / 3)


def test_value_keeps_float16_dtype():
    grads = jnp.array([300.0, -0.25], jnp.float16)
    updates, _ = apply(optax.inject_hyperparams(clipx.value)(max_delta=1.0), grads)
    assert updates.dtype == jnp.float16
    np.testing.assert_array_equal(updates, jnp.array([1.0, -0.25], jnp.float16))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e4m3fnuz, jnp.float8_e5m2])
@pytest.mark.parametrize("max_delta", [float("inf"), 1000.0, jnp.array(1e6)], ids=["inf", "1000", "array"])
def test_value_past_a_float8_range_leaves_entries_as_they_are(dtype, max_delta):
    # e4m3fn and e4m3fnuz have no infinity: a bound past their range cast as it is would be
    # NaN, and every entry with it.
    grads = jnp.array([100.0, -2.0, 0.5, -240.0], dtype)
    tx = clipx.value(max_delta)
    updates, state = tx.update(grads, tx.init(grads))
    assert updates.dtype == dtype
    np.testing.assert_array_equal(updates.astype(jnp.float32), grads.astype(jnp.float32))
    assert not bool(state.stats.clipped)
    clipped, _ = clipx.value(1.0).update(grads, tx.init(grads))
    np.testing.assert_array_equal(clipped.astype(jnp.float32), [1.0, -1.0, 0.5, -1.0])


# --- stats ---------------------------------------------------------------------------------------------


def test_value_stats():
    grads = {"a": jnp.array([3.0, -0.5]), "b": jnp.array([-2.0, 0.1, 0.2])}
    updates, state = apply(clipx.value(1.0), grads)
    chex.assert_trees_all_close(updates, {"a": jnp.array([1.0, -0.5]), "b": jnp.array([-1.0, 0.1, 0.2])})
    s = state.stats
    assert (float(s.norm), float(s.threshold), bool(s.clipped)) == (3.0, 1.0, True)
    assert float(s.scale) == pytest.approx(0.4)


def large_tree():
    """Two leaves large enough to be reduced on their own (one float16), and a small one."""
    n = _numerics.SMALL_LEAF + 5
    return {
        "big": jnp.asarray(rng.standard_normal(n), jnp.float32),
        "half": jnp.asarray(300 * rng.standard_normal(n), jnp.float16),
        "small": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
    }


def test_value_on_large_leaves_matches_optax_and_counts_exactly():
    tree = large_tree()
    tx = clipx.value(0.5)
    updates, state = jax.jit(tx.update)(tree, tx.init(tree))
    chex.assert_trees_all_equal(updates, optax.clip(0.5).update(tree, optax.EmptyState())[0])
    entries = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])
    assert float(state.stats.norm) == np.max(np.abs(entries))
    assert float(state.stats.scale) == pytest.approx(np.mean(np.abs(entries) > 0.5), rel=1e-6)


def test_value_counts_a_leaf_block_by_block(monkeypatch):
    # Leaves of 2³¹ entries or more are counted in int32 blocks of 2³⁰: here, blocks of 4.
    tree = {**large_tree(), "z": jnp.asarray(rng.standard_normal(13) + 1j * rng.standard_normal(13))}
    tx = clipx.value(0.5)
    expected_updates, expected = jax.jit(tx.update)(tree, tx.init(tree))
    monkeypatch.setattr(clipx.fixed, "_COUNT_BLOCK", 4)
    updates, state = jax.jit(clipx.value(0.5).update)(tree, tx.init(tree))
    chex.assert_trees_all_equal(updates, expected_updates)
    chex.assert_trees_all_equal(state.stats, expected.stats)
    parts = [np.asarray(x).ravel() for x in jax.tree.leaves(tree)]
    above = sum(int(np.sum((np.abs(x.real) > 0.5) | (np.abs(x.imag) > 0.5))) for x in parts)
    assert float(state.stats.scale) == pytest.approx(above / sum(x.size for x in parts), rel=1e-6)


@pytest.mark.parametrize(
    "shapes",
    [[(1 << 15, 1 << 15)] * 3, [(1 << 16, 1 << 15)], [(1 << 31,), (5,)], [(2, 1 << 31)]],
    ids=["3x2^30", "2^31", "2^31-flat", "2^31-units"],
)
@pytest.mark.parametrize(
    "make", [clipx.value, clipx.block_rms, lambda c: clipx.agc(c)], ids=["value", "block_rms", "agc"]
)
def test_trees_of_more_than_2_31_entries_trace(make, shapes):
    # Traced on abstract arrays only: a count of entries or units must not be an int32.
    tree = {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.bfloat16) for i, shape in enumerate(shapes)}
    tx = make(1.0)
    state = jax.eval_shape(tx.init, tree)
    updates, new_state = jax.eval_shape(tx.update, tree, state, tree)
    assert jax.tree.map(lambda x: x.shape, updates) == jax.tree.map(lambda x: x.shape, tree)
    assert new_state.stats.scale.dtype == jnp.float32


@pytest.mark.parametrize("leaf", ["big", "small"])
def test_value_reports_a_nan_entry(leaf):
    tree = large_tree()
    # inf - inf is the CPU's default NaN, whose sign bit is set: the largest |g| must still be NaN.
    tree[leaf] = tree[leaf].at[2].set(jnp.float32(jnp.inf) - jnp.inf)
    _, state = jax.jit(clipx.value(0.5).update)(tree, clipx.value(0.5).init(tree))
    assert np.isnan(float(state.stats.norm))


def test_value_derivatives_on_large_leaves_are_those_of_the_plain_rule():
    tree = large_tree()
    tree = {k: v.astype(jnp.float32) for k, v in tree.items()}

    def ours(g):
        updates, state = clipx.value(0.5).update(g, clipx.value(0.5).init(g))
        return sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)) + state.stats.norm

    def plain(g):
        updates, _ = optax.clip(0.5).update(g, optax.EmptyState())
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(g)]))
        return sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)) + largest

    chex.assert_trees_all_close(jax.jit(jax.grad(ours))(tree), jax.grad(plain)(tree))


def test_value_largest_entry_in_float64():
    with jax.enable_x64(True):
        tree = {"big": jnp.zeros(_numerics.SMALL_LEAF + 5, jnp.float64).at[7].set(-1e30)}
        _, state = jax.jit(clipx.value(1.0).update)(tree, clipx.value(1.0).init(tree))
        assert float(state.stats.norm) == np.float32(1e30)  # reduced in float64, reported in float32


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tie is made on XLA's CPU backend only")
def test_value_clips_each_large_leaf_after_its_own_statistics():
    # On CPU each large leaf passes through an optimization barrier with its reduction, so the
    # clip (fused into the next transform's kernels) reads it while it is in cache.
    tree = large_tree()
    jaxpr = str(jax.make_jaxpr(clipx.value(0.5).update)(tree, clipx.value(0.5).init(tree)))
    assert jaxpr.count("optimization_barrier") == 2  # "big" and "half", not "small"


def test_global_norm_stats():
    _, state = apply(clipx.global_norm(1.0), {"a": jnp.array([3.0]), "b": jnp.array([4.0])})
    s = state.stats
    assert (float(s.norm), float(s.threshold), bool(s.clipped)) == (5.0, 1.0, True)
    assert float(s.scale) == pytest.approx(0.2)


# --- global_norm of other orders (PyTorch's norm_type) ---------------------------------------------------


def flat(tree):
    """Every entry of ``tree`` in one float64 (complex128) vector."""
    return np.concatenate(
        [
            np.asarray(x).astype(np.complex128 if jnp.iscomplexobj(x) else np.float64).ravel()
            for x in jax.tree.leaves(tree)
        ]
    )


def p_norm_tree(local, complex_=False):
    """A large leaf (reduced alone), 20 small leaves of one shape (reduced in groups) and a vector."""

    def leaf(shape):
        x = local.standard_normal(shape)
        return jnp.asarray(x + 1j * local.standard_normal(shape) if complex_ else x.astype(np.float32))

    return {"big": leaf((200, 100)), "small": [leaf((3, 4)) for _ in range(20)], "vector": leaf((7,))}


ORDERS = [1, 1.5, 2, 3, 10, math.inf]


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("order", ORDERS)
def test_global_norm_of_any_order_matches_numpy(order, complex_):
    grads = p_norm_tree(np.random.default_rng(1), complex_)
    tx = clipx.global_norm(2.0, ord=order)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    g = flat(grads)
    norm = np.linalg.norm(g, ord=order)
    # PyTorch's clip_grad_norm_ takes the norm of the tensors' norms: the same number.
    per_tensor = np.linalg.norm(
        [np.linalg.norm(flat(x), ord=order) for x in jax.tree.leaves(grads)], ord=order
    )
    assert per_tensor == pytest.approx(norm, rel=1e-12)
    assert float(state.stats.norm) == pytest.approx(norm, rel=2e-6)
    np.testing.assert_allclose(flat(updates), g * (2.0 / norm), rtol=3e-6)
    assert np.linalg.norm(flat(updates), ord=order) == pytest.approx(2.0, rel=3e-6)
    assert bool(state.stats.clipped)


@pytest.mark.parametrize("order", [1, math.inf])
def test_global_norm_of_order_1_and_inf_match_optax_tree_norm(order):
    grads = random_tree()
    _, state = apply(clipx.global_norm(1.0, ord=order), grads)
    assert float(state.stats.norm) == pytest.approx(float(optax.tree.norm(grads, ord=order)), rel=1e-6)


@pytest.mark.parametrize("order", [3, 10])
def test_global_norm_of_high_order_does_not_overflow(order):
    # |g|^p passes float32's range (1e60, 1e200) and float16's; relative to the largest entry it does not.
    grads = {"w": jnp.full((1000,), 1e20, jnp.float32), "h": jnp.full((64,), 300.0, jnp.float16)}
    tx = clipx.global_norm(1.0, ord=order)
    updates, state = tx.update(grads, tx.init(grads))
    assert float(state.stats.norm) == pytest.approx(np.linalg.norm(flat(grads), ord=order), rel=1e-6)
    assert updates["h"].dtype == jnp.float16
    assert np.linalg.norm(flat(updates), ord=order) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("order", [1.5, 3, 7.5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_global_norm_of_order_p_with_entries_near_the_largest_float(order, dtype):
    """Before, 1/m was subnormal past m ≈ 8.5e37 and flushed to 0: every ratio 0, the norm m."""
    for values in ([2e38, 2e38], [1e38, 5e37, 5e37], [8e37, 8e37]):
        grads = {"w": jnp.asarray(values, dtype)}
        exact = np.linalg.norm(np.asarray(grads["w"], np.float64), ord=order)
        _, state = apply(clipx.global_norm(1.0, ord=order), grads)
        assert float(state.stats.norm) == pytest.approx(exact, rel=1e-5)


def test_global_norm_of_order_p_mixes_float64_entries_past_float32s_range_with_float32_ones():
    """Before, 1/m of a float64 m past float32's range was cast to float32 as 0 for its leaves."""
    with jax.enable_x64(True):
        grads = {"big": jnp.array([1e39]), "small": jnp.full((1000,), 3e38, jnp.float32)}
        exact = np.linalg.norm(np.concatenate([[1e39], np.full(1000, np.float32(3e38), np.float64)]), ord=3)
        updates, _ = apply(clipx.global_norm(1e39, ord=3), grads)
        assert float(updates["big"][0]) == pytest.approx(1e39 * 1e39 / exact, rel=1e-6)
        assert updates["small"].dtype == jnp.float32
        big = apply(clipx.global_norm(1e306, ord=3), {"w": jnp.array([1e308, 1e308])})[0]["w"]
        np.testing.assert_allclose(big, 1e306 / 2 ** (1 / 3), rtol=1e-9)


@pytest.mark.parametrize("order", [1e10, 1e20, 3e38])
def test_global_norm_of_a_huge_order_is_the_largest_entry(order):
    """Before, |m·(1/m)| rounded to 1 − 2⁻²⁴ had its power underflow to 0: the norm was 0, no clip."""
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.uniform(0.01, 1.0, size=(200, 3)), jnp.float32)
    norms = jax.vmap(lambda g: apply(clipx.global_norm(1e-3, ord=order), {"w": g})[1].stats.norm)(rows)
    # (Σ |g/m|^p)^(1/p) lies in [1, 3^(1/p)]: the norm is the largest entry to float32's precision.
    np.testing.assert_allclose(norms, jnp.max(rows, axis=1), rtol=1e-6)


def _closed_form_derivative(g, weights, threshold, order):
    """d/dg Σ wᵢ·gᵢ·c/‖g‖_p (the clipped update, c < ‖g‖_p), in float64."""
    g = np.asarray(g, np.float64)
    if order == math.inf:
        norm = np.max(np.abs(g))
        d_norm = (np.abs(g) == norm) * np.sign(g)
    else:
        norm = np.sum(np.abs(g) ** order) ** (1 / order)
        d_norm = np.sign(g) * (np.abs(g) / norm) ** (order - 1)
    return threshold * (weights / norm - np.dot(weights, g) * d_norm / norm**2)


@pytest.mark.parametrize("order", [1, 3, 7.5, math.inf])
@pytest.mark.parametrize("magnitude", [1e-27, 1e-20, 1.0, 1e20, 1e30])
def test_derivatives_of_a_clipped_p_norm_hold_at_any_magnitude(order, magnitude):
    """Before, ord=3 was off by 10× at entries of 10⁻²⁰ (the terms of the largest entry m cancel
    only in exact arithmetic) and NaN at 10³⁰, and n⁻² overflowed (−∞ or NaN) for a norm below
    5·10⁻²⁰ and underflowed (a term lost) above 2·10¹⁹. At 10⁻³⁰, orders up to 3 still hold;
    higher ones lose precision to subnormal intermediate products (7·10⁻⁴ at p = 7.5)."""
    g = jnp.array([1.0, -2.0, 3.0], jnp.float32) * magnitude
    weights = np.array([1.0, 2.0, 3.0])

    def weighted_update(g, threshold):
        tx = clipx.global_norm(threshold, ord=order)
        return jnp.sum(jnp.asarray(weights, jnp.float32) * tx.update(g, tx.init(g))[0])

    for threshold in (1e-6 * magnitude, 0.5 * magnitude):
        expected = _closed_form_derivative(g, weights, threshold, order)
        actual = jax.grad(weighted_update)(g, threshold)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6 * np.max(np.abs(expected)))


@pytest.mark.parametrize("order", [1, 3, math.inf])
def test_derivatives_of_a_zero_threshold_on_a_tiny_p_norm_are_zero(order):
    """The update is 0 near g; before, a p-norm below 5·10⁻²⁰ gave NaN derivatives (0·∞)."""
    g = jnp.array([1e-20, 2e-20, 3e-20], jnp.float32)
    tx = clipx.global_norm(0.0, ord=order)
    np.testing.assert_array_equal(jax.grad(lambda g: jnp.sum(tx.update(g, tx.init(g))[0]))(g), np.zeros(3))


@pytest.mark.parametrize("order", [1, 3, math.inf])
@pytest.mark.parametrize("where", ["big", "small"])
def test_global_norm_of_any_order_reports_nan_and_inf(order, where):
    """A NaN entry gives a NaN norm and an infinite one an infinite norm, also in a large leaf,
    whose float maximum XLA's CPU backend computes without the NaN."""
    tx = jax.jit(clipx.global_norm(1.0, ord=order).update)
    for bad, expected in [(np.nan, np.isnan), (np.inf, np.isposinf)]:
        grads = p_norm_tree(np.random.default_rng(2))
        if where == "big":
            grads["big"] = grads["big"].at[1, 2].set(bad)
        else:
            grads["small"][3] = grads["small"][3].at[1, 2].set(bad)
        _, state = tx(grads, clipx.global_norm(1.0, ord=order).init(grads))
        assert expected(float(state.stats.norm)), (bad, float(state.stats.norm))


def test_global_norm_of_order_1_below_its_threshold_is_the_identity_and_counts_float16_in_float32():
    grads = {"w": jnp.full((4096,), 30.0, jnp.float16)}  # Σ|g| = 122880 > float16's 65504
    tx = clipx.global_norm(2e5, ord=1)
    updates, state = tx.update(grads, tx.init(grads))
    assert float(state.stats.norm) == 122880.0
    chex.assert_trees_all_equal(updates, grads)
    assert not bool(state.stats.clipped)


def test_global_norm_order_under_inject_hyperparams():
    grads = random_tree()
    injected = optax.inject_hyperparams(clipx.global_norm, static_args="ord")(max_norm=0.7, ord=math.inf)
    updates, _ = jax.jit(injected.update)(grads, injected.init(grads))
    expected, _ = apply(clipx.global_norm(0.7, ord=math.inf), grads)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)
    with pytest.raises(TypeError, match=r"ord must be a Python number.*static_args"):
        optax.inject_hyperparams(clipx.global_norm)(max_norm=0.7, ord=math.inf).init(grads)


@pytest.mark.parametrize(("factory", "fraction"), [(clipx.tensor_norm, 0.5), (clipx.block_rms, 0.25)])
def test_per_leaf_stats(factory, fraction):
    # norms 5, 0.5, 0, 6 and RMS 3.54, 0.35, 0, 6: at threshold 4, two leaves or one are clipped
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "c": jnp.zeros(2), "d": jnp.array([6.0])}
    _, state = apply(factory(4.0), grads)
    s = state.stats
    assert (float(s.norm), float(s.threshold), bool(s.clipped)) == (6.0, 4.0, True)
    assert float(s.scale) == pytest.approx(fraction)


@pytest.mark.parametrize("factory", [clipx.value, clipx.global_norm, clipx.tensor_norm, clipx.block_rms])
def test_init_stats_and_state_is_arrays_only(factory):
    state = factory(1.0).init({"a": jnp.ones(2)})
    assert type(state).stats_name
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    assert not bool(state.stats.clipped)


# --- jit and no jit --------------------------------------------------------------------------------------

FACTORIES = {
    "value": clipx.value,
    "global_norm": clipx.global_norm,
    "tensor_norm": clipx.tensor_norm,
    "block_rms": clipx.block_rms,
    "global_norm_ord1": lambda max_norm: clipx.global_norm(max_norm, ord=1),
    "global_norm_ord3": lambda max_norm: clipx.global_norm(max_norm, ord=3),
    "global_norm_inf": lambda max_norm: clipx.global_norm(max_norm, ord=math.inf),
}


class VariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*FACTORIES.items())
    def test_jit_matches_eager(self, factory):
        grads = random_tree()
        tx = factory(0.7)
        state = tx.init(grads)
        updates, new_state = self.variant(tx.update)(grads, state)
        expected, expected_state = tx.update(grads, state)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)
        chex.assert_trees_all_close(new_state, expected_state, rtol=1e-6)
        chex.assert_trees_all_equal_structs(new_state, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
        chex.assert_tree_all_finite(updates)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*FACTORIES.items())
    def test_array_threshold_for_inject_hyperparams(self, factory):
        grads = random_tree()
        tx = optax.inject_hyperparams(factory)(0.7)
        updates, _ = self.variant(tx.update)(grads, tx.init(grads))
        expected, _ = factory(0.7).update(grads, factory(0.7).init(grads))
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)


# --- properties ------------------------------------------------------------------------------------------

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
# few distinct shapes, so eager kernels compile once and the examples stay cheap
shapes = st.sampled_from([(), (3,), (1, 4), (2, 3), (2, 2, 3)])


@st.composite
def trees(draw, dtypes=DTYPES):
    """A dict of 1-4 leaves of small random shapes and float dtypes, at a random magnitude."""
    count = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = 10.0 ** draw(st.floats(-2, 2))
    local = np.random.default_rng(seed)
    return {
        f"p{i}": jnp.asarray(magnitude * local.standard_normal(draw(shapes)), draw(st.sampled_from(dtypes)))
        for i in range(count)
    }


# 0, or large enough that a clipped float16 leaf is not pushed into subnormal precision
thresholds = st.one_of(st.just(0.0), st.floats(1e-3, 10.0))


def tolerance(tree):
    return max(float(jnp.finfo(leaf.dtype).eps) for leaf in jax.tree.leaves(tree))


def check_properties(name, grads, threshold):
    tx = FACTORIES[name](threshold)
    once, state = apply(tx, grads)
    twice, _ = apply(tx, once)
    tol = tolerance(grads)
    chex.assert_trees_all_equal_shapes_and_dtypes(once, grads)
    chex.assert_tree_all_finite(once)
    g32, o32 = (jax.tree.map(lambda x: np.asarray(x, np.float64), t) for t in (grads, once))
    if name == "value":
        for g, o, leaf in zip(g32.values(), o32.values(), grads.values(), strict=True):
            bound = float(jnp.asarray(threshold, leaf.dtype))
            assert np.all(np.abs(o) <= bound)
            np.testing.assert_array_equal(o[np.abs(g) <= bound], g[np.abs(g) <= bound])
            assert np.all(o * g >= 0)  # no sign flips
    else:
        measure = {
            "global_norm": lambda t: [_numerics.tree_norm(t)],
            "global_norm_ord1": lambda t: [np.linalg.norm(flat(t), ord=1)],
            "global_norm_ord3": lambda t: [np.linalg.norm(flat(t), ord=3)],
            "global_norm_inf": lambda t: [np.linalg.norm(flat(t), ord=math.inf)],
            "tensor_norm": lambda t: [np.sqrt(q) for q in _numerics.leaf_squared_norms(jax.tree.leaves(t))],
            "block_rms": lambda t: [
                np.sqrt(q / max(x.size, 1))
                for x, q in zip(
                    jax.tree.leaves(t), _numerics.leaf_squared_norms(jax.tree.leaves(t)), strict=True
                )
            ],
        }[name]
        before = measure(grads)
        after = measure(once)
        for b, a in zip(before, after, strict=True):
            assert float(a) <= threshold * (1 + 2 * tol) + 1e-30
            if float(b) <= threshold:
                assert float(a) == float(b)
        # direction preserved: every leaf is a non-negative multiple (at most 1) of itself
        for g, o in zip(g32.values(), o32.values(), strict=True):
            gn, on = np.linalg.norm(g), np.linalg.norm(o)
            if gn > 0 and on > 0:
                assert np.dot(g.ravel(), o.ravel()) / (gn * on) == pytest.approx(1.0, abs=4 * tol)
            assert on <= gn * (1 + tol)
    if not bool(state.stats.clipped):
        chex.assert_trees_all_equal(once, grads)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), twice),
        jax.tree.map(lambda x: x.astype(jnp.float32), once),
        rtol=4 * tol,
        atol=1e-6,
    )


@hypothesis.given(name=st.sampled_from(sorted(FACTORIES)), grads=trees(), threshold=thresholds)
def test_properties(name, grads, threshold):
    check_properties(name, grads, threshold)


@hypothesis.settings(max_examples=6)
@hypothesis.given(name=st.sampled_from(sorted(FACTORIES)), data=st.data(), threshold=thresholds)
def test_properties_float64(name, data, threshold):
    with jax.enable_x64(True):
        grads = data.draw(trees(dtypes=[jnp.float64]))
        assert all(leaf.dtype == jnp.float64 for leaf in grads.values())
        check_properties(name, grads, threshold)


def test_value_takes_python_ints_past_int32():
    updates, state = clipx.value(2**31).update(jnp.array([3.0, -1e10]), clipx.value(2**31).init(None))
    np.testing.assert_array_equal(updates, [3.0, -(2.0**31)])
    assert float(state.stats.threshold) == 2.0**31


@pytest.mark.parametrize(
    ("make", "threshold"), [(clipx.tensor_norm, 1e20), (clipx.block_rms, 5e19)], ids=["tensor", "rms"]
)
def test_an_overflowing_measure_is_clipped_whatever_the_threshold(make, threshold):
    # ‖[1e20, 1e20]‖² overflows float32, and so does the threshold's square: the measure is
    # still above it, scaled to zero as global_norm and Optax do. (Not so for an array
    # threshold, as clip_scale_of_square documents: the test would cost every kernel.)
    grads = {"w": jnp.array([1e20, 1e20], jnp.float32)}
    tx = make(threshold)
    updates, state = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
    assert bool(state.stats.clipped)
    expected, _ = clipx.global_norm(1e20).update(grads, clipx.global_norm(1e20).init(grads))
    np.testing.assert_array_equal(updates["w"], expected["w"])
    small = {"w": jnp.array([1e15, 1e15], jnp.float32)}
    chex.assert_trees_all_equal(tx.update(small, tx.init(grads))[0], small)  # below it: untouched


@pytest.mark.parametrize(
    ("factory", "at_threshold"),
    [(clipx.tensor_norm, jnp.array([3.0, 4.0])), (clipx.block_rms, jnp.array([5.0, 5.0]))],
    ids=["tensor_norm", "block_rms"],
)
def test_a_leaf_exactly_at_the_threshold_is_not_counted_as_clipped(factory, at_threshold):
    """Norm (or RMS) 5 at threshold 5 passes unchanged, and the statistics count it as such."""
    grads = {"at": at_threshold, "above": 2 * at_threshold}
    updates, state = apply(factory(5.0), grads)
    chex.assert_trees_all_equal(updates["at"], at_threshold)
    assert (float(state.stats.scale), bool(state.stats.clipped)) == (0.5, True)
    _, state = apply(factory(5.0), {"at": at_threshold})
    assert (float(state.stats.scale), bool(state.stats.clipped)) == (0.0, False)
