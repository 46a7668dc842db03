"""Signed sketches of gradients: short vectors whose inner products estimate those of the gradients.

`clipx.adaptive`'s direction multiplier needs ``cos(g_t, g_{t−1})``. Keeping
``g_{t−1}`` whole costs a copy of the parameters and two more passes over
them at every step. A sketch keeps, for each large leaf, signed sums along
every axis but its longest, ``a``:

.. math::

    S(x)_j = \\sum_{i \\,:\\, i_a = j} s_i\\, x_i, \\qquad s_i = \\pm 1

with the signs ``s_i`` drawn by a fixed hash of each entry's flat index. As
``s_i² = 1`` and the signs of different entries are uncorrelated,
``⟨S(x), S(y)⟩`` is an unbiased estimate of ``⟨x, y⟩``; for unrelated
gradients its noise is about ``1/√(shape[a])`` of ``‖x‖‖y‖``. It is linear,
so ``S(−x) = −S(x)``: the cosine of the sketches of a gradient and its
reversal is exactly −1. The sums run over every axis but the longest, so a
leaf sharded along its longest axis (FSDP) is sketched where it lives.

Vectors and the leaves that `clipx._numerics` reduces in groups (below
16384 entries) are kept whole, exactly: they add no kernels of their own,
where sketching 1000 leaves of 4000 entries one by one compiled the step in
2.3× plain Adam's time and ran it in 1.53× (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipx import _numerics


def sketch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a leaf's sketch: the leaf's own if it is kept whole, else ``(shape[a],)``."""
    size = 1
    for d in shape:
        size *= d
    if len(shape) <= 1 or size < _numerics.SMALL_LEAF:
        return tuple(shape)
    return (max(shape),)


def _signs(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """±1 for every entry of an array of ``shape``, from a hash of its flat (row-major) index."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    mixed = index ^ (index >> 16)  # the "lowbias32" integer hash
    mixed = mixed * jnp.uint32(0x7FEB352D)
    mixed = mixed ^ (mixed >> 15)
    mixed = mixed * jnp.uint32(0x846CA68B)
    mixed = mixed ^ (mixed >> 16)
    return 1 - 2 * (mixed >> 31).astype(dtype)


@_numerics.jit_when_traced
def sketch(x: jax.Array) -> jax.Array:
    """`S(x)` of one leaf (see the module docstring), in the accumulation dtype of ``x``."""
    acc = _numerics.accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        acc = jnp.result_type(acc, jnp.complex64)
    if sketch_shape(x.shape) == x.shape:
        return x.astype(acc)
    longest = x.shape.index(max(x.shape))
    others = tuple(axis for axis in range(x.ndim) if axis != longest)
    return jnp.sum(x.astype(acc) * _signs(x.shape, _numerics.accumulation_dtype(x.dtype)), axis=others)
