"""Persistent TMA grouped matmul (``MOE_OPS_GMM_VARIANT=tma`` or ``persistent``): the same contract as ``gmm.gmm``.

On sm_90 the descriptors are TMA (``UTMALDG`` in the SASS); on AMD (gfx950 / gfx942, no TMA) Triton lowers the same
descriptor loads to buffer loads, so there it is the persistent variant sized to the CU count (256 / 304 programs).

``min(#SMs, tiles)`` programs walk the flattened (row tile x column tile) list of the device-side schedule
(``schedule.gmm_row_tiles``; its active row-tile count is read from the table, so idle tiles cost nothing) with the
GROUP_M swizzle. Operands load through device-side tensor descriptors (``tl.make_tensor_descriptor``: TMA on sm_90):
lhs as a 2-D ``[M, K]`` descriptor with ``[BM, BK]`` blocks, rhs as a 3-D ``[G, K, N]`` (``[G, N, K]`` with
``transpose_rhs``) descriptor with ``[1, BK, BN]`` blocks. TMA zero-fills out-of-bounds elements, so no K mask and no
N wrap are needed. The descriptors live in global scratch (``kernels.triton.scratch``).

Epilogue (``Epilogue``, ``_tile_loop``). A TMA store writes a whole ``[BM, BN]`` box, clipped only at the tensor's
bounds ``[M, N]``. So it is used only for a tile whose rows below M are all its own: ``row_end - row_start == BM``
or ``row_end == M`` (the rows past M are clipped). A partial tile (a group's last tile) ends inside the block, and
a box store would overwrite the next tile's rows (another group's, or another batch's under vmap): it takes the
masked pointer store. ``order_tiles`` partitions the table into whole local, partial local, ZERO_FILL and IDLE
tiles. Each program walks its share of the whole tiles (TMA store) in one loop, of the partial ones (pointer store)
in a second, of the ZERO_FILL ones (zeros, no K loop) in a third, continuing one round robin: one loop holding both
stores spilled 48-136 B on sm_90. A per-tile descriptor whose shape ends at ``row_end`` would clip the foreign rows
too, but costs a descriptor write + fence per tile and rewrites a scratch slot that in-flight stores still read;
not done. On sm_90 the store is split into two ``BN/2`` halves (``SPLIT_EPILOGUE``): half the staging buffer, so a
4th load stage still fits (``tma_config``); the async stores drain while the next tile's loads run. IDLE tiles are
never visited. AMD (no TMA) and outputs whose rows are not 16-byte aligned take the pointer store for every tile.

Invariants (beyond those of the schedule):
1. The (row tile x column tile) list is ``[whole local] + [partial local] + [ZERO_FILL]`` (IDLE ones left out),
   each part swizzled over its own row tiles; list entry ``j`` belongs to program ``j % num_programs``, so every
   (active row tile, column tile) is visited exactly once.
2. Rows of the A block past the tile's end belong to another tile or lie past M (zero-filled): they only feed
   accumulator rows that are never stored (a tile with such rows below M takes the masked store).
3. The kernel's table is ``order_tiles``' partition (whole local, partial local, ZERO_FILL, IDLE) with the three
   counts appended; vmap's folded table, whose IDLE tiles lie between batches, is partitioned after folding.
4. Eligible calls only (``eligible``): bf16 / f16, 16-byte aligned row strides, no empty dimension (K > 0, so
   every K loop runs at least once), plain row maps (the fused gather keeps cp.async: TMA cannot gather arbitrary
   rows on sm_90). Anything else runs the pointer kernel.
5. Every tile of a K loop's list is local, so the loop runs ``cdiv(K, BK)`` steps whatever the tile: Triton's
   nested-loop fusion needs bounds invariant to the tile loop (and then assumes the inner loop runs at least once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import platform
from kernels.triton import batching, schedule, tuning
from kernels.triton.gmm import _swizzle  # the pointer kernel's GROUP_M tile order
from kernels.triton.scratch import triton_call_with_scratch

__all__ = ["gmm", "tgmm", "eligible", "variant", "use_variant", "VARIANTS"]

VARIANTS = ("pointer", "tma", "persistent")  # "persistent" names the same kernel by what it is on AMD
DESCRIPTOR_BYTES = 128          # one CUtensorMap
SCRATCH_PER_PROGRAM = 3 * DESCRIPTOR_BYTES  # gmm: lhs, rhs and output descriptors
TGMM_SCRATCH_PER_PROGRAM = 2 * DESCRIPTOR_BYTES  # tgmm: lhs and rhs
_INTERPRETER_PROGRAMS = 3       # a few programs on CPU, so the persistent loop takes several tiles each


# use_variant's choice is a user context (kernels.platform.FORCED_GMM_VARIANT), in jit's cache keys: a function
# traced under one variant is traced again under another rather than reusing the first one's kernel.
_FORCED = platform.FORCED_GMM_VARIANT


def variant() -> str:
    """The GMM variant, read when a GMM is traced: ``use_variant``'s, else ``MOE_OPS_GMM_VARIANT`` (pointer | tma |
    persistent), default ``pointer`` until a GPU run has shown the TMA kernel correct and faster
    (benchmarks/RESULTS.md)."""
    name = _FORCED.value or os.environ.get("MOE_OPS_GMM_VARIANT", "pointer")
    if name not in VARIANTS:
        raise ValueError(f"MOE_OPS_GMM_VARIANT must be one of {VARIANTS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_variant(name: str):
    """Trace GMMs inside the block with variant ``name`` (the benchmark times every variant in one run)."""
    if name not in VARIANTS:
        raise ValueError(f"use_variant's name must be one of {VARIANTS}, got {name!r}")
    with _FORCED(name):
        yield


def eligible(*operands) -> bool:
    """16-bit operands (f32 runs ieee FMA dots: the pointer kernel's small tiles, where TMA buys nothing and the
    TMA build spills) whose rows are 16-byte aligned (last dim x 2 bytes a multiple of 16: the descriptor strides),
    and no empty dimension (invariant 4). Static shapes only: ``M`` is a constexpr (a symbolic M from ``jax.export``
    runs the pointer kernel, which launches at M's bound)."""
    return all(jnp.dtype(a.dtype).itemsize == 2 and all(isinstance(d, int) and d > 0 for d in a.shape)
               and (a.shape[-1] * 2) % 16 == 0 for a in operands)


@triton.jit
def _first(pid, entries_before, NUM_PROGRAMS: tl.constexpr):
    """This program's first index in a part of the tile list that ``entries_before`` entries precede: the round robin
    continues across parts (entry ``j`` of the whole list belongs to program ``j % NUM_PROGRAMS``)."""
    return (pid - entries_before % NUM_PROGRAMS + NUM_PROGRAMS) % NUM_PROGRAMS


@triton.jit
def _tile_loop(a_desc, b_desc, c_desc, out_ptr, tiles_ptr, row_lo, row_hi, first,
               K: tl.constexpr, N: tl.constexpr, TRANSPOSE_RHS: tl.constexpr, NUM_ROW_TILES: tl.constexpr,
               NUM_PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr, TMA_STORE: tl.constexpr, SPLIT: tl.constexpr,
               FLATTEN: tl.constexpr):
    """The local (row tile in ``[row_lo, row_hi)``) x (column tile) list, GROUP_M-swizzled, from list index ``first``
    in steps of ``NUM_PROGRAMS``: K loop through the descriptors, then a TMA store of the whole tile (``TMA_STORE``;
    in two ``BN/2`` halves with ``SPLIT``) or the masked pointer store. The K loop's bounds do not depend on the
    tile (invariant 5), so with ``FLATTEN`` the compiler fuses the two loops into one pipeline: the next tile's
    loads are in flight during this tile's epilogue. Only the TMA-store loop is fused, and only on NVIDIA
    (``flatten``): the pointer store's layout-conversion buffer cannot share shared memory with load buffers
    still in flight (the f32-output ``large`` tile then needed 272 KiB), and on AMD the fused loop spilled."""
    num_col_tiles: tl.constexpr = (N + BN - 1) // BN
    offs_m = tl.arange(0, BM)
    for tile in tl.range(first, (row_hi - row_lo) * num_col_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        tile_m, tile_n = _swizzle(tile, row_hi - row_lo, num_col_tiles, GROUP_M)
        tile_m += row_lo
        g = tl.load(tiles_ptr + tile_m)
        row_start = tl.load(tiles_ptr + NUM_ROW_TILES + tile_m)
        row_end = tl.load(tiles_ptr + 2 * NUM_ROW_TILES + tile_m)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(K, BK), num_stages=NUM_STAGES):
            a = a_desc.load([row_start, k * BK])
            if TRANSPOSE_RHS:
                b = tl.trans(b_desc.load([g, tile_n * BN, k * BK]).reshape(BN, BK))
            else:
                b = b_desc.load([g, k * BK, tile_n * BN]).reshape(BK, BN)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        out = acc.to(out_ptr.dtype.element_ty)
        col = tile_n * BN
        if TMA_STORE and SPLIT:
            left, right = tl.split(tl.permute(tl.reshape(out, (BM, 2, BN // 2)), (0, 2, 1)))
            c_desc.store([row_start, col], left)
            c_desc.store([row_start, col + BN // 2], right)
        elif TMA_STORE:
            c_desc.store([row_start, col], out)
        else:
            offs_n = col + tl.arange(0, BN)
            out_ptrs = out_ptr + row_start.to(tl.int64) * N + offs_m[:, None] * N + offs_n[None, :]
            tl.store(out_ptrs, out, mask=(offs_m[:, None] < row_end - row_start) & (offs_n[None, :] < N))


@triton.jit
def _zero_loop(out_ptr, tiles_ptr, row_lo, row_hi, first, N: tl.constexpr, NUM_ROW_TILES: tl.constexpr,
               NUM_PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The ZERO_FILL (row tile in ``[row_lo, row_hi)``) x (column tile) list from ``first`` in steps of
    ``NUM_PROGRAMS``: masked stores of zeros (rows of non-local groups or beyond the sum), no K loop."""
    num_col_tiles: tl.constexpr = (N + BN - 1) // BN
    offs_m = tl.arange(0, BM)
    zeros = tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty)
    for tile in tl.range(first, (row_hi - row_lo) * num_col_tiles, NUM_PROGRAMS):
        tile_m = row_lo + tile // num_col_tiles
        offs_n = (tile % num_col_tiles) * BN + tl.arange(0, BN)
        row_start = tl.load(tiles_ptr + NUM_ROW_TILES + tile_m)
        row_end = tl.load(tiles_ptr + 2 * NUM_ROW_TILES + tile_m)
        out_ptrs = out_ptr + row_start.to(tl.int64) * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, zeros, mask=(offs_m[:, None] < row_end - row_start) & (offs_n[None, :] < N))


@triton.jit
def _gmm_tma_kernel(lhs_ptr, rhs_ptr, tiles_ptr, out_ptr,
                    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, G: tl.constexpr,
                    TRANSPOSE_RHS: tl.constexpr, NUM_ROW_TILES: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    NUM_STAGES: tl.constexpr, TMA_STORE: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr,
                    FLATTEN: tl.constexpr):
    """Persistent program ``pid`` (module docstring): its share of the whole local row tiles (table entries
    ``[0, whole)``; TMA-stored with ``TMA_STORE``), then of the partial local ones (``[whole, local)``, masked
    pointer store), then of the ZERO_FILL ones (``[local, active)``), continuing one round robin."""
    a_desc = tl.make_tensor_descriptor(lhs_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    if TRANSPOSE_RHS:
        b_desc = tl.make_tensor_descriptor(rhs_ptr, shape=[G, N, K], strides=[N * K, K, 1], block_shape=[1, BN, BK])
    else:
        b_desc = tl.make_tensor_descriptor(rhs_ptr, shape=[G, K, N], strides=[K * N, N, 1], block_shape=[1, BK, BN])
    if TMA_STORE:  # only then: the output row stride may not be 16-byte aligned (N isn't checked by ``eligible``)
        c_block_n: tl.constexpr = BN // 2 if SPLIT_EPILOGUE else BN
        c_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, c_block_n])
    else:
        c_desc = out_ptr  # unused by the pointer store
    num_col_tiles: tl.constexpr = (N + BN - 1) // BN
    whole = tl.load(tiles_ptr + 3 * NUM_ROW_TILES)       # local row tiles whose block rows below M are all their own
    local = tl.load(tiles_ptr + 3 * NUM_ROW_TILES + 1)   # local row tiles (whole, then partial)
    active = tl.load(tiles_ptr + 3 * NUM_ROW_TILES + 2)  # row tiles before the first IDLE one
    pid = tl.program_id(0)
    if TMA_STORE:
        _tile_loop(a_desc, b_desc, c_desc, out_ptr, tiles_ptr, 0, whole, pid, K, N, TRANSPOSE_RHS, NUM_ROW_TILES,
                   NUM_PROGRAMS, BM, BN, BK, GROUP_M, NUM_STAGES, True, SPLIT_EPILOGUE, FLATTEN)
        _tile_loop(a_desc, b_desc, c_desc, out_ptr, tiles_ptr, whole, local,
                   _first(pid, whole * num_col_tiles, NUM_PROGRAMS), K, N, TRANSPOSE_RHS, NUM_ROW_TILES,
                   NUM_PROGRAMS, BM, BN, BK, GROUP_M, NUM_STAGES, False, False, False)
    else:
        _tile_loop(a_desc, b_desc, c_desc, out_ptr, tiles_ptr, 0, local, pid, K, N, TRANSPOSE_RHS, NUM_ROW_TILES,
                   NUM_PROGRAMS, BM, BN, BK, GROUP_M, NUM_STAGES, False, False, False)
    _zero_loop(out_ptr, tiles_ptr, local, active, _first(pid, local * num_col_tiles, NUM_PROGRAMS), N,
               NUM_ROW_TILES, NUM_PROGRAMS, BM, BN)


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


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """How ``_gmm_tma_kernel`` stores a tile: ``tma_store`` (whole tiles through the output descriptor, partial ones
    by the masked pointer store) and ``split`` (the TMA store in two ``BN/2`` halves: half the staging buffer)."""

    tma_store: bool
    split: bool

    def constexprs(self) -> dict:
        return dict(TMA_STORE=self.tma_store, SPLIT_EPILOGUE=self.tma_store and self.split)


def epilogue(arch: str, cfg: tuning.GmmConfig, n: int, out_dtype) -> Epilogue:
    """TMA store where output rows are 16-byte aligned (the descriptor's row stride), split for ``BN >= 128`` (the
    staging buffer then competes with a 4th pipeline stage). On AMD (no TMA) the masked pointer store, as the
    pointer kernel does; the interpreter ("cpu") takes the sm90 choice."""
    aligned = (n * jnp.dtype(out_dtype).itemsize) % 16 == 0
    return Epilogue(tma_store=aligned and not arch.startswith("gfx"), split=cfg.block_n >= 128 or arch == "cpu")


def tma_config(cfg: tuning.GmmConfig, itemsize: int, arch: str, staging_bytes: int = 0,
               out_itemsize: int = 2) -> tuning.GmmConfig:
    """The pointer config with as many pipeline stages (up to 4) as sm_90's shared memory holds next to
    ``staging_bytes`` of epilogue buffer: TMA loads have no register cost per stage, so deeper pipelines are free
    where they fit. AMD keeps the table's stages; there the persistent loop's carried state needs the registers
    that a waves-per-EU cap takes (the capped gfx942 ``medium`` tile spilled 23 VGPRs under triton 3.6; jax-triton
    0.3.1 does not pass the cap on anyway), and a 4-byte output halves ``block_k`` (the 256x128 f32 tile spilled 2
    there)."""
    if arch.startswith("gfx"):
        block_k = cfg.block_k // 2 if out_itemsize == 4 and cfg.block_k > 32 else cfg.block_k
        return dataclasses.replace(cfg, waves_per_eu=0, block_k=block_k)
    if arch != "sm90":
        return cfg
    per_stage = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize
    stages = max(cfg.num_stages, min(MAX_STAGES, (SM90_SHARED - staging_bytes) // per_stage))
    return dataclasses.replace(cfg, num_stages=stages)


def staging_bytes(cfg: tuning.GmmConfig, ep: Epilogue, out_dtype) -> int:
    """Shared memory of the TMA-store staging buffer (one ``BM x BN`` tile, or a half when split)."""
    if not ep.tma_store:
        return 0
    return cfg.block_m * (cfg.block_n // 2 if ep.split else cfg.block_n) * jnp.dtype(out_dtype).itemsize


def num_programs(arch: str, total_tiles: int) -> int:
    """``min(#SMs / #CUs, tiles)`` on a GPU (``tuning.NUM_SMS``: 132 sm90, 256 gfx950, 304 gfx942); a few programs
    under the interpreter."""
    sms = tuning.NUM_SMS.get(arch, _INTERPRETER_PROGRAMS)
    return max(1, min(sms, total_tiles))


def gmm_setup(arch, base: tuning.GmmConfig, n, dtype, out_dtype, ep=None, deepen=True):
    """(config, epilogue) of a GMM launch: ``base`` with ``tma_config``'s stages (when ``deepen``) next to the
    epilogue's staging buffer."""
    ep = ep or epilogue(arch, base, n, out_dtype)
    if not deepen:
        return base, ep
    return tma_config(base, jnp.dtype(dtype).itemsize, arch, staging_bytes(base, ep, out_dtype),
                      jnp.dtype(out_dtype).itemsize), ep


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, config=None, ep: Epilogue | None = None):
    """``gmm.gmm``'s contract (lhs [M,K], rhs [G_local,K,N] / [G_local,N,K] -> [M,N], zero rows outside local
    groups) through the persistent TMA kernel. The caller checks ``eligible``. Batches under ``jax.vmap`` like the
    pointer kernel (``batching.fold_gmm``: rows and row tiles fold into ``[B*M, K]``, rhs into ``[B*G, K, N]``)."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    arch = tuning.detect_arch()
    base = config or tuning.pick_config("gmm", m, k, n, num_local, lhs.dtype, arch=arch)
    cfg, ep = gmm_setup(arch, base, n, lhs.dtype, out_dtype, ep, deepen=config is None)
    tiles = schedule.gmm_row_tiles(group_sizes, group_offset, m, num_local, cfg.block_m)
    return _gmm_tma_call(lhs, rhs, tiles, None, None, rows=batching.GmmRows(m), n=n,
                         transpose_rhs=bool(transpose_rhs), out_dtype=out_dtype, cfg=cfg, arch=arch, ep=ep)


@batching.folds_batch(batching.fold_gmm)
def _gmm_tma_call(lhs, rhs, tiles, _sort_idx, _weights, *, rows, n, transpose_rhs, out_dtype, cfg, arch, ep):
    """The persistent launch over a row-tile table int32[3, T] (``jax.vmap`` folds the batch into it first), passed
    to the kernel as ``[whole tiles, partial tiles, IDLE tiles]`` (``order_tiles``) + the two counts."""
    tiles, counts = order_tiles(tiles, rows.num_rows, cfg.block_m)
    num_row_tiles = tiles.shape[1]
    programs = num_programs(arch, num_row_tiles * triton.cdiv(n, cfg.block_n))
    return triton_call_with_scratch(
        lhs, rhs, jnp.concatenate([tiles.reshape(-1), counts]), kernel=_gmm_tma_kernel,
        out_shape=jax.ShapeDtypeStruct((rows.num_rows, n), out_dtype), grid=programs,
        scratch_bytes=SCRATCH_PER_PROGRAM, name="moe_gmm_tma", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        M=rows.num_rows, K=lhs.shape[1], N=n, G=rhs.shape[0], TRANSPOSE_RHS=transpose_rhs,
        NUM_ROW_TILES=num_row_tiles, NUM_PROGRAMS=programs, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
        GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages, FLATTEN=flatten(arch), **ep.constexprs())


def flatten(arch: str) -> bool:
    """Whether the tile and K loops fuse into one pipeline (``_tile_loop``): on NVIDIA, not on AMD."""
    return not arch.startswith("gfx")


def order_tiles(tiles, num_rows, block_m):
    """(int32[3, T] table, int32[3] (whole, local, active)): a stable partition of the row tiles into whole local
    ones (every block row below ``num_rows`` is the tile's own: a TMA store may write the box), partial local ones,
    ZERO_FILL ones, then IDLE. Stable, so a group's tiles stay adjacent (L2 order); a vmap-folded table's per-batch
    IDLE tiles move to the end."""
    group, start, end = tiles[0], tiles[1], tiles[2]
    local = group >= 0
    whole = local & ((end - start == block_m) | (end == num_rows))
    part = jnp.where(whole, 0, jnp.where(local, 1, jnp.where(group == schedule.ZERO_FILL, 2, 3)))
    order = jnp.argsort(part, stable=True)
    counts = jnp.stack([jnp.sum(whole), jnp.sum(local), jnp.sum(group != schedule.IDLE)]).astype(jnp.int32)
    return tiles[:, order], counts


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, config=None):
    """``gmm.tgmm``'s contract (lhs [M,K], rhs [M,N] -> [G_local,K,N]) with TMA operands. The caller checks
    ``eligible`` (for ``lhs`` and ``rhs`` rows). Batches under ``jax.vmap`` (``batching.fold_tgmm``)."""
    m, k = lhs.shape
    n = rhs.shape[1]
    cfg = config or tuning.pick_config("tgmm", m, k, n, num_groups, lhs.dtype, arch=tuning.detect_arch())
    bounds = schedule.tgmm_group_bounds(group_sizes, group_offset, num_groups)
    return _tgmm_tma_call(lhs, rhs, bounds, out_dtype=out_dtype, cfg=cfg)


@batching.folds_batch(batching.fold_tgmm)
def _tgmm_tma_call(lhs, rhs, bounds, *, out_dtype, cfg):
    """The ``_tgmm_tma_kernel`` launch over group bounds int32[3, G_local] -> [G_local, K, N]."""
    m, k = lhs.shape
    n, num_groups = rhs.shape[1], bounds.shape[1]
    grid = num_groups * triton.cdiv(k, cfg.block_k) * triton.cdiv(n, cfg.block_n)
    return triton_call_with_scratch(
        lhs, rhs, bounds.reshape(-1), kernel=_tgmm_tma_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype), grid=grid,
        scratch_bytes=TGMM_SCRATCH_PER_PROGRAM, name="moe_tgmm_tma", num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, M=m, K=k, N=n, NUM_GROUPS=num_groups, BM=cfg.block_m, BN=cfg.block_n,
        BK=cfg.block_k, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages)


from kernels.triton import gmm_tma_aot  # noqa: E402,F401  (registers the "gmm_tma" AOT family)
