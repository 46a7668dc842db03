"""Clippers whose threshold adapts to running statistics of the gradients.

The package is named ``adaptive_rules`` so that ``clipx.adaptive`` is always
the recommended clipper function, never a module.

One module per rule:

* `adaptive` (``recommended.py``): the recommended default, a global-norm
  clip at ``exp(μ + k·σ)`` of the log-norm statistics, no threshold to tune;
* `autoclip`: a quantile of a window of past norms (Seetharaman et al., 2020);
* `zclip`: a z-score test against EMA statistics of the norm (Kumar et al., 2025);
* `adagc`: per-tensor thresholds from each tensor's EMA norm (Wang et al., 2025);
* `quantile_clip`: an O(1)-state online quantile estimate (Andrew et al., 2021).

Every rule keeps non-finite norms out of its statistics.
"""

from clipx.adaptive_rules.adagc import adagc
from clipx.adaptive_rules.autoclip import autoclip
from clipx.adaptive_rules.quantile import quantile_clip
from clipx.adaptive_rules.recommended import adaptive
from clipx.adaptive_rules.zclip import zclip

__all__ = ["adagc", "adaptive", "autoclip", "quantile_clip", "zclip"]
