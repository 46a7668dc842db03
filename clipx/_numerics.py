"""Norms of pytrees and the scale that clips them, in safe arithmetic.

Every clipx transform measures with these helpers, so the numerics are the
same everywhere:

* squares are summed in float32 at least (float64 for float64/complex128
  leaves), so float16 and bfloat16 gradients never overflow while measuring;
* the square root and the division are guarded, so zero gradients, zero
  thresholds and empty trees give finite values *and* finite derivatives;
* scaling is one multiply per leaf by a scalar cast to the leaf's dtype, which
  XLA fuses into whatever consumes the update next.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
AxisName = Any  # a hashable axis name, or a tuple of them, as jax.lax.psum takes


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype norms of ``dtype`` values are accumulated in.

    float64 (or complex128) stays float64; everything else is float32.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def tree_accumulation_dtype(tree: PyTree) -> jnp.dtype:
    """The widest accumulation dtype of the leaves of ``tree`` (float32 if empty)."""
    dtypes = [accumulation_dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)]
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


def squared(x: jax.Array) -> jax.Array:
    """``|x|²`` element-wise, in the accumulation dtype of ``x``."""
    x = jnp.asarray(x)
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    return jnp.square(x.astype(acc))


def sum_of_squares(
    x: jax.Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
) -> jax.Array:
    """``Σ |x|²`` over ``axis`` (all axes by default), accumulated in float32 or wider."""
    return jnp.sum(squared(x), axis=axis, keepdims=keepdims)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``√x`` for ``x ≥ 0`` whose derivative is 0, not inf, at ``x = 0``; NaN stays NaN."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), jnp.where(jnp.isnan(x), x, 0))


# Leaves with fewer entries than this are reduced together, several per kernel.
_SMALL_LEAF = 1 << 14
# How many same-shaped small leaves one variadic reduction takes.
_LEAVES_PER_REDUCTION = 16


def _add_tuples(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def leaf_sums_of_squares(leaves: list[jax.Array]) -> list[jax.Array]:
    """``Σ |x|²`` of each array in ``leaves`` (accumulation dtype), as a list in the same order.

    Equal to ``[sum_of_squares(x) for x in leaves]``, but cheaper to compile for
    trees of many small leaves: XLA's CPU backend turns every small full
    reduction into three kernels (square, partial reduce-window, final reduce)
    that each cost milliseconds of compile time, so a 1000-leaf model paid more
    to compile its gradient norm than its whole Adam update. Here leaves below
    ``_SMALL_LEAF`` entries are grouped by shape and dtype, and each group of up
    to ``_LEAVES_PER_REDUCTION`` is summed by one variadic ``lax.reduce`` (one
    fused kernel that reads each leaf once). Large leaves keep ``jnp.sum``,
    whose tree-shaped reduction is more accurate and runs on all cores. Every
    leaf is still reduced where it lives: no concatenation, so sharded leaves
    never move between devices.
    """
    sums: list[Any] = [None] * len(leaves)
    groups: dict[tuple, list[tuple[int, jax.Array]]] = {}
    for i, leaf in enumerate(leaves):
        sq = squared(leaf)
        if sq.size >= _SMALL_LEAF:
            sums[i] = jnp.sum(sq)
        else:
            groups.setdefault((sq.shape, sq.dtype), []).append((i, sq))
    for (shape, dtype), members in groups.items():
        for start in range(0, len(members), _LEAVES_PER_REDUCTION):
            chunk = members[start : start + _LEAVES_PER_REDUCTION]
            operands = tuple(sq for _, sq in chunk)
            zeros = tuple(jnp.zeros((), dtype) for _ in chunk)
            results = jax.lax.reduce(operands, zeros, _add_tuples, tuple(range(len(shape))))
            for (i, _), total in zip(chunk, results, strict=True):
                sums[i] = total
    return sums


def tree_sum_of_squares(tree: PyTree, axis_name: AxisName | None = None) -> jax.Array:
    """``Σ_leaves Σ |g|²`` of a pytree, summed over the devices of ``axis_name`` if given."""
    acc = tree_accumulation_dtype(tree)
    sums = leaf_sums_of_squares(jax.tree.leaves(tree))
    total = jnp.sum(jnp.stack([s.astype(acc) for s in sums])) if sums else jnp.zeros((), acc)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def tree_norm(tree: PyTree, axis_name: AxisName | None = None) -> jax.Array:
    """Global L2 norm ``‖g‖ = √(Σ_leaves Σ |g|²)`` of a pytree.

    ``None`` and ``optax.MaskedNode`` leaves contribute nothing; an empty tree
    has norm 0. The result is float32 (float64 if any leaf is float64). Inside
    ``shard_map``/``pmap``, ``axis_name`` names the mapped axis whose shards
    together hold the tree: only the scalar sum of squares crosses devices.
    """
    return safe_sqrt(tree_sum_of_squares(tree, axis_name))


def leaf_norms(tree: PyTree, axis_name: AxisName | None = None) -> PyTree:
    """The L2 norm of each leaf, as a pytree of scalars shaped like ``tree``.

    With ``axis_name`` (inside ``shard_map``/``pmap``) each leaf's sum of
    squares is summed over that axis first.
    """

    leaves, treedef = jax.tree.flatten(tree)
    totals = leaf_sums_of_squares(leaves)
    if axis_name is not None:
        totals = jax.lax.psum(totals, axis_name)
    return jax.tree.unflatten(treedef, [safe_sqrt(total) for total in totals])


def leaf_rms(tree: PyTree, axis_name: AxisName | None = None) -> PyTree:
    """The root-mean-square ``√(Σ |g|² / n)`` of each leaf, as a pytree of scalars.

    An empty leaf has RMS 0. With ``axis_name`` (inside ``shard_map``/``pmap``)
    both the sum of squares and the entry count are summed over that axis.
    """

    leaves, treedef = jax.tree.flatten(tree)
    totals = leaf_sums_of_squares(leaves)
    counts = [jnp.asarray(leaf.size, total.dtype) for leaf, total in zip(leaves, totals, strict=True)]
    if axis_name is not None:
        totals, counts = jax.lax.psum((totals, counts), axis_name)
    rms = [safe_sqrt(total / jnp.maximum(count, 1)) for total, count in zip(totals, counts, strict=True)]
    return jax.tree.unflatten(treedef, rms)


def clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """``min(1, threshold / norm)`` with no NaN and finite derivatives.

    Exactly 1 when ``norm ≤ threshold`` (so unclipped updates are bit-identical),
    0 when the threshold is 0 and the norm positive, and 0 for an infinite norm.
    NaN in ``norm`` propagates (it is the caller's guard that decides).
    """
    norm = jnp.asarray(norm)
    threshold = jnp.asarray(threshold, norm.dtype)
    above = norm > threshold
    return jnp.where(above, threshold / jnp.where(above, norm, 1), jnp.ones_like(norm))


def scale_leaf(leaf: jax.Array, scale: jax.Array) -> jax.Array:
    """``leaf · scale``, computed in the accumulation dtype and cast back once.

    ``scale`` is a real scalar or an array broadcastable to ``leaf``; the
    product is rounded to ``leaf.dtype`` a single time, so a float16 or
    bfloat16 leaf is not scaled by an already-rounded factor.
    """
    acc = accumulation_dtype(leaf.dtype)
    if jnp.iscomplexobj(leaf):
        acc = jnp.result_type(acc, jnp.complex64)
    return (leaf.astype(acc) * scale).astype(leaf.dtype)


def scale_tree(tree: PyTree, scale: jax.Array) -> PyTree:
    """Multiplies every leaf of ``tree`` by the scalar ``scale`` (see `scale_leaf`)."""
    return jax.tree.map(lambda leaf: scale_leaf(leaf, scale), tree)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every entry of every leaf is finite (True for an empty tree)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.array(True)
