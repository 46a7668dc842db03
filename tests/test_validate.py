"""Bad inputs raise at construction (or on a bad call) with the argument's name and allowed range.

Tried for every Python hyperparameter of value, global_norm, tensor_norm,
block_rms and agc: a negative number, -inf, NaN, a str, None, a bool, a list,
a non-scalar NumPy array, a non-scalar JAX array, 0-d NumPy arrays of bool and
str, an int beyond float range, and concrete JAX arrays of -1, -inf and NaN
(also as ``optax.inject_hyperparams`` passes them to the factory in ``init``;
traced ones are not checked). For the rates, factors and offsets of the
adaptive rules, the guards and the DP rules: +inf (it makes NaN, unlike an
infinite threshold) and 1e39 (finite, but infinite in float32); for starting
thresholds, values whose float32 logarithm is not finite. Counts given as 0-d
NumPy integers are accepted. Also: agc's axis of the wrong type or out of
range, agc without params, with a params tree or leaf shape that does not
match the updates, a rank-6 parameter with no axis, and unitwise_norm of a
rank-6 array with no axis. Numbers of other types than Python floats (unsigned
NumPy integers, bfloat16 scalars, fractions, integers past int64 or float
range) act as the float they equal; counts and seeds past their int32/int64
counters, factories given for ``inner`` and non-bool flags are refused.
Every threshold that may be infinite also takes huge numbers (2**63, 10**400,
1e200) and then never clips, with no NumPy overflow warning where the number
is past float32's range. A state restored into a transform with other
settings (zclip's warm-up length, autoclip's history or per_tensor, adaptive
with or without its direction rule) is refused at the first update, and so
is a state that ``init`` did not make (None, ``optax.EmptyState()``, a dict,
another rule's state); Python numbers as update leaves are refused.
global_norm's ``ord`` below 1 (0.5, 0, -1, -inf), NaN, a bool, a str,
a NumPy vector and a JAX array (it is static) are refused; None is 2.
Step counts given as concrete JAX arrays below their least value (a
warm-up of 0 or -5 steps, a negative max_consecutive) and adaptive's
min_multiplier above initial_multiplier as arrays are refused as numbers are.
"""

import decimal
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_sharding import PER_EXAMPLE, TRANSFORMS

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


@pytest.mark.parametrize("bad", [-1.0, -math.inf, math.nan], ids=repr)
@pytest.mark.parametrize(("factory", "arg"), HYPERPARAMETERS, ids=IDS)
def test_out_of_range_concrete_arrays(factory, arg, bad):
    """Before, a concrete JAX array was not checked: value(jnp.array(-1.0)) mapped every entry to
    1, global_norm(jnp.array(-1.0)) flipped the update's sign, NaN turned clipping off."""
    with pytest.raises(ValueError, match=rf"{arg} must be in \[0, inf\], got Array\("):
        factory(**{arg: jnp.array(bad)})
    tx = optax.inject_hyperparams(factory)(**{arg: bad})
    with pytest.raises(ValueError, match=rf"{arg} must be in \[0, inf\]"):
        tx.init({"w": jnp.ones((3, 2))})  # where inject_hyperparams first calls the factory


def test_traced_hyperparameters_are_not_checked():
    # Nothing raises inside a traced function: a jitted step with an injected value runs.
    tx = optax.inject_hyperparams(clipx.global_norm)(max_norm=1.0)
    grads = jnp.array([3.0, 4.0])
    state = tx.init(grads)
    state.hyperparams["max_norm"] = jnp.array(-1.0)
    updates, _ = jax.jit(tx.update)(grads, state)
    assert updates.shape == (2,)


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


@pytest.mark.parametrize("bad", [np.array(True), np.array("abc")], ids=repr)
@pytest.mark.parametrize(("factory", "arg"), HYPERPARAMETERS, ids=IDS)
def test_zero_dimensional_arrays_of_other_dtypes(factory, arg, bad):
    with pytest.raises(TypeError, match=rf"{arg} must be a real number, got an array of dtype"):
        factory(**{arg: bad})


def test_ints_beyond_float_range_are_infinite():
    clipx.global_norm(10**400)  # +inf: no clipping
    with pytest.raises(ValueError, match=r"max_norm must be in \[0, inf\], got -1000"):
        clipx.global_norm(-(10**400))


# Rates, factors and offsets: an infinity would turn the running statistics into NaN or inf.
FINITE_ONLY = [
    (clipx.adaptive, "num_stds"),
    (clipx.adaptive, "warmup_factor"),
    (clipx.adaptive, "min_std"),
    (clipx.adaptive, "direction_rate"),
    (clipx.zclip, "z_thresh"),
    (clipx.zclip, "clip_factor"),
    (clipx.zclip, "eps"),
    (clipx.adagc, "relative_threshold"),
    (clipx.adagc, "eps"),
    (clipx.quantile_clip, "learning_rate"),
    (lambda **kw: clipx.skip_spikes(clipx.global_norm(1.0), **kw), "num_stds"),
    (lambda **kw: clipx.skip_spikes(clipx.global_norm(1.0), **kw), "min_std"),
    (lambda **kw: clipx.per_example_global_norm(1.0, seed=0, **kw), "noise_multiplier"),
    (lambda **kw: clipx.per_example_adaptive(seed=0, **kw), "noise_multiplier"),
    (lambda **kw: clipx.per_example_adaptive(seed=0, **kw), "count_stddev"),
    (clipx.per_example_adaptive, "learning_rate"),
]


@pytest.mark.parametrize(("factory", "arg"), FINITE_ONLY, ids=[a for _, a in FINITE_ONLY])
def test_rates_and_factors_must_be_finite(factory, arg):
    with pytest.raises(ValueError, match=rf"{arg} must be in [\[(]\d, (inf\)|3.40282e\+38\]), got inf"):
        factory(**{arg: math.inf})
    factory(**{arg: 1e30})
    if arg != "warmup_factor":  # beyond float32 these made NaN there (a warm-up factor that large: no clip)
        with pytest.raises(ValueError, match=rf"{arg} must be in [\[(]\d, 3.40282e\+38\], got 1e\+39"):
            factory(**{arg: 1e39})


@pytest.mark.parametrize("factory", [clipx.quantile_clip, clipx.per_example_adaptive])
@pytest.mark.parametrize("bad", [1e-45, 0.0, 1e39, math.inf])
def test_starting_threshold_has_a_finite_float32_logarithm(factory, bad):
    with pytest.raises(ValueError, match=r"initial_threshold must be in \[1\.17549e-38, 3\.40282e\+38\]"):
        factory(initial_threshold=bad)
    factory(initial_threshold=1e-30)


def test_counts_accept_zero_dimensional_numpy_integers():
    clipx.zclip(warmup_steps=np.array(5))
    clipx.skip_spikes(clipx.global_norm(1.0), min_observations=np.array(3), max_consecutive=np.array(2))
    with pytest.raises(ValueError, match=r"must be a scalar integer, got an array of shape \(2,\)"):
        clipx.skip_spikes(clipx.global_norm(1.0), min_observations=jnp.array([1, 2]))


@pytest.mark.parametrize("history", [np.uint8(200), np.int8(100), np.int16(100)], ids=repr)
def test_numpy_integer_counts_count_as_python_ints(history):
    """``2 * np.uint8(200)`` wraps to 144: a count kept as a NumPy integer broke AutoClip's ring
    buffer after 2·history wrapped (the count went negative and a spike passed unclipped)."""
    steps = 2 * int(history) + 10

    def run(tx):
        def step(state, g):
            return tx.update(g, state)[1], None

        gradients = jnp.ones((steps, 2)).at[-1].mul(1000.0)
        return jax.lax.scan(step, tx.init(jnp.zeros(2)), gradients)[0]

    expected, actual = run(clipx.autoclip(history=int(history))), run(clipx.autoclip(history=history))
    chex.assert_trees_all_equal(actual, expected)
    assert float(clipx.stats(actual)["autoclip/scale"]) < 0.01  # the spike was clipped


def test_clipped_grad_sum_takes_a_numpy_integer_chunk_size():
    total, norms = clipx.clipped_grad_sum(
        lambda p, x: jnp.sum(p * x), jnp.zeros(2), jnp.ones((300, 2)), 10.0, chunk_size=np.uint8(7)
    )
    assert norms.shape == (300,)
    np.testing.assert_allclose(total, [300.0, 300.0])


def test_flags_accept_numpy_bools_and_refuse_numbers():
    assert clipx.zclip(skip_update_on_spike=np.True_) is not None
    clipx.autoclip(per_tensor=np.bool_(False))
    with pytest.raises(TypeError, match="per_tensor must be a bool, got int 1"):
        clipx.autoclip(per_tensor=1)
    clipx.skip_nonfinite(optax.sgd(0.1), check_updates=np.True_)
    with pytest.raises(TypeError, match="check_updates must be a bool, got str 'yes'"):
        clipx.skip_nonfinite(optax.sgd(0.1), check_updates="yes")
    with pytest.raises(TypeError, match="check_updates must be a Python bool, got a JAX array"):
        clipx.skip_nonfinite(optax.sgd(0.1), check_updates=jnp.array(True))


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipx.zclip(warmup_steps=jnp.asarray(5)),
        lambda: clipx.autoclip(history=jnp.asarray(5)),
        lambda: clipx.zclip(skip_update_on_spike=jnp.asarray(True)),
    ],
)
def test_shape_setting_arrays_point_to_static_args(make):
    with pytest.raises(TypeError, match="name it in static_args"):
        make()


@pytest.mark.parametrize("axis", [(0, 0), (1, -1)])
def test_axis_naming_an_axis_twice_raises_at_init_with_the_leaf(axis):
    with pytest.raises(ValueError, match=r"parameter \['w'\]: axis .* names an axis twice"):
        clipx.agc(axis=axis).init({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="names an axis twice"):
        clipx.unitwise_norm(jnp.ones((2, 2)), axis=axis)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: clipx.skip_nonfinite(optax.sgd(0.1), max_consecutive=n),
        lambda n: clipx.skip_spikes(optax.sgd(0.1), max_consecutive=n),
        lambda n: clipx.skip_spikes(optax.sgd(0.1), min_observations=n),
        lambda n: clipx.adagc(warmup_steps=n),
        lambda n: clipx.adaptive(warmup_steps=n),
    ],
)
def test_step_counts_fit_the_int32_counters(make):
    make(2**31 - 1)
    for n in (2**31, 10**12):
        with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 \(steps are counted in int32\)"):
            make(n)


@pytest.mark.parametrize(
    ("make", "name", "low"),
    [
        (lambda n: clipx.skip_nonfinite(optax.sgd(0.1), max_consecutive=n), "max_consecutive", 0),
        (lambda n: clipx.skip_spikes(optax.sgd(0.1), max_consecutive=n), "max_consecutive", 0),
        (lambda n: clipx.skip_spikes(optax.sgd(0.1), min_observations=n), "min_observations", 1),
        (lambda n: clipx.adagc(warmup_steps=n), "warmup_steps", 1),
        (lambda n: clipx.adaptive(warmup_steps=n), "warmup_steps", 1),
    ],
    ids=["skip_nonfinite", "skip_spikes-max_consecutive", "skip_spikes-min_count", "adagc", "adaptive"],
)
def test_step_counts_as_concrete_arrays_are_checked(make, name, low):
    """Before, an array below the least count (as inject_hyperparams passes one) was accepted."""
    with pytest.raises(ValueError, match=rf"{name} must be an int >= {low}, got Array\(-?\d"):
        make(jnp.asarray(low - 1))
    assert make(jnp.asarray(low)) is not None


def test_adaptive_refuses_its_floor_above_its_start_given_as_arrays():
    """Before, inject_hyperparams' arrays let the multiplier start below its floor."""
    with pytest.raises(ValueError, match=r"min_multiplier must be at most initial_multiplier \(0.02\)"):
        optax.inject_hyperparams(clipx.adaptive)(initial_multiplier=0.02).init(jnp.zeros(3))
    optax.inject_hyperparams(clipx.adaptive)(initial_multiplier=0.25).init(jnp.zeros(3))


@pytest.mark.parametrize(
    "make",
    [clipx.value, clipx.global_norm, clipx.tensor_norm, clipx.block_rms, clipx.agc],
    ids=lambda f: f.__name__,
)
def test_bfloat16_thresholds_are_real_numbers(make):
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 2.0)}
    direct = make(jnp.asarray(1.0, jnp.bfloat16))
    injected = optax.inject_hyperparams(make, hyperparam_dtype=jnp.bfloat16)(1.0)
    expected, _ = make(1.0).update(grads, make(1.0).init(params), params)
    for tx in (direct, injected):
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-2)


# Concrete numbers of any type are used as Python floats: NumPy scalars of every dtype (an
# unsigned one negated wraps around: -np.uint8(1) is 255), bfloat16 scalars, fractions, ints
# beyond float32 or int64.
NUMBER_FORMS = [
    pytest.param(np.uint8(1), id="uint8"),
    pytest.param(np.uint64(1), id="uint64"),
    pytest.param(np.float16(1.0), id="float16"),
    pytest.param(jnp.bfloat16(1.0), id="bfloat16_scalar"),
    pytest.param(__import__("fractions").Fraction(1, 1), id="fraction"),
]
RULES_WITH_A_RATE = [
    pytest.param(lambda x: clipx.quantile_clip(learning_rate=x), id="quantile_clip"),
    pytest.param(lambda x: clipx.zclip(clip_factor=x, warmup_steps=2), id="zclip"),
    pytest.param(lambda x: clipx.adagc(relative_threshold=x, warmup_steps=2), id="adagc"),
    pytest.param(lambda x: clipx.agc(x, eps=x * 1e-3), id="agc"),
    pytest.param(lambda x: clipx.adaptive(num_stds=x, warmup_steps=2), id="adaptive"),
    pytest.param(lambda x: clipx.skip_spikes(optax.identity(), num_stds=x), id="skip_spikes"),
]


@pytest.mark.parametrize("make", RULES_WITH_A_RATE)
@pytest.mark.parametrize("number", NUMBER_FORMS)
def test_a_number_of_any_type_acts_as_the_float(make, number):
    grads = [{"w": jnp.full((3, 2), 0.5 * (t + 1))} for t in range(4)]

    def run(tx):
        state, out = tx.init(grads[0]), []
        for g in grads:
            updates, state = tx.update(g, state, grads[0])
            out.append(updates["w"])
        return np.stack(out)

    np.testing.assert_allclose(run(make(number)), run(make(1.0)), rtol=1e-6)


# Every threshold that may be infinite, given as a huge number: each runs one step with NumPy's
# warnings as errors (1e200, past float32's range, is cast to ∞ without one).
THRESHOLDS_MAY_BE_INF = {
    "value": clipx.value,
    "global_norm": clipx.global_norm,
    "tensor_norm": clipx.tensor_norm,
    "block_rms": clipx.block_rms,
    "agc-clipping": lambda t: clipx.agc(clipping=t),
    "agc-eps": lambda t: clipx.agc(clipping=0.01, eps=t),
    "zclip-max_norm": lambda t: clipx.zclip(max_norm=t),
    "adagc-warmup_max_norm": lambda t: clipx.adagc(warmup_max_norm=t),
}
PER_EXAMPLE_THRESHOLDS = {
    "per_example_global_norm": clipx.per_example_global_norm,
    "per_example_layer_norm": clipx.per_example_layer_norm,
}


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("build", THRESHOLDS_MAY_BE_INF.values(), ids=THRESHOLDS_MAY_BE_INF.keys())
@pytest.mark.parametrize("threshold", [2**63, 10**400, 1e200], ids=["2**63", "10**400", "1e200"])
def test_huge_thresholds_do_not_clip(build, threshold):
    grads = {"w": jnp.array([3.0, -4.0])}
    tx = build(threshold)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_array_equal(updates["w"], grads["w"])


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("build", PER_EXAMPLE_THRESHOLDS.values(), ids=PER_EXAMPLE_THRESHOLDS.keys())
def test_huge_per_example_thresholds_do_not_clip(build):
    grads = {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]])}
    tx = build(1e200)
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["w"], grads["w"].sum(axis=0))


@pytest.mark.filterwarnings("error")
def test_clipped_grad_sum_with_a_huge_threshold_does_not_clip():
    xs = jnp.array([[3.0, 4.0], [0.3, 0.4]])
    total, _ = clipx.clipped_grad_sum(lambda w, x: jnp.dot(w, x), jnp.zeros(2), xs, 1e200)
    np.testing.assert_allclose(total, xs.sum(axis=0))


def test_per_example_layer_norm_uniform_must_be_a_bool():
    with pytest.raises(TypeError, match="uniform must be a bool, got str 'no'"):
        clipx.per_example_layer_norm(1.0, uniform="no")


def test_inner_must_be_a_transformation_not_its_factory():
    for wrapper in (clipx.skip_nonfinite, clipx.skip_spikes, clipx.without_stats):
        factory_given = r"inner must be an optax GradientTransformation \(call the factory"
        with pytest.raises(TypeError, match=factory_given):
            wrapper(clipx.value)
        with pytest.raises(TypeError, match="inner must be an optax GradientTransformation, got NoneType"):
            wrapper(None)


def test_adaptive_multipliers_must_have_a_finite_float32_logarithm():
    for name in ("initial_multiplier", "min_multiplier"):
        with pytest.raises(ValueError, match=f"{name} must be in"):
            clipx.adaptive(**{name: 1e-45})  # log(1e-45) is -inf in float32: every update 0


def test_buffer_lengths_are_bounded_by_their_int32_counters():
    with pytest.raises(ValueError, match=r"history must be an int <= 1073741823"):
        clipx.autoclip(history=2**30)
    with pytest.raises(ValueError, match=r"warmup_steps must be an int <= 2147483647"):
        clipx.zclip(warmup_steps=2**31)
    clipx.autoclip(history=2**30 - 1)  # the bounds themselves are allowed
    clipx.zclip(warmup_steps=2**31 - 1)


@pytest.mark.parametrize("flag", [True, False])
def test_counts_refuse_booleans(flag):
    with pytest.raises(TypeError, match="history must be an int, got bool"):
        clipx.autoclip(history=flag)


def test_per_example_rules_take_an_injected_seed():
    # optax.inject_hyperparams passes every numeric default, the seed included, as an array.
    tx = optax.inject_hyperparams(clipx.per_example_global_norm)(l2_norm_clip=1.0)
    updates, _ = tx.update(jnp.ones((4, 3)), tx.init(jnp.ones(3)))
    np.testing.assert_allclose(updates, 4 / 3**0.5 * np.ones(3), rtol=1e-6)
    clipx.per_example_global_norm(1.0, seed=-1)  # jax.random.key takes any int64
    with pytest.raises(ValueError, match="seed must be an int within int64"):
        clipx.per_example_global_norm(1.0, seed=2**63)


@pytest.mark.parametrize(
    ("made_by", "used_by", "message"),
    [
        (lambda: clipx.zclip(warmup_steps=6), lambda: clipx.zclip(warmup_steps=3), "another warmup_steps"),
        (lambda: clipx.autoclip(history=8), lambda: clipx.autoclip(history=4), "another history"),
        (
            lambda: clipx.autoclip(history=8, per_tensor=True),
            lambda: clipx.autoclip(history=4, per_tensor=True),
            "another history",
        ),
        (lambda: clipx.autoclip(per_tensor=True), lambda: clipx.autoclip(), r"autoclip\(per_tensor=True\)"),
        (lambda: clipx.autoclip(), lambda: clipx.autoclip(per_tensor=True), "for the global norm"),
        (lambda: clipx.adaptive(), lambda: clipx.adaptive(direction_rate=None), "direction_rate set"),
        (lambda: clipx.adaptive(direction_rate=None), lambda: clipx.adaptive(), "direction_rate None"),
    ],
)
def test_a_state_made_by_other_settings_is_refused(made_by, used_by, message):
    # As after restoring a checkpoint into a transform built with other settings: the
    # buffers keep their shapes, and a zclip would average over the wrong number of norms.
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=message):
        used_by().update(params, made_by().init(params))
    used_by().update(params, used_by().init(params))  # its own state is fine


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("name", sorted(TRANSFORMS | PER_EXAMPLE))
def test_integer_and_boolean_updates_are_refused(name, dtype):
    """Before, `value` wrapped unsigned updates (uint8 [3, 200] clipped at 2.5 gave [254, 254]) and
    the norm rules rounded scaled integer updates to 0. (`skip_nonfinite` and `without_stats`
    refuse them through the rule they wrap.)"""
    tx = (TRANSFORMS | PER_EXAMPLE)[name].make()
    params = {"b": jnp.ones(3), "w": jnp.ones(2)}
    batch = (4,) if name in PER_EXAMPLE else ()
    updates = {"b": jnp.ones((*batch, 3)), "w": jnp.full((*batch, 2), 3).astype(dtype)}
    with pytest.raises(TypeError, match=r"floating-point or complex updates; the update \['w'\] has dtype"):
        tx.update(updates, tx.init(params), params)


@pytest.mark.parametrize("name", sorted(TRANSFORMS | PER_EXAMPLE))
@pytest.mark.parametrize(
    "bad", [None, optax.EmptyState(), {"stats": None}], ids=["None", "EmptyState", "dict"]
)
def test_a_state_that_is_not_inits_is_refused(name, bad):
    """Optax's ``update(grads, None)`` for stateless clippers, or a checkpoint restored without
    its target: before, an AttributeError such as "'NoneType' object has no attribute 'stats'"."""
    tx = (TRANSFORMS | PER_EXAMPLE)[name].make()
    params = {"b": jnp.ones(3), "w": jnp.ones(2)}
    batch = (4,) if name in PER_EXAMPLE else ()
    updates = jax.tree.map(lambda p: jnp.ones((*batch, *p.shape)), params)
    state_type = type(tx.init(params)).__name__
    with pytest.raises(TypeError, match=rf"the state must be the {state_type} that init\(params\) returns"):
        tx.update(updates, bad, params)


@pytest.mark.parametrize("restored", [{"0": {"stats": {}}, "1": {}}, "0"], ids=["dict", "key"])
def test_a_checkpoint_restored_without_its_target_is_named_as_such(restored):
    """optax.chain hands each transform a key of the restored dict: before, "got a str" said no more."""
    params = {"w": jnp.ones(3)}
    tx = clipx.zclip()
    with pytest.raises(TypeError, match=r"If it is a checkpoint restored without its target.*from_bytes"):
        tx.update(params, restored, params)
    chained = optax.chain(clipx.zclip(), optax.adam(1e-3))
    with pytest.raises(TypeError, match=r"got a str\. .*If it is a checkpoint restored without its target"):
        chained.update(params, {"0": {}, "1": {}}, params)


def test_a_state_of_another_rule_is_refused():
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"the state must be the GlobalNormState .* got a ValueState"):
        clipx.global_norm(1.0).update(params, clipx.value(1.0).init(params))


@pytest.mark.parametrize("name", sorted(set(TRANSFORMS) - {"skip_nonfinite"}))
def test_python_number_updates_are_refused(name):
    """Before, an AttributeError ("'float' object has no attribute 'size'") from inside the rule.
    (`skip_nonfinite` passes them to the transform it wraps, as ``optax.apply_if_finite`` does.)"""
    tx = TRANSFORMS[name].make()
    params = {"b": jnp.ones(3), "w": jnp.ones(())}
    with pytest.raises(TypeError, match=r"clipx clips arrays; the update \['w'\] is a float"):
        tx.update({"b": jnp.ones(3), "w": 3.0}, tx.init(params), params)


def test_skip_nonfinite_passes_python_numbers_to_its_inner_transform():
    grads = {"b": jnp.ones(3), "w": 3.0}
    ours = clipx.skip_nonfinite(optax.adam(0.1))
    theirs = optax.apply_if_finite(optax.adam(0.1), 3)
    expected, _ = theirs.update(grads, theirs.init(grads))
    chex.assert_trees_all_close(ours.update(grads, ours.init(grads))[0], expected)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (0.5, ValueError, r"ord must be in \[1, inf\]"),
        (0, ValueError, r"ord must be in \[1, inf\]"),
        (-1, ValueError, r"ord must be in \[1, inf\]"),
        (-math.inf, ValueError, r"ord must be in \[1, inf\]"),
        (math.nan, ValueError, r"ord must be in \[1, inf\]"),
        (True, TypeError, "ord must be a real number, got the bool"),
        ("inf", TypeError, r"ord must be a real number in \[1, inf\], got str 'inf'$"),
        ("fro", TypeError, r"ord must be a real number in \[1, inf\], got str 'fro'$"),
        (decimal.Decimal(2), TypeError, r"ord must be a real number in \[1, inf\], got Decimal"),
        ([2], TypeError, r"ord must be a real number in \[1, inf\], got list \[2\]$"),
        (np.array([1.0, 2.0]), ValueError, "ord must be a scalar"),
        (jnp.array(2.0), TypeError, "ord must be a Python number, got a JAX array; .*static_args"),
    ],
)
def test_global_norm_order(bad, error, message):
    with pytest.raises(error, match=message):
        clipx.global_norm(1.0, ord=bad)


@pytest.mark.parametrize("good", [None, 1, 1.5, 2, np.float32(3.0), np.int64(4), 10**400, math.inf, jnp.inf])
def test_global_norm_orders_accepted(good):
    tx = clipx.global_norm(1.0, ord=good)
    updates, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
    assert np.all(np.isfinite(np.asarray(updates)))
