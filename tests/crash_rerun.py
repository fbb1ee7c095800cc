"""One rerun for a test whose pytest-xdist worker died (imported into ``tests/conftest.py``).

Why: jaxlib 0.10.2 and 0.11.2 occasionally segfault inside XLA:CPU's compile call (``backend_compile_and_load``) late in
a long worker process, in tests that pass alone and in whole-file runs (four crashes in about nine full-suite runs, in
three different tests; the faulting instruction is CPython's GC unlinking an object that was already unlinked). Every
crashing test compiles a program that holds Python host callbacks: ``jax.debug.callback`` in checked mode, the Pallas
strict interpreter's ``io_callback``s (cf. jax-ml/jax#18874, open: a segfault during compilation with a debug callback).
A crashed worker takes its test with it; that test is rescheduled once on a fresh worker. A second crash of the same
test fails it as before, every rerun is listed in the terminal summary, and nothing else is retried (an ordinary failure
or error is never rerun).
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
