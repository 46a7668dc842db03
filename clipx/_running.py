"""Running mean and variance of a scalar series, for rules that adapt to the gradient norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
    A value farther from the mean than the square root of the dtype's largest
    value (1.8e19 in float32: a loss, say) enters as one that far, and the
    variance stays below that largest value, so that both stay finite.
    """
    dtype = moments.mean.dtype
    largest = jnp.finfo(dtype).max
    observations = count_up(moments.observations, jnp.asarray(True))
    alpha = jnp.maximum(1 / observations.astype(dtype), 1 - jnp.asarray(decay, dtype))
    delta = jnp.where(observe, jnp.asarray(x, dtype), moments.mean) - moments.mean
    delta = jnp.clip(delta, -jnp.sqrt(largest), jnp.sqrt(largest))  # δ² ≤ largest
    mean = moments.mean + alpha * delta
    # Each term at most half the largest value, so that the sum is finite (on ordinary values: v + αδ²).
    var = (1 - alpha) * (
        jnp.minimum(moments.var, largest / 2) + jnp.minimum(alpha * jnp.square(delta), largest / 2)
    )
    return Moments(
        mean=jnp.where(observe, mean, moments.mean),
        var=jnp.where(observe, var, moments.var),
        observations=jnp.where(observe, observations, moments.observations),
    )
