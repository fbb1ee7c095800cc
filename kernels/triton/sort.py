"""Token permutation kernels in Triton: counting sort by expert, row gather (permute), weighted combine (unpermute).

Backend functions (interface in ``moe_ops.backend``; ``N = T*k`` token copies, flat index ``f = t*k + j``):

* ``sort_by_expert(expert_ids[T,k], E) -> (group_sizes[E], sort_idx[N])``: a deterministic counting sort, no argsort.
  1. ``_histogram_kernel``: per block of ``BLOCK_N`` flat ids, the count of each key (key = id, or ``E`` for ids
     outside ``[0, E)``: the "dropped" bin, which sorts last and is counted in no group).
  2. jnp (tiny, ``[blocks, E_PAD]``): ``base[b, e] = start[e] + sum_{b' < b} counts[b', e]`` with ``start`` the
     exclusive cumsum of the per-key totals; ``group_sizes = totals[:E]``.
  3. ``_scatter_kernel``: ``sort_idx[base[b, key_f] + rank_f] = f`` where ``rank_f`` counts the earlier ids of the
     same key inside the block (by comparison, in ``CHUNK``-wide slices). Stable, a permutation write, no atomics.
  From ``MAX_HISTOGRAM_KEYS`` keys (E + 1, or ``B*(E+1)`` under vmap) XLA's stable sort runs instead
  (``groups.stable_expert_sort``): the histogram's shared memory (8 bytes a key) and the ``[blocks, E]`` table grow
  with E.
* ``gather_rows(x[T,D], sort_idx, k, row_weights, n_valid) -> [N, D]``: ``out[i] = x[sort_idx[i] // k]`` (times
  ``row_weights.flat[sort_idx[i]]`` in f32 when given), one program per ``BLOCK_M`` rows, looping over D in
  ``BLOCK_D`` chunks; the k-times repeated input is never built.
* ``combine_rows(y[N,D], sort_idx, weights[T,k], n_valid) -> [T, D]``: inverse permutation by a permutation write
  (``_inverse_kernel``: ``inv[sort_idx[i]] = i``), then per token block ``out[t] = sum_j w[t,j] * y[inv[t*k+j]]``
  in f32, written once.
* ``combine_weight_grad(dout[T,D], y[N,D], sort_idx, k, n_valid) -> [T,k] f32``: ``<dout[t], y[inv[t*k+j]]>``.

``n_valid`` (valid-prefix form, int scalar or shape-(1,) int array on device, default ``N``): only sorted rows
``i < n_valid`` exist. ``gather_rows`` writes zeros for rows ``>= n_valid`` without reading ``x``;
``combine_rows`` / ``combine_weight_grad`` never read ``y`` rows ``>= n_valid`` (they contribute exactly zero:
``combine_rows`` masks the slot's weight load too, so an Inf / NaN weight there adds nothing). ``sort_idx``
must be a permutation of ``[0, N)`` (what ``sort_by_expert`` returns); other values give unspecified rows but never
an out-of-bounds access (indices are clamped / masked). All reductions run in a fixed order, so
results are bitwise reproducible.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels import groups
from kernels.registry import AotCase, register_aot
from kernels.shapes import dim_value, pad_rows, require_static, static_upper_bound
from kernels.triton.bridge import triton_call

__all__ = ["sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "SortConfig", "RowsConfig"]


@dataclasses.dataclass(frozen=True)
class SortConfig:
    """Counting-sort tiling: ``block_n`` ids per program, ranks computed ``chunk`` columns at a time."""

    block_n: int = 256
    chunk: int = 32
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class RowsConfig:
    """Row-movement tiling: ``block_rows`` rows per program, ``block_d`` columns per vectorised copy."""

    block_rows: int = 8
    block_d: int = 512
    num_warps: int = 4
    num_stages: int = 2


SORT_CONFIG = SortConfig()
ROWS_CONFIG = RowsConfig()
INVERSE_BLOCK = 1024
MAX_HISTOGRAM_KEYS = 4096   # E + 1 keys: 32 KiB of histogram shared memory, within every target's (gfx942: 64 KiB)


# ---------------------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _expert_key(ids_ptr, offs, in_bounds, E: tl.constexpr):
    """Sort key of flat ids ``offs``: the id when in ``[0, E)``, else ``E`` (dropped; also for padding lanes)."""
    ids = tl.load(ids_ptr + offs, mask=in_bounds, other=E)
    return tl.where((ids >= 0) & (ids < E), ids, E)


@triton.jit
def _histogram_kernel(ids_ptr, counts_ptr, N: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """counts[b, key] = #ids of block b with that key (keys in [0, E]; bins past E stay zero). Padding lanes past N
    land in the dropped bin E, which is last: they shift no real row (and need no ``mask=``, new in Triton 3.x)."""
    b = tl.program_id(0)
    offs = b * BLOCK_N + tl.arange(0, BLOCK_N)
    key = _expert_key(ids_ptr, offs, offs < N, E)
    counts = tl.histogram(key, E_PAD)
    tl.store(counts_ptr + b * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, sort_idx_ptr, N: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """sort_idx[base[b, key_f] + rank_f] = f, rank_f = #{f' in block b, f' < f, key_f' == key_f}."""
    b = tl.program_id(0)
    offs = b * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = offs < N
    key = _expert_key(ids_ptr, offs, in_bounds, E)
    rank = tl.zeros((BLOCK_N,), tl.int32)
    for c in tl.range(0, BLOCK_N, CHUNK):
        offs_c = b * BLOCK_N + c + tl.arange(0, CHUNK)
        key_c = _expert_key(ids_ptr, offs_c, offs_c < N, E)
        earlier = (offs_c[None, :] < offs[:, None]) & (key_c[None, :] == key[:, None])
        rank += tl.sum(earlier.to(tl.int32), axis=1)
    dst = tl.load(base_ptr + b * E_PAD + key, mask=in_bounds, other=0) + rank
    tl.store(sort_idx_ptr + dst, offs, mask=in_bounds & (dst < N))  # dst < N always; the guard keeps it so


@triton.jit
def _inverse_kernel(sort_idx_ptr, inv_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    """inv[sort_idx[i]] = i (sort_idx is a permutation: every inv entry is written exactly once)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    src = tl.load(sort_idx_ptr + offs, mask=mask, other=0)
    tl.store(inv_ptr + src, offs, mask=mask & (src >= 0) & (src < N))


@triton.jit
def _row_tile(ptr, rows, d0, mask_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Pointers and mask of the [rows, d0:d0+BLOCK_D] tile of a row-major [*, D] array (64-bit row offsets)."""
    cols = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    if EVEN_D:
        mask = mask_rows[:, None]
    else:
        mask = mask_rows[:, None] & (cols < D)[None, :]
    return ptrs, mask


@triton.jit
def _gather_rows_kernel(x_ptr, sort_idx_ptr, w_ptr, n_valid_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr,
                        D: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        EVEN_D: tl.constexpr):
    """out[i] = x[sort_idx[i] // K] (* w.flat[sort_idx[i]]) for i < n_valid, 0 for n_valid <= i < N."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_bounds = rows < N
    live = in_bounds & (rows < tl.load(n_valid_ptr))  # rows past n_valid: no loads, zeros stored
    flat = tl.minimum(tl.maximum(tl.load(sort_idx_ptr + rows, mask=live, other=0), 0), N - 1)  # never OOB
    src = flat // K
    if HAS_W:
        w = tl.load(w_ptr + flat, mask=live, other=0.0).to(tl.float32)
    for d0 in tl.range(0, D, BLOCK_D):
        src_ptrs, load_mask = _row_tile(x_ptr, src, d0, live, D, BLOCK_D, EVEN_D)
        dst_ptrs, store_mask = _row_tile(out_ptr, rows, d0, in_bounds, D, BLOCK_D, EVEN_D)
        vals = tl.load(src_ptrs, mask=load_mask, other=0.0)
        if HAS_W:
            vals = vals.to(tl.float32) * w[:, None]
        tl.store(dst_ptrs, vals.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _combine_rows_kernel(y_ptr, inv_ptr, w_ptr, n_valid_ptr, out_ptr, T: tl.constexpr, K: tl.constexpr,
                         D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """out[t] = sum_{j < K, inv[t*K+j] < n_valid} w[t,j] * y[inv[t*K+j]], f32 accumulation in slot order j."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_bounds = toks < T
    n_valid = tl.load(n_valid_ptr)
    for d0 in tl.range(0, D, BLOCK_D):
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for j in tl.range(0, K):
            pos = tl.load(inv_ptr + toks * K + j, mask=in_bounds, other=0)
            live = in_bounds & (pos >= 0) & (pos < n_valid)
            # the weight of a slot past n_valid is masked like its row: an Inf / NaN there must not meet the zero
            w = tl.load(w_ptr + toks * K + j, mask=live, other=0.0).to(tl.float32)
            y_ptrs, y_mask = _row_tile(y_ptr, pos, d0, live, D, BLOCK_D, EVEN_D)
            acc += w[:, None] * tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        out_ptrs, out_mask = _row_tile(out_ptr, toks, d0, in_bounds, D, BLOCK_D, EVEN_D)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_grad_kernel(dout_ptr, y_ptr, inv_ptr, n_valid_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr,
                        D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """out[f] = <dout[f // K], y[inv[f]]> in f32 for inv[f] < n_valid, else 0 (f = t*K + j)."""
    slots = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_bounds = slots < N
    pos = tl.load(inv_ptr + slots, mask=in_bounds, other=0)
    live = in_bounds & (pos >= 0) & (pos < tl.load(n_valid_ptr))
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for d0 in tl.range(0, D, BLOCK_D):
        g_ptrs, mask = _row_tile(dout_ptr, slots // K, d0, live, D, BLOCK_D, EVEN_D)
        y_ptrs, _ = _row_tile(y_ptr, pos, d0, live, D, BLOCK_D, EVEN_D)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += g * tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + slots, tl.sum(acc, axis=1), mask=in_bounds)


# ---------------------------------------------------------------------------------------------------------------
# Wrappers (the backend functions).


def _e_pad(num_experts):
    return triton.next_power_of_2(num_experts + 1)


def _block_d(d, cfg=ROWS_CONFIG):
    return min(cfg.block_d, triton.next_power_of_2(d))


def _row_params(d, cfg=ROWS_CONFIG):
    require_static("D (the row width) of the Triton row kernels", d, error=NotImplementedError,
                   kernels="the Triton kernels")
    block_d = _block_d(d, cfg)
    return dict(D=d, BLOCK_D=block_d, EVEN_D=d % block_d == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _n_valid_array(n_valid, n):
    """n_valid as int32 shape (1,) on device, clamped to [0, n]; ``None`` means every row (n may be symbolic)."""
    n = dim_value(n)
    if n_valid is None:
        return jnp.full((1,), n, jnp.int32)
    return jnp.clip(jnp.asarray(n_valid, jnp.int32).reshape(1), 0, n)


def _bound(n):
    """Static row count the kernels are launched for: ``n``, or its upper bound when ``n`` is symbolic."""
    return static_upper_bound(n, "the number of token copies T*k")


def sort_by_expert(expert_ids, num_experts, *, config: SortConfig = SORT_CONFIG):
    """expert_ids [T,k] -> (group_sizes [E] int32, sort_idx [T*k] int32); stable counting sort (module doc).
    A symbolic T*k sorts its static bound of ids, padded with the dropped key ``E`` (they sort last)."""
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    if n == 0:
        return jnp.zeros((num_experts,), jnp.int32), jnp.zeros((0,), jnp.int32)
    if num_experts + 1 > MAX_HISTOGRAM_KEYS:
        return groups.stable_expert_sort(flat, num_experts)
    nb = _bound(n)
    flat = pad_rows(flat, nb, jnp.full((nb,), num_experts, jnp.int32))
    e_pad, blocks = _e_pad(num_experts), triton.cdiv(nb, config.block_n)
    meta = dict(N=nb, E=num_experts, E_PAD=e_pad, BLOCK_N=config.block_n, num_warps=config.num_warps)
    counts = triton_call(flat, kernel=_histogram_kernel, grid=(blocks,),
                         out_shape=jax.ShapeDtypeStruct((blocks, e_pad), jnp.int32), **meta)
    totals = jnp.sum(counts, axis=0, dtype=jnp.int32)  # int32 sums: x64 would widen them (strict promotion refuses)
    start = jnp.cumsum(totals, dtype=jnp.int32) - totals              # first sorted row of each key
    base = start[None, :] + jnp.cumsum(counts, axis=0, dtype=jnp.int32) - counts  # + earlier blocks' counts
    sort_idx = triton_call(flat, base, kernel=_scatter_kernel, grid=(blocks,), CHUNK=config.chunk,
                           out_shape=jax.ShapeDtypeStruct((nb,), jnp.int32), **meta)
    return totals[:num_experts], sort_idx[:n]


def _inverse(sort_idx):
    """Inverse permutation, over the static bound of a symbolic length (padding rows map to themselves)."""
    n = sort_idx.shape[0]
    nb = _bound(n)
    sort_idx = pad_rows(sort_idx.astype(jnp.int32), nb, jnp.arange(nb))
    return triton_call(sort_idx, kernel=_inverse_kernel, grid=(triton.cdiv(nb, INVERSE_BLOCK),),
                       out_shape=jax.ShapeDtypeStruct((nb,), jnp.int32), N=nb, BLOCK=INVERSE_BLOCK)


def gather_rows(x, sort_idx, k, row_weights=None, n_valid=None, *, config: RowsConfig = ROWS_CONFIG):
    """x [T,D] -> [T*k, D], ``out[i] = x[sort_idx[i] // k]`` (* row weight) for ``i < n_valid``, zeros after."""
    n, d = sort_idx.shape[0], x.shape[1]
    if n == 0 or d == 0:
        return jnp.zeros((n, d), x.dtype)
    nb = _bound(n)
    has_w = row_weights is not None
    w = row_weights.reshape(-1).astype(jnp.float32) if has_w else jnp.zeros((1,), jnp.float32)
    out = triton_call(x, pad_rows(sort_idx.astype(jnp.int32), nb), w, _n_valid_array(n_valid, n),
                      kernel=_gather_rows_kernel, grid=(triton.cdiv(nb, config.block_rows),),
                      out_shape=jax.ShapeDtypeStruct((nb, d), x.dtype), N=nb, K=k, HAS_W=has_w,
                      BLOCK_M=config.block_rows, **_row_params(d, config))
    return out[:n]


def combine_rows(y, sort_idx, weights, n_valid=None, *, config: RowsConfig = ROWS_CONFIG):
    """y [T*k,D] -> [T,D], ``out[t] = sum_j weights[t,j] * y[inv[t*k+j]]`` over rows ``< n_valid``, f32 acc."""
    (t, k), d = weights.shape, y.shape[1]
    if t == 0 or d == 0:
        return jnp.zeros((t, d), y.dtype)
    tb = _bound(t * k) // k
    w = pad_rows(weights.astype(jnp.float32), tb).reshape(-1)
    out = triton_call(y, _inverse(sort_idx), w, _n_valid_array(n_valid, t * k),
                      kernel=_combine_rows_kernel, grid=(triton.cdiv(tb, config.block_rows),),
                      out_shape=jax.ShapeDtypeStruct((tb, d), y.dtype), T=tb, K=k,
                      BLOCK_T=config.block_rows, **_row_params(d, config))
    return out[:t]


def combine_weight_grad(dout, y, sort_idx, k, n_valid=None, *, config: RowsConfig = ROWS_CONFIG):
    """dout [T,D], y [T*k,D] -> [T,k] f32, ``<dout[t], y[inv[t*k+j]]>`` (zero where that row is ``>= n_valid``)."""
    n, d = sort_idx.shape[0], y.shape[1]
    if n == 0 or d == 0:
        return jnp.zeros((n // max(k, 1), k), jnp.float32)
    nb = _bound(n)
    out = triton_call(dout, y, _inverse(sort_idx), _n_valid_array(n_valid, n),
                      kernel=_weight_grad_kernel, grid=(triton.cdiv(nb, config.block_rows),),
                      out_shape=jax.ShapeDtypeStruct((nb,), jnp.float32), N=nb, K=k,
                      BLOCK_R=config.block_rows, **_row_params(d, config))
    return out[:n].reshape(n // k, k)


# ---------------------------------------------------------------------------------------------------------------
# AOT registration: every kernel x shipped config x dtype, at a representative DeepSeek-like shape.

_AOT_SHAPE = dict(T=4096, K=8, D=7168, E=256)


def _row_aot_cases(dtype, cfg=ROWS_CONFIG):
    s = _AOT_SHAPE
    n, p = s["T"] * s["K"], f"*{dtype}"
    rows = dict(D=s["D"], BLOCK_D=_block_d(s["D"], cfg), EVEN_D=s["D"] % _block_d(s["D"], cfg) == 0)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    name = f"rows_m{cfg.block_rows}_d{rows['BLOCK_D']}_w{cfg.num_warps}_{dtype}"
    for has_w in (False, True):
        yield AotCase("gather_rows" + ("_weighted" if has_w else ""), name, _gather_rows_kernel,
                      dict(x_ptr=p, sort_idx_ptr="*i32", w_ptr="*fp32", n_valid_ptr="*i32", out_ptr=p,
                           N="constexpr", K="constexpr", D="constexpr", HAS_W="constexpr", BLOCK_M="constexpr",
                           BLOCK_D="constexpr", EVEN_D="constexpr"),
                      dict(N=n, K=s["K"], HAS_W=has_w, BLOCK_M=cfg.block_rows, **rows), opts)
    yield AotCase("combine_rows", name, _combine_rows_kernel,
                  dict(y_ptr=p, inv_ptr="*i32", w_ptr="*fp32", n_valid_ptr="*i32", out_ptr=p, T="constexpr",
                       K="constexpr", D="constexpr", BLOCK_T="constexpr", BLOCK_D="constexpr", EVEN_D="constexpr"),
                  dict(T=s["T"], K=s["K"], BLOCK_T=cfg.block_rows, **rows), opts)
    yield AotCase("combine_weight_grad", name, _weight_grad_kernel,
                  dict(dout_ptr=p, y_ptr=p, inv_ptr="*i32", n_valid_ptr="*i32", out_ptr="*fp32", N="constexpr",
                       K="constexpr", D="constexpr", BLOCK_R="constexpr", BLOCK_D="constexpr", EVEN_D="constexpr"),
                  dict(N=n, K=s["K"], BLOCK_R=cfg.block_rows, **rows), opts)


def _sort_aot_cases(cfg=SORT_CONFIG):
    s = _AOT_SHAPE
    meta = dict(N=s["T"] * s["K"], E=s["E"], E_PAD=_e_pad(s["E"]), BLOCK_N=cfg.block_n)
    consts = {name: "constexpr" for name in meta}
    name = f"sort_n{cfg.block_n}_c{cfg.chunk}_w{cfg.num_warps}_int32"
    opts = dict(num_warps=cfg.num_warps, num_stages=1)
    yield AotCase("sort_histogram", name, _histogram_kernel, dict(ids_ptr="*i32", counts_ptr="*i32", **consts),
                  meta, opts)
    yield AotCase("sort_scatter", name, _scatter_kernel,
                  dict(ids_ptr="*i32", base_ptr="*i32", sort_idx_ptr="*i32", CHUNK="constexpr", **consts),
                  dict(CHUNK=cfg.chunk, **meta), opts)
    yield AotCase("sort_inverse", f"inverse_b{INVERSE_BLOCK}_int32", _inverse_kernel,
                  dict(sort_idx_ptr="*i32", inv_ptr="*i32", N="constexpr", BLOCK="constexpr"),
                  dict(N=meta["N"], BLOCK=INVERSE_BLOCK), dict(num_warps=4, num_stages=1))


@register_aot("sort")
def aot_cases(target):
    """Every sort-family kernel x shipped config x dtype (bf16, f32); the same list for every target."""
    del target
    cases = list(_sort_aot_cases())
    for dtype in ("bf16", "fp32"):
        cases.extend(_row_aot_cases(dtype))
    return cases
