"""Float64 NumPy references for AutoClip, ZClip and clipx.adaptive, one step at a time.

Written from the papers' descriptions (and the authors' packages' documented
behaviour, see docs METHODS), independently of clipx: plain Python lists for
histories, ``numpy.quantile`` for quantiles, ``if`` statements for decisions.
Each ``step`` takes the gradient leaves of one step and returns the clipped
leaves and the `ClipStats` fields clipx documents for that step.
`run_transform` runs the clipx side over the same sequence in one jitted scan.
"""

from __future__ import annotations

import math

import jax
import numpy as np

import clipx

__all__ = [
    "AdaptiveOracle",
    "AutoClipOracle",
    "ZClipOracle",
    "assert_matches",
    "assert_steps_match",
    "gradient_sequence",
    "norm_of",
    "run_oracle",
    "run_transform",
    "sketch_of",
]


def norm_of(leaves: list[np.ndarray]) -> float:
    """The global L2 norm of a list of arrays, in float64."""
    return math.sqrt(sum(float(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2)) for x in leaves))


def _clip(leaves: list[np.ndarray], norm: float, threshold: float) -> tuple[list[np.ndarray], float]:
    """Scales the leaves by ``threshold / norm`` when ``norm > threshold``; returns them and the factor."""
    scale = threshold / norm if norm > threshold else 1.0
    with np.errstate(invalid="ignore"):
        return [np.asarray(x, np.float64) * scale for x in leaves], scale


class AutoClipOracle:
    """AutoClip: clip to the q-quantile of the previous min(t, history) finite norms (none yet: the norm)."""

    def __init__(self, quantile: float = 0.9, history: int = 1000, per_tensor: bool = False):
        self.quantile, self.history, self.per_tensor = quantile, history, per_tensor
        self.past: list[list[float]] | None = None

    def step(self, leaves: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, float]]:
        groups = [[x] for x in leaves] if self.per_tensor else [list(leaves)]
        if self.past is None:
            self.past = [[] for _ in groups]
        out, norms, thresholds, scales = [], [], [], []
        for group, past in zip(groups, self.past, strict=True):
            norm = norm_of(group)
            recent = past[-self.history :]
            threshold = float(np.quantile(np.array(recent), self.quantile)) if recent else norm
            clipped, scale = _clip(group, norm, threshold)
            if math.isfinite(norm):
                past.append(norm)
            out += clipped
            norms.append(norm)
            thresholds.append(threshold)
            scales.append(scale)
        if not self.per_tensor:
            return out, {
                "norm": norms[0],
                "threshold": thresholds[0],
                "scale": scales[0],
                "clipped": scales[0] < 1,
            }
        # Per tensor: the leaf with the largest norm/threshold ratio, and the fraction clipped.
        ratios = []
        for n, t in zip(norms, thresholds, strict=True):
            if t > 0:
                ratios.append(n / t)
            else:
                ratios.append(math.inf if n > 0 else 0.0)
        worst = int(np.argmax(ratios))
        fraction = sum(s < 1 for s in scales) / len(scales)
        stats = {
            "norm": norms[worst],
            "threshold": thresholds[worst],
            "scale": fraction,
            "clipped": fraction > 0,
        }
        return out, stats


class ZClipOracle:
    """ZClip as the authors' reference steps it (warm-up buffer, then EMA z-score)."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_norm: float | None = 1.0,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
    ):
        self.alpha, self.z_thresh, self.max_norm = alpha, z_thresh, max_norm
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip, self.eps = clip_factor, skip_update_on_spike, eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def step(self, leaves: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, float]]:
        norm = norm_of(leaves)
        # With no cap a step is clipped to its own norm (not at all), and that is what is reported;
        # clipx caps it at the largest float32, so that an infinite norm is scaled to zero (the
        # authors' package passes such a step as it is: non-finite either way).
        cap = min(norm, float(np.finfo(np.float32).max)) if self.max_norm is None else self.max_norm

        def capped(threshold: float) -> float:
            return threshold if self.max_norm is None else min(threshold, self.max_norm)

        if self.mean is None or self.var is None:  # warm-up
            if math.isfinite(norm):
                self.buffer.append(norm)
                if len(self.buffer) == self.warmup_steps:
                    self.mean = sum(self.buffer) / len(self.buffer)
                    self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            clipped, scale = _clip(leaves, norm, cap)
            return clipped, {"norm": norm, "threshold": cap, "scale": scale, "clipped": scale < 1}

        std = math.sqrt(self.var)
        spike_threshold = None
        if self.mode == "percentile":
            boundary = self.mean + self.z_thresh * std
            if norm > boundary:
                spike_threshold = boundary
        else:
            boundary = self.mean + self.z_thresh * (std + self.eps)
            z = (norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    spike_threshold = (self.mean + self.z_thresh * std / eta) * self.clip_factor
                else:
                    spike_threshold = self.mean
        if spike_threshold is None:
            clip_to, reported = cap, capped(boundary)
        else:
            clip_to = reported = capped(spike_threshold)
        clipped, scale = _clip(leaves, norm, clip_to)

        if math.isfinite(norm) and not (spike_threshold is not None and self.skip):
            x = norm if spike_threshold is None else spike_threshold
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return clipped, {"norm": norm, "threshold": reported, "scale": scale, "clipped": scale < 1}


def sketch_signs(shape: tuple[int, ...]) -> np.ndarray:
    """The signs ``1 − 2·(top bit of lowbias32(i))`` of the entries of a leaf, ``i`` their flat index."""
    h = np.arange(int(np.prod(shape)), dtype=np.uint64)
    h ^= h >> 16
    h = (h * 0x7FEB352D) % 2**32
    h ^= h >> 15
    h = (h * 0x846CA68B) % 2**32
    h ^= h >> 16
    return (1 - 2 * (h >> 31).astype(np.int64)).reshape(shape)


def sketch_of(x: np.ndarray) -> np.ndarray:
    """clipx's signed sketch of one leaf (module ``clipx._sketch``), in float64, from its definition.

    Leaves of rank ≤ 1 or below 16384 entries are kept whole; otherwise the entries,
    times their `sketch_signs`, are summed over every axis but the (first) longest.
    """
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    if x.ndim <= 1 or x.size < 16384:
        return x
    longest = int(np.argmax(x.shape))
    return np.sum(x * sketch_signs(x.shape), axis=tuple(a for a in range(x.ndim) if a != longest))


class AdaptiveOracle:
    """clipx.adaptive as its docstring states it (with the direction multiplier if ``direction_rate``)."""

    def __init__(
        self,
        num_stds: float = 1.0,
        decay: float = 0.99,
        warmup_steps: int = 25,
        warmup_factor: float = 1.0,
        min_std: float = 0.1,
        direction_rate: float | None = 0.1,
        initial_multiplier: float = 0.35,
        min_multiplier: float = 1 / 32,
        jump_ratio: float | None = 6.0,
    ):
        self.num_stds, self.decay, self.min_std = num_stds, decay, min_std
        self.warmup_steps, self.warmup_factor = warmup_steps, warmup_factor
        self.rate, self.min_multiplier = direction_rate, min_multiplier
        self.jump_ratio = jump_ratio
        self.max_multiplier = 1.0
        self.logs_seen = 0
        self.mean = self.var = 0.0
        self.multiplier = 1.0 if direction_rate is None else initial_multiplier
        self.previous: list[np.ndarray] | None = None
        self.previous_norm = 0.0

    def step(self, leaves: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, float]]:
        norm = norm_of(leaves)
        usable = math.isfinite(norm) and norm > 0
        if self.logs_seen == 0:  # c = ‖g‖ (1 for a norm that is 0 or not finite)
            log_threshold = math.log(norm) if usable else 0.0
        elif self.logs_seen < self.warmup_steps:
            log_threshold = self.mean + math.log(self.warmup_factor)
        else:
            log_threshold = self.mean + self.num_stds * max(math.sqrt(self.var), self.min_std)
        threshold = math.exp(log_threshold) * self.multiplier
        if self.logs_seen == 0 and usable:
            threshold = norm * self.multiplier  # shortened by the multiplier alone (1 without one)
        clipped, scale = _clip(leaves, norm, threshold)
        if self.rate is not None:
            second_norm = usable and self.logs_seen == 1 and self.jump_ratio is not None
            if second_norm and math.log(norm) - self.mean > math.log(self.jump_ratio):
                self.max_multiplier = self.multiplier  # the second norm is over jump_ratio × the first
            sketches = [sketch_of(g) for g in leaves]
            sketch_norm = norm_of(sketches)
            cosine = 0.0
            if usable and sketch_norm > 0 and self.previous_norm > 0:
                pairs = zip(sketches, self.previous, strict=True)
                inner = sum(float(np.sum(np.real(s * np.conj(p)))) for s, p in pairs)
                cosine = min(1.0, max(-1.0, inner / (sketch_norm * self.previous_norm)))
            log_multiplier = math.log(self.multiplier) + self.rate * cosine
            ceiling = math.log(self.max_multiplier)
            self.multiplier = math.exp(min(ceiling, max(math.log(self.min_multiplier), log_multiplier)))
            if usable:
                self.previous, self.previous_norm = sketches, sketch_norm
        if usable:
            self.logs_seen += 1
            alpha = max(1 / self.logs_seen, 1 - self.decay)
            delta = min(math.log(norm), log_threshold) - self.mean
            self.mean += alpha * delta
            self.var = (1 - alpha) * (self.var + alpha * delta**2)
        return clipped, {"norm": norm, "threshold": threshold, "scale": scale, "clipped": scale < 1}


def gradient_sequence(
    seed: int,
    steps: int,
    shapes: dict[str, tuple[int, ...]],
    *,
    spike: float = 0.03,
    zero: float = 0.02,
    nonfinite: float = 0.03,
) -> dict[str, np.ndarray]:
    """Random float32 gradients, ``{name: (steps, *shape)}``, with injected trouble.

    Each step's leaves are standard normal times a log-normal step scale. With
    the given probabilities a step is a spike (every leaf ×100), all zeros, or
    has one NaN or ±Inf entry in one leaf; a single leaf is zeroed in some
    further steps (per-tensor rules then see a zero norm for it).
    """
    rng = np.random.default_rng(seed)
    names = sorted(shapes)
    out = {name: np.empty((steps, *shapes[name]), np.float32) for name in names}
    for t in range(steps):
        step_scale = math.exp(rng.normal(0.0, 0.3))
        u = rng.uniform()
        for name in names:
            out[name][t] = rng.normal(size=shapes[name]) * step_scale
        if u < spike:
            for name in names:
                out[name][t] *= 100
        elif u < spike + zero:
            for name in names:
                out[name][t] = 0
        elif u < spike + zero + nonfinite:
            name = names[rng.integers(len(names))]
            flat = out[name][t].reshape(-1)
            flat[rng.integers(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
            out[name][t] = flat.reshape(shapes[name])
        elif u < spike + zero + nonfinite + 0.02:
            out[names[rng.integers(len(names))]][t] = 0
    return out


def run_oracle(oracle, grads: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Steps ``oracle`` through ``grads`` (``{name: (steps, ...)}``, leaves in sorted name order).

    Returns the clipped updates in the same layout and each stats field as a
    ``(steps,)`` array.
    """
    names = sorted(grads)
    steps = len(grads[names[0]])
    updates = {name: np.empty(grads[name].shape, np.float64) for name in names}
    stats: dict[str, list] = {}
    for t in range(steps):
        clipped, record = oracle.step([grads[name][t] for name in names])
        for name, leaf in zip(names, clipped, strict=True):
            updates[name][t] = leaf
        for key, value in record.items():
            stats.setdefault(key, []).append(value)
    return updates, {key: np.asarray(values) for key, values in stats.items()}


def assert_matches(
    actual_updates, actual_stats, expected_updates, expected_stats, rtol: float = 1e-5
) -> None:
    """Updates, norms, thresholds and scales agree to ``rtol``; ``clipped`` exactly (NaN == NaN)."""
    for name, expected in expected_updates.items():
        np.testing.assert_allclose(
            np.asarray(actual_updates[name]), expected, rtol=rtol, atol=1e-9, err_msg=name
        )
    for key in ("norm", "threshold", "scale"):
        np.testing.assert_allclose(
            np.asarray(actual_stats[key]), expected_stats[key], rtol=rtol, atol=1e-9, err_msg=key
        )
    np.testing.assert_array_equal(np.asarray(actual_stats["clipped"]), expected_stats["clipped"])


def assert_steps_match(update, state, oracle, grads: dict[str, np.ndarray]) -> None:
    """Steps ``update`` (a transform's update, jitted or not) and ``oracle`` over ``grads`` side by side.

    ``grads`` is ``{name: (steps, ...)}``; after each step the updates and the
    threshold agree to ``1e-5``.
    """
    steps = len(next(iter(grads.values())))
    for t in range(steps):
        g = {k: v[t] for k, v in grads.items()}
        updates, state = update(g, state)
        expected, record = oracle.step([g[k] for k in sorted(g)])
        for name, leaf in zip(sorted(g), expected, strict=True):
            np.testing.assert_allclose(updates[name], leaf, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(state.stats.threshold, record["threshold"], rtol=1e-5)


def run_transform(tx, grads: dict[str, np.ndarray]):
    """Runs ``tx`` over ``grads`` (``{name: (steps, ...)}``) in one jitted ``lax.scan``.

    Returns the updates (same layout), the `clipx.stats` of the transform as
    ``{field: (steps,)}`` arrays and the final state.
    """
    params = {name: np.zeros(g.shape[1:], g.dtype) for name, g in grads.items()}

    @jax.jit
    def run(grads):
        def body(state, g):
            updates, state = tx.update(g, state, params)
            return state, (updates, clipx.stats(state))

        return jax.lax.scan(body, tx.init(params), grads)

    state, (updates, stats) = run(grads)
    return updates, {key.rsplit("/", 1)[1]: value for key, value in stats.items()}, state
