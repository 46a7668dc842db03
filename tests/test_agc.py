"""clipx.agc and clipx.unitwise_norm: optax parity, unit conventions, stats, embeddings, properties."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from optax.transforms import unitwise_norm as optax_unitwise_norm

import clipx

rng = np.random.default_rng(1)

SHAPES = [(), (5,), (1, 5), (4, 3), (2, 3, 4), (1, 1, 3, 4), (2, 2, 3, 4), (2, 2, 2, 3, 4)]


def normal(shape, scale=1.0, dtype=np.float32):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unitwise_norm_matches_optax(shape):
    x = normal(shape)
    chex.assert_trees_all_close(clipx.unitwise_norm(x), optax_unitwise_norm(x), rtol=1e-6)
    z = jax.lax.complex(x, normal(shape))
    chex.assert_trees_all_close(clipx.unitwise_norm(z), optax_unitwise_norm(z), rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "axis"), [((4, 3), -1), ((4, 3), 1), ((2, 3, 4), (0, 2)), ((2,) * 6, (0, 1))]
)
def test_unitwise_norm_with_axis_matches_optax(shape, axis):
    x = normal(shape)
    chex.assert_trees_all_close(clipx.unitwise_norm(x, axis), optax_unitwise_norm(x, axis), rtol=1e-6)


def test_unitwise_norm_units():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    # rank 3: one unit per (heads, out) position, reduced over axis 0
    np.testing.assert_allclose(clipx.unitwise_norm(x)[0], np.linalg.norm(np.asarray(x), axis=0), rtol=1e-6)
    conv = jnp.arange(48.0).reshape(2, 2, 3, 4)
    expected = np.linalg.norm(np.asarray(conv).reshape(-1, 4), axis=0)
    np.testing.assert_allclose(clipx.unitwise_norm(conv)[0, 0, 0], expected, rtol=1e-6)


def test_unitwise_norm_float16_accumulates_in_float32():
    x = jnp.full((4, 2), 300.0, jnp.float16)
    norm = clipx.unitwise_norm(x)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, 600.0)
    assert not np.all(np.isfinite(optax_unitwise_norm(x)))


def params_and_grads(scale=1.0):
    params = {"dense": normal((4, 3)), "bias": normal(3), "conv": normal((2, 2, 3, 2)), "scalar": normal(())}
    grads = jax.tree.map(lambda p: normal(p.shape, scale), params)
    return params, grads


@pytest.mark.parametrize("scale", [1e-4, 0.05, 10.0])
@pytest.mark.parametrize(("clipping", "eps"), [(0.01, 1e-3), (0.5, 1e-3), (0.1, 0.0)])
def test_agc_matches_optax(scale, clipping, eps):
    params, grads = params_and_grads(scale)
    params["zero"] = jnp.zeros((3, 2))
    grads["zero"] = normal((3, 2), scale)
    expected, _ = optax.adaptive_grad_clip(clipping, eps).update(grads, optax.EmptyState(), params)
    tx = clipx.agc(clipping, eps)
    actual, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-7)
    if eps == 0:  # zero weights and no floor: those units are clipped to 0
        np.testing.assert_array_equal(actual["zero"], 0.0)


def test_agc_matches_optax_complex_and_axis():
    params, grads = params_and_grads(1.0)
    del params["scalar"], grads["scalar"]  # axis=-1 needs rank >= 1
    params = jax.tree.map(lambda p: jax.lax.complex(p, p[..., ::-1]), params)
    grads = jax.tree.map(lambda g: jax.lax.complex(g, -g), grads)
    for axis in (None, -1):
        expected, _ = optax.adaptive_grad_clip(0.1, axis=axis).update(grads, optax.EmptyState(), params)
        tx = clipx.agc(0.1, axis=axis)
        actual, _ = tx.update(grads, tx.init(params), params)
        chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_agc_matches_optax_with_none_and_masked_leaves():
    params, grads = params_and_grads(1.0)
    params["none"], grads["none"] = None, None
    mask = {"dense": True, "bias": False, "conv": True, "scalar": False, "none": None}
    expected, _ = optax.masked(optax.adaptive_grad_clip(0.05), mask).update(
        grads, optax.masked(optax.adaptive_grad_clip(0.05), mask).init(params), params
    )
    tx = optax.masked(clipx.agc(0.05), mask)
    actual, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_close(actual, expected, rtol=1e-5)
    np.testing.assert_array_equal(actual["bias"], grads["bias"])


def unit_scaled_normal(shape):
    """Normal entries scaled from 1e-5 to 0.1 along the last axis (the units' axis for rank 2 and 4)."""
    return normal(shape) * (
        np.geomspace(1e-5, 0.1, shape[-1], dtype=np.float32) if shape else np.float32(0.05)
    )


@pytest.mark.parametrize("jit", [False, True])
def test_agc_matches_optax_on_small_and_large_leaves(jit):
    """Unit norms taken both ways (one kernel for a small leaf, two for a large one): Optax's values."""
    shapes = {
        "small": (40, 100),
        "large": (200, 100),
        "vector": (20000,),
        "conv": (3, 4, 8, 200),
        "tiny": (3,),
        "vocab": (3, 9000),  # units along a last axis over 8192 entries: a matrix-vector product on the CPU
        "heads": (2, 3, 6000),  # (in, heads, out): 18000 units, the same
    }
    params = {k: normal(shape) for k, shape in shapes.items()}
    grads = {k: unit_scaled_normal(shape) for k, shape in shapes.items()}
    tx = clipx.agc(0.01)
    update = jax.jit(tx.update) if jit else tx.update
    actual, _ = update(grads, tx.init(params), params)
    expected, _ = optax.adaptive_grad_clip(0.01).update(grads, optax.EmptyState(), params)
    chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-8)
    for k in ("small", "large", "conv", "vocab"):  # some units clipped, some not, in each
        assert not np.array_equal(actual[k], grads[k])
        assert np.any(np.all(np.asarray(actual[k] == grads[k]), axis=tuple(range(len(shapes[k]) - 1))))


def test_agc_derivatives_match_optax_on_small_and_large_leaves():
    """Derivatives through the update, w.r.t. gradients and weights, are those of Optax's rule."""
    shapes = {"small": (8, 16), "large": (130, 128), "tiny": (), "vocab": (3, 9000)}
    params = {k: normal(shape) for k, shape in shapes.items()}
    grads = {k: unit_scaled_normal(shape) for k, shape in shapes.items()}
    weights = jax.tree.map(lambda g: normal(g.shape), grads)

    def outcome(make, g, w):
        updates, _ = make().update(g, make().init(w), w)
        return sum(
            jnp.sum(c * u) for c, u in zip(jax.tree.leaves(weights), jax.tree.leaves(updates), strict=True)
        )

    actual = jax.grad(lambda g, w: outcome(lambda: clipx.agc(0.01), g, w), argnums=(0, 1))(grads, params)
    expected = jax.grad(lambda g, w: outcome(lambda: optax.adaptive_grad_clip(0.01), g, w), argnums=(0, 1))(
        grads, params
    )
    chex.assert_trees_all_close(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clipping", [0.0, 1e-3])
def test_the_derivative_in_clipping_is_optaxs_also_at_zero(clipping):
    """Before, a traced λ = 0 replaced the unit floors by 0 and the derivative in λ there was 0."""
    grads, params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}, {"w": jnp.array([[1.0, 1.0], [2.0, 0.0]])}

    def total(make, c):
        updates, _ = make(c).update(grads, make(c).init(params), params)
        return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

    actual = jax.grad(lambda c: total(clipx.agc, c))(jnp.float32(clipping))
    expected = jax.grad(lambda c: total(optax.adaptive_grad_clip, c))(jnp.float32(clipping))
    assert float(expected) != 0 and float(actual) == pytest.approx(float(expected), rel=1e-6)


def test_agc_stats():
    params = {"w": jnp.array([[3.0, 1.0], [4.0, 0.0]])}  # unit norms 5 and 0 (-> eps)
    grads = {"w": jnp.array([[0.3, 0.0], [0.0, 0.0]])}  # unit norms 0.3 and 0
    tx = clipx.agc(0.01, eps=1e-3)
    updates, state = tx.update(grads, tx.init(params), params)
    s = state.stats
    assert float(s.norm) == pytest.approx(0.3 / 5.0)
    assert float(s.threshold) == pytest.approx(0.01)
    assert float(s.scale) == pytest.approx(0.5)
    assert bool(s.clipped)
    np.testing.assert_allclose(np.linalg.norm(updates["w"][:, 0]), 0.05, rtol=1e-6)
    np.testing.assert_array_equal(updates["w"][:, 1], 0.0)


def test_agc_stats_over_small_and_large_leaves():
    """Largest ratio and fraction clipped over many same-shaped small leaves and large ones."""
    shapes = [(6, 4)] * 37 + [(3, 5)] * 3 + [(130, 128), (20000,)]  # two above 2**14 entries
    params = {f"p{i}": normal(shape) for i, shape in enumerate(shapes)}
    grads = {f"p{i}": normal(shape, scale=0.02 * (i % 5)) for i, shape in enumerate(shapes)}
    tx = clipx.agc(0.01)
    _, state = tx.update(grads, tx.init(params), params)
    ratios = []
    for key in params:
        g, w = np.asarray(grads[key], np.float64), np.asarray(params[key], np.float64)
        axis = 0 if g.ndim == 2 else None
        g_norm = np.sqrt(np.sum(g**2, axis=axis))
        w_norm = np.maximum(np.sqrt(np.sum(w**2, axis=axis)), 1e-3)
        ratios.append(np.ravel(g_norm / w_norm))
    ratios = np.concatenate(ratios)
    assert float(state.stats.norm) == pytest.approx(ratios.max(), rel=1e-5)
    assert float(state.stats.scale) == pytest.approx(np.mean(ratios > 0.01), abs=1e-7)
    assert 0 < float(state.stats.scale) < 1


def test_agc_zero_eps_zero_weights_gives_no_nan():
    params = {"w": jnp.zeros((2, 2))}
    grads = {"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])}
    tx = clipx.agc(0.01, eps=0.0)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    assert float(state.stats.norm) == np.inf
    assert float(state.stats.scale) == 0.5
    chex.assert_tree_all_finite((state.stats.threshold, state.stats.scale))


@pytest.mark.parametrize("array", [False, True], ids=["number", "array"])
@pytest.mark.parametrize("clipping", [0.01, 0.0])
def test_a_unit_whose_norms_both_overflow_is_counted_as_it_is_clipped(clipping, array):
    """‖G‖² and ‖W‖² both past float32's range: before, the ratio was ∞/∞ = NaN (stopping
    jax_debug_nans), and with λ = 0 the bound 0·∞ = NaN left the unit unclipped."""
    params = grads = {"w": jnp.array([1e30, 0.0], jnp.float32)}
    tx = clipx.agc(jnp.asarray(clipping) if array else clipping)
    with jax.debug_nans(True):
        for update in (tx.update, jax.jit(tx.update)):
            updates, state = update(grads, tx.init(params), params)
            stats = {k: float(v) for k, v in clipx.stats(state).items()}
            if clipping:  # the bound overflows: not clipped, and not counted
                np.testing.assert_array_equal(updates["w"], grads["w"])
                assert (stats["agc/norm"], stats["agc/scale"], stats["agc/clipped"]) == (0.0, 0.0, 0.0)
            else:  # λ = 0 clips every unit to 0, this one too
                np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
                assert (stats["agc/norm"], stats["agc/scale"], stats["agc/clipped"]) == (1.0, 1.0, 1.0)


def test_zero_gradients_of_zero_weights_compute_no_nan_under_debug_nans():
    """0/0 is never computed (eagerly, every operation is checked), so users debugging NaNs
    with jax_debug_nans are not stopped here."""
    params = {"w": jnp.zeros((2, 2))}
    tx = clipx.agc(0.01, eps=0.0)
    with jax.debug_nans(True):
        updates, state = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
        jax.block_until_ready(state)
    np.testing.assert_array_equal(updates["w"], 0.0)
    assert float(state.stats.norm) == 0.0


@pytest.mark.parametrize("eps", [1e-3, 0.0, jnp.float32(1e-3), jnp.float32(0.0)])
def test_derivatives_for_zero_weight_units_are_finite(eps):
    """Units of zero weights: derivatives through the update, w.r.t. gradients and weights, stay finite."""
    params = {"w": jnp.array([[0.0, 2.0], [0.0, 1.0]]), "b": jnp.zeros(3)}
    grads = {"w": jnp.array([[1.0, 0.5], [0.0, -0.5]]), "b": jnp.array([0.0, 1.0, 0.0])}

    def outcome(g, w):
        tx = clipx.agc(0.01, eps=eps)
        updates, state = tx.update(g, tx.init(w), w)
        return sum(jnp.sum(u**2) for u in jax.tree.leaves(updates)) + state.stats.scale

    for g in (grads, jax.tree.map(jnp.zeros_like, grads)):
        chex.assert_tree_all_finite(jax.grad(outcome, argnums=(0, 1))(g, params))


def test_embedding_rows_via_multi_transform_and_head_excluded():
    params = {"embed": normal((6, 4)), "dense": normal((4, 3)), "head": normal((3, 2))}
    grads = jax.tree.map(lambda p: normal(p.shape, 10.0), params)
    labels = {"embed": "rows", "dense": "agc", "head": "none"}
    tx = optax.multi_transform(
        {"rows": clipx.agc(0.01, axis=-1), "agc": clipx.agc(0.01), "none": optax.identity()}, labels
    )
    updates, state = tx.update(grads, tx.init(params), params)
    row_bound = 0.01 * np.maximum(np.linalg.norm(params["embed"], axis=1), 1e-3)
    np.testing.assert_allclose(np.linalg.norm(updates["embed"], axis=1), row_bound, rtol=1e-5)
    col_bound = 0.01 * np.maximum(np.linalg.norm(params["dense"], axis=0), 1e-3)
    np.testing.assert_allclose(np.linalg.norm(updates["dense"], axis=0), col_bound, rtol=1e-5)
    np.testing.assert_array_equal(updates["head"], grads["head"])
    assert set(clipx.stats(state)) >= {"rows/agc/scale", "agc/agc/scale"}
    masked = optax.masked(clipx.agc(0.01), {"embed": True, "dense": True, "head": False})
    updates, _ = masked.update(grads, masked.init(params), params)
    np.testing.assert_array_equal(updates["head"], grads["head"])


class VariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_matches_eager(self):
        params, grads = params_and_grads(1.0)
        tx = clipx.agc(0.02)
        state = tx.init(params)
        updates, new_state = self.variant(tx.update)(grads, state, params)
        expected, expected_state = tx.update(grads, state, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)
        chex.assert_trees_all_close(new_state, expected_state, rtol=1e-6)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
        chex.assert_tree_all_finite(updates)

    @chex.variants(with_jit=True, without_jit=True)
    def test_inject_hyperparams(self):
        params, grads = params_and_grads(1.0)
        tx = optax.inject_hyperparams(clipx.agc)(clipping=0.02, eps=1e-3)
        updates, _ = self.variant(tx.update)(grads, tx.init(params), params)
        expected, _ = clipx.agc(0.02).update(grads, clipx.agc(0.02).init(params), params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)


# few distinct shapes, so eager kernels compile once and the examples stay cheap
PROPERTY_SHAPES = [(), (3,), (1, 4), (2, 3), (2, 2, 3)]


@st.composite
def agc_problems(draw, dtypes=(jnp.float16, jnp.bfloat16, jnp.float32)):
    """1-4 (param, grad) leaves of small shapes with random dtypes and magnitudes."""
    local = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    params, grads = {}, {}
    for i in range(draw(st.integers(1, 4))):
        shape = draw(st.sampled_from(PROPERTY_SHAPES))
        dtype = draw(st.sampled_from(dtypes))
        params[f"p{i}"] = jnp.asarray(local.standard_normal(shape) * 10.0 ** draw(st.floats(-4, 1)), dtype)
        grads[f"p{i}"] = jnp.asarray(local.standard_normal(shape) * 10.0 ** draw(st.floats(-4, 1)), dtype)
    return params, grads


def check_agc_properties(params, grads, clipping):
    tx = clipx.agc(clipping)
    once, state = tx.update(grads, tx.init(params), params)
    twice, _ = tx.update(once, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(once, grads)
    chex.assert_tree_all_finite(once)
    for name, g in grads.items():
        tol = float(jnp.finfo(g.dtype).eps)
        bound = clipping * np.maximum(np.asarray(clipx.unitwise_norm(params[name])), 1e-3)
        after = np.asarray(clipx.unitwise_norm(once[name]))
        before = np.asarray(clipx.unitwise_norm(g))
        assert np.all(after <= bound * (1 + 2 * tol) + 1e-7)
        keep = before <= bound
        np.testing.assert_array_equal(np.asarray(once[name])[keep], np.asarray(g)[keep])
        o, g64 = np.asarray(once[name], np.float64), np.asarray(g, np.float64)
        assert np.all(o * g64 >= 0)  # direction kept entry by entry: a non-negative rescale
    if not bool(state.stats.clipped):
        chex.assert_trees_all_equal(once, grads)
    tol = max(float(jnp.finfo(g.dtype).eps) for g in grads.values())
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), twice),
        jax.tree.map(lambda x: x.astype(jnp.float32), once),
        rtol=4 * tol,
        atol=1e-6,
    )


@hypothesis.given(problem=agc_problems(), clipping=st.floats(0.0, 1.0))
def test_agc_properties(problem, clipping):
    check_agc_properties(*problem, clipping)


@hypothesis.settings(max_examples=6)
@hypothesis.given(data=st.data(), clipping=st.floats(0.0, 1.0))
def test_agc_properties_float64(data, clipping):
    with jax.enable_x64(True):
        params, grads = data.draw(agc_problems(dtypes=(jnp.float64,)))
        check_agc_properties(params, grads, clipping)


@pytest.mark.parametrize("shape", [(2, 3), (200, 100), (3, 8000)], ids=["small", "large", "many_units"])
def test_statistics_report_a_nan_gradient(shape):
    params = {"w": jnp.ones(shape)}
    grads = {"w": jnp.full(shape, 0.001).at[0, 0].set(jnp.nan)}
    tx = clipx.agc(0.01)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.isnan(float(state.stats.norm))  # the largest ratio, as value and the norm rules report


@pytest.mark.parametrize("axis", [np.int64(-1), np.int32(1), (np.int64(0),)], ids=repr)
def test_numpy_integer_axes_work_on_small_and_large_leaves(axis):
    for shape in ((4, 3), (200, 100)):
        params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
        grads = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
        python_axis = tuple(int(a) for a in axis) if isinstance(axis, tuple) else int(axis)
        expected = clipx.agc(0.1, axis=python_axis).update(grads, clipx.agc(0.1).init(params), params)
        got = clipx.agc(0.1, axis=axis).update(grads, clipx.agc(0.1).init(params), params)
        chex.assert_trees_all_close(got, expected)


def test_an_eps_whose_square_underflows_is_refused():
    with pytest.raises(
        ValueError, match=r"eps must be 0 or at least 1.08e-19 \(its square a normal float32\)"
    ):
        clipx.agc(0.01, eps=1e-20)
    params, grads = {"w": jnp.zeros((2, 2))}, {"w": jnp.ones((2, 2))}
    for concrete in (jnp.asarray(1e-25), np.float32(1e-25), np.asarray(1e-25)):
        with pytest.raises(ValueError, match=r"eps must be 0 or at least 1\.08e-19"):
            clipx.agc(0.01, eps=concrete)
    with pytest.raises(ValueError, match=r"eps must be 0 or at least 1\.08e-19"):
        optax.inject_hyperparams(clipx.agc)(0.01, eps=1e-25).init(params)  # eps arrives as an array
    tx = clipx.agc(0.01, eps=1e-18)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], 0.01 * 1e-18 / np.sqrt(2), rtol=1e-5)  # unit ‖G_i‖ = √2
    assert np.isfinite(float(state.stats.norm))


def test_an_axis_given_as_an_array_points_to_static_args():
    with pytest.raises(TypeError, match="name it in static_args"):
        clipx.agc(0.01, axis=jnp.asarray(-1))
