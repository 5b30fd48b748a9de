"""pytest plugin: run a test again when its xdist worker dies of a signal (a native crash).

jaxlib 0.10.2's XLA:CPU has crashed pytest workers in this suite (2026-12-06: 1 of 3 fresh-clone
runs on the 2-core CI machine), each time in a different test, in native code (a compile, and once
``Executable.serialize`` writing the persistent compilation cache); the crashed tests pass on
their own (README, "Known issue"). A worker crash fails the whole suite, so this plugin uses
pytest-xdist's documented ``pytest_handlecrashitem`` hook to schedule the crashed test again on
a fresh worker. Only crashes are retried: a failed assertion or an exception fails at once,
as everywhere else. A test is run at most ``MAX_RERUNS`` more times (two since 2026-12-07: on
an AVX-512 machine each of three fresh-clone runs lost one worker, two of them in the same test,
while XLA:CPU deserialized a cached executable); a crash on every run fails it. Each retried test
is listed in the terminal summary (the worker's fatal-signal dump is printed above it by xdist), and the
count appears in the final line as "N rerun".

Loaded by ``tests/conftest.py``; ``tests/test_crash_rerun.py`` checks it on a throwaway suite.
"""

from collections import Counter

import pytest

#: Crashes of one test that are followed by another run; one more crash fails it.
MAX_RERUNS = 2
#: Heading of the terminal-summary section that lists the crashed tests.
SUMMARY_HEADING = "tests run again after their worker crashed"

_crashed: list[str] = []


@pytest.hookimpl(optionalhook=True)  # the hook exists only where pytest-xdist is installed
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist calls this in the controller when a worker dies while running ``crashitem``."""
    if _crashed.count(crashitem) >= MAX_RERUNS:
        _crashed.append(crashitem)  # counted in the summary; crashed on every run: stays failed
        return
    try:
        sched.mark_test_pending(crashitem)
    except NotImplementedError:  # schedulers such as --dist=loadscope cannot reschedule one test
        return
    _crashed.append(crashitem)
    report.outcome = "rerun"


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _crashed:
        return
    terminalreporter.section(SUMMARY_HEADING, yellow=True)
    for nodeid, crashes in Counter(_crashed).items():  # in order of first crash
        terminalreporter.line(nodeid + (f" ({crashes} crashes)" if crashes > 1 else ""))
