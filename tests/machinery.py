"""Running a clipx transform step by step inside Optax's machinery, as the tests of every rule do.

`run_steps` applies a jitted update to a sequence of gradients;
`run_resumed` checks that a flax-serialized state resumes bit for bit (and outside ``jit``);
`check_traced_hyperparameter` checks a rule under ``inject_hyperparams``;
`CHAINED_OPTIMIZERS` are the optimizers each rule is chained with.
"""

from __future__ import annotations

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import optax
import pytest

CHAINED_OPTIMIZERS = pytest.mark.parametrize(
    "optimizer",
    [
        optax.sgd(0.1, momentum=0.9),
        optax.rmsprop(1e-2),
        optax.adam(1e-2),
        optax.adamw(1e-2, weight_decay=0.1),
    ],
    ids=["sgd_momentum", "rmsprop", "adam", "adamw"],
)


def run_steps(tx, grads, params, steps):
    """``steps`` jitted updates on ``grads[t]`` (leaves stacked over steps); the updates and final state."""
    step = jax.jit(tx.update)
    state, out = tx.init(params), []
    for t in range(steps):
        updates, state = step(jax.tree.map(lambda g: g[t], grads), state, params)  # noqa: B023
        out.append(updates)
    return out, state


def run_resumed(tx, sequence, params, split):
    """Runs the gradients of ``sequence``, and again from a flax-serialized copy of the state after ``split``.

    Asserts that both give the same updates and states bit for bit, and that
    the restored state (NumPy arrays) also continues outside ``jit``, to float
    tolerance; returns the final state.
    """
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in sequence[:split]:
        _, state = update(g, state, params)
    restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
    a, b, c = state, restored, restored
    for g in sequence[split:]:
        ua, a = update(g, a, params)
        ub, b = update(g, b, params)
        uc, c = tx.update(g, c, params)
        chex.assert_trees_all_equal(ua, ub)
        chex.assert_trees_all_close(uc, ua, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(a, b)
    return a


def check_traced_hyperparameter(factory, kwargs, static_args, grads, params, steps, name, looser, fill):
    """``inject_hyperparams(factory)`` against ``factory`` itself, and one of its hyperparameters moved.

    Over ``steps`` the injected transform gives the plain one's updates; then
    setting ``name`` to the ``looser`` value lets a larger update of a gradient
    filled with ``fill`` through, without recompiling the step.
    """
    plain, _ = run_steps(factory(**kwargs), grads, params, steps)
    tx = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    injected, state = run_steps(tx, grads, params, steps)
    chex.assert_trees_all_close(injected, plain, rtol=1e-6)
    step = jax.jit(tx.update)
    g = jax.tree.map(lambda p: jnp.full_like(p, fill), params)
    tight, _ = step(g, state, params)
    state.hyperparams[name] = jnp.array(looser, jnp.float32)
    loose, _ = step(g, state, params)
    assert step._cache_size() == 1
    assert optax.tree.norm(loose) > optax.tree.norm(tight)
