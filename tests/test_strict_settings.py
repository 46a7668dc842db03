"""Every transform under JAX's stricter global settings.

Users turn these on to find faults in their own code; clipx must not be what
trips them. Strict dtype promotion refuses every implicit mix of dtypes, so
each rule must cast its own values (complex gradients, and the int64/float64
values that x64 makes, against the state's int32/float32, and array
hyperparameters of another dtype); jax_debug_infs and jax_debug_nans stop at
any infinite or NaN intermediate, so a finite step must compute none; rank
promotion set to "raise" refuses implicit broadcasts.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sharding import PER_EXAMPLE, TRANSFORMS, small_gradients, small_shapes

import clipx

ALL = TRANSFORMS | PER_EXAMPLE


def _params_and_gradients(name, dtype):
    """Parameters, and 4 steps of gradients (per-example ones with a batch axis) of ``dtype``."""
    params = {k: jnp.full(s, 0.5, dtype) for k, s in small_shapes(name).items()}
    key = jax.random.key(0)
    return params, [small_gradients(name, jax.random.fold_in(key, t), 1 + 3 * t, dtype) for t in range(4)]


def _run(name, params, steps, tx=None):
    """One step eagerly (op by op), then all steps jitted; every update must be finite."""
    tx = ALL[name].make() if tx is None else tx
    for update, run in ((tx.update, steps[:1]), (jax.jit(tx.update), steps)):
        state = tx.init(params)
        for g in run:
            updates, state = update(g, state, params)
            assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), name


@pytest.mark.parametrize("name", sorted(ALL))
def test_complex_gradients_under_strict_dtype_promotion(name):
    params, steps = _params_and_gradients(name, jnp.complex64)
    with jax.numpy_dtype_promotion("strict"):
        _run(name, params, steps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_x64_under_strict_dtype_promotion(name, dtype):
    """With x64 on, jnp makes int64 and float64 values that strict promotion will not mix with int32 state."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        params, steps = _params_and_gradients(name, jnp.dtype(dtype))
        _run(name, params, steps)


# Every rule with real-valued hyperparameters: its factory and the arguments it needs besides
# them (as in the table of test_sharding: small enough that 4 steps reach every code path).
HYPERPARAMETER_CASES = {
    "value": (clipx.value, {"max_delta": 0.5}),
    "global_norm": (clipx.global_norm, {"max_norm": 1.0}),
    "tensor_norm": (clipx.tensor_norm, {"max_norm": 0.5}),
    "block_rms": (clipx.block_rms, {"threshold": 0.5}),
    "agc": (clipx.agc, {}),
    "adaptive": (clipx.adaptive, {"warmup_steps": 2}),
    "autoclip": (clipx.autoclip, {"quantile": 0.5, "history": 3}),
    "zclip": (clipx.zclip, {"warmup_steps": 2, "max_norm": 5.0}),
    "adagc": (clipx.adagc, {"warmup_steps": 2}),
    "quantile_clip": (clipx.quantile_clip, {"initial_threshold": 1.0}),
    "skip_spikes": (clipx.skip_spikes, {"inner": clipx.global_norm(1.0), "min_observations": 2}),
    "per_example_global_norm": (
        clipx.per_example_global_norm,
        {"l2_norm_clip": 1.0, "noise_multiplier": 0.5, "seed": 0},
    ),
    "per_example_layer_norm": (clipx.per_example_layer_norm, {"l2_norm_clip": 1.0, "uniform": False}),
    "per_example_adaptive": (clipx.per_example_adaptive, {"initial_threshold": 1.0}),
}


def _with_array_hyperparameters(name, dtype):
    """The rule ``name`` with each float hyperparameter that may be an array given as a ``dtype`` array."""
    factory, kwargs = HYPERPARAMETER_CASES[name]
    kwargs = dict(kwargs)
    for p in inspect.signature(factory).parameters.values():
        value = kwargs.get(p.name, p.default)
        if "jax.Array" in str(p.annotation) and isinstance(value, float):
            kwargs[p.name] = jnp.asarray(value, dtype)
    return factory(**kwargs)


@pytest.mark.parametrize("name", sorted(HYPERPARAMETER_CASES))
def test_array_hyperparameters_of_another_dtype_under_strict_dtype_promotion(name):
    """bfloat16 hyperparameters (``inject_hyperparams(..., hyperparam_dtype=jnp.bfloat16)``) with
    float32 gradients, and float32 ones with float64 gradients under x64: each rule casts them."""
    with jax.numpy_dtype_promotion("strict"):
        params, steps = _params_and_gradients(name, jnp.float32)
        _run(name, params, steps, _with_array_hyperparameters(name, jnp.bfloat16))
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        params, steps = _params_and_gradients(name, jnp.float64)
        _run(name, params, steps, _with_array_hyperparameters(name, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.float32])
def test_clipped_grad_sum_under_strict_dtype_promotion(dtype):
    def loss(p, x):
        return jnp.real(jnp.sum(jnp.conj(p) * x))

    params = jnp.zeros(2, dtype)
    batch = jnp.arange(10, dtype=jnp.float32).reshape(5, 2).astype(dtype)
    expected, _ = clipx.clipped_grad_sum(loss, params, batch, 1.0, chunk_size=2)
    with jax.numpy_dtype_promotion("strict"):
        total, norms = clipx.clipped_grad_sum(loss, params, batch, 1.0, chunk_size=2)
    assert total.dtype == jnp.dtype(dtype) and norms.shape == (5,)
    assert jnp.allclose(total, expected)


# Beside the table: a rule whose "no threshold" was once an ∞.
UNCAPPED = {"zclip_uncapped": lambda: clipx.zclip(warmup_steps=2, max_norm=None)}


@pytest.mark.parametrize("name", sorted(ALL) + sorted(UNCAPPED))
def test_finite_steps_pass_under_debug_infs_nans_and_rank_checks(name):
    """jax_debug_infs/nans stop at the first ∞/NaN an operation makes (eagerly) or a jitted step
    returns, so no rule may stand for "no threshold yet" (warm-up, an empty history, no cap) with an
    ∞, nor divide 0 by 0 on a step of zero gradients; jax_numpy_rank_promotion="raise" refuses every
    implicit broadcast between arrays of different ranks."""
    params, steps = _params_and_gradients(name, jnp.float32)
    steps = [*steps, jax.tree.map(jnp.zeros_like, steps[0])]
    tx = UNCAPPED[name]() if name in UNCAPPED else ALL[name].make()
    with jax.debug_infs(True), jax.debug_nans(True), jax.numpy_rank_promotion("raise"):
        for update in (tx.update, jax.jit(tx.update)):
            state = tx.init(params)
            for g in steps:
                _, state = update(g, state, params)


def test_skip_spikes_takes_no_log_of_a_zero_norm_under_debug_infs():
    """After warm-up, a step of zero gradients is neither a spike nor an observation, and computes no −∞."""
    tx = clipx.skip_spikes(optax.sgd(0.1), min_observations=1)
    params = jnp.ones(2)
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(jnp.ones(2), state, params)
    with jax.debug_infs(True):
        updates, state = tx.update(jnp.zeros(2), state, params)
    assert not bool(clipx.stats(state)["skip_spikes/skipped"])
    assert jnp.array_equal(updates, jnp.zeros(2))


@pytest.mark.parametrize("num_stds", [6.0, 1000.0])
def test_skip_spikes_reports_no_infinite_threshold_for_finite_norms(num_stds):
    """μ + k·σ of log‖g‖ beyond float32's range (a huge k, or norms e^±15 in warm-up) is no ∞."""
    tx = clipx.skip_spikes(optax.sgd(0.1), num_stds=num_stds, min_observations=1 if num_stds > 6 else 64)
    params = jnp.ones(2)
    state = tx.init(params)
    with jax.debug_infs(True):
        for log_norm in (-15.0, 15.0, -15.0, 15.0):
            _, state = tx.update(jnp.array([jnp.exp(log_norm), 0.0]), state, params)
    assert jnp.isfinite(clipx.stats(state)["skip_spikes/grad_norm/threshold"])


@pytest.mark.parametrize(
    "count", [np.uint8(2), np.int16(2), jnp.asarray(2, jnp.uint32), jnp.asarray(2, jnp.int8)], ids=repr
)
def test_counts_of_another_integer_dtype_under_strict_dtype_promotion(count):
    """A count given as a NumPy integer or an integer array of another dtype is compared with
    the int32 counters as int32."""
    with jax.numpy_dtype_promotion("strict"):
        params, steps = _params_and_gradients("adaptive", jnp.float32)
        _run("adaptive", params, steps, clipx.adaptive(warmup_steps=count))
        _run("adagc", params, steps, clipx.adagc(warmup_steps=count))
        for guard in (clipx.skip_nonfinite, clipx.skip_spikes):
            _run("adaptive", params, steps, guard(optax.sgd(0.1), max_consecutive=count))
        _run("adaptive", params, steps, clipx.skip_spikes(optax.sgd(0.1), min_observations=count))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_float32_and_float64_leaves_in_one_tree_under_strict_dtype_promotion(name):
    """Under x64 a float64 norm scales a float32 leaf, and float32 and float64 sums are tested together."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        params32, steps32 = _params_and_gradients(name, jnp.float32)
        params64, steps64 = _params_and_gradients(name, jnp.float64)
        mixed = {"float32": params32, "float64": params64}
        _run(name, mixed, [{"float32": a, "float64": b} for a, b in zip(steps32, steps64, strict=True)])
