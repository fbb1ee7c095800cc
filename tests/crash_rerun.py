"""One rerun for a test whose pytest-xdist worker died (imported into ``tests/conftest.py``).

Why: a worker used to segfault or abort inside XLA:CPU's compile call (``backend_compile_and_load``) late in a long
run: the process had reached Linux's limit on memory mappings (``vm.max_map_count``), because every executable in
JAX's caches holds some. ``tests/map_budget.py`` now clears those caches before the limit; this rerun stays as the
safety net for any other crash. A crashed worker takes its test with it; that test is rescheduled once on a fresh
worker. A second crash of the same test fails it as before, every rerun is listed in the terminal summary, and nothing
else is retried (an ordinary failure or error is never rerun).
"""

from __future__ import annotations

import pytest

MAX_RERUNS = 1
_reruns: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """xdist's hook for a test whose worker died: reschedule it once (``report`` becomes a ``rerun`` report)."""
    if _reruns.get(crashitem, 0) < MAX_RERUNS:
        _reruns[crashitem] = _reruns.get(crashitem, 0) + 1
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    if _reruns:
        terminalreporter.write_sep("=", "tests rerun after their xdist worker crashed", yellow=True)
        for nodeid in sorted(_reruns):
            terminalreporter.write_line(f"RERUN {nodeid} (see tests/crash_rerun.py)")
