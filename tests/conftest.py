"""Test-session set-up: 8 host CPU devices for sharding tests, hypothesis profile."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pathlib

import hypothesis
import pytest

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
# HYPOTHESIS_PROFILE=deep: a longer, randomised search, for runs by hand.
hypothesis.settings.register_profile("deep", max_examples=300, deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_dir() -> pathlib.Path:
    """../shared/data, or skip the test with the reason when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {DATA_DIR} (tests that read SST-2/IMDB need it)")
    return DATA_DIR
