"""clipx: gradient clipping for JAX as composable Optax transformations."""

from clipx._stats import ClipStats, GuardStats, stats
from clipx.agc import agc, unitwise_norm
from clipx.fixed import block_rms, global_norm, tensor_norm, value

__version__ = "0.1.0"

__all__ = [
    "ClipStats",
    "GuardStats",
    "agc",
    "block_rms",
    "global_norm",
    "stats",
    "tensor_norm",
    "unitwise_norm",
    "value",
]
