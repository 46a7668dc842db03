"""Adaptive gradient clipping (AGC): each unit's update is bounded relative to its weights."""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipx import _devices, _numerics, _validate
from clipx._stats import ClipStats, clip_stats, empty_clip_stats, replacing

Axis = int | tuple[int, ...] | None


class AGCState(NamedTuple):
    """State of `agc`: only what it reports."""

    stats: ClipStats
    stats_name = "agc"  # type: ignore[misc]  # a class attribute, not a field


def _check_axis(axis: Axis) -> None:
    """``axis`` is None, an int, or a tuple of ints (checked at construction)."""

    def is_int(a: object) -> bool:
        return isinstance(a, (numbers.Integral, np.integer)) and not isinstance(a, bool)

    if axis is None or is_int(axis) or (isinstance(axis, tuple) and all(is_int(a) for a in axis)):
        return
    hint = "; under optax.inject_hyperparams name it in static_args" if isinstance(axis, jax.Array) else ""
    raise TypeError(f"axis must be None, an int or a tuple of ints, got {type(axis).__name__} {axis!r}{hint}")


def _check_eps_square(eps: float | jax.Array) -> None:
    """A positive ``eps`` whose square is a normal float32: ``max(‖W_i‖, ε)²`` is formed from ``ε²``."""
    smallest = float(np.sqrt(np.finfo(np.float32).tiny))
    number = _validate.concrete_number("eps", eps)  # None for a traced array
    if number is not None and 0 < number < smallest:
        raise ValueError(
            f"eps must be 0 or at least {smallest:.3g} (its square a normal float32), got {eps!r}"
        )


def _unit_axes(shape: tuple[int, ...], axis: Axis) -> Axis:
    """The axes one unit spans in an array of ``shape`` (None: the whole array)."""
    if axis is not None:
        axes = tuple(int(a) for a in (axis if isinstance(axis, tuple) else (axis,)))  # NumPy ints too
        if any(not -len(shape) <= a < len(shape) for a in axes):
            raise ValueError(f"axis {axis} is out of range for an array of shape {shape}")
        if len({a % len(shape) for a in axes}) < len(axes):
            raise ValueError(f"axis {axis} names an axis twice for an array of shape {shape}")
        return axes
    if sum(d != 1 for d in shape) <= 1:  # a scalar or a vector, once size-1 axes are squeezed
        return None
    if len(shape) in (2, 3):  # dense (in, out) or multi-head (in, heads, out): one unit per output
        return 0
    if len(shape) == 4:  # conv HWIO: one unit per output channel
        return (0, 1, 2)
    if len(shape) == 5:  # conv3d DHWIO
        return (0, 1, 2, 3)
    raise ValueError(
        f"unitwise_norm has no default units for a rank-{len(shape)} array of shape {shape}: "
        "pass axis=, the axes one unit spans (e.g. axis=(0, 1, 2, 3, 4) to reduce all but the last)"
    )


def unitwise_norm(x: jax.Array, axis: Axis = None) -> jax.Array:
    r"""The L2 norm of each unit of ``x``, broadcast back to the shape of ``x``.

    .. math::

        \lVert x_i \rVert_2 = \sqrt{\textstyle\sum_{j \in \text{unit } i} |x_j|^2}

    A unit is the slice of ``x`` spanned by the reduced axes. With
    ``axis=None`` the units follow ``optax.transforms.unitwise_norm``: a
    scalar or a vector (rank ≤ 1 once size-1 axes are squeezed) is one unit;
    rank 2 or 3 reduces axis 0 (one unit per output of a dense ``(in, out)`` or
    multi-head ``(in, heads, out)`` kernel); rank 4 reduces axes ``(0, 1, 2)``
    (HWIO convolutions); rank 5 reduces ``(0, 1, 2, 3)``; any other rank raises
    ``ValueError`` asking for ``axis``. Squares are summed in float32 (float64
    for float64/complex128 input), so the result is float32 or float64 and a
    float16 input does not overflow.

    Args:
      x: an array (real or complex).
      axis: the axis or axes one unit spans; ``None`` for the defaults above.

    Returns:
      An array of the shape of ``x`` holding each entry's unit norm.

    Example:
      >>> import jax.numpy as jnp, clipx
      >>> clipx.unitwise_norm(jnp.array([[3.0, 1.0], [4.0, 0.0]]))
      Array([[5., 1.],
             [5., 1.]], dtype=float32)
      >>> clipx.unitwise_norm(jnp.array([[3.0, 4.0], [0.0, 1.0]]), axis=-1)  # one unit per row
      Array([[5., 5.],
             [1., 1.]], dtype=float32)
    """
    _check_axis(axis)
    x = jnp.asarray(x)
    squares = _numerics.sum_of_squares(x, axis=_unit_axes(x.shape, axis), keepdims=True)
    return jnp.broadcast_to(_numerics.safe_sqrt(squares), x.shape)


def agc(
    clipping: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-3,
    axis: Axis = None,
    *,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Adaptive gradient clipping (Brock et al., 2021): updates bounded relative to weights, unit by unit.

    For every unit :math:`i` (a row, column or filter, see `unitwise_norm`)
    of the gradient :math:`G` and the parameters :math:`W`:

    .. math::

        G_i \leftarrow G_i \cdot \min\left(1,
            \frac{\lambda \max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert}\right)

    i.e. a unit whose ratio :math:`\lVert G_i\rVert / \max(\lVert W_i\rVert, \epsilon)`
    exceeds :math:`\lambda` is rescaled to exactly that ratio. The same rule
    as ``optax.adaptive_grad_clip``, with norms accumulated in float32 (float64
    for float64 leaves) and a NaN-free scale: optax's division guard
    ``max(‖G_i‖, 1e-6)`` is not needed, so a unit whose norm is below 1e-6 and
    above its bound is scaled to the bound exactly rather than below it.

    AGC needs the parameters: call ``tx.update(grads, state, params)``.

    Which units to use. The defaults suit dense and convolutional kernels. An
    embedding table ``(vocab, dim)`` gets one unit per embedding *column*
    across the whole vocabulary, usually not what a language model wants; give
    it per-row units with ``axis=-1`` for that leaf only, through
    ``optax.multi_transform``. The paper does not clip the final classifier
    layer; leave it out with ``optax.masked`` (or an ``optax.identity()``
    branch of ``multi_transform``)::

        labels = {"embed": "rows", "dense": "agc", "head": "none"}
        tx = optax.chain(
            optax.multi_transform(
                {"rows": clipx.agc(0.01, axis=-1), "agc": clipx.agc(0.01), "none": optax.identity()},
                labels,
            ),
            optax.adam(1e-3),
        )
        # or, to clip everything but the head with the defaults:
        tx = optax.masked(clipx.agc(0.01), {"embed": True, "dense": True, "head": False})

    Args:
      clipping: the largest ratio :math:`\lambda \ge 0` of a unit's gradient
        norm to its weight norm (default 0.01). A unit whose bound
        :math:`\lambda \max(\lVert W_i\rVert, \epsilon)` is past about
        1.8·10¹⁹ (its square overflows float32) is not clipped; if its
        gradient norm is past that too, its ratio in the statistics is 0
        (1 with λ = 0, which clips every unit to 0).
      eps: :math:`\epsilon`, 0 or at least about 1.08e-19 (its square a
        normal float32), the smallest weight norm used (default 1e-3), so
        zero-initialised weights can still move. With 0, a unit with zero
        weights does not move, and one with a non-zero gradient has an
        infinite ratio in the statistics.
      axis: the axis or axes one unit spans, the same for every leaf; ``None``
        (default) for the per-rank defaults of `unitwise_norm`. Every leaf's
        units are resolved by ``init``, so a leaf of rank 6 or more without
        ``axis`` raises there.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis over which
        the statistics (largest ratio, fraction of units clipped) are
        combined, so every device reports the same values. Each device clips
        the units it holds: shard parameters along a kept (output) axis so
        that units stay whole, and keep vectors (one unit each) replicated.
        Under ``shard_map`` a replicated unit is counted once (see
        `global_norm`).

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`:
      ``norm`` is the largest ratio :math:`\lVert G_i\rVert/\max(\lVert W_i\rVert,\epsilon)`,
      ``threshold`` is :math:`\lambda`, ``scale`` the fraction of units clipped,
      ``clipped`` whether any was. A unit counts as clipped when its ratio
      is above :math:`\lambda`; the clip tests
      :math:`\lVert G_i\rVert^2 > (\lambda \max(\lVert W_i\rVert, \epsilon))^2`,
      so a unit within a rounding error of its bound may be counted on the
      other side (24 of 2000 units placed there on purpose). `without_stats`
      drops these statistics and the work of computing them.

    Under ``jax.jit`` with sharded arrays XLA partitions the unit norms
    itself; under ``shard_map``/``pmap`` pass ``axis_name`` (see above).

    Reference:
      Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image
      Recognition Without Normalization", ICML 2021.

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> params = {"embed": jnp.ones((3, 2)), "dense": jnp.ones((2, 2)), "head": jnp.ones((2, 1))}
      >>> grads = {"embed": jnp.ones((3, 2)), "dense": jnp.ones((2, 2)), "head": jnp.ones((2, 1))}
      >>> labels = {"embed": "rows", "dense": "agc", "head": "none"}
      >>> tx = optax.multi_transform(
      ...     {"rows": clipx.agc(0.1, axis=-1), "agc": clipx.agc(0.1), "none": optax.identity()}, labels)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> {k: round(float(v[0, 0]), 4) for k, v in updates.items()}
      {'dense': 0.1, 'embed': 0.1, 'head': 1.0}
      >>> sorted(k for k in clipx.stats(state) if k.endswith("/scale"))
      ['agc/agc/scale', 'rows/agc/scale']
    """
    clipping = _validate.check_nonnegative("clipping", clipping)
    eps = _validate.check_nonnegative("eps", eps)
    _check_eps_square(eps)
    _check_axis(axis)

    # max(‖W_i‖, ε)² is positive when ε is: a plain square root then has finite
    # derivatives and compiles to fewer operations than the guarded one.
    positive_eps = isinstance(eps, numbers.Real) and eps > 0
    floor_root = jnp.sqrt if positive_eps else _numerics.safe_sqrt

    @_numerics.jit_when_traced  # traced once per leaf shape and dtype, not once per leaf
    def clip_leaf(g: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``G`` clipped unit by unit, with ``‖G_i‖²`` and ``max(‖W_i‖, ε)²``."""
        # Squared unit norms: the scale and the statistics need one square root, of the bound.
        units = _unit_axes(g.shape, axis)
        g_squared, w_squared = _numerics.sums_of_squares_together(g, w, axis=units)
        floor_squared = jnp.maximum(w_squared, jnp.square(_numerics.as_dtype(eps, g_squared.dtype)))
        # λ = 0 bounds every unit at 0, even one whose floor overflows (where 0·∞ would be NaN);
        # only such a floor is replaced, so the bound's derivative in λ stays the floor at λ = 0.
        bound: float | jax.Array = 0.0
        if not isinstance(clipping, numbers.Real) or clipping > 0:
            root = floor_root(floor_squared)
            if isinstance(clipping, jax.Array):
                root = jnp.where((clipping == 0) & jnp.isposinf(root), 0, root)
            bound = _numerics.hyperparameter(clipping, floor_squared.dtype) * root
        clipped = _numerics.scale_leaf(g, _numerics.clip_scale_of_square(g_squared, bound))
        return clipped, g_squared, floor_squared

    # The ratios are traced apart from the clip: traced inside it, they led XLA's CPU
    # scheduler to order 50 equal leaves' unit norms and Adam kernels differently, and the
    # step took 1.36x plain Adam's instead of 1.22x (benchmarks/RESULTS.md).
    @_numerics.jit_when_traced
    def ratio_squared(g_squared: jax.Array, floor_squared: jax.Array) -> jax.Array:
        """``‖G_i‖² / max(‖W_i‖, ε)²``, with 0/0 = 0 (a zero floor needs eps = 0 and zero weights).

        Where both squares overflow, ∞/∞ is taken as the clip decides: 0 (the unit is not
        clipped: its bound overflows too), or 1 with λ = 0 (it is clipped to 0). Neither
        0/0 nor ∞/∞ is computed, so ``jax_debug_nans`` stays quiet; a NaN stays NaN.
        """
        largest = jnp.finfo(g_squared.dtype).max  # no ∞ constant: jax_debug_infs would stop at it
        overflowed = (g_squared > largest) & (floor_squared > largest)
        numerator = jnp.where(overflowed, 0, g_squared)
        ratio = numerator / jnp.where(numerator == 0, 1, floor_squared)
        if not isinstance(clipping, numbers.Real) or clipping == 0:
            ratio = jnp.where(overflowed & (clipping == 0), 1, ratio)
        return ratio

    def init_fn(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            try:
                _unit_axes(jnp.shape(leaf), axis)
            except ValueError as error:
                raise ValueError(f"agc: parameter {jax.tree_util.keystr(path)}: {error}") from None
        return AGCState(stats=empty_clip_stats(scale=0.0))

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, AGCState)
        if params is None:
            raise ValueError(
                "agc clips relative to the parameters: pass them as the third argument, "
                "tx.update(grads, state, params)"
            )
        _validate.check_same_structure(
            params,
            updates,
            "agc: params and updates",
            hint="Pass the parameters the gradients were taken with: tx.update(grads, state, params).",
        )
        leaves, treedef = jax.tree.flatten(updates)
        acc = _numerics.tree_accumulation_dtype(updates)
        new_leaves, all_ratios = [], []
        for g, w in zip(leaves, jax.tree.leaves(params), strict=True):
            if jnp.shape(g) != jnp.shape(w):
                raise ValueError(
                    f"agc: a gradient of shape {jnp.shape(g)} for a parameter of shape {jnp.shape(w)}"
                )
            clipped_leaf, g_squared, floor_squared = clip_leaf(g, w)
            new_leaves.append(clipped_leaf)
            all_ratios.append(ratio_squared(g_squared, floor_squared).astype(acc))
        clipping_ = _numerics.as_dtype(clipping, acc)
        limit = jnp.square(clipping_)
        largests = []

        def count_clipped(indices: list[int]) -> tuple[jax.Array, Any]:
            """(units above λ, units) of ``leaves[indices]``; their largest ratio² into ``largests``.

            A unit exceeds λ when ‖G_i‖² > (λ·floor)². Unit arrays of small leaves are
            combined by shape, one reduction per group (see `_numerics.tree_reductions`:
            per-leaf reductions dominated the compile time); those of large leaves, few, are
            concatenated and reduced twice (one variadic reduction over them made the step
            slower, see benchmarks/RESULTS.md).
            """
            ratios = [all_ratios[i] for i in indices]
            small = [r for r, i in zip(ratios, indices, strict=True) if _numerics.is_small(leaves[i])]
            large = [r for r, i in zip(ratios, indices, strict=True) if not _numerics.is_small(leaves[i])]
            largest_squared, clipped = _numerics.tree_reductions(
                small,
                lambda r: (r, (r > limit).astype(jnp.int32)),
                (_numerics.MAX_NONNEGATIVE, _numerics.SUM),
                (acc, acc),
            )
            if large:
                joined = jnp.concatenate([r.ravel() for r in large])
                largest_squared = jnp.maximum(largest_squared, _numerics.max_nonnegative(joined))
                clipped = clipped + jnp.sum(joined > limit, dtype=jnp.int32).astype(acc)
            largests.append(largest_squared)
            return clipped, float(sum(r.size for r in ratios))  # counts may pass 2³¹

        # A unit every device holds whole (a vector, say) is counted once: see `_devices`.
        clipped, units = _devices.sum_of_parts(leaves, axis_name, count_clipped)
        largest_squared = functools.reduce(jnp.maximum, largests)
        if axis_name is not None:
            largest_squared = _numerics.max_nonnegative(largest_squared, axis_name)
        largest = _numerics.safe_sqrt(largest_squared)
        stats = clip_stats(
            norm=largest,
            threshold=clipping_,
            scale=(clipped / jnp.maximum(units, 1)).astype(acc),
            clipped=clipped > 0,
        )
        return treedef.unflatten(new_leaves), AGCState(stats=replacing(state.stats, stats))

    return optax.GradientTransformation(init_fn, update_fn)
