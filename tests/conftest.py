"""Test rig: 8 CPU devices for sharding tests, f32 matmuls at full precision, fast hypothesis profile."""

import os

from kernels.host import prefer_cpu_without_accelerator  # noqa: E402  (imports no JAX)

prefer_cpu_without_accelerator()  # the CUDA plugin of the lowering tests must not probe for a GPU
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                                     suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.register_profile("full", max_examples=60, deadline=None,
                                     suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tests over ~5 s each on 2 cores (interpret-mode and hypothesis "
                            "sweeps, AOT compiles, second partitioners / dtypes / routings of a kept fast case); CI "
                            "runs them, -m 'not slow' skips them")
