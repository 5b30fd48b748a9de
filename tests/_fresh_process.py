"""pytest plugin: ``@pytest.mark.fresh_process`` runs a test in a fresh Python process.

In fresh-clone CI runs on the 2-core AVX-512 machine, the xdist worker running
``test_main_job_reports_the_held_out_gain_paired_by_task`` died of a SIGSEGV in 4 of 5 runs
(2026-12-06/07), each time inside an XLA:CPU compile at ~99% of the suite, after the worker had
compiled hundreds of programs; the test passed in 22 of 22 runs on its own (README, "Known
issue"). ``_crash_rerun`` runs such a test again on a fresh worker; this marker avoids the crash
instead: the test body runs in its own ``python -m pytest <node id>`` subprocess (same environment,
so the same XLA flags and the session's shared compilation cache), and the worker only waits for it.
Fixtures of the marked test are set up again in the subprocess.

A subprocess killed by a signal runs again, at most ``_crash_rerun.MAX_RERUNS`` more times, with a
warning in the summary; a failure inside it fails the test with the subprocess's output.
``tests/test_crash_rerun.py`` checks this on a throwaway suite.
"""

import os
import signal
import subprocess
import sys
import warnings

import pytest
from _crash_rerun import MAX_RERUNS

#: Set in the subprocess, where the marked test then runs as usual.
INSIDE = "ACTFOCUS_IN_FRESH_PROCESS"
#: Longest a marked test may run in its subprocess, in seconds.
TIMEOUT_S = 1800


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "fresh_process: run the test in its own Python process (not the long-lived xdist worker)",
    )


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if pyfuncitem.get_closest_marker("fresh_process") is None or os.environ.get(INSIDE):
        return None  # an ordinary test, or already in the fresh process: run it here
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    cmd.append(pyfuncitem.nodeid)
    env = dict(os.environ, **{INSIDE: "1"})
    for attempt in range(1 + MAX_RERUNS):
        proc = subprocess.run(
            cmd,
            cwd=pyfuncitem.config.rootpath,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        out = proc.stdout + proc.stderr
        if proc.returncode >= 0:
            break
        warnings.warn(
            f"{pyfuncitem.nodeid}: its fresh process died of {_signal_name(proc.returncode)} "
            f"(run {attempt + 1} of at most {1 + MAX_RERUNS})",
            stacklevel=1,
        )
    if proc.returncode < 0:
        pytest.fail(
            f"the fresh process died of {_signal_name(proc.returncode)} on each of "
            f"{1 + MAX_RERUNS} runs; its last output:\n{out[-8000:]}",
            pytrace=False,
        )
    if proc.returncode == 0 and " skipped" in proc.stdout and " passed" not in proc.stdout:
        pytest.skip(f"skipped in its fresh process:\n{out[-2000:]}")
    if proc.returncode != 0 or " passed" not in proc.stdout:
        pytest.fail(
            f"failed in its fresh process (exit {proc.returncode}):\n{out[-8000:]}", pytrace=False
        )
    return True
