"""ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _numerics, _validate
from clipx._stats import ClipStats, empty_clip_stats, global_clip_stats, replacing

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClipState(NamedTuple):
    """State of `zclip` (scalars and one small warm-up buffer).

    Attributes:
      warmup_norms: the finite norms of the warm-up steps, shape ``(warmup_steps,)``.
      warmup_count: int32, how many finite norms were seen, saturating at
        ``warmup_steps`` (the statistics are ready once it gets there).
      mean: the EMA mean ``μ`` of the norm (0 during warm-up).
      var: the EMA variance ``σ²`` of the norm (0 during warm-up).
      stats: what the last step did (float32 `ClipStats`).
    """

    warmup_norms: jax.Array
    warmup_count: jax.Array
    mean: jax.Array
    var: jax.Array
    stats: ClipStats
    stats_name = "zclip"  # type: ignore[misc]  # a class attribute, not a field


def zclip(
    alpha: float | jax.Array = 0.97,
    z_thresh: float | jax.Array = 2.5,
    max_norm: float | jax.Array | None = 1.0,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float | jax.Array = 1.0,
    skip_update_on_spike: bool = False,
    eps: float | jax.Array = 1e-6,
    *,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Clips gradient-norm spikes found by a z-score test (ZClip, Kumar et al. 2025).

    **Warm-up.** The first ``warmup_steps`` finite norms are stored and the
    update is clipped at ``max_norm`` (if set). After the last of them,
    :math:`\mu` is their mean and :math:`\sigma^2` their population variance.

    **Then, each step** with :math:`z = (\lVert g\rVert - \mu)/(\sigma + \epsilon)`:

    * ``mode="zscore"``: a spike is :math:`z > z_\text{thresh}`; its threshold is
      :math:`T = \bigl(\mu + z_\text{thresh}\,\sigma / (z / z_\text{thresh})\bigr)\cdot
      \text{clip\_factor}` with ``clip_option="adaptive_scaling"`` (the larger
      the outlier, the tighter the clip), or :math:`T = \mu` with ``"mean"``;
    * ``mode="percentile"``: :math:`T = \mu + z_\text{thresh}\,\sigma` and a spike
      is :math:`\lVert g\rVert > T` (``clip_option`` is unused).

    The update is clipped to :math:`\min(T, \text{max\_norm})` on a spike and to
    ``max_norm`` otherwise (``max_norm=None`` disables the cap). Then, unless a
    spike was found and ``skip_update_on_spike``, with :math:`x = T` on a spike
    (before the cap) and :math:`x = \lVert g\rVert` otherwise,

    .. math::

        \mu \leftarrow \alpha\mu + (1-\alpha)\,x, \qquad
        \sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)\,(x - \mu_\text{new})^2 .

    This reproduces the authors' ``zclip`` 1.0.0 step for step, except that
    the clipping factor is exactly :math:`c/\lVert g\rVert` where the reference
    uses :math:`c/(\lVert g\rVert + 10^{-6})` (a relative difference of
    :math:`10^{-6}/\lVert g\rVert`; the statistics are unaffected). A norm that
    is not finite never enters the statistics nor the warm-up count; the update
    of such a step is scaled as its norm says (factor 0 above a finite
    threshold, NaN passes through): a gradient holding NaN or ±inf stays
    non-finite (wrap the chain in `clipx.skip_nonfinite` to drop such steps),
    and a finite one whose norm overflows (entries above about 1.8·10¹⁹ in
    float32) is scaled to zero.

    As in the reference, statistics with no spread stay that way: if every
    warm-up norm is the same (all zero, say: a loss masked out for the first
    steps), then :math:`\sigma = 0`, every larger norm is a spike clipped to
    :math:`T = \mu`, and :math:`x = \mu` leaves :math:`\mu` and :math:`\sigma`
    where they are, so updates stay at norm :math:`\mu` (zero, in the example)
    for good. Start ZClip once the gradients vary, or use `clipx.adaptive`,
    whose zero norms are no observation and whose spread has a floor.

    The reported ``threshold`` is the norm the update is clipped down to: the
    update leaves with norm :math:`\min(\lVert g\rVert, \text{threshold})`. It is
    ``max_norm`` during warm-up (if None, the norm itself: the step is not
    clipped; 0 before the first step), :math:`\min(T, \text{max\_norm})` on a
    spike, and otherwise the norm at which this step would have counted as a
    spike, capped at ``max_norm``:
    :math:`\mu + z_\text{thresh}(\sigma + \epsilon)` in "zscore" mode,
    :math:`\mu + z_\text{thresh}\sigma` in "percentile" mode.

    Args:
      alpha: EMA decay :math:`\alpha \in (0, 1)` (default 0.97).
      z_thresh: the z-score (or number of standard deviations) above which a
        norm is a spike, :math:`> 0` (default 2.5).
      max_norm: the cap :math:`\ge 0` on every threshold, and the clip applied
        during warm-up (default 1.0); None for no cap.
      warmup_steps: how many finite norms to collect before the statistics
        start, :math:`\ge 1` (default 25). It sets a buffer shape, so under
        ``optax.inject_hyperparams`` name it in ``static_args``.
      mode: ``"zscore"`` (default) or ``"percentile"``.
      clip_option: ``"adaptive_scaling"`` (default) or ``"mean"``, for mode
        "zscore".
      clip_factor: multiplier :math:`> 0` of the adaptive-scaling threshold
        (default 1.0; 0.5–0.9 clips harder).
      skip_update_on_spike: leave the statistics unchanged on a spike (default
        False).
      eps: :math:`\epsilon \ge 0` added to :math:`\sigma` in the z-score
        (default 1e-6).
      axis_name: inside ``shard_map``/``pmap``, the mapped axis whose shards
        together hold the gradients (squared norms are summed over it).

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`
      (``norm`` before clipping, ``threshold`` as above, ``scale`` applied,
      ``clipped``).

    Reference:
      Kumar, Owen, Ashraf, Bhagwat, Agarwal, "ZClip: Adaptive Spike Mitigation
      for LLM Pre-Training", 2025 (arXiv:2504.02507).

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = optax.chain(clipx.zclip(max_norm=None, warmup_steps=3), optax.sgd(1.0))
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (1.0, 2.0, 3.0, 10.0):  # warm-up gives μ = 2, σ² = 2/3; then a spike
      ...     updates, state = tx.update(jnp.array([g]), state)
      >>> round(float(clipx.stats(state)["zclip/threshold"]), 4)
      2.5208
      >>> [round(float(u), 4) for u in updates]
      [-2.5208]
    """
    alpha = _validate.check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    z_thresh = _validate.check_finite_positive("z_thresh", z_thresh)
    if max_norm is not None:
        max_norm = _validate.check_nonnegative("max_norm", max_norm)
    warmup_steps = _validate.check_int("warmup_steps", warmup_steps, low=1, high=2**31 - 1)
    _validate.check_choice("mode", mode, _MODES)
    _validate.check_choice("clip_option", clip_option, _CLIP_OPTIONS)
    clip_factor = _validate.check_finite_positive("clip_factor", clip_factor)
    skip_update_on_spike = _validate.as_bool("skip_update_on_spike", skip_update_on_spike)
    eps = _validate.check_finite_nonnegative("eps", eps)

    def init_fn(params):
        dtype = _numerics.tree_accumulation_dtype(params)
        # jnp.array copies: a donated state must not take the caller's max_norm with it.
        cap = jnp.array(_numerics.at_most_largest(0.0 if max_norm is None else max_norm, jnp.float32))
        return ZClipState(
            warmup_norms=jnp.zeros((warmup_steps,), dtype),
            warmup_count=jnp.zeros((), jnp.int32),
            mean=jnp.zeros((), dtype),
            var=jnp.zeros((), dtype),
            stats=empty_clip_stats()._replace(threshold=cap),
        )

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, ZClipState)
        del params
        _validate.check_state_made_by(
            jnp.shape(state.warmup_norms) == (warmup_steps,),
            f"zclip: the state's warm-up buffer has shape {jnp.shape(state.warmup_norms)}, "
            f"this zclip's ({warmup_steps},)",
            "Was it made by a zclip with another warmup_steps?",
        )
        dtype = state.mean.dtype
        norm = _numerics.tree_norm(updates, axis_name).astype(dtype)
        finite = jnp.isfinite(norm)
        ready = state.warmup_count >= warmup_steps
        mean, var = state.mean, state.var
        # A cap of ∞ (or past the dtype's range) is the largest float: it clips nothing finite, and
        # a norm that overflows is scaled to zero, as with no cap.
        cap = None if max_norm is None else _numerics.at_most_largest(max_norm, dtype)

        def capped(threshold: jax.Array) -> jax.Array:
            return threshold if cap is None else jnp.minimum(threshold, cap)

        z_thresh_, eps_, alpha_, clip_factor_ = (
            _numerics.hyperparameter(h, dtype) for h in (z_thresh, eps, alpha, clip_factor)
        )
        std = _numerics.safe_sqrt(var)
        # Thresholds and statistics stop at the largest float: a huge factor means no clipping,
        # and ∞ (or ∞ − ∞ = NaN in the variance) would switch the rule off for good.
        largest = jnp.finfo(dtype).max

        # The threshold T, whether this step is a spike, and the spike boundary.
        if mode == "percentile":
            spike_threshold = jnp.minimum(mean + z_thresh_ * std, largest)
            is_spike = norm > spike_threshold
            boundary = spike_threshold
        else:
            # z > z_thresh, and z_thresh / z on a spike, without dividing by σ + ε: with ε = 0 and
            # σ = 0 (as in warm-up) a division would put NaN into the derivatives.
            excess, spread = norm - mean, std + eps_
            is_spike = excess > z_thresh_ * spread
            boundary = jnp.minimum(mean + z_thresh_ * spread, largest)
            if clip_option == "adaptive_scaling":
                inverse_eta = jnp.where(is_spike, z_thresh_ * spread / jnp.where(is_spike, excess, 1), 1)
                spike_threshold = jnp.minimum((mean + z_thresh_ * std * inverse_eta) * clip_factor_, largest)
            else:
                spike_threshold = mean
        spike = ready & is_spike

        # With no cap, a step that is no spike is clipped to its own norm (not at all): no ∞ for
        # "no threshold", which would stop jax_debug_infs. A norm that overflows is above the
        # largest float, so scaled to zero.
        unclipped = jnp.minimum(norm, jnp.finfo(norm.dtype).max)
        applied = jnp.where(spike, capped(spike_threshold), unclipped if cap is None else cap)
        scale = _numerics.clip_scale(norm, applied)
        reported = jnp.where(ready & ~spike, capped(boundary), applied)

        # EMA statistics after warm-up (x = T on a spike, else the norm).
        x = jnp.where(spike, spike_threshold, norm)
        ema_mean = jnp.minimum(alpha_ * mean + (1 - alpha_) * x, largest)
        ema_var = jnp.minimum(alpha_ * var + (1 - alpha_) * jnp.square(x - ema_mean), largest)
        update_ema = ready & finite
        if skip_update_on_spike:
            update_ema = update_ema & ~spike

        # Warm-up: store finite norms; after the last one, start the statistics.
        collect = ~ready & finite
        slot = jnp.minimum(state.warmup_count, warmup_steps - 1)
        warmup_norms = jnp.asarray(state.warmup_norms)  # NumPy arrays in a restored state have no .at
        warmup_norms = warmup_norms.at[slot].set(jnp.where(collect, norm, warmup_norms[slot]))
        warmup_count = state.warmup_count + collect.astype(jnp.int32)
        start = collect & (warmup_count == warmup_steps)
        warmup_mean = jnp.mean(warmup_norms)
        # Each square divided before the sum: finite norms whose variance is finite never overflow it.
        warmup_var = jnp.sum(jnp.square(warmup_norms - warmup_mean) / warmup_norms.shape[0])

        new_mean = jnp.where(start, warmup_mean, jnp.where(update_ema, ema_mean, mean)).astype(dtype)
        new_var = jnp.where(start, warmup_var, jnp.where(update_ema, ema_var, var)).astype(dtype)
        stats = global_clip_stats(norm, reported, scale)
        new_state = ZClipState(
            warmup_norms=warmup_norms,
            warmup_count=warmup_count,
            mean=new_mean,
            var=new_var,
            stats=replacing(state.stats, stats),
        )
        return _numerics.scale_tree(updates, scale), new_state

    return optax.GradientTransformation(init_fn, update_fn)
