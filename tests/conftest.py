"""Test configuration: 8 host CPU devices (for sharding tests), float32 matmuls at full precision,
and XLA:CPU's YNNPACK fusions off.

jaxlib 0.10.2 added YNNPACK fusions to XLA:CPU that miscompile some broadcast-multiply-reduce
patterns (wrong numbers: jax-ml/jax#39103, and ``tests/test_bottleneck.py``'s rollout-sized role
gradients) and can crash an Eigen worker thread asynchronously (SIGSEGV surfacing in whatever the
main thread was compiling: jax-ml/jax#40412, #39257). ``YNN_OFF`` turns them off for every test
process and subprocess, except the one regression test that checks the role gradients under
XLA:CPU's default flags. Worker crashes were seen with them on and off, in different tests
(``test_resume_is_exact...`` twice; 2026-12-06, 1 of 3 fresh-clone CI runs: the main thread in
``Executable.serialize``, writing the compilation cache below, during a FrozenLake eval-rollout
compile), so any test whose xdist worker dies of a signal runs again on a fresh worker, up to
``_crash_rerun.MAX_RERUNS`` times (listed in the terminal summary, "N rerun" in the last line); a
crash on every run or any failed assertion fails as usual. The test whose worker crashed most often
(``test_main_job_...``, late in the suite, in 4 of 5 runs) is marked ``fresh_process`` and runs in
a Python process of its own (``_fresh_process``).

The suite is bound by XLA compiles (a train step of the 2-layer test model: ~25 s to compile and
~1 s to run, measured on 2 shared cores), and many tests and test subprocesses compile the same
programs (the trainer's tiny config runs in several tests, and ``test_resume_is_exact...`` trains
four times in one process).
JAX's persistent compilation cache, in a fresh directory per test session shared by the xdist
workers and the tests' subprocesses, compiles each of them once. A size limit is set because
only then does JAX guard the cache's reads and writes with a file lock (two workers may write
and read the same entry at once). Set ``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache
across sessions, or ``JAX_ENABLE_COMPILATION_CACHE=false`` to compile everything afresh.
"""

import os
import shutil
import tempfile

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "ynn_fusion_type" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + YNN_OFF
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Imported first by the pytest process that spawns the xdist workers (and before any subprocess
# starts), which then all inherit this directory.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="actfocus_jax_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402  (after the environment variables above)
from _crash_rerun import (  # noqa: E402, F401  (pytest hooks: a crashed test runs again)
    pytest_handlecrashitem,
    pytest_report_teststatus,
    pytest_terminal_summary,
)
from _fresh_process import (  # noqa: E402, F401  (pytest hooks: @pytest.mark.fresh_process)
    pytest_configure,
    pytest_pyfunc_call,
)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    """Remove this session's compilation cache (only in the process that made it)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    """'No tests collected' (exit 5) is not a failure for this project's CI."""
    if exitstatus == 5:
        session.exitstatus = 0
