"""clipx.stats finds ClipStats inside every optax combinator, with stable keys and correct values."""

import jax.numpy as jnp
import optax
import pytest

import clipx

PARAMS = {"a": jnp.ones(3), "b": jnp.ones(2)}
GRADS = {"a": jnp.full(3, 2.0), "b": jnp.full(2, 3.0)}  # global norm √30, leaf norms √12 and √18
GLOBAL = 30**0.5
FIELDS = ("norm", "threshold", "scale", "clipped")


def step(tx, steps=1):
    state = tx.init(PARAMS)
    for _ in range(steps):
        _, state = tx.update(GRADS, state, PARAMS)
    return {k: float(v) for k, v in clipx.stats(state).items()}


def test_chain_keys_and_values():
    out = step(optax.chain(clipx.global_norm(1.0), clipx.value(0.5), optax.sgd(0.1)))
    assert list(out) == [f"{n}/{f}" for n in ("global_norm", "value") for f in FIELDS]
    assert out["global_norm/norm"] == pytest.approx(GLOBAL)
    assert out["global_norm/scale"] == pytest.approx(1 / GLOBAL)
    assert out["global_norm/clipped"] == 1.0
    assert out["value/norm"] == pytest.approx(3 / GLOBAL)  # value sees the already-clipped update
    assert out["value/scale"] == pytest.approx(0.4)  # the two entries of b, 3/√30 > 0.5


def test_collisions_get_index_prefixes():
    out = step(optax.chain(clipx.tensor_norm(1.0), optax.sgd(0.1), clipx.tensor_norm(2.0)))
    assert set(out) == {f"{i}/tensor_norm/{f}" for i in (0, 2) for f in FIELDS}
    assert out["0/tensor_norm/norm"] == pytest.approx(18**0.5)
    assert out["0/tensor_norm/scale"] == 1.0
    assert out["2/tensor_norm/threshold"] == 2.0
    assert out["2/tensor_norm/norm"] == pytest.approx(0.1)


def test_named_chain():
    out = step(optax.named_chain(("clip", clipx.block_rms(1.0)), ("opt", optax.adam(1e-3))))
    assert out["clip/block_rms/norm"] == 3.0
    assert out["clip/block_rms/scale"] == 1.0


def test_masked():
    out = step(optax.masked(clipx.tensor_norm(4.0), {"a": True, "b": False}))
    assert out == {
        "tensor_norm/norm": pytest.approx(12**0.5),
        "tensor_norm/threshold": 4.0,
        "tensor_norm/scale": 0.0,
        "tensor_norm/clipped": 0.0,
    }


def test_multi_transform():
    tx = optax.multi_transform({"x": clipx.agc(0.01), "y": clipx.value(1.0)}, {"a": "x", "b": "y"})
    out = step(tx)
    assert out["x/agc/norm"] == pytest.approx(2.0)  # ‖G‖/‖W‖ = √12/√3
    assert out["x/agc/threshold"] == pytest.approx(0.01)
    assert out["x/agc/scale"] == 1.0
    assert out["y/value/norm"] == 3.0
    assert out["y/value/clipped"] == 1.0


def test_inject_hyperparams():
    tx = optax.chain(optax.inject_hyperparams(clipx.global_norm)(max_norm=2.0), optax.sgd(0.1))
    out = step(tx)
    assert out["global_norm/threshold"] == 2.0
    assert out["global_norm/scale"] == pytest.approx(2 / GLOBAL)


def test_multi_steps():
    tx = optax.MultiSteps(optax.chain(clipx.global_norm(1.0), optax.sgd(0.1)), every_k_schedule=2)
    assert step(tx, 1)["global_norm/norm"] == 0.0  # the inner step has not run yet
    assert step(tx, 2)["global_norm/norm"] == pytest.approx(GLOBAL)


def test_nested_named_chain_in_multi_transform_in_chain():
    inner = optax.named_chain(("clip", clipx.value(1.0)), ("opt", optax.sgd(0.1)))
    tx = optax.chain(
        clipx.global_norm(10.0),
        optax.multi_transform({"x": inner, "y": optax.sgd(0.1)}, {"a": "x", "b": "y"}),
    )
    assert set(step(tx)) == {f"{p}/{f}" for p in ("global_norm", "x/clip/value") for f in FIELDS}
