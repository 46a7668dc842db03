"""clipx.adaptive: properties of the threshold, robustness to NaN/inf, composition with optax."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from machinery import CHAINED_OPTIMIZERS, run_resumed
from oracles import AdaptiveOracle, assert_matches, gradient_sequence, run_oracle, run_transform

import clipx

DIRECTION = {"w": jnp.full((2, 3), 0.5), "b": jnp.full((4,), 0.5)}  # global norm √(10·0.25)
UNIT = DIRECTION["w"].size + DIRECTION["b"].size


def grads_with_norm(norm):
    return jax.tree.map(lambda d: d * norm / jnp.sqrt(UNIT * 0.25), DIRECTION)


@jax.jit
def run_norms(norms, num_stds, decay, min_std):
    """Runs adaptive() (warmup_steps=5) over a sequence of global norms; returns per-step stats and state."""
    tx = clipx.adaptive(num_stds, decay, 5, 4.0, min_std)

    def step(state, norm):
        updates, state = tx.update(grads_with_norm(norm), state)
        return state, (clipx.stats(state), optax.tree.norm(updates))

    return jax.lax.scan(step, tx.init(DIRECTION), norms)


def lognormal_norms(seed, n, sigma=0.3):
    return np.exp(np.random.default_rng(seed).normal(0.0, sigma, n)).astype(np.float32)


@given(
    seed=st.integers(0, 2**16),
    num_stds=st.floats(0.5, 6.0),
    decay=st.floats(0.5, 0.999),
    min_std=st.floats(0.0, 0.5),
    bad=st.lists(st.integers(1, 59), max_size=8),
)
def test_property_threshold_positive_finite_and_clip_holds(seed, num_stds, decay, min_std, bad):
    norms = lognormal_norms(seed, 60) * np.float32(10.0 ** (seed % 7 - 3))
    for i, t in enumerate(bad):
        norms[t] = (np.nan, np.inf, 0.0, 1e15)[i % 4]
    state, (stats, clipped_norm) = run_norms(norms, num_stds, decay, min_std)
    threshold = np.asarray(stats["adaptive/threshold"])
    # Nothing observed yet: the threshold is the first norm times the multiplier's start.
    np.testing.assert_allclose(threshold[0], 0.35 * norms[0], rtol=1e-5)
    assert np.all(np.isfinite(threshold)) and np.all(threshold > 0)
    finite = np.isfinite(norms)
    assert np.all(np.asarray(clipped_norm)[finite] <= threshold[finite] * (1 + 1e-5))
    assert np.all(np.isfinite(np.asarray(state.log_norm.mean))) and np.isfinite(float(state.log_norm.var))
    assert int(state.log_norm.observations) == int(np.sum(finite & (norms > 0)))


def test_spike_is_clipped_and_does_not_move_the_threshold_much():
    norms = lognormal_norms(0, 200)
    norms[150] *= 1000
    _, (stats, clipped_norm) = run_norms(norms, 3.0, 0.99, 0.1)
    threshold = np.asarray(stats["adaptive/threshold"])
    assert bool(stats["adaptive/clipped"][150])
    assert float(clipped_norm[150]) <= threshold[150] * (1 + 1e-6) < 5.0
    assert threshold[151] < threshold[150] * 1.1


@pytest.mark.parametrize("spread", [0.0, 0.6])  # σ = 0 < σ_min and σ = 0.3 > σ_min
def test_one_spike_moves_the_mean_by_at_most_its_weight_times_the_censored_excess(spread):
    # The documented bound: max(1/n, 1 − decay)·k·max(σ, σ_min) in log space, reached by a huge spike.
    num_stds, decay, min_std = 2.0, 0.9, 0.1
    tx = clipx.adaptive(num_stds, decay, 5, 1.0, min_std, direction_rate=None)
    state = tx.init(DIRECTION)
    for step in range(30):
        _, state = tx.update(grads_with_norm(np.exp(spread * (step % 2))), state)
    mean, std = float(state.log_norm.mean), np.sqrt(float(state.log_norm.var))
    weight = max(1 / (int(state.log_norm.observations) + 1), 1 - decay)
    _, state = tx.update(grads_with_norm(1e6), state)
    np.testing.assert_allclose(
        float(state.log_norm.mean) - mean, weight * num_stds * max(std, min_std), rtol=1e-4
    )


def test_steady_norms_are_rarely_clipped():
    norms = lognormal_norms(1, 1000)
    _, (stats, clipped_norm) = run_norms(norms, 3.0, 0.99, 0.1)
    assert np.mean(np.asarray(stats["adaptive/clipped"])) < 0.02
    assert np.mean(np.asarray(clipped_norm) / norms) > 0.995


def test_scale_free():
    norms = lognormal_norms(2, 100)
    _, (a, _) = run_norms(norms, 3.0, 0.99, 0.1)
    _, (b, _) = run_norms(norms * np.float32(1024.0), 3.0, 0.99, 0.1)
    np.testing.assert_allclose(
        np.asarray(b["adaptive/threshold"])[1:] / 1024, a["adaptive/threshold"][1:], rtol=1e-4
    )
    np.testing.assert_array_equal(a["adaptive/clipped"], b["adaptive/clipped"])


def test_follows_a_lasting_change_of_level():
    norms = np.concatenate([lognormal_norms(3, 200), 5 * lognormal_norms(4, 300)])
    _, (stats, _) = run_norms(norms, 3.0, 0.99, 0.1)
    assert np.mean(np.asarray(stats["adaptive/clipped"])[-100:]) < 0.05


@jax.jit
def run_defaults(norms):
    """Runs clipx.adaptive() with its defaults over a sequence of global norms."""
    tx = clipx.adaptive()

    def step(state, norm):
        updates, state = tx.update(grads_with_norm(norm), state)
        return state, (clipx.stats(state), optax.tree.norm(updates))

    return jax.lax.scan(step, tx.init(DIRECTION), norms)


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_defaults_clip_the_upper_tail_of_steady_norms_whatever_their_spread(sigma):
    # k = 1 on censored statistics: the threshold settles near the 72nd percentile of the norms,
    # so about 28% of steps are clipped, for narrow and wide log-norm spreads alike.
    norms = lognormal_norms(1, 3000, sigma)
    _, (stats, clipped_norm) = run_defaults(norms)
    clipped = np.asarray(stats["adaptive/clipped"])[500:]
    threshold = np.asarray(stats["adaptive/threshold"])[500:]
    assert 0.2 < np.mean(clipped) < 0.36
    assert 0.64 < np.mean(norms[500:] <= np.median(threshold)) < 0.8
    np.testing.assert_allclose(np.asarray(clipped_norm)[500:], np.minimum(norms[500:], threshold), rtol=1e-5)


def test_defaults_bound_a_spike_to_the_typical_norm():
    norms = lognormal_norms(0, 200, 1.0)
    norms[150] *= 1000
    _, (stats, clipped_norm) = run_defaults(norms)
    threshold = np.asarray(stats["adaptive/threshold"])
    assert bool(stats["adaptive/clipped"][150])
    assert float(clipped_norm[150]) <= threshold[150] * (1 + 1e-6) < 3 * np.median(norms)
    assert threshold[151] < threshold[150] * 1.05


def test_defaults_follow_a_rise_of_the_norm_level_slowly_and_a_fall_quickly():
    rise = np.concatenate([lognormal_norms(3, 200), 5 * lognormal_norms(4, 600)])
    _, (stats, _) = run_defaults(rise)
    threshold = np.asarray(stats["adaptive/threshold"])
    # Only clipped values enter: μ climbs by about (1 − decay)·σ per step, so a 5× rise is
    # clipped for hundreds of steps, with a threshold that never stops climbing meanwhile
    # and a share of clipped steps that falls once it nears the new level.
    assert np.all(np.diff(np.log(threshold[200:500])) > 0)
    clipped = np.asarray(stats["adaptive/clipped"])
    assert threshold[799] > 3.5 and np.mean(clipped[-100:]) < np.mean(clipped[300:400]) == 1.0
    fall = np.concatenate([lognormal_norms(3, 200), 0.2 * lognormal_norms(4, 300)])
    _, (stats, _) = run_defaults(fall)
    assert np.mean(np.asarray(stats["adaptive/clipped"])[200:]) < 0.1  # a fall is never clipped meanwhile
    assert np.asarray(stats["adaptive/threshold"])[-1] < 0.5


class AdaptiveVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_nonfinite_steps_never_enter_statistics(self):
        for direction_rate in (None, 0.5):
            tx = clipx.adaptive(warmup_steps=2, direction_rate=direction_rate)
            update = self.variant(tx.update)
            state = tx.init(DIRECTION)
            for norm in (1.0, 2.0, 1.5):
                _, state = update(grads_with_norm(norm), state)
            for bad in (jnp.nan, jnp.inf, 0.0):
                _, after = update(grads_with_norm(bad), state)
                chex.assert_trees_all_equal(after.log_norm, state.log_norm)
                chex.assert_trees_all_equal(after.direction, state.direction)  # nothing kept, m unchanged
            _, state = update(grads_with_norm(100.0), state)
            assert bool(clipx.stats(state)["adaptive/clipped"])


@pytest.mark.parametrize("scale", [1e6, 1e15, 1e18])
def test_the_multiplier_follows_directions_at_any_gradient_scale(scale):
    # ‖g‖·⟨g, g'⟩ overflows float32 from ‖g‖ ≈ 10^13: the cosine must not be lost there.
    def multipliers(factor):
        tx = clipx.adaptive(direction_rate=0.5, initial_multiplier=0.25, jump_ratio=None)
        state, out = tx.init(jnp.zeros(2)), []
        for _ in range(3):
            _, state = tx.update(jnp.array([3.0, 4.0]) * factor, state)
            out.append(float(state.direction.log_multiplier))
        return out

    np.testing.assert_allclose(multipliers(scale), multipliers(1.0), rtol=1e-6)


@pytest.mark.parametrize("direction_rate", [0.1, None])
def test_an_overflowing_norm_is_scaled_to_zero_from_the_first_step(direction_rate):
    tx = clipx.adaptive(direction_rate=direction_rate)
    updates, _ = tx.update(jnp.array([1e20, 1.0]), tx.init(jnp.zeros(2)))  # finite, ‖g‖ = inf in float32
    np.testing.assert_array_equal(updates, [0.0, 0.0])
    updates, _ = tx.update(jnp.array([jnp.inf, 1.0]), tx.init(jnp.zeros(2)))
    assert np.isnan(updates[0])  # a non-finite gradient gives a non-finite update


def test_bad_hyperparameters_raise():
    for kwargs in (
        {"num_stds": 0.0},
        {"decay": 1.0},
        {"warmup_steps": 0},
        {"warmup_factor": 0.5},
        {"min_std": -1},
        {"min_std": 0.0},  # steady warm-up norms would fix the threshold for good
        {"min_multiplier": 0.5, "initial_multiplier": 0.25},  # the floor above the start
        {"direction_rate": -0.1},
        {"direction_rate": float("nan")},
        {"initial_multiplier": 0.0, "direction_rate": 0.2},
        {"initial_multiplier": 1.5, "direction_rate": 0.2},
        {"min_multiplier": 0.0, "direction_rate": 0.2},
        {"min_multiplier": 2.0, "direction_rate": 0.2},
        {"initial_multiplier": 2.0},  # checked even while direction_rate is None
        {"jump_ratio": 0.5},
        {"jump_ratio": float("nan")},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            clipx.adaptive(**kwargs)
    for kwargs in (
        {"direction_rate": "0.2"},
        {"direction_rate": True},
        {"initial_multiplier": "1/4", "direction_rate": 0.2},
        {"jump_ratio": "6"},
    ):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            clipx.adaptive(**kwargs)


PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.ones(4)}


def grad_sequence(n, seed=0):
    norms = lognormal_norms(seed, n)
    norms[n // 2] = 1e4
    return [grads_with_norm(x) for x in norms]


@CHAINED_OPTIMIZERS
def test_chains_with_optimizers_and_masked(optimizer):
    mask = {"w": True, "b": False}
    tx = optax.chain(
        optax.masked(clipx.adaptive(warmup_steps=3), mask), clipx.adaptive(warmup_steps=3), optimizer
    )
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for g in grad_sequence(12):
        updates, state = update(g, state, PARAMS)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    keys = clipx.stats(state)
    assert "[0]/adaptive/threshold" in keys and "[1]/adaptive/threshold" in keys


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_stds": 3.0, "decay": 0.99, "warmup_steps": 3, "min_std": 0.1},
        {"num_stds": 3.0, "warmup_steps": 3, "direction_rate": 0.3},
    ],
    ids=["thresholds", "direction_rate"],
)
def test_inject_hyperparams_with_traced_hyperparameters(kwargs):
    tx = optax.inject_hyperparams(clipx.adaptive)(**kwargs)
    reference = clipx.adaptive(**kwargs)
    state, ref_state = tx.init(PARAMS), reference.init(PARAMS)
    update = jax.jit(tx.update)
    for g in grad_sequence(10):
        updates, state = update(g, state)
        ref_updates, ref_state = reference.update(g, ref_state)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6)
    state.hyperparams["num_stds"] = jnp.asarray(1.0)  # a schedule may move it; no retracing needed
    updates, state = update(grads_with_norm(1.0), state)
    assert "adaptive/threshold" in clipx.stats(state)


def test_multisteps_advances_statistics_once_per_real_step():
    tx = optax.MultiSteps(optax.chain(clipx.adaptive(warmup_steps=2), optax.adam(1e-3)), every_k_schedule=4)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for g in grad_sequence(12):
        _, state = update(g, state, PARAMS)
    assert int(state.inner_opt_state[0].log_norm.observations) == 3
    assert "adaptive/norm" in clipx.stats(state)


@pytest.mark.parametrize("direction_rate", [None, 0.2])
def test_serialization_round_trip_resumes_bit_identically(direction_rate):
    tx = optax.chain(clipx.adaptive(warmup_steps=3, direction_rate=direction_rate), optax.adam(1e-3))
    run_resumed(tx, grad_sequence(20, seed=5), PARAMS, split=10)


def trending_gradients(steps, seed=0, flip_until=0):
    """Noisy gradients around one direction ``d``: ``±3d`` alternating for ``flip_until`` steps, then ``+3d``.

    On top of `gradient_sequence`'s noise, spikes, zero steps and non-finite entries.
    """
    grads = gradient_sequence(seed, steps, {"w": (5, 7), "b": (7,), "k": (150, 120)})  # k: sketched
    rng = np.random.default_rng(seed + 1)
    for g in grads.values():
        direction = rng.normal(size=g.shape[1:]).astype(np.float32)
        for t in range(steps):
            if np.any(g[t] != 0):  # zero steps stay zero
                g[t] += 3 * direction * (-1.0 if t < flip_until and t % 2 else 1.0)
    return grads


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"warmup_steps": 5, "num_stds": 2.0, "decay": 0.9, "warmup_factor": 4.0, "direction_rate": None},
        {"warmup_steps": 5, "direction_rate": 0.5, "initial_multiplier": 0.25},
        {"warmup_steps": 5, "direction_rate": 1.0, "initial_multiplier": 1.0, "min_multiplier": 0.1},
        {"warmup_steps": 5, "direction_rate": 0.5, "jump_ratio": 1.5},
    ],
    ids=["defaults", "without_direction", "direction", "direction_from_1", "jumped"],
)
def test_matches_the_oracle_through_spikes_zeros_and_nonfinite_steps(kwargs):
    grads = trending_gradients(160, seed=4, flip_until=60)
    grads = {k: np.concatenate([g[:1] / 4, g[1:]]) for k, g in grads.items()}  # the second norm jumps
    updates, stats, _ = run_transform(clipx.adaptive(**kwargs), grads)
    expected_updates, expected_stats = run_oracle(AdaptiveOracle(**kwargs), grads)
    assert_matches(updates, stats, expected_updates, expected_stats, rtol=1e-4)


def test_direction_multiplier_falls_while_gradients_alternate_and_rises_while_they_agree():
    grads = trending_gradients(120, seed=7, flip_until=60)
    _, stats, state = run_transform(clipx.adaptive(direction_rate=0.5, initial_multiplier=0.25), grads)
    plain = run_transform(clipx.adaptive(direction_rate=None), grads)[1]["threshold"]
    ratio = np.asarray(stats["threshold"])[1:] / np.asarray(plain)[1:]
    # Both runs' statistics see the threshold without the multiplier, so the ratio is m itself.
    # While successive gradients point against each other it sinks to its floor; once they
    # agree it climbs back to 1 (a noise-dominated spike step may pull it a little below).
    assert 1 / 32 <= ratio[50] < 1 / 16
    assert np.mean(ratio[-20:] == 1.0) >= 0.8 and np.min(ratio[-20:]) > 0.9
    assert float(state.direction.log_multiplier) == 0.0


@pytest.mark.parametrize("jump, held", [(8.0, True), (4.0, False)])
def test_a_jump_of_the_second_norm_holds_the_multiplier_at_its_start(jump, held):
    # Gradients that agree raise m at every step, unless the second norm is over 6× the first.
    g = np.array([3.0, 4.0], np.float32)
    grads = {"w": np.stack([g] + [jump * g] * 30)}
    _, _, state = run_transform(clipx.adaptive(), grads)
    ceiling = float(np.exp(state.direction.log_ceiling))
    multiplier = float(np.exp(state.direction.log_multiplier))
    if held:
        assert ceiling == pytest.approx(0.35) and multiplier == pytest.approx(0.35)
    else:
        assert ceiling == 1.0 and multiplier == 1.0


def test_without_direction_rate_nothing_is_kept_and_a_zero_rate_keeps_the_initial_multiplier():
    assert clipx.adaptive(direction_rate=None).init(PARAMS).direction is None
    grads = trending_gradients(40, seed=2, flip_until=20)
    plain = np.asarray(run_transform(clipx.adaptive(direction_rate=None), grads)[1]["threshold"])[1:]
    held = np.asarray(
        run_transform(clipx.adaptive(direction_rate=0.0, initial_multiplier=0.5), grads)[1]["threshold"]
    )
    np.testing.assert_allclose(held[1:], 0.5 * plain, rtol=1e-6)


@pytest.mark.parametrize("direction_rate, first_scale", [(0.1, 0.35), (None, 1.0)])
def test_the_first_step_is_scaled_by_the_initial_multiplier_alone(direction_rate, first_scale):
    g = {"w": jnp.array([[3.0, -4.0]]), "b": jnp.array([12.0])}  # global norm 13
    tx = clipx.adaptive(direction_rate=direction_rate)
    updates, state = tx.update(g, tx.init(g))
    chex.assert_trees_all_close(updates, jax.tree.map(lambda x: first_scale * x, g), rtol=1e-6)
    # The threshold is m_0·‖g‖; with no multiplier, ‖g‖ itself: exactly unclipped.
    stats = clipx.stats(state)
    assert float(stats["adaptive/threshold"]) == pytest.approx(13 * first_scale, rel=1e-6)
    assert bool(stats["adaptive/clipped"]) == (direction_rate is not None)
    assert int(state.log_norm.observations) == 1
    np.testing.assert_allclose(state.log_norm.mean, np.log(13.0), rtol=1e-6)  # the norm enters unclipped


@pytest.mark.parametrize("norm", [0.3, 1.1, 2.9, 5.3, 7.7, 1e-15, 3e15])
def test_a_first_multiplier_of_one_leaves_the_first_step_exactly_as_it_is(norm):
    # The threshold was exp(log ‖g‖ + log m), which rounds below ‖g‖ for some norms (7.7): the
    # step was scaled by 1 − 1 ulp and reported clipped.
    tx = clipx.adaptive(initial_multiplier=1.0)
    g = jnp.array([norm], jnp.float32)
    updates, state = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(updates, g)
    assert not bool(state.stats.clipped) and float(state.stats.threshold) == float(g[0])


@pytest.mark.parametrize("direction_rate", [None, 0.1])
@pytest.mark.parametrize("norm", [0.1, 0.3, 7.7, 1e-15, 3e15])
def test_a_steady_norm_is_never_clipped_in_the_warm_up(direction_rate, norm):
    # With w = 1 the warm-up threshold is the geometric mean of the norms seen, exp(log ‖g‖) for a
    # steady norm, which rounds below ‖g‖ for some norms (0.1): steps 2 to 25 were scaled by 1 − 1 ulp
    # and reported clipped.
    tx = clipx.adaptive(direction_rate=direction_rate, initial_multiplier=1.0)
    g = jnp.array([norm], jnp.float32)
    update, state = jax.jit(tx.update), tx.init(g)
    for _ in range(6):
        updates, state = update(g, state)
        np.testing.assert_array_equal(updates, g)
        assert not bool(state.stats.clipped) and float(state.stats.threshold) >= float(g[0])


def test_complex_gradients_use_the_real_inner_product():
    g = {"z": jnp.array([1 + 2j, -0.5j, 3.0], jnp.complex64)}
    tx = clipx.adaptive(direction_rate=1.0, initial_multiplier=0.5)
    update = jax.jit(tx.update)
    state = tx.init(g)
    _, state = update(g, state)
    _, turned = update(jax.tree.map(lambda x: 1j * x, g), state)  # Re⟨ig, g⟩ = 0: no change
    np.testing.assert_allclose(turned.direction.log_multiplier, np.log(0.5), rtol=1e-6)
    _, reversed_ = update(jax.tree.map(lambda x: -x, g), state)  # cos = −1: one full step down
    np.testing.assert_allclose(reversed_.direction.log_multiplier, np.log(0.5) - 1.0, rtol=1e-6)


def test_direction_state_from_another_tree_is_rejected():
    tx = clipx.adaptive(direction_rate=0.2)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="previous gradient"):
        tx.update({"w": jnp.ones((2, 3))}, state)


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (clipx.adaptive, {}),
        (clipx.adaptive, {"direction_rate": None}),
        (clipx.autoclip, {"history": 4}),
        (clipx.zclip, {"warmup_steps": 2}),
        (clipx.adagc, {"warmup_steps": 2}),
        (clipx.quantile_clip, {}),
    ],
)
def test_float64_hyperparameters_under_x64_keep_the_state_types(factory, kwargs):
    # np.float64 is not weakly typed: a rate read from a config file must not widen the
    # float32 state, or lax.scan (and MultiSteps, the guards) refuse the new state.
    with jax.enable_x64(True):
        floats = {
            name: np.float64(param.default)
            for name, param in inspect.signature(factory).parameters.items()
            if isinstance(param.default, float) and name not in kwargs
        }
        tx = factory(**kwargs, **floats)
        grads = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]], jnp.float32), "b": jnp.array([0.25], jnp.float32)}
        state = tx.init(grads)

        def step(state, factor):
            return tx.update(jax.tree.map(lambda g: g * factor, grads), state)[1], None

        final, _ = jax.lax.scan(step, state, jnp.array([1.0, 3.0, 0.5, 20.0, 1.0], jnp.float32))
        chex.assert_trees_all_equal_dtypes(final, state)


def test_the_count_of_observations_stops_at_the_int32_limit():
    tx = clipx.adaptive(direction_rate=None, warmup_steps=2)
    state = tx.init(jnp.zeros(2))
    for _ in range(30):
        _, state = tx.update(jnp.array([0.6, 0.8]), state)
    state = state._replace(log_norm=state.log_norm._replace(observations=jnp.int32(2**31 - 2)))
    for _ in range(3):  # a 1000× spike stays clipped near the usual norm
        updates, state = tx.update(jnp.array([600.0, 800.0]), state)
        assert float(jnp.linalg.norm(updates)) < 2.0
    assert int(state.log_norm.observations) == 2**31 - 1


@pytest.mark.parametrize("kwargs", [{"num_stds": 1000.0, "warmup_steps": 1}, {"warmup_factor": 1e39}])
def test_a_huge_threshold_is_finite_and_clips_nothing(kwargs):
    # exp(μ + k·σ) overflowed to ∞ (or the warm-up factor did in its cast to float32), which
    # jax_debug_infs stops at; the threshold is now at most the largest float.
    tx = clipx.adaptive(**kwargs)
    state = tx.init(jnp.zeros(2))
    with jax.debug_infs(True):
        for g in ([3.0, 4.0], [3.0, 4.0], [30.0, 40.0]):
            updates, state = jax.jit(tx.update)(jnp.array(g), state)
    np.testing.assert_array_equal(updates, [30.0, 40.0])
    assert np.isfinite(float(state.stats.threshold)) and not bool(state.stats.clipped)
