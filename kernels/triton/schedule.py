"""Device-side tile schedules for the grouped matmuls, computed from ``group_sizes`` in a few ``jnp`` ops (no host
sync), then read by the kernels (``kernels.triton.gmm``).

Rows ``[0, M)`` split into ``G_local + 2`` *segments*: the rows before the local groups (non-local groups),
one segment per local group, and the rows after them (non-local groups and rows beyond ``sum(group_sizes)``).

GMM row-tile table ``gmm_row_tiles(...) -> int32[3, T]`` with ``T = max_row_tiles(M, BM, G_local)``; row 0 is the
local group id, row 1 the first row, row 2 one past the last row of each tile. Invariants:

1. Each segment is cut into ``cdiv(size, BM)`` tiles aligned to the segment's start, so a tile never straddles a
   group boundary: tile ``i`` covers ``[start_i, end_i)`` with ``0 < end_i - start_i <= BM``, all inside one segment.
2. The first ``total`` tiles partition ``[0, M)`` in row order: ``start_0 = 0``, ``start_{i+1} = end_i``,
   ``end_{total-1} = M``. So every output row is written by exactly one tile (no overlap, nothing unwritten).
3. ``group_i`` is the local group id in ``[0, G_local)`` for rows of local groups, ``ZERO_FILL`` (-1) for rows of
   non-local groups or beyond the sum (the kernel stores zeros), and ``IDLE`` (-2) for ``i >= total`` (the kernel
   exits at once; those tiles have ``start = end = 0``).
4. ``total = sum_s cdiv(size_s, BM) <= cdiv(M, BM) + (G_local + 2) - 1 = T`` (each of the ``G_local + 2``
   segments wastes less than one tile), so a static grid of ``T`` row tiles is always enough.
5. Tiles of one group are consecutive, so a GROUP_M band of row tiles mostly shares one ``rhs[g]`` in L2.

TGMM group bounds ``tgmm_group_bounds(...) -> int32[3, G_local]``: row 0 the local group id, row 1 its first row,
row 2 one past its last row; ``0 <= start <= end <= M``; groups outside ``[0, G)`` (offset past the end) are empty
(start=end). Columns are in longest-first order (a stable sort by descending size), so the TGMM grid, which walks
them in order, starts the longest reductions first and short groups fill in behind them instead of leaving SMs idle
at the end; every local group appears exactly once.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.groups import local_bounds, segment_of
from kernels.shapes import static_upper_bound  # noqa: F401  (re-exported: used by the Triton wrappers)

ZERO_FILL = -1
IDLE = -2


def max_row_tiles(num_rows: int, block_m: int, num_local: int) -> int:
    """Static worst-case number of GMM row tiles (invariant 4)."""
    return -(-num_rows // block_m) + num_local + 1


def tgmm_group_bounds(group_sizes, group_offset, num_local):
    """int32[3, G_local]: (local group, first row, one past the last row), longest group first (module docstring)."""
    start, end = local_bounds(group_sizes, group_offset, num_local)
    order = jnp.argsort(start - end, stable=True).astype(jnp.int32)
    return jnp.stack([order, start[order], end[order]]).astype(jnp.int32)


def gmm_row_tiles(group_sizes, group_offset, num_rows, num_local, block_m, num_tiles=None):
    """int32[3, T]: (local group | ZERO_FILL | IDLE, row start, row end) per row tile (invariants 1-5). ``T`` is
    ``num_tiles`` when given (a static bound >= ``max_row_tiles``, e.g. for a symbolic ``num_rows``: the extra
    tiles are IDLE), else ``max_row_tiles(num_rows, block_m, num_local)``."""
    start, end = local_bounds(group_sizes, group_offset, num_local)
    # Local groups are contiguous in row order, so the local region is [first start, last end) of the non-empty.
    nonempty = end > start
    lo = jnp.min(jnp.where(nonempty, start, num_rows)).astype(jnp.int32)
    hi = jnp.max(jnp.where(nonempty, end, 0)).astype(jnp.int32)
    lo, hi = jnp.minimum(lo, hi), hi  # no local rows: lo = hi = 0, one zero segment covers [0, M)
    seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.where(nonempty, start, lo), hi[None]])
    seg_end = jnp.concatenate([lo[None], jnp.where(nonempty, end, lo), jnp.full((1,), num_rows, jnp.int32)])
    zero_fill = jnp.full((1,), ZERO_FILL, jnp.int32)  # int32 throughout: x64 with strict promotion mixes no widths
    seg_group = jnp.concatenate([zero_fill, jnp.arange(num_local, dtype=jnp.int32), zero_fill])
    seg_tiles = (seg_end - seg_start + block_m - 1) // block_m
    tiles_end = jnp.cumsum(seg_tiles)
    tile = jnp.arange(max_row_tiles(num_rows, block_m, num_local) if num_tiles is None else num_tiles, dtype=jnp.int32)
    seg = segment_of(tiles_end, tile)  # segment of each tile; == G_local + 2 when idle
    idle = seg >= seg_tiles.shape[0]
    seg = jnp.minimum(seg, seg_tiles.shape[0] - 1)
    row_start = seg_start[seg] + (tile - (tiles_end[seg] - seg_tiles[seg])) * block_m
    row_end = jnp.minimum(row_start + block_m, seg_end[seg])
    group = jnp.where(idle, IDLE, seg_group[seg])
    return jnp.stack([group, jnp.where(idle, 0, row_start), jnp.where(idle, 0, row_end)]).astype(jnp.int32)
