"""Safe numerics: float16/bfloat16 norms, zeros, empty trees, meta-gradients, float64, the helpers."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx
from clipx import _numerics

FACTORIES = {
    "value": clipx.value,
    "global_norm": clipx.global_norm,
    "tensor_norm": clipx.tensor_norm,
    "block_rms": clipx.block_rms,
    "agc": clipx.agc,
    "global_norm_ord1": lambda max_norm: clipx.global_norm(max_norm, ord=1),
    "global_norm_ord3": lambda max_norm: clipx.global_norm(max_norm, ord=3),
    "global_norm_inf": lambda max_norm: clipx.global_norm(max_norm, ord=math.inf),
}


def apply(name, threshold, grads, params=None):
    """One update of the named transform (AGC gets parameters of ones shaped like ``grads``)."""
    tx = FACTORIES[name](threshold)
    if params is None:
        params = jax.tree.map(jnp.ones_like, grads)
    return tx.update(grads, tx.init(params), params)


def test_float16_norm_overflows_in_optax_not_in_clipx():
    grads = {"w": jnp.full((64,), 300.0, jnp.float16)}  # Σ g² = 5.76e6 > float16 max 65504
    assert not np.isfinite(float(optax.tree.norm(grads)))
    assert float(_numerics.tree_norm(grads)) == pytest.approx(2400.0, rel=1e-6)
    updates, state = apply("global_norm", 1.0, grads)
    assert float(state.stats.norm) == pytest.approx(2400.0, rel=1e-6)
    assert updates["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), 1 / 8, rtol=1e-3)
    tensor, _ = apply("tensor_norm", 1.0, grads)
    chex.assert_trees_all_equal(tensor, updates)
    rms, state = apply("block_rms", 1.0, grads)
    assert float(state.stats.norm) == pytest.approx(300.0)
    np.testing.assert_allclose(np.asarray(rms["w"], np.float32), 1.0)


def test_float16_overflow_in_optax_agc_and_block_rms():
    grads = {"w": jnp.full((8, 8), 300.0, jnp.float16)}
    params = {"w": jnp.full((8, 8), 1.0, jnp.float16)}
    ours, _ = apply("agc", 0.01, grads, params)
    chex.assert_tree_all_finite(ours)
    column_norms = np.linalg.norm(np.asarray(ours["w"], np.float32), axis=0)
    np.testing.assert_allclose(column_norms, 0.01 * np.sqrt(8), rtol=2e-3)
    theirs, _ = optax.clip_by_block_rms(1.0).update(grads, optax.EmptyState())
    assert not np.allclose(np.asarray(theirs["w"], np.float32), 1.0)  # rms(g) overflowed: g / inf = 0


def test_bfloat16_norm_is_accurate():
    values = np.random.default_rng(0).uniform(100, 500, 4096).astype(np.float32)
    grads = {"w": jnp.asarray(values, jnp.bfloat16)}
    exact = np.linalg.norm(np.asarray(grads["w"], np.float64))
    assert float(_numerics.tree_norm(grads)) == pytest.approx(exact, rel=1e-6)
    updates, _ = apply("global_norm", 1.0, grads)
    assert updates["w"].dtype == jnp.bfloat16
    assert float(_numerics.tree_norm(updates)) == pytest.approx(1.0, rel=1e-2)


GLOBAL_RULES = {
    "global_norm": lambda: clipx.global_norm(1.0),
    "adaptive": lambda: clipx.adaptive(warmup_steps=1),
    "autoclip": lambda: clipx.autoclip(),
    "zclip": lambda: clipx.zclip(warmup_steps=2),
    "quantile_clip": lambda: clipx.quantile_clip(initial_threshold=1.0),
}
TENSOR_RULES = {
    "tensor_norm": lambda: clipx.tensor_norm(1.0),
    "block_rms": lambda: clipx.block_rms(1.0),
    "agc": lambda: clipx.agc(0.01),
    "autoclip_per_tensor": lambda: clipx.autoclip(per_tensor=True),
    "adagc": lambda: clipx.adagc(warmup_steps=2),
}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", sorted(GLOBAL_RULES) + sorted(TENSOR_RULES))
def test_a_non_finite_tensor_is_left_or_zeroed_and_only_per_tensor_rules_clip_the_others(name, bad):
    # As docs/clippers.md says: a NaN norm leaves the finite entries it measures unscaled, an
    # infinite one zeroes them; a global rule measures the whole update, a per-tensor rule one tensor.
    tx = {**GLOBAL_RULES, **TENSOR_RULES}[name]()
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(4):  # past every warm-up, with norms of 0.5 per tensor
        _, state = tx.update({"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.3, 0.4])}, state, params)
    grads = {"a": jnp.array([bad, 3.0]), "b": jnp.array([40.0, 50.0])}
    updates, state = tx.update(grads, state, params)
    assert np.isnan(float(updates["a"][0]))
    assert float(updates["a"][1]) == (3.0 if np.isnan(bad) else 0.0)
    b_clipped = float(jnp.linalg.norm(updates["b"])) < 0.5 * float(jnp.linalg.norm(grads["b"]))
    assert b_clipped is (name in TENSOR_RULES or not np.isnan(bad))  # an infinite global norm zeroes b
    if name in GLOBAL_RULES and np.isnan(bad):
        np.testing.assert_array_equal(updates["b"], grads["b"])
        assert np.isnan(float(state.stats.norm)) and not bool(state.stats.clipped)


ZERO_CASES = {
    "zero": {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))},
    "zero_leaf": {"a": jnp.zeros(3), "b": jnp.ones((2, 2))},
    "empty_dict": {},
    "none_leaves": {"a": None, "b": jnp.zeros(2)},
    "only_none": {"a": None},
    "size_zero_leaf": {"a": jnp.zeros((0,)), "b": jnp.ones(2)},
}


@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("case", sorted(ZERO_CASES))
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_zeros_and_empty_trees_never_nan(name, case, threshold):
    grads = ZERO_CASES[case]
    updates, state = apply(name, threshold, grads)
    chex.assert_trees_all_equal_structs(updates, grads)
    chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(state)
    if threshold == 0.0:
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("scale", [0.0, 0.5, 50.0])
def test_meta_gradients_are_finite(name, scale):
    grads = {"a": jnp.array([3.0, -4.0]) * scale, "b": jnp.array([[1.0, 2.0]]) * scale}
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.5, -0.5]])}

    def outcome(g, threshold):
        tx = FACTORIES[name](threshold)
        updates, state = tx.update(g, tx.init(params), params)
        return sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)) + state.stats.norm

    d_grads, d_threshold = jax.grad(outcome, argnums=(0, 1))(grads, jnp.float32(1.0))
    chex.assert_tree_all_finite((d_grads, d_threshold))
    d_zero = jax.grad(outcome, argnums=1)(grads, jnp.float32(0.0))
    chex.assert_tree_all_finite(d_zero)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_derivatives_ignore_a_zero_size_leaf(name):
    grads = {"a": jnp.array([3.0, -0.2]), "b": jnp.array([[1.0, 2.0]])}

    def outcome(g):
        updates, state = apply(name, 0.5, g)
        return sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)) + state.stats.norm

    with_empty = jax.grad(outcome)({**grads, "empty": jnp.zeros((0, 3))})
    chex.assert_trees_all_close({k: with_empty[k] for k in grads}, jax.grad(outcome)(grads))
    assert with_empty["empty"].shape == (0, 3)


ADAPTIVE_HYPERPARAMETERS = {
    "autoclip": lambda q: clipx.autoclip(quantile=q),
    "autoclip_per_tensor": lambda q: clipx.autoclip(quantile=q, per_tensor=True),
    "zclip": lambda z: clipx.zclip(z_thresh=z, warmup_steps=2),
    "adagc": lambda r: clipx.adagc(relative_threshold=r, warmup_steps=2),
    "quantile_clip": lambda q: clipx.quantile_clip(target_quantile=q),
    "adaptive": lambda k: clipx.adaptive(num_stds=k, warmup_steps=2),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE_HYPERPARAMETERS))
def test_meta_gradients_of_adaptive_rules_are_finite_from_the_first_step(name):
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.5, -0.5]])}
    sequence = [jax.tree.map(lambda p, s=s: s * (p + 1.0), params) for s in (1.0, 2.0, 0.5, 8.0, 1.5)]

    def outcome(hyperparameter, steps):
        tx = ADAPTIVE_HYPERPARAMETERS[name](hyperparameter)
        state, total = tx.init(params), 0.0
        for g in sequence[:steps]:
            updates, state = tx.update(g, state, params)
            total = total + sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))
        return total

    value = 0.5 if name in ("autoclip", "autoclip_per_tensor", "quantile_clip") else 2.0
    for steps in (1, 5):
        chex.assert_tree_all_finite(jax.grad(outcome)(jnp.float32(value), steps))


ADAPTIVE_RULES = {
    "autoclip": lambda: clipx.autoclip(),
    "autoclip_per_tensor": lambda: clipx.autoclip(per_tensor=True),
    "zclip": lambda: clipx.zclip(warmup_steps=2),
    "zclip_eps_0": lambda: clipx.zclip(warmup_steps=2, eps=0.0),
    "adagc": lambda: clipx.adagc(warmup_steps=2),
    "quantile_clip": lambda: clipx.quantile_clip(),
    "adaptive": lambda: clipx.adaptive(warmup_steps=2),
    "adaptive_without_direction": lambda: clipx.adaptive(warmup_steps=2, direction_rate=None),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE_RULES))
def test_derivatives_of_adaptive_rules_with_respect_to_the_gradients_are_finite(name):
    # After one observation the running variance is exactly 0: a square root or a division there
    # must not put inf · 0 = NaN into the derivatives.
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.5, -0.5]])}
    factors = (1.0, 2.0, 2.0, 0.5, 8.0)

    def outcome(size, steps):
        tx = ADAPTIVE_RULES[name]()
        state, total = tx.init(params), 0.0
        for factor in factors[:steps]:
            updates, state = tx.update(
                jax.tree.map(lambda p, f=factor: size * f * (p + 1.0), params), state, params
            )
            total = total + sum(jnp.sum(u**2) for u in jax.tree.leaves(updates))
        return total

    for steps in range(1, len(factors) + 1):
        chex.assert_tree_all_finite(jax.grad(outcome)(jnp.float32(1.0), steps))


@pytest.mark.parametrize("name", ["global_norm", "tensor_norm"])
@pytest.mark.parametrize("as_array", [False, True], ids=["python-threshold", "array-threshold"])
def test_derivative_at_the_threshold_is_the_unclipped_sides(name, as_array):
    # ‖g‖ = 5 exactly: one derivative, whatever the type of the threshold or the rule.
    grads, weights = jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0])
    threshold = jnp.asarray(5.0) if as_array else 5.0

    def weighted(g):
        return jnp.sum(apply(name, threshold, g)[0] * weights)

    np.testing.assert_array_equal(jax.grad(weighted)(grads), weights)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_below_threshold_is_bit_identical(name, dtype):
    grads = {"a": jnp.array([0.1, -0.2, 0.3], dtype), "b": jnp.array([[1e-3, 0.0]], dtype)}
    params = jax.tree.map(lambda g: jnp.full(g.shape, 100.0, dtype), grads)
    updates, state = apply(name, 10.0, grads, params)
    assert not bool(state.stats.clipped)
    chex.assert_trees_all_equal(updates, grads)
    chex.assert_trees_all_equal_dtypes(updates, grads)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_below_threshold_is_bit_identical_under_jit_whatever_the_threshold(name):
    """Before, XLA turned t/√max(m², t²) into t·rsqrt(…), not exactly 1 at m ≤ t: under jit,
    tensor_norm and block_rms moved unclipped entries by an ulp for about a third of thresholds."""
    grads = {"w": jnp.array([1e-6, 1.0, -0.5, 0.3]), "b": jnp.array([[0.7, -0.1]])}
    params = jax.tree.map(lambda g: jnp.full(g.shape, 1e6), grads)
    thresholds = np.random.default_rng(0).uniform(2.0, 1e6, size=12).tolist()
    for threshold in [*thresholds, 269786.7210660032]:
        tx = FACTORIES[name](threshold)
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert not bool(state.stats.clipped)
        chex.assert_trees_all_equal(updates, grads)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_complex_below_threshold_is_bit_identical(name):
    # A complex product by (1 + 0i) would turn -0 - 1i into +0 - 1i: each part is scaled alone.
    grads = {"z": jnp.array([[complex(-0.0, -1.0), complex(0.5, -0.0)]], jnp.complex64)}
    params = {"z": jnp.full((1, 2), 100.0, jnp.complex64)}
    updates, state = apply(name, 10.0, grads, params)
    assert not bool(state.stats.clipped)
    np.testing.assert_array_equal(np.signbit(updates["z"].real), np.signbit(grads["z"].real))
    np.testing.assert_array_equal(np.signbit(updates["z"].imag), np.signbit(grads["z"].imag))
    chex.assert_trees_all_equal(updates, grads)


@pytest.mark.parametrize("name", ["global_norm", "tensor_norm", "block_rms"])
def test_complex_infinite_part_passes_an_infinite_threshold(name):
    grads = {"z": jnp.array([complex(1.0, np.inf)], jnp.complex64)}
    updates, _ = apply(name, np.inf, grads)
    assert complex(updates["z"][0]) == complex(1.0, np.inf)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_float64_under_x64(name):
    with jax.enable_x64(True):
        grads = {"a": jnp.array([3.0, 4.0e-9], jnp.float64), "b": jnp.array([[12.0]], jnp.float64)}
        updates, state = apply(name, 1e-3, grads)
        assert updates["a"].dtype == jnp.float64
        # Statistics are reported in float32 whatever the gradients: the state keeps the types
        # init gave it, as lax.cond and scan (MultiSteps, the guards) require.
        init_state = FACTORIES[name](1e-3).init(jax.tree.map(jnp.ones_like, grads))
        chex.assert_trees_all_equal_dtypes(state, init_state)
        assert state.stats.norm.dtype == jnp.float32
        chex.assert_tree_all_finite(updates)
        if name == "global_norm":
            norm = np.sqrt(9.0 + 16e-18 + 144.0)
            expected = {k: np.asarray(v) * (1e-3 / norm) for k, v in grads.items()}
            chex.assert_trees_all_close(updates, expected, rtol=1e-14)
            assert float(state.stats.norm) == pytest.approx(norm, rel=1e-7)
    assert jnp.ones(()).dtype == jnp.float32  # x64 is off again


def test_helpers():
    tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[2.0, 2.0], [2.0, 2.0]]), "c": None}
    assert float(_numerics.tree_norm(tree)) == pytest.approx(np.sqrt(41.0))
    chex.assert_trees_all_close(_numerics.leaf_norms(tree), {"a": 5.0, "b": 4.0, "c": None})
    leaves = jax.tree.leaves(tree)
    np.testing.assert_allclose(_numerics.leaf_squared_norms(leaves), [25.0, 16.0], rtol=1e-7)
    assert _numerics.leaf_squared_norms([]) == []
    for threshold in (0.0, 1.0, 3.0, np.inf):
        for norm in (0.0, 0.5, 1.0, 2.0, 1e15, np.inf):
            expected = float(_numerics.clip_scale(jnp.float32(norm), threshold))
            squared = jnp.float32(norm) ** 2
            assert float(_numerics.clip_scale_of_square(squared, threshold)) == pytest.approx(
                expected, rel=1e-6
            )
    assert float(_numerics.tree_norm({})) == 0.0
    assert float(_numerics.clip_scale(jnp.float32(0.0), 0.0)) == 1.0
    assert float(_numerics.clip_scale(jnp.float32(2.0), 0.0)) == 0.0
    assert float(_numerics.clip_scale(jnp.float32(np.inf), 1.0)) == 0.0
    assert float(_numerics.clip_scale(jnp.float32(4.0), 1.0)) == 0.25
    assert float(jax.grad(_numerics.safe_sqrt)(0.0)) == 0.0
    assert _numerics.scale_leaf(jnp.ones(2, jnp.bfloat16), jnp.float32(0.5)).dtype == jnp.bfloat16


@pytest.mark.parametrize("threshold", [0.1, 0.3, 1 / 3, 1.0, 7.7, 1e-15, 1e15])
def test_clip_scale_of_square_with_a_known_threshold(threshold):
    """A Python threshold agrees with an array one, and the scale is exactly 1 at and below it."""
    t = jnp.float32(threshold)
    squared = jnp.array([0.0, 0.25, 1.0, 4.0, 1e30, np.inf], jnp.float32) * jnp.square(t)
    squared = jnp.concatenate([squared, jnp.array([jnp.square(t), jnp.nextafter(jnp.square(t), np.inf)])])
    known = _numerics.clip_scale_of_square(squared, threshold)
    traced = jax.jit(_numerics.clip_scale_of_square)(squared, jnp.float32(threshold))
    np.testing.assert_allclose(known, traced, rtol=1e-6)
    below = np.asarray(squared <= jnp.square(t))
    np.testing.assert_array_equal(np.asarray(known)[below], 1.0)  # exactly 1, not 1 ± an ulp
    assert np.all(np.asarray(known) <= 1)
    assert np.all(np.asarray(known)[np.asarray(squared >= 4 * jnp.square(t))] < 1)
    derivative = jax.vmap(jax.grad(lambda q: _numerics.clip_scale_of_square(q, threshold)))(squared)
    chex.assert_tree_all_finite(derivative)


@pytest.mark.parametrize("threshold", [0.0, 1e-25, 1e25, np.inf])
def test_clip_scale_of_square_with_a_threshold_whose_square_is_not_normal(threshold):
    """Thresholds whose square underflows or overflows take the guarded form, like array ones."""
    squared = jnp.array([0.0, 1e-45, 1.0, 1e30, np.inf], jnp.float32)
    known = _numerics.clip_scale_of_square(squared, threshold)
    traced = jax.jit(_numerics.clip_scale_of_square)(squared, jnp.float32(threshold))
    if threshold == 1e25:  # t² overflows: a Python t still scales an overflowed measure to 0
        assert (float(known[-1]), float(traced[-1])) == (0.0, 1.0)  # an array t does not (documented)
        known, traced = known[:-1], traced[:-1]
    np.testing.assert_array_equal(known, traced)


def _many_leaves():
    """More same-shaped small leaves than one group takes, mixed dtypes, a large leaf, masked leaves."""
    rng = np.random.default_rng(0)
    tree = {f"w{i:02d}": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for i in range(37)}
    tree |= {f"h{i}": jnp.asarray(300 * rng.normal(size=(3, 5)), jnp.float16) for i in range(3)}
    tree |= {f"b{i}": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16) for i in range(18)}
    tree["z"] = jnp.asarray(rng.normal(size=(4,)) + 1j * rng.normal(size=(4,)), jnp.complex64)
    tree["big"] = jnp.asarray(rng.normal(size=(_numerics.SMALL_LEAF + 3,)), jnp.float32)
    tree["masked"], tree["none"] = optax.MaskedNode(), None
    return tree


def test_many_small_leaves_are_grouped_without_changing_the_result():
    tree = _many_leaves()
    leaves = jax.tree.leaves(tree)
    assert len(leaves) > 3 * _numerics._LEAVES_PER_REDUCTION
    exact = [float(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2)) for x in leaves]
    np.testing.assert_allclose(_numerics.leaf_squared_norms(leaves), exact, rtol=1e-5)
    np.testing.assert_allclose(_numerics.tree_sum_of_squares(tree), sum(exact), rtol=1e-6)
    assert _numerics.tree_sum_of_squares(tree).dtype == jnp.float32  # float16 entries of 300² do not overflow
    # value's statistics combine the groups' entries element-wise: the largest part and the count clipped.
    entries = [np.asarray(x, np.complex128).ravel() for x in leaves]
    parts = np.concatenate([np.concatenate([e.real, e.imag]) for e in entries])
    state = clipx.value(0.5).update(tree, clipx.value(0.5).init(tree))[1]
    assert float(state.stats.norm) == pytest.approx(np.max(np.abs(parts)), rel=1e-6)
    clipped = sum(np.sum((np.abs(e.real) > 0.5) | (np.abs(e.imag) > 0.5)) for e in entries)
    assert float(state.stats.scale) == pytest.approx(clipped / sum(e.size for e in entries), rel=1e-6)
    # Derivatives of the grouped sums are those of the plain ones, leaf by leaf.
    real = {k: v for k, v in tree.items() if k.startswith("w") or k == "big"}
    plain = lambda t: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))  # noqa: E731
    per_leaf = lambda t: sum(_numerics.leaf_squared_norms(jax.tree.leaves(t)))  # noqa: E731
    for grouped in (_numerics.tree_sum_of_squares, per_leaf):
        chex.assert_trees_all_close(jax.grad(grouped)(real), jax.grad(plain)(real), rtol=1e-6)


def test_many_small_leaves_match_optax():
    tree = {k: v for k, v in _many_leaves().items() if k != "z"}  # optax rejects complex leaves in clip
    as32 = jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    for ours, theirs in [
        (clipx.global_norm(10.0), optax.clip_by_global_norm(10.0)),
        (clipx.value(0.5), optax.clip(0.5)),
        (clipx.block_rms(0.8), optax.clip_by_block_rms(0.8)),
    ]:
        expected, _ = theirs.update(as32, theirs.init(as32))
        got, _ = ours.update(as32, ours.init(as32))
        chex.assert_trees_all_close(got, expected, rtol=2e-6)


def test_jit_when_traced_traces_once_per_shape_and_runs_eagerly_op_by_op():
    seen = []

    def double(x):
        seen.append(isinstance(x, jax.core.Tracer))
        return 2 * x

    helper = _numerics.jit_when_traced(double)
    np.testing.assert_array_equal(helper(jnp.ones(3)), 2.0)
    assert seen == [False]  # concrete arrays: no jit, so an eager update compiles nothing new per step
    step = jax.jit(lambda a, b, c: helper(a) + helper(b) + helper(c))
    np.testing.assert_array_equal(step(jnp.ones(3), jnp.ones(3), jnp.ones(3)), 6.0)
    assert seen == [False, True]  # three calls on one shape inside a trace: traced once


TRACED_ONCE_PER_SHAPE = {
    "value": lambda: clipx.value(1.0),
    "global_norm": lambda: clipx.global_norm(1.0),
    "tensor_norm": lambda: clipx.tensor_norm(1.0),
    "block_rms": lambda: clipx.block_rms(1.0),
    "agc": lambda: clipx.agc(0.01),
    "adaptive": clipx.adaptive,
    "autoclip": clipx.autoclip,
    "zclip": clipx.zclip,
    "quantile_clip": clipx.quantile_clip,
    "adagc": clipx.adagc,
}


@pytest.mark.parametrize("name", sorted(TRACED_ONCE_PER_SHAPE))
def test_per_leaf_work_is_traced_once_per_leaf_shape(name):
    # Trace and lowering time grow with the equations of the traced step: per-leaf work is a
    # jitted function (one equation per leaf, traced once per shape), groups of small leaves
    # one equation per group. Tracing each leaf's operations inline took 205 (global_norm)
    # to 1769 (adagc) equations for these 64 leaves.
    leaves = 64
    tree = {f"w{i:03d}": jnp.ones((4, 5)) for i in range(leaves)}
    tx = TRACED_ONCE_PER_SHAPE[name]()
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree)
    assert len(jaxpr.jaxpr.eqns) <= 2 * leaves + 40


def test_axis_name_reduces_over_devices():
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    grads = {"a": jnp.arange(8.0) - 3.5, "b": jnp.arange(4.0)}
    spec = jax.sharding.PartitionSpec("d")

    for name in ("value", "block_rms"):  # pmax, and psum of entry counts
        tx = FACTORIES[name](1.0, axis_name="d")
        state = tx.init(grads)
        sharded = jax.shard_map(
            lambda g, tx=tx, state=state: tx.update(g, state),
            mesh=mesh,
            in_specs=(spec,),
            out_specs=(spec, jax.sharding.PartitionSpec()),
        )
        updates, new_state = sharded(grads)
        expected, expected_state = FACTORIES[name](1.0).update(grads, state)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)
        chex.assert_trees_all_close(new_state, expected_state, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_largest_by_bits_keeps_nan_whatever_its_sign(dtype):
    # MAX_NONNEGATIVE reduces bit patterns as integers; inf - inf is the CPU's default NaN,
    # whose sign bit is set, so a NaN read as a negative integer must not be lost.
    values = jnp.array([0.5, 2.0, 0.0], dtype)
    largest_and_count = (_numerics.MAX_NONNEGATIVE, _numerics.SUM)
    dtypes = (jnp.float32, jnp.int32)

    def largest_and_above(x):
        return x, (x > 1).astype(jnp.int32)

    for nan in (jnp.asarray(jnp.inf, dtype) - jnp.inf, jnp.asarray(jnp.nan, dtype)):
        with_nan = values.at[1].set(nan)
        largest, count = _numerics.tree_reductions(
            [with_nan, values], largest_and_above, largest_and_count, dtypes
        )
        assert np.isnan(float(largest)) and int(count) == 1
    largest, _ = _numerics.tree_reductions([values], largest_and_above, largest_and_count, dtypes)
    assert float(largest) == 2.0


_REAL_BAD = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize(
    "dtype, bad",
    [(dtype, bad) for dtype in (jnp.float16, jnp.bfloat16, jnp.float32) for bad in _REAL_BAD]
    + [(jnp.complex64, bad) for bad in [*_REAL_BAD, complex(0, np.inf), complex(np.nan, 0)]],
)
def test_tree_all_finite_finds_one_bad_entry_in_any_leaf(dtype, bad):
    """One NaN or ±∞ anywhere (small leaves grouped by shape, a large leaf alone) makes it False."""
    largest = float(jnp.finfo(jnp.dtype(dtype).type(0).real.dtype).max)  # finite, however large
    shapes = [(7,), (7,), (7,), (3, 5), (129, 130), ()]
    tree = [jnp.full(shape, largest, dtype) for shape in shapes]
    assert bool(_numerics.tree_all_finite(tree))
    assert bool(jax.jit(_numerics.tree_all_finite)(tree))
    for leaf, shape in enumerate(shapes):
        index = tuple(s - 1 for s in shape)
        spoiled = list(tree)
        spoiled[leaf] = tree[leaf].at[index].set(bad)
        assert not bool(_numerics.tree_all_finite(spoiled)), (leaf, shape)
        assert not bool(jax.jit(_numerics.tree_all_finite)(spoiled)), (leaf, shape)


def test_tree_all_finite_of_an_empty_tree_and_float64():
    assert bool(_numerics.tree_all_finite([]))
    with jax.enable_x64(True):
        huge = jnp.full(3, 1e300, jnp.float64)  # finite in float64, ∞ in float32
        assert bool(_numerics.tree_all_finite([huge, jnp.ones(2, jnp.float32)]))
        assert not bool(_numerics.tree_all_finite([huge.at[0].set(np.inf)]))


@pytest.mark.parametrize(
    ("shape", "leading"),
    [((7, 9000), 1), ((2, 3, 8200), 2), ((1, 9000), 1), ((6, 8192), 1), ((5, 9000, 2), 2), ((4, 3, 3000), 1)],
    ids=str,
)
def test_sums_over_the_leading_axes_of_long_rows_are_the_plain_sums(shape, leading):
    # On the CPU a sum over leading axes that leaves over 8192 entries is a matrix-vector product.
    x = np.random.default_rng(0).standard_normal(shape)
    leading = tuple(range(leading))
    kept = shape[len(leading) :]
    for keepdims in (False, True):
        expected = np.sum(x, axis=leading, keepdims=keepdims)
        for fn in (_numerics.sum_over, jax.jit(_numerics.sum_over, static_argnums=(1, 2))):
            got = fn(jnp.asarray(x, jnp.float32), leading, keepdims)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        squares = _numerics.sum_of_squares(jnp.asarray(x, jnp.float16), leading, keepdims)
        assert squares.dtype == jnp.float32  # accumulated in float32
        np.testing.assert_allclose(
            squares, np.sum(np.float16(x).astype(np.float64) ** 2, leading, keepdims=keepdims), rtol=1e-4
        )
    weights = np.arange(np.prod(kept), dtype=np.float32).reshape(kept)
    gradient = jax.grad(lambda y: jnp.vdot(weights, _numerics.sum_over(y, leading)))
    np.testing.assert_array_equal(gradient(jnp.asarray(x, jnp.float32)), np.broadcast_to(weights, shape))


@pytest.mark.parametrize("size", [0, 5, 10_000])
def test_max_nonnegative_keeps_nan_in_long_arrays(size):
    # XLA's CPU backend drops NaN from a float maximum over a few thousand entries.
    x = jnp.linspace(0.0, 2.0, size, dtype=jnp.float32)
    assert float(_numerics.max_nonnegative(x)) == (2.0 if size else 0.0)
    if size:
        assert np.isnan(float(jax.jit(_numerics.max_nonnegative)(x.at[size // 3].set(jnp.nan))))
        weights = jax.grad(_numerics.max_nonnegative)(x)
        np.testing.assert_array_equal(weights, jax.grad(jnp.max)(x))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_half_precision_leaf_is_scaled_by_the_unrounded_factor(dtype):
    """global_norm's factor c/‖g‖ multiplies the leaf in float32, and the product is rounded once:
    a factor rounded to the leaf's dtype first gives other entries."""
    g = jnp.arange(1, 65, dtype=jnp.float32).astype(dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    updates, _ = clipx.global_norm(1.0).update({"g": g}, clipx.global_norm(1.0).init({"g": g}))
    rounded_once = (g.astype(jnp.float32) * (1.0 / norm)).astype(dtype)
    rounded_twice = g * (1.0 / norm).astype(dtype)
    assert not bool(jnp.all(rounded_once == rounded_twice))  # the input tells the two apart
    np.testing.assert_array_equal(np.asarray(updates["g"], np.float32), np.asarray(rounded_once, np.float32))


def test_a_maximum_over_many_chunks_keeps_a_nan():
    """A NaN among thousands of chunks' maxima (as many large leaves give) survives their total."""
    values = np.arange(5000, dtype=np.float32)
    values[17] = np.nan

    @jax.jit
    def total(values):
        return _numerics._totals([(v,) for v in values], (_numerics.MAX_NONNEGATIVE,), (jnp.float32,))[0]

    assert np.isnan(float(total(values)))


@pytest.mark.parametrize(
    "make",
    [
        lambda cap: clipx.zclip(max_norm=cap, warmup_steps=2),
        lambda cap: clipx.adagc(warmup_max_norm=cap),
    ],
    ids=["zclip", "adagc"],
)
def test_an_infinite_warm_up_cap_zeroes_a_gradient_whose_norm_overflows_as_no_cap_does(make):
    # A warm-up threshold of ∞ let a finite gradient whose norm overflows (3e19² > float32's max)
    # through unscaled; as the docstrings say, it is scaled to zero, and finite norms are not clipped.
    for cap in (math.inf, 1e39):
        tx = make(cap)
        g = jnp.array([3e19, 1.0], jnp.float32)
        updates, state = tx.update(g, tx.init(g))
        np.testing.assert_array_equal(updates, [0.0, 0.0])
        assert np.isfinite(float(state.stats.threshold))
        g = jnp.array([3e18, 1.0], jnp.float32)
        np.testing.assert_array_equal(tx.update(g, tx.init(g))[0], g)
