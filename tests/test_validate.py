"""Bad inputs raise at construction (or on a bad call) with the argument's name and allowed range.

Tried for every Python hyperparameter of value, global_norm, tensor_norm,
block_rms and agc: a negative number, -inf, NaN, a str, None, a bool, a list,
a non-scalar NumPy array and a non-scalar JAX array. Also: agc's axis of the
wrong type or out of range, agc without params, with a params tree or leaf
shape that does not match the updates, a rank-6 parameter with no axis, and
unitwise_norm of a rank-6 array with no axis.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import clipx

HYPERPARAMETERS = [
    (clipx.value, "max_delta"),
    (clipx.global_norm, "max_norm"),
    (clipx.tensor_norm, "max_norm"),
    (clipx.block_rms, "threshold"),
    (clipx.agc, "clipping"),
    (clipx.agc, "eps"),
]
IDS = [f"{f.__name__}-{arg}" for f, arg in HYPERPARAMETERS]

OUT_OF_RANGE = [-1.0, -1, -math.inf, math.nan, np.float32(-0.5)]
WRONG_TYPE = ["1.0", None, True, False, [1.0], (1.0,), {"x": 1.0}, 1 + 2j]
NOT_SCALAR = [np.ones(2), jnp.ones(2), jnp.ones((1, 1))]


@pytest.mark.parametrize("bad", OUT_OF_RANGE, ids=repr)
@pytest.mark.parametrize(("factory", "arg"), HYPERPARAMETERS, ids=IDS)
def test_out_of_range(factory, arg, bad):
    with pytest.raises(ValueError, match=rf"{arg} must be in \[0, inf\]"):
        factory(**{arg: bad})


@pytest.mark.parametrize("bad", WRONG_TYPE, ids=repr)
@pytest.mark.parametrize(("factory", "arg"), HYPERPARAMETERS, ids=IDS)
def test_wrong_type(factory, arg, bad):
    with pytest.raises(TypeError, match=rf"{arg} must be a real number"):
        factory(**{arg: bad})


@pytest.mark.parametrize("bad", NOT_SCALAR, ids=lambda a: f"{type(a).__name__}{a.shape}")
@pytest.mark.parametrize(("factory", "arg"), HYPERPARAMETERS, ids=IDS)
def test_not_scalar(factory, arg, bad):
    with pytest.raises(ValueError, match=rf"{arg} must be a scalar"):
        factory(**{arg: bad})


@pytest.mark.parametrize("good", [0, 0.0, 1, 2.5, math.inf, np.float32(1.0), np.array(1.0), jnp.float32(1.0)])
@pytest.mark.parametrize(("factory", "arg"), HYPERPARAMETERS, ids=IDS)
def test_accepted(factory, arg, good):
    factory(**{arg: good})


@pytest.mark.parametrize("bad", ["0", 1.5, [0], (0, "a"), True, (0, 1.0)])
def test_axis_wrong_type(bad):
    with pytest.raises(TypeError, match="axis must be None, an int or a tuple of ints"):
        clipx.agc(axis=bad)
    with pytest.raises(TypeError, match="axis must be None"):
        clipx.unitwise_norm(jnp.ones((2, 2)), axis=bad)


def test_axis_out_of_range_raises_at_init_with_the_leaf():
    tx = clipx.agc(axis=2)
    with pytest.raises(ValueError, match=r"parameter \['w'\]: axis 2 is out of range for an array of shape"):
        tx.init({"w": jnp.ones((2, 2))})


def test_agc_without_params():
    tx = clipx.agc()
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"third argument, tx\.update\(grads, state, params\)"):
        tx.update(params, tx.init(params))


def test_agc_with_mismatched_trees():
    tx = clipx.agc()
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="agc: params and updates: the tree structures differ"):
        tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
    with pytest.raises(ValueError, match=r"a gradient of shape \(3,\) for a parameter of shape \(2,\)"):
        tx.update({"w": jnp.ones((2, 2)), "b": jnp.ones(3)}, tx.init(params), params)


def test_rank6_needs_axis():
    x = jnp.ones((1, 2, 1, 2, 1, 2))
    with pytest.raises(ValueError, match=r"no default units for a rank-6 array.*pass axis="):
        clipx.unitwise_norm(x)
    with pytest.raises(ValueError, match=r"agc: parameter \['k'\]: .*rank-6.*pass axis="):
        clipx.agc().init({"k": x})
    tx = clipx.agc(axis=(0, 1, 2, 3, 4))
    updates, _ = tx.update({"k": x}, tx.init({"k": x}), {"k": x})
    assert updates["k"].shape == x.shape
