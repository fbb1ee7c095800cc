"""The Triton backend of ``moe_ops`` (the interface is documented in ``moe_ops.backend``). Every function batches
under ``jax.vmap`` (``kernels.triton.batching``): gmm / tgmm / the fused ops at their kernel launch, the sort and
row functions through the wrappers imported from there."""

from kernels.triton.batching import combine_rows, combine_weight_grad, gather_rows, sort_by_expert
from kernels.triton.fused import gather_gmm, scatter_gmm
from kernels.triton.gmm import gmm, tgmm

__all__ = ["gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "gather_gmm",
           "scatter_gmm"]
