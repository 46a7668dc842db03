"""Every clipx transform inside ``jax.shard_map`` on 8 host devices equals the unsharded computation.

Each device holds a slice of every gradient (split along the leaf's largest
axis), or some leaves whole (replicated); transforms built with ``axis_name``
reduce across devices and must give the single-device result. Scalar state
must come out identical on every device (``out_specs=P()`` with ``check_vma``
proves it at trace time). Per-example transforms get a slice of the batch
instead. The transform table is the one of ``tests/test_sharding.py``.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_sharding import (
    FAST_COMPILE,
    PER_EXAMPLE,
    TRANSFORMS,
    assert_tree_close,
    factory_name,
    side_by_side,
)

import clipx

AXIS = "devices"
MESH = Mesh(np.array(jax.devices()[:8]), (AXIS,))
# Every leaf divides by 8 along its largest axis (and by 8 along its first, for pmap).
SHAPES = {"embed": (64, 16), "kernel": (16, 64), "bias": (64,), "head": (8, 16)}
STEPS = 4


def tree_of_shapes(f):
    return {name: f(shape) for name, shape in SHAPES.items()}


def largest_axis_spec(shape):
    spec = [None] * len(shape)
    spec[max(range(len(shape)), key=lambda d: shape[d])] = AXIS
    return P(*spec)


def unit_axis_spec(shape):
    """AGC units: split rank-2 kernels along their kept (last) axis, keep vectors whole."""
    return P(None, AXIS) if len(shape) == 2 else P()


def with_axis_name(name, **axis):
    """The table's transform with ``axis_name`` given to its factory and to the inner clipper of a wrapper.

    The guards wrap ``global_norm`` and take ``axis_name`` themselves; ``without_stats`` wraps
    ``value`` and reduces nothing of its own.
    """
    make = (TRANSFORMS | PER_EXAMPLE)[name].make
    factories = ({factory_name(name)} - {"without_stats"}) | {"global_norm", "value"}
    originals = {f: getattr(clipx, f) for f in factories}

    def patched(original):
        @functools.wraps(original)
        def factory(*args, **kwargs):
            return original(*args, **kwargs, **axis)

        return factory

    for f in factories:
        setattr(clipx, f, patched(originals[f]))
    try:
        return make()
    finally:
        for f, original in originals.items():
            setattr(clipx, f, original)


def data(batch=None):
    rng = np.random.default_rng(1)
    params = tree_of_shapes(lambda s: rng.standard_normal(s).astype(np.float32))
    lead = () if batch is None else (batch,)
    grads = [
        tree_of_shapes(
            lambda s, k=k: ((3.0 if k == 3 else 0.1) * rng.standard_normal(lead + s)).astype(np.float32)
        )
        for k in range(STEPS)
    ]
    return params, grads


def run(tx, params, grads_per_step, mapped=None, check_vma=True):
    """``STEPS`` updates, on one device or (with ``(param_specs, grad_specs)``) inside shard_map."""
    state = tx.init(params)
    if mapped is None:
        step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    else:
        param_specs, grad_specs = mapped
        state_specs = clipx.state_shardings(tx, params, param_specs)
        update_specs = {n: param_specs for n in state_specs} if isinstance(state_specs, dict) else param_specs
        step = jax.jit(
            jax.shard_map(
                tx.update,
                mesh=MESH,
                in_specs=(grad_specs, state_specs, param_specs),
                out_specs=(update_specs, state_specs),
                check_vma=check_vma,
            ),
            compiler_options=FAST_COMPILE,
        )
    outputs = []
    for grads in grads_per_step:
        updates, state = step(grads, state, params)
        outputs.append(updates)
    return outputs, state


# Every transform with axis_name except agc (its units must stay whole: other specs) and the guard
# (tested with a poisoned device below).
WITH_AXIS_NAME = sorted(n for n in TRANSFORMS if n not in ("agc", "skip_nonfinite"))


def group(names, **axis):
    return side_by_side({n: with_axis_name(n, **axis) for n in names})


def assert_same(actual, expected, names):
    (updates, state), (want_updates, want_state) = actual, expected
    for name in names:
        for step, (got, want) in enumerate(zip(updates, want_updates, strict=True)):
            assert_tree_close(got[name], want[name], f"{name} update at step {step}: ")
        assert_tree_close(state[name], want_state[name], f"{name} state: ")


def test_sharded_leaves_with_axis_name_match_unsharded():
    params, grads = data()
    specs = tree_of_shapes(largest_axis_spec)
    mapped = run(group(WITH_AXIS_NAME, axis_name=AXIS), params, grads, (specs, specs))
    assert_same(mapped, run(group(WITH_AXIS_NAME), params, grads), WITH_AXIS_NAME)


@pytest.mark.parametrize("check_updates", [False, True])
@pytest.mark.parametrize("poisoned_device", [None, 0, 5])
def test_skip_nonfinite_decides_together_under_shard_map(poisoned_device, check_updates):
    """With a NaN on one device every device skips; the state stays replicated."""
    params, grads = data()
    if poisoned_device is not None:
        # Step 1: one entry of the shard held by one device is NaN.
        rows_per_device = SHAPES["embed"][0] // 8
        grads[1]["embed"][poisoned_device * rows_per_device, 0] = np.nan
    tx = optax.chain(
        clipx.skip_nonfinite(
            clipx.global_norm(1.0, axis_name=AXIS), check_updates=check_updates, axis_name=AXIS
        ),
        optax.adam(1e-2),
    )
    specs = tree_of_shapes(largest_axis_spec)
    mapped = run(tx, params, grads, (specs, specs))
    unsharded = optax.chain(clipx.skip_nonfinite(clipx.global_norm(1.0)), optax.adam(1e-2))
    reference = run(unsharded, params, grads)
    assert_tree_close(mapped, reference)
    assert int(clipx.stats(mapped[1])["skip_nonfinite/total"]) == (poisoned_device is not None)


def test_norm_histories_shaped_like_a_parameter_stay_whole():
    # 64 norms per tensor, as many as the bias has entries: `state_shardings` must not split them.
    params, grads = data()
    specs = tree_of_shapes(largest_axis_spec)
    history = SHAPES["bias"][0]
    mapped = run(clipx.autoclip(0.5, history, per_tensor=True, axis_name=AXIS), params, grads, (specs, specs))
    assert_tree_close(mapped, run(clipx.autoclip(0.5, history, per_tensor=True), params, grads))


def test_agc_updates_need_no_axis_name_when_units_stay_whole():
    params, grads = data()
    tx = optax.chain(clipx.agc(0.01), optax.adam(1e-2))
    specs = tree_of_shapes(unit_axis_spec)
    updates, _ = run(tx, params, grads, (specs, specs), check_vma=False)
    assert_tree_close(updates, run(tx, params, grads)[0])


@pytest.mark.parametrize("clipping", [0.01, 3.0])
def test_agc_statistics_replicated_under_shard_map(clipping):
    """The vectors, one unit each, are kept whole on every device and counted once."""
    params, grads = data()
    specs = tree_of_shapes(unit_axis_spec)
    mapped = run(clipx.agc(clipping, axis_name=AXIS), params, grads, (specs, specs))
    reference = run(clipx.agc(clipping), params, grads)
    assert_tree_close(mapped, reference)
    if clipping == 3.0:  # some units clipped, some not: a unit counted twice would show
        assert 0 < float(clipx.stats(reference[1])["agc/scale"]) < 1


@pytest.mark.parametrize("replicated", [("bias", "head"), tuple(SHAPES)], ids=["some", "all"])
def test_replicated_leaves_with_axis_name_count_once_under_shard_map(replicated):
    """A leaf every device holds whole enters each sum once: shard_map's check_vma says it does
    not vary over the axis (all leaves whole too: gradients averaged before, or a transform
    given only the replicated leaves by optax.masked or multi_transform)."""
    params, grads = data()
    specs = tree_of_shapes(largest_axis_spec) | {name: P() for name in replicated}
    mapped = run(group(WITH_AXIS_NAME, axis_name=AXIS), params, grads, (specs, specs))
    assert_same(mapped, run(group(WITH_AXIS_NAME), params, grads), WITH_AXIS_NAME)


def test_leaves_split_over_part_of_a_two_dimensional_mesh():
    """With ``axis_name=("rows", "columns")``, a leaf split over "rows" only is summed over "rows"."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("rows", "columns"))
    params, grads = data()
    specs = {
        "embed": P("rows", "columns"),
        "kernel": P(None, ("rows", "columns")),
        "bias": P("rows"),
        "head": P(),
    }
    names = ["global_norm", "tensor_norm", "block_rms", "value", "adaptive"]
    tx = group(names, axis_name=("rows", "columns"))
    state_specs = clipx.state_shardings(tx, params, specs)
    step = jax.jit(
        jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=(specs, state_specs, specs),
            out_specs=({n: specs for n in names}, state_specs),
        )
    )
    state, outputs = tx.init(params), []
    for g in grads:
        updates, state = step(g, state, params)
        outputs.append(updates)
    assert_same((outputs, state), run(group(names), params, grads), names)


def test_adaptive_keeps_large_leaves_whole_under_shard_map():
    # Leaves of 16384 entries or more are sketched under jax.jit, but inside shard_map each device
    # sees a shard; with axis_name the state keeps every leaf whole, sharded like its parameter, so
    # the mapped steps equal unsharded steps that compare whole gradients (an update compares a
    # leaf whole wherever the kept state has the leaf's shape).
    rng = np.random.default_rng(2)
    shapes = {"embed": (1024, 64), "dense": (64, 256)}  # 65536 and 16384 entries; shards of 8192 and 2048
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    grads = [
        {n: ((3.0 if k == 3 else 0.1) * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
        for k in range(STEPS)
    ]
    specs = {n: largest_axis_spec(s) for n, s in shapes.items()}
    tx = clipx.adaptive(warmup_steps=2, axis_name=AXIS)
    assert all(p.shape == shapes[n] for n, p in tx.init(params).direction.previous.items())
    mapped = run(tx, params, grads, (specs, specs))
    assert np.all(np.isfinite(np.asarray(mapped[1].direction.log_multiplier)))
    reference, state = [], tx.init(params)
    update = jax.jit(clipx.adaptive(warmup_steps=2).update)
    for g in grads:
        updates, state = update(g, state, params)
        reference.append(updates)
    assert_tree_close(mapped, (reference, state))


def test_adaptive_state_made_for_sketches_is_refused_under_shard_map():
    shapes = {"embed": (1024, 64)}
    params = {"embed": np.ones(shapes["embed"], np.float32)}
    specs = {"embed": largest_axis_spec(shapes["embed"])}
    sketched = clipx.adaptive().init(params)  # made without axis_name: a sketch of shape (1024,)
    tx = clipx.adaptive(axis_name=AXIS)
    step = jax.shard_map(
        tx.update, mesh=MESH, in_specs=(specs, P(), specs), out_specs=(specs, P()), check_vma=False
    )
    with pytest.raises(ValueError, match=r"kept sketch has shape \(1024,\).*without axis_name"):
        step(params, sketched, params)


def test_adaptive_state_passed_whole_into_shard_map_names_state_shardings():
    # A state made with axis_name keeps the (1024, 64) gradient whole; given replicated (P()) it
    # reaches each device whole beside a shard of the gradient. The error said "(its sketch)"
    # and "the leaf's own shape" for one shape, and blamed a missing axis_name.
    shapes = {"embed": (1024, 64)}
    params = {"embed": np.ones(shapes["embed"], np.float32)}
    specs = {"embed": largest_axis_spec(shapes["embed"])}
    tx = clipx.adaptive(axis_name=AXIS)
    step = jax.shard_map(
        tx.update, mesh=MESH, in_specs=(specs, P(), specs), out_specs=(specs, P()), check_vma=False
    )
    shard = (1024 // MESH.size, 64)
    expected = f"shape {shard}; expected {shard} (the leaf kept whole). "
    message = re.escape("kept sketch has shape (1024, 64) for a gradient leaf of ") + re.escape(expected)
    message += ".*state_shardings"
    with pytest.raises(ValueError, match=message):
        step(params, tx.init(params), params)


def test_per_example_rules_with_the_batch_split_match_unsharded():
    """Each device holds 2 of the 16 examples; the clipped sum (and its noise) is the same."""
    params, grads = data(batch=16)
    param_specs = tree_of_shapes(lambda shape: P())
    grad_specs = tree_of_shapes(lambda shape: P(AXIS))
    names = sorted(PER_EXAMPLE)
    mapped = run(group(names, axis_name=AXIS), params, grads, (param_specs, grad_specs))
    assert_same(mapped, run(group(names), params, grads), names)


def test_pmap_with_axis_name_matches_unsharded():
    """Under ``pmap`` (no ``check_vma``) every leaf is a part: here each is split along its first axis."""
    params, grads = data()
    names = ["global_norm", "tensor_norm", "value", "zclip"]
    tx = group(names, axis_name=AXIS)

    def split(x):
        return x.reshape(8, x.shape[0] // 8, *x.shape[1:])

    step = jax.pmap(tx.update, axis_name=AXIS, in_axes=(0, None, 0))
    state, outputs = tx.init(params), []
    for g in grads:
        updates, states = step(jax.tree.map(split, g), state, jax.tree.map(split, params))
        state = jax.tree.map(lambda x: x[0], states)  # the same on every device
        assert_tree_close(states, jax.tree.map(lambda x: np.broadcast_to(x, (8, *x.shape)), state))
        outputs.append(jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), updates))
    assert_same((outputs, state), run(group(names), params, grads), names)


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_per_example_partial_sums_are_summed_over_devices_before_rounding(name):
    """float16 examples of 60000 on devices 0-3 and -60000 on devices 4-7, two per device: each
    device's partial sum (±120000) overflowed float16 when it was rounded before the psum, and the
    total was NaN (∞ − ∞) where the unsharded one is 0."""
    threshold = {"initial_threshold": 1e5} if name == "per_example_adaptive" else {"l2_norm_clip": 1e5}
    make = getattr(clipx, factory_name(name))
    grads = {"w": np.concatenate([np.full((8, 1), 6e4), np.full((8, 1), -6e4)]).astype(np.float16)}
    params = {"w": np.zeros((1,), np.float16)}
    tx = make(**threshold, axis_name=AXIS)
    step = jax.shard_map(tx.update, mesh=MESH, in_specs=(P(AXIS), P(), P()), out_specs=(P(), P()))
    updates, _ = step(grads, tx.init(params), params)
    unsharded, _ = make(**threshold).update(grads, make(**threshold).init(params), params)
    np.testing.assert_array_equal(np.asarray(unsharded["w"], np.float32), [0.0])
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), [0.0])


@pytest.mark.parametrize("order", [1, 3, math.inf])
@pytest.mark.parametrize("replicated", [(), ("bias", "head"), tuple(SHAPES)], ids=["none", "some", "all"])
def test_global_norm_of_other_orders_counts_replicated_leaves_once(order, replicated):
    """The sums of |g|^p add a replicated leaf once; the largest |g| is the same on every device."""
    params, grads = data()
    specs = tree_of_shapes(largest_axis_spec) | {name: P() for name in replicated}
    # Twice the first step's norm: the first steps pass unchanged, the last (30 times larger) is clipped.
    first = np.concatenate([x.ravel() for x in jax.tree.leaves(grads[0])]).astype(np.float64)
    threshold = 2 * float(np.linalg.norm(first, ord=order))
    mapped = run(clipx.global_norm(threshold, ord=order, axis_name=AXIS), params, grads, (specs, specs))
    reference = run(clipx.global_norm(threshold, ord=order), params, grads)
    assert_tree_close(mapped, reference)
    assert bool(reference[1].stats.clipped)
    np.testing.assert_array_equal(mapped[0][0]["bias"], grads[0]["bias"])
