"""The Triton backend of ``moe_ops`` (the interface is documented in ``moe_ops.backend``).

Each function lowers for cpu (the interpreter bridge), cuda and rocm, and is traced when lowered, so its tile
config comes from the target's tuning table (``kernels.platform.on_platforms``, ``tuning.detect_arch``). Every
function batches under ``jax.vmap`` (``kernels.triton.batching``): gmm / tgmm (pointer and descriptor variants) / the
fused ops at their kernel launch, the sort and row functions through the wrappers imported from there."""

from kernels.platform import on_platforms
from kernels.triton import batching as _batching, fused as _fused, gmm as _gmm, gmm_tma as _gmm_tma
from kernels.triton import swiglu as _swiglu

TRITON_PLATFORMS = ("cpu", "cuda", "rocm")
_triton = on_platforms(*TRITON_PLATFORMS)


def _use_tma(*operands) -> bool:
    """``MOE_OPS_GMM_VARIANT`` (``gmm_tma.variant``) asks for the descriptor kernels and the call is eligible."""
    return _gmm_tma.variant() != "pointer" and _gmm_tma.eligible(*operands)


def _gmm_variant(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, config=None):
    """The GMM of the chosen variant."""
    impl = _gmm_tma.gmm if _use_tma(lhs, rhs) else _gmm.gmm
    return impl(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype, config=config)


def _tgmm_variant(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, config=None):
    """The TGMM of the chosen variant (the descriptor variants use TMA operands)."""
    impl = _gmm_tma.tgmm if _use_tma(lhs, rhs) else _gmm.tgmm
    return impl(lhs, rhs, group_sizes, group_offset, num_groups=num_groups, out_dtype=out_dtype, config=config)


gmm = _triton(_gmm_variant)
tgmm = _triton(_tgmm_variant)
sort_by_expert = _triton(_batching.sort_by_expert)
gather_rows = _triton(_batching.gather_rows)
combine_rows = _triton(_batching.combine_rows)
combine_weight_grad = _triton(_batching.combine_weight_grad)
gather_gmm = _triton(_fused.gather_gmm)
scatter_gmm = _triton(_fused.scatter_gmm)
scatter_gmm_sum = _triton(_fused.scatter_gmm_sum)
gather_tgmm = _triton(_gmm.gather_tgmm)
swiglu_gmm = _triton(_swiglu.swiglu_gmm)
swiglu_gmm_saved = _triton(_swiglu.swiglu_gmm_saved)
swiglu_down_bwd = _triton(_swiglu.swiglu_down_bwd)
swiglu_down_bwd_saved = _triton(_swiglu.swiglu_down_bwd_saved)

__all__ = ["gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "gather_gmm",
           "scatter_gmm", "scatter_gmm_sum", "gather_tgmm", "swiglu_gmm", "swiglu_gmm_saved", "swiglu_down_bwd",
           "swiglu_down_bwd_saved", "TRITON_PLATFORMS"]
