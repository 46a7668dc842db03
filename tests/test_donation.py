"""Every transform's state can be donated to a jitted step: no two state leaves share a buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from test_sharding import PER_EXAMPLE, TRANSFORMS

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
