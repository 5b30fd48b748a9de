"""conftest's per-session JAX compilation cache, shared by the xdist workers and the tests'
subprocesses."""

import os
import subprocess
import sys


def test_workers_and_subprocesses_share_one_locked_compilation_cache():
    """This process and a test subprocess (which inherits the environment conftest set, as every
    ``experiments.*`` subprocess of the suite does) use the same cache directory, which exists
    while the session runs, with the size limit that turns JAX's file lock on (workers share the
    directory)."""
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir
    assert cache_dir and os.path.isdir(cache_dir)
    assert jax.config.jax_compilation_cache_max_size > 0
    code = (
        "import jax; "
        "print(jax.config.jax_compilation_cache_dir); "
        "print(jax.config.jax_compilation_cache_max_size)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == cache_dir and int(out[1]) > 0
