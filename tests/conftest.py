"""Test rig: 8 CPU devices for sharding tests, f32 matmuls at full precision, fast hypothesis profile."""

import os

if not any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/kfd", "/dev/accel0", "/dev/vfio")):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator: the CUDA plugin (lowering tests) must not probe
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
    config.addinivalue_line("markers", "slow: long interpret-mode sweeps (run with -m slow or in the full CI run)")
