"""The Python examples of the README and the docs pages, and the scripts in examples/, run as written.

Each page's ``python`` blocks run in order in one namespace (later blocks use
what earlier ones made), in a fresh interpreter: some set JAX options, and
the scale page needs 8 host devices. Where a page's blocks start from names
the page leaves to the reader (``params``, ``grads``), a few lines make them
first; what a block prints is checked against what the page says it prints.
"""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What a page's examples take as given.
TREE = """
import jax, jax.numpy as jnp
params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
grads = jax.tree.map(lambda p: 10 * p, params)
"""
SCALE = """
import jax, jax.numpy as jnp
params = {"embed": jnp.ones((64, 16)), "dense": jnp.ones((16, 32))}  # both split 8 ways
stacked_params = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)  # two members
stacked_grads = stacked_params
batch, batch_size, secret_seed = jnp.ones((4, 16)), 4, 1234
def loss(params, x):
    return jnp.sum((x @ params["dense"]) ** 2)
"""

# page: (what its blocks start from, a check run after them, lines they must print)
PAGES = {
    "README.md": (TREE, "assert sorted(clipx.stats(state)) == "
                  "['adaptive/clipped', 'adaptive/norm', 'adaptive/scale', 'adaptive/threshold']", []),
    "docs/index.md": (TREE, "assert 'adaptive/threshold' in clipx.stats(state)", []),
    "docs/getting-started.md": ("", "", [
        # the skipped step of the guards' example, and the threshold injected as 0.5
        "{'skip_nonfinite/skipped': 1, 'skip_nonfinite/consecutive': 1, 'skip_nonfinite/total': 1,",
        "0.5",
    ]),
    "docs/scale.md": (SCALE, "assert clipx.stats(states)['adaptive/threshold'].shape == (2,)", []),
}  # fmt: skip


def python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def test_every_page_with_python_examples_is_checked():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    with_examples = {str(p.relative_to(ROOT)) for p in pages if python_blocks(p)}
    assert with_examples == set(PAGES)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_the_python_examples_of_a_page_run(page):
    given, check, printed = PAGES[page]
    blocks = python_blocks(ROOT / page)
    script = "\n".join([textwrap.dedent(given), *blocks, "import clipx", check])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for line in printed:
        assert any(out.startswith(line) for out in done.stdout.splitlines()), (line, done.stdout)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_the_example_scripts_run(script):
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # as from a shell
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()  # each prints what it shows
