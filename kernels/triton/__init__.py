"""Triton GPU kernels (NVIDIA sm_90, AMD gfx950 / gfx942), called from JAX through ``jax_triton.triton_call``.

This package is a ``moe_ops`` backend (see ``moe_ops.backend`` for the interface). On a CPU-only jaxlib the same
kernels run through the interpreter bridge (``kernels.triton.bridge``).
"""

from kernels.triton.bridge import load_jax_triton

load_jax_triton()

from kernels.triton.gmm import gmm, tgmm  # noqa: E402
from kernels.triton.sort import combine_rows, combine_weight_grad, gather_rows, sort_by_expert  # noqa: E402

__all__ = ["gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad"]
