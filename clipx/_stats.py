"""What every clipx transform reports, `stats` to collect it for logging, `without_stats` to drop it.

A transform's state is a ``NamedTuple`` with a ``stats`` field and a class
attribute ``stats_name`` (``"global_norm"``, ``"zclip"``, ...); its update
returns the new statistics through `replacing`, so a donated state's buffers
are reused. `stats` walks any optimizer state — through ``optax.chain``,
``named_chain``, ``masked``, ``multi_transform``, ``inject_hyperparams``,
``MultiSteps`` and clipx's guards — and returns every such record as a flat
``{"name/field": array}`` dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax

from clipx import _numerics, _validate


class ClipStats(NamedTuple):
    """What a clipping transform did at its last step (all scalars).

    Attributes:
      norm: the measured norm before clipping (accumulated in float32 or
        wider, reported in float32, as are ``threshold`` and ``scale``).
        Global rules report the global norm; most per-tensor or per-unit
        rules report the largest per-tensor (per-unit) quantity compared
        with the threshold (`adagc` the global norm,
        ``autoclip(per_tensor=True)`` the leaf furthest above its
        threshold: see each rule's Returns).
      threshold: the threshold used this step (float32: under x64 a float64
        threshold below float32's range reads 0).
      scale: the factor applied to the whole update (global rules) or the
        fraction of entries/tensors/units/examples that were clipped (rules
        that clip them apart).
      clipped: whether anything was clipped this step (a bool).
    """

    norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array


class GuardStats(NamedTuple):
    """What a step guard did (all scalars).

    Attributes:
      skipped: whether the last step was skipped.
      consecutive: how many steps in a row have been skipped.
      total: how many steps have been skipped since ``init``.
    """

    skipped: jax.Array
    consecutive: jax.Array
    total: jax.Array


Stats = TypeVar("Stats", ClipStats, GuardStats)


def empty_clip_stats(scale: float = 1.0) -> ClipStats:
    """The `ClipStats` a transform holds before its first step.

    ``scale`` is 1 for rules that report a factor and 0 for rules that report
    a fraction of units clipped. Every field is its own buffer, so the state
    can be donated to a jitted step.
    """
    return ClipStats(
        norm=jnp.zeros((), jnp.float32),
        threshold=jnp.zeros((), jnp.float32),
        scale=jnp.full((), scale, jnp.float32),
        clipped=jnp.array(False),
    )


def clip_stats(norm: Any, threshold: Any, scale: Any, clipped: Any) -> ClipStats:
    """A `ClipStats` in the types every transform reports: float32 scalars and a bool.

    The same types at ``init`` and after every step, with or without x64, so
    states keep one structure under ``lax.cond``/``scan`` (``MultiSteps``,
    the guards) and loggers see one dtype.
    """
    return ClipStats(
        norm=jnp.asarray(norm, jnp.float32),
        threshold=_numerics.as_dtype(threshold, jnp.float32),
        scale=jnp.asarray(scale, jnp.float32),
        clipped=jnp.asarray(clipped, bool),
    )


def global_clip_stats(norm: Any, threshold: Any, scale: jax.Array) -> ClipStats:
    """The `ClipStats` of a rule that scales the whole update by ``scale``."""
    return clip_stats(norm, threshold, scale, scale < 1)


@_numerics.jit_when_traced  # one traced call for all fields
def replacing(previous: Stats, new: Stats) -> Stats:
    """``new``, marked as taking the place of ``previous`` (the same values, bit for bit).

    Statistics are written at every step and never read, so in a jitted step
    whose optimizer state is donated the previous ones would be unused
    inputs: JAX drops those from the compiled step, and the new statistics
    are written to freshly allocated buffers instead of the donated ones. On
    an NVIDIA H200, with 20M parameters in 50 leaves, that made a clipped
    Adam step cost 1.29–1.33× plain Adam's instead of 1.05–1.08× (``agc``
    2.07× instead of 1.71×; benchmarks/RESULTS.md). Selecting ``new`` over
    ``previous`` with a constant ``False`` keeps ``previous`` an input, so
    its buffer is reused; XLA folds the select away.
    """
    return jax.tree.map(lambda old, x: jnp.where(False, old, x), previous, new)


def empty_guard_stats() -> GuardStats:
    """The `GuardStats` a guard holds before its first step."""
    return GuardStats(
        skipped=jnp.array(False), consecutive=jnp.zeros((), jnp.int32), total=jnp.zeros((), jnp.int32)
    )


_STATS_TYPES = (ClipStats, GuardStats)


class WithoutStatsState(NamedTuple):
    """State of `without_stats`: the inner state, its `ClipStats` frozen at their ``init`` values."""

    inner_state: Any
    fields_like_params = ("inner_state",)  # type: ignore[misc]  # sharded like the parameters (`state_shardings`)


def _is_clip_stats(node: Any) -> bool:
    return isinstance(node, ClipStats)


def without_stats(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""``inner`` without the cost of its clip statistics.

    Each step, every `ClipStats` that ``inner`` computes is dropped and the one
    ``init`` made is kept, so XLA removes the work that only fed the
    statistics, and `stats` leaves them out. The updates are unchanged, bit
    for bit. `GuardStats` (the guards' step counters) are kept and reported.

    What it saves depends on the rule: ``clipx.value`` reads every gradient
    once more for its statistics (the largest entry, the number clipped), so
    without them its step costs what ``optax.clip``'s does; ``clipx.agc``
    loses its ratio statistics and their reductions, which XLA compiles
    slowly; the norm rules (``global_norm``, the adaptive clippers) need
    their norm to clip and save almost nothing.

    Args:
      inner: any transformation (a clipx clipper, a chain holding several).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with the updates of
      ``inner``; extra keyword arguments of ``update`` (``loss=`` for
      `skip_spikes`) are passed on to it.

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = optax.chain(clipx.without_stats(clipx.value(1.0)), optax.sgd(0.1))
      >>> params = jnp.zeros(2)
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(params))
      >>> [round(float(u), 4) for u in updates], clipx.stats(state)
      ([-0.1, 0.05], {})
    """
    _validate.check_transformation("inner", inner)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return WithoutStatsState(inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_state(state, WithoutStatsState)
        updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        kept = jax.tree.map(
            lambda new, old: old if _is_clip_stats(new) else new,
            new_inner,
            state.inner_state,
            is_leaf=_is_clip_stats,
        )
        return updates, WithoutStatsState(inner_state=kept)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


# Kinds of path segments: a name (a dict key, a clipx state's name), a position in a
# sequence, a NamedTuple field of a wrapper (``inner_state``, ``opt_state``).
_NAME, _INDEX, _FIELD = "name", "index", "field"


def _check_not_bare_record(node: Mapping, path: tuple[tuple[str, str], ...]) -> None:
    """Raises ``TypeError`` if ``node`` is a reporting state turned into a dict.

    A state flattened to dicts (``nnx.state(optimizer)``, ``nnx.to_pure_dict``)
    or restored without its target (``flax.serialization.msgpack_restore``,
    Orbax without a target) holds a clipx state as ``{"stats": {"norm": ...}, ...}``:
    the values are there, but the state's type, which holds its name, is lost.
    """
    record = node.get("stats")
    fields = {tuple(sorted(kind._fields)) for kind in _STATS_TYPES}
    if isinstance(record, Mapping) and tuple(sorted(map(str, record))) in fields:
        where = "/".join(segment for segment, _ in path) or "the top level"
        raise TypeError(
            f"clipx.stats: the state holds statistics as plain dicts at {where!r}, as a state "
            "flattened to dicts (nnx.state, nnx.to_pure_dict) or a checkpoint restored without its "
            "target does; the name of the transform that wrote them is lost with its type. Pass "
            "the optimizer state itself (with Flax NNX, optimizer.opt_state), or restore the "
            "checkpoint with tx.init(params) as its target (Orbax: restore(path, target); "
            "flax.serialization: from_bytes(target, data), or from_state_dict(target, restored))."
        )


def _collect(node: Any, path: tuple[tuple[str, str], ...], found: list, clip_stats: bool = True) -> None:
    """Appends ``(path, name, stats)`` for every reporting state below ``node``.

    ``path`` holds ``(segment, kind)`` pairs: dict keys are `_NAME` segments,
    positions in a tuple or list `_INDEX` segments, NamedTuple fields `_FIELD`
    segments. Below a `without_stats` state (``clip_stats=False``) only
    `GuardStats` are reported.
    """
    if isinstance(node, WithoutStatsState):
        _collect(node.inner_state, path, found, clip_stats=False)
    elif _is_namedtuple(node):
        name = getattr(type(node), "stats_name", None)
        record = getattr(node, "stats", None)
        if name is not None and isinstance(record, _STATS_TYPES):
            if clip_stats or not isinstance(record, ClipStats):
                found.append((path, name, record))
            path = (*path, (name, _NAME))
        for field, child in zip(node._fields, node, strict=True):
            if not (name is not None and field == "stats"):
                _collect(child, (*path, (field, _FIELD)), found, clip_stats)
    elif isinstance(node, (tuple, list)):
        for i, child in enumerate(node):
            _collect(child, (*path, (str(i), _INDEX)), found, clip_stats)
    elif isinstance(node, Mapping):
        _check_not_bare_record(node, path)
        for key, child in node.items():
            _collect(child, (*path, (str(key), _NAME)), found, clip_stats)
    elif node is not None and not isinstance(node, (int, float, bool)) and not hasattr(node, "shape"):
        # Any other pytree node (a registered dataclass, say): walk its children.
        children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
        if len(children) != 1 or children[0] is not node:
            for i, child in enumerate(children):
                _collect(child, (*path, (str(i), _INDEX)), found, clip_stats)


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """Collects the statistics of every clipx transform inside ``opt_state``.

    Keys are ``"<name>/<field>"``, prefixed by the names of enclosing
    ``named_chain`` / ``multi_transform`` entries (``"clip/global_norm/norm"``).
    Positions in an ``optax.chain`` are left out unless two transforms would
    otherwise share a key, and then written in brackets (``"[0]/global_norm/norm"``,
    ``"[2]/global_norm/norm"``), so that keys stay stable and readable and a
    position never reads like an entry's name (a ``multi_transform`` label
    ``0`` is ``"0/global_norm/norm"``). Where even positions leave two alike
    (one NamedTuple holding two optimizer states, as ``optax.contrib.sam``
    does), the wrappers' field names are written too
    (``"opt_state/[0]/global_norm/norm"``). Every
    transform gets its own keys. Values are the JAX scalars held in the
    state: no host transfer happens until the caller converts them.

    Raises:
      ValueError: if two records still share a key (dict keys such as ``1``
        and ``"1"`` side by side).
      TypeError: if ``opt_state`` is the transformation, not its state, or if
        a transform's state is held as plain dicts (flattened by
        ``nnx.state``, or a checkpoint restored without its target), whose
        statistics have no name.

    Example:
      >>> import jax.numpy as jnp, optax, clipx
      >>> tx = optax.chain(clipx.global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.ones(4)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.full(4, 2.0)}, state, params)
      >>> for key, value in clipx.stats(state).items():
      ...     print(key, float(value))
      global_norm/norm 4.0
      global_norm/threshold 1.0
      global_norm/scale 0.25
      global_norm/clipped 1.0
    """
    if isinstance(opt_state, optax.GradientTransformation):
        raise TypeError(
            "clipx.stats takes the optimizer state (tx.init(params), as updated by tx.update), "
            "not the transformation"
        )
    found: list = []
    _collect(opt_state, (), found)

    def key(path, name, level):
        """Level 0 writes names only; 1 adds positions, as ``[0]``; 2 adds fields."""
        written = {_NAME: True, _INDEX: level >= 1, _FIELD: level == 2}
        segments = [f"[{seg}]" if kind == _INDEX else seg for seg, kind in path if written[kind]]
        return "/".join([*segments, name])

    # Each record starts at level 0; records sharing a key move up a level until none do.
    levels = [0] * len(found)
    while True:
        prefixes = [key(p, n, level) for (p, n, _), level in zip(found, levels, strict=True)]
        shared = [i for i, prefix in enumerate(prefixes) if prefixes.count(prefix) > 1]
        if not shared:
            break
        if all(levels[i] == 2 for i in shared):
            raise ValueError(
                f"clipx.stats: two transforms' statistics would share the key {prefixes[shared[0]]!r}"
            )
        for i in shared:
            levels[i] = min(levels[i] + 1, 2)
    out: dict[str, jax.Array] = {}
    for prefix, (_, _, record) in zip(prefixes, found, strict=True):
        for field, value in zip(record._fields, record, strict=True):
            out[f"{prefix}/{field}"] = value
    return out
