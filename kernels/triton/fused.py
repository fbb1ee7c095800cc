"""Fused dispatch / combine for the Triton grouped matmul (the optional ``gather_gmm`` / ``scatter_gmm`` functions
of the ``moe_ops.backend`` interface): the routed MoE layer never materialises a permuted copy of its tokens.

Both run ``kernels.triton.gmm._gmm_kernel`` over the ``M = T*k`` expert-sorted rows with the same device-side row-tile
schedule as ``gmm``, plus constexpr row maps (``gmm.RowMap``), ``slot = sort_idx[i]`` for sorted row ``i``:

* ``gather_gmm``: the A-tile load reads ``x[slot // k]`` (x [T,K] in token order): no ``x_sorted`` buffer.
  Optional ``row_weights`` [T,k] scale output row ``i`` by ``row_weights.flat[slot]`` in the f32 epilogue.
* ``scatter_gmm``: the epilogue stores ``w.flat[slot] * (h @ rhs[g])[i]`` to row ``slot`` of a token-major
  ``[T*k, N]`` buffer (``sort_idx`` is a permutation: every row is written exactly once, no atomics, deterministic),
  then the k slots of each token are summed in f32 (``sum_slots``). Rows of non-local groups and rows beyond
  ``sum(group_sizes)`` (dropped copies) are zero-fill tiles: their slots get zeros, so they contribute nothing.

``sort_idx`` must be a permutation of ``[0, T*k)`` (``sort_by_expert``); other values give unspecified rows but no
out-of-bounds access (the kernel clamps slots).
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.triton.gmm import RowMap, launch_gmm

__all__ = ["gather_gmm", "scatter_gmm", "scatter_gmm_sum", "sum_slots"]


def sum_slots(slots, num_tokens, top_k, out_dtype):
    """[T*k, N] token-major slots -> [T, N]: ``out[t] = sum_j slots[t*k + j]`` in f32 (slot order), ``out_dtype``."""
    return slots.astype(jnp.float32).reshape(num_tokens, top_k, -1).sum(axis=1).astype(out_dtype)


def gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, *, transpose_rhs, out_dtype, row_weights=None,
               config=None):
    """x [T,K] (token order), rhs [G_local,K,N] ([G_local,N,K] if ``transpose_rhs``), clamped group_sizes [G],
    group_offset int32[1], sort_idx [T*k] -> [T*k, N]: ``out[i] = x[sort_idx[i] // k] @ rhs[group(i)]`` (times
    ``row_weights.flat[sort_idx[i]]`` when given); rows outside local groups are zero."""
    m = sort_idx.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    weights = None if row_weights is None else row_weights.reshape(-1)
    return launch_gmm(x, rhs, group_sizes, group_offset, num_rows=m, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                      config=config, row_map=RowMap(sort_idx, k, gather=True, weights=weights))


def scatter_gmm(h, rhs, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs, out_dtype, config=None):
    """h [T*k,K] (expert-sorted rows), rhs as in ``gather_gmm``, sort_idx [T*k], weights [T,k] -> [T, N]:
    ``out[t] = sum_j weights[t,j] * (h @ rhs[g])[inverse[t*k+j]]``; the [T*k, N] slot buffer is in ``out_dtype``,
    the k-slot sum in f32."""
    t, k = weights.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if t == 0:
        return jnp.zeros((0, n), out_dtype)
    slots = launch_gmm(h, rhs, group_sizes, group_offset, num_rows=h.shape[0], transpose_rhs=transpose_rhs,
                       out_dtype=out_dtype, config=config,
                       row_map=RowMap(sort_idx, k, scatter=True, weights=weights.reshape(-1)))
    return sum_slots(slots, t, k, out_dtype)


def scatter_gmm_sum(h, rhs, h2, rhs2, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs, out_dtype,
                    config=None):
    """``scatter_gmm(h, rhs) + scatter_gmm(h2, rhs2)`` in one launch: h2 [T*k, K2] and rhs2 (rhs's layout with K2)
    add their product in the same f32 accumulator (one K + K2 loop per tile), so one [T*k, N] slot buffer is
    written instead of two. The fused SwiGLU backward's ``dx = dgate @ w_gate^T + dup @ w_up^T``. (No batching
    rule: under ``jax.vmap`` callers use the two-launch composition, ``moe_ops``.)"""
    t, k = weights.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if t == 0:
        return jnp.zeros((0, n), out_dtype)
    slots = launch_gmm(h, rhs, group_sizes, group_offset, num_rows=h.shape[0], transpose_rhs=transpose_rhs,
                       out_dtype=out_dtype, config=config, second=(h2, rhs2),
                       row_map=RowMap(sort_idx, k, scatter=True, weights=weights.reshape(-1)))
    return sum_slots(slots, t, k, out_dtype)

