"""The test rig's version-gated XLA:CPU flags (tests/xla_flags.py)."""

import os

import jaxlib

from tests.xla_flags import xla_cpu_compile_time_flags


def test_flag_only_for_jaxlib_versions_that_have_it():
    assert xla_cpu_compile_time_flags((0, 10)) == " --xla_cpu_use_fusion_emitters=false"
    assert xla_cpu_compile_time_flags((0, 9)) == " --xla_cpu_use_fusion_emitters=false"
    assert xla_cpu_compile_time_flags((0, 11)) == ""   # removed there: XLA would abort on it
    assert xla_cpu_compile_time_flags((1, 0)) == ""


def test_this_process_runs_with_the_flags_of_its_jaxlib():
    """conftest.py put them in XLA_FLAGS before the backend started (unless the caller set XLA_FLAGS itself)."""
    flags = xla_cpu_compile_time_flags()
    major, minor = (int(p) for p in jaxlib.__version__.split(".")[:2])
    assert bool(flags) == ((major, minor) < (0, 11))
    if "--xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", ""):  # the rig's own default
        assert flags.strip() in os.environ["XLA_FLAGS"]
