"""Test rig: 8 CPU devices for sharding tests, XLA:CPU code generation at -O0, f32 matmuls at full precision,
fast hypothesis profile."""

import os
import pathlib

from kernels.host import prefer_cpu_without_accelerator  # noqa: E402  (imports no JAX)
from tests.xla_flags import xla_cpu_compile_time_flags  # noqa: E402  (imports no JAX)

prefer_cpu_without_accelerator()  # the CUDA plugin of the lowering tests must not probe for a GPU
# 8 host devices for the sharding tests; LLVM at -O0 and, where jaxlib has them, the older (cheaper to compile) fusion
# emitters: the suite is bound by XLA:CPU compiles of tiny programs, not by their run time (-O0: about 40 % less wall
# time on the XLA-backend tests; tests/xla_flags.py; numerics tests use tolerances either way).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
                      + xla_cpu_compile_time_flags())
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

from tests.crash_rerun import (  # noqa: E402, F401  (hooks: one rerun of a test whose xdist worker crashed)
    pytest_handlecrashitem, pytest_report_teststatus, pytest_terminal_summary)
from tests.map_budget import pytest_runtest_teardown  # noqa: E402, F401  (JAX's caches vs vm.max_map_count)

hypothesis.settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                                     suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.register_profile("full", max_examples=60, deadline=None,
                                     suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_MEASURED_SLOW = pathlib.Path(__file__).with_name("slow_tests.txt")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Tests listed in ``slow_tests.txt`` (each measured at 1.5 s or more in the quick loop on a 2-core machine) are
    marked slow too, so ``-m "not slow"`` stays a short loop; CI runs them all."""
    if not _MEASURED_SLOW.exists():
        return
    listed = {line.strip() for line in _MEASURED_SLOW.read_text().splitlines() if line.strip()
              and not line.startswith("#")}
    for item in items:
        if item.nodeid in listed:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tests over ~5 s each on 2 cores (interpret-mode and hypothesis "
                            "sweeps, AOT compiles, second partitioners / dtypes / routings of a kept fast case); CI "
                            "runs them, -m 'not slow' skips them")


@pytest.fixture
def strict_interpreter():
    """``tests.helpers.STRICT`` interpret params; the TPU interpret-mode state is reset afterwards."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
    from tests.helpers import STRICT  # noqa: PLC0415
    try:
        yield STRICT
    finally:
        pltpu.reset_tpu_interpret_mode_state()
