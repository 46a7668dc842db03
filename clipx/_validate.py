"""Construction-time checks of hyperparameters and tree structures.

Python numbers are checked when a factory is called and a bad value raises
``ValueError``/``TypeError`` naming the argument and the allowed range. JAX
arrays (for ``optax.inject_hyperparams`` and schedules) are kept as they are;
a concrete one is checked like a number (so ``optax.inject_hyperparams``
refuses a bad value in ``init``), a traced one is not: nothing raises inside
a traced function. The checks of real-valued
hyperparameters return the value the factory should use: a Python ``float``
for every concrete number (NumPy scalars of any dtype, bfloat16 included,
``fractions.Fraction``, integers too large for a float as ±∞), the JAX
array itself otherwise; so no rule ever computes with an unsigned integer
(``-np.uint8(1)`` is 255) or a type JAX cannot take.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np


def _as_python_number(name: str, value: Any) -> float | None:
    """``float(value)`` for Python/NumPy real numbers; None for JAX arrays and tracers."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            return math.inf if cast(int, value) > 0 else -math.inf
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):  # np.generic: bfloat16 scalars
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
        if not jnp.issubdtype(value.dtype, jnp.integer) and not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name} must be a real number, got an array of dtype {value.dtype}")
        return None if isinstance(value, jax.Array) else float(value)
    raise TypeError(
        f"{name} must be a real number or a scalar JAX array, got {type(value).__name__} {value!r}"
    )


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """``value`` as a Python float; raises unless it lies in ``low..high`` (bounds closed by default).

    NaN is always rejected. A JAX array comes back as it is, checked if it is
    concrete (one transfer to the host), not if it is traced.
    """
    number = concrete_number(name, value)
    if number is None:
        return value
    above_low = number > low if low_open else number >= low
    below_high = number < high if high_open else number <= high
    if math.isnan(number) or not (above_low and below_high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value if isinstance(value, jax.Array) else number


def check_nonnegative(name: str, value: Any) -> Any:
    """``value ≥ 0``, infinity allowed: for thresholds, where it disables clipping."""
    return check_range(name, value, 0.0)


def check_positive(name: str, value: Any) -> Any:
    """``value > 0``, infinity allowed: for thresholds, where it disables clipping."""
    return check_range(name, value, 0.0, low_open=True)


# Rates, factors and offsets enter float32 arithmetic: one past float32's range is ∞ there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The smallest normal float32: below it a float32 logarithm is no longer finite.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def check_finite_nonnegative(name: str, value: Any) -> Any:
    """``0 ≤ value ≤ 3.4e38`` (finite in float32): for rates, factors and offsets, which ∞ turns into NaN."""
    return check_range(name, value, 0.0, _FLOAT32_MAX)


def check_finite_positive(name: str, value: Any) -> Any:
    """``0 < value ≤ 3.4e38`` (finite in float32)."""
    return check_range(name, value, 0.0, _FLOAT32_MAX, low_open=True)


#: The largest noise standard deviation whose every draw is finite in float32: the float32 draws of
#: ``jax.random.normal`` lie within ±5.42 (√2·erfinv of its uniform's extremes).
NOISE_STD_MAX = _FLOAT32_MAX / 5.42


def check_noise_std(name: str, value: Any, other_name: str, other: Any) -> None:
    """``value · other ≤ 6.28e37`` when both are concrete and positive: a noise std ``σ·C`` (`NOISE_STD_MAX`).

    A zero factor gives no noise, whatever the other (even ``C = ∞``).
    """
    number, factor = concrete_number(name, value), concrete_number(other_name, other)
    if number is None or factor is None or number == 0 or factor == 0:
        return
    if not number * factor <= NOISE_STD_MAX:
        raise ValueError(
            f"{name} · {other_name} (the noise standard deviation) must be at most {NOISE_STD_MAX:.3g}, "
            f"so that every draw of the noise is finite in float32, got {value!r} · {other!r}"
        )


def check_normal_float32(name: str, value: Any) -> Any:
    """A positive value whose float32 logarithm is finite (a normal float32): a starting threshold."""
    return check_range(name, value, FLOAT32_TINY, _FLOAT32_MAX)


def concrete_number(name: str, value: Any) -> float | None:
    """``float(value)`` for a number or a concrete JAX array; None for a traced one."""
    number = _as_python_number(name, value)
    if number is None and not isinstance(value, jax.core.Tracer):
        number = float(value)
    return number


def check_not_above(name: str, value: Any, bound_name: str, bound: Any) -> None:
    """``value ≤ bound``, when both are concrete (traced arrays are not checked)."""
    number, limit = concrete_number(name, value), concrete_number(bound_name, bound)
    if number is not None and limit is not None and number > limit:
        raise ValueError(f"{name} must be at most {bound_name} ({limit:g}), got {value!r}")


# Why a count or a flag cannot be an array: the hint for `optax.inject_hyperparams` users.
_STATIC_HINT = (
    "it decides shapes or Python control flow: under optax.inject_hyperparams name it in static_args"
)


def check_int(name: str, value: Any, low: int = 0, high: int | None = None) -> int:
    """A Python or NumPy integer in ``[low, high]`` (not a bool, not a float), returned as a Python int.

    A NumPy integer is not kept: ``2 * np.uint8(200)`` wraps to 144.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        value = int(value)
    if isinstance(value, jax.Array):
        raise TypeError(f"{name} must be a Python int, got a JAX array; {_STATIC_HINT}")
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be an int <= {high} (counted in int32), got {value!r}")
    return value


def check_norm_order(name: str, value: Any) -> float:
    """A norm's order ``p``, ``1 ≤ p ≤ ∞``: a Python or NumPy real number, returned as a Python float.

    Not an array: the order picks what the step computes.
    """
    if isinstance(value, jax.Array):
        raise TypeError(f"{name} must be a Python number, got a JAX array; {_STATIC_HINT}")
    if not isinstance(value, (numbers.Real, np.ndarray, np.generic)):
        raise TypeError(f"{name} must be a real number in [1, inf], got {type(value).__name__} {value!r}")
    number = _as_python_number(name, value)
    if number is None or math.isnan(number) or number < 1:
        raise ValueError(f"{name} must be in [1, inf] (1, 2, math.inf, or any p between), got {value!r}")
    return number


def check_seed(name: str, value: Any) -> int | jax.Array:
    """A PRNG seed: an int within int64, returned as a Python int, or an integer JAX array (as
    ``optax.inject_hyperparams`` passes), returned as it is."""
    if isinstance(value, jax.Array):
        if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(
                f"{name} must be an integer scalar, got an array of {value.dtype}{list(value.shape)}"
            )
        return value
    value = check_int(name, value, low=-(2**63))
    if value > 2**63 - 1:
        raise ValueError(f"{name} must be an int within int64, got {value!r}")
    return value


def check_transformation(name: str, value: Any) -> None:
    """``value`` has ``init`` and ``update``: an Optax transformation, not its factory."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        hint = " (call the factory: clipx.value(1.0), not clipx.value)" if callable(value) else ""
        raise TypeError(f"{name} must be an optax GradientTransformation{hint}, got {type(value).__name__}")


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool: a bool or a NumPy bool, nothing else (not 0 or 1)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, jax.Array):
        raise TypeError(f"{name} must be a Python bool, got a JAX array; {_STATIC_HINT}")
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_update(updates: Any, state: Any, state_type: type) -> None:
    """Raises ``TypeError`` unless ``update``'s arguments are ones a clipx rule can use.

    Every leaf of ``updates`` must be a floating-point or complex array: an
    integer or boolean update has no norm to clip to (rounded back to its
    dtype, a scaled update is mostly 0, and an unsigned one negated wraps
    around), and a Python number has no shape. ``state`` is checked by
    `check_state`.
    """
    # The leaf's path is spelled out only on an error: a step traces thousands of leaves.
    for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(
                f"clipx clips arrays; the update {jax.tree_util.keystr(path)} is a "
                f"{type(leaf).__name__} (use jnp.asarray)"
            )
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                "clipx clips floating-point or complex updates; the update "
                f"{jax.tree_util.keystr(path)} has dtype {leaf.dtype}"
            )
    check_state(state, state_type)


def check_state(state: Any, state_type: type) -> None:
    """Raises ``TypeError`` unless ``state`` is the ``state_type`` that ``init`` returns.

    clipx transforms keep their statistics in their state, so Optax's
    ``update(updates, None)`` for stateless transforms does not apply, and a
    checkpoint restored without its target comes back as dicts.
    """
    if not isinstance(state, state_type):
        restored = ""
        if isinstance(state, (str, Mapping)):  # optax.chain hands each transform a key of a restored dict
            restored = (
                " If it is a checkpoint restored without its target (as dicts), restore it into "
                "tx.init(params) (flax.serialization.from_bytes(tx.init(params), data))."
            )
        raise TypeError(
            f"the state must be the {state_type.__name__} that init(params) returns, got a "
            f"{type(state).__name__}. clipx transforms keep their statistics in their state: pass "
            f"tx.init(params)'s result (or a checkpoint restored into it), not None.{restored}"
        )


def check_same_structure(
    expected: Any,
    actual: Any,
    what: str,
    hint: str = "Was this state created by init() for a different parameter tree?",
) -> None:
    """Raises ``ValueError`` if two pytrees differ in structure (checked at trace time).

    ``hint`` ends the message: what the caller should check or change.
    """
    expected_def: Any = jax.tree.structure(expected)
    actual_def: Any = jax.tree.structure(actual)
    if expected_def != actual_def:
        raise ValueError(
            f"{what}: the tree structures differ.\n  expected: {expected_def}\n  got:      {actual_def}\n"
            + hint
        )


def check_state_made_by(made_alike: bool, what: str, hint: str) -> None:
    """Raises ``ValueError`` unless a restored state is one this transform's settings make (at trace time).

    A checkpoint restored into another transform's state keeps its own buffers'
    shapes, which nothing else would check. ``hint`` ends the message.
    """
    if not made_alike:
        raise ValueError(f"{what}. {hint}")


_INT32_MAX = 2**31 - 1


def check_steps(name: str, value: Any, low: int = 0) -> int | jax.Array:
    """A step count: a Python int in ``[low, 2³¹ − 1]`` (checked; it is compared with int32
    counters), or a scalar integer JAX array (checked against ``low`` if concrete), returned as int32.

    ``optax.inject_hyperparams`` turns every numeric argument, counts included,
    into an array, so counts that are only compared inside traced code accept one.
    An array of another integer dtype is cast to the counters' int32 (saturating
    at 2³¹ − 1), so it compares with them under strict dtype promotion too.
    """
    if isinstance(value, jax.Array):
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(
                f"{name} must be a scalar integer, got an array of shape {value.shape}, dtype {value.dtype}"
            )
        if not isinstance(value, jax.core.Tracer) and int(value) < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if np.iinfo(value.dtype).max > _INT32_MAX:
            value = jnp.minimum(value, jnp.asarray(_INT32_MAX, value.dtype))
        return value.astype(jnp.int32)
    value = check_int(name, value, low)
    if value > _INT32_MAX:
        raise ValueError(f"{name} must be at most 2**31 - 1 (steps are counted in int32), got {value!r}")
    return value
