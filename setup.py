"""One distribution, two packages: ``kernels`` (Triton / Pallas kernels) and ``moe_ops`` (the public import)."""

from setuptools import find_packages, setup

_LINUX_X86 = "; sys_platform == 'linux' and platform_machine == 'x86_64'"
_LOWERING = [f"jax-cuda12-plugin>=0.10.2{_LINUX_X86}", f"jax-cuda12-pjrt>=0.10.2{_LINUX_X86}", "jax-triton>=0.3.1",
             "triton>=3.6"]

setup(
    name="moe-ops",
    version="0.1.0",
    description="Mixture-of-Experts kernels for JAX: grouped matmul, ragged sort, fused dispatch, expert parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["kernels", "kernels.*", "moe_ops", "moe_ops.*", "benchmarks", "benchmarks.*"]),
    install_requires=["jax>=0.10.2", "jaxlib>=0.10.2", "numpy"],
    extras_require={
        "gpu": ["jax-triton>=0.3.1", "triton>=3.6"],
        # The Triton CPU bridge needs jax-triton, triton and a CPU torch (the interpreter works on torch tensors).
        # jaxlib's CUDA plugin lets jax-triton's real CUDA / ROCm lowering run without a GPU (kernels.lowering); it
        # must match jaxlib's version (0.10.2 is the newest for Python 3.11).
        "lowering": _LOWERING,
        "test": ["pytest>=8", "pytest-xdist", "hypothesis>=6", "jax-triton>=0.3.1", "triton>=3.6", "torch==2.13.0",
                 "matplotlib", "tokamax>=0.0.12,<=0.0.17", *_LOWERING],
        # moe_ops.integrations.tokamax is tested with tokamax 0.0.12 on jax 0.10.2; 0.0.12 does not import on
        # jax 0.11.2, where 0.0.17 is the release seen working (see ../shared PITFALLS), hence the range.
        "tokamax": ["tokamax>=0.0.12,<=0.0.17"],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["moe-bench=benchmarks.__main__:main", "moe-aot=kernels.aot:main"]},
)
