"""Norms of pytrees and the scale that clips them, in safe arithmetic.

Every clipx transform measures with these helpers, so the numerics are the
same everywhere:

* squares are summed in float32 at least (float64 for float64/complex128
  leaves), so float16 gradients never overflow while measuring and bfloat16
  ones are summed at float32 precision (bfloat16 has float32's range: as in
  float32, entries above about 1.8·10¹⁹ overflow the sum of squares, and the
  norm is then infinite; at the other end, squares below float32's normal
  range, of entries below about 1.1·10⁻¹⁹, are flushed to zero by XLA, so a
  tree of such entries has norm 0);
* the square root and the division are guarded, so zero gradients, zero
  thresholds and empty trees give finite values *and* finite derivatives;
* scaling is one multiply per leaf by a scalar cast to the leaf's dtype, which
  XLA fuses into whatever consumes the update next;
* work done leaf by leaf, or group by group, is jitted when traced
  (`jit_when_traced`): JAX traces and lowers it once per leaf shape and dtype
  instead of once per leaf, and XLA inlines it, so the compiled step is the
  same. On 1000 leaves this took the tracing and lowering of a clipped Adam
  step from 1.1–2.8× plain Adam's to 1.0–1.2× (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clipx import _devices
from clipx._devices import AxisName

PyTree = Any


def jit_when_traced(fn: Callable) -> Callable:
    """``fn``, called through ``jax.jit`` when any of its arguments is a tracer.

    Inside a traced step, work done leaf by leaf (or group by group) is then
    traced and lowered once per shape and dtype of its arguments rather than
    once per call; XLA inlines the call, so the compiled step is unchanged.
    Called on concrete arrays, ``fn`` runs op by op as usual, so an update
    run eagerly does not compile a new function at every step.
    """
    jitted = jax.jit(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
        return jitted(*args) if traced else fn(*args)

    return call


@functools.cache
def _has_infinity(dtype: Any) -> bool:
    """Whether the floating ``dtype`` has ``±∞`` (the float8 formats ``e4m3fn`` and ``*fnuz`` do not)."""
    with np.errstate(invalid="ignore"):
        return bool(np.isinf(np.asarray(np.inf, np.float32).astype(dtype)))


def as_dtype(value: Any, dtype: Any) -> jax.Array:
    """``value`` as a ``dtype`` array; a number past the dtype's range becomes ``±∞``.

    That is what the cast rounds it to, and for a threshold it means the same
    (never clip); only NumPy's overflow warning is left out. A dtype without
    infinities would turn such a number into NaN; it becomes the dtype's
    largest value instead, which bounds every entry as ``∞`` would.
    """
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and not _has_infinity(dtype):
        largest = float(jnp.finfo(dtype).max)
        if isinstance(value, jax.Array):
            value = jnp.clip(value, -largest, largest)
        else:
            value = min(max(value, -largest), largest)
    with np.errstate(over="ignore"):
        return jnp.asarray(value, dtype)


def largest_log(dtype: Any) -> np.floating:
    """The largest ``dtype`` value ``x`` below ``log(max)`` whose ``exp(x)`` is finite.

    A threshold held as its logarithm is capped here: a huge one means no
    clipping, not a threshold of ∞ (which ``jax_debug_infs`` would stop at).
    """
    log_largest = np.log(jnp.finfo(dtype).max)
    return np.nextafter(log_largest, log_largest.dtype.type(0))


def at_most_largest(value: Any, dtype: Any) -> Any:
    """``value`` as a ``dtype`` scalar, ∞ (or a number past the range) made the largest float.

    For a threshold that means no clipping of a finite norm, and the zero scale
    of one that overflows. A Python number is capped at once, to a NumPy scalar
    (no operation in the traced step), a JAX array in the step.
    """
    largest = jnp.finfo(dtype).max
    if isinstance(value, jax.Array):
        return jnp.minimum(value.astype(dtype), largest)
    return np.asarray(min(value, float(largest)), dtype)


def log_of(value: Any, dtype: Any) -> Any:
    """``log(value)`` as a ``dtype`` scalar: of a Python number computed at once (no operation
    in the traced step), of a JAX array (an injected hyperparameter) in the step."""
    if isinstance(value, jax.Array):
        return jnp.log(value.astype(dtype))
    return np.log(np.asarray(value, dtype))  # a NumPy scalar of a number (or of `at_most_largest`'s)


def hyperparameter(value: Any, dtype: Any) -> Any:
    """A hyperparameter ready to meet ``dtype`` values: a JAX array is cast to ``dtype`` (`as_dtype`).

    A Python number is returned as it is (weakly typed, it takes the dtype of
    what it meets). A JAX array keeps its own dtype in arithmetic, and under
    ``jax_numpy_dtype_promotion="strict"`` JAX will not mix, say, a bfloat16
    array (``optax.inject_hyperparams(..., hyperparam_dtype=jnp.bfloat16)``)
    with float32 statistics. A finite number past the range of ``dtype`` is
    cast (to ``±∞``) here, where NumPy's overflow warning is left out.
    """
    if not isinstance(value, numbers.Number):
        return as_dtype(value, dtype)
    size = abs(float(value)) if isinstance(value, numbers.Real) else 0.0  # checked numbers are floats
    past_range = math.isfinite(size) and size > float(jnp.finfo(dtype).max)
    return as_dtype(value, dtype) if past_range else value


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype norms of ``dtype`` values are accumulated in.

    float64 (or complex128) stays float64; everything else is float32.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def summation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype values of ``dtype`` are summed in: `accumulation_dtype`, complex for complex ``dtype``.

    complex64 (and any narrower complex) sums in complex64, complex128 in
    complex128. Written without type promotion, so it also holds under
    ``jax_numpy_dtype_promotion="strict"``.
    """
    acc = accumulation_dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.complexfloating):
        return acc
    return jnp.dtype(jnp.complex128) if acc == jnp.dtype(jnp.float64) else jnp.dtype(jnp.complex64)


def tree_accumulation_dtype(tree: PyTree) -> jnp.dtype:
    """The widest accumulation dtype of the leaves of ``tree`` (float32 if empty; Python numbers too)."""
    dtypes = [accumulation_dtype(jnp.result_type(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


def squared(x: jax.Array) -> jax.Array:
    """``|x|²`` element-wise, in the accumulation dtype of ``x``."""
    x = jnp.asarray(x)
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    return jnp.square(x.astype(acc))


# The most entries XLA's CPU backend sums over the leading axes at speed (`sum_over`).
_LONG_ROW = 8192


def sum_over(y: jax.Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> jax.Array:
    """``jnp.sum(y, axis, keepdims)``, on the CPU as a matrix-vector product where rows are long.

    XLA's CPU backend sums the leading axes of a row-major array slowly once
    what is left is long: on a 2-core CPU, the squares of a 768×50257
    float32 array (a Dense kernel onto a vocabulary) summed over axis 0 took
    400–460 ms, against 10 ms for their total (768×12×4096: 380 ms). So a
    sum over the leading axes that leaves more than 8192 entries is the
    product of a vector of ones with them (65–70 ms; the summed values are
    written out once, a temporary the size of ``y``). Sharded, it moves what
    the sum would: nothing for sharded trailing axes, one vector for a
    sharded leading one. Other backends, and other sums, are ``jnp.sum``.
    """
    if axis is None:
        return jnp.sum(y, keepdims=keepdims)
    axes = tuple(sorted(a % y.ndim for a in (axis if isinstance(axis, tuple) else (axis,))))
    lead = len(axes)
    if not 0 < lead < y.ndim or axes != tuple(range(lead)) or math.prod(y.shape[lead:]) <= _LONG_ROW:
        return jnp.sum(y, axis=axes, keepdims=keepdims)

    def product(y: jax.Array) -> jax.Array:
        ones = jnp.ones(y.shape[:lead], y.dtype)
        return jnp.tensordot(ones, y, axes=lead, precision=jax.lax.Precision.HIGHEST)

    total = jax.lax.platform_dependent(y, cpu=product, default=lambda y: jnp.sum(y, axis=axes))
    return total.reshape((1,) * lead + total.shape) if keepdims else total


def sum_of_squares(
    x: jax.Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
) -> jax.Array:
    """``Σ |x|²`` over ``axis`` (all axes by default), accumulated in float32 or wider (`sum_over`)."""
    return sum_over(squared(x), axis=axis, keepdims=keepdims)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``√x`` for ``x ≥ 0`` whose derivative is 0, not inf, at ``x = 0``; NaN stays NaN."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), jnp.where(jnp.isnan(x), x, 0))


# Leaves with fewer entries than this are reduced together, several per kernel.
SMALL_LEAF = 1 << 14
# How many same-shaped small leaves one variadic reduction takes.
_LEAVES_PER_REDUCTION = 16


class Reduction(NamedTuple):
    """An associative, commutative reduction: its binary step, its full ``jnp`` form, its identity.

    ``by_bits``: inside a variadic reduction, reduce the bit patterns of the
    floats' absolute values as integers (see `MAX_NONNEGATIVE`).
    """

    combine: Callable[[jax.Array, jax.Array], jax.Array]
    full: Callable[[jax.Array], jax.Array]
    identity: Any
    by_bits: bool = False


SUM = Reduction(jnp.add, jnp.sum, 0)
# The maximum of values known to be ≥ 0. Non-negative floats order like their bit patterns
# read as integers, a NaN (its sign cleared) above inf, and XLA's CPU backend reduces
# integers faster: a step of `value` chained with Adam took 1.03-1.04x plain Adam's with
# the maxima reduced as integers, 1.05-1.07x as floats (benchmarks/RESULTS.md).
MAX_NONNEGATIVE = Reduction(jnp.maximum, jnp.max, 0, by_bits=True)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """The bits of ``|x|`` as a signed integer of the same width: ordered like ``|x|``, NaN last."""
    return jax.lax.bitcast_convert_type(jnp.abs(x), jnp.dtype(f"int{8 * x.dtype.itemsize}"))


def _fused_reduce(operands: tuple[jax.Array, ...], reductions: tuple[Reduction, ...]) -> tuple:
    """``tuple(r.full(x) for r, x in zip(reductions, operands))`` as one variadic ``lax.reduce``.

    Its derivative is that of the separate reductions (JAX cannot differentiate
    a variadic reduce whose operands include a non-differentiable one).
    """

    @jax.custom_jvp
    def run(*ops: jax.Array) -> tuple:
        keys = tuple(_ordered_bits(x) if r.by_bits else x for r, x in zip(reductions, ops, strict=True))
        inits = tuple(jnp.asarray(r.identity, k.dtype) for r, k in zip(reductions, keys, strict=True))

        def combine(acc: tuple, x: tuple) -> tuple:
            return tuple(r.combine(a, b) for r, a, b in zip(reductions, acc, x, strict=True))

        totals = jax.lax.reduce(keys, inits, combine, tuple(range(ops[0].ndim)))
        return tuple(
            jax.lax.bitcast_convert_type(t, x.dtype) if r.by_bits else t
            for r, t, x in zip(reductions, totals, ops, strict=True)
        )

    @run.defjvp
    def run_jvp(primals: tuple, tangents: tuple) -> tuple:
        def separate(*ops: jax.Array) -> tuple:
            # A zero-size operand has its reduction's identity (jnp.max refuses one).
            return tuple(
                r.full(x) if x.size else jnp.asarray(r.identity, x.dtype)
                for r, x in zip(reductions, ops, strict=True)
            )

        return run(*primals), jax.jvp(separate, primals, tangents)[1]

    return run(*operands)


def max_nonnegative(x: jax.Array, axis_name: AxisName | None = None) -> jax.Array:
    """The largest entry of ``x``, whose entries are ≥ 0 or NaN: NaN if one is, 0 if there is none.

    Reduced as integers (`MAX_NONNEGATIVE`): XLA's CPU backend drops NaN from a
    float maximum over a few thousand entries or more, and from one across
    devices. With ``axis_name``, over the devices of that mapped axis too. The
    derivative is that of ``jnp.max`` (none across devices).
    """
    (largest,) = _fused_reduce((jnp.asarray(x),), (MAX_NONNEGATIVE,))
    if axis_name is not None:
        largest = jax.lax.bitcast_convert_type(jax.lax.pmax(_ordered_bits(largest), axis_name), largest.dtype)
    return largest


def _chunks(keyed: list[tuple[int, Any]]) -> list[list[int]]:
    """Indices of ``(index, key)`` pairs grouped by key, at most ``_LEAVES_PER_REDUCTION`` per chunk.

    A ``None`` key (a large leaf) makes a chunk of its own. Chunks come in
    the order of their first member.
    """
    groups: dict[Any, list[int]] = {}
    for i, key in keyed:
        groups.setdefault(("large", i) if key is None else key, []).append(i)
    return [
        members[start : start + _LEAVES_PER_REDUCTION]
        for members in groups.values()
        for start in range(0, len(members), _LEAVES_PER_REDUCTION)
    ]


def is_small(leaf: jax.Array) -> bool:
    """Whether ``leaf`` is reduced together with others of its shape."""
    return jnp.size(leaf) < SMALL_LEAF


def sums_of_squares_together(
    x: jax.Array, y: jax.Array, axis: int | tuple[int, ...] | None = None
) -> tuple[jax.Array, jax.Array]:
    """``sum_of_squares(·, axis, keepdims=True)`` of ``x`` and ``y`` (one shape), accumulated as for ``x``.

    For a small ``x`` (below ``SMALL_LEAF`` entries) the squares are stacked
    and summed by one reduction: XLA's CPU backend compiles it faster than
    two, and its kernel reads both arrays in one pass (AGC's unit norms of
    gradients and weights at 1000 leaves: benchmarks/RESULTS.md). Larger
    arrays are summed apart, since XLA would write the stack to memory.
    """
    acc = accumulation_dtype(x.dtype)
    if not is_small(x):
        return sum_of_squares(x, axis, keepdims=True), sum_of_squares(y, axis, keepdims=True).astype(acc)
    axes = tuple(range(x.ndim)) if axis is None else (axis,) if isinstance(axis, int) else axis
    stacked = jnp.stack([squared(x), squared(y).astype(acc)])
    both = jnp.sum(stacked, axis=tuple(a % x.ndim + 1 for a in axes), keepdims=True)
    return both[0], both[1]


def leaf_sums_of_squares(leaves: list[jax.Array]) -> list[jax.Array]:
    """``Σ |x|²`` of each array in ``leaves`` (accumulation dtype), as a list in the same order.

    Equal to ``[sum_of_squares(x) for x in leaves]``, but cheaper to compile
    for trees of many small leaves: leaves below ``SMALL_LEAF`` entries are
    grouped by shape and dtype, and each group of up to
    ``_LEAVES_PER_REDUCTION`` is summed by one variadic ``lax.reduce``. XLA's
    CPU backend compiles every small full reduction as three kernels (map,
    partial reduce-window, final reduce) that each cost milliseconds to
    compile, so a 1000-leaf model paid more to compile its per-leaf norms than
    its whole Adam update. Larger leaves keep ``jnp.sum``, whose tree-shaped
    reduction is more accurate, runs on all cores and fuses the square. Every
    leaf is reduced where it lives: no concatenation, so sharded leaves never
    move between devices.
    """
    out: list[Any] = [None] * len(leaves)
    keyed: list[tuple[int, Any]] = []
    for i, leaf in enumerate(leaves):
        if is_small(leaf):
            keyed.append((i, (jnp.shape(leaf), leaf.dtype)))
        else:
            out[i] = _sum_of_squares(leaf)
    for chunk in _chunks(keyed):
        sums = _grouped_sums_of_squares(*(leaves[i] for i in chunk))
        for i, total in zip(chunk, sums, strict=True):
            out[i] = total
    return out


@jit_when_traced
def _sum_of_squares(leaf: jax.Array) -> jax.Array:
    """``Σ |x|²`` of one leaf, by ``jnp.sum``."""
    return jnp.sum(squared(leaf))


@jit_when_traced
def _grouped_sums_of_squares(*leaves: jax.Array) -> tuple[jax.Array, ...]:
    """``Σ |x|²`` of each of several small leaves, in one variadic reduction."""
    return _fused_reduce(tuple(squared(x) for x in leaves), (SUM,) * len(leaves))


def tree_reductions(
    leaves: list[jax.Array],
    elementwise: Callable[..., tuple[jax.Array, ...]],
    reductions: tuple[Reduction, ...],
    dtypes: tuple[Any, ...],
    partners: list[jax.Array] | None = None,
) -> tuple[jax.Array, ...]:
    """Reductions over every entry of every leaf: ``k`` scalars, the ``j``-th in ``dtypes[j]``.

    ``elementwise(x)`` maps a leaf to ``k`` arrays of its shape (with
    ``partners``, arrays shaped like the leaves, ``elementwise(x, y)`` maps
    a leaf and its partner); the ``j``-th result is ``reductions[j]`` over
    the ``j``-th array of all leaves (its identity for no leaves). Only
    totals are needed, so small leaves (below
    ``SMALL_LEAF`` entries) of one shape are first combined element-wise by
    each reduction's binary step, up to ``_LEAVES_PER_REDUCTION`` at a time,
    and each group is reduced once: one kernel per group with one accumulator
    per reduction, which XLA compiles far faster than per-leaf reductions
    (see benchmarks/RESULTS.md). A single reduction uses its ``full`` form
    (``jnp.sum`` is tree-shaped and accurate; ``MAX_NONNEGATIVE`` is
    therefore paired with another, as its ``jnp.max`` would lose a NaN);
    several share one variadic ``lax.reduce``, so a leaf is read once. Large
    leaves are reduced one by one, where they live. Each group's work is one
    jitted call, traced once per shape, dtype and group size. Small
    same-shaped leaves sharded differently are moved to a common layout to
    be combined: at most ``SMALL_LEAF`` entries each, never a large gradient.
    """
    parts, _ = _reduce_chunks(leaves, elementwise, reductions, dtypes, tie_large=False, partners=partners)
    return _totals(parts, reductions, dtypes)


def tree_reductions_beside_leaves(
    leaves: list[jax.Array],
    elementwise: Callable[[jax.Array], tuple[jax.Array, ...]],
    reductions: tuple[Reduction, ...],
    dtypes: tuple[Any, ...],
) -> tuple[tuple[jax.Array, ...], list[jax.Array]]:
    """`tree_reductions`, and ``leaves`` with each large leaf read after its own reduction.

    For rules whose clip of a leaf needs nothing from the other leaves (the
    statistics are the only reduction): on XLA's CPU backend each large leaf
    is passed on through an ``optimization_barrier`` with its reduction's
    result, so the kernels that read the leaf next (Adam's, when chained)
    run after the reduction while the leaf is still in cache. The
    statistics' extra read of the gradients then cost 3-6% of an Adam step
    instead of 9-10% on an AMD EPYC; on an Intel Xeon it cost 17% with the
    tie and 13-14% without (benchmarks/RESULTS.md). On other backends, whose XLA
    can fuse a reduction with the kernels sharing its input and where the
    tie was not measured, the leaves are returned untouched. The values
    are the same either way.
    """
    tie_large = jax.default_backend() == "cpu"
    parts, out = _reduce_chunks(leaves, elementwise, reductions, dtypes, tie_large=tie_large)
    return _totals(parts, reductions, dtypes), out


def _reduce_chunks(
    leaves: list[jax.Array],
    elementwise: Callable[..., tuple[jax.Array, ...]],
    reductions: tuple[Reduction, ...],
    dtypes: tuple[Any, ...],
    tie_large: bool,
    partners: list[jax.Array] | None = None,
) -> tuple[list[tuple[jax.Array, ...]], list[jax.Array]]:
    """Each chunk's reductions (its part), and the leaves, each large one tied to its part if asked."""
    arity = 1 if partners is None else 2
    reduce_chunk = jit_when_traced(functools.partial(_reduce_chunk, elementwise, reductions, arity))
    keyed = [
        (
            i,
            (jnp.shape(leaf), leaf.dtype, None if partners is None else partners[i].dtype)
            if is_small(leaf)
            else None,
        )
        for i, leaf in enumerate(leaves)
    ]
    out = list(leaves)
    parts = []
    for chunk in _chunks(keyed):
        args = (
            [leaves[i] for i in chunk]
            if partners is None
            else [x for i in chunk for x in (leaves[i], partners[i])]
        )
        part = reduce_chunk(*args)
        if tie_large and not is_small(leaves[chunk[0]]):  # a large leaf is a chunk of its own
            out[chunk[0]], part = jax.lax.optimization_barrier((leaves[chunk[0]], part))
        parts.append(part)
    return parts, out


def _totals(
    parts: list[tuple[jax.Array, ...]], reductions: tuple[Reduction, ...], dtypes: tuple[Any, ...]
) -> tuple:
    """The ``j``-th reduction over the ``j``-th value of every chunk's part (its identity for none)."""

    def total(r: Reduction, values: list[jax.Array], dtype: Any) -> jax.Array:
        if not values:
            return jnp.asarray(r.identity, dtype)
        stacked = jnp.stack([v.astype(dtype) for v in values])
        return _fused_reduce((stacked,), (r,))[0] if r.by_bits else r.full(stacked)

    pairs = zip(reductions, dtypes, strict=True)
    return tuple(total(r, [p[j] for p in parts], dtype) for j, (r, dtype) in enumerate(pairs))


def _reduce_chunk(
    elementwise: Callable[..., tuple[jax.Array, ...]],
    reductions: tuple[Reduction, ...],
    arity: int,
    *arrays: jax.Array,
) -> tuple[jax.Array, ...]:
    """The reductions over same-shaped leaves, combined element-wise first (see `tree_reductions`).

    ``arrays`` holds each leaf followed by its ``arity − 1`` partners.
    """
    values = [tuple(elementwise(*arrays[i : i + arity])) for i in range(0, len(arrays), arity)]
    combined = tuple(functools.reduce(r.combine, [v[j] for v in values]) for j, r in enumerate(reductions))
    return _fused_reduce(combined, reductions) if len(reductions) > 1 else (reductions[0].full(combined[0]),)


def tree_sum_of_squares(tree: PyTree, axis_name: AxisName | None = None) -> jax.Array:
    """``Σ_leaves Σ |g|²`` of a pytree, summed over the devices of ``axis_name`` if given.

    Small same-shaped leaves are squared and added element-wise before one
    ``jnp.sum`` per group (`tree_reductions`). On 1000 leaves of 40×100 this
    compiled the clipped Adam step in 1.20× and 1.23× plain Adam's CPU time
    (two probes), against 1.40× and 1.44× for the per-leaf sums of
    `leaf_sums_of_squares`.
    """
    acc = tree_accumulation_dtype(tree)
    leaves = jax.tree.leaves(tree)

    def total(indices: list[int]) -> jax.Array:
        return tree_reductions([leaves[i] for i in indices], lambda x: (squared(x),), (SUM,), (acc,))[0]

    return _devices.sum_of_parts(leaves, axis_name, total)


def tree_norm(tree: PyTree, axis_name: AxisName | None = None) -> jax.Array:
    """Global L2 norm ``‖g‖ = √(Σ_leaves Σ |g|²)`` of a pytree.

    ``None`` and ``optax.MaskedNode`` leaves contribute nothing; an empty tree
    has norm 0. The result is float32 (float64 if any leaf is float64). Inside
    ``shard_map``/``pmap``, ``axis_name`` names the mapped axis whose shards
    together hold the tree: only the scalar sum of squares crosses devices
    (a leaf replicated over it is counted once under ``shard_map``: `_devices`).
    """
    return safe_sqrt(tree_sum_of_squares(tree, axis_name))


def magnitude(x: jax.Array) -> jax.Array:
    """``|x|`` element-wise (the modulus of a complex ``x``), in the accumulation dtype of ``x``."""
    x = jnp.asarray(x)
    return jnp.abs(x).astype(accumulation_dtype(x.dtype))


def tree_max_magnitude(tree: PyTree, axis_name: AxisName | None = None) -> jax.Array:
    """``max |g|`` over every entry of a pytree (its ∞-norm): NaN if an entry is, 0 for no entry.

    Reduced as integers (`MAX_NONNEGATIVE`) in one variadic reduction with the
    finiteness sum of `tree_all_finite`, ``Σ |g|·2⁻¹⁰⁰``, in the groups of
    `tree_reductions`; with ``axis_name``, over the devices of that mapped
    axis too (a leaf held whole by every device changes no maximum). The
    sum is NaN exactly where the maximum is, and selecting on it keeps it in
    the program: an integer maximum alone over 50 leaves of 4000×100 took
    XLA's CPU backend 41 ms and 76 MiB of temporary memory (it wrote the bit
    patterns out first), against 3.0 ms and none beside the sum
    (benchmarks/RESULTS.md).
    """
    acc = tree_accumulation_dtype(tree)
    leaves = jax.tree.leaves(tree)
    largest, weight = tree_reductions(
        leaves, lambda x: (magnitude(x), _finite_weight(x)), (MAX_NONNEGATIVE, SUM), (acc, acc)
    )
    largest = jnp.where(jnp.isnan(weight), weight, largest)
    return largest if axis_name is None else max_nonnegative(largest, axis_name)


def _safe_root(x: jax.Array, order: float) -> jax.Array:
    """``x^(1/order)`` for ``x ≥ 0`` with a finite derivative at ``x = 0`` (see `safe_sqrt`)."""
    positive = x > 0
    root = jnp.power(jnp.where(positive, x, 1), 1 / order)
    return jnp.where(positive, root, jnp.where(jnp.isnan(x), x, 0))


def tree_norm_of_order(tree: PyTree, order: float, axis_name: AxisName | None = None) -> jax.Array:
    r"""Global ``p``-norm ``‖g‖_p = (Σ_leaves Σ |g|^p)^{1/p}`` of a pytree, ``1 ≤ p ≤ ∞``.

    ``p = 2`` is `tree_norm`, ``p = ∞`` is `tree_max_magnitude` and ``p = 1``
    sums ``|g|``; each reads the gradients once. Any other ``p`` reads them
    twice: it sums ``(|g|/m)^p`` with ``m = max |g|``, so that no power
    overflows (float32's range ends at ``3.4·10³⁸``, which ``|g|^p`` passes
    for ``|g| = 10⁴`` at ``p = 10``), and returns ``m·(Σ (|g|/m)^p)^{1/p}``.
    As in `tree_norm`: float32 at least, no NaN and finite derivatives for a
    zero tree, and with ``axis_name`` the sums run over the devices of that
    mapped axis, a leaf held whole by every device counted once.
    """
    if order == 2:
        return tree_norm(tree, axis_name)
    if order == math.inf:
        return tree_max_magnitude(tree, axis_name)
    acc = tree_accumulation_dtype(tree)
    leaves = jax.tree.leaves(tree)

    def total_of(powers: Callable[[jax.Array], jax.Array]) -> jax.Array:
        def total(indices: list[int]) -> jax.Array:
            chunk = [leaves[i] for i in indices]
            return tree_reductions(chunk, lambda x: (powers(x),), (SUM,), (acc,))[0]

        return _devices.sum_of_parts(leaves, axis_name, total)

    if order == 1:
        return total_of(magnitude)
    largest = tree_max_magnitude(tree, axis_name)
    positive = (largest > 0) & (largest <= jnp.finfo(largest.dtype).max)  # finite and not 0
    # m·(Σ (|g|/m)^p)^{1/p} does not depend on m: held constant under differentiation, as its
    # terms' derivatives cancel only in exact arithmetic (the derivative was off for entries
    # below 10⁻²⁰ in float32, and NaN above 10³⁰).
    unit = jax.lax.stop_gradient(jnp.where(positive, largest, 1))
    # 1/m as two factors 2^-h and 2^(h-e)/f, where m = f·2^e: both normal, where 1/m is
    # subnormal past m ≈ 8.5·10³⁷ in float32 and XLA's CPU backend flushes it to 0.
    mantissa, exponent = jnp.frexp(unit)
    half = exponent // 2
    coarse, fine = jnp.ldexp(jnp.ones_like(unit), -half), jnp.ldexp(1 / mantissa, half - exponent)

    def relative_power(x: jax.Array) -> jax.Array:
        # |x·2^-h·(2^(h-e)/f)|, not |x|/m: XLA's CPU backend wrote |x| to memory to share it with
        # the maximum's pass (77 MiB at 20M parameters, 3.08× plain Adam's step; benchmarks/RESULTS.md).
        acc = accumulation_dtype(x.dtype)
        first, second = coarse.astype(acc), fine.astype(acc)

        def relative(part: jax.Array) -> jax.Array:
            return part.astype(acc) * first * second

        if jnp.iscomplexobj(x):
            ratio = jnp.hypot(relative(jnp.real(x)), relative(jnp.imag(x)))
        else:
            ratio = jnp.abs(relative(x))
        if float(order).is_integer():  # a product (lax.integer_pow), not exp(p·log r)
            return jax.lax.integer_pow(ratio, int(order))
        return jnp.power(ratio, order)

    # The largest entry adds exactly 1, but its ratio may round to 1 − 2⁻²⁴, whose power
    # underflows to 0 for orders past about 10⁹: the sum is at least 1 where m > 0.
    total_power = total_of(relative_power)
    total_power = jnp.where(positive, jnp.maximum(total_power, 1), total_power)
    norm = unit * _safe_root(total_power, order)
    # An infinite or NaN entry gives ∞ or NaN, not ∞/∞ (tested against the largest finite
    # float, not ∞: an ∞ constant would stop jax_debug_infs).
    return jnp.where(positive | (largest == 0), norm, largest)


def real_product(x: jax.Array, y: jax.Array) -> jax.Array:
    """``Re(x · conj(y))`` element-wise, in the accumulation dtype of ``x``."""
    acc = accumulation_dtype(x.dtype)
    if not (jnp.iscomplexobj(x) or jnp.iscomplexobj(y)):
        return x.astype(acc) * y.astype(acc)
    real = jnp.real(x).astype(acc) * jnp.real(y).astype(acc)
    return real + jnp.imag(x).astype(acc) * jnp.imag(y).astype(acc)


def leaf_squared_norms(leaves: list[jax.Array], axis_name: AxisName | None = None) -> list[jax.Array]:
    """``‖x‖² = Σ |x|²`` of each array in ``leaves`` (summed over ``axis_name`` if given), as scalars."""
    return _devices.sum_each(
        leaves, axis_name, lambda indices: leaf_sums_of_squares([leaves[i] for i in indices])
    )


def leaf_norms(tree: PyTree, axis_name: AxisName | None = None) -> PyTree:
    """The L2 norm of each leaf, as a pytree of scalars shaped like ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [safe_sqrt(q) for q in leaf_squared_norms(leaves, axis_name)])


@jax.custom_jvp
def _quotient(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, differentiated without squaring ``denominator``.

    JAX differentiates a quotient ``t / n`` through ``n⁻²``, which overflows
    float32 for ``n`` below about 5·10⁻²⁰ (a p-norm of tiny gradients): the
    derivative was ∞, or NaN where ``t = 0``. Here it is ``(dt − (t/n)·dn) / n``.
    """
    return numerator / denominator


@_quotient.defjvp
def _quotient_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]) -> Any:
    numerator, denominator = primals
    d_numerator, d_denominator = tangents
    quotient = numerator / denominator
    return quotient, (d_numerator - quotient * d_denominator) / denominator


def clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """``min(1, threshold / norm)`` with no NaN and finite derivatives.

    Exactly 1 when ``norm ≤ threshold`` (so unclipped updates are bit-identical),
    0 when the threshold is 0 and the norm positive, and 0 for an infinite norm.
    A NaN ``norm`` gives 1: the update keeps its NaN entries (the caller's
    guard decides what to do with them).
    """
    norm = jnp.asarray(norm)
    threshold = as_dtype(threshold, norm.dtype)
    above = norm > threshold
    return jnp.where(above, _quotient(threshold, jnp.where(above, norm, 1)), jnp.ones_like(norm))


def clip_scale_of_square(squared: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """`clip_scale` ``min(1, threshold / m)`` of a measure ``m`` given as ``squared = m²``.

    Per-leaf rules compute each leaf's scale this way: a few scalar
    operations, fused into the kernel that scales the leaf when only one
    kernel reads the scale, and one small kernel per leaf when several do
    (Adam's two moment kernels). Scales sliced out of one vector computed for
    all leaves compiled several times slower: XLA copies a multiply over the
    whole vector into every kernel reading a slice (benchmarks/RESULTS.md).
    The scale is ``t / √m²`` where ``m² > t²`` and exactly 1 elsewhere,
    selected, not computed: ``t / √max(m², t²)``, which needs no select, is
    not exactly 1 at ``m ≤ t`` once XLA has rewritten it as
    ``t · rsqrt(max(m², t²))``, and under ``jax.jit`` changed unclipped leaves
    by an ulp for about a third of thresholds. The same edge cases as
    `clip_scale`: 0 for a zero threshold and a positive measure, 0 for an
    infinite one (but for an *array* threshold whose square overflows,
    above about 1.8·10¹⁹ in float32, which leaves it unclipped: testing that
    case in every kernel cost 16% of AGC's compile time).
    """
    squared = jnp.asarray(squared)
    largest_root = math.sqrt(float(jnp.finfo(squared.dtype).max))
    if isinstance(threshold, numbers.Real) and float(threshold) > largest_root:
        # A finite t whose square overflows: only a measure that overflowed is above it.
        return jnp.where(jnp.isposinf(squared) & math.isfinite(threshold), 0, 1).astype(squared.dtype)
    threshold = jnp.asarray(threshold, squared.dtype)
    above = squared > threshold * threshold
    # t/√m², not t·rsqrt(m²): the derivative of rsqrt, formed as rsqrt(m²)/m², overflows for
    # the tiny measures above a tiny threshold (t = 10⁻¹⁵), where that of the quotient does not.
    return jnp.where(above, threshold / jnp.sqrt(jnp.where(above, squared, 1)), jnp.ones_like(squared))


def scale_leaf(leaf: jax.Array, scale: jax.Array) -> jax.Array:
    """``leaf · scale``, computed in the accumulation dtype and cast back once.

    ``scale`` is a real scalar or an array broadcastable to ``leaf``; the
    product is rounded to ``leaf.dtype`` a single time, so a float16 or
    bfloat16 leaf is not scaled by an already-rounded factor. A complex leaf
    has its real and imaginary parts scaled apart: a complex product by
    ``scale + 0i`` would turn ``-0 - 1i`` into ``+0 - 1i`` and ``1 + inf·i``
    into ``nan + inf·i`` at a scale of 1.
    """
    if jnp.iscomplexobj(leaf):
        return jax.lax.complex(scale_leaf(leaf.real, scale), scale_leaf(leaf.imag, scale))
    acc = accumulation_dtype(leaf.dtype)
    return (leaf.astype(acc) * jnp.asarray(scale).astype(acc)).astype(leaf.dtype)


def scale_tree(tree: PyTree, scale: jax.Array) -> PyTree:
    """Multiplies every leaf of ``tree`` by the scalar ``scale`` (see `scale_leaf`)."""
    return jax.tree.map(lambda leaf: scale_leaf(leaf, scale), tree)


# |x| is scaled by 2⁻¹⁰⁰ before it is summed, so a sum of finite values cannot overflow:
# the largest float32 becomes 2.7e8, and 10¹² of those sum to 2.7e20.
_FINITE_SCALE = 2.0**-100


def _finite_weight(x: jax.Array) -> jax.Array:
    """``|x|·2⁻¹⁰⁰`` entry-wise (both parts of a complex ``x``): finite exactly where ``x`` is."""
    acc = accumulation_dtype(x.dtype)
    # Scaled before |·|: XLA factors |a|·c + |b|·c into (|a| + |b|)·c, which can overflow.
    weight = lambda part: jnp.abs(part.astype(acc) * jnp.asarray(_FINITE_SCALE, acc))  # noqa: E731
    return weight(jnp.real(x)) + weight(jnp.imag(x)) if jnp.iscomplexobj(x) else weight(x)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every entry of every leaf is finite (True for an empty tree).

    Tested as ``isfinite(Σ |x|·2⁻¹⁰⁰)`` for each chunk of `tree_reductions`
    (a large leaf, or small leaves of one shape): a NaN or ±∞ carries through
    the sum (an ∞ stays ∞, no NaN is made), and finite entries cannot
    overflow it. A float sum runs as a fast fused reduction on XLA's CPU
    backend (as the norms do); ``jnp.all(jnp.isfinite(x))``, a count of
    ``~isfinite(x)`` or an integer maximum ran 2-3× slower there, and a float
    ``jnp.max`` of 4096 entries or more lost a NaN (jax 0.10). The chunks'
    sums are tested one by one, not added: XLA copied the cheap scalar
    additions of a total into every kernel that reads the result (each leaf
    a guard keeps or rolls back), which took a guarded Adam step on 1000
    leaves 111 s to compile instead of 14 s (benchmarks/RESULTS.md).
    """
    dtype = tree_accumulation_dtype(tree)
    parts, _ = _reduce_chunks(
        jax.tree.leaves(tree), lambda x: (_finite_weight(x),), (SUM,), (dtype,), tie_large=False
    )
    totals = [total.astype(dtype) for (total,) in parts]  # float64 and float32 chunks under x64
    return jnp.all(jnp.isfinite(jnp.stack(totals))) if parts else jnp.array(True)
