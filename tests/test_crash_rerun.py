"""``tests/crash_rerun.py``: a test whose xdist worker dies is rerun once on a fresh worker; a second crash, or an
ordinary failure, still fails the run."""

import os

pytest_plugins = ["pytester"]

CASES = """
import os, pathlib, signal

def test_crashes_once():
    mark = pathlib.Path({mark!r})
    if not mark.exists():
        mark.write_text("crashed")
        os.kill(os.getpid(), signal.SIGSEGV)

def test_always_crashes():
    os.kill(os.getpid(), signal.SIGSEGV)

def test_fails():
    assert False
"""


def test_crashed_worker_reruns_its_test_once(pytester, tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pytester.makeconftest("from tests.crash_rerun import (pytest_handlecrashitem, pytest_report_teststatus, "
                          "pytest_terminal_summary)")
    pytester.makepyfile(test_cases=CASES.format(mark=str(tmp_path / "mark")))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-p", "no:randomly")
    out = result.stdout.str()
    assert "2 failed, 1 passed, 2 rerun" in out, out
    assert "RERUN test_cases.py::test_crashes_once" in out and "RERUN test_cases.py::test_always_crashes" in out
    assert "crashed while running 'test_cases.py::test_always_crashes'" in out
    assert result.ret == 1
