"""``_isolated.run_isolated``: a body that passes, fails an assertion, or dies of a signal once or
twice in its subprocess."""

import os
import signal

import pytest
from _isolated import CrashWarning, run_isolated


def crash_first_time(path):
    """Dies of SIGSEGV in the first attempt (no marker next to its directory yet), passes after."""
    marker = path.parent / "crashed_once"
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGSEGV)


def crash_always(path):
    os.kill(os.getpid(), signal.SIGSEGV)


def fail_assertion(path):
    (path.parent / f"ran_{path.name}").touch()
    assert 1 + 1 == 3, "the body's own message"


def test_a_crash_is_reported_with_its_dump_and_run_once_more(tmp_path):
    with pytest.warns(CrashWarning, match=r"(?s)SIGSEGV.*Fatal Python error.*crash_first_time"):
        run_isolated("test_isolated", "crash_first_time", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt0", "attempt1", "crashed_once"]


def test_two_crashes_fail_with_both_dumps(tmp_path):
    with pytest.warns(CrashWarning), pytest.raises(AssertionError, match="crashed twice") as e:
        run_isolated("test_isolated", "crash_always", tmp_path)
    assert str(e.value).count("Fatal Python error") == 2


def test_a_failed_assertion_fails_at_once_with_its_traceback(tmp_path):
    with pytest.raises(AssertionError, match="the body's own message"):
        run_isolated("test_isolated", "fail_assertion", tmp_path)
    assert [p.name for p in tmp_path.glob("ran_*")] == ["ran_attempt0"]  # not retried


def uses_the_sessions_compilation_cache(path):
    import jax

    expected = (path.parent / "cache_dir").read_text()
    assert jax.config.jax_compilation_cache_dir == expected
    # Only with a size limit does JAX lock the cache's entries (workers share the directory).
    assert jax.config.jax_compilation_cache_max_size > 0


def test_workers_and_subprocesses_share_one_locked_compilation_cache(tmp_path):
    """conftest's per-session cache: this process and a test subprocess use the same directory,
    which exists while the session runs, with the size limit that turns JAX's file lock on."""
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir
    assert cache_dir and os.path.isdir(cache_dir)
    assert jax.config.jax_compilation_cache_max_size > 0
    (tmp_path / "cache_dir").write_text(cache_dir)
    run_isolated("test_isolated", "uses_the_sessions_compilation_cache", tmp_path)
