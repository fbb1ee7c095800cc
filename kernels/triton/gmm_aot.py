"""AOT compile cases of the pointer GMM / TGMM kernels (families ``gmm`` and ``gmm_fused``; ``python -m kernels.aot``),
kept apart from the kernels in ``kernels.triton.gmm``; the swiglu family reuses the helpers."""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from kernels.registry import TARGETS, AotCase, register_aot
from kernels.triton import schedule, tuning
from kernels.triton.gmm import _PLAIN_ROWS, _PLAIN_TGMM_ROWS, _gmm_kernel, _tgmm_kernel

# AOT compile cases: every kernel x shipped config x dtype of a target at a Mixtral-like shape (K, N multiples of
# every tile), plus the bf16 configs at a GPT-OSS-like shape whose K and N are not (masked-K / wrapped-N code paths).

_AOT_M, _AOT_G = 16384, 8
_AOT_SHAPES = {"": (4096, 14336), ":ragged_kn": (2880, 5760)}
_AOT_DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def _aot_case(name, fn, dtype, cfg, backend, config_name, out_dtype=None, **constexprs):
    """One compile of ``fn`` with ``dtype`` operands (``out_dtype`` output, default the same); ``_gmm_kernel`` /
    ``_tgmm_kernel`` cases default to the plain row maps (``_PLAIN_ROWS`` / ``_PLAIN_TGMM_ROWS``)."""
    if fn is _gmm_kernel:
        signature = dict(lhs_ptr=f"*{dtype}", rhs_ptr=f"*{dtype}", lhs2_ptr=f"*{dtype}", rhs2_ptr=f"*{dtype}",
                         tiles_ptr="*i32", sort_idx_ptr="*i32", w_ptr="*fp32", out_ptr=f"*{out_dtype or dtype}")
        constexprs = {**_PLAIN_ROWS, "K2": 0, **constexprs}
    elif fn is _tgmm_kernel:
        signature = dict(lhs_ptr=f"*{dtype}", rhs_ptr=f"*{dtype}", bounds_ptr="*i32", sort_idx_ptr="*i32",
                         out_ptr=f"*{out_dtype or dtype}")
        constexprs = {**_PLAIN_TGMM_ROWS, **constexprs}
    else:  # another family's kernel: its caller sets the pointer signature
        signature = {}
    constexprs.update(BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m)
    signature.update({c: "constexpr" for c in constexprs})
    return AotCase(name, config_name, fn, signature, constexprs, cfg.compile_options(backend))


def _aot_points():
    """(dtype name, dtype, shape suffix, K, N): bf16 and f32 at the Mixtral-like shape, bf16 at the ragged one."""
    for (dtype_name, dtype), (suffix, (k, n)) in itertools.product(_AOT_DTYPES.items(), _AOT_SHAPES.items()):
        if not suffix or dtype_name == "bf16":
            yield dtype_name, dtype, suffix, k, n


@register_aot("gmm")
def aot_cases(target: str):
    """gmm, gmm with transpose_rhs, tgmm x every shipped config of ``target`` for bf16 and f32 (config names
    ``"<entry>:<dtype>[:ragged_kn]"``)."""
    backend = TARGETS[target][0]
    cases = []
    for dtype_name, dtype, suffix, k, n in _aot_points():
        for entry, cfg in tuning.shipped(target, "gmm", dtype).items():
            tiles = schedule.max_row_tiles(_AOT_M, cfg.block_m, _AOT_G)
            for transpose in ((False, True) if not suffix else (False,)):
                cases.append(_aot_case("gmm_transposed" if transpose else "gmm", _gmm_kernel, dtype_name, cfg,
                                       backend, f"{entry}:{dtype_name}{suffix}", K=k, N=n, TRANSPOSE_RHS=transpose,
                                       NUM_ROW_TILES=tiles))
        for entry, cfg in tuning.shipped(target, "tgmm", dtype).items():
            cases.append(_aot_case("tgmm", _tgmm_kernel, dtype_name, cfg, backend, f"{entry}:{dtype_name}{suffix}",
                                   K=k, N=n, NUM_GROUPS=_AOT_G))
    return cases


# The fused row maps (``kernels.triton.fused``) as the MoE layer uses them: gather (forward gate / up GMMs), weighted
# scatter (forward down GMM), gather with ``transpose_rhs`` into f32 (backward of the scatter GMM) and the two-pair
# scatter of the SwiGLU backward's dx (``scatter_gmm_sum``; K2 = "K": the second pair as wide as the first).
_AOT_TOP_K = 2
_FUSED_VARIANTS = {
    "gmm_gather": (False, None, dict(GATHER=True)),
    "gmm_scatter": (False, None, dict(SCATTER=True, WEIGHTED=True)),
    "gmm_gather_transposed_f32out": (True, "fp32", dict(GATHER=True)),
    "gmm_scatter_sum_transposed": (True, None, dict(SCATTER=True, WEIGHTED=True, K2="K")),
}


@register_aot("gmm_fused")
def fused_aot_cases(target: str):
    """Every fused variant x shipped gmm config of ``target`` for bf16 and f32 at the Mixtral-like shape, and the
    forward variants (gather, scatter) for bf16 at the ragged K / N shape."""
    backend = TARGETS[target][0]
    cases = []
    for dtype_name, dtype, suffix, k, n in _aot_points():
        for entry, cfg in tuning.shipped(target, "gmm", dtype).items():
            tiles = schedule.max_row_tiles(_AOT_M, cfg.block_m, _AOT_G)
            for name, (transpose, out_dtype, flags) in _FUSED_VARIANTS.items():
                if suffix and transpose:
                    continue
                flags = {key: k if value == "K" else value for key, value in flags.items()}
                cases.append(_aot_case(name, _gmm_kernel, dtype_name, cfg, backend, f"{entry}:{dtype_name}{suffix}",
                                       out_dtype=out_dtype, K=k, N=n, TRANSPOSE_RHS=transpose, NUM_ROW_TILES=tiles,
                                       TOP_K=_AOT_TOP_K, NUM_SLOTS=_AOT_M, **flags))
        for entry, cfg in tuning.shipped(target, "tgmm", dtype).items():
            for name, flags in _GATHER_TGMM_VARIANTS.items():
                cases.append(_aot_case(name, _tgmm_kernel, dtype_name, cfg, backend, f"{entry}:{dtype_name}{suffix}",
                                       K=k, N=n, NUM_GROUPS=_AOT_G, TOP_K=_AOT_TOP_K, NUM_SLOTS=_AOT_M, **flags))
    return cases


# gather_tgmm as the fused SwiGLU backward uses it: x gathered for dw_gate / dw_up, dout gathered for dw_down.
_GATHER_TGMM_VARIANTS = {"tgmm_gather_lhs": dict(GATHER_LHS=True), "tgmm_gather_rhs": dict(GATHER_RHS=True)}
