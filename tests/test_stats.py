"""clipx.stats finds ClipStats inside every optax combinator, with stable keys and correct values;
clipx.without_stats drops them (and their cost) without changing the updates."""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import optax.contrib
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
    assert set(out) == {f"[{i}]/tensor_norm/{f}" for i in (0, 2) for f in FIELDS}
    assert out["[0]/tensor_norm/norm"] == pytest.approx(18**0.5)
    assert out["[0]/tensor_norm/scale"] == 1.0
    assert out["[2]/tensor_norm/threshold"] == 2.0
    assert out["[2]/tensor_norm/norm"] == pytest.approx(0.1)


def test_a_position_never_takes_the_key_of_a_label():
    # Written bare, the chain's first clipper would be "0/value", the key of the branch labelled 0.
    labels = {"a": 0, "b": 1}
    branches = {0: clipx.value(3.0), 1: optax.identity()}
    tx = optax.chain(clipx.value(1.0), clipx.value(2.0), optax.multi_transform(branches, labels))
    out = step(tx)
    thresholds = {k.removesuffix("/threshold"): v for k, v in out.items() if k.endswith("/threshold")}
    assert thresholds == {"[0]/value": 1.0, "[1]/value": 2.0, "0/value": 3.0}
    assert len(out) == 3 * len(FIELDS)
    # Inside a guard the same keys follow its name: its field (inner_state) is written only
    # where even positions would leave two records alike.
    guarded = {k.removesuffix("/threshold") for k in step(clipx.skip_nonfinite(tx)) if "threshold" in k}
    assert guarded == {"skip_nonfinite/[0]/value", "skip_nonfinite/[1]/value", "skip_nonfinite/0/value"}


def test_siblings_keys_have_one_shape():
    """Before, two labels of one multi_transform were keyed "0/…" and "0/1/…", and two chain
    positions "[1]/…" and "2/…", once a clipper after the multi_transform shared their name."""
    gn = functools.partial(clipx.global_norm, 1.0)
    tx = optax.chain(optax.multi_transform({0: gn(), 1: gn()}, {"a": 0, "b": 1}), gn(), gn())
    keys = {k.removesuffix("/norm") for k in clipx.stats(tx.init(PARAMS)) if k.endswith("/norm")}
    assert keys == {"0/global_norm", "1/global_norm", "[1]/global_norm", "[2]/global_norm"}


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


WITHOUT_STATS_CASES = {
    "value": lambda: clipx.value(0.5),
    "global_norm": lambda: clipx.global_norm(1.0),
    "tensor_norm": lambda: clipx.tensor_norm(1.0),
    "block_rms": lambda: clipx.block_rms(1.0),
    "agc": lambda: clipx.agc(0.1),
    "adaptive": lambda: clipx.adaptive(warmup_steps=1),
    "autoclip": lambda: clipx.autoclip(0.5, history=3),
    "zclip": lambda: clipx.zclip(warmup_steps=1),
    "adagc": lambda: clipx.adagc(warmup_steps=1),
    "quantile_clip": lambda: clipx.quantile_clip(initial_threshold=1.0),
    "chain of two": lambda: optax.chain(clipx.tensor_norm(1.0), clipx.value(0.5)),
}


def _grads(i):
    return {"a": jnp.array([2.0, -1.0, 0.5]) * (i + 1), "b": jnp.array([3.0, 0.1]) / (i + 1)}


@pytest.mark.parametrize("name", list(WITHOUT_STATS_CASES))
def test_without_stats_keeps_the_updates_and_reports_nothing(name):
    plain = optax.chain(WITHOUT_STATS_CASES[name](), optax.adam(0.1))
    silent = optax.chain(clipx.without_stats(WITHOUT_STATS_CASES[name]()), optax.adam(0.1))
    plain_state, silent_state = plain.init(PARAMS), silent.init(PARAMS)
    assert clipx.stats(silent_state) == {}
    for i in range(4):
        expected, plain_state = jax.jit(plain.update)(_grads(i), plain_state, PARAMS)
        got, silent_state = jax.jit(silent.update)(_grads(i), silent_state, PARAMS)
        chex.assert_trees_all_equal(got, expected)
    assert clipx.stats(plain_state) != {}
    assert clipx.stats(silent_state) == {}


def test_without_stats_keeps_guard_counters():
    tx = clipx.without_stats(clipx.skip_nonfinite(optax.chain(clipx.value(1.0), optax.sgd(0.1))))
    state = tx.init(PARAMS)
    bad = {"a": jnp.array([jnp.nan, 0.0, 0.0]), "b": jnp.zeros(2)}
    for grads in (GRADS, bad, bad):
        _, state = jax.jit(tx.update)(grads, state, PARAMS)
    out = {k: int(v) for k, v in clipx.stats(state).items()}
    assert out == {"skip_nonfinite/skipped": 1, "skip_nonfinite/consecutive": 2, "skip_nonfinite/total": 2}


@pytest.mark.parametrize("nesting", ["alone", "in_chain"])
def test_without_stats_passes_extra_arguments_on(nesting):
    # skip_spikes watches loss=: without_stats must hand it over, alone or inside a chain.
    guard = clipx.without_stats(clipx.skip_spikes(optax.sgd(0.1), min_observations=3))
    tx = guard if nesting == "alone" else optax.chain(guard)
    state = tx.init(PARAMS)
    for loss in (2.0, 2.1, 1.9, 2.0, 1e6):
        updates, state = jax.jit(tx.update)(GRADS, state, PARAMS, loss=jnp.float32(loss))
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    assert set(clipx.stats(state)) == {f"skip_spikes/{k}" for k in ("skipped", "consecutive", "total")}
    assert bool(clipx.stats(state)["skip_spikes/skipped"])


def test_without_stats_removes_the_statistics_work():
    """With statistics, value's step holds reductions (its largest entry, its count); without, none."""

    def compiled_text(tx):
        state = tx.init(GRADS)
        return jax.jit(tx.update).lower(GRADS, state).compile().as_text()

    assert "reduce" in compiled_text(clipx.value(0.5))
    assert "reduce" not in compiled_text(clipx.without_stats(clipx.value(0.5)))


def test_two_optimizer_states_in_one_named_tuple_keep_their_own_keys():
    tx = optax.contrib.sam(
        optax.chain(clipx.global_norm(1.0), optax.sgd(0.1)),
        optax.chain(clipx.global_norm(0.05), optax.sgd(0.01)),
        sync_period=2,
    )
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)
    out = {k: float(v) for k, v in clipx.stats(state).items() if k.endswith("threshold")}
    # The outer optimizer has not stepped yet; the adversarial one has, at its own threshold.
    assert out == {
        "opt_state/[0]/global_norm/threshold": 0.0,
        "adv_state/[0]/global_norm/threshold": pytest.approx(0.05),
    }


def test_keys_that_cannot_be_told_apart_raise():
    state = {1: optax.chain(clipx.value(1.0)).init(PARAMS), "1": optax.chain(clipx.value(2.0)).init(PARAMS)}
    with pytest.raises(ValueError, match=r"would share the key '1/\[0\]/value'"):
        clipx.stats(state)


@pytest.mark.parametrize(
    "tx",
    [
        optax.chain(clipx.global_norm(1.0), optax.adam(1e-3)),
        clipx.skip_nonfinite(optax.sgd(0.1)),  # a guard's statistics
    ],
    ids=["clip", "guard"],
)
def test_a_state_restored_without_its_target_is_refused_with_the_way_to_restore_it(tx):
    serialization = pytest.importorskip("flax.serialization")
    state = tx.init(PARAMS)
    _, state = tx.update(GRADS, state, PARAMS)
    restored = serialization.msgpack_restore(serialization.to_bytes(state))  # plain dicts, no target
    with pytest.raises(TypeError, match=r"plain dicts .*tx.init\(params\) as its target .*from_state_dict"):
        clipx.stats(restored)
    into_target = serialization.from_state_dict(tx.init(PARAMS), restored)
    assert clipx.stats(into_target).keys() == clipx.stats(state).keys()


def test_flax_nnx_optimizer_state_as_the_getting_started_page_says():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(clipx.global_norm(1e-3), optax.sgd(0.1)), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 3))) ** 2))(model)
    optimizer.update(model, grads)
    keys = [f"global_norm/{field}" for field in FIELDS]
    assert list(clipx.stats(optimizer.opt_state)) == keys
    assert float(clipx.stats(optimizer.opt_state)["global_norm/clipped"]) == 1.0  # NNX variables convert
    pure = clipx.stats(nnx.as_pure(optimizer.opt_state))
    assert list(pure) == keys and all(isinstance(v, jax.Array) for v in pure.values())
    for flattened in (nnx.state(optimizer), nnx.to_pure_dict(nnx.state(optimizer))):
        with pytest.raises(TypeError, match=r"plain dicts at 'opt_state/0'.*optimizer.opt_state"):
            clipx.stats(flattened)


def test_the_transformation_itself_is_refused():
    """Before, clipx.stats(tx) gave {}: a logging call with that slip logged nothing."""
    tx = optax.chain(clipx.agc(0.01), optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"takes the optimizer state .* not the transformation"):
        clipx.stats(tx)
