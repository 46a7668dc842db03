"""Every transform under ``jax.vmap``: an ensemble of models trained in one step, one state per member.

Vectorized members must get exactly what each would get alone: no Python
decision may depend on a state value, and no reduction may reach across members.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sharding import PER_EXAMPLE, TRANSFORMS, small_gradients, small_shapes

import clipx

ALL = TRANSFORMS | PER_EXAMPLE
MEMBERS = 3


def _member_gradients(name, member, step):
    """Gradients of one member at one step: members differ in scale, so they clip differently."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), member), step)
    return small_gradients(name, key, 1 + 5 * step * (member + 1))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.parametrize("name", sorted(ALL))
def test_vmapped_members_match_members_run_alone(name):
    params = [{k: jnp.full(s, 0.5 * (m + 1)) for k, s in small_shapes(name).items()} for m in range(MEMBERS)]
    tx = optax.chain(ALL[name].make(), optax.adam(1e-2))
    alone = [tx.init(p) for p in params]
    together = jax.vmap(tx.init)(_stack(params))
    update = jax.jit(tx.update)
    # The first step is vmapped op by op (outside jit), the rest jitted.
    jitted = jax.jit(jax.vmap(tx.update))
    vmapped_updates = [jax.vmap(tx.update), jitted, jitted, jitted]
    for step, vmapped_update in enumerate(vmapped_updates):
        grads = [_member_gradients(name, m, step) for m in range(MEMBERS)]
        updates, together = vmapped_update(_stack(grads), together, _stack(params))
        for m in range(MEMBERS):
            expected, alone[m] = update(grads[m], alone[m], params[m])
            chex.assert_trees_all_close(jax.tree.map(lambda x: x[m], updates), expected, rtol=2e-5, atol=1e-6)  # noqa: B023
    stats = clipx.stats(together)
    for m in range(MEMBERS):
        member_stats = clipx.stats(alone[m])
        assert member_stats.keys() == stats.keys()
        for key, value in member_stats.items():
            np.testing.assert_allclose(
                np.asarray(stats[key][m], np.float64),
                np.asarray(value, np.float64),
                rtol=2e-5,
                atol=1e-6,
                err_msg=key,
            )
