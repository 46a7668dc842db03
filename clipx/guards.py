"""Wrappers that skip a step — a non-finite one, or a spike — and keep the inner state as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _devices, _numerics, _running, _validate
from clipx._stats import ClipStats, GuardStats, clip_stats, empty_clip_stats, empty_guard_stats, replacing


def _wider_type(new: Any, old: Any) -> Any:
    """The type a state leaf keeps: the wider of its new and old dtypes, so that neither is rounded.

    An inner transform may change a leaf's type (Adam's moments of bfloat16
    parameters become float32 with float32 gradients); the guarded state
    takes the new type, and an old state kept by a skipped step is cast up
    to it exactly. Typed PRNG keys (extended dtypes) keep their own.
    """
    old_dtype, new_dtype = jnp.result_type(old), jnp.result_type(new)  # Python numbers have no .dtype
    if jax.dtypes.issubdtype(old_dtype, jax.dtypes.extended):
        return old_dtype
    with jax.numpy_dtype_promotion("standard"):  # the user's "strict" refuses bfloat16 with float32
        return jnp.promote_types(new_dtype, old_dtype)


def _cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype`` (a typed PRNG key as it is: it has no astype)."""
    return x if jax.dtypes.issubdtype(dtype, jax.dtypes.extended) else jnp.asarray(x).astype(dtype)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``keep_new`` else ``old``, leaf by leaf, in the wider type of the two (`_wider_type`)."""

    def select(n: Any, o: Any) -> Any:
        dtype = _wider_type(n, o)
        return jnp.where(keep_new, _cast(n, dtype), _cast(o, dtype))

    return jax.tree.map(select, new, old)


def _unless(
    skip: jax.Array, step: Callable[[], tuple[Any, Any]], gradients: Any, inner_state: Any
) -> tuple[Any, Any]:
    """``step()`` (the updates and the new inner state), or zero updates and ``inner_state`` if ``skip``.

    A `jax.lax.cond`: the step runs only when it is taken, and its new state
    may overwrite the old in place (under `jax.vmap` both run and one is
    selected). A state leaf whose type ``step`` changes takes the wider of
    its two types (`_wider_type`).
    """

    def take(state_dtypes: Any) -> Callable[[Any], tuple[Any, Any]]:
        def branch(_):
            new_updates, new_state = step()
            if state_dtypes is not None:
                new_state = jax.tree.map(_cast, new_state, state_dtypes)
            return new_updates, jax.tree.map(_devices.varying_like, new_state, inner_state)

        return branch

    def zero(update_types: Any, state_types: Any, state_dtypes: Any) -> Callable[[Any], tuple[Any, Any]]:
        def branch(_):
            zeros = jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), t.dtype), update_types)
            kept = inner_state if state_dtypes is None else jax.tree.map(_cast, inner_state, state_dtypes)
            return jax.tree.map(_devices.varying_like, zeros, update_types), jax.tree.map(
                _devices.varying_like, kept, state_types
            )

        return branch

    # In this order (the step as branch 1) XLA's CPU backend writes the new state in place;
    # with the branches swapped it copies the whole state out of the branch after every step.
    try:  # Updates typed like the gradients, a state like the old one: `step` is traced once.
        return jax.lax.cond(~skip, take(None), zero(gradients, inner_state, None), None)
    except TypeError:  # they are not (or `step` fails, and fails again below)
        pass
    update_types, state_types = jax.eval_shape(step)
    state_dtypes = jax.tree.map(_wider_type, state_types, inner_state)
    return jax.lax.cond(~skip, take(state_dtypes), zero(update_types, state_types, state_dtypes), None)


def _guard_stats(stats: GuardStats, skip: jax.Array) -> GuardStats:
    """The `GuardStats` after a step that was (``skip``) or was not skipped."""
    return replacing(
        stats,
        GuardStats(
            skipped=skip,
            consecutive=jnp.where(skip, stats.consecutive + 1, 0).astype(jnp.int32),
            total=(stats.total + skip.astype(stats.total.dtype)).astype(jnp.int32),
        ),
    )


def _skip_decision(
    reject: jax.Array, stats: GuardStats, max_consecutive: int | jax.Array | None
) -> jax.Array:
    """Skip a rejected step unless ``max_consecutive`` steps in a row were skipped already."""
    if max_consecutive is None:
        return reject
    return reject & (stats.consecutive < max_consecutive)


class SkipNonfiniteState(NamedTuple):
    """State of `skip_nonfinite`: the inner state and what the guard did."""

    inner_state: Any
    stats: GuardStats
    stats_name = "skip_nonfinite"  # type: ignore[misc]  # a class attribute, not a field
    fields_like_params = ("inner_state",)  # type: ignore[misc]  # sharded like the parameters (`state_shardings`)


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive: int | jax.Array | None = None,
    check_updates: bool = False,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips every step whose gradients (or, optionally, updates) contain NaN or ±inf.

    On a skipped step the update is zero and the inner state stays exactly
    as it was (bit for bit: moments, counts and schedules do not advance),
    as if the step had not happened. A state leaf whose type ``inner``
    changes (Adam's moments of bfloat16 parameters become float32 with
    float32 gradients) is kept in the wider of its two types, so the guarded
    state is what ``inner`` computes, and one a skipped step keeps is the
    old one exactly.

    By default the check covers the incoming gradients, as
    ``optax.apply_if_finite``'s does: it is made before ``inner`` runs, so
    ``inner`` runs inside a `jax.lax.cond` on accepted steps only and updates
    its state in place. With ``check_updates=True`` it also covers the
    updates ``inner`` makes from finite gradients — NaN from a division by
    a zero second moment, say, in a float16 Adam whose ``eps`` rounds to 0.
    That check comes after ``inner`` has run, so the new state is computed
    beside the old one and one of them chosen: with Adam, three
    gradient-sized temporary buffers (the new moments and the updates)
    where the default holds one, and, on a CPU, about twice its cost.

    With ``max_consecutive=None`` (the default) non-finite steps are always
    skipped: training stalls visibly (``consecutive`` grows) instead of
    writing NaN into the parameters. With an integer ``m``, after ``m``
    skipped steps in a row the next non-finite step is applied as ``inner``
    computed it, NaN included, and the count starts again, for runs that
    must fail loudly rather than stall. (``optax.apply_if_finite(inner,
    max_consecutive_errors=m)`` also applies the step after ``m`` skips, but
    then every further non-finite step until a finite one arrives.)

    Statistics (`GuardStats`, name ``"skip_nonfinite"``): ``skipped`` this
    step, ``consecutive`` skipped steps in a row, ``total`` skipped steps.
    Extra keyword arguments of ``update`` are passed on to ``inner``.

    Args:
      inner: the transformation to guard (usually the whole optimizer chain).
      max_consecutive: ``None``, or how many non-finite steps in a row are
        skipped before one is let through (``≥ 0``).
      check_updates: whether the updates ``inner`` makes are checked too.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis whose devices
        decide together: a step is skipped on every device when any device
        holds a non-finite value, so the replicas never drift apart.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Reference:
      optax ``apply_if_finite``; the dynamic loss scaling of mixed-precision
      training (Micikevicius et al., "Mixed Precision Training", ICLR 2018).

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = clipx.skip_nonfinite(optax.adam(0.1))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state, params)
      >>> updates
      Array([0., 0.], dtype=float32)
      >>> {k: int(v) for k, v in clipx.stats(state).items()}
      {'skip_nonfinite/skipped': 1, 'skip_nonfinite/consecutive': 1, 'skip_nonfinite/total': 1}
    """
    if max_consecutive is not None:
        max_consecutive = _validate.check_steps("max_consecutive", max_consecutive)
    check_updates = _validate.as_bool("check_updates", check_updates)
    _validate.check_transformation("inner", inner)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(inner_state=inner.init(params), stats=empty_guard_stats())

    def skip_unless_finite(values, stats):
        finite = _numerics.tree_all_finite(values)
        if axis_name is not None:
            finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
        return _skip_decision(~finite, stats, max_consecutive)

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_state(state, SkipNonfiniteState)
        updates = jax.tree.map(jnp.asarray, updates)  # Python numbers too: the inner transform may take them

        def step():
            return inner.update(updates, state.inner_state, params, **extra_args)

        if check_updates:
            new_updates, new_inner = step()
            skip = skip_unless_finite((updates, new_updates), state.stats)
            new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
            inner_state = _select(~skip, new_inner, state.inner_state)
        else:
            skip = skip_unless_finite(updates, state.stats)
            new_updates, inner_state = _unless(skip, step, updates, state.inner_state)
        return new_updates, SkipNonfiniteState(inner_state=inner_state, stats=_guard_stats(state.stats, skip))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class GradNormRecord(NamedTuple):
    """What `skip_spikes` measured: the gradient norm against its spike threshold.

    ``stats.norm`` is the global gradient norm, ``stats.threshold`` the norm
    above which the step is a spike (the norm itself while too few steps
    were seen, when no step is a spike),
    ``stats.scale`` 0 on a skipped step and 1 otherwise, ``stats.clipped``
    whether the step was skipped.
    """

    stats: ClipStats
    stats_name = "grad_norm"  # type: ignore[misc]  # a class attribute, not a field


_LARGEST_LOG = float(_numerics.largest_log(jnp.float32))


class SkipSpikesState(NamedTuple):
    """State of `skip_spikes`.

    Attributes:
      inner_state: the state of the guarded transformation.
      log_norm: running mean and variance of ``log‖g‖`` over accepted steps.
      loss: running mean and variance of the loss over accepted steps (used
        only when ``update`` receives ``loss=``).
      grad_norm: the measured norm and its threshold (`GradNormRecord`).
      stats: the `GuardStats` of the last step.
    """

    inner_state: Any
    log_norm: _running.Moments
    loss: _running.Moments
    grad_norm: GradNormRecord
    stats: GuardStats
    stats_name = "skip_spikes"  # type: ignore[misc]  # a class attribute, not a field
    fields_like_params = ("inner_state",)  # type: ignore[misc]  # sharded like the parameters (`state_shardings`)


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    num_stds: float | jax.Array = 6.0,
    decay: float | jax.Array = 0.99,
    min_observations: int | jax.Array = 64,
    min_std: float | jax.Array = 0.1,
    max_consecutive: int | jax.Array | None = 10,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose gradient norm (or loss) is an outlier of the recent ones.

    Keeps the running mean ``μ`` and standard deviation ``σ`` of ``log‖g‖``
    over accepted steps with a norm above 0 (weights ``max(1/n, 1 − decay)``: the exact mean and
    variance of the first ``1/(1 − decay)`` steps, an exponential moving
    average after) and skips the step when

    .. math::

        \log\lVert g\rVert > \mu + k\,\max(\sigma, \sigma_\text{min})

    once ``min_observations`` steps were accepted. When ``update`` receives
    ``loss=`` (a scalar), the loss is watched the same way in linear units
    (it may be negative), with no floor on ``σ_L``: the step is also skipped
    when ``loss > μ_L + k·σ_L``, once ``min_observations`` steps with a loss
    were accepted (so ``loss=`` may start at any step). A non-finite norm or loss is skipped
    whatever the statistics (within the ``max_consecutive`` limit below).

    On a skipped step the update is zero, the inner state stays bit for bit
    as it was (in the wider type where ``inner`` changes a leaf's, as in
    `skip_nonfinite`), and the skipped values do not enter the statistics. Because a
    lasting jump of the norm would otherwise be skipped for ever, after
    ``max_consecutive`` skipped steps in a row the next step is accepted
    (and enters the statistics if finite); ``None`` never lets one through.

    Defaults follow Levanter and OLMo (``k = 6``, 64 observations before the
    first skip; a moving average of about 100 steps where Levanter keeps a
    window of 128), with the statistics of ``log‖g‖``, which makes the test
    independent of the scale of the loss. Lingvo's ``GradNormTracker``, which
    also works in log space, differs: it tracks ``log(1 + ‖g‖)`` (nearly
    ``‖g‖`` itself for the small norms of a trained model), feeds a rejected
    step's value in, capped at the threshold, and floors σ at 10⁻³.
    ``min_std = 0.1`` means a step is
    never skipped for a norm less than ``e^{0.6} ≈ 1.8`` times its typical
    value. The decision needs the gradients only, so ``inner`` runs inside a
    `jax.lax.cond`, on accepted steps alone: a step costs the inner update
    plus one norm, and the inner state is updated in place (under `jax.vmap`
    both branches run and one is selected).

    Statistics: `GuardStats` under ``"skip_spikes"`` and, under
    ``"skip_spikes/grad_norm"``, the norm and its threshold (`GradNormRecord`).

    Args:
      inner: the transformation to guard (usually the whole optimizer chain).
      num_stds: ``k > 0``.
      decay: the statistics' decay in ``[0, 1)``.
      min_observations: accepted steps before any step is skipped for its
        size (``≥ 1``).
      min_std: ``σ_min ≥ 0``, the floor of the standard deviation of ``log‖g‖``.
      max_consecutive: ``None``, or how many steps in a row may be skipped
        before one is accepted.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis to sum the
        squared norm over. ``loss=`` is taken as given: pass one loss for all
        devices (``jax.lax.pmean`` of theirs), or the devices may decide
        apart.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` takes an
      optional ``loss=`` keyword, its own, and passes every other extra
      keyword to ``inner`` (``value=``, ``grad=``, ``value_fn=`` of
      ``optax.lbfgs`` and the line searches).

    Reference:
      Lingvo ``GradNormTracker``; Levanter ``SkipStepConfig``; OLMo-core's
      skip-step optimizer; Chowdhery et al., "PaLM", 2022 (skipping batches
      around loss spikes).

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = clipx.skip_spikes(optax.sgd(0.1), min_observations=3)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for g in ([0.6, 0.8], [0.3, 0.4], [0.9, 1.2]):
      ...     _, state = tx.update(jnp.array(g), state, params)
      >>> updates, state = tx.update(jnp.array([60.0, 80.0]), state, params)
      >>> updates
      Array([0., 0.], dtype=float32)
      >>> bool(clipx.stats(state)["skip_spikes/skipped"])
      True
    """
    num_stds = _validate.check_finite_positive("num_stds", num_stds)
    decay = _validate.check_range("decay", decay, 0.0, 1.0, high_open=True)
    min_observations = _validate.check_steps("min_observations", min_observations, low=1)
    min_std = _validate.check_finite_nonnegative("min_std", min_std)
    if max_consecutive is not None:
        max_consecutive = _validate.check_steps("max_consecutive", max_consecutive)
    _validate.check_transformation("inner", inner)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        dtype = _numerics.tree_accumulation_dtype(params)
        return SkipSpikesState(
            inner_state=inner.init(params),
            log_norm=_running.init_moments(dtype),
            loss=_running.init_moments(dtype),
            grad_norm=GradNormRecord(stats=empty_clip_stats()),
            stats=empty_guard_stats(),
        )

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        _validate.check_update(updates, state, SkipSpikesState)
        moments = state.log_norm
        dtype = moments.mean.dtype
        ready = moments.observations >= min_observations
        norm = _numerics.tree_norm(updates, axis_name)
        std = jnp.maximum(_numerics.safe_sqrt(moments.var), jnp.asarray(min_std, dtype))
        stds = _numerics.hyperparameter(num_stds, dtype)
        log_threshold = moments.mean + stds * std  # used once `ready`: no ∞ for "none yet"
        finite = jnp.isfinite(norm)
        observe = finite & (norm > 0)
        # log is taken of observable norms only: log 0 = −∞ would trip jax_debug_infs.
        log_norm = jnp.log(jnp.where(observe, norm, 1).astype(dtype))
        reject = ~finite | (ready & observe & (log_norm > log_threshold))
        if loss is not None:
            if jnp.ndim(loss) != 0:
                raise ValueError(f"skip_spikes: loss= must be a scalar, got shape {jnp.shape(loss)}")
            loss = jnp.asarray(loss, dtype)
            loss_ready = state.loss.observations >= min_observations
            loss_threshold = state.loss.mean + stds * _numerics.safe_sqrt(state.loss.var)
            reject |= ~jnp.isfinite(loss) | (loss_ready & (loss > loss_threshold))
            finite &= jnp.isfinite(loss)
        skip = _skip_decision(reject, state.stats, max_consecutive)
        # An accepted step enters the statistics if its norm and loss are finite; a zero norm
        # enters the loss's only (its log is −∞).
        observe &= finite & ~skip
        observe_loss = finite & ~skip

        # The decision needs only the gradients, so `inner` runs on accepted steps alone and
        # its new state is written where the old one was (no copy of both to choose between).
        # loss= is the guard's own: a line search inside would pass it to its value_fn and fail.
        new_updates, inner_state = _unless(
            skip,
            lambda: inner.update(updates, state.inner_state, params, **extra_args),
            updates,
            state.inner_state,
        )
        # float32's largest value stands for any threshold beyond its range: no ∞ from finite norms.
        threshold = jnp.exp(jnp.minimum(log_threshold, _LARGEST_LOG))
        record = clip_stats(
            norm=norm.astype(jnp.float32),
            threshold=jnp.where(ready, threshold, norm).astype(jnp.float32),
            scale=jnp.where(skip, 0.0, 1.0).astype(jnp.float32),
            clipped=skip,
        )
        new_state = SkipSpikesState(
            inner_state=inner_state,
            log_norm=_running.update_moments(moments, log_norm, observe, decay),
            loss=(
                state.loss
                if loss is None
                else _running.update_moments(
                    state.loss, _running.within_reach(state.loss, loss), observe_loss, decay
                )
            ),
            grad_norm=GradNormRecord(stats=replacing(state.grad_norm.stats, record)),
            stats=_guard_stats(state.stats, skip),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
