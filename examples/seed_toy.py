"""The seed article's toy problem: value clipping with plain SGD on a quadratic.

Minimise L(θ) = Σ (θ − 0.5)² from θ = [0.1, 0.2] with the update

    θ ← θ − η · clip(∇L(θ), c),   clip(g, c) = max(min(g, c), −c),   ∇L(θ) = 2(θ − 0.5),

at c = 1.0 and η = 0.01, i.e. ``optax.chain(clipx.value(1.0), optax.sgd(0.01))``.
Here every gradient lies inside [−1, 1], so the clip never binds and each step
shrinks the distance to 0.5 by the factor 1 − 2η = 0.98; start further away
(``--start -2 3``) and the clip binds: θ then moves by exactly η per step.

The article's TensorFlow version calls ``tf.clip_by_value(g, clip_value,
clip_value)``, which pins every gradient to +clip_value; the lower bound must be
``-clip_value``, as in the formula above.

Run: ``python examples/seed_toy.py [--steps 5] [--start 0.1 0.2]``
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import clipx


def loss(theta: jax.Array) -> jax.Array:
    """L(θ) = Σ (θ − 0.5)²."""
    return jnp.sum((theta - 0.5) ** 2)


def train(start: tuple[float, ...] = (0.1, 0.2), steps: int = 5, clip: float = 1.0, lr: float = 0.01) -> list:
    """θ after each of ``steps`` steps of value-clipped SGD (the first entry is the start)."""
    tx = optax.chain(clipx.value(clip), optax.sgd(lr))
    theta = jnp.asarray(start, jnp.float32)
    state = tx.init(theta)
    history = [theta]
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(theta), state, theta)
        theta = optax.apply_updates(theta, updates)
        history.append(theta)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--start", type=float, nargs="+", default=[0.1, 0.2])
    args = parser.parse_args()
    for step, theta in enumerate(train(tuple(args.start), args.steps)):
        print(f"step {step}: theta = {[round(float(t), 6) for t in theta]}  loss = {float(loss(theta)):.6f}")


if __name__ == "__main__":
    main()
