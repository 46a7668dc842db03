"""`adagc`: per-tensor clipping at thresholds that follow each tensor's own clipped norm (AdaGC)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipx import _numerics, _running, _validate
from clipx._stats import ClipStats, clip_stats, empty_clip_stats, replacing


class AdaGCState(NamedTuple):
    """State of `adagc`.

    Attributes:
      finite_steps: how many steps with a finite norm have been seen (warm-up ends
        when it reaches ``warmup_steps``).
      gamma: ``γ_i`` for each tensor, a pytree of scalars shaped like the
        parameters.
      stats: the `ClipStats` of the last step.
    """

    finite_steps: jax.Array
    gamma: _numerics.PyTree
    stats: ClipStats
    stats_name = "adagc"  # type: ignore[misc]  # a class attribute, not a field


def adagc(
    relative_threshold: float | jax.Array = 1.04,
    decay: float | jax.Array = 0.99,
    warmup_steps: int | jax.Array = 100,
    warmup_max_norm: float | jax.Array = 1.0,
    eps: float | jax.Array = 1e-6,
    *,
    axis_name: _numerics.AxisName | None = None,
) -> optax.GradientTransformation:
    r"""Clips each tensor at a multiple of the moving average of its clipped norms (AdaGC).

    Each parameter tensor ``i`` keeps its own scale ``γ_i``. After warm-up,

    .. math::

        h_i = \min\left(1, \frac{\lambda_\text{rel}\,\gamma_i}{\lVert g_i\rVert + \epsilon}\right),
        \qquad g_i \leftarrow h_i\,g_i, \qquad
        \gamma_i \leftarrow \beta\,\gamma_i + (1 - \beta)\,h_i \lVert g_i \rVert

    During the first ``warmup_steps`` steps the whole update is clipped to
    the global norm ``warmup_max_norm`` (``g ← g·min(1, c/(‖g‖ + ε))``) and
    ``γ_i`` is set to the smallest non-zero clipped norm of tensor ``i`` seen
    so far.

    A zero norm is no observation: it leaves ``γ_i`` as it is, and a tensor
    whose norms were all zero so far (``γ_i = 0``, as for a LoRA factor whose
    partner starts at zero) stays on the warm-up rule until its first non-zero
    norm. The authors' code takes zeros into the minimum, after which
    ``λ_rel·γ_i = 0`` holds the tensor at zero for the rest of the run.
    Because the clipped norm enters the average, ``γ_i`` can grow by at most
    ``(1 − β)(λ_rel − 1)`` (0.04% with the defaults) per step: AdaGC holds
    every tensor close to its recent scale.

    Defaults are the authors': ``λ_rel = 1.04``, ``β = 0.99``, ``ε = 1e-6``,
    100 warm-up steps at global norm 1.0.

    A step whose global norm is not finite changes nothing in the state (not
    ``γ``, not the warm-up count). A gradient holding NaN or ±inf gives a
    non-finite update (wrap the optimizer in `clipx.skip_nonfinite` to drop
    such steps); finite gradients whose global norm overflows (entries above
    about 1.8·10¹⁹ in float32) are scaled to zero during warm-up and clipped
    tensor by tensor after it, without entering the state.

    ``γ_i`` stays at or above the smallest normal float (``1.2e-38`` in
    float32): with ``λ_rel < 1`` it can shrink every step, and 0 would mark
    the tensor as never seen.

    The state holds one scalar per parameter tensor and must be used with the
    tree it was initialised for (a different tree raises ``ValueError``).

    Reported `ClipStats` (name ``"adagc"``): ``norm`` the global norm before
    clipping; ``threshold`` ``warmup_max_norm`` during warm-up, after it
    ``√(Σ_i (λ_rel·γ_i)²)``, the global norm an update would have with every
    tensor at its threshold; ``scale`` the fraction of tensors clipped;
    ``clipped`` whether any tensor was clipped.

    Args:
      relative_threshold: ``λ_rel > 0``, the threshold in multiples of ``γ_i``.
      decay: ``β`` in ``[0, 1)``.
      warmup_steps: the number of finite steps of global-norm clipping that
        initialise ``γ`` (``≥ 1``).
      warmup_max_norm: the global-norm threshold during warm-up (``≥ 0``).
      eps: ``ε ≥ 0``, added to the norms divided by.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis to sum squared
        norms over (as in `clipx.global_norm`).

    Returns:
      An ``optax.GradientTransformation``.

    Reference:
      Wang et al., "AdaGC: Improving Training Stability for Large Language
      Model Pretraining", 2025 (arXiv:2502.11034).

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = clipx.adagc(warmup_steps=1)
      >>> grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([1.0])}
      >>> state = tx.init(grads)
      >>> _, state = tx.update(grads, state)  # warm-up: γ = clipped norms
      >>> updates, state = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, state)
      >>> [round(float(u), 3) for u in updates["a"]]  # clipped to 1.04·γ_a = 0.465
      [0.279, 0.372]
      >>> float(clipx.stats(state)["adagc/scale"])  # one tensor of two clipped
      0.5
    """
    relative_threshold = _validate.check_finite_positive("relative_threshold", relative_threshold)
    decay = _validate.check_range("decay", decay, 0.0, 1.0, high_open=True)
    warmup_steps = _validate.check_steps("warmup_steps", warmup_steps, low=1)
    warmup_max_norm = _validate.check_nonnegative("warmup_max_norm", warmup_max_norm)
    eps = _validate.check_finite_nonnegative("eps", eps)

    def init_fn(params):
        dtype = _numerics.tree_accumulation_dtype(params)
        return AdaGCState(
            finite_steps=jnp.zeros((), jnp.int32),
            gamma=jax.tree.map(lambda _: jnp.zeros((), dtype), params),
            stats=empty_clip_stats(scale=0.0),  # the fraction of tensors clipped: none yet
        )

    def relative_to(gamma: jax.Array) -> jax.Array:
        """``λ·γ``, stopped at the largest float: a huge ``λ`` means no clipping, not a threshold of ∞."""
        product = _numerics.hyperparameter(relative_threshold, gamma.dtype) * gamma
        return _numerics.at_most_largest(product, gamma.dtype)

    @_numerics.jit_when_traced  # traced once per dtype, not once per tensor
    def tensor_step(squared_norm, gamma, warmup, finite, global_scale):
        """A tensor's scale and its new ``γ_i``, from its squared norm ``‖g_i‖²``.

        ``γ_i = 0`` means no non-zero norm seen yet: the tensor stays on the
        warm-up rule. A zero norm leaves ``γ_i`` as it is.
        """
        tensor_norm = _numerics.safe_sqrt(squared_norm)
        warm = warmup | (gamma == 0)
        dtype = gamma.dtype
        threshold = relative_to(gamma).astype(tensor_norm.dtype)
        tensor_eps = _numerics.hyperparameter(eps, tensor_norm.dtype)
        scale = jnp.where(warm, global_scale, _numerics.clip_scale(tensor_norm + tensor_eps, threshold))
        clipped = (scale * tensor_norm).astype(gamma.dtype)
        initial = jnp.where(gamma == 0, clipped, jnp.minimum(gamma, clipped))
        decay_ = _numerics.hyperparameter(decay, dtype)
        average = decay_ * gamma + (1 - decay_) * clipped
        observe = finite & (squared_norm > 0)
        # A seen tensor's γ_i never underflows to 0, which would put it back on the warm-up rule.
        seen = jnp.maximum(jnp.where(warm, initial, average), jnp.finfo(gamma.dtype).tiny)
        return scale, jnp.where(observe, seen, gamma).astype(gamma.dtype)

    @_numerics.jit_when_traced
    def count_clipped(squared_norms, gammas, warmup, global_scale):
        """How many tensors `tensor_step` clips, from the stacked ``‖g_i‖²`` and ``γ_i``.

        Counted from the stacked values, not from the scales: stacking the
        scales cost a kernel per tensor. A zero tensor is never clipped: its
        update is zero whatever its scale.
        """
        thresholds = relative_to(gammas).astype(squared_norms.dtype)
        norms = _numerics.safe_sqrt(squared_norms) + _numerics.hyperparameter(eps, squared_norms.dtype)
        above = jnp.where(warmup | (gammas == 0), global_scale < 1, norms > thresholds) & (squared_norms != 0)
        return jnp.sum(above, dtype=jnp.int32)

    def update_fn(updates, state, params=None):
        _validate.check_update(updates, state, AdaGCState)
        del params
        _validate.check_same_structure(state.gamma, updates, "clipx.adagc")
        leaves, treedef = jax.tree.flatten(updates)
        gammas = jax.tree.leaves(state.gamma)
        acc = _numerics.tree_accumulation_dtype(updates)
        squares = [q.astype(acc) for q in _numerics.leaf_squared_norms(leaves, axis_name)]

        def stacked(scalars: list[jax.Array]) -> jax.Array:
            return jnp.stack(scalars) if scalars else jnp.zeros((0,), acc)

        # Sums over tensors from stacked scalars: one kernel each, not one per tensor
        # (compile time at 1000 tensors: see benchmarks/RESULTS.md).
        stacked_squares = stacked(squares)
        norm = _numerics.safe_sqrt(jnp.sum(stacked_squares))
        finite = jnp.isfinite(norm)
        warmup = state.finite_steps < warmup_steps
        # A warm-up threshold of ∞ is the largest float: a norm that overflows is scaled to zero.
        warmup_threshold = _numerics.at_most_largest(warmup_max_norm, acc)
        global_scale = _numerics.clip_scale(norm + _numerics.hyperparameter(eps, acc), warmup_threshold)
        steps = [
            tensor_step(q, gamma, warmup, finite, global_scale)
            for q, gamma in zip(squares, gammas, strict=True)
        ]
        scales = [scale for scale, _ in steps]
        stacked_gammas = stacked(gammas)
        num_clipped = count_clipped(stacked_squares, stacked_gammas, warmup, global_scale)
        gamma_norm = _numerics.safe_sqrt(jnp.sum(jnp.square(stacked_gammas)))
        stats = clip_stats(
            norm=norm.astype(jnp.float32),
            threshold=jnp.where(
                warmup,
                warmup_threshold,
                relative_to(gamma_norm),
            ).astype(jnp.float32),
            scale=(num_clipped / max(len(leaves), 1)).astype(jnp.float32),
            clipped=num_clipped > 0,
        )
        new_state = AdaGCState(
            finite_steps=_running.count_up(state.finite_steps, finite),
            gamma=jax.tree.unflatten(jax.tree.structure(state.gamma), [gamma for _, gamma in steps]),
            stats=replacing(state.stats, stats),
        )
        scaled = [_numerics.scale_leaf(leaf, scale) for leaf, scale in zip(leaves, scales, strict=True)]
        return jax.tree.unflatten(treedef, scaled), new_state

    return optax.GradientTransformation(init_fn, update_fn)
