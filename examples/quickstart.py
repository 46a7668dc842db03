"""A first look at clipx: clip a gradient, read what the clipper did."""

import jax.numpy as jnp
import optax

import clipx

params = {"w": jnp.zeros(3)}
grads = {"w": jnp.array([30.0, 40.0, 0.0])}

tx = optax.chain(clipx.global_norm(1.0), optax.sgd(0.1))
state = tx.init(params)
updates, state = tx.update(grads, state, params)

print("updates:", updates)
for key, value in clipx.stats(state).items():
    print(f"{key:>24s} = {float(value):g}")
