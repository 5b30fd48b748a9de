"""``_crash_rerun``: a test whose xdist worker dies of a signal runs again (at most ``MAX_RERUNS``
more times); failures do not. ``_fresh_process``: a test marked ``fresh_process`` runs in a process
of its own, again if that process dies of a signal."""

import os
import subprocess
import sys
from pathlib import Path

from _crash_rerun import MAX_RERUNS, SUMMARY_HEADING

SUITE = """
import os
import signal
from pathlib import Path

import pytest

RUNS = Path(os.environ["RUNS_DIR"])


def count(name):
    with (RUNS / name).open("a") as f:  # closed (written) before the caller may crash
        f.write("x")
    return len((RUNS / name).read_text())


def test_crashes_first_time():
    if count("crash_once") == 1:
        os.kill(os.getpid(), signal.SIGSEGV)


def test_crashes_always():
    count("crash_always")
    os.kill(os.getpid(), signal.SIGSEGV)


def test_fails_an_assertion():
    count("assertion")
    assert 1 + 1 == 3


def test_passes():
    count("passes")


@pytest.mark.fresh_process
def test_fresh_records_its_process():
    count("fresh_process")
    (RUNS / "fresh_pids").write_text(f"{os.getpid()} {os.environ.get('ACTFOCUS_IN_FRESH_PROCESS')}")


@pytest.mark.fresh_process
def test_fresh_dies_once():
    if count("fresh_crash_once") == 1:
        os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.fresh_process
def test_fresh_dies_always():
    count("fresh_crash_always")
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.fresh_process
def test_fresh_asserts_wrongly():
    count("fresh_assertion")
    assert 1 + 1 == 3


def test_worker_records_its_process():
    (RUNS / "worker_pids").write_text(str(os.getpid()))
"""


def run_suite(tmp_path, *selected, returncode, dist="load"):
    """Runs the selected throwaway tests on 2 xdist workers with the plugin; returns the output
    and how many times each test body ran."""
    (tmp_path / "test_throwaway.py").write_text(SUITE)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = dict(os.environ, RUNS_DIR=str(runs), PYTHONPATH=str(Path(__file__).parent))
    args = ["-n", "2", f"--dist={dist}", "-p", "_crash_rerun", "-p", "_fresh_process"]
    args += ["-p", "no:cacheprovider"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-k", " or ".join(selected)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == returncode, out
    return out, {p.name: len(p.read_text()) for p in runs.iterdir() if not p.name.endswith("pids")}


def test_a_crashed_test_runs_once_more_and_is_listed(tmp_path):
    out, counts = run_suite(tmp_path, "crashes_first_time", "passes", returncode=0)
    assert counts == {"crash_once": 2, "passes": 1}
    assert "2 passed, 1 rerun" in out
    summary = out.split(SUMMARY_HEADING)[1]
    assert "test_throwaway.py::test_crashes_first_time" in summary


def test_a_third_crash_and_a_failed_assertion_fail_without_more_runs(tmp_path):
    out, counts = run_suite(tmp_path, "crashes_always", "fails_an_assertion", returncode=1)
    assert counts == {"crash_always": 1 + MAX_RERUNS, "assertion": 1}
    assert f"2 failed, {MAX_RERUNS} rerun" in out
    summary = out.split(SUMMARY_HEADING)[1]
    assert f"test_throwaway.py::test_crashes_always ({1 + MAX_RERUNS} crashes)" in summary


def test_a_scheduler_that_cannot_reschedule_leaves_the_crash_failed(tmp_path):
    """--dist=loadscope has no ``mark_test_pending``: the crash report stays a failure (xdist
    itself sends the rest of the crashed worker's scope to the new worker)."""
    out, _ = run_suite(tmp_path, "crashes_first_time", "passes", returncode=1, dist="loadscope")
    assert "FAILED test_throwaway.py::test_crashes_first_time - worker" in out
    assert "rerun" not in out.lower() and SUMMARY_HEADING not in out


def test_a_fresh_process_test_runs_outside_the_worker_and_again_after_a_crash(tmp_path):
    out, counts = run_suite(
        tmp_path,
        "fresh_records",
        "fresh_dies_once",
        "worker_records",
        "fresh_asserts",
        returncode=1,
    )
    # Each ran once, except the crashed one, which ran again in a new process and passed.
    assert counts == {"fresh_process": 1, "fresh_crash_once": 2, "fresh_assertion": 1}
    assert "1 failed, 3 passed" in out and "rerun" not in out  # the worker itself never crashed
    assert "test_fresh_dies_once: its fresh process died of SIGSEGV (run 1 of" in out
    # The failed assertion is reported with the fresh process's own output.
    assert "FAILED test_throwaway.py::test_fresh_asserts_wrongly" in out
    assert "failed in its fresh process" in out and "assert (1 + 1) == 3" in out
    pid, inside = (tmp_path / "runs" / "fresh_pids").read_text().split()
    assert inside == "1" and pid != (tmp_path / "runs" / "worker_pids").read_text()


def test_a_fresh_process_that_always_crashes_fails_after_the_reruns(tmp_path):
    out, counts = run_suite(tmp_path, "fresh_dies_always", returncode=1)
    assert counts == {"fresh_crash_always": 1 + MAX_RERUNS}
    assert f"died of SIGSEGV on each of {1 + MAX_RERUNS} runs" in out
