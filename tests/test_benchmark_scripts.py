"""The benchmark scripts refuse bad command lines before any timing starts."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "step_overhead.py"


@pytest.fixture(scope="module")
def step_overhead():
    spec = importlib.util.spec_from_file_location("step_overhead", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "d"], "--sizes must name"),
        (["--sizes", ""], "--sizes must name"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--compile-repeats", "0"], "--compile-repeats must be at least 1"),
        (["--scale", "0"], "--scale must leave"),
        (["--scale", "-1"], "--scale must leave"),
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
