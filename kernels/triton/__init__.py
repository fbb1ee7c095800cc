"""Triton GPU kernels (NVIDIA sm_90, AMD gfx950 / gfx942), called from JAX through ``jax_triton.triton_call``.

This package is a ``moe_ops`` backend (interface in ``moe_ops.backend``); ``gmm``/``tgmm`` live in
``kernels.triton.gmm`` and the token-permutation ops in ``kernels.triton.sort``. On a CPU-only jaxlib the same kernels
run through the interpreter bridge (``kernels.triton.bridge``), installed on import.
"""

from kernels._lazy import BACKEND_FUNCTIONS, exporter
from kernels.triton.bridge import load_jax_triton

load_jax_triton()
__getattr__ = exporter(__name__)
__all__ = sorted(BACKEND_FUNCTIONS)
