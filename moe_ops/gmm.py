"""Public grouped matmuls with one generic VJP, parameterised by the backend's ``gmm`` / ``tgmm``.

For ``out = gmm(lhs, rhs)`` (rhs ``[G,K,N]``) the cotangents are again grouped matmuls, never a densified product:

* ``dlhs = gmm(dout, rhs, transpose_rhs=True)``       (``[M,N] x [G,K,N]^T -> [M,K]``, no materialised transpose)
* ``drhs = tgmm(lhs, dout)``                          (``[M,K]^T x [M,N] -> [G,K,N]``)

With ``transpose_rhs`` (rhs ``[G,N,K]``) the roles swap: ``dlhs = gmm(dout, rhs)``, ``drhs = tgmm(dout, lhs)``.
For ``out = tgmm(lhs, rhs)``: ``dlhs = gmm(rhs, dout, transpose_rhs=True)``, ``drhs = gmm(lhs, dout)``.
Rows of non-local groups and rows beyond ``sum(group_sizes)`` get zero gradient because every op above writes zeros
there. Integer inputs (``group_sizes``, ``group_offset``) get no cotangent. ``gmm(..., existing_out=)`` selects
between the kernel output and ``existing_out`` with one row mask (``local_rows``), so its gradient is the select's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_ops import backend, validation
from moe_ops import vma

__all__ = ["gmm", "tgmm", "local_rows"]


def _precision_kwargs(precision):
    """Backends take ``precision=`` only when it is set (the Triton kernels have no such argument)."""
    return {} if precision is None else {"precision": precision}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, impl, precision=None):
    out = backend.ops(impl).gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                                **_precision_kwargs(precision))
    return vma.like(out, lhs)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, impl, precision=None):
    out = _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, impl, precision)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(transpose_rhs, out_dtype, impl, precision, residuals, dout):
    lhs, rhs, group_sizes, group_offset = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = _gmm(dout, rhs, group_sizes, group_offset, not transpose_rhs, lhs.dtype, impl, precision)
    a, b = (dout, lhs) if transpose_rhs else (lhs, dout)
    drhs = _tgmm(a, b, group_sizes, group_offset, rhs.shape[0], rhs.dtype, impl, precision)
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _tgmm(lhs, rhs, group_sizes, group_offset, num_groups, out_dtype, impl, precision=None):
    out = backend.ops(impl).tgmm(lhs, rhs, group_sizes, group_offset, num_groups=num_groups, out_dtype=out_dtype,
                                 **_precision_kwargs(precision))
    return vma.like(out, lhs)


def _tgmm_fwd(lhs, rhs, group_sizes, group_offset, num_groups, out_dtype, impl, precision=None):
    out = _tgmm(lhs, rhs, group_sizes, group_offset, num_groups, out_dtype, impl, precision)
    return out, (lhs, rhs, group_sizes, group_offset)


def _tgmm_bwd(num_groups, out_dtype, impl, precision, residuals, dout):
    lhs, rhs, group_sizes, group_offset = residuals
    dlhs = _gmm(rhs, dout.astype(rhs.dtype), group_sizes, group_offset, True, lhs.dtype, impl, precision)
    drhs = _gmm(lhs, dout.astype(lhs.dtype), group_sizes, group_offset, False, rhs.dtype, impl, precision)
    return dlhs, drhs, None, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def local_rows(sizes, offset, num_local, num_rows):
    """[M] bool: rows of the local groups ``[offset, offset + num_local)`` (one contiguous row range, clamped sizes)."""
    g = jnp.arange(sizes.shape[0])
    start = jnp.sum(jnp.where(g < offset[0], sizes, 0))
    end = jnp.sum(jnp.where(g < offset[0] + num_local, sizes, 0))
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    return (rows >= start) & (rows < end)


def gmm(lhs, rhs, group_sizes, *, group_offset=None, transpose_rhs=False, preferred_element_type=None,
        existing_out=None, precision=None, implementation=None):
    """Grouped matmul over ragged row groups: lhs [M,K], rhs [G_local,K,N] ([G_local,N,K] with ``transpose_rhs``),
    group_sizes [G] int -> [M,N].

    Row block g of lhs (in order) is multiplied by ``rhs[g - group_offset]``. Rows of groups outside
    ``[group_offset, group_offset + G_local)`` and rows at or beyond ``sum(group_sizes)`` come out as zeros, or,
    with ``existing_out`` [M,N] (dtype = the output dtype), as those rows of ``existing_out`` (megablox semantics:
    local-group rows are overwritten, every other row is kept; its gradient is ``dout`` on the kept rows, zero on
    the overwritten ones). ``sum(group_sizes) > M`` truncates the last groups at row M (see ``validation``).
    ``precision``: as for ``jax.lax.dot`` (see ``validation.kernel_precision`` for what each backend runs).
    Mixed float inputs (e.g. bf16 lhs, f32 rhs) are multiplied in their promoted dtype (as ``lax.dot`` and megablox
    do); the output dtype stays ``preferred_element_type``, else lhs's dtype."""
    validation.check_gmm(lhs, rhs, group_sizes, transpose_rhs)
    out_dtype = validation.out_dtype(preferred_element_type, lhs.dtype)
    validation.check_existing_out(existing_out, (lhs.shape[0], rhs.shape[1 if transpose_rhs else 2]), out_dtype)
    impl = backend.choose(implementation)
    (m, k), n = lhs.shape, rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = validation.zeros_if_empty((m, n), out_dtype, (m, k, n, rhs.shape[0]), lhs, rhs)
    if out is not None and existing_out is None:
        return out
    sizes = validation.clamp_group_sizes(group_sizes, lhs.shape[0])
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    dtype = validation.compute_dtype(lhs, rhs)
    lhs, rhs, sizes, offset = vma.match_vma(lhs.astype(dtype), rhs.astype(dtype), sizes, offset)
    precision = validation.kernel_precision(precision, impl)
    if out is None:
        out = _gmm(lhs, rhs, sizes, offset, bool(transpose_rhs), out_dtype, impl, precision)
    if existing_out is None:
        return out
    keep = ~local_rows(sizes, offset, rhs.shape[0], lhs.shape[0])
    return jnp.where(keep[:, None], existing_out, out)


def tgmm(lhs, rhs, group_sizes, *, group_offset=None, num_groups=None, preferred_element_type=None,
         precision=None, implementation=None):
    """Grouped matmul with a ragged contraction: lhs [M,K], rhs [M,N] -> [G_local,K,N],
    ``out[g] = lhs[rows of g].T @ rhs[rows of g]`` for local groups; empty groups give zeros.

    ``num_groups`` (static) is G_local; it defaults to ``len(group_sizes)``. Mixed float inputs are multiplied in
    their promoted dtype; the output is ``preferred_element_type``, else lhs's dtype."""
    validation.check_tgmm(lhs, rhs, group_sizes, num_groups)
    out_dtype = validation.out_dtype(preferred_element_type, lhs.dtype)
    impl = backend.choose(implementation)
    sizes = validation.clamp_group_sizes(group_sizes, lhs.shape[0])
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    num_groups = group_sizes.shape[0] if num_groups is None else int(num_groups)
    (m, k), n = lhs.shape, rhs.shape[1]
    empty = validation.zeros_if_empty((num_groups, k, n), out_dtype, (m, k, n, num_groups), lhs, rhs)
    if empty is not None:
        return empty
    dtype = validation.compute_dtype(lhs, rhs)
    lhs, rhs, sizes, offset = vma.match_vma(lhs.astype(dtype), rhs.astype(dtype), sizes, offset)
    precision = validation.kernel_precision(precision, impl)
    return _tgmm(lhs, rhs, sizes, offset, num_groups, out_dtype, impl, precision)
