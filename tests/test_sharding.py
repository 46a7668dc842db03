"""Every clipx transform under jax.jit with sharded parameters (8 host devices, see conftest.py).

For each transform and each layout — FSDP (each leaf split along its largest
axis over 8 devices), fully replicated, and a 2-D ``data × model`` mesh — the
sharded step must give the single-device result over 4 steps, with the state
sharded by `clipx.state_shardings`, and the compiled program must move no more
between devices than the same step without clipping, apart from small
all-reduces: scalars for norm rules, unit-norm vectors for AGC, per-example
scalars for the DP rules. Transforms are compiled in groups (one program per
group and layout) to keep the tests fast; failures name the transform. A whole
training step with Adam (whose moments `clipx.state_shardings` shards like the
parameters) checks the same property end to end.

``TRANSFORMS`` is the table of every public clipx transform; `test_table_covers_every_transform`
fails when a new one is exported without an entry here.
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clipx


class Case(NamedTuple):
    make: Callable[[], optax.GradientTransformation]
    # The most elements one transfer the transform adds may carry: 1 (a scalar) for
    # norm rules, one scalar per device where a fused reduction gathers per-device
    # partials, a vector of unit norms for AGC, per-example scalars for DP rules.
    max_elements: int = 1


# Hyperparameters small enough that 4 steps reach every code path (warm-up, clipping).
TRANSFORMS: dict[str, Case] = {
    # One variadic reduction (largest |g|, count clipped) per leaf or group of small
    # leaves: the partitioner gathers the 8 per-device partial pairs instead of
    # all-reducing them.
    "value": Case(lambda: clipx.value(0.5), max_elements=8),
    "global_norm": Case(lambda: clipx.global_norm(1.0)),
    # A p-norm other than 1, 2 and inf: the largest |g| (one variadic reduction per leaf, as for
    # value), then the sum of powers relative to it.
    "global_norm_ord3": Case(lambda: clipx.global_norm(1.0, ord=3), max_elements=8),
    "tensor_norm": Case(lambda: clipx.tensor_norm(0.5)),
    "block_rms": Case(lambda: clipx.block_rms(0.5)),
    "agc": Case(lambda: clipx.agc(0.01), max_elements=64),  # the longest unit-norm vector
    # The sketches' norm and inner product (these leaves are small: sketches are the leaves
    # themselves) share one variadic reduction per leaf, whose 8 per-device partial pairs the
    # partitioner gathers (as for value).
    "adaptive": Case(lambda: clipx.adaptive(warmup_steps=2), max_elements=8),
    "adaptive_no_direction": Case(lambda: clipx.adaptive(warmup_steps=2, direction_rate=None)),
    "autoclip": Case(lambda: clipx.autoclip(0.5, history=3)),
    "autoclip_per_tensor": Case(lambda: clipx.autoclip(0.5, history=3, per_tensor=True)),
    "zclip": Case(lambda: clipx.zclip(warmup_steps=2, max_norm=5.0)),
    "adagc": Case(lambda: clipx.adagc(warmup_steps=2)),
    "quantile_clip": Case(lambda: clipx.quantile_clip(initial_threshold=1.0)),
    "skip_nonfinite": Case(lambda: clipx.skip_nonfinite(clipx.global_norm(1.0))),
    "skip_spikes": Case(lambda: clipx.skip_spikes(clipx.global_norm(1.0), min_observations=2)),
    # value's clip is element-wise; without its statistics nothing crosses devices.
    "without_stats": Case(lambda: clipx.without_stats(clipx.value(0.5)), max_elements=0),
}

# Transforms that take per-example gradients (a leading batch axis of BATCH examples).
BATCH = 16
PER_EXAMPLE: dict[str, Case] = {
    "per_example_global_norm": Case(
        lambda: clipx.per_example_global_norm(1.0, noise_multiplier=0.5, seed=0), BATCH
    ),
    "per_example_layer_norm": Case(lambda: clipx.per_example_layer_norm(1.0, uniform=False), BATCH),
    "per_example_adaptive": Case(lambda: clipx.per_example_adaptive(initial_threshold=1.0), BATCH),
}

# Small trees every table entry can run on, eagerly as well as jitted: "w" is large enough
# for adaptive to sketch it (not keep it whole), "b" is kept whole.
SMALL_SHAPES = {"w": (130, 130), "b": (3,)}
SMALL_PER_EXAMPLE_SHAPES = {"w": (4, 3), "b": (3,)}


def small_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of the small tree for table entry ``name``."""
    return SMALL_PER_EXAMPLE_SHAPES if name in PER_EXAMPLE else SMALL_SHAPES


def small_gradients(name: str, key: jax.Array, scale: float, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Normal gradients times ``scale`` on the small tree (a leading batch axis for per-example
    entries); complex ``dtype`` gets ``x − ix``."""
    batch = (BATCH,) if name in PER_EXAMPLE else ()

    def gradient(i, shape):
        x = scale * jax.random.normal(jax.random.fold_in(key, i), (*batch, *shape))
        return (jax.lax.complex(x, -x) if jnp.issubdtype(dtype, jnp.complexfloating) else x).astype(dtype)

    return {k: gradient(i, s) for i, (k, s) in enumerate(small_shapes(name).items())}


# Public functions that are not transformations.
NOT_TRANSFORMS = {"clipped_grad_sum", "state_shardings", "stats", "unitwise_norm"}


def factory_name(name: str) -> str:
    return name.removesuffix("_per_tensor").removesuffix("_no_direction").removesuffix("_ord3")


def test_table_covers_every_transform():
    public = {
        name
        for name in clipx.__all__
        if inspect.isfunction(getattr(clipx, name)) and name not in NOT_TRANSFORMS
    }
    covered = {factory_name(n) for n in TRANSFORMS} | set(PER_EXAMPLE)
    assert public - covered == set(), "add these transforms to TRANSFORMS in tests/test_sharding.py"
    assert covered - public == set(), "these table entries are no longer exported by clipx"


PARAM_SHAPES = {
    "embed": (64, 16),
    "lstm": {"kernel": (16, 64), "bias": (64,)},
    "scale": (),
    "odd": (3, 5),  # divides by no mesh axis: replicated
}


def tree_of_shapes(f):
    return jax.tree.map(f, PARAM_SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def make_params():
    rng = np.random.default_rng(0)
    return tree_of_shapes(lambda s: rng.standard_normal(s).astype(np.float32))


def make_grads(step: int, batch: int | None = None):
    """Random gradients (NumPy, so no device work); step 3 is a spike (×30) so every adaptive rule clips."""
    rng = np.random.default_rng(100 + step)
    size = 3.0 if step == 3 else 0.1
    lead = () if batch is None else (batch,)
    return tree_of_shapes(lambda s: (size * rng.standard_normal(lead + s)).astype(np.float32))


def spec_for(shape: tuple[int, ...], axes: tuple[tuple[str, int], ...]) -> P:
    """Splits the largest dimensions over the mesh axes (largest axis first) where they divide."""
    spec: list[str | None] = [None] * len(shape)
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    for name, size in axes:
        for d in order:
            if spec[d] is None and shape[d] % size == 0:
                spec[d] = name
                break
    return P(*spec)


def make_mesh(layout: str) -> tuple[Mesh, tuple[tuple[str, int], ...]]:
    devices = np.array(jax.devices()[:8])
    if layout == "fsdp":
        return Mesh(devices, ("fsdp",)), (("fsdp", 8),)
    if layout == "replicated":
        return Mesh(devices, ("data",)), ()
    return Mesh(devices.reshape(2, 4), ("data", "model")), (("model", 4), ("data", 2))


LAYOUTS = ["fsdp", "replicated", "data2_model4"]
BATCH_AXIS = {"fsdp": "fsdp", "replicated": "data", "data2_model4": "data"}  # where per-example batches go

COLLECTIVE = re.compile(
    r"=\s*(?P<shape>[^=]*?)\s(?P<op>all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)


def collectives(hlo: str) -> collections.Counter:
    """``(op, elements)`` of every cross-device transfer in compiled HLO text (tuples split)."""
    found: collections.Counter = collections.Counter()
    for match in COLLECTIVE.finditer(hlo):
        for dims in re.findall(r"\[([\d,]*)\]", match["shape"]):
            found[(match["op"], math.prod(int(d) for d in dims.split(",") if d))] += 1
    return found


def assert_tree_close(actual, expected, what=""):
    def close(path, a, e):
        a, e = np.asarray(a), np.asarray(e)
        message = f"{what}{jax.tree_util.keystr(path)}"
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6, err_msg=message)
        else:
            np.testing.assert_array_equal(a, e, err_msg=message)

    jax.tree_util.tree_map_with_path(close, actual, expected)


def side_by_side(transforms: dict[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """Applies every transform to the same input; updates and states are dicts keyed by name.

    One compiled program for a whole group of transforms keeps the tests fast.
    """

    def init_fn(params):
        return {name: tx.init(params) for name, tx in transforms.items()}

    def update_fn(updates, state, params=None):
        results = {name: tx.update(updates, state[name], params) for name, tx in transforms.items()}
        return {n: r[0] for n, r in results.items()}, {n: r[1] for n, r in results.items()}

    return optax.GradientTransformation(init_fn, update_fn)


# Groups compiled together: the norm rules (scalar all-reduces only), value, AGC, value without its
# statistics (no transfer at all), the per-example rules.
GROUPS = {
    "norm_rules": sorted(n for n, c in TRANSFORMS.items() if c.max_elements == 1),
    "value": ["value"],
    "adaptive": ["adaptive"],
    "agc": ["agc"],
    "without_stats": ["without_stats"],
    "per_example": sorted(PER_EXAMPLE),
}


def group_transform(group: str) -> optax.GradientTransformation:
    table = PER_EXAMPLE if group == "per_example" else TRANSFORMS
    return side_by_side({name: table[name].make() for name in GROUPS[group]})


def group_grads(group: str) -> list:
    """4 steps of gradients (per-example ones carry a leading batch axis)."""
    return [make_grads(step, BATCH if group == "per_example" else None) for step in range(4)]


@functools.cache
def single_device_result(group: str):
    """The reference: every transform of the group on one device."""
    return run_single_device(group_transform(group), group_grads(group), make_params())


@functools.cache
def baseline_hlo(layout: str, per_example: bool) -> str:
    """The same step without clipping: the identity, or a plain sum over the batch for per-example input."""
    tx = (
        optax.GradientTransformation(optax.identity().init, sum_over_batch)
        if per_example
        else optax.identity()
    )
    mesh, axes = make_mesh(layout)
    param_sh = shardings_for(mesh, axes)
    grad_sh = shardings_for(mesh, axes, batch_axis=BATCH_AXIS[layout]) if per_example else param_sh
    grads = [make_grads(0, BATCH if per_example else None)]
    return run_sharded(tx, grads, make_params(), grad_sh, param_sh)[2]


# These tests compare results and read the partitioned HLO; LLVM's optimisations only cost time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_single_device(tx, grads_per_step, params):
    update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    state, outputs = tx.init(params), []
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        outputs.append(updates)
    return outputs, state


def run_sharded(tx, grads_per_step, params, grad_shardings, param_shardings):
    state_sh = clipx.state_shardings(tx, params, param_shardings)
    out_sh = (
        param_shardings if not isinstance(state_sh, dict) else {name: param_shardings for name in state_sh}
    )
    params = jax.device_put(params, param_shardings)
    state = jax.device_put(tx.init(params), state_sh)
    step = jax.jit(
        tx.update,
        in_shardings=(grad_shardings, state_sh, param_shardings),
        out_shardings=(out_sh, state_sh),
    )
    compiled = step.lower(grads_per_step[0], state, params).compile(compiler_options=FAST_COMPILE)
    outputs = []
    for grads in grads_per_step:
        updates, state = compiled(jax.device_put(grads, grad_shardings), state, params)
        outputs.append(updates)
    jax.tree.map(
        lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
        state,
        state_sh,
    )
    return outputs, state, compiled.as_text()


def large_extra_collectives(hlo: str, baseline_hlo: str, max_elements: int) -> list:
    """Transfers of more than ``max_elements`` the clipped step adds to the baseline step."""
    extra = collectives(hlo) - collectives(baseline_hlo)
    return [(op, n) for (op, n) in extra if n > max_elements]


def shardings_for(mesh, axes, batch_axis: str | None = None):
    def sharding(shape):
        spec = spec_for(shape, axes)
        if batch_axis is not None:
            used = set(spec)
            spec = P(batch_axis if batch_axis not in used else None, *spec)
        return NamedSharding(mesh, spec)

    return tree_of_shapes(sharding)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_sharded_matches_single_device(group, layout):
    """Updates and states equal one device's; the program adds only small all-reduces to the baseline."""
    per_example = group == "per_example"
    expected_updates, expected_state = single_device_result(group)
    mesh, axes = make_mesh(layout)
    param_sh = shardings_for(mesh, axes)
    grad_sh = shardings_for(mesh, axes, batch_axis=BATCH_AXIS[layout]) if per_example else param_sh
    tx = group_transform(group)
    updates, state, hlo = run_sharded(tx, group_grads(group), make_params(), grad_sh, param_sh)
    for name in GROUPS[group]:
        for step, (got, want) in enumerate(zip(updates, expected_updates, strict=True)):
            assert_tree_close(got[name], want[name], f"{name} ({layout}) update at step {step}: ")
        assert_tree_close(state[name], expected_state[name], f"{name} ({layout}) state: ")

    baseline = baseline_hlo(layout, per_example)
    max_elements = max((PER_EXAMPLE | TRANSFORMS)[name].max_elements for name in GROUPS[group])
    assert large_extra_collectives(hlo, baseline, max_elements) == []
    if group == "norm_rules":  # nothing but scalar all-reduces
        assert {op for op, _ in collectives(hlo) - collectives(baseline)} <= {"all-reduce"}
    if layout == "replicated" and not per_example:  # everything is local
        assert collectives(hlo) == collections.Counter()


def sum_over_batch(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), updates), state


def test_training_step_adds_only_scalar_all_reduces():
    """A whole FSDP + data-parallel step with Adam: clipping adds only scalar transfers to it."""
    mesh, axes = make_mesh("fsdp")
    params = {"w1": jnp.ones((32, 64)) * 0.01, "w2": jnp.ones((64, 8)) * 0.01}
    param_sh = jax.tree.map(lambda p: NamedSharding(mesh, spec_for(p.shape, axes)), params)
    batch_sh = NamedSharding(mesh, P("fsdp", None))
    x, y = jnp.ones((64, 32)), jnp.ones((64, 8))

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    def hlo_of(tx):
        state_sh = clipx.state_shardings(tx, params, param_sh)

        def step(p, s, x, y):
            grads = jax.grad(loss)(p, x, y)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        jitted = jax.jit(
            step, in_shardings=(param_sh, state_sh, batch_sh, batch_sh), out_shardings=(param_sh, state_sh)
        )
        return jitted.lower(params, tx.init(params), x, y).compile(compiler_options=FAST_COMPILE).as_text()

    baseline = hlo_of(optax.adam(1e-3))
    for clip in (clipx.global_norm(1.0), clipx.adaptive(direction_rate=None)):
        extra = collectives(hlo_of(optax.chain(clip, optax.adam(1e-3)))) - collectives(baseline)
        assert all(op == "all-reduce" and n == 1 for op, n in extra), extra
    # The direction's sketches (here the small leaves themselves) reduce their norm and inner
    # product together; the partitioner gathers the 8 per-device partials of each such sum.
    extra = collectives(hlo_of(optax.chain(clipx.adaptive(), optax.adam(1e-3)))) - collectives(baseline)
    scalar_transfers = {("all-reduce", 1)} | {("all-gather", n) for n in range(1, 9)}
    assert extra and set(extra) <= scalar_transfers, extra


def test_state_shardings_mirror_parameters_and_replicate_statistics():
    mesh, axes = make_mesh("fsdp")
    params = make_params()
    param_sh = shardings_for(mesh, axes)
    tx = optax.chain(clipx.adagc(), optax.adam(1e-3))
    shardings = clipx.state_shardings(tx, params, param_sh)
    adagc_state, (adam_state, _) = shardings
    assert adam_state.mu == param_sh and adam_state.nu == param_sh
    replicated = NamedSharding(mesh, P())
    for leaf in [*jax.tree.leaves(adagc_state), adam_state.count]:
        assert leaf == replicated
    specs = clipx.state_shardings(tx, params, jax.tree.map(lambda s: s.spec, param_sh))
    assert specs[1][0].mu == jax.tree.map(lambda s: s.spec, param_sh)
    assert all(s == P() for s in jax.tree.leaves(specs[0]))


@pytest.mark.parametrize("params", [{"w": (16,), "b": (4,)}, (16,)], ids=["tree", "single-array"])
def test_state_shardings_replicate_clipx_statistics_shaped_like_a_parameter(params):
    # Norm histories of 4 and 16 entries have the shapes of the parameters: still statistics.
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), params, is_leaf=is_shape)
    param_specs = jax.tree.map(lambda _: P("d"), params)
    tx = clipx.skip_spikes(
        optax.chain(
            clipx.without_stats(clipx.autoclip(history=16)),
            clipx.autoclip(history=4, per_tensor=True),
            clipx.zclip(warmup_steps=16),
            optax.adam(1e-3),
        )
    )
    specs = clipx.state_shardings(tx, params, param_specs)
    *clipx_states, (adam_state, _) = specs.inner_state
    assert adam_state.mu == param_specs and adam_state.nu == param_specs  # the guarded Adam's moments
    assert all(spec == P() for spec in jax.tree.leaves([clipx_states, specs._replace(inner_state=None)]))


@pytest.mark.parametrize("mask", ["leaves", "subtree", "labels"])
def test_state_shardings_see_through_masked_subtrees(mask):
    # optax.masked / multi_transform put MaskedNode where a parameter is left out.
    params = {
        "embed": jax.ShapeDtypeStruct((16, 4), jnp.float32),
        "head": {
            "w": jax.ShapeDtypeStruct((4, 8), jnp.float32),
            "b": jax.ShapeDtypeStruct((8,), jnp.float32),
        },
    }
    specs = {"embed": P("d", None), "head": {"w": P(None, "d"), "b": P()}}
    inner = optax.chain(clipx.adaptive(), optax.adam(1e-3))
    if mask == "leaves":
        tx = optax.masked(inner, {"embed": True, "head": {"w": True, "b": False}})
        adaptive_state, (adam_state, _) = clipx.state_shardings(tx, params, specs).inner_state
        expected = {"embed": P("d", None), "head": {"w": P(None, "d"), "b": optax.MaskedNode()}}
    elif mask == "subtree":
        tx = optax.masked(inner, {"embed": True, "head": False})
        adaptive_state, (adam_state, _) = clipx.state_shardings(tx, params, specs).inner_state
        expected = {"embed": P("d", None), "head": optax.MaskedNode()}
    else:
        tx = optax.multi_transform({"a": inner, "b": optax.sgd(0.1)}, {"embed": "a", "head": "b"})
        adaptive_state, (adam_state, _) = (
            clipx.state_shardings(tx, params, specs).inner_states["a"].inner_state
        )
        expected = {"embed": P("d", None), "head": optax.MaskedNode()}
    assert adam_state.mu == expected and adam_state.nu == expected
    assert adaptive_state.direction.previous == expected  # the kept gradient, like the parameters
    assert adam_state.count == P() and adaptive_state.stats.norm == P()


def test_adaptive_sketches_of_large_fsdp_leaves_stay_on_their_devices():
    # Leaves of 16384 entries or more are kept as sketches along their longest axis; sharded
    # like that axis, storing them moves nothing: only the per-device partial scalars cross.
    mesh, _ = make_mesh("fsdp")
    # "head" is kept along a last axis over 8192 entries: summed as a matrix-vector product on the CPU.
    shapes = {"embed": (1024, 64), "dense": (64, 256), "head": (4, 16400)}
    params = {name: jnp.ones(shape) * 0.01 for name, shape in shapes.items()}
    specs = {"embed": P("fsdp", None), "dense": P(None, "fsdp"), "head": P(None, "fsdp")}
    param_sh = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    tx = optax.chain(clipx.adaptive(), optax.adam(1e-3))
    state_sh = clipx.state_shardings(tx, params, param_sh)
    assert jax.tree.map(lambda x: x.shape, tx.init(params)[0].direction.previous) == {
        "embed": (1024,),
        "dense": (256,),
        "head": (16400,),
    }
    on_devices = {"embed": P("fsdp"), "dense": P("fsdp"), "head": P("fsdp")}
    assert jax.tree.map(lambda sh: sh.spec, state_sh[0].direction.previous) == on_devices
    assert clipx.state_shardings(tx, params, specs)[0].direction.previous == on_devices
    update = jax.jit(
        tx.update, in_shardings=(param_sh, state_sh, param_sh), out_shardings=(param_sh, state_sh)
    )
    hlo = update.lower(params, tx.init(params), params).compile(compiler_options=FAST_COMPILE).as_text()
    assert set(collectives(hlo)) <= {("all-reduce", 1), ("all-gather", 8)}, collectives(hlo)


@pytest.mark.parametrize("name", ["adaptive", "agc"])
def test_long_rows_sharded_along_their_leading_axis_move_one_vector(name):
    # Summed over the leading axis (the sketch; AGC's unit norms), a last axis over 8192 entries
    # is summed another way on the CPU; split across devices by rows, it still moves only the
    # per-device partial sums, one vector of the last axis's length, as a plain sum would.
    mesh, _ = make_mesh("fsdp")
    params = {"head": jnp.ones((16, 16400)) * 0.01}
    param_sh = {"head": NamedSharding(mesh, P("fsdp", None))}
    tx = optax.chain(clipx.adaptive() if name == "adaptive" else clipx.agc(0.01), optax.adam(1e-3))
    state_sh = clipx.state_shardings(tx, params, param_sh)
    update = jax.jit(
        tx.update, in_shardings=(param_sh, state_sh, param_sh), out_shardings=(param_sh, state_sh)
    )
    hlo = update.lower(params, tx.init(params), params).compile(compiler_options=FAST_COMPILE).as_text()
    moved = collectives(hlo)
    assert {op for op, _ in moved} <= {"all-reduce", "all-gather"}, moved
    assert max(n for _, n in moved) <= 16400, moved


def test_reducing_transforms_take_keyword_axis_name():
    """Rules that reduce over the tree take ``axis_name`` for shard_map/pmap (see tests/test_shard_map.py)."""
    lacking = {}
    reducing = {factory_name(n) for n, case in TRANSFORMS.items() if case.max_elements > 0}
    for name in reducing | set(PER_EXAMPLE):
        parameter = inspect.signature(getattr(clipx, name)).parameters.get("axis_name")
        if parameter is None or parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            lacking[name] = parameter
    assert not lacking, lacking


def test_clipped_grad_sum_keeps_a_sharded_batch_on_its_devices():
    """Strided chunks: with the batch split over 8 devices, no example moves; only the sums are reduced."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    params = {"w": jnp.ones((16, 8)) * 0.1, "b": jnp.zeros(8)}
    rng = np.random.default_rng(0)
    xs = jax.device_put(rng.standard_normal((64, 16)).astype(np.float32), NamedSharding(mesh, P("data")))

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    def chunked(p, x):
        return clipx.clipped_grad_sum(loss, p, x, 0.5, chunk_size=16)

    jitted = jax.jit(chunked, out_shardings=NamedSharding(mesh, P()))
    found = collectives(jitted.lower(params, xs).compile().as_text())
    # All-reduces of the sums, and at most a gather of the 64 per-example norms: no example moves.
    assert all(op == "all-reduce" or n <= 64 for op, n in found), found
    total, _ = jitted(params, xs)
    expected, _ = clipx.per_example_global_norm(0.5).update(
        jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, np.asarray(xs)),
        clipx.per_example_global_norm(0.5).init(None),
    )
    assert_tree_close(total, expected)


def test_state_shardings_see_the_fast_parameters_of_lookahead():
    # optax.lookahead's inner optimizer is built on params.fast only.
    params = optax.LookaheadParams.init_synced(
        {"embed": jax.ShapeDtypeStruct((16, 4), jnp.float32), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    )
    spec = {"embed": P("d", None), "b": P()}
    specs = optax.LookaheadParams(fast=spec, slow=spec)
    tx = optax.lookahead(optax.chain(clipx.adaptive(), optax.adam(1e-3)), sync_period=5, slow_step_size=0.5)
    state = clipx.state_shardings(tx, params, specs)
    adaptive_state, (adam_state, _) = state.fast_state
    assert adam_state.mu == spec and adam_state.nu == spec
    assert adaptive_state.direction.previous == spec
    assert adam_state.count == P() and state.steps_since_sync == P()


def test_state_shardings_names_a_factory_given_for_the_transformation():
    params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
    with pytest.raises(TypeError, match=r"pass a transformation, as clipx.value\(...\) returns"):
        clipx.state_shardings(clipx.value, params, {"w": P("d", None)})
    init_only = clipx.state_shardings(clipx.value(1.0).init, params, {"w": P("d", None)})
    assert init_only.stats.norm == P()  # an init function is still accepted


def test_state_shardings_take_a_prefix_of_the_parameters_as_jit_does():
    leaf = jax.ShapeDtypeStruct((8, 2), jnp.float32)
    params = {"a": leaf, "b": {"c": leaf}}
    tx = optax.chain(clipx.zclip(), optax.adam(1e-3))
    full = {"a": P("d", None), "b": {"c": P()}}
    for prefix in ({"a": P("d", None), "b": P()}, full):
        assert clipx.state_shardings(tx, params, prefix)[1][0].mu == full
    assert clipx.state_shardings(tx, params, P())[1][0].nu == {"a": P(), "b": {"c": P()}}
    with pytest.raises(ValueError, match="param_shardings must be a tree like params, or a prefix of it"):
        clipx.state_shardings(tx, params, {"z": P()})


def test_state_shardings_of_parameters_with_none_and_python_number_leaves():
    # optax.adam accepts both: None leaves stay None in its moments, a Python number gets an array.
    params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32), "frozen": None, "temperature": 1.0}
    specs = {"w": P("d", None), "frozen": None, "temperature": P()}
    tx = optax.chain(clipx.adaptive(), optax.adam(1e-3))
    adaptive_state, (adam_state, _) = clipx.state_shardings(tx, params, specs)
    assert adam_state.mu == adam_state.nu == specs
    assert adaptive_state.direction.previous == specs


def test_state_shardings_replicate_a_leaf_in_a_parameter_shaped_place_but_of_another_shape():
    """Adafactor's factored moments sit where the parameter does in their subtree, with other
    shapes: they are replicated, not given the parameter's sharding."""
    tx = optax.chain(clipx.global_norm(1.0), optax.adafactor(1e-3, min_dim_size_to_factor=1))
    params = {"w": jnp.zeros((8, 4))}
    factored = clipx.state_shardings(tx, params, {"w": P("data", None)})[1][0]
    assert (factored.v_row["w"], factored.v_col["w"], factored.v["w"]) == (P(), P(), P())
