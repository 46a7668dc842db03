"""`quantile_clip`: global-norm clipping at an online estimate of a quantile of the norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _numerics, _validate
from clipx._stats import ClipStats, empty_clip_stats, global_clip_stats, replacing


class QuantileClipState(NamedTuple):
    """State of `quantile_clip`.

    Attributes:
      log_threshold: ``log C``, the log of the threshold the next step clips
        to (in logs the geometric steps are additions, which keeps float32
        rounding from drifting over many steps).
      stats: the `ClipStats` of the last step.
    """

    log_threshold: jax.Array
    stats: ClipStats
    stats_name = "quantile_clip"  # type: ignore[misc]  # a class attribute, not a field


def quantile_clip(
    target_quantile: float | jax.Array = 0.5,
    learning_rate: float | jax.Array = 0.2,
    initial_threshold: float | jax.Array = 0.1,
    *,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Clips the global norm at a threshold that tracks a quantile of the norms (Andrew et al., 2021).

    The threshold ``C`` is an online estimate of the ``γ``-quantile of the
    gradient norm, kept in O(1) state (one scalar, no history). Each step

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{C}{\lVert g \rVert}\right), \qquad
        b = [\lVert g \rVert \le C], \qquad
        C \leftarrow C \cdot e^{-\eta\,(b - \gamma)}

    so ``C`` shrinks by ``e^{−η(1−γ)}`` when the norm was below it and grows
    by ``e^{ηγ}`` when it was above: it settles where a fraction ``γ`` of the
    norms lies below. The step is clipped with the threshold *before* the
    update, as in the paper, where the clip norm of a round is fixed before
    its updates are seen; the reported ``threshold`` is the one used. ``b``
    is per step here (the per-example form belongs to DP-SGD).

    The name says what it does: clip at a quantile. `clipx.autoclip` also
    clips at a quantile, the exact one of a window of past norms; this rule
    needs no window and adapts geometrically (a factor ``e^η`` in a few
    steps), at the price of a threshold that wanders around the quantile.

    Defaults are those of TensorFlow Federated: ``γ = 0.5`` (the median),
    ``η = 0.2``, ``C₀ = 0.1``.

    ``C`` is held as its logarithm, so it is ``C₀`` to within a float32
    rounding (``exp(log 0.1)`` is 0.099999994), and it stops growing just
    below the largest float (no threshold of ∞). A non-finite or zero norm
    leaves ``C`` unchanged: a run of zero gradients
    (a masked loss, say) would otherwise shrink ``C`` by ``e^{−η(1−γ)}`` a
    step, to 0 in float32 after about 900 steps, and every later update
    would be zero for as many steps again. A gradient holding NaN or ±inf
    gives a non-finite update (wrap the optimizer in `clipx.skip_nonfinite` to
    drop such steps); a finite one whose norm overflows (entries above about
    1.8·10¹⁹ in float32) is scaled to zero.

    Args:
      target_quantile: ``γ`` in ``[0, 1]``.
      learning_rate: ``η ≥ 0``, the step of the geometric update.
      initial_threshold: ``C₀``, a normal float32 (in [1.2e-38, 3.4e38]).
      axis_name: inside ``shard_map``/``pmap``, the mapped axis to sum the
        squared norm over (as in `clipx.global_norm`).

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`
      under the name ``"quantile_clip"``.

    Reference:
      Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
      with Adaptive Clipping", NeurIPS 2021.

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = clipx.quantile_clip(initial_threshold=1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([3.0, 4.0]), state)  # clipped to C = 1
      >>> updates.round(3)
      Array([0.6, 0.8], dtype=float32)
      >>> round(float(jnp.exp(state.log_threshold)), 4)  # above C: C·e^{0.2·0.5}
      1.1052
    """
    target_quantile = _validate.check_range("target_quantile", target_quantile, 0.0, 1.0)
    learning_rate = _validate.check_finite_nonnegative("learning_rate", learning_rate)
    initial_threshold = _validate.check_normal_float32("initial_threshold", initial_threshold)

    def init_fn(params):
        dtype = _numerics.tree_accumulation_dtype(params)
        log_threshold = jnp.log(jnp.asarray(initial_threshold, dtype))
        log_threshold = jnp.minimum(log_threshold, _numerics.largest_log(dtype))
        return QuantileClipState(log_threshold=log_threshold, stats=empty_clip_stats())

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, QuantileClipState)
        del params
        threshold = jnp.exp(state.log_threshold)
        norm = _numerics.tree_norm(updates, axis_name)
        scale = _numerics.clip_scale(norm, threshold.astype(norm.dtype))
        below = (norm <= threshold).astype(threshold.dtype)
        rate = _numerics.hyperparameter(learning_rate, threshold.dtype)
        step = -rate * (below - _numerics.hyperparameter(target_quantile, threshold.dtype))
        stats = global_clip_stats(norm, threshold, scale)
        observed = jnp.isfinite(norm) & (norm > 0)
        grown = jnp.minimum(state.log_threshold + step, _numerics.largest_log(threshold.dtype))
        log_threshold = jnp.where(observed, grown, state.log_threshold)
        new_state = QuantileClipState(
            log_threshold=log_threshold.astype(threshold.dtype), stats=replacing(state.stats, stats)
        )
        return _numerics.scale_tree(updates, scale), new_state

    return optax.GradientTransformation(init_fn, update_fn)
