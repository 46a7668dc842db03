"""Sums over the devices of a mapped axis, with each leaf counted once.

Inside ``shard_map``, a transform built with ``axis_name`` holds either a part
of each leaf (the leaf split over the axis) or all of it (replicated: a bias
kept whole, an AGC unit that must not be split). ``psum`` adds one value per
device, so a sum taken over a replicated leaf would be counted once per
device. ``shard_map``'s ``check_vma`` (on by default) types every array with
the mapped axes it varies over. Values of leaves that vary over none of
``axis_name``'s axes are therefore added once, and the others are summed
over the axes they vary over. "Whole" is the type, not the values: an input
with ``P()``, a ``psum``/``pmean`` result, the gradient of a replicated
parameter; an ``all_gather`` result is typed as varying and counts as a part.

Under ``pmap`` or ``shard_map(check_vma=False)`` JAX does not track this.
There every leaf counts as a part, and a replicated leaf is counted once per
device (docs/scale.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

AxisName = Any  # a hashable axis name, or a tuple of them, as jax.lax.psum takes


def _varying_axes(x: Any) -> frozenset:
    """The mapped axes ``x`` varies over, as ``check_vma`` types it (empty where untracked)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier releases name it `vma`
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def varying_like(x: Any, like: Any) -> Any:
    """``x``, typed as varying over every mapped axis ``like`` varies over too.

    The branches of a `jax.lax.cond` under ``shard_map`` must agree on these
    types; where JAX does not track them, ``x`` is returned as it is.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(x), key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def parts(arrays: Sequence[Any], axis_name: AxisName) -> list[tuple[tuple, list[int]]]:
    """The indices of ``arrays``, grouped by the names of ``axis_name`` each is split over.

    Where JAX does not track varying axes (``pmap``, ``check_vma=False``: a
    device's own index is not typed as varying), all count as split over all
    of it: one group.
    """
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if all(n in _varying_axes(jax.lax.axis_index(n)) for n in names):
        split = [tuple(n for n in names if n in _varying_axes(x)) for x in arrays]
    else:
        split = [names] * len(arrays)
    groups: dict[tuple, list[int]] = {}
    for i, axes in enumerate(split):
        groups.setdefault(axes, []).append(i)
    return list(groups.items())


def _psum(x: Any, axes: tuple) -> Any:
    return jax.lax.psum(x, axes) if axes else x


def _groups(arrays: Sequence[Any], axis_name: AxisName | None) -> list[tuple[tuple, list[int]]]:
    """`parts`, or all arrays in one group summed over no axis when ``axis_name`` is ``None``."""
    if axis_name is None or not arrays:
        return [((), list(range(len(arrays))))]
    return parts(arrays, axis_name)


def sum_each(
    arrays: Sequence[Any], axis_name: AxisName | None, sums: Callable[[list[int]], list[Any]]
) -> list[Any]:
    """One sum per array: ``sums(indices)[k]`` sums over ``arrays[indices[k]]`` (called once per
    group, so it may combine the arrays of a group), then over the devices holding parts of it."""
    out: list[Any] = [None] * len(arrays)
    for axes, indices in _groups(arrays, axis_name):
        for i, total in zip(indices, _psum(sums(indices), axes), strict=True):
            out[i] = total
    return out


def sum_of_parts(arrays: Sequence[Any], axis_name: AxisName | None, total: Callable[[list[int]], Any]) -> Any:
    """``Σ_groups psum(total(group))``: ``total`` sums over the arrays of a group of indices
    (a pytree of sums), which is then summed over the devices holding parts of them.

    Without ``axis_name``, ``total`` of all the arrays (of none, for no array).
    """
    sums = [_psum(total(indices), axes) for axes, indices in _groups(arrays, axis_name)]
    return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), sums)
