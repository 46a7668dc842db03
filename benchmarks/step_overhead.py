"""Optimizer-step overhead of clipx transforms and their optax counterparts.

For each clipper ``C`` this measures the time of one jitted optimizer step of
``optax.chain(C, optax.adam(1e-3))`` divided by the time of ``optax.adam(1e-3)``
alone, with the parameters and optimizer state donated and the gradients
passed as an argument of every step (the same array each time). Candidates
run round-robin (one step of each, in turn, many times, in an order shuffled
every round so that no candidate always runs after the same one); a ratio is
formed within each round, so slow phases caused by other processes hit the
numerator and the denominator alike, and the table reports the median ratio
with its interquartile range. Compile time (trace, lower and
compile) is reported at every size as a ratio to plain Adam's; the target
is set with 1000 leaves, size (b).

Run it with ``python benchmarks/step_overhead.py`` (``--help`` for the quick
options). The script runs unchanged on CPU, GPU and TPU; of its fixed list of
clippers it times those the installed clipx exports.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx

# Problem sizes: name -> (total float32 parameters, number of leaves, leaves wider than tall).
# Size (c) is four leaves of 100 rows of 50000 entries: Dense kernels (in, out) onto a vocabulary.
SIZES: dict[str, tuple[int, int, bool]] = {
    "a": (20_000_000, 50, False),
    "b": (4_000_000, 1000, False),
    "c": (20_000_000, 4, True),
}


@dataclass(frozen=True)
class Candidate:
    """One clipper to time: its label, the factory of its transform, and its family.

    A guard (``wraps``) is made around Adam, ``make()(adam)``; every other
    clipper is chained before it, ``optax.chain(make(), adam)``.
    """

    label: str
    make: Callable[[], Any]
    family: str  # rows of one family are printed together, in the order added (clipx first)
    wraps: bool = False

    def optimizer(self) -> optax.GradientTransformation:
        adam = optax.adam(1e-3)
        return self.make()(adam) if self.wraps else optax.chain(self.make(), adam)


def _optax_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """Per-leaf L2-norm clipping written the way optax writes its global rule, leaf by leaf."""

    def clip(g):
        norm = jnp.sqrt(jnp.sum(jnp.square(g)))
        return jnp.where(norm < max_norm, g, g * (max_norm / norm))

    return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def candidates() -> list[Candidate]:
    """Every clipper to compare: clipx's (those this version exports) and optax's counterparts."""
    have = set(getattr(clipx, "__all__", dir(clipx)))
    out: list[Candidate] = []

    def add(name: str, make: Callable[[], Any], family: str, wraps: bool = False) -> None:
        out.append(Candidate(name, make, family, wraps))

    Factory = Callable[[], optax.GradientTransformation]
    pairs: list[tuple[str, Factory, str, Factory]] = [
        (
            "global_norm",
            lambda: clipx.global_norm(1.0),
            "optax.clip_by_global_norm",
            lambda: optax.clip_by_global_norm(1.0),
        ),
        ("value", lambda: clipx.value(1e-4), "optax.clip", lambda: optax.clip(1e-4)),
        (
            "tensor_norm",
            lambda: clipx.tensor_norm(1.0),
            "tree_map per-leaf clip (optax style)",
            lambda: _optax_tensor_norm(1.0),
        ),
        (
            "block_rms",
            lambda: clipx.block_rms(1e-4),
            "optax.clip_by_block_rms",
            lambda: optax.clip_by_block_rms(1e-4),
        ),
        ("agc", lambda: clipx.agc(0.01), "optax.adaptive_grad_clip", lambda: optax.adaptive_grad_clip(0.01)),
    ]
    # The rules whose statistics cost work of their own, also timed without them.
    without_stats = {"value", "tensor_norm", "block_rms", "agc"} if "without_stats" in have else set()
    for name, make, counterpart, make_counterpart in pairs:
        if name in have:
            add(f"clipx.{name}", make, name)
        if name in without_stats:
            add(f"clipx.without_stats({name})", lambda make=make: clipx.without_stats(make()), name)
        add(counterpart, make_counterpart, name)
    if "global_norm" in have and "ord" in inspect.signature(clipx.global_norm).parameters:
        for order in ("1", "inf", "3"):  # PyTorch's norm_type; 3 reads the gradients twice
            make = lambda o=float(order): clipx.global_norm(1.0, ord=o)  # noqa: E731
            add(f"clipx.global_norm(ord={order})", make, "global_norm")
    for name in ("autoclip", "zclip", "adagc", "adaptive", "quantile_clip"):
        if name in have:
            add(f"clipx.{name}", (lambda n=name: getattr(clipx, n)()), name)
    if "adaptive" in have and "direction_rate" in inspect.signature(clipx.adaptive).parameters:
        add("clipx.adaptive(direction_rate=None)", lambda: clipx.adaptive(direction_rate=None), "adaptive")
    # The guards wrap Adam: a skipped step must leave Adam's moments and count untouched.
    if "skip_nonfinite" in have:
        add("clipx.skip_nonfinite(adam)", lambda: clipx.skip_nonfinite, "skip_nonfinite", wraps=True)
        if "check_updates" in inspect.signature(clipx.skip_nonfinite).parameters:
            add(
                "clipx.skip_nonfinite(adam, check_updates=True)",
                lambda: lambda inner: clipx.skip_nonfinite(inner, check_updates=True),
                "skip_nonfinite",
                wraps=True,
            )
    add(
        "optax.apply_if_finite(adam, 10)",
        lambda: lambda inner: optax.apply_if_finite(inner, 10),
        "skip_nonfinite",
        wraps=True,
    )
    if "skip_spikes" in have:
        add("clipx.skip_spikes(adam)", lambda: clipx.skip_spikes, "skip_spikes", wraps=True)
    families = list(dict.fromkeys(c.family for c in out))
    return sorted(out, key=lambda c: families.index(c.family))  # stable: in order added within a family


def leaf_size(total: int, leaves: int) -> int:
    """Entries per leaf: ``total / leaves`` rounded down, to a multiple of 100 from 100 up."""
    per_leaf = total // leaves
    return per_leaf - per_leaf % 100 if per_leaf >= 100 else per_leaf


def make_params(total: int, leaves: int, seed: int = 0, wide: bool = False) -> dict[str, jax.Array]:
    """``leaves`` float32 matrices of `leaf_size` entries (rows of 100 columns from 100 entries up).

    With ``wide`` each matrix is transposed: 100 rows (from 100 entries up).
    """
    per_leaf = leaf_size(total, leaves)
    cols = 100 if per_leaf >= 100 else 1
    shape = (cols, per_leaf // cols) if wide else (per_leaf // cols, cols)
    key = jax.random.PRNGKey(seed)
    params = {}
    for i in range(leaves):
        key, sub = jax.random.split(key)
        params[f"layer{i:04d}"] = 0.02 * jax.random.normal(sub, shape, jnp.float32)
    return params


def make_step(tx: optax.GradientTransformation):
    """The jitted step ``(params, opt_state, grads) -> (params, opt_state)`` with the first two donated."""

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (less sensitive than wall time to other processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compile_step(tx: optax.GradientTransformation, params, opt_state, grads):
    """Traces, lowers and compiles one step; returns ``(executable, wall seconds, CPU seconds)``."""
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    jax.block_until_ready((params, opt_state))  # made by asynchronous dispatch: not part of the compile
    jax.clear_caches()  # no sample reuses the traces of an earlier one
    wall, cpu = time.perf_counter(), _cpu_seconds()
    compiled = make_step(tx).lower(spec(params), spec(opt_state), spec(grads)).compile()
    return compiled, time.perf_counter() - wall, _cpu_seconds() - cpu


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(values), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def _ratios(times: dict[str, list[float]], base_label: str) -> dict[str, tuple[float, float, float]]:
    base = times[base_label]
    return {label: quartiles([t / b for t, b in zip(ts, base, strict=True)]) for label, ts in times.items()}


BASELINE = "optax.adam (baseline)"


def time_size(
    cands: list[Candidate],
    total: int,
    leaves: int,
    wide: bool,
    repeats: int,
    compile_repeats: int,
    seed: int,
    log,
) -> dict[str, dict]:
    """Compile and step timing of plain Adam and every ``chain(candidate, adam)`` on one problem size.

    Each candidate is compiled ahead of time (that compile is the first compile-time
    sample), ``compile_repeats - 1`` further compile rounds run round-robin, then
    ``repeats`` round-robin rounds of one step each; every round (the first
    compiles included) visits the candidates in a freshly shuffled order (the
    shuffles seeded by ``seed``).
    """
    shuffled = random.Random(seed).sample
    entries = [(BASELINE, lambda: optax.adam(1e-3))] + [(c.label, c.optimizer) for c in cands]
    # Gradients with a global norm well above 1.
    grads = jax.tree.map(lambda p: 50.0 * p, make_params(total, leaves, seed=1, wide=wide))
    compile_wall: dict[str, list[float]] = {label: [] for label, _ in entries}
    compile_cpu: dict[str, list[float]] = {label: [] for label, _ in entries}
    temp_mib: dict[str, float] = {}
    runners = []
    for label, factory in shuffled(entries, len(entries)):
        tx = factory()
        params = make_params(total, leaves, wide=wide)
        opt_state = tx.init(params)
        step, wall, cpu = compile_step(tx, params, opt_state, grads)
        memory = step.memory_analysis()
        temp_mib[label] = math.nan if memory is None else memory.temp_size_in_bytes / 2**20
        compile_wall[label].append(wall)
        compile_cpu[label].append(cpu)
        for _ in range(2):  # warm up
            params, opt_state = step(params, opt_state, grads)
        jax.block_until_ready((params, opt_state))
        runners.append([label, step, params, opt_state])
        log(f"  compiled ({wall:.1f} s) and warmed up {label}")
    for r in range(1, compile_repeats):
        for label, factory in shuffled(entries, len(entries)):
            tx = factory()
            state_shape = jax.eval_shape(tx.init, grads)
            _, wall, cpu = compile_step(tx, grads, state_shape, grads)
            compile_wall[label].append(wall)
            compile_cpu[label].append(cpu)
        log(f"  compile round {r + 1}/{compile_repeats} done")
    times: dict[str, list[float]] = {label: [] for label, _ in entries}
    for _ in range(repeats):
        for runner in shuffled(runners, len(runners)):
            label, step, params, opt_state = runner
            start = time.perf_counter()
            params, opt_state = step(params, opt_state, grads)
            jax.block_until_ready((params, opt_state))
            times[label].append(time.perf_counter() - start)
            runner[2], runner[3] = params, opt_state
    del runners
    step_ratio = _ratios(times, BASELINE)
    wall_ratio = _ratios(compile_wall, BASELINE)
    cpu_ratio = _ratios(compile_cpu, BASELINE)
    return {
        label: {
            "ms": 1e3 * statistics.median(times[label]),
            "ratio": step_ratio[label],
            "compile_s": statistics.median(compile_wall[label]),
            "compile_wall_ratio": wall_ratio[label],
            "compile_cpu_ratio": cpu_ratio[label],
            "temp_mib": temp_mib[label],
        }
        for label, _ in entries
    }


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"CPU: {cpu}, {os.cpu_count()} cores (load average at start {load[0]:.2f}); "
        f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}, "
        f"device {dev.device_kind} x{jax.device_count()}"
    )


def fmt_ratio(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2f}× ({q[0]:.2f}–{q[2]:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="a,b",
        help="comma-separated sizes: a (20M/50 leaves), b (4M/1000), c (20M/4, 100 rows each)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="round-robin rounds of step timing per size")
    parser.add_argument(
        "--compile-repeats",
        type=int,
        default=1,
        help="compile-time samples per candidate (the first is the compile the step timing uses)",
    )
    parser.add_argument("--only", default="", help="comma-separated words: keep the candidates matching one")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply parameter counts (quick runs)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the candidates' order in each round (vary it across runs)"
    )
    args = parser.parse_args(argv)
    if args.compile_repeats < 1:
        parser.error("--compile-repeats must be at least 1 (the step timing needs one compile)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--sizes must name one or more of {', '.join(SIZES)}, got {args.sizes!r}")
    for s in sizes:
        total, leaves, _ = SIZES[s]
        if not (math.isfinite(args.scale) and args.scale > 0 and int(total * args.scale) >= leaves):
            parser.error(f"--scale must leave at least one parameter per leaf ({leaves} leaves in size {s})")

    cands = candidates()
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unmatched = [k for k in keys if not any(k in c.label or k == c.family for c in cands)]
        if unmatched or not keys:
            names = ", ".join(sorted({c.family for c in cands}))
            parser.error(f"--only: no candidate matches {unmatched or args.only!r}; families: {names}")
        cands = [c for c in cands if any(k in c.label or k == c.family for k in keys)]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    print(f"{machine()}\n", flush=True)
    labels = [BASELINE] + [c.label for c in cands]
    for s in sizes:
        total, leaves, wide = SIZES[s]
        total = leaf_size(int(total * args.scale), leaves) * leaves
        layout = ", each transposed (100 rows)" if wide else ""
        log(f"size {s}: {total:,} parameters in {leaves} leaves{layout}")
        res = time_size(cands, total, leaves, wide, args.repeats, args.compile_repeats, args.seed, log)
        print(f"Size ({s}): {total / 1e6:g}M float32 parameters in {leaves} leaves{layout}\n")
        print(
            "| C in chain(C, adam) | step ms | step ratio (IQR) | compile s | compile ratio, wall (IQR) "
            "| compile ratio, CPU time (IQR) | step's temporary memory, MiB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label in labels:
            r = res[label]
            print(
                f"| {label} | {r['ms']:.1f} | {fmt_ratio(r['ratio'])} | {r['compile_s']:.2f} | "
                f"{fmt_ratio(r['compile_wall_ratio'])} | {fmt_ratio(r['compile_cpu_ratio'])} | "
                f"{r['temp_mib']:.1f} |"
            )
        print(flush=True)
    print(
        f"Step: median of {args.repeats} round-robin rounds (order seed {args.seed}), ratio formed within "
        "each round. "
        f"Compile (trace + lower + compile): {args.compile_repeats} sample(s) per candidate; "
        "CPU time counts all threads of this process. Load average at the end: "
        f"{os.getloadavg()[0]:.2f}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
