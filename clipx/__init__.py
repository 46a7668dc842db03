"""clipx: gradient clipping for JAX as composable Optax transformations."""

from clipx._stats import ClipStats, GuardStats, stats, without_stats
from clipx.adaptive_rules.adagc import adagc
from clipx.adaptive_rules.autoclip import autoclip
from clipx.adaptive_rules.quantile import quantile_clip
from clipx.adaptive_rules.recommended import adaptive
from clipx.adaptive_rules.zclip import zclip
from clipx.agc import agc, unitwise_norm
from clipx.fixed import block_rms, global_norm, tensor_norm, value
from clipx.guards import skip_nonfinite, skip_spikes
from clipx.per_example import (
    clipped_grad_sum,
    per_example_adaptive,
    per_example_global_norm,
    per_example_layer_norm,
)
from clipx.sharding import state_shardings

__version__ = "0.1.0"

__all__ = [
    "ClipStats",
    "GuardStats",
    "adagc",
    "adaptive",
    "agc",
    "autoclip",
    "block_rms",
    "clipped_grad_sum",
    "global_norm",
    "per_example_adaptive",
    "per_example_global_norm",
    "per_example_layer_norm",
    "quantile_clip",
    "skip_nonfinite",
    "skip_spikes",
    "state_shardings",
    "stats",
    "tensor_norm",
    "unitwise_norm",
    "value",
    "without_stats",
    "zclip",
]
