"""What clipping costs in a data-parallel training step, and per-example (DP-SGD) throughput.

One training step of the reference LSTM classifier (``clipx.workload.model``),
data-parallel over every device (8 host devices on CPU), is timed with each
clipx clipper chained before Adam and without clipping. Each variant trains
its own copy of the parameters and optimizer state (donated, carried from step
to step), warmed up for 128 steps first so that the timed steps are past every
rule's warm-up. Runs are interleaved
(every round times every variant once, in turn) and the ratio to the unclipped
step is the median over rounds of the per-round ratio, so slow drifts of a
shared machine cancel. A second table compares per-example clipping
throughput: ``optax.per_example_global_norm_clip``, ``clipx.per_example_global_norm``
and the chunked ``clipx.clipped_grad_sum``. ``--memory`` prints the compiled
temporary memory of ``clipped_grad_sum`` for several chunk sizes.

    python benchmarks/sharded_step.py                 # CPU: 8 host devices
    python benchmarks/sharded_step.py --rounds 50     # more rounds, steadier medians
    python benchmarks/sharded_step.py --memory        # the memory table only

The same script runs unchanged on a GPU (all visible devices form the mesh).
"""

from __future__ import annotations

import glob
import os


def _accelerator_visible() -> bool:
    """A GPU/TPU is visible (checked without importing jax, which must see XLA_FLAGS first)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return not platforms.startswith("cpu")
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or os.path.exists("/dev/kfd"))


if not _accelerator_visible():  # 8 host devices stand in for 8 accelerators
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipx  # noqa: E402
from clipx.workload.model import ModelConfig, TextClassifier  # noqa: E402

WARMUP_STEPS = 128  # steps of each variant before timing: past every rule's warm-up

Optimizer = optax.GradientTransformation


def _before(clipper: Callable[[], Optimizer]) -> Callable[[Optimizer], Optimizer]:
    """The optimizer with ``clipper()`` chained before it."""
    return lambda optimizer: optax.chain(clipper(), optimizer)


# Every clipper, with the default hyperparameters a user would start from, as it is used: a
# clipper chained before Adam, a guard wrapped around it. The flag marks the rules built on the
# global norm (the ≤ 1.05× target applies to them).
CLIPPERS: dict[str, tuple[Callable[[Optimizer], Optimizer], bool]] = {
    "value": (_before(lambda: clipx.value(1.0)), False),
    "global_norm": (_before(lambda: clipx.global_norm(1.0)), True),
    "tensor_norm": (_before(lambda: clipx.tensor_norm(1.0)), False),
    "block_rms": (_before(lambda: clipx.block_rms(1.0)), False),
    "agc": (_before(lambda: clipx.agc(0.01)), False),
    "adaptive": (_before(clipx.adaptive), True),
    "autoclip": (_before(clipx.autoclip), True),
    "zclip": (_before(clipx.zclip), True),
    "quantile_clip": (_before(clipx.quantile_clip), True),
    "adagc": (_before(clipx.adagc), False),
    # The guards wrap Adam: a skipped step keeps its moments.
    "skip_nonfinite": (clipx.skip_nonfinite, False),
    "skip_spikes": (clipx.skip_spikes, True),
}


def machine() -> str:
    device = jax.devices()[0]
    return (
        f"platform {device.platform}, {len(jax.devices())} × {device.device_kind}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}, optax {optax.__version__}, Python {platform.python_version()}"
    )


def make_model(args):
    config = ModelConfig(vocab_size=args.vocab, embed_dim=args.embed, hidden_size=args.hidden)
    model = TextClassifier(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, args.vocab, (args.batch, args.length)).astype(np.int32)
    lengths = rng.integers(args.length // 2, args.length + 1, (args.batch,)).astype(np.int32)
    labels = rng.integers(0, 2, (args.batch,)).astype(np.int32)
    params = model.init(jax.random.key(0), tokens[:1], lengths[:1])["params"]

    def loss(params, tokens, lengths, labels):
        logits = model.apply({"params": params}, tokens, lengths)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return params, (tokens, lengths, labels), loss


def time_interleaved(
    steps: dict[str, Callable[[], object]], rounds: int, repeat: int, order: random.Random
) -> dict[str, list[float]]:
    """Seconds per call of every step, ``rounds`` times, each round visiting the variants in an
    order shuffled by ``order``, so that none is always timed first or after the same one."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in order.sample(list(steps.items()), len(steps)):
            start = time.perf_counter()
            for _ in range(repeat):
                out = step()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / repeat)
    return times


def bench_step(args, mesh) -> list[str]:
    params, batch, loss = make_model(args)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, replicated)
    batch = jax.device_put(batch, batch_sharding)

    def variant(build):
        tx = optax.adam(1e-3) if build is None else build(optax.adam(1e-3))

        def step(params, state, batch):
            grads = jax.grad(loss)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(step, donate_argnums=(0, 1))
        # Each variant trains its own copy (the step donates it), past the longest warm-up of the
        # rules timed (adagc's 100 steps), so that the timed steps are steady-state ones.
        carry = (jax.tree.map(jnp.copy, params), jax.device_put(tx.init(params), replicated))
        for _ in range(WARMUP_STEPS):
            carry = jax.block_until_ready(jitted(*carry, batch))

        def run():
            nonlocal carry
            carry = jitted(*carry, batch)
            return carry

        return run

    chosen = {name: CLIPPERS[name] for name in args.only}
    steps = {"none": variant(None)} | {name: variant(build) for name, (build, _) in chosen.items()}
    times = time_interleaved(steps, args.rounds, args.repeat, random.Random(args.seed))
    rows = [
        "| clipper | global-norm based | median step (ms) | ratio to no clipping (median over rounds) |",
        "|---|---|---:|---:|",
    ]
    base = times["none"]
    for name, samples in times.items():
        ratio = statistics.median(t / b for t, b in zip(samples, base, strict=True))
        is_global = "" if name == "none" else ("yes" if CLIPPERS[name][1] else "no")
        rows.append(f"| {name} | {is_global} | {1e3 * statistics.median(samples):.2f} | {ratio:.3f} |")
    return rows


def bench_per_example(args, mesh) -> list[str]:
    params, batch, loss = make_model(args)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))

    def example_loss(params, example):
        tokens, lengths, labels = example
        return loss(params, tokens[None], lengths[None], labels[None])

    per_example_grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))
    clip = 1.0
    tx = clipx.per_example_global_norm(clip)
    tx_state = tx.init(params)

    variants = {
        "optax.per_example_global_norm_clip": lambda p, b: optax.per_example_global_norm_clip(
            per_example_grads(p, b), clip
        )[0],
        "clipx.per_example_global_norm": lambda p, b: tx.update(per_example_grads(p, b), tx_state)[0],
        f"clipx.clipped_grad_sum (chunk {args.chunk})": lambda p, b: clipx.clipped_grad_sum(
            example_loss, p, b, clip, chunk_size=args.chunk
        )[0],
    }
    steps = {}
    for name, fn in variants.items():
        jitted = jax.jit(fn, out_shardings=replicated)
        jax.block_until_ready(jitted(params, batch))
        steps[name] = lambda jitted=jitted: jitted(params, batch)
    times = time_interleaved(steps, max(3, args.rounds // 4), 1, random.Random(args.seed))
    rows = ["| per-example clipping (clip + sum) | examples/s | relative to optax |", "|---|---:|---:|"]
    base = statistics.median(times["optax.per_example_global_norm_clip"])
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(f"| {name} | {args.batch / median:,.0f} | {base / median:.2f} |")
    return rows


def bench_memory() -> list[str]:
    """Compiled temporary memory of the clipped per-example sum: full vmap vs chunks."""
    rng = np.random.default_rng(0)
    sizes = (512, 1024, 512, 10)
    params = [
        {"w": jnp.asarray(rng.standard_normal((a, b)) * 0.03, jnp.float32), "b": jnp.zeros(b)}
        for a, b in itertools.pairwise(sizes)
    ]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    xs = jnp.asarray(rng.standard_normal((256, sizes[0])), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, 256), jnp.int32)

    def loss(params, example):
        x, y = example
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        logits = x @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def full(params, batch):
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
        return optax.per_example_global_norm_clip(grads, 1.0)[0]

    def temp_bytes(fn) -> int:
        compiled = jax.jit(fn).lower(params, (xs, ys)).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    full_bytes = temp_bytes(full)
    rows = [
        f"Clipped per-example gradient sum, 3-layer MLP, {n_params:,} float32 parameters "
        f"({4 * n_params / 2**20:.1f} MiB), batch 256:",
        "",
        "| method | temporary memory (MiB) | relative to full vmap |",
        "|---|---:|---:|",
        f"| full vmap + optax.per_example_global_norm_clip | {full_bytes / 2**20:.1f} | 1.00 |",
    ]
    for chunk in (1, 8, 32, 128):
        nbytes = temp_bytes(lambda p, b, c=chunk: clipx.clipped_grad_sum(loss, p, b, 1.0, chunk_size=c)[0])
        mib, relative = nbytes / 2**20, nbytes / full_bytes
        rows.append(f"| clipx.clipped_grad_sum, chunk_size={chunk} | {mib:.1f} | {relative:.3f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--repeat", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the devices)")
    parser.add_argument("--length", type=int, default=32, help="tokens per example")
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16, help="chunk_size of clipped_grad_sum")
    parser.add_argument("--memory", action="store_true", help="only the memory table of clipped_grad_sum")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the variants' order in each round (vary it across runs)"
    )
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=list(CLIPPERS),
        help=f"comma-separated clippers of the step table (default: all of {','.join(CLIPPERS)})",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(CLIPPERS))
    if unknown or not args.only:
        parser.error(f"--only: unknown clippers {unknown}; choose from {', '.join(CLIPPERS)}")
    for flag in ("rounds", "repeat", "batch", "length", "embed", "hidden", "chunk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.vocab < 3:  # the sentences draw words 2, 3, ... (0 and 1 are padding and unknown)
        parser.error("--vocab must be at least 3")

    print(machine())
    print()
    if not args.memory:
        devices = np.array(jax.devices())
        if args.batch % len(devices):
            parser.error(f"--batch must divide by the {len(devices)} devices")
        mesh = Mesh(devices, ("data",))
        print(
            f"Training step: LSTM classifier (vocab {args.vocab}, embed {args.embed}, hidden {args.hidden}), "
            f"batch {args.batch} × {args.length} tokens, data-parallel over {len(devices)} devices, "
            f"{args.rounds} interleaved rounds of {args.repeat} steps, variants in a shuffled order "
            f"(seed {args.seed})"
        )
        print()
        print("\n".join(bench_step(args, mesh)))
        print()
        print("\n".join(bench_per_example(args, mesh)))
        print()
    print("\n".join(bench_memory()))


if __name__ == "__main__":
    main()
