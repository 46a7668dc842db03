"""Shardings for optimizer states, derived from the shardings of the parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from clipx import _sketch

PyTree = Any

# What `_mirror` returns for a node that does not mirror the parameters (None cannot say it:
# a None parameter is mirrored by a None node).
_NOT_MIRRORED = object()


def _is_clipx_state(node: Any) -> bool:
    """Whether ``node`` is one of clipx's state NamedTuples."""
    return isinstance(node, tuple) and hasattr(node, "_fields") and type(node).__module__.startswith("clipx.")


def _is_clipx_factory(tx: Any) -> bool:
    """Whether ``tx`` is one of clipx's public functions (a factory, not an init function)."""
    import clipx  # the package, loaded by now: this module is one of its parts

    return any(tx is getattr(clipx, name) for name in clipx.__all__)


def _replicated_like(example: Any) -> Any:
    if isinstance(example, NamedSharding):
        return NamedSharding(example.mesh, PartitionSpec())
    if isinstance(example, PartitionSpec):
        return PartitionSpec()
    raise TypeError(
        "state_shardings: pass replicated= explicitly; it can be derived only from NamedSharding or "
        f"PartitionSpec leaves, got {type(example).__name__}"
    )


def _one_per_leaf(params: PyTree, param_shardings: PyTree) -> PyTree:
    """``param_shardings`` with a sharding for each leaf of ``params`` (a prefix, as jit takes, spread)."""

    def is_sharding(node: Any) -> bool:
        return node is None or isinstance(node, (jax.sharding.Sharding, PartitionSpec))

    try:
        return jax.tree.map(
            lambda sharding, subtree: jax.tree.map(lambda _: sharding, subtree),
            param_shardings,
            params,
            is_leaf=is_sharding,
        )
    except ValueError as error:
        raise ValueError(
            "state_shardings: param_shardings must be a tree like params, or a prefix of it, with a "
            f"sharding or partition spec at each of its leaves ({error})"
        ) from None


def state_shardings(
    tx: Any,
    params: PyTree,
    param_shardings: PyTree,
    *,
    replicated: Any = None,
) -> PyTree:
    """The sharding of every leaf of ``tx.init(params)``: like its parameter, or replicated.

    A leaf of the optimizer state that *mirrors* a parameter — it sits in a
    subtree with the structure of ``params`` and has that parameter's shape,
    as Adam's moments do — gets that parameter's sharding; subtrees that
    ``optax.masked`` or ``optax.multi_transform`` mask out
    (``optax.MaskedNode``) count as mirroring. With ``optax.LookaheadParams``
    (``optax.lookahead``), whose inner optimizer sees the fast parameters
    only, a subtree with the structure of ``params.fast`` mirrors them too. A
    state built on some other part of the parameters is not recognised: give
    its shardings yourself. Every other leaf
    is replicated, and so is every leaf of a clipx state (its statistics:
    global scalars, per-tensor scalars, norm histories, step counters, PRNG
    keys), whatever its shape, except in the fields its type names in
    ``fields_like_params`` (the ``inner_state`` of a guard or of
    `without_stats`), which follow these rules in turn, and in
    ``fields_like_sketches`` (`adaptive`'s kept gradient), where a large
    leaf's sketch — a vector along the parameter's longest axis — is sharded
    like that axis. The statistics are small, and every device needs them to scale
    its own shard; a norm history that happened to have a parameter's shape
    must not be split. Nothing is computed: the state's shapes come from
    ``jax.eval_shape``.

    Works for ``jax.jit`` (``NamedSharding`` leaves; ``replicated`` defaults to
    ``NamedSharding(mesh, PartitionSpec())`` on the first leaf's mesh) and for
    ``jax.shard_map`` specs (``PartitionSpec`` leaves; ``replicated`` defaults
    to ``PartitionSpec()``).

    Args:
      tx: an optax transformation (anything with ``init``) or an init function.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      param_shardings: a tree like ``params`` of shardings or partition
        specs, or a prefix of it (one for a whole subtree), as ``jax.jit``
        takes.
      replicated: what non-mirroring leaves get; derived from
        ``param_shardings`` when ``None``.

    Returns:
      A tree with the structure of ``tx.init(params)``, ready for
      ``jax.jit(..., in_shardings=..., out_shardings=...)`` or
      ``jax.device_put(state, ...)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, clipx
      >>> from jax.sharding import PartitionSpec as P
      >>> tx = optax.chain(clipx.global_norm(1.0), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros((8, 4))}
      >>> specs = clipx.state_shardings(tx, params, {"w": P("data", None)})
      >>> specs[1][0].mu, specs[0].stats.norm
      ({'w': P('data', None)}, P())
    """
    if _is_clipx_factory(tx):
        raise TypeError(
            f"state_shardings: pass a transformation, as clipx.{tx.__name__}(...) returns, "
            f"not the factory clipx.{tx.__name__}"
        )
    init: Callable[[PyTree], PyTree] = getattr(tx, "init", tx)
    state = jax.eval_shape(init, params)
    params = jax.eval_shape(lambda tree: tree, params)  # shapes, for Python numbers among the leaves too
    param_shardings = _one_per_leaf(params, param_shardings)
    if replicated is None:
        sharding_leaves = jax.tree.structure(params).flatten_up_to(param_shardings)  # type: ignore[attr-defined]
        if not sharding_leaves:
            raise ValueError("state_shardings: params is empty; pass replicated= explicitly")
        replicated = _replicated_like(sharding_leaves[0])
    has_params = bool(jax.tree.leaves(params))

    def assign_tree(tree: PyTree, sketches: bool = False) -> PyTree:
        def mirror(node: Any) -> Any:
            if not has_params:
                return _NOT_MIRRORED
            mirrored = _mirror(node, params, param_shardings, replicated, sketches)
            if mirrored is _NOT_MIRRORED and isinstance(params, optax.LookaheadParams):
                mirrored = _mirror(node, params.fast, param_shardings.fast, replicated, sketches)
            return mirrored

        def assign(node: Any) -> Any:
            if _is_clipx_state(node):
                return type(node)(
                    *(assign_field(node, f, v) for f, v in zip(node._fields, node, strict=True))
                )
            mirrored = mirror(node)
            return replicated if mirrored is _NOT_MIRRORED else mirrored

        return jax.tree.map(
            assign, tree, is_leaf=lambda node: _is_clipx_state(node) or mirror(node) is not _NOT_MIRRORED
        )

    def assign_field(node: Any, field: str, value: Any) -> Any:
        if field in getattr(node, "fields_like_sketches", ()):
            return assign_tree(value, sketches=True)
        if field in getattr(node, "fields_like_params", ()):
            return assign_tree(value)
        return jax.tree.map(lambda _: replicated, value)

    return assign_tree(state)


def _children(tree: Any) -> tuple[list, Any]:
    """The children of ``tree``'s top node and that node's structure (an array is its own child)."""
    return jax.tree.flatten(tree, is_leaf=lambda x: x is not tree)


def _mirror(node: Any, param: Any, sharding: Any, replicated: Any, sketches: bool) -> Any:
    """The shardings of ``node`` if it mirrors the parameter subtree ``param``, else `_NOT_MIRRORED`.

    ``node`` mirrors ``param`` if it has its structure, where an
    ``optax.MaskedNode`` stands for any masked-out subtree (``optax.masked``,
    ``optax.multi_transform``). A mirroring array gets its parameter's
    sharding if it has the parameter's shape; with ``sketches``, one of the
    shape of the parameter's sketch gets that of its longest axis; any other
    gets ``replicated``.
    """
    if isinstance(node, optax.MaskedNode):
        return node
    if hasattr(param, "shape"):
        if not hasattr(node, "shape"):
            return _NOT_MIRRORED
        if node.shape == param.shape:
            return sharding
        if sketches and node.shape == _sketch.sketch_shape(param.shape):
            return _along_longest_axis(sharding, param.shape, replicated)
        return replicated
    node_children, node_def = _children(node)
    param_children, param_def = _children(param)
    if node_def != param_def:
        return _NOT_MIRRORED
    sharding_children = param_def.flatten_up_to(sharding)
    mirrored = [
        _mirror(n, p, s, replicated, sketches)
        for n, p, s in zip(node_children, param_children, sharding_children, strict=True)
    ]
    return _NOT_MIRRORED if any(m is _NOT_MIRRORED for m in mirrored) else node_def.unflatten(mirrored)


def _along_longest_axis(sharding: Any, shape: tuple[int, ...], replicated: Any) -> Any:
    """The sharding of a vector along the longest axis of an array of ``shape`` sharded by ``sharding``.

    A sketch sums over every other axis, so with FSDP along the longest axis it
    stays where its entries were computed. Shardings other than
    ``NamedSharding`` and ``PartitionSpec`` give ``replicated``.
    """
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    if not isinstance(spec, PartitionSpec):
        return replicated
    longest = shape.index(max(shape))
    vector = PartitionSpec(spec[longest] if longest < len(spec) else None)
    return NamedSharding(sharding.mesh, vector) if isinstance(sharding, NamedSharding) else vector
