"""Gate/up projections + gated activation in one Triton grouped matmul (the optional ``swiglu_gmm`` of the
``moe_ops.backend`` interface): ``h = act(x @ w_gate[g]) * (x @ w_up[g])`` with ``gate`` / ``up`` never written.

``_swiglu_kernel`` is a sibling of ``kernels.triton.gmm._gmm_kernel`` (same device-side row-tile schedule, swizzle
and gather row map; plain ``gmm`` is untouched): each K step loads the A tile once and the two B tiles (``w_gate``,
``w_up`` [G_local, K, N] as given, no interleaved copy) into two f32 accumulators; the epilogue applies the gated
activation in f32 (``kernels.triton.activation``: silu / gelu / relu with a ``GatedActivation``'s clamp, alpha and
offset) and stores only ``h`` [M, N] (``N = F``). With HAS_BIAS the accumulators start from the tile's group's
gate / up bias rows ([G_local, N]; the recomputing backward's too). With ``GATHER`` the A rows are
``x[sort_idx[i] // TOP_K]`` (x in token order). Zero-fill tiles store zeros.

``_swiglu_down_bwd_kernel`` (``swiglu_down_bwd``, the backward of gate/up + activation + weighted down projection,
``moe_ops.reference.swiglu_down_bwd``): same schedule and gather; each K (= D) step loads the x and dout rows of the
tile's tokens and the ``w_gate`` / ``w_up`` / ``w_down^T`` tiles into three f32 accumulators (gate, up, a); the
epilogue writes ``dgate``, ``dup``, ``hw = w_sorted * h`` and the tile's partial ``sum_f h * a`` (one f32 per row
and column tile, summed in a fixed order outside: no atomics). Saved mode (gate / up read from the forward's
residuals instead of recomputed): tiles up to 64x64 load them before the K loop; larger tiles load them after it
and run the epilogue on two column halves, so at most about two f32 tiles are live at once. Config: the gmm config
with ``block_n`` quartered (``swiglu_bwd_config``; 0 spills on sm90 / gfx950 / gfx942 in the AOT check, 172 KiB of
shared memory on sm90 large), or the measured sm90 saved-mode tiles.

Configs: the gmm config of the shape with ``block_n`` halved (``swiglu_config``): two B tiles of ``BN/2`` take the
shared memory, and two ``BM x BN/2`` f32 accumulators the registers, of one gmm tile. (Keeping ``BN``: the sm90
"medium" tile spilled ~1.5 KB and "decode" needed 240 KiB of shared memory in the AOT check.)
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels.activation import GPT_OSS
from kernels.groups import bias_pair
from kernels.registry import TARGETS, register_aot
from kernels.triton.activation import ACT_CODES, act_params, clamp, gated, gated_parts
from kernels.triton import schedule, tuning
from kernels.triton.bridge import load_jax_triton
from kernels.triton.gmm import _ZERO_FILL, _launch_options
from kernels.triton.gmm_aot import _AOT_DTYPES, _AOT_G, _AOT_M, _AOT_SHAPES, _AOT_TOP_K, _aot_case, _aot_points
from kernels.triton.gmm import _row_tile, _sorted_slots

__all__ = ["swiglu_gmm", "swiglu_gmm_saved", "swiglu_down_bwd", "swiglu_down_bwd_saved", "swiglu_config",
           "swiglu_bwd_config"]

# the clamped / scaled / offset epilogue with the gate / up biases (gpt-oss's experts), AOT-compiled on each target's
# first config
_AOT_SPECS = {"gpt_oss": GPT_OSS}


@triton.jit
def _bwd_stores(a, act, dact, up, act_du, w, off, mask, col_ok, dgate_ptr, dup_ptr, hw_ptr):
    """The backward's epilogue on a [BM, C] block (f32 ``a = dout @ w_down^T``; ``act``, ``dact``, ``up`` (clamped,
    offset) and ``act_du`` = dh/dup from ``gated_parts``, h = act * up; ``w`` [BM, 1]) at element offsets ``off``:
    stores dgate = w*a*up*dact, dup = w*a*act_du, hw = w*h (dw_down's lhs), and returns the rows' partial
    ``sum_f h * a`` over the columns ``col_ok`` [1, C]."""
    dh = a * w
    h = act * up
    dtype = dgate_ptr.dtype.element_ty
    tl.store(dgate_ptr + off, (dh * up * dact).to(dtype), mask=mask)
    tl.store(dup_ptr + off, (dh * act_du).to(dtype), mask=mask)
    tl.store(hw_ptr + off, (h * w).to(dtype), mask=mask)
    return tl.sum(tl.where(col_ok, h * a, 0.0), axis=1)


@triton.jit
def _saved_epilogue(a, w, row_off, cols, live, gate_ptr, up_ptr, dgate_ptr, dup_ptr, hw_ptr, N: tl.constexpr,
                    ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, UP_OFFSET: tl.constexpr):
    """``_bwd_stores`` on the columns ``cols`` of a row tile (rows at element offsets ``row_off`` [BM, 1], ``live``
    rows), gate / up loaded here from the saved residuals."""
    off = row_off + cols[None, :]
    mask = live[:, None] & (cols[None, :] < N)
    gate = tl.load(gate_ptr + off, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + off, mask=mask, other=0.0).to(tl.float32)
    act, dact, u, act_du = gated_parts(gate, up, ACT, ALPHA, LIMIT, UP_OFFSET)
    return _bwd_stores(a, act, dact, u, act_du, w, off, mask, cols[None, :] < N, dgate_ptr, dup_ptr, hw_ptr)


@triton.jit
def _projections(lhs_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, group, row_start, row_end, offs_m, offs_n, sort_idx_ptr,
                 K: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GATHER: tl.constexpr, TOP_K: tl.constexpr, NUM_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(gate, up) f32 [BM, BN] of a tile: its A rows (``lhs[sort_idx[row] // TOP_K]`` with GATHER) times the
    ``wg`` / ``wu`` [G, K, N] tiles of ``group``, each A tile loaded once for both; with HAS_BIAS plus the group's
    ``bg`` / ``bu`` [G, N] rows."""
    offs_k = tl.arange(0, BK)
    cols = offs_n % N if N % BN != 0 else offs_n
    if GATHER:
        slots = _sorted_slots(sort_idx_ptr, row_start, row_end, offs_m, NUM_SLOTS)
        a_ptrs = lhs_ptr + (slots // TOP_K).to(tl.int64)[:, None] * K + offs_k[None, :]
    else:
        rows = tl.minimum(offs_m, row_end - row_start - 1)  # clamped: loads stay inside the tile's own rows
        a_ptrs = lhs_ptr + row_start.to(tl.int64) * K + rows[:, None] * K + offs_k[None, :]
    b_off = group.to(tl.int64) * (K * N) + offs_k[:, None] * N + cols[None, :]
    g_ptrs, u_ptrs = wg_ptr + b_off, wu_ptr + b_off
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_BIAS:  # start from the biases: added after the K loop they spilled 16 / 208 B (sm90 AOT, gpt-oss fwd)
        bias_off = group.to(tl.int64) * N + cols
        acc_g += tl.load(bg_ptr + bias_off).to(tl.float32)[None, :]
        acc_u += tl.load(bu_ptr + bias_off).to(tl.float32)[None, :]
    for k in range(0, tl.cdiv(K, BK)):
        if K % BK == 0:
            a, bg, bu = tl.load(a_ptrs), tl.load(g_ptrs), tl.load(u_ptrs)
        else:
            k_left = K - k * BK
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            bg = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            bu = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
        acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        a_ptrs += BK
        g_ptrs += BK * N
        u_ptrs += BK * N
    return acc_g, acc_u


@triton.jit
def _swiglu_kernel(lhs_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, tiles_ptr, sort_idx_ptr, out_ptr, gate_ptr, up_ptr,
                   K: tl.constexpr, N: tl.constexpr, NUM_ROW_TILES: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                   GATHER: tl.constexpr, TOP_K: tl.constexpr, NUM_SLOTS: tl.constexpr, ACT: tl.constexpr,
                   ALPHA: tl.constexpr, LIMIT: tl.constexpr, UP_OFFSET: tl.constexpr, STORE_GATE_UP: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """One BM x BN tile of ``h[rows] = act(lhs[rows] @ wg[group] + bg[group]) * (lhs[rows] @ wu[group] +
    bu[group])`` (the biases with HAS_BIAS); with STORE_GATE_UP also ``gate`` / ``up`` (in the output dtype, after
    the activation's clamps if it has a limit: the backward's residuals)."""
    group, row_start, row_end, tile_n = _row_tile(tiles_ptr, NUM_ROW_TILES, N, BN, GROUP_M)
    offs_m = tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    tl.static_assert(BM * N < 2**31, "the in-tile offsets are 32-bit")
    tile_base = row_start.to(tl.int64) * N          # 64-bit scalar; the [BM, BN] offsets within the tile in 32 bits
    out_ptr, gate_ptr, up_ptr = out_ptr + tile_base, gate_ptr + tile_base, up_ptr + tile_base
    out_off = offs_m[:, None] * N + offs_n[None, :]
    store_mask = offs_m[:, None] < row_end - row_start
    if N % BN != 0:
        store_mask = store_mask & (offs_n[None, :] < N)
    dtype = out_ptr.dtype.element_ty
    if group >= 0:
        gate, up = _projections(lhs_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, group, row_start, row_end, offs_m, offs_n,
                                sort_idx_ptr, K, N, BM, BN, BK, GATHER, TOP_K, NUM_SLOTS, HAS_BIAS)
        gate, up = clamp(gate, up, LIMIT)   # in place: the saved residuals are the clamped projections
        tl.store(out_ptr + out_off, gated(gate, up, ACT, ALPHA, UP_OFFSET).to(dtype), mask=store_mask)
        if STORE_GATE_UP:
            tl.store(gate_ptr + out_off, gate.to(dtype), mask=store_mask)
            tl.store(up_ptr + out_off, up.to(dtype), mask=store_mask)
    elif group == _ZERO_FILL:
        zeros = tl.zeros((BM, BN), dtype=dtype)
        tl.store(out_ptr + out_off, zeros, mask=store_mask)
        if STORE_GATE_UP:
            tl.store(gate_ptr + out_off, zeros, mask=store_mask)
            tl.store(up_ptr + out_off, zeros, mask=store_mask)


def swiglu_config(cfg: tuning.GmmConfig) -> tuning.GmmConfig:
    """The gmm config with ``block_n`` halved (module doc; at least 16)."""
    return dataclasses.replace(cfg, block_n=max(16, cfg.block_n // 2))


def swiglu_gmm(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, activation, out_dtype,
               config=None, b_gate=None, b_up=None):
    """x [M,K] (or [T,K] in token order with ``sort_idx`` [M = T*k]), w_gate / w_up [G_local,K,F], clamped
    group_sizes [G], group_offset int32[1] -> h [M,F] in ``out_dtype``: ``act(x_i @ w_gate[g] + b_gate[g]) *
    (x_i @ w_up[g] + b_up[g])`` in f32 (``x_i = x[sort_idx[i] // k]`` with ``sort_idx``; the optional biases
    [G_local,F] added to the f32 accumulators); rows outside local groups are zero."""
    return _forward(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, activation, out_dtype, config, False,
                    b_gate, b_up)[0]


def swiglu_gmm_saved(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, activation, out_dtype,
                     config=None, b_gate=None, b_up=None):
    """``swiglu_gmm`` that also writes ``gate`` and ``up`` [M,F] (``out_dtype``, biases added, clamped to the
    activation's limit if it has one; the residuals of the saved-mode backward, ``swiglu_down_bwd_saved``) from the
    same accumulators -> (h, gate, up)."""
    return _forward(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, activation, out_dtype, config, True,
                    b_gate, b_up)


def _bias_operands(b_gate, b_up, num_local, n, dtype):
    """(bg, bu, HAS_BIAS): the bias pair (``kernels.groups.bias_pair``) or one-element placeholders."""
    b_gate, b_up = bias_pair(b_gate, b_up, num_local, n)
    if b_gate is None:
        placeholder = jnp.zeros((1,), dtype)
        return placeholder, placeholder, False
    return b_gate, b_up, True


def _forward(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, activation, out_dtype, config, store_gate_up,
             b_gate, b_up):
    gather = sort_idx is not None
    m = sort_idx.shape[0] if gather else x.shape[0]
    kdim, (num_local, _, n) = x.shape[1], w_gate.shape
    b_gate, b_up, has_bias = _bias_operands(b_gate, b_up, num_local, n, x.dtype)
    if m == 0:
        return (jnp.zeros((0, n), out_dtype),) * 3
    cfg = config or swiglu_config(tuning.pick_config("gmm", m, kdim, n, num_local, x.dtype))
    tiles = schedule.gmm_row_tiles(group_sizes, group_offset, m, num_local, cfg.block_m)
    num_row_tiles = tiles.shape[1]
    idx = sort_idx.astype(jnp.int32) if gather else jnp.zeros((1,), jnp.int32)
    rows = jax.ShapeDtypeStruct((m, n) if store_gate_up else (1,), out_dtype)  # gate / up, or unused placeholders
    return tuple(load_jax_triton().triton_call(
        x, w_gate, w_up, b_gate, b_up, tiles.reshape(-1), idx, kernel=_swiglu_kernel,
        out_shape=[jax.ShapeDtypeStruct((m, n), out_dtype), rows, rows],
        grid=(num_row_tiles * triton.cdiv(n, cfg.block_n),), name="moe_swiglu_gmm",
        K=kdim, N=n, NUM_ROW_TILES=num_row_tiles, GATHER=gather, TOP_K=int(k) if gather else 1,
        NUM_SLOTS=m if gather else 1, STORE_GATE_UP=store_gate_up, HAS_BIAS=has_bias, **act_params(activation),
        **_launch_options(cfg)))


@triton.jit
def _swiglu_down_bwd_kernel(x_ptr, dout_ptr, wg_ptr, wu_ptr, wd_ptr, bg_ptr, bu_ptr, tiles_ptr, sort_idx_ptr, ws_ptr,
                            gate_ptr, up_ptr, dgate_ptr, dup_ptr, hw_ptr, part_ptr,
                            K: tl.constexpr, N: tl.constexpr, NUM_ROW_TILES: tl.constexpr, NUM_SLOTS: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            TOP_K: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                            UP_OFFSET: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One BM x BN tile (sorted rows x F columns) of the fused backward: ``a = dout rows @ w_down^T`` (f32, over
    K = D) with ``gate`` / ``up`` recomputed (RECOMPUTE: x rows @ w_gate / w_up (+ bg / bu with HAS_BIAS),
    ``_projections``) or loaded (the saved [M, N] residuals); the epilogue writes dgate, dup, hw = w * h and this
    column tile's partial ``sum_f h * a`` (``part[tile_n, row]``)."""
    group, row_start, row_end, tile_n = _row_tile(tiles_ptr, NUM_ROW_TILES, N, BN, GROUP_M)
    offs_m = tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    live = offs_m < row_end - row_start
    out_off = row_start.to(tl.int64) * N + offs_m[:, None] * N + offs_n[None, :]
    store_mask = live[:, None] & (offs_n[None, :] < N)
    part_ptrs = part_ptr + tile_n * NUM_SLOTS + row_start + offs_m
    if group >= 0:
        split: tl.constexpr = not RECOMPUTE and BM * BN > 64 * 64
        if RECOMPUTE:
            gate, up = _projections(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, group, row_start, row_end, offs_m,
                                    offs_n, sort_idx_ptr, K, N, BM, BN, BK, True, TOP_K, NUM_SLOTS, HAS_BIAS)
        elif not split:  # small tiles: gate / up loaded ahead, their latency hidden behind the K loop
            gate = tl.load(gate_ptr + out_off, mask=store_mask, other=0.0).to(tl.float32)
            up = tl.load(up_ptr + out_off, mask=store_mask, other=0.0).to(tl.float32)
        offs_k = tl.arange(0, BK)
        cols = offs_n % N if N % BN != 0 else offs_n
        tokens = (_sorted_slots(sort_idx_ptr, row_start, row_end, offs_m, NUM_SLOTS) // TOP_K).to(tl.int64)
        d_ptrs = dout_ptr + tokens[:, None] * K + offs_k[None, :]
        t_ptrs = wd_ptr + group.to(tl.int64) * (K * N) + offs_k[:, None] + cols[None, :] * K  # w_down[g] as [D, F]
        acc_a = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if K % BK == 0:
                da, bt = tl.load(d_ptrs), tl.load(t_ptrs)
            else:
                da = tl.load(d_ptrs, mask=offs_k[None, :] < K - k * BK, other=0.0)
                bt = tl.load(t_ptrs, mask=offs_k[:, None] < K - k * BK, other=0.0)
            acc_a = tl.dot(da, bt, acc_a, input_precision="ieee")
            d_ptrs += BK
            t_ptrs += BK
        if split:  # larger tiles: gate / up loaded after the K loop, half a tile at a time (fewer f32 tiles live)
            a_lo, a_hi = tl.split(tl.permute(tl.reshape(acc_a, (BM, 2, BN // 2)), (0, 2, 1)))
            w = tl.load(ws_ptr + row_start + tl.minimum(offs_m, row_end - row_start - 1))[:, None]
            row_off = row_start.to(tl.int64) * N + offs_m[:, None] * N
            half = tile_n * BN + tl.arange(0, BN // 2)
            part = _saved_epilogue(a_lo, w, row_off, half, live, gate_ptr, up_ptr, dgate_ptr, dup_ptr, hw_ptr, N,
                                   ACT, ALPHA, LIMIT, UP_OFFSET)
            part += _saved_epilogue(a_hi, w, row_off, half + BN // 2, live, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
                                    hw_ptr, N, ACT, ALPHA, LIMIT, UP_OFFSET)
            tl.store(part_ptrs, part, mask=live)
        else:
            act, dact, u, act_du = gated_parts(gate, up, ACT, ALPHA, LIMIT, UP_OFFSET)
            w = tl.load(ws_ptr + row_start + tl.minimum(offs_m, row_end - row_start - 1))[:, None]
            part = _bwd_stores(acc_a, act, dact, u, act_du, w, out_off, store_mask, offs_n[None, :] < N, dgate_ptr,
                               dup_ptr, hw_ptr)
            tl.store(part_ptrs, part, mask=live)
    elif group == _ZERO_FILL:
        zeros = tl.zeros((BM, BN), dtype=dgate_ptr.dtype.element_ty)
        tl.store(dgate_ptr + out_off, zeros, mask=store_mask)
        tl.store(dup_ptr + out_off, zeros, mask=store_mask)
        tl.store(hw_ptr + out_off, zeros, mask=store_mask)
        tl.store(part_ptrs, tl.zeros((BM,), dtype=tl.float32), mask=live)


# Saved-mode backward on Hopper, 16-bit: measured on an H200 at the Qwen3-30B shape (benchmarks/RESULTS.md,
# 2026-11-26) at 1.49 ms against 1.96 ms for the quartered 128x64 large tile (128x64 / 64x128 with 4 warps: 1.85 /
# 1.73 ms): each column tile re-reads its gathered dout rows, and smaller row tiles spread them over more SMs.
_SM90_SAVED_BWD = tuning.GmmConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=4)
# ... and for the gmm table's thin tiles (<= 16 rows per group): 0.498 ms against 0.554 for the 64x64 tile at the
# decode shape (M256 D7168 F2048 E32, same sweep).
_SM90_SAVED_BWD_THIN = tuning.GmmConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=4)
# Not shipped: the 64x64 tile moves two operand bytes per 32 flops through L2 (half the 128x128 tile's intensity),
# and the larger tiles spilled 2-2.6 KB until the saved-mode epilogue went to half tiles (sm90 AOT, Qwen3-30B
# shape: 128x128 / 128x64 / 64x128 / 64x256 now 0 spills). The AOT check compiles this one so it stays
# spill-free; ``benchmarks.tune --kinds swiglu_bwd`` times it against the shipped tile on a GPU.
_SM90_SAVED_BWD_WIDE = tuning.GmmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4)


def swiglu_bwd_config(cfg: tuning.GmmConfig, *, recompute: bool = True, arch: str | None = None,
                      dtype=None) -> tuning.GmmConfig:
    """The backward's config from the gmm config of the shape: saved mode on sm90 with 16-bit inputs, the measured
    ``_SM90_SAVED_BWD`` (``_SM90_SAVED_BWD_THIN`` where the gmm config has thin row tiles); otherwise ``block_n``
    quartered (at least 16): recomputing, three ``BM x BN/4`` accumulators take the registers, and five operand
    tiles per stage the shared memory, of about one gmm tile; in saved mode ``a``, gate and up are three f32 tiles in
    the epilogue (halving instead spilled 1.2-2.7 KB on sm90 in the AOT check)."""
    if not recompute and arch == "sm90" and dtype is not None and not tuning.is_f32(dtype):
        return _SM90_SAVED_BWD_THIN if cfg.block_m < 64 else _SM90_SAVED_BWD
    return dataclasses.replace(cfg, block_n=max(16, cfg.block_n // 4))


def swiglu_down_bwd(x, dout, w_gate, w_up, w_down, group_sizes, group_offset, sort_idx, w_sorted, k, *, activation,
                    config=None, b_gate=None, b_up=None):
    """x / dout [T,D] (token order), w_gate / w_up [G_local,D,F], w_down [G_local,F,D], clamped group_sizes [G],
    group_offset int32[1], sort_idx [M = T*k], w_sorted [M] f32, optional b_gate / b_up [G_local,F] -> (dgate, dup,
    h [M,F] in x's dtype, dweights_sorted [M] f32), the contract of ``moe_ops.reference.swiglu_down_bwd``: one
    kernel, gate / up / a never written; the per-column-tile partials of ``<h_i, a_i>`` are summed here (f32, fixed
    order)."""
    placeholder = jnp.zeros((1,), x.dtype)
    bias = _bias_operands(b_gate, b_up, w_gate.shape[0], w_gate.shape[2], x.dtype)
    return _backward(x, dout, w_gate, w_up, w_down, placeholder, placeholder, group_sizes, group_offset, sort_idx,
                     w_sorted, k, activation, config, True, None, bias)


def swiglu_down_bwd_saved(dout, w_down, gate, up, group_sizes, group_offset, sort_idx, w_sorted, k, *, activation,
                          config=None):
    """``swiglu_down_bwd`` from the saved gate / up [M,F] (``swiglu_gmm_saved``) instead of x / w_gate / w_up: the
    down projection's dlhs GMM with the activation derivative in its epilogue."""
    g, f, d = w_down.shape
    shape = jax.ShapeDtypeStruct((g, d, f), w_down.dtype)   # the [G, D, F] geometry the kernel reads from w_gate
    weights = jnp.zeros((1,), w_down.dtype)                 # unused with RECOMPUTE=False
    return _backward(dout, dout, weights, weights, w_down, gate, up, group_sizes, group_offset, sort_idx, w_sorted,
                     k, activation, config, False, shape, (weights, weights, False))


def _backward(x, dout, w_gate, w_up, w_down, gate, up, group_sizes, group_offset, sort_idx, w_sorted, k, activation,
              config, recompute, gate_shape, bias):
    m, (num_local, kdim, n) = sort_idx.shape[0], (gate_shape or w_gate).shape
    arch = tuning.detect_arch()
    cfg = config or swiglu_bwd_config(tuning.pick_config("gmm", m, kdim, n, num_local, dout.dtype, arch=arch),
                                      recompute=recompute, arch=arch, dtype=dout.dtype)
    tiles = schedule.gmm_row_tiles(group_sizes, group_offset, m, num_local, cfg.block_m)
    num_row_tiles, col_tiles = tiles.shape[1], triton.cdiv(n, cfg.block_n)
    rows = jax.ShapeDtypeStruct((m, n), dout.dtype)
    dgate, dup, h, part = load_jax_triton().triton_call(
        x, dout, w_gate, w_up, w_down, bias[0], bias[1], tiles.reshape(-1), sort_idx.astype(jnp.int32),
        w_sorted.astype(jnp.float32), gate, up, kernel=_swiglu_down_bwd_kernel,
        out_shape=[rows, rows, rows, jax.ShapeDtypeStruct((col_tiles, m), jnp.float32)],
        grid=(num_row_tiles * col_tiles,), name="moe_swiglu_down_bwd", K=kdim, N=n, NUM_ROW_TILES=num_row_tiles,
        NUM_SLOTS=m, TOP_K=int(k), RECOMPUTE=recompute, HAS_BIAS=bias[2], **act_params(activation),
        **_launch_options(cfg))
    return dgate, dup, h, jnp.sum(part, axis=0)


@register_aot("swiglu")
def aot_cases(target: str):
    """Every shipped gmm config of ``target`` (``swiglu_config``) at the gmm family's shapes: the gather form with
    silu (the layer's) everywhere, plus gelu / relu and the plain (no gather) form at bf16 on the Mixtral-like shape,
    and gpt-oss's clamped SwiGLU with the gate / up biases (``_AOT_SPECS``) there on the first config."""
    backend = TARGETS[target][0]
    cases = []
    for dtype_name, dtype, suffix, k, n in _aot_points():
        for i, (entry, gmm_cfg) in enumerate(tuning.shipped(target, "gmm", dtype).items()):
            cfg = swiglu_config(gmm_cfg)
            tiles = schedule.max_row_tiles(_AOT_M, cfg.block_m, _AOT_G)
            full = not suffix and dtype_name == "bf16"   # the epilogue variants once per config, at bf16
            acts = [*ACT_CODES, *(_AOT_SPECS if i == 0 else ())] if full else ["silu"]
            variants = [(True, a, s) for a in acts for s in (False, True)] + [(False, "silu", False)] \
                if full else [(True, "silu", True)]
            for gather, act, saved in variants:
                name = f"swiglu_{'gather_' if gather else ''}{act}{'_saved' if saved else ''}"
                case = _aot_case(name, _swiglu_kernel, dtype_name, cfg, backend, f"{entry}:{dtype_name}{suffix}",
                                 K=k, N=n, NUM_ROW_TILES=tiles, GATHER=gather, TOP_K=_AOT_TOP_K if gather else 1,
                                 NUM_SLOTS=_AOT_M if gather else 1, STORE_GATE_UP=saved,
                                 HAS_BIAS=act in _AOT_SPECS, **act_params(_AOT_SPECS.get(act, act)))
                rows = f"*{dtype_name}"
                sig = dict(lhs_ptr=rows, wg_ptr=rows, wu_ptr=rows, bg_ptr=rows, bu_ptr=rows, tiles_ptr="*i32",
                           sort_idx_ptr="*i32", out_ptr=rows, gate_ptr=rows, up_ptr=rows)
                cases.append(dataclasses.replace(case, signature={**sig, **{c: "constexpr" for c in case.constexprs}}))
            cases += _bwd_aot_cases(target, backend, entry, gmm_cfg, dtype_name, suffix, k, n, acts)
    if target == "sm90":  # the saved-mode candidate tile (split epilogue) at the Mixtral-like shape
        k, n = _AOT_SHAPES[""]
        cases += _bwd_aot_cases(target, backend, "wide_candidate", None, "bf16", "", k, n, ["silu"],
                                saved_config=_SM90_SAVED_BWD_WIDE)
    return cases


def _bwd_aot_cases(target, backend, entry, gmm_cfg, dtype_name, suffix, k, n, acts, saved_config=None):
    """``_swiglu_down_bwd_kernel`` at one (config, dtype, shape) point, recomputing and saved mode, for each of
    ``acts`` (names, or keys of ``_AOT_SPECS``); with ``saved_config``, that config in saved mode only."""
    cases = []
    modes = (False,) if saved_config else (True, False)
    for act, recompute in itertools.product(acts, modes):
        cfg = saved_config or swiglu_bwd_config(gmm_cfg, recompute=recompute, arch=target,
                                                dtype=_AOT_DTYPES[dtype_name])
        tiles = schedule.max_row_tiles(_AOT_M, cfg.block_m, _AOT_G)
        case = _aot_case(f"swiglu_down_bwd_{act}{'' if recompute else '_saved'}", _swiglu_down_bwd_kernel,
                         dtype_name, cfg, backend, f"{entry}:{dtype_name}{suffix}", K=k, N=n, NUM_ROW_TILES=tiles,
                         NUM_SLOTS=_AOT_M, TOP_K=_AOT_TOP_K, RECOMPUTE=recompute,
                         HAS_BIAS=recompute and act in _AOT_SPECS, **act_params(_AOT_SPECS.get(act, act)))
        rows, f32 = f"*{dtype_name}", "*fp32"
        sig = dict(x_ptr=rows, dout_ptr=rows, wg_ptr=rows, wu_ptr=rows, wd_ptr=rows, bg_ptr=rows, bu_ptr=rows,
                   tiles_ptr="*i32", sort_idx_ptr="*i32", ws_ptr=f32, gate_ptr=rows, up_ptr=rows, dgate_ptr=rows,
                   dup_ptr=rows, hw_ptr=rows, part_ptr=f32)
        cases.append(dataclasses.replace(case, signature={**sig, **{c: "constexpr" for c in case.constexprs}}))
    return cases
