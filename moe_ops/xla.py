"""XLA backend: the kernel-level interface of ``backend`` built from ``lax.ragged_dot`` and gathers.

It is what ``implementation=None`` runs on CPU. Sharded groups are handled by routing the rows of non-local groups
(and rows beyond the sum) to two zero "guard" experts, so ``ragged_dot`` needs no ``group_offset``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from moe_ops import reference


def _vmap_by_broadcast(fn):
    """``lax.ragged_dot`` batches only when lhs, rhs and group sizes are all batched ("vmap over any dim but 0 -
    NYI" otherwise): under ``jax.vmap`` broadcast the unbatched operands first (a shared rhs is then copied per
    batch; the Triton backend folds without copying, see ``kernels.triton.batching``)."""
    @functools.wraps(fn)
    def wrapped(*arrays, **static):
        call = custom_vmap(lambda *xs: fn(*xs, **static))

        @call.def_vmap
        def rule(size, batched, *xs):
            xs = [x if b else jnp.broadcast_to(x, (size,) + x.shape) for x, b in zip(xs, batched)]
            return jax.vmap(lambda *ys: fn(*ys, **static))(*xs), True

        return call(*arrays)
    return wrapped


def _guarded_sizes(group_sizes, group_offset, num_local, num_rows):
    """[before, local sizes..., after]: rows before/after the local groups go to guard experts."""
    offset = group_offset[0]
    g = jnp.arange(group_sizes.shape[0])
    local = jnp.where((g >= offset) & (g < offset + num_local), group_sizes, 0)
    before = jnp.sum(jnp.where(g < offset, group_sizes, 0))
    local_sizes = jax.lax.dynamic_slice(jnp.pad(local, (0, num_local)), (offset,), (num_local,))
    after = num_rows - before - jnp.sum(local_sizes)
    return jnp.concatenate([before[None], local_sizes, after[None]]).astype(jnp.int32)


@_vmap_by_broadcast
def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, precision=None):
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    zero = jnp.zeros((1,) + rhs.shape[1:], rhs.dtype)
    sizes = _guarded_sizes(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])
    return jax.lax.ragged_dot(lhs, jnp.concatenate([zero, rhs, zero]), sizes, precision=precision,
                              preferred_element_type=jnp.float32).astype(out_dtype)


@_vmap_by_broadcast
def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype, precision=None):
    sizes = _guarded_sizes(group_sizes, group_offset, num_groups, lhs.shape[0])
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    out = jax.lax.ragged_dot_general(lhs, rhs, sizes, dims, precision=precision, preferred_element_type=jnp.float32)
    return out[1:-1].astype(out_dtype)


# Token permutation. ``n_valid`` (valid-prefix form): sorted rows ``>= n_valid`` are zeros in ``gather_rows`` and
# ignored (zero contribution) by ``combine_rows`` / ``combine_weight_grad``; the same in every backend.


sort_by_expert = reference.sort_by_expert  # the stable argsort; the kernels' counting sorts must match it exactly


def _valid_rows(n, n_valid):
    """[n, 1] mask of rows < n_valid, or None when every row is valid."""
    return None if n_valid is None else (jnp.arange(n) < jnp.asarray(n_valid).reshape(()))[:, None]


def gather_rows(x, sort_idx, k, row_weights=None, n_valid=None):
    """x [T,D] -> [T*k,D]: ``x[sort_idx[i] // k]`` (* row_weights.flat[sort_idx[i]] in f32), zeros past n_valid."""
    rows = x[sort_idx // k]
    if row_weights is not None:
        rows = (rows.astype(jnp.float32) * row_weights.reshape(-1)[sort_idx][:, None]).astype(x.dtype)
    valid = _valid_rows(sort_idx.shape[0], n_valid)
    return rows if valid is None else jnp.where(valid, rows, 0)


def _rows_per_slot(y, sort_idx, t, k, n_valid):
    """[T, k, D] f32: the row of each (token, slot), zero where it lies at or past n_valid."""
    valid = _valid_rows(y.shape[0], n_valid)
    y = y if valid is None else jnp.where(valid, y, 0)
    return y[reference.inverse_permutation(sort_idx)].astype(jnp.float32).reshape(t, k, -1)


def combine_rows(y, sort_idx, weights, n_valid=None):
    """y [T*k,D] -> [T,D]: ``sum_j w[t,j] * y[inv[t*k+j]]`` in f32, y's dtype."""
    t, k = weights.shape
    gathered = _rows_per_slot(y, sort_idx, t, k, n_valid)
    return jnp.einsum("tkd,tk->td", gathered, weights.astype(jnp.float32), precision="highest").astype(y.dtype)


def combine_weight_grad(dout, y, sort_idx, k, n_valid=None):
    """dout [T,D], y [T*k,D] -> [T,k] f32: ``<dout[t], y[inv[t*k+j]]>``."""
    gathered = _rows_per_slot(y, sort_idx, dout.shape[0], k, n_valid)
    return jnp.einsum("tkd,td->tk", gathered, dout.astype(jnp.float32), precision="highest")


# Fused dispatch / combine (the optional ``gather_gmm`` / ``scatter_gmm`` of the interface): reference twins that
# compose the functions above, so they *do* materialise the permuted rows; ``moe_ffn(fused=True)`` runs everywhere.


def gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, *, transpose_rhs, out_dtype, row_weights=None):
    """x [T,K] -> [T*k,N]: ``x[sort_idx[i] // k] @ rhs[group(i)]`` (* ``row_weights.flat[sort_idx[i]]`` in f32)."""
    out = gmm(x[sort_idx // k], rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs,
              out_dtype=out_dtype if row_weights is None else jnp.float32)
    if row_weights is not None:
        out = (out * row_weights.reshape(-1).astype(jnp.float32)[sort_idx][:, None]).astype(out_dtype)
    return out


def scatter_gmm(h, rhs, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs, out_dtype):
    """h [T*k,K] -> [T,N]: ``sum_j weights[t,j] * (h @ rhs[g])[inv[t*k+j]]`` (f32 combine)."""
    y = gmm(h, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype)
    return combine_rows(y, sort_idx, weights)
