"""Running mean and variance of a scalar series, for rules that adapt to the gradient norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Moments(NamedTuple):
    """Running mean and variance of a scalar series and how many values entered them."""

    mean: jax.Array
    var: jax.Array
    observations: jax.Array


def init_moments(dtype: jnp.dtype) -> Moments:
    """No observation yet: mean 0, variance 0, observations 0 (each its own buffer)."""
    return Moments(mean=jnp.zeros((), dtype), var=jnp.zeros((), dtype), observations=jnp.zeros((), jnp.int32))


def count_up(count: jax.Array, when: jax.Array) -> jax.Array:
    """``count + 1`` where ``when``, saturating at the largest value of its integer dtype (no wrap)."""
    return count + (when & (count < jnp.iinfo(count.dtype).max)).astype(count.dtype)


def update_moments(moments: Moments, x: jax.Array, observe: jax.Array, decay: float | jax.Array) -> Moments:
    r"""Adds ``x`` to the running mean and variance where ``observe`` is True.

    With ``n`` the number of observations including this one, the weight of
    the new value is ``α = max(1/n, 1 − decay)``:

    .. math::

        \delta = x - m, \qquad m \leftarrow m + \alpha\delta, \qquad
        v \leftarrow (1 - \alpha)(v + \alpha\delta^2)

    For the first ``1/(1 − decay)`` observations this is the exact mean and
    population variance (Welford's update, so no bias correction is needed);
    after that an exponential moving average with weight ``1 − decay``. Where
    ``observe`` is False nothing changes, whatever ``x`` is (NaN and ±inf
    included). The count of observations stops at 2³¹ − 1 instead of wrapping.
    """
    dtype = moments.mean.dtype
    observations = count_up(moments.observations, jnp.asarray(True))
    alpha = jnp.maximum(1 / observations.astype(dtype), 1 - jnp.asarray(decay, dtype))
    delta = jnp.where(observe, jnp.asarray(x, dtype), moments.mean) - moments.mean
    mean = moments.mean + alpha * delta
    var = (1 - alpha) * (moments.var + alpha * jnp.square(delta))
    return Moments(
        mean=jnp.where(observe, mean, moments.mean),
        var=jnp.where(observe, var, moments.var),
        observations=jnp.where(observe, observations, moments.observations),
    )


def within_reach(moments: Moments, x: jax.Array) -> jax.Array:
    """``x`` moved to within ``√max / 2`` of the running mean (9.2e18 in float32), in the moments' dtype.

    A series whose values may lie that far apart (a loss, unlike a log-norm)
    passes through this before `update_moments`: ``δ² ≤ max / 4`` then, and the
    variance stays finite, where one such value would make it ∞ for good.
    """
    dtype = moments.mean.dtype
    reach = float(np.sqrt(np.finfo(dtype).max)) / 2
    return jnp.clip(jnp.asarray(x, dtype), moments.mean - reach, moments.mean + reach)
