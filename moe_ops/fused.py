"""Fused dispatch / combine: grouped matmuls that read token-order rows and write token-order results, so the routed
MoE layer never materialises the permuted token copies (``moe_ffn(..., fused=True)``).

With ``sort_idx`` [T*k] from ``sort_by_expert`` (sorted row ``i`` holds token copy ``slot = sort_idx[i]``, token
``slot // k``), ``group(i)`` the expert of sorted row ``i`` and ``R = rhs[group(i)]``:

* ``gather_gmm(x, rhs, ...)``: x [T,K] -> y [T*k,N], ``y[i] = x[slot // k] @ R`` (= ``gmm(permute(x), rhs)``).
* ``scatter_gmm(h, rhs, ..., weights)``: h [T*k,K] -> out [T,N],
  ``out[t] = sum_j weights[t,j] * (h @ R)[inverse[t*k+j]]`` (= ``unpermute(gmm(h, rhs), sort_idx, weights)``).

Rows of non-local groups and rows beyond ``sum(group_sizes)`` (dropped copies: out-of-range expert ids sort last)
give zero rows / zero contributions and get zero gradient, whatever they hold: a NaN / Inf / huge value in such a
row of ``x`` or ``h``, in an unused expert of ``rhs``, or in the routing weight of such a copy (``scatter_gmm``)
reaches no output and no gradient, on every backend (a select, never a multiply by zero;
``tests/test_nonfinite.py``). Custom VJPs, built from existing grouped matmuls and row kernels (no scatter-add,
nothing densified):

* gather_gmm: ``dx = combine_rows(gmm(dy, R^T), sort_idx, ones)``; ``drhs = tgmm(gather_rows(x), dy)`` (the backward
  gathers x once: acceptable there, the forward does not).
* scatter_gmm: ``a = gather_gmm(dout, R^T)`` in f32 (unweighted), then ``dh = w_sorted * a``,
  ``dweights[slot] = <h_i, a_i>`` (``= <dout[t], (h @ R)[i]>``: the unweighted expert output is neither saved nor
  recomputed), ``drhs = tgmm(h, gather_rows(dout, weights))``.

Inside a user's ``shard_map`` the ops align their operands' manual-axis variance like the other public ops
(``moe_ops.vma``). Backends provide ``gather_gmm`` / ``scatter_gmm`` optionally (``moe_ops.backend``): Triton and Pallas
(fused kernels) and XLA (reference twins) do (``supports_fused``; without them ``moe_ffn`` runs the unfused path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.groups import local_row_mask
from moe_ops import backend, validation, vma
from moe_ops.sharding import on_explicit_axes
from moe_ops.gmm import _gmm, _tgmm
from moe_ops.sort import _combine, _gather, sort_by_expert

__all__ = ["gather_gmm", "scatter_gmm", "sort_by_expert", "supports_fused", "use_fused", "FUSED_BY_DEFAULT"]

FUSED_BY_DEFAULT = ("triton", "pallas")  # backends where ``moe_ffn(fused=None)`` takes the fused path


def supports_fused(implementation=None) -> bool:
    """Whether the backend of ``implementation`` provides ``gather_gmm`` / ``scatter_gmm``."""
    ops = backend.ops(implementation)
    return hasattr(ops, "gather_gmm") and hasattr(ops, "scatter_gmm")


def use_fused(fused, implementation=None) -> bool:
    """``moe_ffn``'s choice: ``None`` -> fused on ``FUSED_BY_DEFAULT`` backends, and always for
    ``implementation=None``, whose fused ops are chosen per lowering platform (the Triton kernels on GPUs; elsewhere
    the backend's own composition, which is the unfused path op for op); ``True`` -> fused where the backend
    supports it (unfused path otherwise); ``False`` -> unfused."""
    validation.flag("fused", fused, optional=True)
    if fused is None:
        return backend.choose(implementation) is None or implementation in FUSED_BY_DEFAULT
    return bool(fused) and supports_fused(implementation)


# ---------------------------------------------------------------------------------------------------------------
# Custom VJPs (kernel-level arguments: clamped sizes, int32[1] offset, int32 sort_idx).


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, transpose_rhs, out_dtype, impl):
    out = backend.ops(impl).gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, transpose_rhs=transpose_rhs,
                                       out_dtype=out_dtype)
    return vma.like(out, x)


def _gather_gmm_fwd(x, rhs, group_sizes, group_offset, sort_idx, k, transpose_rhs, out_dtype, impl):
    out = _gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, transpose_rhs, out_dtype, impl)
    return out, (x, rhs, group_sizes, group_offset, sort_idx)


def _gather_gmm_bwd(k, transpose_rhs, out_dtype, impl, residuals, dy):
    x, rhs, group_sizes, group_offset, sort_idx = residuals
    dy = dy.astype(x.dtype)
    dx_sorted = _gmm(dy, rhs, group_sizes, group_offset, not transpose_rhs, x.dtype, impl)  # [T*k, K], zero rows
    ones = jnp.ones((x.shape[0], k), jnp.float32)                                          # outside local groups
    dx = _combine(dx_sorted, ones, sort_idx, None, impl)
    x_sorted = _gather(x, sort_idx, None, k, impl)
    a, b = (dy, x_sorted) if transpose_rhs else (x_sorted, dy)
    drhs = _tgmm(a, b, group_sizes, group_offset, rhs.shape[0], rhs.dtype, impl)
    return dx, drhs, None, None, None


_gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _scatter_gmm(h, rhs, weights, group_sizes, group_offset, sort_idx, transpose_rhs, out_dtype, impl):
    out = backend.ops(impl).scatter_gmm(h, rhs, group_sizes, group_offset, sort_idx, weights,
                                        transpose_rhs=transpose_rhs, out_dtype=out_dtype)
    return vma.like(out, h)


def _scatter_gmm_fwd(h, rhs, weights, group_sizes, group_offset, sort_idx, transpose_rhs, out_dtype, impl):
    out = _scatter_gmm(h, rhs, weights, group_sizes, group_offset, sort_idx, transpose_rhs, out_dtype, impl)
    return out, (h, rhs, weights, group_sizes, group_offset, sort_idx)


def _scatter_gmm_bwd(transpose_rhs, out_dtype, impl, residuals, dout):
    h, rhs, weights, group_sizes, group_offset, sort_idx = residuals
    k = weights.shape[1]
    dout = dout.astype(h.dtype)
    # a[i] = dout[slot // k] @ R^T, unweighted, f32; zero rows outside local groups / beyond the sum.
    a = _gather_gmm(dout, rhs, group_sizes, group_offset, sort_idx, k, not transpose_rhs, jnp.dtype(jnp.float32),
                    impl)
    # Rows outside the local groups contribute nothing, so their dh and routing-weight gradient are exactly zero:
    # selected, never computed as 0 * w (an Inf / NaN weight) or <h_i, 0> (a NaN h row).
    local = local_row_mask(group_sizes, group_offset, rhs.shape[0], h.shape[0])
    w_sorted = jnp.where(local, weights.reshape(-1).astype(jnp.float32)[sort_idx], 0.0)
    dh = (a * w_sorted[:, None]).astype(h.dtype)
    dw_sorted = jnp.where(local, jnp.sum(a * h.astype(jnp.float32), axis=1), 0.0)  # <h_i, a_i> = <dout[t], (h@R)[i]>
    dweights = jnp.zeros_like(dw_sorted).at[sort_idx].set(dw_sorted, unique_indices=True)  # permutation write
    dy = vma.like(backend.ops(impl).gather_rows(dout, sort_idx, k, row_weights=weights), dout)  # w * dout[token]
    a_t, b_t = (dy, h) if transpose_rhs else (h, dy)
    drhs = _tgmm(a_t, b_t, group_sizes, group_offset, rhs.shape[0], rhs.dtype, impl)
    return dh, drhs, dweights.reshape(weights.shape).astype(weights.dtype), None, None, None


_scatter_gmm.defvjp(_scatter_gmm_fwd, _scatter_gmm_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Public ops.


def _check_rows(sort_idx, num_tokens, what):
    """sort_idx [T*k] int -> k (static), checking that its length is a multiple of ``num_tokens``."""
    validation.sort_idx_array(sort_idx)
    n = sort_idx.shape[0]
    if (num_tokens == 0 and n != 0) or (num_tokens and n % num_tokens):
        raise ValueError(f"sort_idx [T*k] must have a multiple of T={num_tokens} entries ({what}), got {n}")
    return n // num_tokens if num_tokens else 0


def _fused_ops_for(implementation):
    impl = backend.choose(implementation)
    if not supports_fused(impl):
        raise NotImplementedError(f"the {impl!r} backend has no fused gather_gmm / scatter_gmm; use permute + gmm + "
                                  "unpermute (moe_ffn falls back to them by itself)")
    return impl


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("x", 0), spec("rhs", 1 if a["transpose_rhs"] else 2)))
def gather_gmm(x, rhs, group_sizes, sort_idx, *, group_offset=None, transpose_rhs=False,
               preferred_element_type=None, implementation=None):
    """Grouped matmul reading token-order rows: x [T,K], rhs [G_local,K,N] ([G_local,N,K] with ``transpose_rhs``),
    group_sizes [G], sort_idx [T*k] -> [T*k,N] in expert order, ``out[i] = x[sort_idx[i] // k] @ rhs[group(i)]``;
    equal to ``gmm(permute(x)[0], rhs, group_sizes)`` without building the permuted copy (mixed float inputs are
    multiplied in their promoted dtype, as in ``gmm``). Rows outside the local groups are zero and an x row read
    only by them (a token with no local copy) reaches no output and gets zero gradient, NaN / Inf included."""
    validation.check_gmm(x, rhs, group_sizes, transpose_rhs, names=("x", "rhs"))
    k = _check_rows(sort_idx, x.shape[0], "x is [T, K]")
    out_dtype = validation.out_dtype(preferred_element_type, x.dtype)
    impl = _fused_ops_for(implementation)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dims = (sort_idx.shape[0], x.shape[1], n, rhs.shape[0])
    empty = validation.zeros_if_empty((sort_idx.shape[0], n), out_dtype, dims, x, rhs)
    if empty is not None:
        return empty
    sizes = validation.clamp_group_sizes(group_sizes, sort_idx.shape[0])
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    dtype = validation.compute_dtype(x, rhs)
    x, rhs, sizes, offset, sort_idx = vma.match_vma(x.astype(dtype), rhs.astype(dtype), sizes, offset,
                                                    sort_idx.astype(jnp.int32))
    return _gather_gmm(x, rhs, sizes, offset, sort_idx, k, bool(transpose_rhs), out_dtype, impl)


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("weights", 0), spec("rhs", 1 if a["transpose_rhs"] else 2)))
def scatter_gmm(h, rhs, group_sizes, sort_idx, weights, *, group_offset=None, transpose_rhs=False,
                preferred_element_type=None, implementation=None):
    """Grouped matmul with a weighted combine to token order: h [T*k,K] (expert order), rhs as in ``gather_gmm``,
    sort_idx [T*k], weights [T,k] -> [T,N], ``out[t] = sum_j weights[t,j] * (h @ rhs[g])[inverse[t*k+j]]`` (f32
    sum); equal to ``unpermute(gmm(h, rhs, group_sizes), sort_idx, weights)`` where that is finite. A copy whose
    row lies outside the local groups (another shard's expert under ``group_offset``, or a dropped copy sorted past
    ``sum(group_sizes)``) contributes exactly zero whatever its h row and its weight hold (NaN / Inf included; the
    composition above would give ``inf * 0`` = NaN), and its dh row and weight gradient are exactly zero."""
    validation.check_gmm(h, rhs, group_sizes, transpose_rhs, names=("h", "rhs"))
    validation.float_array("weights", weights, 2)
    validation.sort_idx_array(sort_idx)
    h, weights = jnp.asarray(h), jnp.asarray(weights)  # NumPy ones would be indexed by traced rows in the backward
    if not (h.shape[0] == sort_idx.shape[0] == weights.shape[0] * weights.shape[1]):
        raise ValueError(f"h [T*k,K], sort_idx [T*k] and weights [T,k] disagree: h {tuple(h.shape)}, sort_idx "
                         f"{tuple(sort_idx.shape)}, weights {tuple(weights.shape)}")
    out_dtype = validation.out_dtype(preferred_element_type, h.dtype)
    impl = _fused_ops_for(implementation)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dims = (h.shape[0], h.shape[1], n, rhs.shape[0])
    empty = validation.zeros_if_empty((weights.shape[0], n), out_dtype, dims, h, rhs, weights)
    if empty is not None:
        return empty
    sizes = validation.clamp_group_sizes(group_sizes, h.shape[0])
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    dtype = validation.compute_dtype(h, rhs)
    h, rhs, weights, sizes, offset, sort_idx = vma.match_vma(h.astype(dtype), rhs.astype(dtype), weights, sizes,
                                                            offset, sort_idx.astype(jnp.int32))
    return _scatter_gmm(h, rhs, weights, sizes, offset, sort_idx, bool(transpose_rhs), out_dtype, impl)
