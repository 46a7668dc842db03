"""Float64 NumPy oracles for AdaGC and online quantile clipping, written from the papers' descriptions.

Each oracle takes a sequence of gradient steps (a list of NumPy leaves per
step) and returns, per step, the clipped leaves (``None`` for a step with a
non-finite norm, which changes no statistic) and the statistics after it.
"""

from __future__ import annotations

import math

import numpy as np


def _norm(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(np.square(x.astype(np.float64)))))


def adagc(steps, relative_threshold=1.04, decay=0.99, warmup_steps=100, warmup_max_norm=1.0, eps=1e-6):
    """AdaGC (Wang et al., 2025): per-tensor EMA thresholds after a global-norm warm-up.

    Warm-up (the first ``warmup_steps`` finite steps): ``h = min(1, c/(‖g‖ + ε))``
    for every tensor, and ``γ_i`` is the smallest non-zero clipped norm ``h‖g_i‖``
    seen. After: ``h_i = min(1, λ γ_i / (‖g_i‖ + ε))``, ``γ_i ← β γ_i + (1 − β) h_i ‖g_i‖``.
    A tensor whose norm is 0 leaves its ``γ_i`` as it is, and one with ``γ_i = 0``
    (no non-zero norm yet) stays on the warm-up rule.

    Returns a list of ``(clipped_leaves or None, gamma list)``.
    """
    gamma = [0.0] * len(steps[0]) if steps else []
    seen = 0
    out = []
    for leaves in steps:
        norms = [_norm(g) for g in leaves]
        total = math.sqrt(sum(n * n for n in norms))
        if not math.isfinite(total):
            out.append((None, list(gamma)))
            continue
        h_global = min(1.0, warmup_max_norm / (total + eps))
        scales = []
        for i, n in enumerate(norms):
            if seen < warmup_steps or gamma[i] == 0:
                scales.append(h_global)
                if n > 0:
                    gamma[i] = h_global * n if gamma[i] == 0 else min(gamma[i], h_global * n)
            else:
                scales.append(min(1.0, relative_threshold * gamma[i] / (n + eps)))
                if n > 0:
                    gamma[i] = decay * gamma[i] + (1 - decay) * scales[i] * n
        seen += 1
        out.append(([h * g.astype(np.float64) for h, g in zip(scales, leaves, strict=False)], list(gamma)))
    return out


def quantile_clip(steps, target_quantile=0.5, learning_rate=0.2, initial_threshold=0.1):
    """Online quantile tracking (Andrew et al., 2021), one norm per step.

    Clip to the current ``C``; ``b = 1`` if ``‖g‖ ≤ C`` else 0; then
    ``C ← C exp(−η (b − γ))``. A non-finite or zero norm leaves ``C`` as it is.

    Returns a list of ``(clipped_leaves or None, threshold used, threshold after)``.
    """
    threshold = float(initial_threshold)
    out = []
    for leaves in steps:
        total = math.sqrt(sum(_norm(g) ** 2 for g in leaves))
        used = threshold
        if not math.isfinite(total):
            out.append((None, used, threshold))
            continue
        scale = 1.0 if total <= threshold else threshold / total
        below = 1.0 if total <= threshold else 0.0
        if total > 0:
            threshold = threshold * math.exp(-learning_rate * (below - target_quantile))
        out.append(([scale * g.astype(np.float64) for g in leaves], used, threshold))
    return out


SHAPES = ((3, 4), (4,), ())


def random_steps(seed: int, num_steps: int, shapes=SHAPES, dtype=np.float32):
    """Gradient steps with log-normal norms and injected spikes (×1000), zeros, NaN and inf.

    Every 17th step is a spike, every 23rd has one all-zero leaf, every 31st is
    all zeros, every 41st holds a NaN and every 53rd an inf (step 0 is plain).
    """
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(num_steps):
        scale = float(np.exp(rng.normal(0.0, 0.5)))
        leaves = [(scale * rng.normal(size=s)).astype(dtype) for s in shapes]
        if t and t % 17 == 0:
            leaves = [(1000 * g).astype(dtype) for g in leaves]
        if t and t % 23 == 0:
            leaves[t % len(leaves)] = np.zeros(shapes[t % len(leaves)], dtype)
        if t and t % 31 == 0:
            leaves = [np.zeros(s, dtype) for s in shapes]
        if t and t % 41 == 0:
            leaves[0] = leaves[0].copy()
            leaves[0].flat[0] = np.nan
        if t and t % 53 == 0:
            leaves[1] = leaves[1].copy()
            leaves[1].flat[0] = np.inf
        steps.append(leaves)
    return steps
