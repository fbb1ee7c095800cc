"""Grouped matmuls for TPU in Pallas (Mosaic): ``gmm`` (ragged rows x per-group weights) and ``tgmm`` (ragged
contraction, the weight gradient). On CPU both run in TPU interpret mode.

Shapes: lhs [M,K]; gmm rhs [G_local,K,N] ([G_local,N,K] with ``transpose_rhs``) -> [M,N]; tgmm rhs [M,N] ->
[G_local,K,N]. ``group_sizes`` [G] int32 is already clamped (>= 0, sum <= M); ``group_offset`` int32[1] names the
first local group. Rows of non-local groups and rows >= sum(group_sizes) come out as zeros (gmm), empty local groups
as zero blocks (tgmm); with ``existing_out`` the kernel adds its contribution to it instead (and leaves the rest).

Design (cf. megablox, but every output block is written by the kernel itself, so no uninitialised memory is left and
no masking pass follows): a *schedule* of grid steps is computed on device from the group sizes and passed by scalar
prefetch; index maps read it to pick blocks; an f32 VMEM accumulator reduces over the K grid axis (gmm) or over the
row tiles of a group (tgmm). Numbered invariants of the schedules:

gmm, grid (n, step, k), step in [0, num_steps):
  G1. Step s writes output row tile ``m_tiles[s]``; ``m_tiles`` is non-decreasing and every row tile of the output
      appears, so each tile is written, and re-visits of a tile are consecutive (its block stays in VMEM).
  G2. A tile is visited once per local non-empty group that has rows in it (COMPUTE steps, in group order), or once
      in all (a STORE-only step writing zeros / ``existing_out``) when it has no rows of a local group.
  G3. COMPUTE step s multiplies lhs tile ``data_tiles[s]`` (= ``m_tiles[s]``) by rhs group ``groups[s]`` and stores
      only rows in ``[starts[g], ends[g])``; the first visit of a tile (FIRST) initialises the other rows.
  G4. On STORE-only and NOOP steps the lhs/rhs block indices (``data_tiles``, ``groups``, ``k_pins``) repeat those of
      a neighbouring step, so the pipeline issues no DMA for them.
  G5. num_steps <= S = tiles_m + G_local - 1, the static length of the arrays; the grid's step extent is num_steps
      (a dynamic grid dim), and entries past it are NOOPs (no flag) on the last tile.
tgmm, grid (n, k, step):
  T1. Steps visit local groups in order, ``visits[g] = #row tiles holding rows of g`` (1 for an empty group), so
      every output block ``out[g]`` is visited in one consecutive run and written exactly once (STORE, last visit).
  T2. FIRST zeroes the accumulator; COMPUTE adds ``lhs[rows of g in tile]^T @ rhs[rows of g in tile]``; rows outside
      the group (other groups, the partial last tile, rows >= sum) are zeroed by select before the dot.
  T3. num_steps <= S = tiles_m + G_local - 1 (the grid's step extent is num_steps); entries past it are NOOPs on
      the last group and tile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.pallas import tiling as tiling_lib
from kernels.pallas.vma import pallas_call
from kernels.groups import segment_of
from kernels.platform import tpu_or_interpret
from kernels.shapes import pad_rows, require_static, static_upper_bound

__all__ = ["gmm", "tgmm", "gmm_schedule", "tgmm_schedule"]

# Step flags (bit set in ``Schedule.flags``).
FIRST = 1     # gmm: first visit of the output tile; tgmm: first visit of the group (zero the accumulator)
STORE = 2     # the step writes its output block (at the last k for gmm; tgmm: the last visit of the group)
COMPUTE = 4   # the step multiplies (its group has rows in its tile)


class Schedule(NamedTuple):
    """Scalar-prefetched tile metadata: per-step int32 [S] arrays and per-local-group row ranges [G_local]."""
    m_tiles: jax.Array     # output row tile (gmm) / row tile read (tgmm) of step s
    data_tiles: jax.Array  # lhs row tile read at step s (gmm; == m_tiles for tgmm)
    groups: jax.Array      # local group of step s (always a valid index, frozen on non-COMPUTE steps)
    k_pins: jax.Array      # gmm: -1 = read the grid's k block, else this pinned k block (G4); tgmm: unused
    flags: jax.Array       # FIRST | STORE | COMPUTE
    starts: jax.Array      # [G_local] first row of local group g
    ends: jax.Array        # [G_local] one past its last row


def _static_cost(fields):
    """``pl.CostEstimate`` of ``fields``, or None when a field is symbolic (shape-polymorphic export: no estimate)."""
    return pl.CostEstimate(**fields) if all(isinstance(v, int) for v in fields.values()) else None


def _local_ranges(group_sizes, group_offset, num_local):
    """Row ranges [start, end) of local groups ``group_offset + j``; groups past G are empty at the sum."""
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes, dtype=jnp.int32)
    total = ends[-1]
    num_groups = group_sizes.shape[0]
    offset = jnp.clip(group_offset.reshape(-1)[0].astype(jnp.int32), 0, num_groups)
    pad = lambda x: jnp.concatenate([x, jnp.full((num_local,), total, jnp.int32)])
    take = lambda x: lax.dynamic_slice(pad(x), (offset,), (num_local,))
    return take(ends - group_sizes), take(ends)


def gmm_schedule(group_sizes, group_offset, num_local: int, m: int, tm: int, tiles_k: int):
    """(Schedule, num_steps) for gmm (invariants G1-G5): the row tiles before the local rows (STORE-only), the
    (tile, group) pairs of local non-empty groups (COMPUTE), the tiles after them (STORE-only), then NOOP padding."""
    tiles_m = pl.cdiv(m, tm)
    size = tiles_m + num_local - 1
    starts, ends = _local_ranges(group_sizes, group_offset, num_local)
    nonempty = ends > starts
    first_tile = starts // tm
    span = jnp.where(nonempty, (ends - 1) // tm - first_tile + 1, 0)
    cum = jnp.cumsum(span, dtype=jnp.int32)
    n_local = cum[-1]
    any_local = n_local > 0
    pre = jnp.where(any_local, starts[0] // tm, tiles_m)                 # tiles before the local rows
    last_local = jnp.where(any_local, (ends[-1] - 1) // tm, tiles_m - 1)
    post = tiles_m - 1 - last_local                                       # tiles after them
    g_first = jnp.argmax(nonempty).astype(jnp.int32)
    g_last = (num_local - 1 - jnp.argmax(nonempty[::-1])).astype(jnp.int32)

    s = jnp.arange(size, dtype=jnp.int32)
    j = s - pre
    g = jnp.clip(segment_of(cum, j), 0, num_local - 1).astype(jnp.int32)
    local_tile = first_tile[g] + j - (cum[g] - span[g])
    in_pre, in_local = s < pre, (s >= pre) & (j < n_local)
    in_post = (j >= n_local) & (j < n_local + post)
    m_tiles = jnp.where(in_pre, s, jnp.where(in_local, local_tile,
                                             jnp.where(in_post, last_local + 1 + j - n_local, tiles_m - 1)))
    data_tiles = jnp.where(in_local, local_tile, jnp.where(in_pre, jnp.minimum(pre, tiles_m - 1), last_local))
    groups = jnp.where(in_local, g, jnp.where(in_pre, g_first, g_last))
    k_pins = jnp.where(in_local, jnp.int32(-1), jnp.where(in_pre, jnp.int32(0), jnp.int32(tiles_k - 1)))
    first = (s == 0) | (m_tiles != jnp.roll(m_tiles, 1))
    flags = (jnp.where(first & (in_pre | in_local | in_post), FIRST, 0)
             | jnp.where(in_pre | in_local | in_post, STORE, 0) | jnp.where(in_local, COMPUTE, 0))
    sched = Schedule(m_tiles, data_tiles, groups, k_pins, flags.astype(jnp.int32), starts, ends)
    return sched, (pre + n_local + post).astype(jnp.int32)


def tgmm_schedule(group_sizes, group_offset, num_local: int, m: int, tm: int):
    """(Schedule, num_steps) for tgmm (invariants T1-T3): each local group's row tiles in order, one visit for an
    empty group, then NOOP padding."""
    tiles_m = pl.cdiv(m, tm)
    size = tiles_m + num_local - 1
    starts, ends = _local_ranges(group_sizes, group_offset, num_local)
    nonempty = ends > starts
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    visits = jnp.where(nonempty, (ends - 1) // tm - first_tile + 1, 1)
    cum = jnp.cumsum(visits, dtype=jnp.int32)
    s = jnp.arange(size, dtype=jnp.int32)
    real = s < cum[-1]
    g = jnp.clip(segment_of(cum, s), 0, num_local - 1).astype(jnp.int32)
    j = s - (cum[g] - visits[g])
    tiles = jnp.where(real, first_tile[g] + j, first_tile[-1] + visits[-1] - 1)
    flags = (jnp.where(real & (j == 0), FIRST, 0) | jnp.where(real & (j == visits[g] - 1), STORE, 0)
             | jnp.where(real & nonempty[g], COMPUTE, 0))
    sched = Schedule(tiles, tiles, g, jnp.full((size,), -1, jnp.int32), flags.astype(jnp.int32), starts, ends)
    return sched, cum[-1].astype(jnp.int32)


def _has(flags, bit):
    return (flags & bit) != 0


def _keep(mask, x):
    """``x`` where ``mask``, else 0; the select runs in f32 (no bf16 VPU on v5e), the result keeps x's dtype."""
    return jnp.where(mask, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _row_mask(sched, s, tile, shape):
    """Rows of the block of row tile ``tile`` that belong to group ``sched.groups[s]`` ([tm, x] bool)."""
    g = sched.groups[s]
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + tile * shape[0]
    return (rows >= sched.starts[g]) & (rows < sched.ends[g])


# ---------------------------------------------------------------------------------------------------------- gmm
def _k_block(k, pin):
    return jnp.where(pin < 0, k, pin)


def _gmm_lhs_index(n, s, k, sched):
    return sched.data_tiles[s], _k_block(k, sched.k_pins[s])


def _gmm_rhs_index(n, s, k, sched):
    return sched.groups[s], _k_block(k, sched.k_pins[s]), n


def _gmm_rhs_t_index(n, s, k, sched):
    return sched.groups[s], n, _k_block(k, sched.k_pins[s])


def _gmm_out_index(n, s, k, sched):
    return sched.m_tiles[s], n


def tile_dot(lhs, rhs, transpose_rhs, precision=None):
    """f32 ``lhs [tm,tk] @ rhs`` for ``rhs [tk,tn]``, or ``[tn,tk]`` with ``transpose_rhs`` (contracted on its last
    dim). One output column (``tn = 1``, transposed) goes in f32: Mosaic lowers that dot as a matrix-vector product,
    which fails verification for 16-bit operands (jax 0.10 / 0.11: it broadcasts them to f32 vectors before
    converting them), while the f32 form takes the matmul path; products of 16-bit values are exact in f32."""
    if transpose_rhs and rhs.shape[0] == 1:
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=jnp.float32)


def _gmm_kernel(sched, lhs_ref, rhs_ref, *refs, tiles_k, k_rem, transpose_rhs, has_existing, precision=None,
                row_scale_ref=None):
    """``row_scale_ref`` (fused ops, [tm, 1] f32): scales the group's accumulator rows before the store."""
    existing_ref = refs[0] if has_existing else None
    out_ref, acc_ref = refs[-2:]
    s, k = pl.program_id(1), pl.program_id(2)
    flags = sched.flags[s]

    @pl.when(_has(flags, COMPUTE))
    def _accumulate():
        @pl.when(k == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        lhs, rhs = lhs_ref[...], rhs_ref[...]
        if k_rem:  # the last K block is partial: zero the columns past K in both operands
            limit = jnp.where(k == tiles_k - 1, jnp.int32(k_rem), jnp.int32(lhs.shape[1]))
            lhs = _keep(lax.broadcasted_iota(jnp.int32, lhs.shape, 1) < limit, lhs)
            rhs = _keep(lax.broadcasted_iota(jnp.int32, rhs.shape, 1 if transpose_rhs else 0) < limit, rhs)
        acc_ref[...] += tile_dot(lhs, rhs, transpose_rhs, precision)

    @pl.when((k == tiles_k - 1) & _has(flags, STORE))
    def _store():
        base = (existing_ref[...].astype(jnp.float32) if has_existing
                else jnp.zeros(out_ref.shape, jnp.float32))

        @pl.when(~_has(flags, COMPUTE))
        def _no_local_rows():
            out_ref[...] = base.astype(out_ref.dtype)

        @pl.when(_has(flags, COMPUTE))
        def _group_rows():
            mask = _row_mask(sched, s, sched.m_tiles[s], out_ref.shape)
            new = base + (acc_ref[...] if row_scale_ref is None else acc_ref[...] * row_scale_ref[...])

            @pl.when(_has(flags, FIRST))
            def _first_visit():
                out_ref[...] = jnp.where(mask, new, base).astype(out_ref.dtype)

            @pl.when(~_has(flags, FIRST))
            def _revisit():
                out_ref[...] = jnp.where(mask, new, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _resolve(tiling, kernel, m, k, n, num_local, in_dtype, out_dtype, existing):
    if tiling is None:
        t = tiling_lib.choose(kernel, m, k, n, num_local, in_dtype, out_dtype, existing_out=existing)
    else:
        t = tiling if isinstance(tiling, tiling_lib.Tiling) else tiling_lib.Tiling(*tiling)
    return tiling_lib.check(t, m, k, n, in_dtype, out_dtype)


def _aliases(sched, has_existing, interpret, shape, block):
    """Write ``existing_out`` in place (operand after the schedule, lhs and rhs -> output 0). Not in interpret mode
    when a partial edge block exists: the TPU interpreter pads the aliased buffer and then fails to lower."""
    partial = any(d % b for d, b in zip(shape, block))
    return {len(sched) + 2: 0} if has_existing and not (interpret and partial) else {}


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiling", "interpret", "precision"))
def _gmm(lhs, rhs, group_sizes, group_offset, existing_out, *, transpose_rhs, out_dtype, tiling, interpret,
         precision=None):
    (m, k), num_local = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    has_existing = existing_out is not None
    if m == 0:
        return existing_out.astype(out_dtype) if has_existing else jnp.zeros((m, n), out_dtype)
    t = _resolve(tiling, "gmm", m, k, n, num_local, lhs.dtype, out_dtype, has_existing)
    tiles_k, tiles_n = pl.cdiv(k, t.tk), pl.cdiv(n, t.tn)
    sched, num_steps = gmm_schedule(group_sizes, group_offset, num_local, m, t.tm, tiles_k)
    rhs_spec = (pl.BlockSpec((None, t.tn, t.tk), _gmm_rhs_t_index) if transpose_rhs
                else pl.BlockSpec((None, t.tk, t.tn), _gmm_rhs_index))
    out_spec = pl.BlockSpec((t.tm, t.tn), _gmm_out_index)
    in_specs = [pl.BlockSpec((t.tm, t.tk), _gmm_lhs_index), rhs_spec] + [out_spec] * has_existing
    operands = (lhs, rhs) + ((existing_out.astype(out_dtype),) if has_existing else ())
    kernel = functools.partial(_gmm_kernel, tiles_k=tiles_k, k_rem=k % t.tk,
                               transpose_rhs=transpose_rhs, has_existing=has_existing, precision=precision)
    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = dict(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=itemsize * (m * k * tiles_n + num_local * k * n)
                           + jnp.dtype(out_dtype).itemsize * m * n * (1 + has_existing))
    return pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, in_specs=in_specs, out_specs=out_spec,
            grid=(tiles_n, num_steps, tiles_k),
            scratch_shapes=[pltpu.VMEM((t.tm, t.tn), jnp.float32)]),
        input_output_aliases=_aliases(sched, has_existing, interpret, (m, n), (t.tm, t.tn)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, cost_estimate=_static_cost(cost),
    )(sched, *operands)


@tpu_or_interpret
def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, tiling=None, existing_out=None,
        interpret=None, precision=None):
    """lhs [M,K] x rhs [G_local,K,N] ([G_local,N,K] with ``transpose_rhs``) -> [M,N] (``out_dtype``).

    ``tiling``: a ``Tiling`` / ``(tm, tk, tn)`` or None for the heuristic (``kernels.pallas.tiling``).
    ``existing_out`` [M,N]: returned as ``existing_out + contribution`` on local-group rows, unchanged elsewhere.
    ``interpret``: None = Mosaic when lowered for TPU, interpret mode for any other platform
    (``kernels.platform.tpu_or_interpret``); or a bool / ``pltpu.InterpretParams``.
    ``precision``: None / ``lax.Precision.DEFAULT`` (Mosaic's default) or ``HIGHEST`` (fp32 contraction).
    A symbolic M (``jax.export`` shape polymorphism) runs at its static upper bound on zero-padded rows (Mosaic's
    scalar-prefetched schedule needs a static length); those rows are past ``sum(group_sizes)`` and sliced off."""
    m = lhs.shape[0]
    require_static("K / N of the Pallas grouped matmul", lhs.shape[1], *rhs.shape[1:])
    if not isinstance(m, int):
        bound = static_upper_bound(m, "the row count M of the Pallas grouped matmul")
        existing = None if existing_out is None else pad_rows(existing_out, bound)
        return gmm(pad_rows(lhs, bound), rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs,
                   out_dtype=out_dtype, tiling=tiling, existing_out=existing, interpret=interpret,
                   precision=precision)[:m]
    return _gmm(lhs, rhs, group_sizes, group_offset, existing_out, transpose_rhs=bool(transpose_rhs),
                out_dtype=jnp.dtype(out_dtype), tiling=tiling, interpret=interpret, precision=precision)


# --------------------------------------------------------------------------------------------------------- tgmm
def _tgmm_lhs_index(n, k, s, sched):
    return sched.m_tiles[s], k


def _tgmm_rhs_index(n, k, s, sched):
    return sched.m_tiles[s], n


def _tgmm_out_index(n, k, s, sched):
    return sched.groups[s], k, n


def _tgmm_kernel(sched, lhs_ref, rhs_ref, *refs, has_existing, precision):
    existing_ref = refs[0] if has_existing else None
    out_ref, acc_ref = refs[-2:]
    s = pl.program_id(2)
    flags = sched.flags[s]

    @pl.when(_has(flags, FIRST))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(_has(flags, COMPUTE))
    def _accumulate():
        tile = sched.m_tiles[s]
        lhs = _keep(_row_mask(sched, s, tile, lhs_ref.shape), lhs_ref[...])
        rhs = _keep(_row_mask(sched, s, tile, rhs_ref.shape), rhs_ref[...])
        acc_ref[...] += lax.dot_general(lhs.T, rhs, (((1,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)

    @pl.when(_has(flags, STORE))
    def _store():
        acc = acc_ref[...]
        if has_existing:
            acc = acc + existing_ref[...].astype(jnp.float32)
        out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiling", "interpret", "precision"))
def _tgmm(lhs, rhs, group_sizes, group_offset, existing_out, *, num_groups, out_dtype, tiling, interpret,
          precision=None):
    (m, k), n = lhs.shape, rhs.shape[1]
    has_existing = existing_out is not None
    if m == 0:
        return existing_out.astype(out_dtype) if has_existing else jnp.zeros((num_groups, k, n), out_dtype)
    t = _resolve(tiling, "tgmm", m, k, n, num_groups, lhs.dtype, out_dtype, has_existing)
    tiles_k, tiles_n = pl.cdiv(k, t.tk), pl.cdiv(n, t.tn)
    sched, num_steps = tgmm_schedule(group_sizes, group_offset, num_groups, m, t.tm)
    out_spec = pl.BlockSpec((None, t.tk, t.tn), _tgmm_out_index)
    in_specs = ([pl.BlockSpec((t.tm, t.tk), _tgmm_lhs_index), pl.BlockSpec((t.tm, t.tn), _tgmm_rhs_index)]
                + [out_spec] * has_existing)
    operands = (lhs, rhs) + ((existing_out.astype(out_dtype),) if has_existing else ())
    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = dict(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=itemsize * (m * k * tiles_n + m * n * tiles_k)
                           + jnp.dtype(out_dtype).itemsize * num_groups * k * n * (1 + has_existing))
    return pallas_call(
        functools.partial(_tgmm_kernel, has_existing=has_existing, precision=precision),
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, in_specs=in_specs, out_specs=out_spec,
            grid=(tiles_n, tiles_k, num_steps),
            scratch_shapes=[pltpu.VMEM((t.tk, t.tn), jnp.float32)]),
        input_output_aliases=_aliases(sched, has_existing, interpret, (k, n), (t.tk, t.tn)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, cost_estimate=_static_cost(cost),
    )(sched, *operands)


@tpu_or_interpret
def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, tiling=None, existing_out=None,
         interpret=None, precision=None):
    """lhs [M,K]^T x rhs [M,N] per local group -> [G_local=num_groups, K, N] (``out_dtype``); empty groups are zero
    (``existing_out[g]`` with ``existing_out``). ``tiling`` / ``interpret`` / a symbolic M as for ``gmm``."""
    require_static("K / N of the Pallas grouped matmul", lhs.shape[1], rhs.shape[1])
    if not isinstance(lhs.shape[0], int):
        bound = static_upper_bound(lhs.shape[0], "the row count M of the Pallas grouped matmul")
        return tgmm(pad_rows(lhs, bound), pad_rows(rhs, bound), group_sizes, group_offset, num_groups=num_groups,
                    out_dtype=out_dtype, tiling=tiling, existing_out=existing_out, interpret=interpret,
                    precision=precision)
    return _tgmm(lhs, rhs, group_sizes, group_offset, existing_out, num_groups=int(num_groups),
                 out_dtype=jnp.dtype(out_dtype), tiling=tiling, interpret=interpret, precision=precision)
