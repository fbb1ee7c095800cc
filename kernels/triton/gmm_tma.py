"""Persistent TMA grouped matmul (``MOE_OPS_GMM_VARIANT=tma`` or ``persistent``): the same contract as ``gmm.gmm``.

On sm_90 the descriptors are TMA (``UTMALDG`` in the SASS); on AMD (gfx950 / gfx942, no TMA) Triton lowers the same
descriptor loads to buffer loads, so there it is the persistent variant sized to the CU count (256 / 304 programs).

``min(#SMs, tiles)`` programs walk the flattened (row tile x column tile) list of the device-side schedule
(``schedule.gmm_row_tiles``; its active row-tile count is read from the table, so idle tiles cost nothing) with the
GROUP_M swizzle. Operands load through device-side tensor descriptors (``tl.make_tensor_descriptor``: TMA on sm_90):
lhs as a 2-D ``[M, K]`` descriptor with ``[BM, BK]`` blocks, rhs as a 3-D ``[G, K, N]`` (``[G, N, K]`` with
``transpose_rhs``) descriptor with ``[1, BK, BN]`` blocks. TMA zero-fills out-of-bounds elements, so no K mask and no
N wrap are needed. The store is a masked pointer store: a tile must not write the rows of its neighbours (a TMA
store of a whole block would). The descriptors live in global scratch (``kernels.triton.scratch``).

Invariants (beyond those of the schedule):
1. Tile ``t`` of a program is ``pid + i * num_programs``; the flattened index is ``row_tile * cols + col`` through
   the swizzle over the *active* row tiles only, so every (active row tile, column tile) is visited exactly once.
2. Rows of the A block past the tile's end belong to another tile or lie past M (zero-filled): they only feed
   accumulator rows that the masked store discards.
3. Eligible calls only (``eligible``): bf16 / f16, 16-byte aligned row strides, plain row maps (the fused gather
   keeps cp.async: TMA cannot gather arbitrary rows on sm_90). Anything else runs the pointer kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels.registry import TARGETS, AotCase, register_aot
from kernels.triton import schedule, tuning
from kernels.triton.gmm import _swizzle  # the pointer kernel's GROUP_M tile order
from kernels.triton.scratch import triton_call_with_scratch

__all__ = ["gmm", "tgmm", "eligible", "variant", "use_variant", "VARIANTS"]

VARIANTS = ("pointer", "tma", "persistent")  # "persistent" names the same kernel by what it is on AMD
DESCRIPTOR_BYTES = 128          # one CUtensorMap
SCRATCH_PER_PROGRAM = 2 * DESCRIPTOR_BYTES  # lhs + rhs descriptors
_ZERO_FILL = tl.constexpr(schedule.ZERO_FILL)
_INTERPRETER_PROGRAMS = 3       # a few programs on CPU, so the persistent loop takes several tiles each


_forced = threading.local()


def variant() -> str:
    """The GMM variant, read when a GMM is traced: ``use_variant``'s, else ``MOE_OPS_GMM_VARIANT`` (pointer | tma |
    persistent), default ``pointer`` until a GPU run has shown the TMA kernel correct and faster (benchmarks/RESULTS.md)."""
    name = getattr(_forced, "name", None) or os.environ.get("MOE_OPS_GMM_VARIANT", "pointer")
    if name not in VARIANTS:
        raise ValueError(f"MOE_OPS_GMM_VARIANT must be one of {VARIANTS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_variant(name: str):
    """Trace GMMs inside the block with variant ``name`` (the benchmark times every variant in one run)."""
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        variant()
        yield
    finally:
        _forced.name = previous


def eligible(*operands) -> bool:
    """16-bit operands (f32 runs ieee FMA dots: the pointer kernel's small tiles, where TMA buys nothing and the
    TMA build spills) whose rows are 16-byte aligned (last dim x 2 bytes a multiple of 16: the descriptor strides),
    and at least one row."""
    return all(jnp.dtype(a.dtype).itemsize == 2 and (a.shape[-1] * 2) % 16 == 0 and a.shape[0] > 0
               for a in operands)


@triton.jit
def _gmm_tma_kernel(lhs_ptr, rhs_ptr, tiles_ptr, out_ptr,
                    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, G: tl.constexpr,
                    TRANSPOSE_RHS: tl.constexpr, NUM_ROW_TILES: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    NUM_STAGES: tl.constexpr):
    """Persistent program ``pid``: every ``NUM_PROGRAMS``-th output tile (module docstring)."""
    a_desc = tl.make_tensor_descriptor(lhs_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if TRANSPOSE_RHS:
        b_desc = tl.make_tensor_descriptor(rhs_ptr, shape=[G, N, K], strides=[N * K, K, 1], block_shape=[1, BN, BK])
    else:
        b_desc = tl.make_tensor_descriptor(rhs_ptr, shape=[G, K, N], strides=[K * N, N, 1], block_shape=[1, BK, BN])
    num_col_tiles: tl.constexpr = (N + BN - 1) // BN
    active_rows = tl.load(tiles_ptr + 3 * NUM_ROW_TILES)  # row tiles before the first IDLE one
    offs_m = tl.arange(0, BM)
    offs_n_base = tl.arange(0, BN)
    for tile in tl.range(tl.program_id(0), active_rows * num_col_tiles, NUM_PROGRAMS):
        tile_m, tile_n = _swizzle(tile, active_rows, num_col_tiles, GROUP_M)
        group = tl.load(tiles_ptr + tile_m)
        row_start = tl.load(tiles_ptr + NUM_ROW_TILES + tile_m)
        row_end = tl.load(tiles_ptr + 2 * NUM_ROW_TILES + tile_m)
        offs_n = tile_n * BN + offs_n_base
        out_ptrs = out_ptr + row_start.to(tl.int64) * N + offs_m[:, None] * N + offs_n[None, :]
        store_mask = (offs_m[:, None] < row_end - row_start) & (offs_n[None, :] < N)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if group >= 0:
            g = tl.maximum(group, 0)
            for k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
                a = a_desc.load([row_start, k * BK])
                if TRANSPOSE_RHS:
                    b = tl.trans(b_desc.load([g, tile_n * BN, k * BK]).reshape(BN, BK))
                else:
                    b = b_desc.load([g, k * BK, tile_n * BN]).reshape(BK, BN)
                acc = tl.dot(a, b, acc, input_precision="ieee")
        if group >= _ZERO_FILL:  # local group: the product; non-local / beyond the sum: zeros
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _tgmm_tma_kernel(lhs_ptr, rhs_ptr, bounds_ptr, out_ptr,
                     M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NUM_GROUPS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """One BK x BN tile of ``out[g] = lhs[rows of g].T @ rhs[rows of g]`` (``gmm._tgmm_kernel``'s contract and
    longest-first order) with TMA operands: ``[M, K]`` / ``[M, N]`` descriptors with ``[BM, BK]`` / ``[BM, BN]``
    blocks. Full chunks are used as loaded; in the tail chunk the rows past the group's end (the next group's, or
    TMA's zero fill past M) are zeroed in registers."""
    a_desc = tl.make_tensor_descriptor(lhs_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(rhs_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    tiles_k: tl.constexpr = (K + BK - 1) // BK
    tiles_n: tl.constexpr = (N + BN - 1) // BN
    pid = tl.program_id(0)
    slot = pid // (tiles_k * tiles_n)
    tile_k, tile_n = _swizzle(pid % (tiles_k * tiles_n), tiles_k, tiles_n, GROUP_M)
    group = tl.load(bounds_ptr + slot)
    start = tl.load(bounds_ptr + NUM_GROUPS + slot)
    end = tl.load(bounds_ptr + 2 * NUM_GROUPS + slot)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    full_chunks = (end - start) // BM
    for i in tl.range(0, full_chunks, num_stages=NUM_STAGES):
        row = start + i * BM
        acc = tl.dot(tl.trans(a_desc.load([row, tile_k * BK])), b_desc.load([row, tile_n * BN]), acc,
                     input_precision="ieee")
    rows_left = end - start - full_chunks * BM
    if rows_left > 0:
        row = start + full_chunks * BM
        keep = tl.arange(0, BM)[:, None] < rows_left
        a = tl.where(keep, a_desc.load([row, tile_k * BK]), 0.0)
        b = tl.where(keep, b_desc.load([row, tile_n * BN]), 0.0)
        acc = tl.dot(tl.trans(a.to(lhs_ptr.dtype.element_ty)), b.to(rhs_ptr.dtype.element_ty), acc,
                     input_precision="ieee")
    offs_k = tile_k * BK + tl.arange(0, BK)
    offs_n = tile_n * BN + tl.arange(0, BN)
    out_ptrs = out_ptr + group.to(tl.int64) * (K * N) + offs_k[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


SM90_SHARED = 227 * 1024
MAX_STAGES = 4


def tma_config(cfg: tuning.GmmConfig, itemsize: int, arch: str) -> tuning.GmmConfig:
    """The pointer config with as many pipeline stages (up to 4) as sm_90's shared memory holds: TMA loads have no
    register cost per stage, so deeper pipelines are free where they fit. Other targets keep the table's stages."""
    if arch != "sm90":
        return cfg
    per_stage = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize
    stages = max(cfg.num_stages, min(MAX_STAGES, SM90_SHARED // per_stage))
    return dataclasses.replace(cfg, num_stages=stages)


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, config=None):
    """``gmm.tgmm``'s contract (lhs [M,K], rhs [M,N] -> [G_local,K,N]) with TMA operands. The caller checks
    ``eligible`` (for ``lhs`` and ``rhs`` rows)."""
    m, k = lhs.shape
    n = rhs.shape[1]
    arch = tuning.detect_arch()
    cfg = config or tuning.pick_config("tgmm", m, k, n, num_groups, lhs.dtype, arch=arch)
    bounds = schedule.tgmm_group_bounds(group_sizes, group_offset, num_groups)
    grid = num_groups * triton.cdiv(k, cfg.block_k) * triton.cdiv(n, cfg.block_n)
    return triton_call_with_scratch(
        lhs, rhs, bounds.reshape(-1), kernel=_tgmm_tma_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), grid=grid, scratch_bytes=SCRATCH_PER_PROGRAM,
        name="moe_tgmm_tma", num_warps=cfg.num_warps, num_stages=cfg.num_stages, M=m, K=k, N=n,
        NUM_GROUPS=num_groups, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
        NUM_STAGES=cfg.num_stages)


def num_programs(arch: str, total_tiles: int) -> int:
    """``min(#SMs, tiles)`` on a GPU; a few programs under the interpreter."""
    sms = tuning.NUM_SMS.get(arch, _INTERPRETER_PROGRAMS)
    return max(1, min(sms, total_tiles))


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, config=None):
    """``gmm.gmm``'s contract (lhs [M,K], rhs [G_local,K,N] / [G_local,N,K] -> [M,N], zero rows outside local
    groups) through the persistent TMA kernel. The caller checks ``eligible``."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    arch = tuning.detect_arch()
    cfg = config or tma_config(tuning.pick_config("gmm", m, k, n, num_local, lhs.dtype, arch=arch),
                               jnp.dtype(lhs.dtype).itemsize, arch)
    tiles = schedule.gmm_row_tiles(group_sizes, group_offset, m, num_local, cfg.block_m)
    num_row_tiles = tiles.shape[1]
    active = jnp.sum(tiles[0] != schedule.IDLE, dtype=jnp.int32)[None]
    programs = num_programs(arch, num_row_tiles * triton.cdiv(n, cfg.block_n))
    return triton_call_with_scratch(
        lhs, rhs, jnp.concatenate([tiles.reshape(-1), active]), kernel=_gmm_tma_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=programs, scratch_bytes=SCRATCH_PER_PROGRAM,
        name="moe_gmm_tma", num_warps=cfg.num_warps, num_stages=cfg.num_stages, M=m, K=k, N=n, G=num_local,
        TRANSPOSE_RHS=bool(transpose_rhs), NUM_ROW_TILES=num_row_tiles, NUM_PROGRAMS=programs, BM=cfg.block_m,
        BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages)


# ---------------------------------------------------------------------------------------------------------------
# AOT cases: every shipped 16-bit gmm config of a target x transpose, and every 16-bit tgmm config, at the AOT check's
# Mixtral-like shape.

_AOT_M, _AOT_G, _AOT_K, _AOT_N = 16384, 8, 4096, 14336


@register_aot("gmm_tma")
def aot_cases(target: str):
    backend = TARGETS[target][0]
    arch = target if target in tuning.NUM_SMS else "sm90"
    cases = []
    for dtype_name, dtype in (("bf16", jnp.bfloat16),):
        for entry, table_cfg in tuning.shipped(target, "gmm", dtype).items():
            cfg = tma_config(table_cfg, jnp.dtype(dtype).itemsize, target)
            rows = schedule.max_row_tiles(_AOT_M, cfg.block_m, _AOT_G)
            for transpose in (False, True):
                constexprs = dict(M=_AOT_M, K=_AOT_K, N=_AOT_N, G=_AOT_G, TRANSPOSE_RHS=transpose,
                                  NUM_ROW_TILES=rows, NUM_PROGRAMS=num_programs(arch, rows * -(-_AOT_N // cfg.block_n)),
                                  BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
                                  NUM_STAGES=cfg.num_stages)
                signature = dict(lhs_ptr=f"*{dtype_name}", rhs_ptr=f"*{dtype_name}", tiles_ptr="*i32",
                                 out_ptr=f"*{dtype_name}", **{c: "constexpr" for c in constexprs})
                cases.append(AotCase("gmm_tma_transposed" if transpose else "gmm_tma", f"{entry}:{dtype_name}",
                                     _gmm_tma_kernel, signature, constexprs, cfg.compile_options(backend)))
        for entry, cfg in tuning.shipped(target, "tgmm", dtype).items():
            constexprs = dict(M=_AOT_M, K=_AOT_K, N=_AOT_N, NUM_GROUPS=_AOT_G, BM=cfg.block_m, BN=cfg.block_n,
                              BK=cfg.block_k, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages)
            signature = dict(lhs_ptr=f"*{dtype_name}", rhs_ptr=f"*{dtype_name}", bounds_ptr="*i32",
                             out_ptr=f"*{dtype_name}", **{c: "constexpr" for c in constexprs})
            cases.append(AotCase("tgmm_tma", f"{entry}:{dtype_name}", _tgmm_tma_kernel, signature, constexprs,
                                 cfg.compile_options(backend)))
    return cases
