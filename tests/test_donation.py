"""Every transform's state can be donated to a jitted step: no two state leaves share a buffer."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest
from test_sharding import PER_EXAMPLE, TRANSFORMS

import clipx

ALL = TRANSFORMS | PER_EXAMPLE


def buffers(tree):
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]


@pytest.mark.parametrize("name", sorted(ALL))
def test_init_state_leaves_are_distinct_buffers(name):
    tx = optax.chain(ALL[name].make(), optax.adam(1e-3))
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    state = tx.init(params)
    pointers = buffers(state)
    assert len(pointers) == len(set(pointers)), f"{name}: init state leaves share a buffer"


def test_donated_step_runs():
    """A step with the optimizer state donated (what training loops and benchmarks do) compiles and runs."""
    tx = optax.chain(TRANSFORMS["adaptive"].make(), optax.adam(1e-3))
    params = {"w": jnp.ones((4, 3))}
    step = jax.jit(tx.update, donate_argnums=(1,))
    updates, _ = step({"w": jnp.full((4, 3), 2.0)}, tx.init(params), params)
    assert jnp.all(jnp.isfinite(updates["w"]))


def _aliased_leaves(tx, params, grads):
    """(state leaves, how many of them the compiled step writes into their donated buffers)."""
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
    donated = len(jax.tree.leaves((params, state)))
    return donated, lowered.as_text().count("tf.aliasing_output")


@pytest.mark.parametrize("name", sorted(ALL))
def test_donated_state_buffers_are_reused(name):
    """Every donated buffer is written over: statistics are never fresh outputs beside unused inputs."""
    per_example = name in PER_EXAMPLE
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = jax.tree.map(lambda p: jnp.ones((16, *p.shape)) if per_example else jnp.ones_like(p), params)
    donated, aliased = _aliased_leaves(optax.chain(ALL[name].make(), optax.adam(1e-3)), params, grads)
    assert aliased == donated, f"{name}: {donated - aliased} of {donated} donated leaves are not reused"


# Every public factory with its float hyperparameters given as float32 arrays.
_REQUIRED = {
    "value": {"max_delta": 0.5},
    "global_norm": {"max_norm": 1.0},
    "tensor_norm": {"max_norm": 0.5},
    "block_rms": {"threshold": 0.5},
    "per_example_global_norm": {"l2_norm_clip": 1.0},
    "per_example_layer_norm": {"l2_norm_clip": 1.0},
}
_WRAPPERS = {"skip_nonfinite", "skip_spikes", "without_stats"}


def _with_array_hyperparameters(name):
    """``clipx.<name>`` built with every float hyperparameter as a float32 array, and those arrays."""
    factory = getattr(clipx, name)
    kwargs = dict(_REQUIRED.get(name, {}))
    for parameter in inspect.signature(factory).parameters.values():
        if type(parameter.default) is float:
            kwargs[parameter.name] = parameter.default
    arrays = {key: jnp.array(v, jnp.float32) for key, v in kwargs.items()}
    inner = {"inner": clipx.global_norm(1.0)} if name in _WRAPPERS else {}
    return factory(**arrays, **inner), list(arrays.values())


@pytest.mark.parametrize("name", sorted(n for n in ALL if n in clipx.__all__))
def test_states_never_hold_the_callers_hyperparameter_arrays(name):
    """A donated state must not take the caller's arrays with it (nor share a buffer with
    `inject_hyperparams`'s copy): init and update keep their own."""
    tx, arrays = _with_array_hyperparameters(name)
    per_example = name in PER_EXAMPLE
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((16, 4, 3) if per_example else (4, 3), 2.0)}
    state = tx.init(params)
    _, after = tx.update(grads, state, params)
    held = [leaf for leaf in jax.tree.leaves((state, after)) if any(leaf is a for a in arrays)]
    assert held == [], f"{name}: the state holds a hyperparameter array passed by the caller"


@pytest.mark.parametrize(
    "factory,kwargs,static",
    [
        (clipx.zclip, {"max_norm": 1.0}, ("warmup_steps",)),
        (clipx.per_example_adaptive, {"initial_threshold": 0.1}, ("seed",)),
    ],
)
def test_inject_hyperparams_state_can_be_donated(factory, kwargs, static):
    tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    per_example = factory is clipx.per_example_adaptive
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((16, 4, 3) if per_example else (4, 3), 0.5)}

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, _ = jax.jit(step, donate_argnums=(0, 1))(params, tx.init(params), grads)
    assert jnp.all(jnp.isfinite(params["w"]))
