"""Backward of the routed SwiGLU + weighted down projection up to the row level in one Pallas kernel (the optional
``swiglu_down_bwd`` of the ``moe_ops.backend`` interface; twin ``moe_ops.reference.swiglu_down_bwd``, its contract).

The gmm schedule and grid ``(n, step, k)`` of ``kernels.pallas.gmm`` (invariants G1-G5; ``n`` over F blocks, ``k``
over D blocks). The x and dout rows of a row tile are gathered from token order through ``sort_idx // top_k`` by
``kernels.pallas.fused.gathered_lhs`` (two sources on one double-buffered row-DMA pipeline, sharing the SMEM
indices). Each K step adds, in three f32 accumulators, ``gate = x @ w_gate[g]``, ``up = x @ w_up[g]`` and ``a = dout
@ w_down[g]^T`` (the ``[tn, tk]`` block of ``w_down [G_local, F, D]`` read as stored, contracted on its last dim).
The store (last k) works in f32: ``act, act' = act_and_grad(gate)``, ``dh = w_sorted * a``, ``dgate = dh * up *
act'``, ``dup = dh * act``, ``hw = w_sorted * act * up`` (written in x's dtype) and the row partial ``sum_{f in
block} h * a`` (columns past F masked) into ``dw_partial [tiles_n, M, 1]`` f32; ``dweights_sorted =
dw_partial.sum(0)`` afterwards in XLA (fixed order, deterministic, no atomics). All four outputs go through
``store_group_rows``: a tile shared by two groups is visited twice and each visit writes only its group's rows (the
first also zeroes the others); tiles with no local rows are written as zeros, so rows of non-local groups / beyond
``sum(group_sizes)`` are zero everywhere. ``gate`` / ``up`` / ``a`` never leave VMEM.

VMEM (``FOOTPRINT``): two gathered sources x two buffers, three double-buffered rhs blocks, three output blocks,
three f32 accumulators, the ``w_sorted`` and ``dw_partial`` row blocks; ``fused_tiling`` shrinks ``tn`` / ``tm`` to
fit. A symbolic M (shape-polymorphic ``jax.export``) runs the composition (row gathers, three plain GMMs in f32, the
same epilogue in XLA), whose kernels run at M's static bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.groups import bias_pair, group_rows, local_row_mask
from kernels.pallas.fused import (Footprint, _rhs_spec, _row_scale_index, accumulate, fused_call, fused_tiling,
                                  gather_scratch, gathered_lhs, store_group_rows)
from kernels.pallas.gmm import STORE, _has, gmm_schedule
from kernels.pallas.gmm import gmm as plain_gmm
from kernels.pallas.sort import _blocked, gather_rows
from kernels.activation import resolve
from kernels.pallas.swiglu import bias_specs, gated_parts, with_bias
from kernels.platform import tpu_or_interpret

__all__ = ["swiglu_down_bwd", "swiglu_down_bwd_saved", "FOOTPRINT", "FOOTPRINT_SAVED"]

# x / dout gathered, w_gate / w_up / w_down blocks, dgate / dup / h blocks, gate / up / a, w_sorted / dw_partial rows
FOOTPRINT = Footprint(sources=2, rhs=3, outs=3, accs=3, rows=2)
# saved mode: dout gathered, w_down blocks, gate / up in and dgate / dup / h out blocks, a, the two row blocks
FOOTPRINT_SAVED = Footprint(sources=1, rhs=1, outs=5, accs=1, rows=2)


def _epilogue(gate, up, a, w, activation, col_mask=None):
    """f32 gate / up / a [rows, f], w [rows, 1] -> [dgate, dup, hw = w * h, sum_f h*a [rows, 1]] (f32);
    ``col_mask`` keeps the columns past F (garbage of a partial block) out of the sum."""
    act, dact, up, dup = gated_parts(gate, up, activation)
    dh, h = a * w, act * up
    ha = h * a if col_mask is None else jnp.where(col_mask, h * a, 0.0)
    return [dh * up * dact, dh * act * dup, h * w, jnp.sum(ha, axis=1, keepdims=True)]


def _bwd_kernel(sched, x_hbm, dout_hbm, idx_hbm, wg_ref, wu_ref, wd_ref, w_ref, *refs, top_k, num_rows, tiles_k,
                k_rem, n_cols, activation, has_bias):
    bias, refs = (refs[:2], refs[2:]) if has_bias else ((), refs)   # the group's gate / up bias blocks [1, tn]
    dgate_ref, dup_ref, hw_ref, dwp_ref, acc_g, acc_u, acc_a, xbuf, dbuf, idx_smem, sems = refs
    s, kb = pl.program_id(1), pl.program_id(2)
    x_blk, d_blk = gathered_lhs(sched, [x_hbm, dout_hbm], idx_hbm, [xbuf, dbuf], idx_smem, sems, top_k=top_k,
                                num_rows=num_rows, tiles_k=tiles_k)
    accumulate(sched, [acc_g, acc_u, acc_a], [(x_blk, wg_ref, False), (x_blk, wu_ref, False), (d_blk, wd_ref, True)],
               tiles_k=tiles_k, k_rem=k_rem)
    col_mask = _col_mask(acc_g.shape, n_cols)  # a partial last F block: its columns past F are garbage

    def values():
        gate, up = with_bias(acc_g[...], acc_u[...], bias)
        return _epilogue(gate, up, acc_a[...], w_ref[...], activation, col_mask)

    @pl.when((kb == tiles_k - 1) & _has(sched.flags[s], STORE))
    def _store():
        store_group_rows(sched, s, [dgate_ref, dup_ref, hw_ref, dwp_ref], values)


def _out_index(n, s, k, sched):
    return sched.m_tiles[s], n


def _partial_index(n, s, k, sched):
    return n, sched.m_tiles[s], 0


@functools.partial(jax.jit, static_argnames=("top_k", "activation", "tiling", "interpret"))
def _swiglu_down_bwd(x, dout, w_gate, w_up, w_down, group_sizes, group_offset, sort_idx, w_sorted, b_gate, b_up, *,
                     top_k, activation, tiling, interpret):
    (m,), kdim, (num_local, _, n) = sort_idx.shape, x.shape[1], w_gate.shape
    t = fused_tiling(tiling, m, kdim, n, num_local, x.dtype, x.dtype, gather=True, footprint=FOOTPRINT)
    tiles_k, tiles_n = pl.cdiv(kdim, t.tk), pl.cdiv(n, t.tn)
    sched, num_steps = gmm_schedule(group_sizes, group_offset, num_local, m, t.tm, tiles_k)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    bias_in, biases = bias_specs(t, b_gate, b_up)
    in_specs = [any_spec, any_spec, any_spec, _rhs_spec(t, False), _rhs_spec(t, False), _rhs_spec(t, True),
                pl.BlockSpec((t.tm, 1), _row_scale_index), *bias_in]
    operands = [x, dout, _blocked(sort_idx, t.tm), w_gate, w_up, w_down,
                w_sorted.reshape(-1).astype(jnp.float32)[:, None], *biases]
    kernel = functools.partial(_bwd_kernel, top_k=top_k, num_rows=m, tiles_k=tiles_k, k_rem=kdim % t.tk, n_cols=n,
                               activation=activation, has_bias=b_gate is not None)
    item = jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(flops=6 * m * kdim * n, transcendentals=m * n,
                           bytes_accessed=item * (2 * m * kdim * tiles_n + 3 * num_local * kdim * n + 3 * m * n)
                           + 4 * m * (1 + tiles_n))
    return _bwd_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs, (m, n), x.dtype,
                     gather_scratch(t, kdim, [x.dtype, dout.dtype]), interpret, cost, accs=3)


def _bwd_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs, shape, dtype, scratch, interpret, cost, accs):
    """The pallas_call of a backward kernel: dgate / dup / hw [M, F] blocks and the [tiles_n, M, 1] partials of
    ``<h, a>``, summed here -> (dgate, dup, hw, dweights_sorted [M] f32)."""
    m, n = shape
    out_specs = [pl.BlockSpec((t.tm, t.tn), _out_index)] * 3 + [pl.BlockSpec((None, t.tm, 1), _partial_index)]
    out_shape = [jax.ShapeDtypeStruct((m, n), dtype)] * 3 + [jax.ShapeDtypeStruct((pl.cdiv(n, t.tn), m, 1),
                                                                                 jnp.float32)]
    dgate, dup, hw, partial = fused_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs, out_specs,
                                        out_shape, scratch, interpret, cost, accs=accs)
    return dgate, dup, hw, jnp.sum(partial[:, :, 0], axis=0)


def _col_mask(shape, n_cols):
    """Columns of the current F block that lie inside F (None when F is a multiple of the block)."""
    tn = shape[1]
    if n_cols % tn == 0:
        return None
    return lax.broadcasted_iota(jnp.int32, shape, 1) < n_cols - pl.program_id(0) * tn


def _saved_kernel(sched, dout_hbm, idx_hbm, wd_ref, gate_ref, up_ref, w_ref, dgate_ref, dup_ref, hw_ref, dwp_ref,
                  acc_a, dbuf, idx_smem, sems, *, top_k, num_rows, tiles_k, k_rem, n_cols, activation):
    """Saved mode: only ``a = dout @ w_down^T`` accumulates; the epilogue reads the gate / up blocks."""
    s, kb = pl.program_id(1), pl.program_id(2)
    d_blk, = gathered_lhs(sched, [dout_hbm], idx_hbm, [dbuf], idx_smem, sems, top_k=top_k, num_rows=num_rows,
                          tiles_k=tiles_k)
    accumulate(sched, [acc_a], [(d_blk, wd_ref, True)], tiles_k=tiles_k, k_rem=k_rem)
    col_mask = _col_mask(acc_a.shape, n_cols)

    @pl.when((kb == tiles_k - 1) & _has(sched.flags[s], STORE))
    def _store():
        store_group_rows(sched, s, [dgate_ref, dup_ref, hw_ref, dwp_ref],
                         lambda: _epilogue(gate_ref[...].astype(jnp.float32), up_ref[...].astype(jnp.float32),
                                           acc_a[...], w_ref[...], activation, col_mask))


@functools.partial(jax.jit, static_argnames=("top_k", "activation", "tiling", "interpret"))
def _swiglu_down_bwd_saved(dout, w_down, gate, up, group_sizes, group_offset, sort_idx, w_sorted, *, top_k,
                           activation, tiling, interpret):
    (m,), kdim, (num_local, n, _) = sort_idx.shape, dout.shape[1], w_down.shape
    t = fused_tiling(tiling, m, kdim, n, num_local, dout.dtype, dout.dtype, gather=True, footprint=FOOTPRINT_SAVED)
    tiles_k, tiles_n = pl.cdiv(kdim, t.tk), pl.cdiv(n, t.tn)
    sched, num_steps = gmm_schedule(group_sizes, group_offset, num_local, m, t.tm, tiles_k)
    any_spec, block = pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec((t.tm, t.tn), _out_index)
    in_specs = [any_spec, any_spec, _rhs_spec(t, True), block, block, pl.BlockSpec((t.tm, 1), _row_scale_index)]
    operands = [dout, _blocked(sort_idx, t.tm), w_down, gate, up, w_sorted.reshape(-1).astype(jnp.float32)[:, None]]
    kernel = functools.partial(_saved_kernel, top_k=top_k, num_rows=m, tiles_k=tiles_k, k_rem=kdim % t.tk,
                               n_cols=n, activation=activation)
    item = jnp.dtype(dout.dtype).itemsize
    cost = pl.CostEstimate(flops=2 * m * kdim * n, transcendentals=m * n,
                           bytes_accessed=item * (m * kdim * tiles_n + num_local * kdim * n + 5 * m * n)
                           + 4 * m * (1 + tiles_n))
    return _bwd_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs, (m, n), dout.dtype,
                     gather_scratch(t, kdim, [dout.dtype]), interpret, cost, accs=1)


def _composed(x, dout, w_gate, w_up, w_down, group_sizes, group_offset, sort_idx, w_sorted, k, b_gate=None,
              b_up=None, *, activation, tiling, interpret):
    """The same outputs from row gathers and three plain GMMs (f32 out) and the epilogue in XLA: rows outside local
    groups have gate = up = a = 0 (no bias there), hence zero outputs."""
    rows, drows = (gather_rows(v, sort_idx, k, interpret=interpret) for v in (x, dout))
    kw = dict(out_dtype=jnp.float32, tiling=tiling, interpret=interpret)
    gate = plain_gmm(rows, w_gate, group_sizes, group_offset, transpose_rhs=False, **kw)
    up = plain_gmm(rows, w_up, group_sizes, group_offset, transpose_rhs=False, **kw)
    a = plain_gmm(drows, w_down, group_sizes, group_offset, transpose_rhs=True, **kw)
    if b_gate is not None:
        gate, up = (p + group_rows(b, group_sizes, group_offset, p.shape[0], jnp.float32)
                    for p, b in ((gate, b_gate), (up, b_up)))
    dgate, dup, hw, dw = _epilogue(gate, up, a, _local_weights(w_sorted, group_sizes, group_offset, w_gate.shape[0]),
                                   activation)
    return dgate.astype(x.dtype), dup.astype(x.dtype), hw.astype(x.dtype), dw[:, 0]


def _local_weights(w_sorted, group_sizes, group_offset, num_local):
    """[M, 1] f32 routing weights of the sorted rows, zero (selected) outside the local groups: there gate = up = a
    = 0, and an Inf / NaN weight must not make ``0 * w`` NaN (the kernels store zeros on those rows)."""
    local = local_row_mask(group_sizes, group_offset, num_local, w_sorted.shape[0])
    return jnp.where(local, w_sorted.astype(jnp.float32), 0.0)[:, None]


def _degenerate(m, f, other_dims, dtype):
    """The zero outputs when M, F or one of ``other_dims`` (D, G_local) is 0, else None."""
    if isinstance(m, int) and 0 in (m, f, *other_dims):
        zeros = jnp.zeros((m, f), dtype)
        return zeros, zeros, zeros, jnp.zeros((m,), jnp.float32)
    return None


@tpu_or_interpret
def swiglu_down_bwd(x, dout, w_gate, w_up, w_down, group_sizes, group_offset, sort_idx, w_sorted, k, *, activation,
                    tiling=None, interpret=None, b_gate=None, b_up=None):
    """x / dout [T,D] (token order), w_gate / w_up [G_local,D,F], w_down [G_local,F,D], clamped group_sizes [G],
    group_offset int32[1], sort_idx [M = T*k], w_sorted [M] f32, optional b_gate / b_up [G_local,F] (added to the
    recomputed gate / up) -> (dgate, dup, h [M,F] in x's dtype, dweights_sorted [M] f32), as
    ``moe_ops.reference.swiglu_down_bwd``; rows outside local groups are zero.
    ``tiling`` (tn: the F block, tk: the D block) / ``interpret`` as for ``kernels.pallas.gmm.gmm``."""
    m = sort_idx.shape[0]
    activation = resolve(activation)
    empty = _degenerate(m, w_gate.shape[2], (x.shape[1], w_gate.shape[0]), x.dtype)
    if empty is not None:
        return empty
    b_gate, b_up = bias_pair(b_gate, b_up, w_gate.shape[0], w_gate.shape[2])
    args = (x, dout, w_gate, w_up, w_down, group_sizes, group_offset)
    if not isinstance(m, int):  # symbolic rows (jax.export): the composition, as gather_gmm does
        return _composed(*args, sort_idx, w_sorted, k, b_gate, b_up, activation=activation, tiling=tiling,
                         interpret=interpret)
    return _swiglu_down_bwd(*args, sort_idx.astype(jnp.int32), w_sorted, b_gate, b_up, top_k=int(k),
                            activation=activation, tiling=tiling, interpret=interpret)


@tpu_or_interpret
def swiglu_down_bwd_saved(dout, w_down, gate, up, group_sizes, group_offset, sort_idx, w_sorted, k, *, activation,
                          tiling=None, interpret=None):
    """``swiglu_down_bwd`` from the saved gate / up [M,F] (``swiglu_gmm_saved``): one accumulator ``a = dout @
    w_down^T`` over D and the same epilogue, reading the gate / up blocks (the dlhs GMM of the down projection with the
    activation derivative in its epilogue). Symbolic M: the composition."""
    m = sort_idx.shape[0]
    activation = resolve(activation)
    empty = _degenerate(m, w_down.shape[1], (dout.shape[1], w_down.shape[0]), dout.dtype)
    if empty is not None:
        return empty
    if not isinstance(m, int):
        drows = gather_rows(dout, sort_idx, k, interpret=interpret)
        a = plain_gmm(drows, w_down, group_sizes, group_offset, transpose_rhs=True, out_dtype=jnp.float32,
                      tiling=tiling, interpret=interpret)
        outs = _epilogue(gate.astype(jnp.float32), up.astype(jnp.float32), a,
                         _local_weights(w_sorted, group_sizes, group_offset, w_down.shape[0]), activation)
        return tuple(o.astype(dout.dtype) for o in outs[:3]) + (outs[3][:, 0],)
    return _swiglu_down_bwd_saved(dout, w_down, gate, up, group_sizes, group_offset, sort_idx.astype(jnp.int32),
                                  w_sorted, top_k=int(k), activation=activation, tiling=tiling, interpret=interpret)
