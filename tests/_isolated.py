"""Run a test's body in a fresh Python process, and say loudly when that process crashes.

Twice in fresh-clone CI runs (once with XLA:CPU's YNNPACK fusions on, once with them off) a pytest
worker died of a fatal signal in the middle of ``test_trainer.py::test_resume_is_exact...``; the test
passes alone, and 20 local runs of it (two at a time, as CI runs them) did not crash.
The only output CI kept was the end of the worker's faulthandler dump (the main thread's execnet
frames), not the crashing thread. :func:`run_isolated` runs such a body in a subprocess with
faulthandler on, so that

- an assertion failure in the body fails the test with the body's traceback;
- a death by signal is reported as a :class:`CrashWarning` carrying the head of the faulthandler dump
  (the crashing thread first), which pytest prints in its warnings summary, and the body is run once
  more in a new process; a second crash fails the test with both dumps.

The retry is for the process crash only, which is not this project's code (see README, "Known
issue"); it never retries a failed assertion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


class CrashWarning(UserWarning):
    """A test subprocess died of a signal (and was run again)."""


def _crash_report(stderr: str, lines: int = 80) -> str:
    """The faulthandler dump from its first line (the crashing thread comes first), or the tail."""
    at = stderr.find("Fatal Python error")
    text = stderr[at:] if at >= 0 else stderr[-6000:]
    return "\n".join(text.splitlines()[:lines])


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_isolated(module: str, function: str, tmp_path: Path, *, timeout: int = 900) -> None:
    """Run ``module.function(path)`` (a module of ``tests/``) in a fresh process, with the suite's
    environment (conftest's XLA flags and matmul precision), once more if the process dies of a signal.

    ``path`` is a new directory under ``tmp_path`` for each attempt.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    crashes: list[str] = []
    for attempt in range(2):
        workdir = Path(tmp_path) / f"attempt{attempt}"
        workdir.mkdir()
        code = (
            "import conftest, pathlib, importlib; "
            f"getattr(importlib.import_module({module!r}), {function!r})"
            f"(pathlib.Path({str(workdir)!r}))"
        )
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", code],
            env=env,
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode == 0:
            return
        if proc.returncode > 0:  # an exception in the body: its traceback is the failure
            raise AssertionError(f"{module}.{function} failed:\n{proc.stderr[-8000:]}")
        report = (
            f"{module}.{function} (attempt {attempt + 1}) died of {_signal_name(proc.returncode)}:"
            f"\n{_crash_report(proc.stderr)}"
        )
        crashes.append(report)
        if attempt == 0:
            warnings.warn(report + "\n(run again in a fresh process)", CrashWarning, stacklevel=2)
    raise AssertionError("the subprocess crashed twice:\n\n" + "\n\n".join(crashes))
