"""XLA backend: the kernel-level interface of ``backend`` built from plain XLA ops (what ``implementation=None``
runs on CPU).

The grouped matmuls loop (``lax.fori_loop``, a dynamic trip count) over a device-side row-tile schedule
(``row_tiles``), like the GPU kernels: each tile of at most ``BLOCK_ROWS`` rows lies inside one local group and is
multiplied by that group's weights only (``dynamic_slice``). Rows outside the tile's group are discarded with
``jnp.where`` (a select, never a multiply by zero), so no row ever sees another expert's weights: a NaN / Inf in one
expert, in rows of non-local groups or in rows beyond ``sum(group_sizes)`` stays where it is, and those rows come
out as exact zeros. The combines select away (``jnp.where``) every slot whose row does not contribute (rows
``>= n_valid``; in ``scatter_gmm`` rows outside the local groups), its routing weight included, so an Inf / NaN
weight of such a slot never meets its zero row (``inf * 0``). Memory is O(M*(K+N) + G_local*K*N) (no densified
``[G, M, N]`` product, unlike ``lax.ragged_dot`` on XLA:CPU); work is one ``[BM, K] x [K, N]`` dot per tile.
"""

from __future__ import annotations


import jax.numpy as jnp
from jax import lax

from kernels.groups import local_bounds, local_row_mask, segment_of
from moe_ops import reference, vma

BLOCK_ROWS = 256  # most rows per tile (CPU: large enough to amortise the loop, small enough to waste little)
MIN_BLOCK_ROWS = 64


def block_rows(num_rows, num_local):
    """Static tile height: about the mean group size (so a group wastes at most about one tile's worth of rows),
    a power of two in ``[MIN_BLOCK_ROWS, BLOCK_ROWS]``, and never more than ``num_rows``. A symbolic row count
    (``jax.export`` shape polymorphism) gets ``BLOCK_ROWS``: the entry points pad such rows by that much."""
    if not isinstance(num_rows, int):
        return BLOCK_ROWS
    mean = max(1, num_rows // max(1, num_local))
    return min(num_rows, BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (mean - 1).bit_length()))


def row_tiles(group_sizes, group_offset, num_local, num_rows, block_rows):
    """Schedule of the row tiles of the local groups, in row order: (group [S], start [S], end [S], count) with
    ``S = cdiv(num_rows, block_rows) + num_local`` (static) and ``count`` (device scalar) tiles in use.

    Group sizes are clamped (``>= 0``, sum ``<= num_rows``); local group ``j`` is global group ``group_offset + j``
    (empty when that id is outside ``[0, G)``). Tile ``i < count`` covers rows ``[start_i, end_i)`` of group
    ``group_i`` with ``0 < end_i - start_i <= block_rows``; the tiles partition the rows of the local groups."""
    g_start, g_end = local_bounds(group_sizes, group_offset, num_local)
    tiles = (g_end - g_start + block_rows - 1) // block_rows
    tiles_end = jnp.cumsum(tiles)
    tile = jnp.arange(-(-num_rows // block_rows) + num_local, dtype=jnp.int32)
    group = jnp.minimum(segment_of(tiles_end, tile), num_local - 1).astype(jnp.int32)
    start = g_start[group] + (tile - (tiles_end[group] - tiles[group])) * block_rows
    end = jnp.minimum(start + block_rows, g_end[group])
    return group, start, end, tiles_end[-1]


def _tile_loop(group_sizes, group_offset, num_local, num_rows, body, init):
    """``fori_loop`` of ``body(group, window_start, rows_valid[BM], carry)`` over the tiles of ``row_tiles``. The
    window ``[window_start, window_start + BM)`` always lies inside ``[0, num_rows)`` (a tile near the end is shifted
    back); ``rows_valid`` marks its rows that belong to the tile."""
    bm = block_rows(num_rows, num_local)
    group, start, end, count = row_tiles(group_sizes, group_offset, num_local, num_rows, bm)

    def step(i, carry):
        window = jnp.minimum(start[i], num_rows - bm)
        rows = window + jnp.arange(bm, dtype=jnp.int32)
        return body(group[i], window, (rows >= start[i]) & (rows < end[i]), carry)

    return lax.fori_loop(0, count, step, vma.like(init, group_sizes))  # carry typed like the operands (shard_map)


def _precision(precision):
    return lax.Precision.HIGHEST if precision is None else precision


def _rows(a, window, bm):
    return lax.dynamic_slice_in_dim(a, window, bm, 0)


def _grouped_rows(load_rows, num_rows, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, row_scale=None,
                  precision=None):
    """[num_rows, N]: ``load_rows(window, bm) [bm, K] @ rhs[group]`` per tile (times ``row_scale(window, bm)`` [bm]
    f32 when given), written to the tile's valid rows only; zeros elsewhere."""
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    bm = block_rows(num_rows, rhs.shape[0])

    def body(g, window, valid, out):
        w = lax.dynamic_index_in_dim(rhs, g, 0, keepdims=False)
        prod = lax.dot_general(load_rows(window, bm), w, dims, precision=_precision(precision),
                               preferred_element_type=jnp.float32)
        if row_scale is not None:
            prod = prod * row_scale(window, bm)[:, None]
        new = jnp.where(valid[:, None], prod.astype(out.dtype), _rows(out, window, bm))
        return lax.dynamic_update_slice_in_dim(out, new, window, 0)

    return _tile_loop(group_sizes, group_offset, rhs.shape[0], num_rows, body,
                      jnp.zeros((num_rows, n), out_dtype))


def _symbolic_pad(num_rows) -> int:
    """Rows to append so a static ``BLOCK_ROWS`` tile fits a symbolic row count (0 for a static one)."""
    return 0 if isinstance(num_rows, int) else BLOCK_ROWS


def _padded(a, pad):
    return a if not pad else jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, precision=None):
    """lhs [M,K] x rhs [G_local,K,N] ([G_local,N,K] with ``transpose_rhs``) -> [M,N]; zeros outside local groups.
    ``precision``: the tiles' dot precision (default HIGHEST: f32 inputs give exact f32 products)."""
    m = lhs.shape[0]
    pad = _symbolic_pad(m)
    lhs = _padded(lhs, pad)  # the padding rows lie past sum(group_sizes) <= M: no tile uses them
    out = _grouped_rows(lambda window, bm: _rows(lhs, window, bm), m + pad, rhs, group_sizes, group_offset,
                        transpose_rhs, out_dtype, precision=precision)
    return out[:m] if pad else out


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, precision=None):
    """lhs [M,K]^T x rhs [M,N] per local group -> [num_groups, K, N] (f32 accumulation); empty groups are zero."""
    pad = _symbolic_pad(lhs.shape[0])
    lhs, rhs = _padded(lhs, pad), _padded(rhs, pad)
    m, k = lhs.shape
    bm = block_rows(m, num_groups)

    def body(g, window, valid, out):
        a = jnp.where(valid[:, None], _rows(lhs, window, bm), 0)
        b = jnp.where(valid[:, None], _rows(rhs, window, bm), 0)
        prod = lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(precision),
                               preferred_element_type=jnp.float32)
        acc = lax.dynamic_index_in_dim(out, g, 0, keepdims=True) + prod[None]
        return lax.dynamic_update_slice_in_dim(out, acc, g, 0)

    out = jnp.zeros((num_groups, k, rhs.shape[1]), jnp.float32)
    return _tile_loop(group_sizes, group_offset, num_groups, m, body, out).astype(out_dtype)


# Token permutation. ``n_valid`` (valid-prefix form): sorted rows ``>= n_valid`` are zeros in ``gather_rows`` and
# ignored (zero contribution) by ``combine_rows`` / ``combine_weight_grad``; the same in every backend.


sort_by_expert = reference.sort_by_expert  # the stable argsort; the kernels' counting sorts must match it exactly


def _valid_rows(n, n_valid):
    """[n] mask of rows < n_valid, or None when every row is valid."""
    return None if n_valid is None else jnp.arange(n, dtype=jnp.int32) < jnp.asarray(n_valid, jnp.int32).reshape(())


def gather_rows(x, sort_idx, k, row_weights=None, n_valid=None):
    """x [T,D] -> [T*k,D]: ``x[sort_idx[i] // k]`` (* row_weights.flat[sort_idx[i]] in f32), zeros past n_valid."""
    rows = x[sort_idx // k]
    if row_weights is not None:
        scale = row_weights.reshape(-1)[sort_idx][:, None].astype(jnp.float32)
        rows = (rows.astype(jnp.float32) * scale).astype(x.dtype)
    valid = _valid_rows(sort_idx.shape[0], n_valid)
    return rows if valid is None else jnp.where(valid[:, None], rows, 0)


def _rows_per_slot(y, sort_idx, t, k, rows_valid):
    """([T, k, D] f32 row of each (token, slot), [T, k] bool slot mask or None): rows where ``rows_valid`` [T*k]
    (None: every row) is False are selected away (zeros), whatever they hold (NaN / Inf included)."""
    inverse = reference.inverse_permutation(sort_idx)
    gathered = y[inverse].astype(jnp.float32).reshape(t, k, y.shape[-1])
    if rows_valid is None:
        return gathered, None
    slot_valid = rows_valid[inverse].reshape(t, k)
    return jnp.where(slot_valid[..., None], gathered, 0.0), slot_valid


def _combine(y, sort_idx, weights, rows_valid):
    """``combine_rows`` over the rows marked by ``rows_valid`` [T*k] (None: all): a slot whose row is not valid
    contributes exactly zero, its weight selected away too (an Inf / NaN weight there never meets the zero row)."""
    t, k = weights.shape
    gathered, slot_valid = _rows_per_slot(y, sort_idx, t, k, rows_valid)
    weights = weights.astype(jnp.float32)
    if slot_valid is not None:
        weights = jnp.where(slot_valid, weights, 0.0)
    return jnp.einsum("tkd,tk->td", gathered, weights, precision="highest").astype(y.dtype)


def combine_rows(y, sort_idx, weights, n_valid=None):
    """y [T*k,D] -> [T,D]: ``sum_j w[t,j] * y[inv[t*k+j]]`` in f32, y's dtype; slots whose row is ``>= n_valid``
    contribute exactly zero (their row and their weight are selected away, never multiplied by zero)."""
    return _combine(y, sort_idx, weights, _valid_rows(y.shape[0], n_valid))


def combine_weight_grad(dout, y, sort_idx, k, n_valid=None):
    """dout [T,D], y [T*k,D] -> [T,k] f32: ``<dout[t], y[inv[t*k+j]]>``, exactly zero for slots whose row is
    ``>= n_valid`` (whatever dout[t] holds)."""
    gathered, slot_valid = _rows_per_slot(y, sort_idx, dout.shape[0], k, _valid_rows(y.shape[0], n_valid))
    out = jnp.einsum("tkd,td->tk", gathered, dout.astype(jnp.float32), precision="highest")
    return out if slot_valid is None else jnp.where(slot_valid, out, 0.0)


# Fused dispatch / combine (the optional ``gather_gmm`` / ``scatter_gmm`` of the interface). ``gather_gmm`` gathers
# each tile's rows from x inside the loop (no permuted copy of x); ``scatter_gmm`` is the grouped matmul followed by
# ``combine_rows`` (its [T*k, N] expert-order output is the size of a slot buffer anyway).


def gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, *, transpose_rhs, out_dtype, row_weights=None):
    """x [T,K] -> [T*k,N]: ``x[sort_idx[i] // k] @ rhs[group(i)]`` (* ``row_weights.flat[sort_idx[i]]`` in f32)."""
    rows = sort_idx.shape[0]
    pad = _symbolic_pad(rows)
    sort_idx = _padded(sort_idx, pad)
    slots = lambda window, bm: lax.dynamic_slice_in_dim(sort_idx, window, bm, 0)
    load = lambda window, bm: jnp.take(x, slots(window, bm) // k, axis=0, mode="clip")
    scale = None
    if row_weights is not None:
        flat = row_weights.reshape(-1).astype(jnp.float32)
        scale = lambda window, bm: jnp.take(flat, slots(window, bm), mode="clip")
    out = _grouped_rows(load, rows + pad, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, scale)
    return out[:rows] if pad else out


def scatter_gmm(h, rhs, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs, out_dtype):
    """h [T*k,K] -> [T,N]: ``sum_j weights[t,j] * (h @ rhs[g])[inv[t*k+j]]`` (f32 combine). A copy whose row lies
    outside the local groups (another shard's expert, or past ``sum(group_sizes)``: a dropped copy) contributes
    exactly zero: its weight is selected away, so an Inf / NaN weight there never meets the zero row."""
    y = gmm(h, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype)
    return _combine(y, sort_idx, weights, local_row_mask(group_sizes, group_offset, rhs.shape[0], h.shape[0]))
