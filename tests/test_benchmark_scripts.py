"""The benchmark scripts refuse bad command lines before any timing starts, and time what they name."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import clipx

_BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # step_overhead's dataclass looks itself up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def step_overhead():
    yield from _load("step_overhead")


@pytest.fixture(scope="module")
def sharded_step(monkeypatch_module):
    # At import the script adds 8 host devices to XLA_FLAGS (jax, already running, ignores it);
    # the variable is put back afterwards.
    monkeypatch_module.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    yield from _load("sharded_step")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "d"], "--sizes must name"),
        (["--sizes", ""], "--sizes must name"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--compile-repeats", "0"], "--compile-repeats must be at least 1"),
        (["--scale", "0"], "--scale must leave"),
        (["--scale", "-1"], "--scale must leave"),
        (["--scale", "inf"], "--scale must leave"),
        (["--sizes", "b", "--scale", "0.0001"], "--scale must leave"),  # 400 entries for 1000 leaves
        (["--only", "nosuch"], "no candidate matches ['nosuch']"),
    ],
)
def test_step_overhead_refuses_bad_arguments(step_overhead, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step_overhead.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_step_overhead_builds_the_size_it_reports(step_overhead):
    # --scale 0.0123 on size (b): 49,200 entries requested, 49 per leaf built in (49, 1) leaves.
    assert step_overhead.leaf_size(49_200, 1000) == 49
    assert step_overhead.leaf_size(246_000, 50) == 4900  # rounded down to rows of 100
    params = step_overhead.make_params(246_000, 50)
    assert {p.shape for p in params.values()} == {(49, 100)}
    assert {p.shape for p in step_overhead.make_params(246_000, 50, wide=True).values()} == {(100, 49)}
    assert step_overhead.leaf_size(*step_overhead.SIZES["a"][:2]) == 400_000
    assert step_overhead.leaf_size(*step_overhead.SIZES["b"][:2]) == 4000
    assert step_overhead.leaf_size(*step_overhead.SIZES["c"][:2]) == 5_000_000  # 100 rows of 50000


def test_step_overhead_prints_each_family_together_clipx_first(step_overhead):
    # Before, the global_norm(ord=...) rows came after AGC's and quantile_clip split the adaptive rows.
    families = [c.family for c in step_overhead.candidates()]
    runs = [family for i, family in enumerate(families) if i == 0 or families[i - 1] != family]
    assert len(runs) == len(set(runs)) > 5
    for family in ("global_norm", "value", "agc", "adaptive"):
        first = next(c for c in step_overhead.candidates() if c.family == family)
        assert first.label == f"clipx.{family}"


def test_sharded_step_refuses_unknown_clippers(sharded_step, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sharded_step.main(["--only", "global_norm,nosuch"])
    assert exit_info.value.code == 2
    assert "--only: unknown clippers ['nosuch']" in capsys.readouterr().err


def test_sharded_step_wraps_guards_around_adam_and_chains_clippers_before_it(sharded_step):
    adam = optax.adam(1e-3)
    params = {"w": jnp.ones(3)}
    guarded, _ = sharded_step.CLIPPERS["skip_spikes"]
    assert type(guarded(adam).init(params).inner_state) is type(adam.init(params))
    chained, _ = sharded_step.CLIPPERS["global_norm"]
    clip_state, adam_state = chained(adam).init(params)
    fields = ("norm", "threshold", "scale", "clipped")
    assert list(clipx.stats(clip_state)) == [f"global_norm/{field}" for field in fields]
    assert type(adam_state) is type(adam.init(params))


@pytest.mark.parametrize("vocab", ["1", "2"])
def test_sharded_step_refuses_a_vocabulary_without_words(sharded_step, vocab, capsys):
    # Words are drawn from 2, 3, ...: before, --vocab 2 failed with NumPy's "low >= high".
    with pytest.raises(SystemExit) as exit_info:
        sharded_step.main(["--vocab", vocab])
    assert exit_info.value.code == 2
    assert "--vocab must be at least 3" in capsys.readouterr().err


def test_sharded_step_times_a_tiny_model(sharded_step):
    args = argparse.Namespace(
        rounds=1,
        repeat=1,
        batch=8,
        length=4,
        vocab=20,
        embed=4,
        hidden=4,
        only=["skip_spikes", "value"],
        seed=0,
    )
    rows = sharded_step.bench_step(args, Mesh(np.array(jax.devices()[:8]), ("data",)))
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["none", "skip_spikes", "value"]
