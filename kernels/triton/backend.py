"""The Triton backend of ``moe_ops`` (the interface is documented in ``moe_ops.backend``).

Each function lowers for cpu (the interpreter bridge), cuda and rocm, and is traced when lowered, so its tile
config comes from the target's tuning table (``kernels.platform.on_platforms``, ``tuning.detect_arch``)."""

from kernels.platform import on_platforms
from kernels.triton import fused as _fused, gmm as _gmm, gmm_tma as _gmm_tma, sort as _sort

TRITON_PLATFORMS = ("cpu", "cuda", "rocm")
_triton = on_platforms(*TRITON_PLATFORMS)



def _gmm_variant(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, config=None):
    """The GMM variant of ``MOE_OPS_GMM_VARIANT`` (``gmm_tma.variant``) where the call is eligible for it."""
    if _gmm_tma.variant() != "pointer" and _gmm_tma.eligible(lhs, rhs):
        return _gmm_tma.gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                            config=config)
    return _gmm.gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                    config=config)


gmm = _triton(_gmm_variant)
tgmm = _triton(_gmm.tgmm)
sort_by_expert = _triton(_sort.sort_by_expert)
gather_rows = _triton(_sort.gather_rows)
combine_rows = _triton(_sort.combine_rows)
combine_weight_grad = _triton(_sort.combine_weight_grad)
gather_gmm = _triton(_fused.gather_gmm)
scatter_gmm = _triton(_fused.scatter_gmm)

__all__ = ["gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "gather_gmm",
           "scatter_gmm", "TRITON_PLATFORMS"]
