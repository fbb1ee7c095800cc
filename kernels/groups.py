"""Group-row bookkeeping shared by the backends' tile schedules (pure ``jnp``, no Triton): where each local group's
rows lie in the expert-sorted row order; and the sort by expert for expert counts too large for the kernels'
counting sorts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["local_bounds", "local_row_mask", "row_groups", "group_rows", "bias_pair", "segment_of",
           "stable_expert_sort"]


def local_bounds(group_sizes, group_offset, num_local):
    """(start, end) int32[G_local] of each local group's rows, for clamped ``group_sizes`` [G] and ``group_offset``
    int32[1]: local group ``j`` is global group ``group_offset + j``, empty (start = end = 0) when that id is outside
    ``[0, G)`` (so every range is empty when G or G_local is 0)."""
    if num_local == 0 or group_sizes.shape[-1] == 0:
        empty = jnp.zeros((num_local,), jnp.int32)
        return empty, empty
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    ids = group_offset.reshape(()).astype(jnp.int32) + jnp.arange(num_local, dtype=jnp.int32)
    valid = (ids >= 0) & (ids < sizes.shape[0])
    safe = jnp.clip(ids, 0, sizes.shape[0] - 1)
    end = jnp.where(valid, ends[safe], 0)
    start = jnp.where(valid, end - sizes[safe], 0)
    return start, end


def local_row_mask(group_sizes, group_offset, num_local, num_rows):
    """[num_rows] bool: the rows of the local groups, one contiguous range from local group 0's start to the largest
    local end (``local_bounds`` gives groups past ``G`` the empty range [0, 0), so no group local gives no row).
    What the fused combines select on: a row outside it contributes nothing, its routing weight included."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    if num_local == 0 or group_sizes.shape[-1] == 0:   # no local group: no row
        return rows < 0
    start, end = local_bounds(group_sizes, group_offset, num_local)
    return (rows >= start[0]) & (rows < jnp.max(end))


def row_groups(group_sizes, group_offset, num_local, num_rows):
    """int32 [num_rows]: the local group of each sorted row (``0 <= j < num_local``), ``num_local`` for rows of no
    local group (other shards' groups, rows beyond ``sum(group_sizes)``)."""
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    if num_local == 0 or group_sizes.shape[-1] == 0:
        return jnp.full((num_rows,), num_local, jnp.int32)
    start, end = local_bounds(group_sizes, group_offset, num_local)
    # local groups are consecutive; ids past G (empty, end 0) take the last real end, so the ends stay sorted
    local = segment_of(jax.lax.cummax(end), rows)
    safe = jnp.minimum(local, num_local - 1)
    return jnp.where((local < num_local) & (rows >= start[safe]), local, num_local)


def group_rows(values, group_sizes, group_offset, num_rows, dtype):
    """values [G_local, N] (a per-group row, e.g. an expert bias) -> [num_rows, N] in ``dtype``: each sorted row of a
    local group gets its group's row, every other row zeros (selected, so a NaN of an unused group reaches none)."""
    num_local = values.shape[0]
    ids = row_groups(group_sizes, group_offset, num_local, num_rows)
    picked = jnp.take(values.astype(dtype), jnp.minimum(ids, max(num_local - 1, 0)), axis=0)
    return jnp.where((ids < num_local)[:, None], picked, jnp.zeros((), dtype))


def bias_pair(b_gate, b_up, num_local, n):
    """The gate / up biases a SwiGLU kernel adds to its projections, each [G_local, N] or None -> (b_gate, b_up),
    a missing one as zeros of the other's dtype, or (None, None) when neither is given (no bias add compiled)."""
    if b_gate is None and b_up is None:
        return None, None
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b is not None and tuple(b.shape) != (num_local, n):
            raise ValueError(f"{name} must be [G_local, F]={(num_local, n)}, got {tuple(b.shape)}")
    like = b_gate if b_gate is not None else b_up
    return tuple(jnp.zeros((num_local, n), like.dtype) if b is None else b for b in (b_gate, b_up))


def segment_of(ends, positions):
    """int32 index of the segment each of ``positions`` falls in, for non-decreasing segment ``ends`` [S]: the
    number of ends ``<= position`` (``searchsorted(side="right")``; ``S`` past the last end). A compare-and-count that
    XLA fuses into one kernel: the default binary search lowers to a ``while`` loop, which XLA GPU runs as a few
    kernel launches per step from the host, before every grouped matmul."""
    # written out rather than searchsorted(method="compare_all"): jax 0.10's searchsorted fails an assertion on
    # operands varying over some manual axes (a shard_map manual over part of the mesh, check_vma on)
    return jnp.sum(ends[None, :] <= positions[:, None], axis=1, dtype=jnp.int32)


def stable_expert_sort(flat_ids, num_experts):
    """flat int32 expert ids [N] -> (group_sizes [E] int32, sort_idx [N] int32) by XLA's stable sort: the kernel
    backends' ``sort_by_expert`` for large E (their counting sorts keep an [blocks, E] count table and a per-block
    histogram of E bins, past on-chip memory from a few thousand experts). Same contract: stable in flat index,
    ids outside ``[0, E)`` sort last and are counted in no group."""
    key = jnp.where((flat_ids >= 0) & (flat_ids < num_experts), flat_ids, num_experts).astype(jnp.int32)
    sort_idx = jnp.argsort(key, stable=True).astype(jnp.int32)
    return jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts], sort_idx
