"""Triton grouped matmuls (the ``gmm`` / ``tgmm`` functions of the ``moe_ops.backend`` interface).

* ``gmm``:  lhs [M,K] x rhs [G_local,K,N] (or [G_local,N,K] with ``transpose_rhs``) -> [M,N].
  Grid: a static worst-case number of row tiles (``schedule.max_row_tiles``) times ``cdiv(N, BN)`` column tiles,
  1-D with a GROUP_M swizzle. Each row tile comes from the device-side table of ``schedule.gmm_row_tiles`` (group,
  row start, row end); tiles never straddle groups, rows past a tile's end are clamped on load and masked on store,
  zero-fill tiles (non-local groups, rows beyond the sum) store zeros, idle tiles exit at once.
  ``transpose_rhs`` is a constexpr choice of strides: no transpose is materialised.
  Optional fused row maps (constexpr flags, see ``_gmm_kernel`` / ``RowMap``; used by ``kernels.triton.fused``):
  gather the A rows through ``sort_idx // top_k``, scale output rows by a per-slot weight, scatter output rows to
  ``sort_idx`` (token-major). Plain ``gmm`` compiles with all of them off.
* ``tgmm``: lhs [M,K], rhs [M,N] -> [G_local,K,N]. Grid: G_local x cdiv(K,BK) x cdiv(N,BN) output tiles (group
  slowest, longest group first, GROUP_M swizzle inside a group); each loops over its group's rows in BM chunks,
  unmasked except for one tail chunk (rows masked to zero past the group's end), so empty groups store zeros.

K and N are constexprs (static in JAX anyway): strides and divisibility are then known to the compiler, and when
``K % BK == 0`` (``N % BN == 0``) the K mask (the column wrap) compiles away. Accumulation is f32; f32 inputs use
ieee dots (exact f32 products). Configs come from ``kernels.triton.tuning`` unless one is passed explicitly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels.triton import batching, schedule, tuning
from kernels.triton.bridge import triton_call

__all__ = ["gmm", "tgmm", "gather_tgmm", "launch_gmm", "RowMap"]

_ZERO_FILL = tl.constexpr(schedule.ZERO_FILL)  # row-tile group ids the kernel reads (see schedule, invariant 3)


@triton.jit
def _swizzle(pid, num_rows_of_tiles, num_cols_of_tiles, GROUP_M: tl.constexpr):
    """pid -> (tile row, tile column), walking bands of GROUP_M tile rows column by column (L2 reuse of the
    column operand within a band, of the row operand across it). A bijection on [0, rows*cols)."""
    width = GROUP_M * num_cols_of_tiles
    band = pid // width
    first = band * GROUP_M
    height = tl.minimum(num_rows_of_tiles - first, GROUP_M)
    return first + (pid % width) % height, (pid % width) // height


@triton.jit
def _row_tile(tiles_ptr, NUM_ROW_TILES: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of a gmm-schedule kernel: (group, row start, row end, column tile) from the
    ``schedule.gmm_row_tiles`` table (row ``tile_m`` of its three rows) and the GROUP_M swizzle."""
    tile_m, tile_n = _swizzle(tl.program_id(0), NUM_ROW_TILES, tl.cdiv(N, BN), GROUP_M)
    group = tl.load(tiles_ptr + tile_m)
    row_start = tl.load(tiles_ptr + NUM_ROW_TILES + tile_m)
    row_end = tl.load(tiles_ptr + 2 * NUM_ROW_TILES + tile_m)
    return group, row_start, row_end, tile_n


@triton.jit
def _sorted_slots(sort_idx_ptr, row_start, row_end, offs_m, NUM_SLOTS: tl.constexpr):
    """Fused row maps: the token-major slot ``sort_idx[row]`` of each sorted row of a tile. Rows past the tile's end
    are clamped into it (idle tiles, start = end = 0, read row 0) and values are clamped to ``[0, NUM_SLOTS)``, so
    no access leaves its buffer even for a ``sort_idx`` that is not a permutation."""
    rows = tl.maximum(tl.minimum(offs_m, row_end - row_start - 1), 0)
    slots = tl.load(sort_idx_ptr + row_start + rows)
    return tl.minimum(tl.maximum(slots, 0), NUM_SLOTS - 1)


@triton.jit
def _accumulate(acc, lhs_ptr, rhs_ptr, group, row_start, rows, slots, offs_k, cols, K: tl.constexpr,
                N: tl.constexpr, BK: tl.constexpr, TRANSPOSE_RHS: tl.constexpr, GATHER: tl.constexpr,
                TOP_K: tl.constexpr):
    """acc += A [BM, K] @ B [K, BN], BK columns of A (rows of B) per step, the K tail masked when BK does not
    divide K. A: the tile's ``rows`` of lhs [*, K] from ``row_start`` (with GATHER the token rows
    ``slots // TOP_K``); B: columns ``cols`` of ``rhs[group]`` ([G, K, N], or [G, N, K] with TRANSPOSE_RHS)."""
    stride_k: tl.constexpr = 1 if TRANSPOSE_RHS else N
    stride_n: tl.constexpr = K if TRANSPOSE_RHS else 1
    if GATHER:
        a_ptrs = lhs_ptr + (slots // TOP_K).to(tl.int64)[:, None] * K + offs_k[None, :]
    else:
        a_ptrs = lhs_ptr + row_start.to(tl.int64) * K + rows[:, None] * K + offs_k[None, :]
    b_ptrs = rhs_ptr + group.to(tl.int64) * (K * N) + offs_k[:, None] * stride_k + cols[None, :] * stride_n
    for k in range(0, tl.cdiv(K, BK)):
        if K % BK == 0:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BK
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BK
        b_ptrs += BK * stride_k
    return acc


@triton.jit
def _gmm_kernel(lhs_ptr, rhs_ptr, lhs2_ptr, rhs2_ptr, tiles_ptr, sort_idx_ptr, w_ptr, out_ptr,
                K: tl.constexpr, N: tl.constexpr, TRANSPOSE_RHS: tl.constexpr, NUM_ROW_TILES: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                GATHER: tl.constexpr, SCATTER: tl.constexpr, WEIGHTED: tl.constexpr, TOP_K: tl.constexpr,
                NUM_SLOTS: tl.constexpr, K2: tl.constexpr):
    """One BM x BN output tile of ``out[rows of tile] = lhs[rows] @ rhs[group]`` (see the module docstring), plus
    ``lhs2[rows] @ rhs2[group]`` (lhs2 [*, K2], rhs2 [G, K2, N] / [G, N, K2], the same transpose) in the same f32
    accumulator when ``K2 > 0`` (``lhs2_ptr`` / ``rhs2_ptr`` are unused placeholders otherwise).

    Fused row maps (constexpr, all False for plain ``gmm``; ``sort_idx`` / ``w`` are then unused), with
    ``slot = sort_idx[row]`` for sorted row ``row``:
      GATHER:   the A rows are ``lhs[slot // TOP_K]`` (lhs in token order: no permuted copy of it exists);
      WEIGHTED: the f32 accumulator row is scaled by ``w[slot]`` before the store;
      SCATTER:  the tile row is stored to output row ``slot`` (token-major; a permutation write, no atomics).
    """
    group, row_start, row_end, tile_n = _row_tile(tiles_ptr, NUM_ROW_TILES, N, BN, GROUP_M)
    offs_m = tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    slots = offs_m  # unused unless a row map needs sort_idx
    if GATHER or SCATTER or WEIGHTED:
        slots = _sorted_slots(sort_idx_ptr, row_start, row_end, offs_m, NUM_SLOTS)
    if SCATTER:
        out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * N + offs_n[None, :]
    else:
        out_ptrs = out_ptr + row_start.to(tl.int64) * N + offs_m[:, None] * N + offs_n[None, :]
    store_mask = (offs_m[:, None] < row_end - row_start) & (offs_n[None, :] < N)
    if group >= 0:
        offs_k = tl.arange(0, BK)
        rows = tl.minimum(offs_m, row_end - row_start - 1)  # clamped: loads stay inside the tile's own rows
        cols = offs_n % N if N % BN != 0 else offs_n  # wrapped: loads stay in bounds, stores are masked
        acc = _accumulate(tl.zeros((BM, BN), dtype=tl.float32), lhs_ptr, rhs_ptr, group, row_start, rows, slots,
                          offs_k, cols, K, N, BK, TRANSPOSE_RHS, GATHER, TOP_K)
        if K2 > 0:
            acc = _accumulate(acc, lhs2_ptr, rhs2_ptr, group, row_start, rows, slots, offs_k, cols, K2, N, BK,
                              TRANSPOSE_RHS, GATHER, TOP_K)
        if WEIGHTED:
            acc = acc * tl.load(w_ptr + slots)[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)
    elif group == _ZERO_FILL:  # rows of non-local groups / beyond sum(group_sizes)
        tl.store(out_ptrs, tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty), mask=store_mask)
    # else schedule.IDLE (tiles past the schedule's total): nothing to do


@triton.jit
def _token_rows(rows, sort_idx_ptr, TOP_K: tl.constexpr, NUM_SLOTS: tl.constexpr):
    """int64 rows ``sort_idx[r] // TOP_K`` of a TGMM operand in token order for the sorted ``rows`` (rows and slots
    clamped into their buffers)."""
    slots = tl.load(sort_idx_ptr + tl.minimum(rows, NUM_SLOTS - 1))
    return (tl.minimum(tl.maximum(slots, 0), NUM_SLOTS - 1) // TOP_K).to(tl.int64)


@triton.jit
def _tgmm_rows(ptr, src, cols, WIDTH: tl.constexpr):
    """Pointers to the ``src`` rows of a TGMM operand [*, WIDTH] at ``cols``."""
    return ptr + src[:, None] * WIDTH + cols[None, :]


@triton.jit
def _tgmm_kernel(lhs_ptr, rhs_ptr, bounds_ptr, sort_idx_ptr, out_ptr,
                 K: tl.constexpr, N: tl.constexpr, NUM_GROUPS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 GATHER_LHS: tl.constexpr, GATHER_RHS: tl.constexpr, TOP_K: tl.constexpr, NUM_SLOTS: tl.constexpr):
    """One BK x BN tile of ``out[g] = lhs[rows of g].T @ rhs[rows of g]``, reducing the group's rows BM at a time:
    an unmasked steady-state loop over the full chunks, then one masked tail chunk. Groups come longest first
    (``schedule.tgmm_group_bounds``). Row maps (constexpr, both False for plain ``tgmm``): GATHER_LHS / GATHER_RHS
    read that operand in token order through ``sort_idx // TOP_K`` (``_token_rows``; one index load per chunk
    serves both)."""
    tiles_k = tl.cdiv(K, BK)
    tiles_per_group = tiles_k * tl.cdiv(N, BN)
    pid = tl.program_id(0)
    slot = pid // tiles_per_group
    tile_k, tile_n = _swizzle(pid % tiles_per_group, tiles_k, tl.cdiv(N, BN), GROUP_M)
    group = tl.load(bounds_ptr + slot)
    start = tl.load(bounds_ptr + NUM_GROUPS + slot)
    end = tl.load(bounds_ptr + 2 * NUM_GROUPS + slot)
    offs_m = tl.arange(0, BM)
    offs_k = tile_k * BK + tl.arange(0, BK)
    offs_n = tile_n * BN + tl.arange(0, BN)
    ks = offs_k % K if K % BK != 0 else offs_k  # wrapped: loads stay in bounds, stores are masked
    ns = offs_n % N if N % BN != 0 else offs_n
    rows = start + offs_m
    gather: tl.constexpr = GATHER_LHS or GATHER_RHS
    tokens = _token_rows(rows, sort_idx_ptr, TOP_K, NUM_SLOTS) if gather else rows.to(tl.int64)
    a_ptrs = _tgmm_rows(lhs_ptr, tokens if GATHER_LHS else rows.to(tl.int64), ks, K)
    b_ptrs = _tgmm_rows(rhs_ptr, tokens if GATHER_RHS else rows.to(tl.int64), ns, N)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    full_chunks = (end - start) // BM
    for _ in range(0, full_chunks):  # every row of the chunk is in the group: no mask
        acc = tl.dot(tl.trans(tl.load(a_ptrs)), tl.load(b_ptrs), acc, input_precision="ieee")
        rows += BM
        if gather:
            tokens = _token_rows(rows, sort_idx_ptr, TOP_K, NUM_SLOTS)
        if GATHER_LHS:
            a_ptrs = _tgmm_rows(lhs_ptr, tokens, ks, K)
        else:
            a_ptrs += BM * K
        if GATHER_RHS:
            b_ptrs = _tgmm_rows(rhs_ptr, tokens, ns, N)
        else:
            b_ptrs += BM * N
    rows_left = end - start - full_chunks * BM
    if rows_left > 0:  # the tail: rows past the group's end are zero
        a = tl.load(a_ptrs, mask=offs_m[:, None] < rows_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_m[:, None] < rows_left, other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    out_ptrs = out_ptr + group.to(tl.int64) * (K * N) + offs_k[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def _launch_options(cfg: tuning.GmmConfig) -> dict:
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, BM=cfg.block_m, BN=cfg.block_n,
                BK=cfg.block_k, GROUP_M=cfg.group_m)


_PLAIN_ROWS = dict(GATHER=False, SCATTER=False, WEIGHTED=False, TOP_K=1, NUM_SLOTS=1)  # constexprs of plain gmm


@dataclasses.dataclass(frozen=True)
class RowMap:
    """Fused row maps of ``_gmm_kernel`` (see its docstring) for ``M = T * top_k`` expert-sorted rows:
    ``sort_idx`` [M] int32 (sorted row -> token-major slot ``t * top_k + j``), ``weights`` [M] f32 in slot order
    (used when ``weighted``). ``gather``: lhs is [T, K] in token order; ``scatter``: the output is slot-major."""

    sort_idx: jax.Array
    top_k: int
    gather: bool = False
    scatter: bool = False
    weights: jax.Array | None = None

    @property
    def weighted(self) -> bool:
        return self.weights is not None


def launch_gmm(lhs, rhs, group_sizes, group_offset, *, num_rows, transpose_rhs, out_dtype, config=None,
               row_map: RowMap | None = None, second=None):
    """``_gmm_kernel`` over ``num_rows`` sorted rows -> [num_rows, N] (``gmm`` and the fused ops of
    ``kernels.triton.fused``). Without ``row_map``, lhs is [num_rows, K] and nothing is remapped. ``second``
    (lhs2 [*, K2], rhs2 as rhs with K2): ``lhs2 @ rhs2`` is added in the same accumulator, through the same row
    maps (one launch over K + K2; no batching rule, so ``jax.vmap`` callers compose two launches instead)."""
    k = lhs.shape[1]
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    k2 = 0 if second is None else second[0].shape[1]
    cfg = config or tuning.pick_config("gmm", num_rows, k + k2, n, num_local, lhs.dtype)
    num_tiles = schedule.static_upper_bound(schedule.max_row_tiles(num_rows, cfg.block_m, num_local), "row tiles")
    tiles = schedule.gmm_row_tiles(group_sizes, group_offset, num_rows, num_local, cfg.block_m, num_tiles)
    if row_map is None:
        sort_idx, weights = jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32)  # unused placeholders
        rows = batching.GmmRows(num_rows=num_rows)
    else:
        sort_idx = row_map.sort_idx.astype(jnp.int32)
        weights = row_map.weights.astype(jnp.float32) if row_map.weighted else jnp.zeros((1,), jnp.float32)
        rows = batching.GmmRows(num_rows, row_map.gather, row_map.scatter, row_map.weighted, row_map.top_k)
    static = dict(rows=rows, n=n, transpose_rhs=bool(transpose_rhs), out_dtype=out_dtype, cfg=cfg)
    if second is None:
        return _gmm_call(lhs, rhs, tiles, sort_idx, weights, **static)
    return _launch_gmm(lhs, rhs, *second, tiles, sort_idx, weights, k2=k2, **static)


@batching.folds_batch(batching.fold_gmm)
def _gmm_call(lhs, rhs, tiles, sort_idx, weights, *, rows, n, transpose_rhs, out_dtype, cfg):
    """The ``_gmm_kernel`` launch over a precomputed row-tile table ``tiles`` int32[3, T] (``jax.vmap`` folds the
    batch into rows and tiles, see ``kernels.triton.batching``)."""
    unused = jnp.zeros((1,), lhs.dtype)  # no second operand pair
    return _launch_gmm(lhs, rhs, unused, unused, tiles, sort_idx, weights, k2=0, rows=rows, n=n,
                       transpose_rhs=transpose_rhs, out_dtype=out_dtype, cfg=cfg)


def _launch_gmm(lhs, rhs, lhs2, rhs2, tiles, sort_idx, weights, *, k2, rows, n, transpose_rhs, out_dtype, cfg):
    num_row_tiles = tiles.shape[1]
    return triton_call(
        lhs, rhs, lhs2, rhs2, tiles.reshape(-1), sort_idx, weights, kernel=_gmm_kernel,
        out_shape=jax.ShapeDtypeStruct((rows.num_rows, n), out_dtype),
        grid=(num_row_tiles * triton.cdiv(n, cfg.block_n),), name="moe_gmm",
        K=lhs.shape[1], N=n, TRANSPOSE_RHS=transpose_rhs, NUM_ROW_TILES=num_row_tiles, K2=k2, **rows.constexprs(),
        **_launch_options(cfg))


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, config=None):
    """lhs [M,K], rhs [G_local,K,N] ([G_local,N,K] if ``transpose_rhs``), clamped group_sizes [G] int32,
    group_offset int32[1] -> [M,N] in ``out_dtype``; rows outside local groups are zero."""
    return launch_gmm(lhs, rhs, group_sizes, group_offset, num_rows=lhs.shape[0], transpose_rhs=transpose_rhs,
                      out_dtype=out_dtype, config=config)


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, config=None):
    """lhs [M,K], rhs [M,N], clamped group_sizes [G] int32, group_offset int32[1] -> [G_local=num_groups,K,N],
    ``out[g] = lhs[rows of local group g].T @ rhs[rows of g]``; empty groups give zeros."""
    m, k = lhs.shape
    n = rhs.shape[1]
    cfg = config or tuning.pick_config("tgmm", m, k, n, num_groups, lhs.dtype)
    bounds = schedule.tgmm_group_bounds(group_sizes, group_offset, num_groups)
    return _tgmm_call(lhs, rhs, bounds, out_dtype=out_dtype, cfg=cfg)


@batching.folds_batch(batching.fold_tgmm)
def _tgmm_call(lhs, rhs, bounds, *, out_dtype, cfg):
    """The ``_tgmm_kernel`` launch over precomputed group bounds int32[3, G_local] (``schedule.tgmm_group_bounds``:
    local group, start, end; longest first) -> [G_local, K, N]."""
    return _launch_tgmm(lhs, rhs, bounds, jnp.zeros((1,), jnp.int32), out_dtype=out_dtype, cfg=cfg,
                        **_PLAIN_TGMM_ROWS)


_PLAIN_TGMM_ROWS = dict(GATHER_LHS=False, GATHER_RHS=False, TOP_K=1, NUM_SLOTS=1)


def _launch_tgmm(lhs, rhs, bounds, sort_idx, *, out_dtype, cfg, **row_maps):
    k, n, num_groups = lhs.shape[1], rhs.shape[1], bounds.shape[1]
    grid = num_groups * triton.cdiv(k, cfg.block_k) * triton.cdiv(n, cfg.block_n)
    return triton_call(
        lhs, rhs, bounds.reshape(-1), sort_idx, kernel=_tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), grid=(grid,), name="moe_tgmm",
        K=k, N=n, NUM_GROUPS=num_groups, **row_maps, **_launch_options(cfg))


def gather_tgmm(lhs, rhs, group_sizes, group_offset, sort_idx, k, *, num_groups, out_dtype, gather_lhs,
                gather_rhs, config=None):
    """``tgmm`` whose operands may be read in token order: lhs [T,K] with ``gather_lhs`` (else [M,K]), rhs [T,N]
    with ``gather_rhs`` (else [M,N]), sort_idx [M = T*k]: sorted row ``i`` of a gathered operand is its row
    ``sort_idx[i] // k`` -> [G_local, K, N]. No gathered copy is built. (No batching rule: under ``jax.vmap``
    callers use the composition, ``moe_ops``.)"""
    m = sort_idx.shape[0]
    kdim, n = lhs.shape[1], rhs.shape[1]
    cfg = config or tuning.pick_config("tgmm", m, kdim, n, num_groups, lhs.dtype)
    bounds = schedule.tgmm_group_bounds(group_sizes, group_offset, num_groups)
    return _launch_tgmm(lhs, rhs, bounds, sort_idx.astype(jnp.int32), out_dtype=out_dtype, cfg=cfg,
                        GATHER_LHS=bool(gather_lhs), GATHER_RHS=bool(gather_rhs), TOP_K=int(k), NUM_SLOTS=m)


from kernels.triton import gmm_aot  # noqa: E402,F401  (registers the "gmm" / "gmm_fused" AOT families)
