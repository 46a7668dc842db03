"""examples/seed_toy.py gives the θ computed by hand from the formula."""

import importlib.util
import pathlib

import numpy as np
import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "seed_toy.py"
spec = importlib.util.spec_from_file_location("seed_toy", PATH)
seed_toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_toy)


@pytest.mark.parametrize("steps", [1, 3])
def test_clip_does_not_bind(steps):
    # ∇L = 2(θ − 0.5) ∈ [−1, 1]: θ_t = 0.5 − (0.5 − θ_0)·0.98^t
    theta = seed_toy.train((0.1, 0.2), steps)[-1]
    expected = 0.5 - np.array([0.4, 0.3]) * 0.98**steps
    np.testing.assert_allclose(theta, expected, rtol=1e-6)
    if steps == 1:
        np.testing.assert_allclose(theta, [0.108, 0.206], rtol=1e-6)


def test_clip_binds():
    # θ_0 = [−2, 3]: ∇L = [−5, 5] is clipped to [−1, 1] while |θ − 0.5| > 0.5, so θ moves by η = 0.01
    history = seed_toy.train((-2.0, 3.0), 3)
    np.testing.assert_allclose(history[-1], [-1.97, 2.97], rtol=1e-6)
    np.testing.assert_allclose(np.diff(np.stack(history), axis=0), [[0.01, -0.01]] * 3, rtol=1e-4)


def test_main_prints_each_step(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["seed_toy.py", "--steps", "2"])
    seed_toy.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("step 1: theta = [0.108, 0.206]")
