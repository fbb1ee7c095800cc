"""Fused dispatch / combine for the Pallas grouped matmul (the optional ``gather_gmm`` / ``scatter_gmm`` of the
``moe_ops.backend`` interface; same contract as ``kernels.triton.fused``): the routed MoE layer never materialises a
permuted copy of its tokens or of its output.

Both run ``kernels.pallas.gmm._gmm_kernel`` over the ``M = T*k`` expert-sorted rows with the gmm schedule (grid
``(n, step, k)``, invariants G1-G5 of ``kernels.pallas.gmm``), ``slot = sort_idx[i]`` for sorted row ``i``:

* ``gather_gmm``: x [T,K] stays in HBM (``memory_space=ANY``) and its rows reach VMEM through ``gathered_lhs``, a
  double-buffered row-DMA pipeline over the schedule's fresh row tiles (the first COMPUTE step, ``k == 0``, of a tile
  not computed by the previous step). Local rows are contiguous, so the COMPUTE tiles of one column block are the
  consecutive tiles ``first..last`` (``_local_tiles``) and tile ``j`` lives in buffer ``j % 2``. At the fresh step of
  tile ``j``: if ``j == first`` its ``tm`` entries of ``sort_idx`` are copied into SMEM buffer ``j % 2`` and one row
  DMA per live row (``j*tm + r < M``) starts, bringing ``x[slot // k, :]`` into a ``[tm, K]`` VMEM tile (cold start);
  then tile ``j``'s DMAs are waited for; then, if ``j < last``, tile ``j+1``'s indices and row DMAs are started into
  the other buffer, so they run while tile ``j`` computes (over all its K blocks and group visits). The pipeline
  restarts at every column block (the ``n`` axis is "parallel": a core may not run the next block), so no DMA is
  left in flight at the end of a block. The K blocks of a tile are read from VMEM (``lhs = tile[:, k*tk :
  (k+1)*tk]``), and a tile shared by several groups is fetched once. Several sources gathered through the same rows
  (x and dout in the SwiGLU backward) share the indices and semaphores. Optional ``row_weights`` scale the group's
  f32 accumulator rows in the store.
* ``scatter_gmm``: the output tile lives in a VMEM scratch; the store scales each row by ``w.flat[slot]`` in f32
  (``row_scale_ref`` of the gmm kernel). After the tile's last visit (the next step has another tile or is a NOOP)
  each live row is DMAed to row ``slot`` of a token-major ``[T*k, N]`` buffer (``out_dtype``). ``sort_idx`` is a
  permutation, so every row is written exactly once per column block (no atomics); rows of non-local groups and
  rows beyond ``sum(group_sizes)`` were stored as zeros (G2/G3) and contribute nothing. The k slots of each token
  are then summed in f32 in slot order (``sum_slots``, an XLA reduction): deterministic.

VMEM (``Footprint``): gather holds two ``[tm, cdiv(K, tk)*tk]`` x-dtype tiles per gathered source besides the
pipelined rhs / out blocks and f32 accumulators (``tm`` is halved until one buffer of all sources takes at most
``GATHER_TILE_BYTES``, then ``tn`` / ``tm`` until the call fits); scatter holds a second ``[tm, tn]`` out-dtype tile.
Scatter needs ``tn | N`` (whole row-segment DMAs): the heuristic falls back to ``tn = N`` otherwise. ``sort_idx``
entries are clamped, so no DMA ever leaves its buffer even for a non-permutation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.groups import local_row_mask
from kernels.pallas import tiling as tiling_lib
from kernels.pallas.gmm import (COMPUTE, FIRST, STORE, _gmm_kernel, _gmm_out_index, _gmm_rhs_index, _gmm_rhs_t_index,
                                _gmm_lhs_index, _has, _keep, _resolve, _row_mask, gmm_schedule, tile_dot)
from kernels.pallas.gmm import gmm as plain_gmm
from kernels.pallas.sort import _blocked, _load_indices, _row_dmas, combine_rows, gather_rows
from kernels.pallas.vma import pallas_call
from kernels.platform import tpu_or_interpret
from kernels.shapes import require_static

__all__ = ["gather_gmm", "scatter_gmm", "sum_slots", "GATHER_TILE_BYTES"]

GATHER_TILE_BYTES = 4 * 1024 * 1024  # one buffer of the gathered [tm, K] tiles (there are two: double-buffered)


def sum_slots(slots, num_tokens, top_k, out_dtype):
    """[T*k, N] token-major slots -> [T, N]: ``out[t] = sum_j slots[t*k + j]`` in f32 (slot order), ``out_dtype``."""
    return slots.astype(jnp.float32).reshape(num_tokens, top_k, -1).sum(axis=1).astype(out_dtype)


def _row_scale_index(n, s, k, sched):
    return sched.m_tiles[s], 0


def _rhs_spec(t, transpose_rhs):
    return (pl.BlockSpec((None, t.tn, t.tk), _gmm_rhs_t_index) if transpose_rhs
            else pl.BlockSpec((None, t.tk, t.tn), _gmm_rhs_index))


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What a gathered-gmm kernel holds in VMEM: ``sources`` gathered tiles (two ``[tm, Kp]`` buffers each, ``Kp =
    cdiv(K, tk)*tk``), ``rhs`` pipelined ``[tk, tn]`` blocks, ``outs`` pipelined ``[tm, tn]`` output blocks, ``accs``
    f32 ``[tm, tn]`` accumulators and ``rows`` pipelined ``[tm, 1]`` f32 blocks (lane-padded to 128)."""
    sources: int = 1
    rhs: int = 1
    outs: int = 1
    accs: int = 1
    rows: int = 0

    def bytes(self, t, kdim, in_dtype, out_dtype):
        ib, ob = jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize
        return (2 * self.sources * t.tm * pl.cdiv(kdim, t.tk) * t.tk * ib + 2 * self.rhs * t.tk * t.tn * ib
                + 2 * self.outs * t.tm * t.tn * ob + 4 * self.accs * t.tm * t.tn + 2 * self.rows * t.tm * 128 * 4)


def fused_vmem_bytes(t, k, in_dtype, out_dtype, *, gather, footprint=Footprint()):
    """VMEM of a fused call: gather, ``footprint`` (the gathered buffers replace the gmm's lhs blocks); scatter, the
    gmm blocks (``tiling.vmem_bytes``) plus the output tile kept for the slot DMAs."""
    if gather:
        return footprint.bytes(t, k, in_dtype, out_dtype)
    return tiling_lib.vmem_bytes("gmm", t, in_dtype, out_dtype) + t.tm * t.tn * jnp.dtype(out_dtype).itemsize


def fused_tiling(tiling, m, k, n, num_local, in_dtype, out_dtype, *, gather, chip=None, footprint=Footprint()):
    """The gmm tiling (explicit or heuristic). The heuristic's then gets ``tn | N`` (scatter); with several rhs
    blocks (gather) ``tn`` is halved once when it stays a multiple of 128 (they share one gmm tile's VMEM); then
    ``tm`` is halved until one buffer of the gathered sources takes at most ``GATHER_TILE_BYTES``, and ``tn`` (while
    a multiple of 256, several rhs only), else ``tm``, until the whole call fits the chip's VMEM budget."""
    t = _resolve(tiling, "gmm", m, k, n, num_local, in_dtype, out_dtype, False)
    if not gather and n % t.tn:
        if tiling is not None:
            raise ValueError(f"scatter_gmm needs tn to divide N={n} (whole row-segment DMAs), got {t}")
        t = dataclasses.replace(t, tn=n)
    if tiling is None:
        split_tn = gather and footprint.rhs > 1
        if split_tn and t.tn % 256 == 0:
            t = dataclasses.replace(t, tn=t.tn // 2)
        sub, kp = tiling_lib.sublane(in_dtype, out_dtype), pl.cdiv(k, t.tk) * t.tk
        budget = tiling_lib.CHIPS[chip or tiling_lib.detect_chip()].budget_bytes
        item = jnp.dtype(in_dtype).itemsize
        big_tile = lambda t: gather and footprint.sources * t.tm * kp * item > GATHER_TILE_BYTES
        over = lambda t: fused_vmem_bytes(t, k, in_dtype, out_dtype, gather=gather, footprint=footprint) > budget
        while t.tm > sub and (big_tile(t) or over(t)):
            if not big_tile(t) and split_tn and t.tn % 256 == 0:
                t = dataclasses.replace(t, tn=t.tn // 2)
            else:
                t = dataclasses.replace(t, tm=max(sub, t.tm // 2))
    return t


def fused_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs, out_spec, out_shape, scratch, interpret, cost,
               accs=1):
    """The gmm grid ``(n, step, k)`` (n over the columns of the first output) with the schedule prefetched and
    ``accs`` f32 ``[tm, tn]`` accumulators as first scratch."""
    cols = (out_shape[0] if isinstance(out_shape, (list, tuple)) else out_shape).shape[1]
    return pallas_call(
        kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, in_specs=in_specs, out_specs=out_spec,
            grid=(pl.cdiv(cols, t.tn), num_steps, tiles_k),
            scratch_shapes=[pltpu.VMEM((t.tm, t.tn), jnp.float32)] * accs + scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, cost_estimate=cost)(sched, *operands)


# ---------------------------------------------------------------------------------------------------- gather
def _local_tiles(sched, tm):
    """First and last row tile holding local rows; every tile between them is a COMPUTE tile (local rows are
    contiguous), so they are the fresh tiles of a column block, in order. (``lax.div``: rows are >= 0, and a floor
    division would need the chip generation to lower.)"""
    tm = jnp.int32(tm)
    return lax.div(sched.starts[0], tm), lax.div(sched.ends[sched.ends.shape[0] - 1] - 1, tm)


def _tile_dmas(srcs, bufs, idx_smem, sem, tile, half, *, top_k, num_rows):
    """(start, wait): the row DMAs ``bufs[j][half, r] = srcs[j][idx_smem[half, r] // top_k]`` of the live rows of
    row tile ``tile`` into buffer ``half``, all on ``sem`` (the waits rebuild the same descriptors)."""
    tm = bufs[0].shape[1]

    def copies(r):
        row = lax.div(jnp.clip(idx_smem[half, r], 0, num_rows - 1), jnp.int32(top_k))
        for src, buf in zip(srcs, bufs):
            cols = src.shape[1]
            dst = buf.at[half, pl.ds(r, 1)] if cols == buf.shape[2] else buf.at[half, pl.ds(r, 1), pl.ds(0, cols)]
            yield pltpu.make_async_copy(src.at[pl.ds(row, 1)], dst, sem)

    def run(method):
        def body(r, carry):
            @pl.when(tile * tm + r < num_rows)
            def _live():
                for copy in copies(r):
                    getattr(copy, method)()
            return carry
        lax.fori_loop(jnp.int32(0), jnp.int32(tm), body, 0)

    return (lambda: run("start")), (lambda: run("wait"))


def gathered_lhs(sched, srcs, idx_hbm, bufs, idx_smem, sems, *, top_k, num_rows, tiles_k):
    """In a gmm-schedule kernel: run the double-buffered row-DMA pipeline of the module doc for the token-order
    sources ``srcs`` (HBM refs [T, K]) into ``bufs`` (``gather_scratch``) and return, per source, the ref of the
    step's K block of its current row tile (the lhs blocks, [tm, tk])."""
    s, kb = pl.program_id(1), pl.program_id(2)
    tm, kp = bufs[0].shape[1], bufs[0].shape[2]
    tk = kp // tiles_k
    tile = sched.data_tiles[s]
    half = lax.rem(tile, jnp.int32(2))
    prev = jnp.maximum(s - 1, 0)
    fresh = (s == 0) | (sched.data_tiles[prev] != tile) | ~_has(sched.flags[prev], COMPUTE)
    first, last = _local_tiles(sched, tm)
    dmas = functools.partial(_tile_dmas, srcs, bufs, idx_smem, top_k=top_k, num_rows=num_rows)

    @pl.when(_has(sched.flags[s], COMPUTE) & (kb == 0) & fresh)
    def _pipeline():
        start, wait = dmas(sems.at[1 + half], tile, half)

        @pl.when(tile == first)
        def _cold_start():
            _load_indices(idx_hbm, idx_smem.at[half], tile, sems.at[jnp.int32(0)])
            start()

        wait()

        @pl.when(tile < last)
        def _prefetch_next():
            _load_indices(idx_hbm, idx_smem.at[1 - half], tile + 1, sems.at[jnp.int32(0)])
            dmas(sems.at[2 - half], tile + 1, 1 - half)[0]()

    if tiles_k == 1:
        return [buf.at[half] for buf in bufs]
    return [buf.at[half, :, pl.ds(pl.multiple_of(kb * tk, tk), tk)] for buf in bufs]


def accumulate(sched, accs, products, *, tiles_k, k_rem):
    """At a COMPUTE step: zero the f32 ``accs`` at ``k == 0``, then ``accs[j] += lhs @ rhs`` for ``products[j] =
    (lhs_ref [tm, tk], rhs_ref [tk, tn] or [tn, tk] when ``rhs_t``, rhs_t)``; a ref used twice is loaded once; in a
    partial last K block (``k_rem``) the positions past K are zeroed in every operand."""
    s, kb = pl.program_id(1), pl.program_id(2)

    def load(ref, axis):
        x = ref[...]
        if not k_rem:
            return x
        limit = jnp.where(kb == tiles_k - 1, jnp.int32(k_rem), jnp.int32(x.shape[axis]))
        return _keep(lax.broadcasted_iota(jnp.int32, x.shape, axis) < limit, x)

    @pl.when(_has(sched.flags[s], COMPUTE))
    def _accumulate():
        @pl.when(kb == 0)
        def _zero():
            for acc in accs:
                acc[...] = jnp.zeros_like(acc)

        loaded = {}
        for acc, (lhs_ref, rhs_ref, rhs_t) in zip(accs, products):
            if id(lhs_ref) not in loaded:
                loaded[id(lhs_ref)] = load(lhs_ref, 1)
            lhs = loaded[id(lhs_ref)]
            acc[...] += tile_dot(lhs, load(rhs_ref, 1 if rhs_t else 0), rhs_t)


def _masked_store(ref, mask, value, first):
    """``ref = where(mask, value, 0 on a first visit / ref's rows on a revisit)`` (f32 select, ref's dtype)."""
    @pl.when(first)
    def _first_visit():
        ref[...] = jnp.where(mask, value, 0.0).astype(ref.dtype)

    @pl.when(~first)
    def _revisit():
        ref[...] = jnp.where(mask, value, ref[...].astype(jnp.float32)).astype(ref.dtype)


def store_group_rows(sched, s, refs, values):
    """The store of gmm-schedule step ``s`` (G2/G3): zeros into every ref of ``refs`` when the step has no local
    rows, else the group's rows of ``values()`` (f32 arrays, one per ref); a first visit zeroes the tile's other rows,
    a revisit keeps them. (``s`` is passed in: ``program_id`` inside a ``pl.when`` does not interpret.)"""
    flags = sched.flags[s]

    @pl.when(~_has(flags, COMPUTE))
    def _no_local_rows():
        for ref in refs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    @pl.when(_has(flags, COMPUTE))
    def _group_rows():
        for ref, value in zip(refs, values()):
            _masked_store(ref, _row_mask(sched, s, sched.m_tiles[s], ref.shape), value, _has(flags, FIRST))


def gather_scratch(t, kdim, dtypes):
    """Scratch of ``gathered_lhs`` for sources of ``dtypes`` (one dtype or a sequence): per source two x tiles
    ([2, tm, Kp]), then the SMEM indices of both buffers ([2, tm]) and three DMA semaphores (indices, buffer 0, 1)."""
    dtypes = dtypes if isinstance(dtypes, (list, tuple)) else [dtypes]
    kp = pl.cdiv(kdim, t.tk) * t.tk
    return ([pltpu.VMEM((2, t.tm, kp), d) for d in dtypes]
            + [pltpu.SMEM((2, t.tm), jnp.int32), pltpu.SemaphoreType.DMA((3,))])


def _gather_kernel(sched, x_hbm, idx_hbm, rhs_ref, *refs, top_k, num_rows, tiles_k, k_rem, transpose_rhs, has_w):
    """lhs rows fetched from token order (module doc), then the gmm kernel on the VMEM tile."""
    w_ref = refs[0] if has_w else None
    out_ref, acc_ref, xtile, idx_smem, sems = refs[-5:]
    lhs_ref, = gathered_lhs(sched, [x_hbm], idx_hbm, [xtile], idx_smem, sems, top_k=top_k, num_rows=num_rows,
                            tiles_k=tiles_k)
    _gmm_kernel(sched, lhs_ref, rhs_ref, out_ref, acc_ref, tiles_k=tiles_k, k_rem=k_rem, transpose_rhs=transpose_rhs,
                has_existing=False, row_scale_ref=w_ref)


@functools.partial(jax.jit, static_argnames=("top_k", "transpose_rhs", "out_dtype", "tiling", "interpret"))
def _gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, row_weights, *, top_k, transpose_rhs, out_dtype, tiling,
                interpret):
    (m,), (_, kdim), num_local = sort_idx.shape, x.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    t = fused_tiling(tiling, m, kdim, n, num_local, x.dtype, out_dtype, gather=True)
    tiles_k = pl.cdiv(kdim, t.tk)
    sched, num_steps = gmm_schedule(group_sizes, group_offset, num_local, m, t.tm, tiles_k)
    has_w = row_weights is not None
    in_specs = [pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY), _rhs_spec(t, transpose_rhs)]
    operands = [x, _blocked(sort_idx, t.tm), rhs]
    if has_w:  # the routing weights in sorted order: a tiny XLA gather, [M, 1] f32
        in_specs.append(pl.BlockSpec((t.tm, 1), _row_scale_index))
        operands.append(row_weights.reshape(-1).astype(jnp.float32)[sort_idx][:, None])
    kernel = functools.partial(_gather_kernel, top_k=top_k, num_rows=m, tiles_k=tiles_k, k_rem=kdim % t.tk,
                               transpose_rhs=transpose_rhs, has_w=has_w)
    scratch = gather_scratch(t, kdim, x.dtype)
    item = jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(flops=2 * m * kdim * n, transcendentals=0,
                           bytes_accessed=item * (m * kdim + num_local * kdim * n) + jnp.dtype(out_dtype).itemsize
                           * m * n)
    return fused_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs,
                 pl.BlockSpec((t.tm, t.tn), _gmm_out_index), jax.ShapeDtypeStruct((m, n), out_dtype), scratch,
                 interpret, cost)


@tpu_or_interpret
def gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, *, transpose_rhs, out_dtype, row_weights=None,
               tiling=None, interpret=None):
    """x [T,K] (token order), rhs [G_local,K,N] ([G_local,N,K] if ``transpose_rhs``), clamped group_sizes [G],
    group_offset int32[1], sort_idx [T*k] -> [T*k, N]: ``out[i] = x[sort_idx[i] // k] @ rhs[group(i)]`` (times
    ``row_weights.flat[sort_idx[i]]`` in f32 when given); rows outside local groups are zero. ``tiling`` /
    ``interpret`` as for ``kernels.pallas.gmm.gmm``."""
    m = sort_idx.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    require_static("K / N of the Pallas grouped matmul", x.shape[1], n)
    if m == 0 or x.shape[1] == 0:
        return jnp.zeros((m, n), out_dtype)
    if not isinstance(m, int):  # symbolic rows (jax.export): the composition, whose kernels run at M's static bound
        rows = gather_rows(x, sort_idx, k, row_weights, interpret=interpret)
        return plain_gmm(rows, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                         tiling=tiling, interpret=interpret)
    return _gather_gmm(x, rhs, group_sizes, group_offset, sort_idx.astype(jnp.int32), row_weights, top_k=int(k),
                       transpose_rhs=bool(transpose_rhs), out_dtype=jnp.dtype(out_dtype), tiling=tiling,
                       interpret=interpret)


# --------------------------------------------------------------------------------------------------- scatter
def _scatter_kernel(sched, h_ref, rhs_ref, w_ref, idx_hbm, slots_hbm, acc_ref, otile, idx_smem, sems, *, num_rows,
                    tiles_k, k_rem, transpose_rhs):
    """The gmm kernel into a VMEM tile (rows scaled by their weight), then row DMAs to the token-major slots."""
    n, s, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    _gmm_kernel(sched, h_ref, rhs_ref, otile, acc_ref, tiles_k=tiles_k, k_rem=k_rem, transpose_rhs=transpose_rhs,
                has_existing=False, row_scale_ref=w_ref)
    tm, tn = otile.shape
    size = sched.flags.shape[0]
    nxt = jnp.minimum(s + 1, size - 1)
    tile = sched.m_tiles[s]
    last = (s == size - 1) | (sched.m_tiles[nxt] != tile) | (sched.flags[nxt] == 0)

    @pl.when((kb == tiles_k - 1) & _has(sched.flags[s], STORE) & last)
    def _scatter():
        _load_indices(idx_hbm, idx_smem, tile, sems.at[jnp.int32(0)])
        col = pl.ds(pl.multiple_of(n * tn, tn), tn)
        _row_dmas(otile, slots_hbm, sems.at[jnp.int32(1)], tm, live=lambda r: tile * tm + r < num_rows,
                  src_row=lambda r: r,
                  dst_slot=lambda r: (pl.ds(jnp.clip(idx_smem[r], 0, num_rows - 1), 1), col))


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiling", "interpret"))
def _scatter_slots(h, rhs, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs, out_dtype, tiling,
                   interpret):
    (m, kdim), num_local = h.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    t = fused_tiling(tiling, m, kdim, n, num_local, h.dtype, out_dtype, gather=False)
    tiles_k = pl.cdiv(kdim, t.tk)
    sched, num_steps = gmm_schedule(group_sizes, group_offset, num_local, m, t.tm, tiles_k)
    in_specs = [pl.BlockSpec((t.tm, t.tk), _gmm_lhs_index), _rhs_spec(t, transpose_rhs),
                pl.BlockSpec((t.tm, 1), _row_scale_index), pl.BlockSpec(memory_space=pl.ANY)]
    w_sorted = weights.reshape(-1).astype(jnp.float32)[sort_idx][:, None]     # [M, 1] f32, a tiny XLA gather
    operands = [h, rhs, w_sorted, _blocked(sort_idx, t.tm)]
    kernel = functools.partial(_scatter_kernel, num_rows=m, tiles_k=tiles_k, k_rem=kdim % t.tk,
                               transpose_rhs=transpose_rhs)
    scratch = [pltpu.VMEM((t.tm, t.tn), out_dtype), pltpu.SMEM((t.tm,), jnp.int32), pltpu.SemaphoreType.DMA((2,))]
    item = jnp.dtype(h.dtype).itemsize
    cost = pl.CostEstimate(flops=2 * m * kdim * n, transcendentals=0,
                           bytes_accessed=item * (m * kdim * pl.cdiv(n, t.tn) + num_local * kdim * n)
                           + jnp.dtype(out_dtype).itemsize * m * n)
    return fused_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs, pl.BlockSpec(memory_space=pl.ANY),
                 jax.ShapeDtypeStruct((m, n), out_dtype), scratch, interpret, cost)


@tpu_or_interpret
def scatter_gmm(h, rhs, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs, out_dtype, tiling=None,
                interpret=None):
    """h [T*k,K] (expert-sorted rows), rhs as in ``gather_gmm``, sort_idx [T*k], weights [T,k] -> [T, N]:
    ``out[t] = sum_j weights[t,j] * (h @ rhs[g])[inverse[t*k+j]]``; the [T*k, N] slot buffer is in ``out_dtype``,
    the k-slot sum in f32."""
    t, k = weights.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if t == 0 or h.shape[1] == 0:
        return jnp.zeros((t, n), out_dtype)
    if not isinstance(h.shape[0], int):  # symbolic rows (jax.export): the composition (see gather_gmm)
        y = plain_gmm(h, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                      tiling=tiling, interpret=interpret)
        # y is zero outside the local groups; their slots' weights are selected away too (never inf * 0)
        local = local_row_mask(group_sizes, group_offset, rhs.shape[0], h.shape[0])
        local_slots = jnp.zeros_like(local).at[sort_idx].set(local, unique_indices=True, mode="drop")
        weights = jnp.where(local_slots.reshape(weights.shape), weights, jnp.zeros((), weights.dtype))
        return combine_rows(y, sort_idx, weights, interpret=interpret)
    slots = _scatter_slots(h, rhs, group_sizes, group_offset, sort_idx.astype(jnp.int32), weights,
                           transpose_rhs=bool(transpose_rhs), out_dtype=jnp.dtype(out_dtype), tiling=tiling,
                           interpret=interpret)
    return sum_slots(slots, t, k, out_dtype)
