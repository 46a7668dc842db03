"""clipx.skip_nonfinite and clipx.skip_spikes: skipped steps leave the inner state bit-identical."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from machinery import run_resumed

import clipx

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.ones(4)}


def grads(scale, seed=0):
    key = jax.random.PRNGKey(seed)
    return jax.tree.map(lambda p: scale * jax.random.normal(key, p.shape), PARAMS)


def nan_grads():
    g = grads(1.0)
    return {"w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"]}


INNERS = {
    "global_norm_adam": lambda: optax.chain(clipx.global_norm(1.0), optax.adam(1e-3)),
    "adaptive_adam": lambda: optax.chain(clipx.adaptive(warmup_steps=2), optax.adam(1e-3)),
}


def warm(tx, n=5):
    state = tx.init(PARAMS)
    for i in range(n):
        _, state = tx.update(grads(1.0 + 0.1 * i, seed=i), state, PARAMS)
    return state


class SkipNonfiniteTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_skipped_step_keeps_inner_state_bit_identical(self, check_updates):
        for make in INNERS.values():
            tx = clipx.skip_nonfinite(make(), check_updates=check_updates)
            update = self.variant(tx.update)
            state = warm(tx)
            for bad in (nan_grads(), jax.tree.map(lambda g: g * jnp.inf, grads(1.0))):
                updates, after = update(bad, state, PARAMS)
                chex.assert_trees_all_equal(after.inner_state, state.inner_state)
                chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
                assert bool(after.stats.skipped)
            _, after = update(grads(1.0), state, PARAMS)
            assert not bool(after.stats.skipped)


def test_counts_and_max_consecutive():
    tx = clipx.skip_nonfinite(optax.sgd(0.1), max_consecutive=2)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    skipped = []
    for g in (nan_grads(), nan_grads(), nan_grads(), grads(1.0), nan_grads()):
        _updates, state = update(g, state, PARAMS)
        skipped.append(bool(state.stats.skipped))
    assert skipped == [True, True, False, False, True]
    assert int(state.stats.total) == 3 and int(state.stats.consecutive) == 1
    s = clipx.stats(state)
    assert set(s) == {"skip_nonfinite/skipped", "skip_nonfinite/consecutive", "skip_nonfinite/total"}


def test_never_lets_through_by_default():
    tx = clipx.skip_nonfinite(optax.sgd(0.1))
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for _ in range(20):
        updates, state = update(nan_grads(), state, PARAMS)
    assert int(state.stats.consecutive) == 20
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))


@pytest.mark.parametrize("check_updates", [False, True])
def test_checks_the_updates_inner_produces_when_asked(check_updates):
    # Finite gradients that the inner transformation turns into NaN (0/0) are skipped with check_updates.
    tx = clipx.skip_nonfinite(optax.scale_by_adam(eps=0.0, eps_root=0.0), check_updates=check_updates)
    state = tx.init(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, state = tx.update(zeros, state, PARAMS)
    assert bool(state.stats.skipped) == check_updates
    assert all(bool(jnp.all(jnp.isnan(u))) != check_updates for u in jax.tree.leaves(updates))


def test_stats_see_inner_clippers_and_extra_args_pass_through():
    tx = clipx.skip_nonfinite(optax.chain(clipx.adaptive(), optax.sgd(0.1)))
    state = tx.init(PARAMS)
    _, state = tx.update(grads(1.0), state, PARAMS, unused_extra=1)
    assert "skip_nonfinite/adaptive/threshold" in clipx.stats(state)


def spike_run(tx, scales, losses=None):
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    out = []
    for i, scale in enumerate(scales):
        kwargs = {} if losses is None else {"loss": jnp.float32(losses[i])}
        old = state
        updates, state = update(grads(scale, seed=i), state, PARAMS, **kwargs)
        out.append((old, updates, state))
    return out


@pytest.mark.parametrize("inner", list(INNERS))
def test_skip_spikes_skips_outliers_and_keeps_inner_state(inner):
    scales = list(np.exp(np.random.default_rng(0).normal(0, 0.2, 40)))
    scales[30] = 100.0
    tx = clipx.skip_spikes(INNERS[inner](), min_observations=10)
    results = spike_run(tx, scales)
    skipped = [bool(s.stats.skipped) for _, _, s in results]
    assert skipped[30] and sum(skipped) == 1
    old, updates, after = results[30]
    chex.assert_trees_all_equal(after.inner_state, old.inner_state)
    chex.assert_trees_all_equal(after.log_norm, old.log_norm)  # the spike enters no statistic
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    s = clipx.stats(after)
    assert bool(s["skip_spikes/grad_norm/clipped"]) and float(s["skip_spikes/grad_norm/threshold"]) < 100
    assert f"skip_spikes/{'global_norm' if inner == 'global_norm_adam' else 'adaptive'}/norm" in s


def test_skip_spikes_watches_the_loss():
    scales = [1.0] * 30
    losses = list(2.0 + 0.01 * np.random.default_rng(1).normal(size=30))
    losses[25] = 50.0
    results = spike_run(clipx.skip_spikes(optax.adam(1e-3), min_observations=10), scales, losses)
    skipped = [bool(s.stats.skipped) for _, _, s in results]
    assert skipped[25] and sum(skipped) == 1
    assert int(results[-1][2].loss.observations) == 29


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_a_huge_finite_loss_keeps_the_loss_statistics_finite(jit):
    """Before, a loss 2e19 from the mean squared to ∞: σ² was ∞ for good, and jax_debug_infs stopped."""
    tx = clipx.skip_spikes(optax.sgd(0.1), min_observations=3)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(PARAMS)
    with jax.debug_infs(True):
        for i, loss in enumerate([1.0, 2e19, 1.0, -3e38, 1.0]):
            _, state = update(grads(1.0, seed=i), state, PARAMS, loss=jnp.float32(loss))
            assert np.isfinite(float(state.loss.mean)) and np.isfinite(float(state.loss.var))
    assert float(state.loss.var) <= float(np.finfo(np.float32).max)


def test_skip_spikes_watches_a_loss_that_starts_late_only_once_it_has_observations():
    # The norm statistics are ready after 5 steps; the loss arrives at step 8.
    tx = clipx.skip_spikes(optax.sgd(0.1), min_observations=5, max_consecutive=None)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for i in range(8):
        _, state = update(grads(1.0, seed=i), state, PARAMS)
    skipped = []
    for i in range(8, 20):
        loss = jnp.float32(50.0 if i == 16 else 2.0 + 0.01 * (i % 3))
        _, state = update(grads(1.0, seed=i), state, PARAMS, loss=loss)
        skipped.append(bool(state.stats.skipped))
    assert skipped == [i == 16 for i in range(8, 20)]  # the first five losses only build the statistics


@pytest.mark.parametrize("loss", [jnp.ones(1), jnp.ones((2,))], ids=["(1,)", "(2,)"])
def test_skip_spikes_refuses_a_loss_that_is_not_a_scalar(loss):
    tx = clipx.skip_spikes(optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"loss= must be a scalar, got shape \(\d,?\)"):
        tx.update(grads(1.0), tx.init(PARAMS), PARAMS, loss=loss)


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_keep_typed_prng_keys_in_the_inner_state_without_jit(guard):
    inner = optax.chain(
        optax.contrib.differentially_private_aggregate(1.0, 0.5, key=jax.random.key(0)), optax.sgd(0.1)
    )
    tx = guard(inner)
    batched = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads(1.0))
    state = tx.init(PARAMS)
    eager, eager_state = tx.update(batched, state, PARAMS)
    jitted, jitted_state = jax.jit(tx.update)(batched, state, PARAMS)
    expected, _ = inner.update(batched, inner.init(PARAMS), PARAMS)
    # The guards run `inner` inside lax.cond, compiled even when called eagerly.
    chex.assert_trees_all_close(eager, expected, rtol=1e-5)
    chex.assert_trees_all_close(jitted, expected, rtol=1e-5)  # XLA fuses the noise's arithmetic
    keys = [s.inner_state[0].rng_key for s in (eager_state, jitted_state)]
    assert keys[0].dtype == keys[1].dtype == state.inner_state[0].rng_key.dtype
    np.testing.assert_array_equal(jax.random.key_data(keys[0]), jax.random.key_data(keys[1]))
    _, skipped = tx.update(jax.tree.map(lambda g: g * jnp.nan, batched), state, PARAMS)
    assert bool(skipped.stats.skipped)
    np.testing.assert_array_equal(
        jax.random.key_data(skipped.inner_state[0].rng_key), jax.random.key_data(state.inner_state[0].rng_key)
    )


def _adam_sized_case():
    """Parameters, their total size in bytes, and gradients for the temporary-memory tests."""
    params = {f"w{i}": jnp.ones((256, 256)) for i in range(3)}
    return params, sum(p.nbytes for p in params.values()), jax.tree.map(lambda p: 0.01 * p, params)


def _step_temp_bytes(tx, params, grads):
    """Temporary memory of the compiled step ``(params, state) -> (params, state)``, both donated."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        pytest.skip(f"no memory analysis on the {jax.default_backend()} backend")
    return memory.temp_size_in_bytes


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_write_the_inner_state_in_place(guard):
    """The decision comes before ``inner`` runs: Adam's new moments are never held beside the old.

    The step may hold the updates (one gradient's size) before adding them to
    the parameters, as ``optax.apply_if_finite`` does; choosing between the new
    moments and the old would hold two more.
    """
    params, size, grads = _adam_sized_case()
    guard = guard(optax.adam(1e-3))
    temp = _step_temp_bytes(guard, params, grads)
    assert temp < 1.5 * size, f"the guarded step holds {temp / size:.2f}× the gradients' size"
    # A skipped step still zeroes the updates and keeps Adam's state.
    state = guard.init(params)
    updates, new_state = jax.jit(guard.update)(jax.tree.map(lambda g: g * jnp.inf, grads), state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)


def test_skip_nonfinite_checking_the_updates_holds_the_new_moments_beside_the_old():
    """What ``check_updates=True`` costs, as its docstring says: two more gradient-sized buffers."""
    params, size, grads = _adam_sized_case()
    temp = _step_temp_bytes(clipx.skip_nonfinite(optax.adam(1e-3), check_updates=True), params, grads)
    assert temp > 2.5 * size, f"the guarded step holds {temp / size:.2f}× the gradients' size"


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_trace_the_inner_update_once_when_its_updates_are_like_the_gradients(guard):
    """Compile time: ``inner.update`` is traced once, not again for the shapes of the skipped branch."""
    traced = []
    adam = optax.adam(1e-3)

    def update(updates, state, params=None):
        traced.append(1)
        return adam.update(updates, state, params)

    guard = guard(optax.GradientTransformation(adam.init, update))
    jax.jit(guard.update).lower(grads(1.0), guard.init(PARAMS), PARAMS)
    assert len(traced) == 1


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_zero_updates_of_another_dtype_than_the_gradients(guard):
    to_bfloat16 = optax.stateless(lambda u, p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), u))
    guard = guard(optax.chain(optax.sgd(0.1), to_bfloat16))
    state = guard.init(PARAMS)
    taken, state = jax.jit(guard.update)(grads(1.0), state, PARAMS)
    skipped, state = jax.jit(guard.update)(nan_grads(), state, PARAMS)
    assert bool(state.stats.skipped)
    for updates in (taken, skipped):
        assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
    chex.assert_trees_all_equal(skipped, jax.tree.map(jnp.zeros_like, taken))
    chex.assert_trees_all_close(taken, jax.tree.map(lambda g: (-0.1 * g).astype(jnp.bfloat16), grads(1.0)))


def test_skip_spikes_skips_nonfinite_and_lets_one_through_after_max_consecutive():
    scales = [1.0] * 12 + [1000.0] * 4 + [float("nan")]
    results = spike_run(clipx.skip_spikes(optax.sgd(0.1), min_observations=5, max_consecutive=2), scales)
    skipped = [bool(s.stats.skipped) for _, _, s in results]
    assert skipped[12:15] == [True, True, False] and skipped[-1]
    # The step let through enters the statistics.
    assert int(results[14][2].log_norm.observations) == int(results[14][0].log_norm.observations) + 1


@given(seed=st.integers(0, 2**16), bad=st.lists(st.integers(0, 29), max_size=6))
def test_property_statistics_stay_finite(seed, bad):
    scales = list(np.exp(np.random.default_rng(seed).normal(0, 0.5, 30)))
    for i, t in enumerate(bad):
        scales[t] = (float("nan"), float("inf"), 0.0, 1e6)[i % 4]
    state = _spike_scan(jnp.asarray(scales, jnp.float32))
    assert np.isfinite(float(state.log_norm.mean)) and np.isfinite(float(state.log_norm.var))
    chex.assert_tree_all_finite(state.inner_state)


@jax.jit
def _spike_scan(scales):
    tx = clipx.skip_spikes(optax.chain(clipx.global_norm(1.0), optax.adam(1e-3)), min_observations=5)

    def step(state, scale):
        _, state = tx.update(jax.tree.map(lambda p: scale * p, PARAMS), state, PARAMS)
        return state, None

    return jax.lax.scan(step, tx.init(PARAMS), scales)[0]


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="num_stds"):
        clipx.skip_spikes(optax.sgd(0.1), num_stds=0.0)
    with pytest.raises(ValueError, match="max_consecutive"):
        clipx.skip_nonfinite(optax.sgd(0.1), max_consecutive=-1)
    # With no observation the test would compare against μ = σ = 0: a fixed threshold of e^{k·σ_min}.
    with pytest.raises(ValueError, match="min_observations must be an int >= 1"):
        clipx.skip_spikes(optax.sgd(0.1), min_observations=0)


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_inside_multisteps_and_serialization_round_trip(guard):
    inner = optax.chain(clipx.adaptive(warmup_steps=2), optax.sgd(0.1, momentum=0.9))
    tx = optax.MultiSteps(guard(inner), every_k_schedule=2)
    state = run_resumed(tx, [grads(1.0 + 0.1 * i, seed=i) for i in range(12)], PARAMS, split=5)
    # Statistics advance once per real step: 12 mini-steps of 2.
    assert int(state.inner_opt_state.inner_state[0].log_norm.observations) == 6


def test_skip_nonfinite_around_multisteps_drops_only_the_bad_mini_step():
    # Outside MultiSteps the guard keeps a NaN out of the gradient accumulator.
    inner = optax.MultiSteps(
        optax.chain(clipx.adaptive(warmup_steps=2), optax.adam(1e-3)), every_k_schedule=2
    )
    sequence = [grads(1.0 + 0.1 * i, seed=i) for i in range(13)]
    sequence[7] = nan_grads()
    state = run_resumed(clipx.skip_nonfinite(inner), sequence, PARAMS, split=5)
    assert int(state.stats.total) == 1
    assert int(state.inner_state.inner_opt_state[0].log_norm.observations) == 6


def test_skip_spikes_keeps_its_loss_from_a_line_search_inside():
    # optax.lbfgs passes every keyword it does not know to its value_fn, which takes none.
    def fn(params):
        return jnp.sum((params["w"] - 1.0) ** 2)

    tx = clipx.skip_spikes(optax.chain(clipx.global_norm(10.0), optax.lbfgs()), min_observations=2)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    value_and_grad = optax.value_and_grad_from_state(fn)
    for _ in range(4):
        value, grad = value_and_grad(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=fn, loss=value)
        params = optax.apply_updates(params, updates)
    assert float(fn(params)) < 1e-6
    assert int(state.loss.observations) >= 1  # the guard saw its loss


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_run_under_strict_dtype_promotion(guard):
    """Users who turn on jax_numpy_dtype_promotion="strict" can still use the guards."""
    tx = guard(clipx.global_norm(1.0))
    grads = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    with jax.numpy_dtype_promotion("strict"):
        _, state = tx.update(grads, tx.init(grads), grads)
        _, state = jax.jit(tx.update)(grads, state, grads)
    assert int(clipx.stats(state)[f"{guard.__name__}/total"]) == 0


def test_skip_spikes_watches_the_loss_of_steps_with_zero_gradients():
    # A zero norm stays out of the norm's statistics (its log is −∞), not out of the loss's.
    tx = clipx.skip_spikes(optax.sgd(0.1), min_observations=3)
    params = jnp.ones(2)
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(jnp.zeros(2), state, params, loss=2.0)
    assert int(state.loss.observations) == 5 and int(state.log_norm.observations) == 0
    _, state = tx.update(jnp.zeros(2), state, params, loss=100.0)
    assert bool(state.stats.skipped)


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_take_an_inner_state_holding_a_python_number_without_jit(guard):
    # As optax.apply_if_finite does: a custom transformation's init may return Python numbers.
    counter = optax.GradientTransformation(lambda p: {"n": 0.0}, lambda u, s, p=None: (u, {"n": s["n"] + 1}))
    tx = guard(counter)
    state = tx.init(jnp.zeros(2))
    for _ in range(2):
        _, state = tx.update(jnp.ones(2), state)
    assert float(state.inner_state["n"]) == 2.0


@pytest.mark.parametrize("guard", [clipx.skip_nonfinite, clipx.skip_spikes])
def test_guards_under_vmap_skip_only_the_members_with_bad_gradients(guard):
    """Under `jax.vmap` the `lax.cond` becomes a choice per member: one member's NaN skips only its step."""
    tx = guard(optax.adam(1e-2))
    stack = lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    member = lambda tree, m: jax.tree.map(lambda x: x[m], tree)  # noqa: E731
    state = jax.vmap(tx.init)(stack(PARAMS, PARAMS))
    update = jax.jit(jax.vmap(tx.update))
    updates, after = update(stack(grads(1.0), nan_grads()), state, stack(PARAMS, PARAMS))
    np.testing.assert_array_equal(after.stats.skipped, [False, True])
    alone_updates, alone_state = tx.update(grads(1.0), tx.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(member(updates, 0), alone_updates, rtol=1e-6)
    chex.assert_trees_all_close(member(after.inner_state, 0), alone_state.inner_state, rtol=1e-6)
    chex.assert_trees_all_equal(member(updates, 1), jax.tree.map(jnp.zeros_like, PARAMS))
    chex.assert_trees_all_equal(member(after.inner_state, 1), member(state.inner_state, 1))


def test_skip_spikes_may_skip_the_step_right_after_min_observations():
    """With min_observations=3, three accepted steps make the statistics ready: the fourth, a
    spike, is skipped."""
    scales = [1.0, 1.1, 0.9, 100.0]
    results = spike_run(clipx.skip_spikes(optax.sgd(0.1), min_observations=3), scales)
    assert [bool(s.stats.skipped) for _, _, s in results] == [False, False, False, True]


@pytest.mark.parametrize(
    "guard",
    [clipx.skip_nonfinite, functools.partial(clipx.skip_nonfinite, check_updates=True), clipx.skip_spikes],
    ids=["skip_nonfinite", "skip_nonfinite_check_updates", "skip_spikes"],
)
def test_guards_keep_the_wider_type_of_a_state_leaf_the_inner_step_changes(guard):
    """Adam's moments of bfloat16 parameters become float32 from float32 gradients: neither is rounded."""
    tx = guard(optax.adam(1e-3))
    params = {"w": jnp.zeros(4, jnp.bfloat16)}
    steps = [{"w": jnp.asarray([1.0, 1.001, -1.003, 0.5], jnp.float32) + 1e-3 * i} for i in range(4)]
    # A step skipped before any is taken casts the bfloat16 moments of `init` up to float32, exactly.
    skipped, state = jax.jit(tx.update)({"w": jnp.full(4, jnp.nan, jnp.float32)}, tx.init(params), params)
    assert bool(state.stats.skipped) and state.inner_state[0].mu["w"].dtype == jnp.float32
    chex.assert_trees_all_equal(skipped, {"w": jnp.zeros(4, jnp.float32)})
    chex.assert_trees_all_equal(state.inner_state[0].mu["w"], jnp.zeros(4, jnp.float32))
    adam, adam_state = optax.adam(1e-3), optax.adam(1e-3).init(params)
    for g in steps:
        updates, state = jax.jit(tx.update)(g, state, params)
        expected, adam_state = jax.jit(adam.update)(g, adam_state, params)
        chex.assert_trees_all_equal(updates, expected)
    chex.assert_trees_all_equal(state.inner_state, adam_state)
