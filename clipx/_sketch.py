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
leaf sharded along its longest axis (FSDP) is sketched where it lives under
``jax.jit``. Inside ``shard_map``/``pmap`` (``axis_name`` given) `clipx.adaptive`
keeps every leaf whole instead: its state is made from whole parameters and
its update sees shards, whose sketches would not match it.

Vectors and the leaves that `clipx._numerics` reduces in groups (below
16384 entries) are kept whole, exactly: they add no kernels of their own,
where sketching 1000 leaves of 4000 entries one by one compiled the step in
2.3× plain Adam's time and ran it in 1.53× (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from clipx import _devices, _numerics


def sketch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a leaf's sketch: the leaf's own if it is kept whole, else ``(shape[a],)``."""
    if len(shape) <= 1 or math.prod(shape) < _numerics.SMALL_LEAF:
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


def whole(x: jax.Array) -> jax.Array:
    """A leaf kept whole, in its accumulation dtype: compared exactly, not estimated."""
    return x.astype(_numerics.summation_dtype(x.dtype))


@_numerics.jit_when_traced
def sketch(x: jax.Array) -> jax.Array:
    """`S(x)` of one leaf (see the module docstring), in the accumulation dtype of ``x``."""
    if sketch_shape(x.shape) == x.shape:
        return whole(x)
    acc = _numerics.summation_dtype(x.dtype)
    longest = x.shape.index(max(x.shape))
    others = tuple(axis for axis in range(x.ndim) if axis != longest)
    return _numerics.sum_over(x.astype(acc) * _signs(x.shape, acc), axis=others)


class Measures(NamedTuple):
    """What the direction rule reads from one step's gradients ``g`` and the kept sketches ``P``."""

    norm: jax.Array  # ‖g‖
    sketch_norm: jax.Array  # ‖S(g)‖
    inner: jax.Array  # ⟨S(g), P⟩, real part
    sketches: Any  # S(g), shaped like P


def measure(tree: Any, previous: Any, axis_name: _numerics.AxisName | None = None) -> Measures:
    """`Measures` of a gradient tree against the sketches ``previous`` of an earlier one.

    A leaf is kept whole where ``previous`` has its shape (leaves below
    16384 entries, or every leaf when the state was made for ``shard_map``);
    it is its own sketch, so its squares are summed once for both norms, in
    the same grouped reductions as its product with the kept sketch; a
    sketched leaf is read once for its squares and once for its
    sketch. Inside ``shard_map``/``pmap`` the sums are summed over
    ``axis_name`` (each device compares its own shards; a leaf replicated
    over it counts once, see `_devices`).
    """
    leaves, treedef = jax.tree.flatten(tree)
    kept = cast(Any, treedef).flatten_up_to(previous)  # jax's PyTreeDef stubs lack flatten_up_to
    kept_whole = [jnp.shape(p) == jnp.shape(x) for x, p in zip(leaves, kept, strict=True)]
    for x, p, flag in zip(leaves, kept, kept_whole, strict=True):
        if not flag and jnp.shape(p) != sketch_shape(jnp.shape(x)):
            expected = f"{jnp.shape(x)} (the leaf kept whole)"
            if sketch_shape(jnp.shape(x)) != jnp.shape(x):
                expected = f"{sketch_shape(jnp.shape(x))} (its sketch) or {expected}"
            raise ValueError(
                f"the kept sketch has shape {jnp.shape(p)} for a gradient leaf of shape {jnp.shape(x)}; "
                f"expected {expected}. Was the state made for other shapes, or outside shard_map/pmap "
                "without axis_name? Inside shard_map the state must be sharded like the parameters: "
                "give clipx.state_shardings(tx, params, param_specs) as its in_specs"
            )
    sketches = [x if flag else sketch(x) for x, flag in zip(leaves, kept_whole, strict=True)]
    acc = _numerics.tree_accumulation_dtype(tree)
    both = (_numerics.SUM, _numerics.SUM)

    def squares_and_products(x: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _numerics.squared(x), _numerics.real_product(x, p)

    def against_kept(arrays: list[Any], indices: list[int]) -> tuple[jax.Array, jax.Array]:
        """(Σ ‖x‖², Σ ⟨x, kept⟩) over ``arrays[indices]``, in the same grouped reductions."""
        partners = [kept[i] for i in indices]
        squares, products = _numerics.tree_reductions(
            [arrays[i] for i in indices], squares_and_products, both, (acc, acc), partners=partners
        )
        return squares, products

    def sums(indices: list[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(‖g‖², ‖sketch‖², ⟨sketch, kept⟩) over ``leaves[indices]``."""
        whole = [i for i in indices if kept_whole[i]]
        large = [i for i in indices if not kept_whole[i]]
        whole_sq, whole_inner = against_kept(leaves, whole)
        if not large:  # every leaf compared whole: nothing to add
            return whole_sq, whole_sq, whole_inner
        (large_sq,) = _numerics.tree_reductions(
            [leaves[i] for i in large], lambda x: (_numerics.squared(x),), (_numerics.SUM,), (acc,)
        )
        sketch_sq, sketch_inner = against_kept(sketches, large)
        return whole_sq + large_sq, whole_sq + sketch_sq, whole_inner + sketch_inner

    norm, sketch_norm, inner = _devices.sum_of_parts(leaves, axis_name, sums)
    return Measures(
        _numerics.safe_sqrt(norm),
        _numerics.safe_sqrt(sketch_norm),
        inner,
        jax.tree.unflatten(treedef, sketches),
    )
