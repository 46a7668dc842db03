"""Optimizer-step overhead of clipx transforms and their optax counterparts.

For each clipper ``C`` this measures the time of one jitted optimizer step of
``optax.chain(C, optax.adam(1e-3))`` divided by the time of ``optax.adam(1e-3)``
alone, with the parameters and optimizer state donated and the gradients fed
fresh each step. Candidates run round-robin (one step of each, in turn, many
times); a ratio is formed within each round, so slow phases caused by other
processes hit the numerator and the denominator alike, and the table reports
the median ratio with its interquartile range. Compile time (trace, lower and
compile, with 1000 leaves by default) is reported as a ratio to plain Adam's.

Run it with ``python benchmarks/step_overhead.py`` (``--help`` for the quick
options). The script runs unchanged on CPU, GPU and TPU; what exists in clipx
is discovered at run time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx

# Problem sizes: name -> (total float32 parameters, number of leaves).
SIZES: dict[str, tuple[int, int]] = {
    "a": (20_000_000, 50),
    "b": (4_000_000, 1000),
}


@dataclass(frozen=True)
class Candidate:
    """One clipper to time: its label, the factory of its transform, and its family."""

    label: str
    make: Callable[[], optax.GradientTransformation]
    family: str  # rows of one family are printed together (clipx first, then its counterpart)


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

    def add(name: str, make: Callable[[], optax.GradientTransformation], family: str) -> None:
        out.append(Candidate(name, make, family))

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
    for name, make, counterpart, make_counterpart in pairs:
        if name in have:
            add(f"clipx.{name}", make, name)
        add(counterpart, make_counterpart, name)
    for name in ("autoclip", "zclip", "adagc", "adaptive", "quantile_clip"):
        if name in have:
            add(f"clipx.{name}", (lambda n=name: getattr(clipx, n)()), name)
    return out


def make_params(total: int, leaves: int, seed: int = 0) -> dict[str, jax.Array]:
    """``leaves`` float32 matrices (rows of 100 or fewer columns) holding ``total`` entries in all."""
    per_leaf = total // leaves
    cols = 100 if per_leaf % 100 == 0 else 1
    key = jax.random.PRNGKey(seed)
    params = {}
    for i in range(leaves):
        key, sub = jax.random.split(key)
        params[f"layer{i:04d}"] = 0.02 * jax.random.normal(sub, (per_leaf // cols, cols), jnp.float32)
    return params


def make_step(tx: optax.GradientTransformation):
    """The jitted step ``(params, opt_state, grads) -> (params, opt_state)`` with the first two donated."""

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def compile_seconds(tx_factory: Callable[[], optax.GradientTransformation], params, grads) -> float:
    """Wall time to trace, lower and compile one step of ``chain(tx, adam)`` from a fresh transform."""
    tx = tx_factory()
    opt_state = jax.eval_shape(tx.init, params)
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    start = time.perf_counter()
    make_step(tx).lower(spec(params), opt_state, spec(grads)).compile()
    return time.perf_counter() - start


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(values), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def time_size(cands: list[Candidate], total: int, leaves: int, repeats: int, log) -> dict[str, dict]:
    """Round-robin step timing of plain Adam and every ``chain(candidate, adam)``."""
    adam = lambda: optax.adam(1e-3)  # noqa: E731
    entries = [("optax.adam (baseline)", adam)] + [
        (c.label, lambda c=c: optax.chain(c.make(), adam())) for c in cands
    ]
    grads = jax.tree.map(lambda p: 50.0 * p, make_params(total, leaves, seed=1))  # global norm well above 1
    runners = []
    for label, factory in entries:
        tx = factory()
        params = make_params(total, leaves)
        opt_state = tx.init(params)
        step = make_step(tx)
        params, opt_state = step(params, opt_state, grads)  # compile and warm up
        params, opt_state = step(params, opt_state, grads)
        jax.block_until_ready((params, opt_state))
        runners.append([label, step, params, opt_state])
        log(f"  warmed up {label}")
    times: dict[str, list[float]] = {label: [] for label, _ in entries}
    for _ in range(repeats):
        for runner in runners:
            label, step, params, opt_state = runner
            start = time.perf_counter()
            params, opt_state = step(params, opt_state, grads)
            jax.block_until_ready((params, opt_state))
            times[label].append(time.perf_counter() - start)
            runner[2], runner[3] = params, opt_state
    base = times[entries[0][0]]
    result = {}
    for label, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        result[label] = {"ms": 1e3 * statistics.median(ts), "ratio": quartiles(ratios)}
    del runners
    return result


def time_compile(cands: list[Candidate], total: int, leaves: int, repeats: int, log) -> dict[str, tuple]:
    """Round-robin compile timing; each ratio is against plain Adam's compile in the same round."""
    params = make_params(total, leaves)
    grads = params
    entries = [("optax.adam (baseline)", lambda: optax.adam(1e-3))] + [
        (c.label, lambda c=c: optax.chain(c.make(), optax.adam(1e-3))) for c in cands
    ]
    times: dict[str, list[float]] = {label: [] for label, _ in entries}
    for r in range(repeats):
        for label, factory in entries:
            times[label].append(compile_seconds(factory, params, grads))
        log(f"  compile round {r + 1}/{repeats} done")
    base = times[entries[0][0]]
    return {
        label: (statistics.median(ts), quartiles([t / b for t, b in zip(ts, base, strict=True)]))
        for label, ts in times.items()
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
        "--sizes", default="a,b", help="comma-separated sizes: a (20M/50 leaves), b (4M/1000 leaves)"
    )
    parser.add_argument("--repeats", type=int, default=40, help="round-robin rounds of step timing per size")
    parser.add_argument(
        "--compile-repeats", type=int, default=3, help="rounds of compile timing (0 skips it)"
    )
    parser.add_argument("--compile-size", default="b", help="the size whose compile time is measured")
    parser.add_argument(
        "--only", default="", help="comma-separated substrings: keep matching candidates only"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply parameter counts (quick runs)")
    args = parser.parse_args(argv)

    cands = candidates()
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        cands = [c for c in cands if any(k in c.label or k == c.family for k in keys)]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    step_results = {}
    for s in sizes:
        total, leaves = SIZES[s]
        total = int(total * args.scale)
        log(f"size {s}: {total:,} parameters in {leaves} leaves")
        step_results[s] = ((total, leaves), time_size(cands, total, leaves, args.repeats, log))
    compile_result = None
    if args.compile_repeats > 0:
        total, leaves = SIZES[args.compile_size]
        total = int(total * args.scale)
        log(f"compile time: {total:,} parameters in {leaves} leaves")
        compile_result = ((total, leaves), time_compile(cands, total, leaves, args.compile_repeats, log))

    print(f"\n{machine()}\n")
    labels = ["optax.adam (baseline)"] + [c.label for c in cands]
    header = "| transform C in chain(C, adam) |"
    rule = "|---|"
    for s in sizes:
        (total, leaves), _ = step_results[s]
        header += f" step ({s}) {total / 1e6:g}M/{leaves} leaves: ms | ratio to adam (IQR) |"
        rule += "---:|---:|"
    if compile_result:
        (total, leaves), _ = compile_result
        header += f" compile {total / 1e6:g}M/{leaves} leaves: s | ratio to adam (IQR) |"
        rule += "---:|---:|"
    print(header)
    print(rule)
    for label in labels:
        row = f"| {label} |"
        for s in sizes:
            r = step_results[s][1][label]
            row += f" {r['ms']:.1f} | {fmt_ratio(r['ratio'])} |"
        if compile_result:
            sec, q = compile_result[1][label]
            row += f" {sec:.2f} | {fmt_ratio(q)} |"
        print(row)
    print(f"\nstep: median over {args.repeats} round-robin rounds; compile: {args.compile_repeats} rounds.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
