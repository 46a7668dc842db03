"""Test-session set-up: 8 host CPU devices for sharding tests, a shared XLA cache, hypothesis profile."""

import os
import pathlib
import shutil
import tempfile

import hypothesis
import pytest

# Set before jax is imported anywhere in the test session (nothing above imports it).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# Many tests compile the same programs (the workload's tiny model above all): a compilation
# cache shared by the xdist workers, which inherit this environment, compiles each once.
# It lives for one session, in a folder of its own, unless the caller names one.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="clipx-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
# HYPOTHESIS_PROFILE=deep: a longer, randomised search, for runs by hand.
hypothesis.settings.register_profile("deep", max_examples=300, deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_unconfigure(config):
    """Removes the session's compilation cache, in the process that made it."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_dir() -> pathlib.Path:
    """../shared/data, or skip the test with the reason when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {DATA_DIR} (tests that read SST-2/IMDB need it)")
    return DATA_DIR
