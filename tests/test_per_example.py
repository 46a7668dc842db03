"""Per-example (DP-SGD) clipping: parity with optax, noise, the adaptive quantile rule, chunking."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from hypothesis import given
from hypothesis import strategies as st

import clipx


def per_example_grads(seed=0, batch=6, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": scale * jax.random.normal(keys[0], (batch, 3, 4)),
        "b": scale * jax.random.normal(keys[1], (batch, 4)),
        "s": scale * jax.random.normal(keys[2], (batch,)),
    }


@jax.jit
def _global_step(grads, clip):
    tx = clipx.per_example_global_norm(clip)  # a traced threshold: one compilation for all examples
    return tx.update(grads, tx.init(None))


def run(tx, grads):
    return jax.jit(tx.update)(grads, tx.init(None))


@given(
    seed=st.integers(0, 2**16),
    clip=st.sampled_from([0.0, 0.3, 1.0, 2.5, math.inf]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_global_matches_optax(seed, clip, scale):
    grads = per_example_grads(seed, scale=scale)
    summed, state = _global_step(grads, jnp.float32(clip))
    expected, num_clipped = optax.per_example_global_norm_clip(grads, clip)
    chex_close(summed, expected)
    assert float(state.stats.scale) == pytest.approx(int(num_clipped) / 6)
    norms = jax.vmap(optax.tree.norm)(grads)
    assert float(state.stats.norm) == pytest.approx(float(jnp.max(norms)), rel=1e-6)
    assert bool(state.stats.clipped) == (int(num_clipped) > 0)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("clip", [0.0, 0.5, 2.0, math.inf])
def test_layer_matches_optax(uniform, clip):
    grads = per_example_grads(3)
    summed, state = run(clipx.per_example_layer_norm(clip, uniform=uniform), grads)
    expected, counts = optax.per_example_layer_norm_clip(grads, clip, uniform=uniform)
    chex_close(summed, expected)
    assert float(state.stats.scale) == pytest.approx(sum(int(c) for c in jax.tree.leaves(counts)) / 18)


def test_layer_clipped_example_norm_at_most_threshold():
    grads = per_example_grads(1, batch=1, scale=10.0)
    for uniform in (True, False):
        summed, _ = run(clipx.per_example_layer_norm(1.0, uniform=uniform), grads)
        assert float(optax.tree.norm(summed)) <= 1.0 + 1e-5


def test_nan_and_zero_examples_follow_optax():
    grads = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0], [jnp.nan, 1.0], [jnp.inf, 0.0]])}
    summed, _ = run(clipx.per_example_global_norm(1.0), grads)
    expected, _ = optax.per_example_global_norm_clip(grads, 1.0)
    np.testing.assert_array_equal(np.isnan(summed["w"]), np.isnan(expected["w"]))
    zero, _ = run(clipx.per_example_global_norm(0.0), {"w": jnp.zeros((3, 2))})
    np.testing.assert_array_equal(zero["w"], 0.0)


def test_mean_matches_differentially_private_aggregate():
    grads = per_example_grads(5)
    tx = optax.chain(clipx.per_example_global_norm(0.7), optax.scale(1 / 6))
    ours, _ = jax.jit(tx.update)(grads, tx.init(None))
    dp = optax.contrib.differentially_private_aggregate(0.7, 0.0, key=jax.random.key(0))
    theirs, _ = dp.update(grads, dp.init(None))
    chex_close(ours, theirs)


def test_noise_std_reproducible_and_key_advances():
    grads = {"w": jnp.zeros((4, 20000))}
    tx = clipx.per_example_global_norm(0.5, noise_multiplier=2.0, seed=7)
    state = tx.init(None)
    first, state1 = jax.jit(tx.update)(grads, state)
    again, _ = jax.jit(tx.update)(grads, state)
    second, _ = jax.jit(tx.update)(grads, state1)
    np.testing.assert_array_equal(first["w"], again["w"])
    assert not np.array_equal(first["w"], second["w"])
    assert float(jnp.std(first["w"])) == pytest.approx(1.0, rel=0.03)  # σ·C = 2·0.5
    assert float(jnp.abs(jnp.mean(first["w"]))) < 0.05
    assert state1.key.dtype == jnp.uint32 and state1.key.shape == (2,)


@pytest.mark.parametrize(
    "factory",
    [clipx.per_example_global_norm, clipx.per_example_layer_norm, clipx.per_example_adaptive],
    ids=lambda f: f.__name__,
)
def test_noise_keeps_the_imaginary_part_and_noises_it(factory):
    grads = {"z": jnp.full((4, 50000), 0.1 + 0.2j, jnp.complex64)}  # norm 50 per example, sum 0.4 + 0.8i
    clip = {"initial_threshold": 100.0} if factory is clipx.per_example_adaptive else {"l2_norm_clip": 100.0}
    summed, _ = run(factory(**clip, noise_multiplier=1e-4, seed=0), grads)  # σ·C = 0.01 on each part
    z = np.asarray(summed["z"])
    assert z.dtype == np.complex64
    for part, clean in ((z.real, 0.4), (z.imag, 0.8)):
        assert float(np.mean(part)) == pytest.approx(clean, abs=3e-4)
        assert float(np.std(part)) == pytest.approx(0.01, rel=0.03)
    assert abs(float(np.corrcoef(z.real, z.imag)[0, 1])) < 0.03  # independent draws


@pytest.mark.parametrize("factory", [clipx.per_example_global_norm, clipx.per_example_layer_norm])
def test_zero_noise_array_with_infinite_threshold_adds_nothing(factory):
    # optax.inject_hyperparams hands the default σ = 0 over as an array: 0·∞ must not be NaN.
    grads = per_example_grads()
    summed, _ = run(factory(math.inf, noise_multiplier=jnp.float32(0.0), seed=0), grads)
    chex_close(summed, jax.tree.map(lambda g: jnp.sum(g, axis=0), grads))
    injected = optax.inject_hyperparams(factory, static_args=("seed",))(l2_norm_clip=math.inf)
    summed, _ = run(injected, grads)
    chex_close(summed, jax.tree.map(lambda g: jnp.sum(g, axis=0), grads))


@pytest.mark.parametrize("factory", [clipx.per_example_global_norm, clipx.per_example_layer_norm])
@pytest.mark.parametrize(
    ("clip", "noise"), [(math.inf, 1.0), (1e200, 1.0), (1e38, 1.0), (1e20, 1e20), (1e20, jnp.float32(1e20))]
)
def test_noise_of_overflowing_std_is_refused(factory, clip, noise):
    # A draw of up to 5.42 standard deviations must stay finite: σ·C ≤ 3.4e38 / 5.42.
    with pytest.raises(ValueError, match=r"noise_multiplier · l2_norm_clip \(the noise standard deviation\)"):
        factory(clip, noise_multiplier=noise, seed=0)


def test_noise_std_bound():
    bound = float(np.finfo(np.float32).max) / 5.42
    clipx.per_example_global_norm(bound, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match=r"at most 6.28e\+37, so that every draw of the noise is finite"):
        clipx.per_example_global_norm(bound * 1.001, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match=r"noise_multiplier · initial_threshold \(the noise standard"):
        clipx.per_example_adaptive(initial_threshold=1e30, noise_multiplier=1e10, seed=0)
    # The largest draw of the noise, at the largest std, is finite.
    largest_draw = jnp.sqrt(2.0) * jax.scipy.special.erfinv(jnp.nextafter(jnp.float32(1), jnp.float32(0)))
    assert np.isfinite(np.float32(largest_draw) * np.float32(bound))


@pytest.mark.parametrize("noise", [1.0, 0.01, jnp.float32(1.0)])
def test_adaptive_threshold_stops_where_its_noise_stays_finite(noise):
    # A count noised below target 1 grows C by up to exp(1e4) a step: it stops at 6.28e37 / σ (float32's max
    # for σ < 1/5.42), and the noise on the sum stays finite.
    tx = clipx.per_example_adaptive(
        target_quantile=1.0,
        learning_rate=1e4,
        initial_threshold=1.0,
        noise_multiplier=noise,
        count_stddev=1.0,
        seed=0,
    )
    state, grads = tx.init(None), {"w": jnp.ones((2, 3))}
    cap = min(float(np.finfo(np.float32).max), float(np.finfo(np.float32).max) / 5.42 / float(noise))
    for _ in range(8):
        summed, state = tx.update(grads, state)
        assert np.all(np.isfinite(summed["w"]))
        assert 0 < float(state.threshold) <= cap * (1 + 1e-6)
    assert float(state.threshold) >= cap * (1 - 1e-6)  # it did grow to the cap


def test_zero_noise_keeps_key():
    tx = clipx.per_example_global_norm(1.0)
    state = tx.init(None)
    _, new = tx.update(per_example_grads(), state)
    np.testing.assert_array_equal(new.key, state.key)


def test_low_precision_gradients_accumulate_in_float32():
    grads = {"w": jnp.full((512, 8), 0.01, jnp.bfloat16)}
    summed, state = run(clipx.per_example_global_norm(1.0), grads)
    assert summed["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(summed["w"], np.float32), 5.12, rtol=1e-2)
    assert state.stats.norm.dtype == jnp.float32


def test_adaptive_update_rule():
    tx = clipx.per_example_adaptive(target_quantile=0.3, learning_rate=0.5, initial_threshold=1.0)
    state = tx.init(None)
    grads = jnp.array([[0.5], [2.0], [3.0], [0.1]])  # 2 of 4 under C = 1
    summed, new = jax.jit(tx.update)(grads, state)
    assert float(new.threshold) == pytest.approx(math.exp(-0.5 * (0.5 - 0.3)), rel=1e-6)
    assert float(new.stats.threshold) == 1.0
    assert float(new.stats.scale) == 0.5
    np.testing.assert_allclose(summed, [0.5 + 1 + 1 + 0.1], rtol=1e-6)


def test_adaptive_ignores_non_finite_examples():
    tx = clipx.per_example_adaptive(target_quantile=0.3, learning_rate=0.5, initial_threshold=1.0)
    step = jax.jit(tx.update)
    _, with_nan = step(jnp.array([[0.5], [2.0], [3.0], [0.1], [jnp.nan], [jnp.inf]]), tx.init(None))
    assert float(with_nan.threshold) == pytest.approx(math.exp(-0.5 * (0.5 - 0.3)), rel=1e-6)
    _, all_nan = step(jnp.full((3, 1), jnp.nan), tx.init(None))
    assert float(all_nan.threshold) == 1.0


def test_adaptive_tracks_the_target_quantile():
    norms = jnp.exp(jax.random.normal(jax.random.key(0), (256,)))  # log-normal, median 1
    grads = {"w": norms[:, None]}
    tx = clipx.per_example_adaptive(target_quantile=0.5, learning_rate=0.2, initial_threshold=0.01)
    update = jax.jit(tx.update)
    state = tx.init(None)
    for _ in range(150):
        _, state = update(grads, state)
    assert float(state.threshold) == pytest.approx(float(jnp.median(norms)), rel=0.1)


def test_adaptive_noise_is_seeded():
    tx = clipx.per_example_adaptive(initial_threshold=1.0, noise_multiplier=1.0, count_stddev=1.0, seed=3)
    grads = per_example_grads()
    a, sa = run(tx, grads)
    b, sb = run(tx, grads)
    chex_close(a, b, atol=0)
    assert float(sa.threshold) == float(sb.threshold)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 19, 32])  # 19: one example left over
def test_clipped_grad_sum_matches_full_vmap(chunk_size):
    params = {"w": jax.random.normal(jax.random.key(1), (3, 2)), "b": jnp.ones(2, jnp.float32)}
    xs = jax.random.normal(jax.random.key(2), (20, 3))
    ys = jax.random.normal(jax.random.key(3), (20, 2))

    def loss(p, example):
        x, y = example
        return jnp.sum((x @ p["w"] + p["b"] - y) ** 2)

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, (xs, ys))
    expected, state = run(clipx.per_example_global_norm(1.5), grads)
    total, norms = jax.jit(lambda p, b: clipx.clipped_grad_sum(loss, p, b, 1.5, chunk_size=chunk_size))(
        params, (xs, ys)
    )
    chex_close(total, expected, atol=1e-5)
    np.testing.assert_allclose(norms, jax.vmap(optax.tree.norm)(grads), rtol=1e-5)  # in batch order
    assert float(jnp.max(norms)) == pytest.approx(float(state.stats.norm), rel=1e-6)


def test_clipped_grad_sum_accepts_traced_threshold():
    tx = clipx.per_example_adaptive(initial_threshold=0.5)
    state = tx.init(None)
    total, _ = jax.jit(lambda c: clipx.clipped_grad_sum(lambda w, x: w * x, 1.0, jnp.arange(4.0), c))(
        state.threshold
    )
    assert float(total) == pytest.approx(0.0 + 0.5 + 0.5 + 0.5)


def test_stats_keys_in_chain():
    tx = optax.chain(clipx.per_example_adaptive(), optax.sgd(0.1))
    params = {"w": jnp.zeros(4)}
    _, state = tx.update({"w": jnp.ones((3, 4))}, tx.init(params), params)
    assert set(clipx.stats(state)) == {
        f"per_example_adaptive/{f}" for f in ("norm", "threshold", "scale", "clipped")
    }


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (clipx.per_example_global_norm, {"l2_norm_clip": -1.0}, "l2_norm_clip"),
        (clipx.per_example_global_norm, {"l2_norm_clip": 1.0, "noise_multiplier": -1}, "noise_multiplier"),
        (clipx.per_example_layer_norm, {"l2_norm_clip": float("nan")}, "l2_norm_clip"),
        (clipx.per_example_adaptive, {"initial_threshold": 0.0}, "initial_threshold"),
        (clipx.per_example_adaptive, {"target_quantile": 1.5}, "target_quantile"),
        (clipx.per_example_adaptive, {"learning_rate": -0.1}, "learning_rate"),
        (clipx.per_example_adaptive, {"count_stddev": -1.0}, "count_stddev"),
    ],
)
def test_bad_hyperparameters_raise(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_seed_and_chunk_size_must_be_ints():
    with pytest.raises(TypeError, match="seed"):
        clipx.per_example_global_norm(1.0, seed=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        clipx.clipped_grad_sum(lambda p, x: p * x, 1.0, jnp.ones(3), 1.0, chunk_size=0)


def test_missing_batch_axis_raises():
    tx = clipx.per_example_global_norm(1.0)
    with pytest.raises(ValueError, match="leading batch axis"):
        tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}, tx.init(None))
    with pytest.raises(ValueError, match="leading batch axis"):
        tx.update({"a": jnp.ones(())}, tx.init(None))


def chex_close(actual, expected, atol=1e-6):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=atol), actual, expected)


def test_adaptive_threshold_grows_back_after_zero_gradients():
    tx = clipx.per_example_adaptive(learning_rate=5.0, initial_threshold=1.0)
    step = jax.jit(tx.update)
    state = tx.init(None)
    for _ in range(40):  # every example fits under C: it shrinks by e^{-2.5} a step, towards 0
        _, state = step(jnp.zeros((4, 2)), state)
    assert float(state.threshold) == np.finfo(np.float32).tiny
    for _ in range(40):  # none fits: it grows by e^{2.5} a step
        _, state = step(jnp.ones((4, 2)), state)
    assert float(state.threshold) > 1.0


@pytest.mark.parametrize(
    "factory",
    [
        lambda: clipx.per_example_global_norm(1.0, noise_multiplier=0.5, seed=0),
        lambda: clipx.per_example_layer_norm(1.0, noise_multiplier=0.5, seed=0),
        lambda: clipx.per_example_adaptive(noise_multiplier=0.5, seed=0),
    ],
    ids=["global", "layer", "adaptive"],
)
def test_empty_trees_give_empty_sums(factory):
    tx = factory()
    summed, state = tx.update({}, tx.init({}))
    assert summed == {}
    assert float(clipx.stats(state)[f"{type(state).stats_name}/norm"]) == 0.0
    masked = optax.masked(factory(), {"a": False})
    params = {"a": jnp.zeros(2)}
    summed, _ = masked.update({"a": jnp.ones((3, 2))}, masked.init(params), params)
    np.testing.assert_array_equal(summed["a"], jnp.ones((3, 2)))  # passed through, unclipped


def test_clipped_grad_sum_refuses_batch_leaves_of_different_sizes():
    def loss(w, example):
        x, y = example
        return jnp.dot(w, x) + y

    for batch in ((jnp.ones((4, 2)), jnp.ones(5)), (jnp.ones((5, 2)), jnp.ones(4))):
        with pytest.raises(ValueError, match=r"one common leading batch axis.*\(4, 2\)|\(5, 2\)"):
            clipx.clipped_grad_sum(loss, jnp.zeros(2), batch, 1.0, chunk_size=2)


def test_clipped_grad_sum_of_an_empty_batch_is_zero():
    total, norms = clipx.clipped_grad_sum(lambda w, x: jnp.dot(w, x), jnp.zeros(2), jnp.zeros((0, 2)), 1.0)
    np.testing.assert_array_equal(total, [0.0, 0.0])
    assert norms.shape == (0,)


def test_per_example_adaptive_threshold_stays_finite_under_a_large_rate():
    # C·exp(-η(b − q)) overflowed to ∞ and then ∞·0 = NaN: clipping silently stopped.
    tx = clipx.per_example_adaptive(learning_rate=200.0, target_quantile=0.0)
    state = tx.init(None)
    for _ in range(3):
        _, state = tx.update(jnp.full((4, 1), 0.5), state)
    assert np.isfinite(state.threshold)
    total, _ = tx.update(jnp.array([[1000.0], [0.0], [0.0], [0.0]]), state)
    assert float(total[0]) <= float(state.threshold) * (1 + 1e-6)


@pytest.mark.parametrize(
    "factory",
    [lambda: clipx.per_example_global_norm(1.0), lambda: clipx.per_example_adaptive()],
    ids=["global_norm", "adaptive"],
)
def test_the_fraction_of_examples_clipped_starts_at_zero(factory):
    state = factory().init(None)
    assert float(state.stats.scale) == 0.0 and not bool(state.stats.clipped)


@pytest.mark.parametrize("split", ["shard_map", "sharded_jit"])
def test_a_nan_example_on_one_device_makes_the_largest_norm_nan(split):
    # XLA's CPU backend drops NaN from a float maximum across devices.
    mesh = jax.sharding.Mesh(jax.devices()[:2], ("batch",))
    grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [1.0, 1.0], [jnp.nan, 0.2]])}
    tx = clipx.per_example_global_norm(1.0, axis_name="batch" if split == "shard_map" else None)
    state = tx.init(None)
    if split == "shard_map":
        specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), state)
        update = jax.shard_map(
            tx.update,
            mesh=mesh,
            in_specs=({"w": jax.sharding.PartitionSpec("batch")}, specs),
            out_specs=({"w": jax.sharding.PartitionSpec()}, specs),
        )
    else:
        update = tx.update
        grads = jax.device_put(grads, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    _, state = jax.jit(update)(grads, state)
    assert np.isnan(float(state.stats.norm))


def test_every_int64_seed_draws_its_own_noise():
    # Without 64-bit mode jax.random.key keeps a seed's low 32 bits: 2**32 would be seed 0.
    grads = {"w": jnp.zeros((2, 8))}
    seeds = [0, 2**32 - 1, 2**32, 2**40, -1, -(2**63), 2**63 - 1]
    noise = []
    for seed in seeds:
        tx = clipx.per_example_adaptive(noise_multiplier=1.0, seed=seed)
        noise.append(tuple(np.asarray(tx.update(grads, tx.init(None))[0]["w"]).tolist()))
    assert len(set(noise)) == len(seeds)
    for seed in (0, 7, 2**32 - 1):  # below 2**32, the key jax.random.key makes
        state = clipx.per_example_global_norm(1.0, seed=seed).init(None)
        np.testing.assert_array_equal(state.key, jax.random.key_data(jax.random.key(seed)))


@pytest.mark.parametrize("seed", [5, -1, -(2**31), 2**31 - 1])
@pytest.mark.parametrize("make", [clipx.per_example_global_norm, clipx.per_example_adaptive])
def test_a_seed_given_as_an_array_draws_the_noise_of_its_int(make, seed):
    """As inject_hyperparams passes it, concrete or traced (a jitted init); before, a negative
    int32 array drew other noise than the int it holds."""

    def key(s):
        return make(1.0, noise_multiplier=1.0, seed=s).init(None).key

    expected = key(seed)
    for dtype in (jnp.int32, jnp.int16):
        if jnp.iinfo(dtype).min <= seed <= jnp.iinfo(dtype).max:
            array = jnp.asarray(seed, dtype)
            np.testing.assert_array_equal(key(array), expected)
            np.testing.assert_array_equal(jax.jit(key)(array), expected)
    injected = optax.inject_hyperparams(make)(1.0, noise_multiplier=1.0, seed=seed)
    np.testing.assert_array_equal(injected.init(None).inner_state.key, expected)


@pytest.mark.parametrize("seed", [np.int32(3), np.uint8(3), np.int8(-1), np.array(3, np.int16)])
@pytest.mark.parametrize(
    "make", [clipx.per_example_global_norm, clipx.per_example_layer_norm, clipx.per_example_adaptive]
)
def test_a_numpy_integer_seed_draws_the_noise_of_its_int(make, seed):
    # Before, a NumPy integer narrower than int64 passed the checks and init failed with an OverflowError.
    key = make(1.0, noise_multiplier=1.0, seed=seed).init(None).key
    np.testing.assert_array_equal(key, make(1.0, noise_multiplier=1.0, seed=int(seed)).init(None).key)


@pytest.mark.parametrize("make", [clipx.per_example_global_norm, clipx.per_example_layer_norm])
@pytest.mark.parametrize(
    ("clip", "noise", "hyperparam_dtype"),
    [(1, 0.5, None), (1, 1.7, None), (1000.0, 100.0, jnp.float16), (3.0, 0.7, jnp.bfloat16)],
)
def test_injected_hyperparameters_of_any_dtype_give_the_noise_of_their_values(
    make, clip, noise, hyperparam_dtype
):
    # An int threshold is injected as an int32 array; the noise's std used to be formed in its dtype
    # (σ = 0.5 became 0: no noise at all) or in a float16 one (σ·C = 1e5 became ∞).
    grads = {"w": jnp.ones((3, 2)), "b": jnp.ones((3,))}
    injected = optax.inject_hyperparams(make, static_args=("seed",), hyperparam_dtype=hyperparam_dtype)
    summed, _ = run(injected(l2_norm_clip=clip, noise_multiplier=noise, seed=0), grads)
    expected, _ = run(make(float(clip), noise_multiplier=float(noise), seed=0), grads)
    rtol = 1e-6 if hyperparam_dtype is None else 1e-2  # a bfloat16 σ·C holds 3 digits
    for leaf, want in zip(jax.tree.leaves(summed), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(leaf, want, rtol=rtol)


@pytest.mark.parametrize(
    ("dtype", "examples", "chunk_size", "expected"),
    [
        # Chunks of 32 examples of +60000 (and of -60000): each chunk's sum is beyond float16.
        (jnp.float16, np.where(np.arange(64) % 2 == 0, 60000.0, -60000.0), 32, 0.0),
        # The chunk {1, 2⁻⁹} is 1 in bfloat16; the float32 total keeps the 2⁻⁹.
        (jnp.bfloat16, np.array([1.0, -1.0, 2.0**-9, 0.0]), 2, 2.0**-9),
    ],
)
def test_clipped_grad_sum_adds_chunks_in_float32(dtype, examples, chunk_size, expected):
    """Each chunk's clipped sum enters the float32 total unrounded: cast back once, at the end."""
    xs = jnp.asarray(examples[:, None], dtype)
    loss = lambda w, x: jnp.sum(w * x)  # noqa: E731
    total, _ = clipx.clipped_grad_sum(loss, jnp.zeros(1, dtype), xs, 1e6, chunk_size=chunk_size)
    assert total.dtype == dtype
    assert float(total[0]) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipx.per_example_global_norm(1.0),
        lambda: clipx.per_example_layer_norm(1.0),
        lambda: clipx.per_example_adaptive(),
    ],
    ids=["global_norm", "layer_norm", "adaptive"],
)
def test_the_clipped_sum_is_a_full_precision_dot(make):
    # A default-precision float32 dot may round its products to TF32 (GPU) or bfloat16 (TPU), which
    # can take a clipped example's norm past the threshold; CPUs compute it exactly either way, so
    # the program is what is checked.
    tx = make()
    grads = {"w": jnp.ones((4, 3)), "b": jnp.ones((4,))}
    jaxpr = str(jax.make_jaxpr(tx.update)(grads, tx.init(grads)))
    dots = [line for line in jaxpr.splitlines() if "dot_general" in line]
    assert dots
    assert jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") >= len(dots)


@pytest.mark.parametrize(
    ("make", "noise"),
    [
        (lambda **kw: clipx.per_example_global_norm(1.0, **kw), "noise_multiplier"),
        (lambda **kw: clipx.per_example_layer_norm(1.0, **kw), "noise_multiplier"),
        (clipx.per_example_adaptive, "noise_multiplier"),
        (clipx.per_example_adaptive, "count_stddev"),
    ],
)
def test_noise_from_the_default_seed_is_warned_about(make, noise):
    # Noise drawn from a public seed can be regenerated and subtracted: no privacy.
    with pytest.warns(UserWarning, match="no seed given, so the noise is drawn from seed 0"):
        make(**{noise: 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(**{noise: 0.5}, seed=12345)  # a seed given: no warning
        make()  # no noise: no warning
        make(seed=None)


def test_inject_hyperparams_warns_only_about_noise_it_adds():
    grads = {"w": jnp.ones((4, 3))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = optax.inject_hyperparams(clipx.per_example_global_norm)(l2_norm_clip=1.0)  # σ = 0 as an array
        jax.jit(tx.update)(grads, tx.init(grads))
    tx = optax.inject_hyperparams(clipx.per_example_global_norm)(l2_norm_clip=1.0, noise_multiplier=0.5)
    with pytest.warns(UserWarning, match="no seed given"):
        tx.init(grads)


def test_adaptive_count_noise_has_a_key_of_its_own():
    """The count's noise comes from the second key split from the state's, not the state's key
    itself, whose bits also make the sum's noise keys."""
    tx = clipx.per_example_adaptive(
        initial_threshold=1.0, learning_rate=0.2, target_quantile=0.5, count_stddev=1.0, seed=7
    )
    norms = jnp.array([0.5, 0.5, 2.0, 2.0])  # two examples at or below C = 1
    grads = {"w": norms[:, None] * jnp.array([[1.0, 0.0]])}
    state = tx.init(None)
    _, after = tx.update(grads, state)
    count_key = jax.random.split(state.key)[1]
    below = (2.0 + jax.random.normal(count_key, (), jnp.float32)) / 4
    np.testing.assert_allclose(float(after.threshold), float(jnp.exp(-0.2 * (below - 0.5))), rtol=1e-6)
