"""Clipping with fixed thresholds: by value, by global norm, per tensor, by block RMS."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _devices, _numerics, _validate
from clipx._stats import ClipStats, clip_stats, empty_clip_stats, global_clip_stats, replacing


class ValueState(NamedTuple):
    """State of `value`: only what it reports."""

    stats: ClipStats
    stats_name = "value"  # type: ignore[misc]  # a class attribute, not a field


def _real_parts(leaf: jax.Array) -> tuple[jax.Array, ...]:
    """The real components of ``leaf``: itself, or its real and imaginary parts."""
    return (leaf.real, leaf.imag) if jnp.iscomplexobj(leaf) else (leaf,)


# Entries counted in int32 at a time. A leaf of at least twice as many is counted block by
# block, the blocks' counts summed in floating point: an int32 count could overflow.
_COUNT_BLOCK = 2**30


def _count_true(mask: jax.Array, dtype: Any) -> jax.Array:
    """The number of True entries of ``mask`` as ``dtype``, exact within each int32 block."""
    flat = mask.ravel()
    blocks = flat.size // _COUNT_BLOCK
    full = jnp.sum(flat[: blocks * _COUNT_BLOCK].reshape(blocks, _COUNT_BLOCK), axis=1, dtype=jnp.int32)
    rest = jnp.sum(flat[blocks * _COUNT_BLOCK :], dtype=jnp.int32)
    return jnp.sum(full.astype(dtype)) + rest.astype(dtype)


def value(
    max_delta: float | jax.Array, *, axis_name: _numerics.AxisName | None = None
) -> optax.GradientTransformation:
    r"""Clips every entry of the update to ``[-c, c]``.

    .. math::

        g \leftarrow \max(\min(g, c), -c) \quad \text{element-wise}

    The seed rule of gradient clipping, and ``optax.clip`` with the same
    values. Each leaf keeps its dtype (``c`` is cast to it, so a float16 leaf
    is clipped at the float16 value nearest ``c``, and a ``c`` past the range
    of a float8 format without infinities at its largest value, which bounds
    nothing); integer and boolean
    updates are refused, as by every clipx rule. Complex leaves, which
    ``optax.clip`` rejects, have their real and imaginary parts clipped
    separately, so ``|Re g|, |Im g| ≤ c``. Below the threshold entries are
    returned bit for bit (but for subnormal floats, which XLA's CPU backend
    flushes to 0 in any arithmetic); NaN entries stay NaN.

    Args:
      max_delta: the bound ``c ≥ 0`` (a number, or a scalar array for
        ``optax.inject_hyperparams``).
      axis_name: inside ``shard_map``/``pmap`` where each device holds a shard
        of the gradients, the mapped axis the reported statistics are reduced
        over (the clip itself is element-wise and needs no communication); a
        replicated leaf counts once, as in `global_norm`.

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`:
      ``norm`` is the largest ``|g|`` entry before clipping (for complex
      leaves, the largest real or imaginary part), ``threshold`` is ``c``,
      ``scale`` is the fraction of entries clipped, ``clipped`` whether any was.
      These statistics read every entry once more (on the CPU each large leaf
      is clipped right after that read, to find it in cache; what that saves
      depends on the processor); `without_stats` drops them and that read.

    Reference:
      Mikolov, "Statistical Language Models Based on Neural Networks", PhD
      thesis, Brno University of Technology, 2012 (clipping gradient values).

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = optax.chain(clipx.value(1.0), optax.sgd(0.1))
      >>> params = jnp.zeros(3)
      >>> updates, state = tx.update(jnp.array([3.0, -0.5, -2.0]), tx.init(params))
      >>> [round(float(u), 4) for u in updates]
      [-0.1, 0.05, 0.1]
      >>> round(float(clipx.stats(state)["value/scale"]), 4)
      0.6667
    """
    max_delta = _validate.check_nonnegative("max_delta", max_delta)

    def init_fn(params):
        del params
        return ValueState(stats=empty_clip_stats(scale=0.0))

    def bound(x: jax.Array) -> jax.Array:
        return _numerics.as_dtype(max_delta, x.dtype)  # a Python int past int32 too

    def clip_real(x: jax.Array) -> jax.Array:
        c = bound(x)
        return jnp.maximum(jnp.minimum(x, c), -c)

    @_numerics.jit_when_traced  # traced once per leaf shape and dtype, not once per leaf
    def clip_leaf(leaf: jax.Array) -> jax.Array:
        parts = [clip_real(x) for x in _real_parts(leaf)]
        return jax.lax.complex(*parts) if jnp.iscomplexobj(leaf) else parts[0]

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, ValueState)
        del params
        acc = _numerics.tree_accumulation_dtype(updates)
        leaves, treedef = jax.tree.flatten(updates)

        def largest_and_above(leaf: jax.Array) -> tuple[jax.Array, jax.Array]:
            parts = [(jnp.abs(x), bound(x)) for x in _real_parts(leaf)]
            largest = functools.reduce(jnp.maximum, [a.astype(acc) for a, _ in parts])
            above = functools.reduce(jnp.logical_or, [a > c for a, c in parts])
            return largest, above.astype(jnp.int32)

        tied = list(leaves)
        largests = []

        def count_above(indices: list[int]) -> tuple[jax.Array, jax.Array]:
            """(entries above c, entries) of ``leaves[indices]``; their largest |g| into ``largests``.

            One pass over the gradients (one kernel per large leaf or per group of small
            leaves) for both statistics, each large leaf clipped after its pass (see the helper).
            """
            giant = [i for i in indices if leaves[i].size >= 2 * _COUNT_BLOCK]
            rest = [i for i in indices if leaves[i].size < 2 * _COUNT_BLOCK]
            (largest, count), rest_tied = _numerics.tree_reductions_beside_leaves(
                [leaves[i] for i in rest],
                largest_and_above,
                (_numerics.MAX_NONNEGATIVE, _numerics.SUM),
                (acc, acc),
            )
            for i, leaf in zip(rest, rest_tied, strict=True):
                tied[i] = leaf
            for i in giant:
                leaf_largest, above = largest_and_above(leaves[i])
                largest = jnp.maximum(largest, _numerics.max_nonnegative(leaf_largest))
                count = count + _count_true(above, acc)
            largests.append(largest)
            return count, jnp.asarray(float(sum(leaves[i].size for i in indices)), acc)

        count, total = _devices.sum_of_parts(leaves, axis_name, count_above)
        largest = functools.reduce(jnp.maximum, largests)
        if axis_name is not None:
            largest = _numerics.max_nonnegative(largest, axis_name)
        leaves = tied
        stats = clip_stats(
            norm=largest,
            threshold=_numerics.as_dtype(max_delta, acc),
            scale=(count / jnp.maximum(total, 1)).astype(acc),
            clipped=count > 0,
        )
        clipped = treedef.unflatten([clip_leaf(leaf) for leaf in leaves])
        return clipped, ValueState(stats=replacing(state.stats, stats))

    return optax.GradientTransformation(init_fn, update_fn)


class GlobalNormState(NamedTuple):
    """State of `global_norm`: only what it reports."""

    stats: ClipStats
    stats_name = "global_norm"  # type: ignore[misc]  # a class attribute, not a field


def global_norm(
    max_norm: float | jax.Array,
    *,
    ord: float | None = None,  # the name of optax.tree.norm's and NumPy's argument
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Clips the update to a maximum global L2 norm (Pascanu et al., 2013), or ``p``-norm.

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g \rVert_p}\right),
        \qquad \lVert g \rVert_p = \Bigl(\textstyle\sum_\text{leaves} \sum |g|^p\Bigr)^{1/p},
        \quad \lVert g \rVert_\infty = \max_\text{leaves} \max |g|

    With ``p = 2`` (the default), the same rule as ``optax.clip_by_global_norm``
    and PyTorch's ``clip_grad_norm_``; other orders are those of PyTorch's
    ``norm_type`` (``ord=math.inf`` clips by the largest entry; any
    ``1 ≤ p ≤ ∞``). Safer numerics: the norm is accumulated in float32
    (float64 for float64 leaves), so float16 gradients do not overflow; a
    ``p`` other than 1, 2 and ∞ sums ``|g|^p`` relative to the largest ``|g|``,
    so no power overflows (it reads the gradients twice); a zero
    norm or a zero threshold gives no NaN; below the threshold the update is
    returned bit for bit (but for subnormal floats, which XLA's CPU backend
    flushes to 0 in any arithmetic). A non-finite gradient gives a non-finite
    update (wrap the chain in `clipx.skip_nonfinite` to drop such steps): a
    NaN norm scales nothing (the finite entries pass unscaled, and ``clipped``
    is false), an infinite one zeroes the finite entries (the infinite ones
    become NaN).
    With ``p = 2``, finite float32 entries above about 1.8·10¹⁹ overflow
    their squares: the norm is then ∞ and, under a finite threshold, the
    update 0, as with Optax (a threshold of ∞ clips nothing). The other
    orders scale by the largest entry and stay exact, unless the norm itself
    is past float32's range.

    Args:
      max_norm: the threshold ``c ≥ 0`` (a number, or a scalar array for
        ``optax.inject_hyperparams``).
      ord: the order ``p`` of the norm, a Python number ``1 ≤ p ≤ ∞``
        (``math.inf`` or ``jnp.inf`` for the largest entry), or ``None`` for
        2 (the default: ``optax.inject_hyperparams`` leaves ``None`` alone;
        an order given to it goes in ``static_args``). For complex leaves
        ``|g|`` is the modulus.
      axis_name: inside ``shard_map``/``pmap`` where each device holds a shard
        of the gradients, the mapped axis to sum squared norms (or ``|g|^p``,
        or the largest ``|g|``) over. A leaf
        every device holds whole is counted once under ``shard_map`` (its
        ``check_vma`` says which leaves vary over the axis); under ``pmap`` or
        ``check_vma=False`` every leaf must be split over it (docs/scale.md).
        Leave it ``None`` under plain ``jax.jit`` with sharded arrays: XLA
        partitions the reduction itself.

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`
      (``norm``, the ``p``-norm before clipping, ``threshold``, ``scale``
      applied, ``clipped``).

    Reference:
      Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013.

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = optax.chain(clipx.global_norm(1.0), optax.sgd(0.1))
      >>> params = jnp.zeros(2)
      >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(params))
      >>> updates.round(4)
      Array([-0.06, -0.08], dtype=float32)
      >>> tx = clipx.global_norm(1.0, ord=jnp.inf)  # PyTorch's norm_type=inf
      >>> updates, state = tx.update(jnp.array([3.0, 4.0]), tx.init(params))
      >>> updates
      Array([0.75, 1.  ], dtype=float32)
    """
    max_norm = _validate.check_nonnegative("max_norm", max_norm)
    order = 2.0 if ord is None else _validate.check_norm_order("ord", ord)

    def init_fn(params):
        del params
        return GlobalNormState(stats=empty_clip_stats())

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, GlobalNormState)
        del params
        norm = _numerics.tree_norm_of_order(updates, order, axis_name)
        scale = _numerics.clip_scale(norm, max_norm)
        stats = global_clip_stats(norm, max_norm, scale)
        return _numerics.scale_tree(updates, scale), GlobalNormState(stats=replacing(state.stats, stats))

    return optax.GradientTransformation(init_fn, update_fn)


class TensorNormState(NamedTuple):
    """State of `tensor_norm`: only what it reports."""

    stats: ClipStats
    stats_name = "tensor_norm"  # type: ignore[misc]  # a class attribute, not a field


class BlockRMSState(NamedTuple):
    """State of `block_rms`: only what it reports."""

    stats: ClipStats
    stats_name = "block_rms"  # type: ignore[misc]  # a class attribute, not a field


def _per_leaf_clip(
    threshold: float | jax.Array,
    state_type: type[TensorNormState] | type[BlockRMSState],
    axis_name: _numerics.AxisName | None,
    *,
    per_entry: bool,
) -> optax.GradientTransformation:
    """Scales each leaf by ``min(1, threshold / m)``: ``m`` its L2 norm, or its RMS if ``per_entry``."""

    def init_fn(params):
        del params
        return state_type(stats=empty_clip_stats(scale=0.0))

    @_numerics.jit_when_traced  # traced once per leaf shape and dtype, not once per leaf
    def clip_leaf(leaf: jax.Array, squared_norm: jax.Array, count: jax.Array) -> jax.Array:
        measure_squared = squared_norm / jnp.maximum(count, 1)
        return _numerics.scale_leaf(leaf, _numerics.clip_scale_of_square(measure_squared, threshold))

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, state_type)
        del params
        leaves, treedef = jax.tree.flatten(updates)
        squares = _numerics.leaf_squared_norms(leaves, axis_name)
        counts: list[Any] = [float(leaf.size) if per_entry else 1.0 for leaf in leaves]  # may pass 2³¹
        if per_entry and axis_name is not None:
            counts = _devices.sum_each(leaves, axis_name, lambda indices: [counts[i] for i in indices])
        scaled = [clip_leaf(leaf, q, n) for leaf, q, n in zip(leaves, squares, counts, strict=True)]
        # Statistics from the stacked sums, divided by the counts afterwards (dividing each
        # sum first cost a kernel per leaf): one kernel for all leaves.
        acc = _numerics.tree_accumulation_dtype(updates)
        measures = _numerics.safe_sqrt(
            jnp.stack([q.astype(acc) for q in squares]) / jnp.maximum(jnp.asarray(counts, acc), 1)
            if leaves
            else jnp.zeros((0,), acc)
        )
        threshold_ = _numerics.as_dtype(threshold, acc)
        clipped = measures > threshold_
        stats = clip_stats(
            norm=_numerics.max_nonnegative(measures),
            threshold=threshold_,
            scale=jnp.mean(clipped, dtype=acc) if leaves else jnp.zeros((), acc),
            clipped=jnp.any(clipped),
        )
        return jax.tree.unflatten(treedef, scaled), state_type(stats=replacing(state.stats, stats))

    return optax.GradientTransformation(init_fn, update_fn)


def tensor_norm(
    max_norm: float | jax.Array, *, axis_name: _numerics.AxisName | None = None
) -> optax.GradientTransformation:
    r"""Clips each leaf of the update to a maximum L2 norm of its own.

    .. math::

        g_i \leftarrow g_i \cdot \min\left(1, \frac{c}{\lVert g_i \rVert_2}\right)
        \quad \text{for every leaf } g_i

    Keras' ``clipnorm`` and TensorFlow's ``tf.clip_by_norm`` applied tensor by
    tensor. Norms are accumulated in float32 (float64 for float64 leaves); a
    zero norm or a zero threshold gives no NaN; leaves below the threshold are
    returned bit for bit (but for subnormal floats on XLA's CPU backend, as
    for `global_norm`).

    Args:
      max_norm: the per-leaf threshold ``c ≥ 0`` (a number, or a scalar array
        for ``optax.inject_hyperparams``).
      axis_name: inside ``shard_map``/``pmap`` where each device holds a shard
        of the leaves, the mapped axis to sum each leaf's squares over (a
        replicated leaf counts once, as in `global_norm`).

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`:
      ``norm`` is the largest per-leaf norm before clipping, ``threshold`` is
      ``c``, ``scale`` the fraction of leaves clipped, ``clipped`` whether any was.

    Reference:
      Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural
      networks", ICML 2013 (the norm rule, here per tensor).

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = clipx.tensor_norm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> {k: [round(float(u), 4) for u in v] for k, v in updates.items()}
      {'a': [0.6, 0.8], 'b': [0.3, 0.4]}
      >>> round(float(clipx.stats(state)["tensor_norm/scale"]), 4)
      0.5
    """
    max_norm = _validate.check_nonnegative("max_norm", max_norm)
    return _per_leaf_clip(max_norm, TensorNormState, axis_name, per_entry=False)


def block_rms(
    threshold: float | jax.Array, *, axis_name: _numerics.AxisName | None = None
) -> optax.GradientTransformation:
    r"""Clips each leaf of the update to a maximum root-mean-square.

    .. math::

        g_i \leftarrow \frac{g_i}{\max\left(1, \operatorname{rms}(g_i) / c\right)},
        \qquad \operatorname{rms}(g_i) = \sqrt{\tfrac{1}{n_i} \textstyle\sum |g_i|^2}

    The rule of ``optax.clip_by_block_rms`` (a block is one leaf: a weight
    vector, matrix or kernel), with the RMS accumulated in float32 (float64 for
    float64 leaves) and no NaN for zero gradients, zero thresholds or empty
    leaves. Unlike `tensor_norm` the threshold does not grow with the size of
    the leaf.

    Args:
      threshold: the largest RMS ``c ≥ 0`` a leaf keeps (a number, or a scalar
        array for ``optax.inject_hyperparams``).
      axis_name: inside ``shard_map``/``pmap`` where each device holds a shard
        of the leaves, the mapped axis to sum squares and entry counts over (a
        replicated leaf counts once, as in `global_norm`).

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`:
      ``norm`` is the largest per-leaf RMS before clipping, ``threshold`` is
      ``c``, ``scale`` the fraction of leaves clipped, ``clipped`` whether any was.

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = clipx.block_rms(1.0)
      >>> updates, state = tx.update(jnp.array([4.0, -4.0, 4.0, -4.0]), tx.init(None))
      >>> updates.round(4)
      Array([ 1., -1.,  1., -1.], dtype=float32)
      >>> round(float(clipx.stats(state)["block_rms/norm"]), 4)
      4.0
    """
    threshold = _validate.check_nonnegative("threshold", threshold)
    return _per_leaf_clip(threshold, BlockRMSState, axis_name, per_entry=True)
