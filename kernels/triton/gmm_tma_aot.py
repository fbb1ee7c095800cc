"""AOT compile cases of the persistent TMA kernels (``kernels.triton.gmm_tma``), family ``"gmm_tma"``: every shipped
16-bit gmm config of a target x ``transpose_rhs`` with the launch's own epilogue and stage count
(``gmm_tma.gmm_setup``), the "large" entry once more with an f32 output (a 4-byte staging buffer), and every 16-bit
tgmm config, at the AOT check's Mixtral-like shape; the gmm and tgmm configs again at the GPT-OSS-like shape whose K
and N are no tile multiples (``:ragged_kn``, as the pointer family). ``NUM_PROGRAMS`` is the target's SM / CU count."""

from __future__ import annotations

import jax.numpy as jnp

from kernels.registry import TARGETS, AotCase, register_aot
from kernels.triton import gmm_tma, schedule, tuning

_AOT_M, _AOT_G = 16384, 8
_AOT_SHAPES = {"": (4096, 14336), ":ragged_kn": (2880, 5760)}
_TYPES = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float32): "fp32"}


def _gmm_case(target, entry, transpose, out_dtype, suffix=""):
    arch = target if target in tuning.NUM_SMS else "sm90"
    table_cfg = tuning.shipped(target, "gmm", jnp.bfloat16)[entry]
    k, n = _AOT_SHAPES[suffix]
    cfg, ep = gmm_tma.gmm_setup(arch, table_cfg, n, jnp.bfloat16, out_dtype)
    rows = schedule.max_row_tiles(_AOT_M, cfg.block_m, _AOT_G)
    constexprs = dict(M=_AOT_M, K=k, N=n, G=_AOT_G, TRANSPOSE_RHS=transpose, NUM_ROW_TILES=rows,
                      NUM_PROGRAMS=gmm_tma.num_programs(arch, rows * -(-n // cfg.block_n)),
                      BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
                      NUM_STAGES=cfg.num_stages, FLATTEN=gmm_tma.flatten(arch), **ep.constexprs())
    out = _TYPES[jnp.dtype(out_dtype)]
    signature = dict(lhs_ptr="*bf16", rhs_ptr="*bf16", tiles_ptr="*i32", out_ptr=f"*{out}",
                     **{c: "constexpr" for c in constexprs})
    name = "gmm_tma_transposed" if transpose else "gmm_tma"
    config = f"{entry}:bf16{suffix}" + ("" if out == "bf16" else f":{out}out")
    return AotCase(name, config, gmm_tma._gmm_tma_kernel, signature, constexprs,
                   cfg.compile_options(TARGETS[target][0]))


@register_aot("gmm_tma")
def aot_cases(target: str):
    backend = TARGETS[target][0]
    cases = []
    for suffix, (k, n) in _AOT_SHAPES.items():
        for entry in tuning.shipped(target, "gmm", jnp.bfloat16):
            cases += [_gmm_case(target, entry, transpose, jnp.bfloat16, suffix)
                      for transpose in ((False, True) if not suffix else (False,))]
        if not suffix:
            cases.append(_gmm_case(target, "large", False, jnp.float32))
        for entry, cfg in tuning.shipped(target, "tgmm", jnp.bfloat16).items():
            constexprs = dict(M=_AOT_M, K=k, N=n, NUM_GROUPS=_AOT_G, BM=cfg.block_m, BN=cfg.block_n,
                              BK=cfg.block_k, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages)
            signature = dict(lhs_ptr="*bf16", rhs_ptr="*bf16", bounds_ptr="*i32", out_ptr="*bf16",
                             **{c: "constexpr" for c in constexprs})
            cases.append(AotCase("tgmm_tma", f"{entry}:bf16{suffix}", gmm_tma._tgmm_tma_kernel, signature,
                                 constexprs, cfg.compile_options(backend)))
    return cases
