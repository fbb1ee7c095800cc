"""Host facts needed before JAX is imported (this module imports nothing heavy)."""

from __future__ import annotations

import os

# Device files of NVIDIA / AMD GPUs and TPUs; none of them exists on a CPU-only host.
ACCELERATOR_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/accel0", "/dev/vfio")


def has_accelerator() -> bool:
    return any(os.path.exists(path) for path in ACCELERATOR_DEVICE_FILES)


def prefer_cpu_without_accelerator() -> None:
    """On a host with no accelerator, ask JAX for the CPU directly (unless ``JAX_PLATFORMS`` says otherwise), so
    jaxlib's CUDA plugin, which the lowering checks install, does not print a failed GPU initialisation or absent
    drivers. Call it
    before JAX initialises a backend."""
    if not has_accelerator():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # nor its INFO lines about absent CUDA drivers
