r"""Per-example clipping for differentially private training (DP-SGD).

DP-SGD (Abadi et al., 2016) bounds how much any single example can move the
model: each example's gradient is clipped to L2 norm ``C`` *before* the batch
is summed, then Gaussian noise of standard deviation ``σ·C`` is added:

.. math::

    \tilde g = \sum_{i=1}^{B} g_i \cdot \min\left(1, \frac{C}{\lVert g_i \rVert}\right)
               + \mathcal N(0, \sigma^2 C^2 I)

The transforms here take *per-example* gradients — every leaf carries a
leading batch axis, as ``jax.vmap(jax.grad(loss), in_axes=(None, 0))`` gives —
and return the clipped (and optionally noised) **sum**, shaped like the
parameters. They sum, as ``optax.per_example_global_norm_clip`` does, because
the sum is what the privacy analysis bounds; divide by the batch size with
``optax.scale(1 / batch_size)`` (or fold it into the learning rate) to get the
mean that ``optax.contrib.differentially_private_aggregate`` returns. Put the
transform first in the chain: everything after it sees parameter-shaped
updates. ``optax.MultiSteps`` and ``optax.apply_every`` must not wrap it.

`clipped_grad_sum` computes the same clipped sum from a loss function without
ever holding the whole batch's per-example gradients: it walks the batch in
chunks.

Reported `ClipStats`: ``norm`` is the **largest** per-example global norm in
the batch (the quantity the threshold bounds), ``threshold`` the ``C`` used,
``scale`` the **fraction of examples clipped** (for `per_example_layer_norm`,
the fraction of (example, layer) pairs), ``clipped`` whether any was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _numerics, _validate
from clipx._stats import ClipStats, clip_stats, empty_clip_stats, replacing

PyTree = Any


class PerExampleState(NamedTuple):
    """State of `per_example_global_norm` / `per_example_layer_norm`.

    Attributes:
      key: the raw PRNG key data (``uint32[2]`` with the default threefry) of the next step's noise.
      stats: what the last step did (see the module docstring).
    """

    key: jax.Array
    stats: ClipStats
    stats_name = "per_example"  # type: ignore[misc]  # a class attribute, not a field


class PerExampleAdaptiveState(NamedTuple):
    """State of `per_example_adaptive`.

    Attributes:
      threshold: the clip norm ``C`` the next step will use.
      key: the raw PRNG key data (``uint32[2]`` with the default threefry) of the next step's noise.
      stats: what the last step did (``threshold`` there is the ``C`` it used).
    """

    threshold: jax.Array
    key: jax.Array
    stats: ClipStats
    stats_name = "per_example_adaptive"  # type: ignore[misc]  # a class attribute, not a field


def _check_batched(grads: PyTree, who: str) -> int:
    """The common batch size of the leaves of ``grads`` (a trace-time shape check)."""
    leaves = jax.tree.leaves(grads)
    if not leaves:
        return 0
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{who} expects per-example gradients: every leaf needs the same leading batch axis, "
            f"got shapes {jax.tree.map(jnp.shape, grads)}. Compute them with "
            "jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)."
        )
    (size,) = sizes
    return int(size or 0)


def _per_example_norms(grads: PyTree) -> jax.Array:
    """``‖g_i‖`` for every example ``i`` (float32 or wider), shape ``(B,)``; ``(0,)`` for no leaves."""
    if not jax.tree.leaves(grads):
        return jnp.zeros((0,), jnp.float32)
    return jax.vmap(_numerics.tree_norm)(grads)


def _weighted_sum(leaf: jax.Array, weights: jax.Array) -> jax.Array:
    """``Σ_i w_i · leaf_i`` over the batch axis, in float32 or wider (``leaf``'s summation dtype).

    At full precision: a default-precision float32 dot may round its products
    to TF32 on GPUs and bfloat16 on TPUs, which could take a clipped example's
    norm past the threshold.
    """
    acc = _numerics.summation_dtype(leaf.dtype)
    return jnp.tensordot(weights.astype(acc), leaf.astype(acc), axes=1, precision=jax.lax.Precision.HIGHEST)


def _clipped_sum(grads: PyTree, threshold: jax.Array) -> tuple[PyTree, jax.Array, jax.Array]:
    """Clips each example to global norm ``threshold`` and sums: ``(sum, norms, multipliers)``.

    The sum stays in each leaf's summation dtype (float32 or wider): summed over
    devices and noised there, it is rounded to the gradients' dtype once, by
    `_as_dtypes_of` (rounded before, float16 partial sums of ±120000 overflowed).
    """
    norms = _per_example_norms(grads)
    multipliers = jax.vmap(_numerics.clip_scale, in_axes=(0, None))(norms, threshold)
    sums = jax.tree.map(lambda g: _weighted_sum(g, multipliers), grads)
    return sums, norms, multipliers


def _as_dtypes_of(tree: PyTree, like: PyTree) -> PyTree:
    """Each leaf of ``tree`` cast to the dtype of the same leaf of ``like``."""
    return jax.tree.map(lambda t, g: t.astype(jnp.result_type(g)), tree, like)


def _add_noise(tree: PyTree, key: jax.Array, std: jax.Array) -> tuple[PyTree, jax.Array]:
    """``tree + N(0, std²)`` leaf by leaf (noise drawn in float32 or wider); returns the next key.

    A complex leaf gets independent noise of standard deviation ``std`` on its
    real and on its imaginary part: each is a coordinate of the clipped norm.
    """
    leaves, treedef = jax.tree.flatten(tree)
    next_key, *keys = jax.random.split(key, len(leaves) + 1)

    def noisy(leaf, k):
        acc = _numerics.accumulation_dtype(leaf.dtype)
        if jnp.iscomplexobj(leaf):
            real, imag = jax.random.normal(k, (2, *leaf.shape), acc) * jnp.asarray(std, acc)
            noise = jax.lax.complex(real, imag)
        else:
            noise = jax.random.normal(k, leaf.shape, acc) * jnp.asarray(std, acc)
        return (leaf.astype(noise.dtype) + noise).astype(leaf.dtype)

    return jax.tree.unflatten(
        treedef, [noisy(leaf, k) for leaf, k in zip(leaves, keys, strict=True)]
    ), next_key


def _maybe_noise(
    tree: PyTree, key: jax.Array, noise_multiplier: float | jax.Array, threshold: float | jax.Array
) -> tuple[PyTree, jax.Array]:
    """Adds ``N(0, (noise_multiplier·threshold)²)`` unless ``noise_multiplier`` is the Python 0.

    The standard deviation is formed in float32 or wider, whatever the dtypes
    of the two (``optax.inject_hyperparams`` may pass integer or float16
    arrays). A zero multiplier adds no noise even with an infinite threshold
    (where ``0·∞`` is NaN).
    """
    if isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0:
        return tree, key
    dtype = _numerics.accumulation_dtype(jnp.result_type(threshold))
    threshold = _numerics.as_dtype(threshold, dtype)
    multiplier = _numerics.hyperparameter(noise_multiplier, dtype)
    std = jnp.where(multiplier == 0, 0.0, multiplier * threshold)
    return _add_noise(tree, key, std)


def _across(x: jax.Array, axis_name: _numerics.AxisName | None) -> jax.Array:
    """``psum(x, axis_name)`` when the batch is split over a mapped axis, else ``x``."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _fraction(count: jax.Array, total: int, axis_name: _numerics.AxisName | None) -> jax.Array:
    """``count / total`` over the whole (possibly device-split) batch; 0 for an empty batch."""
    count = _across(count.astype(jnp.float32), axis_name)
    total_all = _across(jnp.asarray(total, jnp.float32), axis_name)
    return count / jnp.maximum(total_all, 1)


def _initial_key(seed: Any) -> jax.Array:
    """The raw key of ``seed``: distinct for every int64 seed, that of ``jax.random.key`` in [0, 2³²).

    Without 64-bit mode ``jax.random.key`` keeps the low 32 bits of a Python
    int, so ``2**32`` (or ``-2**32``) would give the key of 0: a seed's high 32
    bits, when not 0, are folded into the key of its low ones. An integer
    array (as ``optax.inject_hyperparams`` passes the seed, traced under a
    jitted ``init``) gives the key of the int it holds.
    """
    if isinstance(seed, jax.Array) and not isinstance(seed, jax.core.Tracer):
        seed = int(seed)
    if not isinstance(seed, jax.Array):
        key = jax.random.key(seed & 0xFFFFFFFF)
        high = (seed >> 32) & 0xFFFFFFFF
        return jax.random.key_data(jax.random.fold_in(key, high) if high else key)
    # Conversions to uint32 keep the low 32 bits (two's complement), as `& 0xFFFFFFFF` does.
    if seed.dtype.itemsize == 8:
        high = (seed >> 32).astype(jnp.uint32)
    else:  # the int of a negative seed has all its high 32 bits set
        high = jnp.where(seed < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))
    key = jax.random.key(seed.astype(jnp.uint32))
    folded = jax.random.key_data(jax.random.fold_in(key, high))
    return jnp.where(high != 0, folded, jax.random.key_data(key))


def _checked_seed(seed: Any, noise: tuple[Any, ...], name: str, stacklevel: int) -> Any:
    """``seed``, checked; 0 for None, with a warning when any of ``noise`` (multipliers) adds noise.

    Noise drawn from a known seed can be regenerated and subtracted: it
    protects nothing. A traced multiplier is not looked at (``inject_hyperparams``
    calls the factory with concrete ones first, in ``init``). ``stacklevel``
    points the warning at the user's call.
    """
    if seed is None:
        if any(not isinstance(n, jax.core.Tracer) and float(n) != 0 for n in noise):
            warnings.warn(
                f"clipx.{name}: no seed given, so the noise is drawn from seed 0, which anyone can "
                "regenerate and subtract; pass a secret seed (say secrets.randbits(63)) for privacy",
                stacklevel=stacklevel + 1,
            )
        return 0
    return _validate.check_seed("seed", seed)


def _fixed_threshold_init(
    l2_norm_clip: Any, noise_multiplier: Any, seed: Any, name: str
) -> tuple[optax.TransformInitFn, Any, Any]:
    """Validates the shared arguments of the fixed-threshold rules: their ``init``, ``C`` and ``σ``."""
    l2_norm_clip = _validate.check_nonnegative("l2_norm_clip", l2_norm_clip)
    noise_multiplier = _validate.check_finite_nonnegative("noise_multiplier", noise_multiplier)
    _validate.check_noise_std("noise_multiplier", noise_multiplier, "l2_norm_clip", l2_norm_clip)
    seed = _checked_seed(seed, (noise_multiplier,), name, stacklevel=3)

    def init_fn(params):
        del params
        return PerExampleState(key=_initial_key(seed), stats=empty_clip_stats(scale=0.0))

    return init_fn, l2_norm_clip, noise_multiplier


def _stats(
    norms: jax.Array, threshold: jax.Array, clipped_fraction: jax.Array, axis_name: _numerics.AxisName | None
) -> ClipStats:
    max_norm = _numerics.max_nonnegative(norms, axis_name)
    return clip_stats(
        norm=max_norm,
        threshold=_numerics.as_dtype(threshold, max_norm.dtype),
        scale=clipped_fraction.astype(jnp.float32),
        clipped=clipped_fraction > 0,
    )


def per_example_global_norm(
    l2_norm_clip: float | jax.Array,
    noise_multiplier: float | jax.Array = 0.0,
    seed: int | None = None,
    *,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Clips each example's gradient to a global L2 norm, sums, adds Gaussian noise (DP-SGD).

    .. math::

        \tilde g = \sum_i g_i \min\left(1, \frac{C}{\lVert g_i\rVert}\right)
                   + \mathcal N(0, (\sigma C)^2 I)

    The input is per-example gradients (every leaf has a leading batch axis);
    the output is shaped like the parameters and is the clipped **sum** (see
    the module docstring for sum vs mean). With ``noise_multiplier=0`` the
    result equals ``optax.per_example_global_norm_clip(grads, C)[0]``; norms
    are accumulated in float32 and a NaN per-example norm counts as unclipped,
    as in optax. Noise is drawn from a PRNG key kept in the state, split once
    per step, so the run is reproducible from ``seed``; a complex leaf gets
    its own draw on the real and on the imaginary part.

    Args:
      l2_norm_clip: the per-example clip norm ``C ≥ 0``.
      noise_multiplier: ``σ ≥ 0``; the noise standard deviation is ``σ·C``,
        at most ``6.28e37`` so that every draw of the noise (within ±5.42
        standard deviations) is finite in float32; ``C = ∞`` only with ``σ = 0``.
        The Python number 0 adds no noise and draws no random numbers.
      seed: an int seeding the PRNG key held in the state. The noise
        protects only if the seed is secret: without one, seed 0 is used
        and a warning says so when noise is added.
      axis_name: inside ``shard_map``/``pmap`` where each device holds a slice
        of the *batch*, the mapped axis: the clipped sums, counts and largest
        norm are reduced over it, and the noise is added once, to the total
        (every device draws the same noise from the same key).

    Returns:
      An ``optax.GradientTransformation``; its `ClipStats` report the largest
      per-example norm, ``C``, the fraction of examples clipped and whether any was.

    Reference:
      Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.

    Example:
      >>> import jax.numpy as jnp, clipx
      >>> per_example_grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # batch of 2
      >>> tx = clipx.per_example_global_norm(1.0)
      >>> summed, state = tx.update(per_example_grads, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 4) for x in summed["w"]]
      [0.9, 1.2]
      >>> float(clipx.stats(state)["per_example/scale"])  # half the examples were clipped
      0.5
    """
    init_fn, l2_norm_clip, noise_multiplier = _fixed_threshold_init(
        l2_norm_clip, noise_multiplier, seed, "per_example_global_norm"
    )

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, PerExampleState)
        del params
        batch = _check_batched(updates, "per_example_global_norm")
        total, norms, multipliers = _clipped_sum(updates, l2_norm_clip)
        total = jax.tree.map(lambda t: _across(t, axis_name), total)
        total, key = _maybe_noise(total, state.key, noise_multiplier, l2_norm_clip)
        fraction = _fraction(jnp.sum(multipliers < 1), batch, axis_name)
        return _as_dtypes_of(total, updates), PerExampleState(
            key=key, stats=replacing(state.stats, _stats(norms, l2_norm_clip, fraction, axis_name))
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _layer_thresholds(grads: PyTree, l2_norm_clip: float | jax.Array, uniform: bool) -> list:
    """Per-leaf clip norms ``C/√K`` (uniform) or ``C·√(D_i/D)``, whose squares sum to ``C²``."""
    leaves = jax.tree.leaves(grads)
    if uniform:
        return [l2_norm_clip * (1.0 / len(leaves)) ** 0.5 for _ in leaves]
    sizes = [math.prod(leaf.shape[1:]) for leaf in leaves]
    total = sum(sizes)
    return [l2_norm_clip * (size / total) ** 0.5 if total else l2_norm_clip for size in sizes]


def per_example_layer_norm(
    l2_norm_clip: float | jax.Array,
    noise_multiplier: float | jax.Array = 0.0,
    seed: int | None = None,
    *,
    uniform: bool = True,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Clips each example's gradient layer by layer, sums, adds Gaussian noise (McMahan et al.).

    Each of the ``K`` leaves ("layers") of each example is clipped to its own
    norm ``C_k``, chosen so that ``Σ_k C_k² = C²`` (the clipped example's
    global norm is still at most ``C``, so the noise calibration of
    `per_example_global_norm` applies unchanged):

    .. math::

        C_k = \frac{C}{\sqrt K}\ (\text{uniform}) \quad\text{or}\quad
        C_k = C\sqrt{D_k / D}, \qquad
        \tilde g_k = \sum_i g_{ik}\min\left(1, \frac{C_k}{\lVert g_{ik}\rVert}\right)
                     + \mathcal N(0, (\sigma C)^2 I)

    where ``D_k`` is the size of leaf ``k`` per example and ``D`` the total.
    With ``noise_multiplier=0`` the result equals
    ``optax.per_example_layer_norm_clip(grads, C, uniform)[0]``. `ClipStats`:
    ``norm`` is the largest per-example global norm, ``threshold`` is ``C``,
    ``scale`` the fraction of (example, layer) pairs clipped.

    Args:
      l2_norm_clip: the overall per-example clip norm ``C ≥ 0``.
      noise_multiplier: ``σ ≥ 0``; noise standard deviation ``σ·C`` on every
        leaf, at most ``6.28e37`` (see `per_example_global_norm`).
      seed: an int seeding the PRNG key held in the state. The noise
        protects only if the seed is secret: without one, seed 0 is used
        and a warning says so when noise is added.
      uniform: ``C/√K`` for every layer (True) or ``C·√(D_k/D)`` (False).
      axis_name: the mapped axis the batch is split over inside
        ``shard_map``/``pmap`` (see `per_example_global_norm`).

    Returns:
      An ``optax.GradientTransformation``.

    Reference:
      McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
      Recurrent Language Models", ICLR 2018.

    Example:
      >>> import jax.numpy as jnp, clipx
      >>> grads = {"a": jnp.array([[3.0, 4.0]]), "b": jnp.array([[0.1]])}  # batch of 1, K = 2
      >>> tx = clipx.per_example_layer_norm(2.0 ** 0.5)  # C_k = 1 for both layers
      >>> summed, _ = tx.update(grads, tx.init(None))
      >>> [round(float(x), 4) for x in jnp.concatenate([summed["a"], summed["b"]])]
      [0.6, 0.8, 0.1]
    """
    init_fn, l2_norm_clip, noise_multiplier = _fixed_threshold_init(
        l2_norm_clip, noise_multiplier, seed, "per_example_layer_norm"
    )
    uniform = _validate.as_bool("uniform", uniform)

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, PerExampleState)
        del params
        _check_batched(updates, "per_example_layer_norm")
        leaves, treedef = jax.tree.flatten(updates)
        thresholds = _layer_thresholds(updates, l2_norm_clip, uniform)
        summed, clipped_counts = [], []
        for leaf, threshold in zip(leaves, thresholds, strict=True):
            leaf_sum, _, multipliers = _clipped_sum(leaf, threshold)
            summed.append(leaf_sum)
            clipped_counts.append(jnp.sum(multipliers < 1, dtype=jnp.int32))
        total = jax.tree.map(lambda t: _across(t, axis_name), jax.tree.unflatten(treedef, summed))
        total, key = _maybe_noise(total, state.key, noise_multiplier, l2_norm_clip)
        pairs = sum(leaf.shape[0] for leaf in leaves)
        fraction = _fraction(sum(clipped_counts, jnp.zeros((), jnp.int32)), pairs, axis_name)
        norms = _per_example_norms(updates)
        return _as_dtypes_of(total, updates), PerExampleState(
            key=key, stats=replacing(state.stats, _stats(norms, l2_norm_clip, fraction, axis_name))
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _largest_threshold(noise_multiplier: float | jax.Array) -> Any:
    """The largest ``C`` whose noise std ``σ·C`` is at most `_validate.NOISE_STD_MAX` (no noise: finite)."""
    largest = jnp.finfo(jnp.float32).max
    if isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0:
        return largest
    multiplier = _numerics.hyperparameter(noise_multiplier, jnp.float32)
    # Below σ = NOISE_STD_MAX / largest the quotient would pass float32's range: C stops at its largest value.
    return _validate.NOISE_STD_MAX / jnp.maximum(multiplier, _validate.NOISE_STD_MAX / largest)


def per_example_adaptive(
    target_quantile: float | jax.Array = 0.5,
    learning_rate: float | jax.Array = 0.2,
    initial_threshold: float | jax.Array = 0.1,
    noise_multiplier: float | jax.Array = 0.0,
    count_stddev: float | jax.Array = 0.0,
    seed: int | None = None,
    *,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Per-example clipping whose norm ``C`` tracks a quantile of the per-example norms.

    Each step clips, sums and noises exactly as `per_example_global_norm` with
    the current ``C``, then moves ``C`` geometrically towards the
    ``γ``-quantile of the per-example norms (Andrew et al., 2021):

    .. math::

        b = \frac{1}{B}\Big(\#\{i : \lVert g_i\rVert \le C\} + \mathcal N(0, \sigma_b^2)\Big),
        \qquad C \leftarrow C \cdot \exp\big(-\eta\,(b - \gamma)\big)

    When more than a fraction ``γ`` of the examples fit under ``C`` it shrinks,
    otherwise it grows; at equilibrium ``C`` is the ``γ``-quantile. The update
    needs O(1) state (``C`` and a PRNG key), no history. For a private count
    set ``count_stddev = σ_b > 0``: each step splits the state's key into
    the key of the sum's noise and the key of the count's, so the two draws
    are independent. The paper splits a total noise multiplier
    ``z`` as ``σ = (z^{-2} − (2σ_b)^{-2})^{-1/2}`` for the sum, the factor 2
    from a count centred at ``1/2`` and divided by a fixed expected batch
    size (sensitivity ``1/2``). Here the count is not centred (sensitivity 1
    when an example is replaced: use ``σ = (z^{-2} − σ_b^{-2})^{-1/2}``),
    and ``B`` is the number of examples with a finite norm in the batch:
    with Poisson sampling, where the batch size itself is private, this
    ``b`` is not the paper's mechanism. Pass the ``σ`` as
    ``noise_multiplier``. The noisy ``b`` is not clamped to ``[0, 1]``.
    Defaults are the TFF defaults of
    the paper: ``C₀ = 0.1``, ``γ = 0.5``, ``η = 0.2``. The arguments are those
    of `clipx.quantile_clip`, the same rule with one norm per step.
    Examples with a non-finite norm are left out of ``b`` (numerator and
    denominator): they never move ``C``. ``C`` stays at or above the smallest
    normal float32 (``1.2e-38``), so after a run of zero gradients it can
    always grow back, and at or below float32's largest value, with noise
    on at or below ``6.28e37 / σ``, so that the noise stays finite.

    Args:
      target_quantile: ``γ ∈ [0, 1]``, the fraction of examples meant to be unclipped.
      learning_rate: ``η ≥ 0`` of the geometric update.
      initial_threshold: ``C₀``, the clip norm of the first step: a normal
        float32 (in [1.2e-38, 3.4e38]).
      noise_multiplier: ``σ ≥ 0``; noise of standard deviation ``σ·C`` on the
        sum (``σ·C₀`` at most ``6.28e37``, so that every draw of the noise,
        within ±5.42 standard deviations, is finite in float32).
      count_stddev: ``σ_b ≥ 0``, the standard deviation (in examples) of the
        noise added to the unclipped count.
      seed: an int seeding the PRNG key held in the state. The noise
        protects only if the seed is secret: without one, seed 0 is used
        and a warning says so when noise is added.
      axis_name: the mapped axis the batch is split over inside
        ``shard_map``/``pmap``: counts are summed over it, so every device
        moves ``C`` identically (see `per_example_global_norm`).

    Returns:
      An ``optax.GradientTransformation``; ``clipx.stats`` reports the largest
      per-example norm, the ``C`` used this step, the fraction clipped and
      whether any example was clipped.

    Reference:
      Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
      with Adaptive Clipping", NeurIPS 2021.

    Example:
      >>> import jax.numpy as jnp, clipx
      >>> tx = clipx.per_example_adaptive(target_quantile=0.5, learning_rate=0.2, initial_threshold=1.0)
      >>> state = tx.init(None)
      >>> grads = jnp.array([[0.5], [0.5], [0.5], [4.0]])  # 3 of 4 examples fit under C = 1
      >>> _, state = tx.update(grads, state)
      >>> round(float(state.threshold), 4)  # exp(-0.2 * (0.75 - 0.5))
      0.9512
    """
    initial_threshold = _validate.check_normal_float32("initial_threshold", initial_threshold)
    target_quantile = _validate.check_range("target_quantile", target_quantile, 0.0, 1.0)
    learning_rate = _validate.check_finite_nonnegative("learning_rate", learning_rate)
    noise_multiplier = _validate.check_finite_nonnegative("noise_multiplier", noise_multiplier)
    _validate.check_noise_std("noise_multiplier", noise_multiplier, "initial_threshold", initial_threshold)
    count_stddev = _validate.check_finite_nonnegative("count_stddev", count_stddev)
    seed = _checked_seed(seed, (noise_multiplier, count_stddev), "per_example_adaptive", stacklevel=2)

    def init_fn(params):
        del params
        return PerExampleAdaptiveState(
            threshold=jnp.array(initial_threshold, jnp.float32),  # a copy, so donating the state leaves it
            key=_initial_key(seed),
            stats=empty_clip_stats(scale=0.0),  # the fraction of examples clipped: none yet
        )

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, PerExampleAdaptiveState)
        del params
        batch = _check_batched(updates, "per_example_adaptive")
        threshold = state.threshold
        total, norms, multipliers = _clipped_sum(updates, threshold)
        total = jax.tree.map(lambda t: _across(t, axis_name), total)
        key, count_key = jax.random.split(state.key)
        total, key = _maybe_noise(total, key, noise_multiplier, threshold)
        # Non-finite per-example norms stay out of the count (and C stays put if none is finite).
        examples = _across(jnp.sum(jnp.isfinite(norms)).astype(jnp.float32), axis_name)
        unclipped = _across(jnp.sum(norms <= threshold.astype(norms.dtype)).astype(jnp.float32), axis_name)
        stddev = _numerics.hyperparameter(count_stddev, jnp.float32)
        unclipped = unclipped + stddev * jax.random.normal(count_key, (), jnp.float32)
        below = unclipped / jnp.maximum(examples, 1)
        rate, target = (_numerics.hyperparameter(h, jnp.float32) for h in (learning_rate, target_quantile))
        moved = threshold * jnp.exp(-rate * (below - target))
        # 0 would never grow back; ∞ would turn into NaN (∞·0) and clip nothing.
        moved = jnp.clip(moved, jnp.finfo(jnp.float32).tiny, _largest_threshold(noise_multiplier))
        new_threshold = jnp.where(examples > 0, moved, threshold)
        fraction = _fraction(jnp.sum(multipliers < 1), batch, axis_name)
        new_state = PerExampleAdaptiveState(
            threshold=new_threshold.astype(jnp.float32),
            key=key,
            stats=replacing(state.stats, _stats(norms, threshold, fraction, axis_name)),
        )
        return _as_dtypes_of(total, updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def clipped_grad_sum(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batch: PyTree,
    l2_norm_clip: float | jax.Array,
    *,
    chunk_size: int = 32,
) -> tuple[PyTree, jax.Array]:
    r"""``Σ_i clip_C(∇ loss_fn(params, example_i))`` computed chunk by chunk.

    The same clipped sum as ``per_example_global_norm(C)`` applied to
    ``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)``, but the
    batch is walked in chunks of ``chunk_size`` examples with ``jax.lax.scan``:
    only one chunk's per-example gradients exist at a time, and each chunk's
    clipped sum is added to a float32 (or wider) accumulator. Chunks are
    strided (chunk ``j`` holds examples ``j, j + n, j + 2n, …``), so with a
    batch sharded over devices (and ``chunk_size`` a multiple of their
    number that divides the batch size) every chunk takes the same share
    from each device and no example moves between devices; when
    ``chunk_size`` does not divide the batch, the last examples form a chunk
    of their own, and XLA moves examples between devices to form them.

    Memory: the chunk's per-example gradients (``chunk_size × |params|``,
    about 1.5 times that in temporaries as measured below) plus ``|params|``
    for the accumulator and the chunk's activations, instead of
    ``B × |params|`` for the full ``vmap``. Measured
    with XLA's compiled ``memory_analysis()`` (temporary buffers; CPU, jax
    0.10.2) for a 3-layer MLP of 1,055,242 float32 parameters (4.0 MiB) and a
    batch of 256:

    * full ``vmap`` + ``optax.per_example_global_norm_clip``: 1541.5 MiB;
    * ``chunk_size=128``: 771.8 MiB (0.50×); ``32``: 193.3 MiB (0.13×);
      ``8``: 48.7 MiB (0.03×); ``1``: 2.5 MiB;

    about ``1.5 × chunk_size × |params|``. Smaller chunks trade memory for
    less parallel work per scan step; ``benchmarks/sharded_step.py --memory``
    reproduces the numbers.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` for **one** example (no
        batch axis); ``batch`` leaves carry the batch on axis 0.
      params: the parameters to differentiate.
      batch: a pytree of arrays with a common leading batch axis ``B``.
      l2_norm_clip: the per-example clip norm ``C`` (a number or a scalar
        array, e.g. the ``threshold`` of a `per_example_adaptive` state).
      chunk_size: examples per chunk (a positive int); a last, smaller chunk
        handles ``B mod chunk_size``.

    Returns:
      ``(clipped_sum, norms)``: the clipped sum shaped like ``params`` (in the
      parameters' dtypes) and the ``(B,)`` per-example norms before clipping.
      Add DP noise to the sum yourself (``σ·C·N(0, I)``) if you need it.

    Example:
      >>> import jax.numpy as jnp, clipx
      >>> loss = lambda w, x: jnp.dot(w, x)  # gradient of example x is x
      >>> xs = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0]])
      >>> total, norms = clipx.clipped_grad_sum(loss, jnp.zeros(2), xs, 1.0, chunk_size=2)
      >>> [round(float(x), 4) for x in total], [round(float(x), 4) for x in norms]
      ([0.9, 2.2], [5.0, 0.5, 2.0])
    """
    l2_norm_clip = _validate.check_nonnegative("l2_norm_clip", l2_norm_clip)
    chunk_size = _validate.check_int("chunk_size", chunk_size, low=1)
    batch_leaves = jax.tree.leaves(batch)
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in batch_leaves}
    if not batch_leaves or None in sizes or len(sizes) != 1:
        raise ValueError(
            "clipped_grad_sum: batch must be a pytree of arrays with one common leading batch axis, "
            f"got shapes {jax.tree.map(jnp.shape, batch)}"
        )
    size = sizes.pop() or 0
    per_example_grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))

    def add_chunk(total, examples):
        # Each chunk's sum stays in the accumulator's dtype: rounded to float16 first, two
        # chunks of ±60000 entries overflowed to ±∞ and added up to NaN.
        chunk_sum, norms, _ = _clipped_sum(per_example_grads(params, examples), l2_norm_clip)
        return jax.tree.map(lambda t, s: t + s.astype(t.dtype), total, chunk_sum), norms

    def accumulator(p):
        return jnp.zeros(jnp.shape(p), _numerics.summation_dtype(jnp.result_type(p)))

    total = jax.tree.map(accumulator, params)
    chunks, rest = divmod(size, chunk_size)
    all_norms = []
    if chunks:
        # Chunk j holds examples j, j + chunks, j + 2·chunks, ...: with the batch sharded over
        # devices, every chunk draws evenly from every device's slice and the scan stays local.
        body = jax.tree.map(
            lambda x: jnp.swapaxes(x[: chunks * chunk_size].reshape(chunk_size, chunks, *x.shape[1:]), 0, 1),
            batch,
        )
        total, norms = jax.lax.scan(add_chunk, total, body)
        all_norms.append(norms.T.reshape(-1))
    if rest:
        total, norms = add_chunk(total, jax.tree.map(lambda x: x[chunks * chunk_size :], batch))
        all_norms.append(norms)
    clipped_sum = _as_dtypes_of(total, params)
    return clipped_sum, jnp.concatenate(all_norms) if all_norms else jnp.zeros((0,), jnp.float32)
