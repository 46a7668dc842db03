"""Type checks of the workload's settings, each returning the plain Python value JSON records.

A setting may come from Python code (NumPy scalars included), from the
command line, or from a run's ``config.json``; each check refuses a value of
the wrong type with a ``ValueError`` naming the setting, and turns an
accepted one into the built-in type, so that the settings write to JSON and
read back unchanged.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def integer(name: str, value: Any) -> int:
    """``value`` as an ``int``: a Python or NumPy integer, not a bool or a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    return int(value)


def real(name: str, value: Any) -> float:
    """``value`` as a ``float`` (an int past float's range as ±∞, for the range check to refuse)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]  # an Integral past float range


def flag(name: str, value: Any) -> bool:
    """``value`` as a ``bool``: ``True`` or ``False`` (a NumPy bool too), not ``"no"`` or ``0``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """``value``, a string among ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def path(name: str, value: Any) -> str:
    """``value`` as a ``str``: a string or a ``pathlib.Path``."""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name} must be a path; got {value!r}")
    return os.fspath(value)


def each(name: str, values: Any, check: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """``values``, a list or tuple, as a tuple of ``check(f"{name}[i]", value, *args)`` for each entry."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple; got {values!r}")
    return tuple(check(f"{name}[{index}]", value, *args) for index, value in enumerate(values))
