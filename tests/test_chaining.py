"""Each clipper in front of sgd(momentum), rmsprop and adam: runs, stays finite, and changes the result."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from test_sharding import TRANSFORMS

import clipx

CLIPPERS = {
    "value": lambda: clipx.value(0.5),
    "global_norm": lambda: clipx.global_norm(0.5),
    "tensor_norm": lambda: clipx.tensor_norm(0.5),
    "block_rms": lambda: clipx.block_rms(0.5),
    "agc": lambda: clipx.agc(0.05),
}
OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "rmsprop": lambda: optax.rmsprop(0.05),
    "adam": lambda: optax.adam(0.05),
}


def loss(params):
    # badly scaled: large, uneven gradients far from the optimum, so every threshold binds
    return jnp.sum(20.0 * (params["w"] - 3.0) ** 2) + jnp.sum((params["b"] + 1.0) ** 4)


def train(tx, steps=4):
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 4.0]]), "b": jnp.array([2.0, -3.0, 0.1])}
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clipper", sorted(CLIPPERS))
def test_clipping_in_a_chain(clipper, optimizer):
    clipped, state = train(optax.chain(CLIPPERS[clipper](), OPTIMIZERS[optimizer]()))
    plain, _ = train(OPTIMIZERS[optimizer]())
    chex.assert_tree_all_finite(clipped)
    assert bool(clipx.stats(state)[f"{clipper}/clipped"])
    difference = max(
        float(jnp.max(jnp.abs(c - p)))
        for c, p in zip(jax.tree.leaves(clipped), jax.tree.leaves(plain), strict=True)
    )
    # adam nearly undoes a uniform rescale of every step (only the change of scale between steps shows)
    assert difference > (1e-4 if optimizer == "adam" else 1e-3)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_a_python_number_among_the_parameters(name):
    """``{"w": array, "temperature": 1.0}`` is a parameter tree ``jax.grad`` and ``optax.adam``
    take; every rule takes it too and treats the number as the float32 scalar it becomes."""
    tx = optax.chain(TRANSFORMS[name].make(), optax.adam(0.1))
    grads = {"w": jnp.array([[3.0, -4.0], [0.5, 2.0]]), "temperature": jnp.asarray(2.5)}

    def run(temperature):
        params = {"w": jnp.ones((2, 2)), "temperature": temperature}
        state = tx.init(params)
        for scale in (1.0, 2.0, 3.0):
            step_grads = {k: scale * g for k, g in grads.items()}
            updates, state = jax.jit(tx.update)(step_grads, state, params)
        return updates, state

    chex.assert_trees_all_close(run(1.0), run(jnp.asarray(1.0)))
