"""The signed sketches behind `adaptive(direction_rate=...)`: definition, exact cases, estimate quality."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import sketch_of, sketch_signs

from clipx import _sketch

SHAPES = [
    (),
    (7,),
    (20000,),
    (5, 7),
    (128, 127),
    (128, 128),
    (200, 90),
    (90, 200),
    (3, 20000),  # a last axis kept above 8192 entries: a matrix-vector product on the CPU
    (3, 50, 120),
    (8, 8, 16, 20),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_definition(shape, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) + (1j * rng.normal(size=shape) if dtype == jnp.complex64 else 0)
    x = jnp.asarray(x, dtype)
    got = _sketch.sketch(x)
    assert got.shape == _sketch.sketch_shape(shape)
    assert got.dtype == (jnp.complex64 if dtype == jnp.complex64 else jnp.float32)  # accumulated in float32
    np.testing.assert_allclose(got, sketch_of(np.asarray(x)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.jit(_sketch.sketch)(x), got, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(150, 120), (120, 150), (3, 50, 120), (2, 20000)], ids=str)
def test_derivatives_and_vmap_follow_the_definition_whichever_axis_is_kept(shape):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    weights = jnp.asarray(rng.normal(size=_sketch.sketch_shape(shape)), jnp.float32)
    longest = shape.index(max(shape))
    others = tuple(axis for axis in range(len(shape)) if axis != longest)
    expected = sketch_signs(shape) * np.expand_dims(np.asarray(weights), others)  # d⟨w, S(x)⟩/dx_i = s_i·w_j
    for fn in (_sketch.sketch, jax.jit(_sketch.sketch)):
        got = jax.grad(lambda x, fn=fn: jnp.vdot(weights, fn(x)))(x)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    batch = jnp.stack([x, -x, 2 * x])
    np.testing.assert_allclose(
        jax.vmap(_sketch.sketch)(batch),
        np.stack([sketch_of(np.asarray(b)) for b in batch]),
        rtol=1e-5,
        atol=1e-4,
    )


def test_small_leaves_and_vectors_are_kept_whole_and_larger_ones_along_their_longest_axis():
    assert _sketch.sketch_shape((128, 127)) == (128, 127)  # below 16384 entries: whole
    assert _sketch.sketch_shape((128, 128)) == (128,)
    assert _sketch.sketch_shape((100_000,)) == (100_000,)
    assert _sketch.sketch_shape((30_000, 64)) == (30_000,)
    assert _sketch.sketch_shape((64, 4096)) == (4096,)
    assert _sketch.sketch_shape((3, 3, 64, 128)) == (128,)


def test_linear_so_a_reversed_gradient_has_cosine_minus_one():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(300, 40)), jnp.float32)
    a, b = _sketch.sketch(x), _sketch.sketch(-2.0 * x)
    np.testing.assert_allclose(b, -2.0 * a, rtol=1e-6)
    assert float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(2000, 64), (64, 2000), (20, 30, 40)], ids=str)
def test_the_sketched_cosine_estimates_the_cosine(shape):
    rng = np.random.default_rng(2)
    errors = []
    for rho in (-0.6, -0.2, 0.0, 0.3, 0.9):
        x = rng.normal(size=shape)
        y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=shape)
        exact = np.vdot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))
        sx, sy = _sketch.sketch(jnp.asarray(x, jnp.float32)), _sketch.sketch(jnp.asarray(y, jnp.float32))
        errors.append(float(jnp.vdot(sx, sy) / (jnp.linalg.norm(sx) * jnp.linalg.norm(sy))) - exact)
    # The noise is about 1/sqrt(longest axis): 0.022 for 2000 kept entries, 0.16 for 40.
    assert np.max(np.abs(errors)) < 4 / np.sqrt(max(shape))


def test_signs_look_random():
    signs = np.asarray(_sketch._signs((1000, 100), jnp.float32))
    assert abs(signs.mean()) < 0.01  # balanced
    assert abs(np.mean(signs[:, 1:] * signs[:, :-1])) < 0.01  # neighbours uncorrelated
    assert abs(np.mean(signs[1:] * signs[:-1])) < 0.01


def _mixed_tree(seed):
    """Small leaves of several dtypes and shapes, a complex one, large ones to sketch, masked ones."""
    rng = np.random.default_rng(seed)
    tree = {f"w{i:02d}": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for i in range(37)}
    tree |= {f"h{i}": jnp.asarray(300 * rng.normal(size=(3, 5)), jnp.float16) for i in range(3)}
    tree["z"] = jnp.asarray(rng.normal(size=(4,)) + 1j * rng.normal(size=(4,)), jnp.complex64)
    tree["big"] = jnp.asarray(rng.normal(size=(150, 120)), jnp.float32)
    tree["bigger"] = jnp.asarray(rng.normal(size=(20, 30, 40)), jnp.bfloat16)
    tree["masked"], tree["none"] = optax.MaskedNode(), None
    return tree


def test_measure_gives_both_norms_and_the_inner_product_of_the_sketches():
    tree, other = _mixed_tree(0), _mixed_tree(1)
    previous = jax.tree.map(_sketch.sketch, other)
    got = _sketch.measure(tree, previous)
    leaves, kept = jax.tree.leaves(tree), jax.tree.leaves(other)
    exact_norm = np.sqrt(sum(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2) for x in leaves))
    sketches = [sketch_of(np.asarray(x)) for x in leaves]
    sketch_norm = np.sqrt(sum(np.sum(np.abs(s) ** 2) for s in sketches))
    inner = sum(
        np.sum(np.real(s * np.conj(sketch_of(np.asarray(p))))) for s, p in zip(sketches, kept, strict=True)
    )
    assert float(got.norm) == pytest.approx(exact_norm, rel=1e-5)
    assert float(got.sketch_norm) == pytest.approx(sketch_norm, rel=1e-5)
    assert float(got.inner) == pytest.approx(inner, rel=1e-4)
    chex.assert_trees_all_equal_shapes(got.sketches, previous)
    jitted = jax.jit(_sketch.measure)(tree, previous)
    np.testing.assert_allclose(
        [jitted.norm, jitted.sketch_norm, jitted.inner], [got.norm, got.sketch_norm, got.inner], rtol=1e-5
    )
    empty = _sketch.measure({}, {})
    assert [float(empty.norm), float(empty.sketch_norm), float(empty.inner)] == [0.0, 0.0, 0.0]


def test_measure_has_the_derivatives_of_the_plain_sums():
    rng = np.random.default_rng(3)
    tree = {
        "small": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
        "big": jnp.asarray(rng.normal(size=(150, 120)), jnp.float32),
    }
    previous = jax.tree.map(
        lambda x: _sketch.sketch(jnp.asarray(rng.normal(size=x.shape), jnp.float32)), tree
    )

    def fused(t):
        m = _sketch.measure(t, previous)
        return m.norm + m.sketch_norm + m.inner

    def plain(t):
        sketches = jax.tree.map(_sketch.sketch, t)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))
        sketch_norm = jnp.sqrt(sum(jnp.sum(jnp.square(s)) for s in jax.tree.leaves(sketches)))
        pairs = zip(jax.tree.leaves(sketches), jax.tree.leaves(previous), strict=True)
        return norm + sketch_norm + sum(jnp.vdot(s, p) for s, p in pairs)

    chex.assert_trees_all_close(jax.grad(fused)(tree), jax.grad(plain)(tree), rtol=1e-5, atol=1e-6)
