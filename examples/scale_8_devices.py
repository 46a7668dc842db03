"""Clipping at scale on 8 devices: sharded jit, shard_map, and DP-SGD per-example clipping.

Runs on a laptop: without an accelerator, 8 host CPU devices stand in for 8 GPUs.

    python examples/scale_8_devices.py
"""

import os

if not os.environ.get("JAX_PLATFORMS", "").startswith(("gpu", "cuda", "tpu")):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clipx

devices = np.array(jax.devices()[:8])
assert len(devices) == 8, f"this example needs 8 devices, found {len(devices)}"

params = {"embed": jnp.ones((1024, 64)) * 0.01, "dense": jnp.ones((64, 256)) * 0.01, "bias": jnp.zeros(256)}
grads = jax.tree.map(lambda p: jnp.full_like(p, 0.05), params)
tx = optax.chain(clipx.adaptive(), optax.adam(1e-3))

# 1. jax.jit with FSDP-sharded parameters: each leaf split along its largest axis.
#    XLA partitions the norm; only scalars cross devices. The optimizer state is
#    sharded by clipx.state_shardings: Adam's moments like their parameters,
#    adaptive()'s sketches of large leaves like their longest axis, its statistics replicated.
mesh = Mesh(devices, ("fsdp",))
specs = {"embed": P("fsdp", None), "dense": P(None, "fsdp"), "bias": P("fsdp")}
param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
state_sh = clipx.state_shardings(tx, params, param_sh)
state = jax.device_put(tx.init(params), state_sh)
update = jax.jit(tx.update, in_shardings=(param_sh, state_sh, param_sh), out_shardings=(param_sh, state_sh))
updates, state = update(jax.device_put(grads, param_sh), state, jax.device_put(params, param_sh))
print(
    "jit, FSDP:      norm =",
    float(clipx.stats(state)["adaptive/norm"]),
    "| embed update",
    updates["embed"].sharding.spec,
)

# 2. jax.shard_map: each device sees its own shard; axis_name makes the norm global.
tx_mapped = optax.chain(clipx.adaptive(axis_name="fsdp"), optax.adam(1e-3))
state_specs = clipx.state_shardings(tx_mapped, params, specs)
mapped_update = jax.jit(
    jax.shard_map(
        tx_mapped.update, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs)
    )
)
updates_mapped, state_mapped = mapped_update(grads, tx_mapped.init(params), params)
print("shard_map:      norm =", float(clipx.stats(state_mapped)["adaptive/norm"]))
np.testing.assert_allclose(updates_mapped["embed"], updates["embed"], rtol=1e-6)


# 3. DP-SGD: per-example clipping, batch split over the devices (data parallel).
def loss(p, example):
    x, y = example
    return jnp.mean((jnp.tanh(x @ p["dense"] + p["bias"]) - y) ** 2)


small = {"dense": params["dense"], "bias": params["bias"]}
batch = (jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32), jnp.zeros((64, 256)))
dp = optax.chain(
    clipx.per_example_global_norm(0.1, noise_multiplier=1.1, seed=0), optax.scale(1 / 64), optax.sgd(0.1)
)
dp_state = dp.init(small)
data_mesh = Mesh(devices, ("data",))
batch = jax.device_put(batch, NamedSharding(data_mesh, P("data")))


@jax.jit
def dp_step(p, s, batch):
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(p, batch)  # leading batch axis
    updates, s = dp.update(per_example, s, p)
    return optax.apply_updates(p, updates), s


small, dp_state = dp_step(small, dp_state, batch)
print("DP-SGD:         fraction of examples clipped =", float(clipx.stats(dp_state)["per_example/scale"]))

# The same clipped sum, 16 examples at a time: per-example gradients of the whole batch never exist.
total, norms = jax.jit(lambda p, b: clipx.clipped_grad_sum(loss, p, b, 0.1, chunk_size=16))(small, batch)
print("clipped_grad_sum: largest per-example norm =", round(float(norms.max()), 4))
