"""Token permutation kernels in Pallas (TPU / Mosaic): counting sort by expert, row gather, weighted combine.

Same backend functions and semantics as ``kernels.triton.sort`` (``N = T*k`` copies, flat index ``f = t*k + j``;
``n_valid``: sorted rows ``>= n_valid`` are written as zeros by ``gather_rows`` and never read by the combines).

Counting sort (no argsort; int32 vector work in VMEM, ``BLOCK_N`` lane-dense ids per grid step):

1. ``_histogram_kernel``: ``counts[b, e] = sum_i [key_i == e]`` from a one-hot ``[E_PAD, BLOCK_N]`` compare, where
   ``key = id`` for ids in ``[0, E)`` and ``E`` (dropped) otherwise, also for the padding past ``N``.
2. jnp (tiny): ``base[b, e] = start[e] + sum_{b' < b} counts[b', e]``.
3. ``_position_kernel``: ``pos_f = base[b, key_f] + #{f' < f in block b: key_f' == key_f}`` (a ``[BLOCK_N,
   BLOCK_N]`` compare of the ids as a column against the ids as a row). ``pos`` is the inverse permutation.
4. ``sort_idx[pos_f] = f``: a permutation write of ``N`` int32 in XLA (Mosaic has no vector scatter).

From ``MAX_HISTOGRAM_KEYS`` keys (E + 1) XLA's stable sort runs instead (``groups.stable_expert_sort``): the
one-hot compare and the lane-padded ``[E_PAD, 1]`` count blocks grow with E past the VMEM budget.

Row movement (``_gather_kernel``, ``_combine_kernel``, ``_weight_grad_kernel``): each grid step copies its block of
row indices (``sort_idx`` or the inverse permutation, left in HBM) into SMEM, starts one row DMA per live row from
the HBM operand (``memory_space=ANY``) into its VMEM block, waits for all of them, then scales / reduces in f32 on
the VPU. ``n_valid`` is the only scalar-prefetched value; rows past it issue no DMA (a gather block wholly past it
reads nothing and writes zeros). Indices are clamped, so no DMA ever leaves its buffer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import groups
from kernels.pallas.vma import pallas_call
from kernels.platform import tpu_or_interpret
from kernels.shapes import dim_value, pad_rows, require_static, static_upper_bound

__all__ = ["sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "PallasSortConfig"]


@dataclasses.dataclass(frozen=True)
class PallasSortConfig:
    """``block_n`` ids per sort step (multiple of 128); ``block_rows`` rows (tokens) per gather/combine step, or
    ``None``: the largest power of two in [16, 256] whose VMEM footprint fits ``VMEM_BUDGET`` (see ``_rows``)."""

    block_n: int = 256
    block_rows: int | None = None


CONFIG = PallasSortConfig()
VMEM_BUDGET = 8 * 1024 * 1024   # half of the smallest default scoped VMEM (16 MiB on v5e / v5p)
LANE_BYTES = 128 * 4            # a [rows, <=128] 32-bit block takes a full lane row per row
MAX_HISTOGRAM_KEYS = 2048       # E + 1 keys: a 2 MiB one-hot and 1 MiB count / base blocks (double-buffered)


def _rows(config, num_rows, bytes_per_row):
    """Rows per grid step: the configured count, or the VMEM-budgeted power of two; the full dim if smaller."""
    rows = config.block_rows
    if rows is None:
        rows = 256
        while rows > 16 and rows * bytes_per_row > VMEM_BUDGET:
            rows //= 2
    if not isinstance(num_rows, int):  # symbolic (shape-polymorphic export): a static block, partial last block
        return rows
    return num_rows if num_rows <= rows else rows


def _n_valid_array(n_valid, n):
    n = dim_value(n)
    if n_valid is None:
        return jnp.full((1,), n, jnp.int32)
    return jnp.clip(jnp.asarray(n_valid, jnp.int32).reshape(1), 0, n)


def _bounded_tokens(t):
    """Static token count for a symbolic ``t`` (``jax.export``): the row kernels keep ``x`` / ``y`` in HBM as
    full-array blocks, which Pallas export refuses at a symbolic size, so they run on operands zero-padded to the
    bound (one extra copy of each, only in shape-polymorphic programs) and their results are sliced back."""
    return static_upper_bound(t, "the number of tokens T")


def _bounded_rows(y, sort_idx, n_valid, nb):
    """y [n, D] and sort_idx [n] padded to ``nb`` rows (padding slots map to themselves, a permutation of
    ``[0, nb)``), ``n_valid`` capped at the real ``n``: padding rows are never read."""
    n = y.shape[0]
    return (pad_rows(y, nb), pad_rows(sort_idx.astype(jnp.int32), nb, jnp.arange(nb, dtype=jnp.int32)),
            _n_valid_array(n_valid, n))


def _parallel(interpret):
    return dict(interpret=interpret,
                compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)))


# ---------------------------------------------------------------------------------------------------------------
# Counting sort.


def _keys(ids, num_experts):
    return jnp.where((ids >= 0) & (ids < num_experts), ids, num_experts)


def _histogram_kernel(ids_ref, counts_ref, *, num_experts):
    """ids_ref [1, BLOCK_N] -> counts_ref [E_PAD, 1]: occurrences of each key in the block."""
    key = _keys(ids_ref[...], num_experts)                                     # [1, BN]
    experts = jax.lax.broadcasted_iota(jnp.int32, (counts_ref.shape[0], key.shape[1]), 0)
    counts_ref[...] = jnp.sum((experts == key).astype(jnp.int32), axis=1, keepdims=True, dtype=jnp.int32)


def _position_kernel(ids_row_ref, ids_col_ref, base_ref, pos_ref, *, num_experts):
    """pos = base[key] + rank of the id among equal keys earlier in the block (stable)."""
    key_row = _keys(ids_row_ref[...], num_experts)                             # [1, BN]
    key_col = _keys(ids_col_ref[...], num_experts)                             # [BN, 1]
    bn = key_row.shape[1]
    earlier = jax.lax.broadcasted_iota(jnp.int32, (bn, bn), 0) < jax.lax.broadcasted_iota(jnp.int32, (bn, bn), 1)
    rank = jnp.sum(((key_col == key_row) & earlier).astype(jnp.int32), axis=0, keepdims=True, dtype=jnp.int32)
    experts = jax.lax.broadcasted_iota(jnp.int32, (base_ref.shape[0], bn), 0)
    base = jnp.sum(jnp.where(experts == key_row, base_ref[...], 0), axis=0, keepdims=True, dtype=jnp.int32)
    pos_ref[...] = base + rank


def _block_index(b):
    """Index map of per-block operands laid out [blocks, ...]: block b, whole trailing dims."""
    return b, 0, 0


@tpu_or_interpret
def sort_by_expert(expert_ids, num_experts, *, config: PallasSortConfig = CONFIG, interpret=None):
    """expert_ids [T,k] -> (group_sizes [E] int32, sort_idx [T*k] int32); stable counting sort (module doc)."""
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    n, bn = flat.shape[0], config.block_n
    if n == 0:
        return jnp.zeros((num_experts,), jnp.int32), jnp.zeros((0,), jnp.int32)
    if num_experts + 1 > MAX_HISTOGRAM_KEYS:
        return groups.stable_expert_sort(flat, num_experts)
    blocks = pl.cdiv(n, bn)
    e_pad = pl.cdiv(num_experts + 1, 8) * 8
    ids = jnp.pad(flat, (0, blocks * bn - n), constant_values=-1)             # padding -> dropped key, sorts last
    ids_row, ids_col = ids.reshape(blocks, 1, bn), ids.reshape(blocks, bn, 1)
    row_spec = pl.BlockSpec((None, 1, bn), _block_index)
    col_spec = pl.BlockSpec((None, bn, 1), _block_index)
    count_spec = pl.BlockSpec((None, e_pad, 1), _block_index)
    counts = pallas_call(
        functools.partial(_histogram_kernel, num_experts=num_experts), grid=(blocks,), in_specs=[row_spec],
        out_specs=count_spec, out_shape=jax.ShapeDtypeStruct((blocks, e_pad, 1), jnp.int32),
        **_parallel(interpret))(ids_row)
    totals = jnp.sum(counts, axis=0, dtype=jnp.int32)                          # [E_PAD, 1]
    cumsum = functools.partial(jnp.cumsum, axis=0, dtype=jnp.int32)           # int32 also under jax_enable_x64
    base = (cumsum(totals) - totals)[None] + cumsum(counts) - counts
    pos = pallas_call(
        functools.partial(_position_kernel, num_experts=num_experts), grid=(blocks,),
        in_specs=[row_spec, col_spec, count_spec], out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct((blocks, 1, bn), jnp.int32), **_parallel(interpret))(ids_row, ids_col, base)
    sort_idx = jnp.zeros((n,), jnp.int32).at[pos.reshape(-1)[:n]].set(
        jnp.arange(n, dtype=jnp.int32), unique_indices=True, mode="drop")
    return totals[:num_experts, 0].astype(jnp.int32), sort_idx


def _inverse(sort_idx):
    n = sort_idx.shape[0]
    # Entries a non-permutation leaves unset stay 0: always a legal DMA source.
    return jnp.zeros((n,), jnp.int32).at[sort_idx].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True,
                                                       mode="drop")


# ---------------------------------------------------------------------------------------------------------------
# Row movement: per-row DMAs driven by indices copied block by block into SMEM.


def _row_block(b, *_prefetch):
    """Index map of row-blocked operands [rows, D] / [rows, k]: row block b (the n_valid prefetch is unused)."""
    return b, 0


def _load_indices(idx_hbm, idx_smem, block, sem):
    """idx_smem[:] = idx_hbm[block] (indices laid out [blocks, per block]): one synchronous DMA."""
    copy = pltpu.make_async_copy(idx_hbm.at[block], idx_smem, sem)
    copy.start()
    copy.wait()


def _row_dmas(src_hbm, dst, sem, count, live, src_row, dst_slot):
    """``dst[dst_slot(q)] = src_hbm[src_row(q)]`` for the ``q < count`` with ``live(q)``: every DMA is started,
    then every one is waited for, all on one semaphore."""
    def copy(q):
        return pltpu.make_async_copy(src_hbm.at[pl.ds(src_row(q), 1)], dst.at[dst_slot(q)], sem)

    def start(q, carry):
        pl.when(live(q))(lambda: copy(q).start())
        return carry

    def wait(q, carry):
        pl.when(live(q))(lambda: copy(q).wait())
        return carry

    jax.lax.fori_loop(jnp.int32(0), jnp.int32(count), start, 0)
    jax.lax.fori_loop(jnp.int32(0), jnp.int32(count), wait, 0)


def _blocked(idx, per_block):
    """int32 indices zero-padded and laid out [blocks, per_block]: one row per grid step's SMEM copy."""
    idx = idx.astype(jnp.int32)
    blocks = pl.cdiv(idx.shape[0], per_block)
    return jnp.pad(idx, (0, blocks * per_block - idx.shape[0])).reshape(blocks, per_block)


def _gather_kernel(n_valid_ref, x_hbm, idx_hbm, *rest, k, num_rows, has_w):
    """out[r] = x[sort_idx[i] // k] (* w_sorted[r]) for i = block*BM + r < n_valid, else 0."""
    w_ref, out_ref, idx_smem, sems = rest if has_w else (None, *rest)
    b, bm = pl.program_id(0), out_ref.shape[0]
    n_valid = n_valid_ref[0]                                          # clamped to [0, num_rows]

    @pl.when(b * bm < n_valid)                                        # blocks past n_valid: no reads at all
    def _():
        _load_indices(idx_hbm, idx_smem, b, sems.at[jnp.int32(0)])
        # Row r's source is token row sort_idx[i] // k (clamped: never an out-of-bounds DMA).
        _row_dmas(x_hbm, out_ref, sems.at[jnp.int32(1)], bm, live=lambda r: b * bm + r < n_valid,
                  src_row=lambda r: jax.lax.div(jnp.clip(idx_smem[r], 0, num_rows - 1), jnp.int32(k)),
                  dst_slot=lambda r: pl.ds(r, 1))

    rows = b * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    vals = out_ref[...]
    if has_w:
        vals = vals.astype(jnp.float32) * w_ref[...]
    out_ref[...] = jnp.where(rows < n_valid, vals, 0).astype(out_ref.dtype)


@tpu_or_interpret
def gather_rows(x, sort_idx, k, row_weights=None, n_valid=None, *, config: PallasSortConfig = CONFIG,
                interpret=None):
    """x [T,D] -> [T*k, D], ``out[i] = x[sort_idx[i] // k]`` (* row weight, f32) for ``i < n_valid``, zeros after."""
    n, d = sort_idx.shape[0], x.shape[1]
    require_static("D (the row width) of the Pallas row kernels", d)
    if n == 0 or d == 0:
        return jnp.zeros((n, d), x.dtype)
    if not isinstance(n, int):  # symbolic (jax.export): run at the static bound (see _bounded_tokens), slice back
        tb = _bounded_tokens(x.shape[0])
        w = None if row_weights is None else pad_rows(row_weights.reshape(-1, k), tb)
        return gather_rows(pad_rows(x, tb), pad_rows(sort_idx, tb * k), k, w, _n_valid_array(n_valid, n),
                           config=config, interpret=interpret)[:n]
    item = jnp.dtype(x.dtype).itemsize
    bm = _rows(config, n, 2 * d * item + 4 * d + 2 * LANE_BYTES)   # out block x2, f32 temp, weight block x2
    has_w = row_weights is not None
    in_specs = [pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)]
    operands = [x, _blocked(sort_idx, bm)]
    if has_w:   # the N routing weights in sorted order: a tiny XLA gather, [N, 1] f32
        in_specs.append(pl.BlockSpec((bm, 1), _row_block))
        operands.append(row_weights.reshape(-1).astype(jnp.float32)[sort_idx][:, None])
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(pl.cdiv(n, bm),), in_specs=in_specs, out_specs=pl.BlockSpec((bm, d), _row_block),
        scratch_shapes=[pltpu.SMEM((bm,), jnp.int32), pltpu.SemaphoreType.DMA((2,))])
    kernel = functools.partial(_gather_kernel, k=k, num_rows=n, has_w=has_w)
    return pallas_call(kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((n, d), x.dtype),
                          **_parallel(interpret))(_n_valid_array(n_valid, n), *operands)


def _fetch_token_rows(n_valid, y_hbm, inv_hbm, inv_smem, buf, sems, block, bt, num_tokens, k):
    """buf[j, r] = y[inv[t*k + j]] for the tokens t = block*bt + r < num_tokens whose row is < n_valid."""
    _load_indices(inv_hbm, inv_smem, block, sems.at[jnp.int32(0)])

    def live(q):   # q = r*k + j (truncating div/rem: indices are non-negative, and Mosaic has no sign op)
        return (block * bt + jax.lax.div(q, jnp.int32(k)) < num_tokens) & (inv_smem[q] < n_valid)

    _row_dmas(y_hbm, buf, sems.at[jnp.int32(1)], bt * k, live,
              src_row=lambda q: jnp.clip(inv_smem[q], 0, y_hbm.shape[0] - 1),
              dst_slot=lambda q: (jax.lax.rem(q, jnp.int32(k)), pl.ds(jax.lax.div(q, jnp.int32(k)), 1)))


def _slot_terms(inv_blk_ref, buf, n_valid, j):
    """(valid [BT,1], rows [BT,D] f32) of slot j: the fetched rows, and whether each was fetched."""
    return inv_blk_ref[:, j:j + 1] < n_valid, buf[j].astype(jnp.float32)


def _combine_kernel(n_valid_ref, y_hbm, inv_hbm, inv_blk_ref, w_ref, out_ref, inv_smem, buf, sems, *, k,
                    num_tokens):
    """out[t] = sum_j [inv[t,j] < n_valid] w[t,j] * y[inv[t,j]], f32, slot order j = 0..k-1."""
    b, bt = pl.program_id(0), out_ref.shape[0]
    n_valid = n_valid_ref[0]
    _fetch_token_rows(n_valid, y_hbm, inv_hbm, inv_smem, buf, sems, b, bt, num_tokens, k)
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for j in range(k):
        valid, rows = _slot_terms(inv_blk_ref, buf, n_valid, j)
        acc = acc + jnp.where(valid, w_ref[:, j:j + 1] * rows, 0.0)
    out_ref[...] = acc.astype(out_ref.dtype)


def _weight_grad_kernel(n_valid_ref, y_hbm, inv_hbm, inv_blk_ref, dout_ref, out_ref, inv_smem, buf, sems, *, k,
                        num_tokens):
    """out[t, j] = [inv[t,j] < n_valid] <dout[t], y[inv[t,j]]> in f32."""
    b, bt = pl.program_id(0), out_ref.shape[0]
    n_valid = n_valid_ref[0]
    _fetch_token_rows(n_valid, y_hbm, inv_hbm, inv_smem, buf, sems, b, bt, num_tokens, k)
    g = dout_ref[...].astype(jnp.float32)
    for j in range(k):
        valid, rows = _slot_terms(inv_blk_ref, buf, n_valid, j)
        out_ref[:, j:j + 1] = jnp.where(valid, jnp.sum(g * rows, axis=1, keepdims=True), 0.0)


def _token_call(kernel, y, sort_idx, k, n_valid, blocked, out_cols, out_dtype, config, interpret):
    """Shared launcher of the per-token kernels: grid over token blocks, y and inv left in HBM."""
    n, d = y.shape
    require_static("D (the row width) of the Pallas row kernels", d)
    t, item = n // k, jnp.dtype(y.dtype).itemsize
    # fetched rows (k per token), blocked operand / output x2, f32 temporaries, inv + second blocked input x2
    bt = _rows(config, t, k * d * item + 4 * d * max(item, 4) + 8 * d + 4 * LANE_BYTES)
    inv = _inverse(sort_idx.astype(jnp.int32))
    in_specs = [pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec((bt, k), _row_block)]
    in_specs += [pl.BlockSpec((bt, a.shape[1]), _row_block) for a in blocked]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(pl.cdiv(t, bt),), in_specs=in_specs,
        out_specs=pl.BlockSpec((bt, out_cols), _row_block),
        scratch_shapes=[pltpu.SMEM((bt * k,), jnp.int32), pltpu.VMEM((k, bt, d), y.dtype),
                        pltpu.SemaphoreType.DMA((2,))])
    return pallas_call(functools.partial(kernel, k=k, num_tokens=t), grid_spec=grid_spec,
                          out_shape=jax.ShapeDtypeStruct((t, out_cols), out_dtype), **_parallel(interpret))(
        _n_valid_array(n_valid, n), y, _blocked(inv, bt * k), inv.reshape(t, k), *blocked)


@tpu_or_interpret
def combine_rows(y, sort_idx, weights, n_valid=None, *, config: PallasSortConfig = CONFIG, interpret=None):
    """y [T*k,D] -> [T,D], ``out[t] = sum_j weights[t,j] * y[inv[t*k+j]]`` over rows ``< n_valid``, f32 acc."""
    (t, k), d = weights.shape, y.shape[1]
    if t == 0 or d == 0:
        return jnp.zeros((t, d), y.dtype)
    if not isinstance(t, int):
        tb = _bounded_tokens(t)
        y, sort_idx, n_valid = _bounded_rows(y, sort_idx, n_valid, tb * k)
        return combine_rows(y, sort_idx, pad_rows(weights, tb), n_valid, config=config, interpret=interpret)[:t]
    return _token_call(_combine_kernel, y, sort_idx, k, n_valid, [weights.astype(jnp.float32)], d, y.dtype,
                       config, interpret)


@tpu_or_interpret
def combine_weight_grad(dout, y, sort_idx, k, n_valid=None, *, config: PallasSortConfig = CONFIG, interpret=None):
    """dout [T,D], y [T*k,D] -> [T,k] f32, ``<dout[t], y[inv[t*k+j]]>`` (zero where that row is ``>= n_valid``)."""
    t, d = dout.shape
    if t == 0 or d == 0:
        return jnp.zeros((t, k), jnp.float32)
    if not isinstance(t, int):
        tb = _bounded_tokens(t)
        y, sort_idx, n_valid = _bounded_rows(y, sort_idx, n_valid, tb * k)
        return combine_weight_grad(pad_rows(dout, tb), y, sort_idx, k, n_valid, config=config,
                                   interpret=interpret)[:t]
    return _token_call(_weight_grad_kernel, y, sort_idx, k, n_valid, [dout], k, jnp.float32, config, interpret)
