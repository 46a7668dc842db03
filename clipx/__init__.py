"""clipx: gradient clipping for JAX as composable Optax transformations."""

from clipx._stats import ClipStats, GuardStats, stats
from clipx.fixed import global_norm

__version__ = "0.1.0"

__all__ = [
    "ClipStats",
    "GuardStats",
    "global_norm",
    "stats",
]
