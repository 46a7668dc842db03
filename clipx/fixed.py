"""Clipping with fixed thresholds: by value, by global norm, per tensor, by block RMS."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _numerics, _validate
from clipx._stats import ClipStats, empty_clip_stats


class GlobalNormState(NamedTuple):
    """State of `global_norm`: only what it reports."""

    stats: ClipStats
    stats_name = "global_norm"


def global_norm(
    max_norm: float | jax.Array, *, axis_name: _numerics.AxisName | None = None
) -> optax.GradientTransformation:
    r"""Clips the update to a maximum global L2 norm (Pascanu et al., 2013).

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g \rVert_2}\right),
        \qquad \lVert g \rVert_2 = \sqrt{\textstyle\sum_\text{leaves} \sum |g|^2}

    The same rule as ``optax.clip_by_global_norm`` and PyTorch's
    ``clip_grad_norm_``, with safer numerics: the norm is accumulated in float32
    (float64 for float64 leaves), so float16 gradients do not overflow; a zero
    norm or a zero threshold gives no NaN; below the threshold the update is
    returned bit for bit. A non-finite gradient gives a non-finite update (wrap
    the chain in `clipx.skip_nonfinite` to drop such steps).

    Args:
      max_norm: the threshold ``c ≥ 0`` (a number, or a scalar array for
        ``optax.inject_hyperparams``).
      axis_name: inside ``shard_map``/``pmap`` where each device holds a shard
        of every gradient, the mapped axis to sum squared norms over. Leave it
        ``None`` under plain ``jax.jit`` with sharded arrays: XLA partitions
        the reduction itself.

    Returns:
      An ``optax.GradientTransformation`` whose state reports `ClipStats`
      (``norm`` before clipping, ``threshold``, ``scale`` applied, ``clipped``).

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
    """
    _validate.check_nonnegative("max_norm", max_norm)

    def init_fn(params):
        del params
        return GlobalNormState(stats=empty_clip_stats())

    def update_fn(updates, state, params=None):
        del params, state
        norm = _numerics.tree_norm(updates, axis_name)
        scale = _numerics.clip_scale(norm, max_norm)
        stats = ClipStats(
            norm=norm,
            threshold=jnp.asarray(max_norm, norm.dtype),
            scale=scale,
            clipped=scale < 1,
        )
        return _numerics.scale_tree(updates, scale), GlobalNormState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)
