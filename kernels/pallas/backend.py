"""The Pallas backend of ``moe_ops`` (the interface is documented in ``moe_ops.backend``)."""

from kernels.pallas.fused import gather_gmm, scatter_gmm
from kernels.pallas.gmm import gmm, tgmm
from kernels.pallas.swiglu import swiglu_gmm, swiglu_gmm_saved
from kernels.pallas.swiglu_bwd import swiglu_down_bwd, swiglu_down_bwd_saved
from kernels.pallas.sort import combine_rows, combine_weight_grad, gather_rows, sort_by_expert

__all__ = ["gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "gather_gmm",
           "scatter_gmm", "swiglu_gmm", "swiglu_gmm_saved", "swiglu_down_bwd", "swiglu_down_bwd_saved"]
