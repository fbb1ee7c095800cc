"""Public grouped matmuls: validation, then one bind of the ``moe_gmm`` / ``moe_tgmm`` primitive
(``moe_ops.primitives``), whose rules give reverse and forward mode, ``vmap`` and their nestings.

For ``out = gmm(lhs, rhs)`` (rhs ``[G,K,N]``) the cotangents are again grouped matmuls, never a densified product:

* ``dlhs = gmm(dout, rhs, transpose_rhs=True)``       (``[M,N] x [G,K,N]^T -> [M,K]``, no materialised transpose)
* ``drhs = tgmm(lhs, dout)``                          (``[M,K]^T x [M,N] -> [G,K,N]``)

With ``transpose_rhs`` (rhs ``[G,N,K]``) the roles swap: ``dlhs = gmm(dout, rhs)``, ``drhs = tgmm(dout, lhs)``.
For ``out = tgmm(lhs, rhs)``: ``dlhs = gmm(rhs, dout, transpose_rhs=True)``, ``drhs = gmm(lhs, dout)``.
Forward mode is the bilinear rule ``d out = op(dlhs, rhs) + op(lhs, drhs)``. Rows of non-local groups and rows
beyond ``sum(group_sizes)`` get zero gradient (and zero tangent) because every op above writes zeros there. Integer
inputs (``group_sizes``, ``group_offset``) get no cotangent. ``gmm(..., existing_out=)`` selects between the kernel
output and ``existing_out`` with one row mask (``kernels.groups.local_row_mask``), so its gradient is the select's.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.groups import local_row_mask
from moe_ops import backend, precision as precision_lib, primitives, validation
from moe_ops.sharding import on_explicit_axes
from moe_ops import vma

__all__ = ["gmm", "tgmm"]


def _precision_kwargs(precision):
    """Backends take ``precision=`` only when it is set (the Triton kernels have no such argument)."""
    return {} if precision is None else {"precision": precision}


def _gmm_transpose(ct, operands, wanted, *, transpose_rhs, out_dtype, precision, impl, nb):
    lhs, rhs, sizes, offset = operands
    lhs_dtype, rhs_aval = primitives.aval_of(lhs).dtype, primitives.aval_of(rhs)
    ct = ct.astype(lhs_dtype)
    dlhs = drhs = None
    if wanted[0]:
        dlhs = primitives.bind(_gmm_p, ct, rhs, sizes, offset, transpose_rhs=not transpose_rhs, out_dtype=lhs_dtype,
                               precision=precision, impl=impl, nb=nb)
    if wanted[1]:
        a, b = (ct, lhs) if transpose_rhs else (lhs, ct)
        drhs = primitives.bind(_tgmm_p, a, b, sizes, offset, num_groups=rhs_aval.shape[-3], out_dtype=rhs_aval.dtype,
                               precision=precision, impl=impl, nb=nb)
    return dlhs, drhs


def _tgmm_transpose(ct, operands, wanted, *, num_groups, out_dtype, precision, impl, nb):
    lhs, rhs, sizes, offset = operands
    lhs_dtype, rhs_dtype = primitives.aval_of(lhs).dtype, primitives.aval_of(rhs).dtype
    ct = ct.astype(lhs_dtype)
    dlhs = drhs = None
    if wanted[0]:
        dlhs = primitives.bind(_gmm_p, rhs, ct, sizes, offset, transpose_rhs=True, out_dtype=lhs_dtype,
                               precision=precision, impl=impl, nb=nb)
    if wanted[1]:
        drhs = primitives.bind(_gmm_p, lhs, ct, sizes, offset, transpose_rhs=False, out_dtype=rhs_dtype,
                               precision=precision, impl=impl, nb=nb)
    return dlhs, drhs


_gmm_p = primitives.define(primitives.Spec(
    "moe_gmm", n_linear=2, ranks=(2, 3, 1, 1),
    kernel=lambda ops, lhs, rhs, sizes, offset, *, transpose_rhs, out_dtype, precision: ops.gmm(
        lhs, rhs, sizes, offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype, **_precision_kwargs(precision)),
    shape=lambda lhs, rhs, sizes, offset, *, transpose_rhs, out_dtype, precision: (
        (lhs.shape[0], rhs.shape[1 if transpose_rhs else 2]), out_dtype),
    transpose=_gmm_transpose))
_tgmm_p = primitives.define(primitives.Spec(
    "moe_tgmm", n_linear=2, ranks=(2, 2, 1, 1),
    kernel=lambda ops, lhs, rhs, sizes, offset, *, num_groups, out_dtype, precision: ops.tgmm(
        lhs, rhs, sizes, offset, num_groups=num_groups, out_dtype=out_dtype, **_precision_kwargs(precision)),
    shape=lambda lhs, rhs, sizes, offset, *, num_groups, out_dtype, precision: (
        (num_groups, lhs.shape[1], rhs.shape[1]), out_dtype),
    transpose=_tgmm_transpose))


def _gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, out_dtype, impl, precision=None):
    """The ``moe_gmm`` primitive on validated operands: lhs [M,K] x rhs [G_local,K,N] (``[G_local,N,K]`` with
    ``transpose_rhs``) -> [M,N] in ``out_dtype``."""
    return primitives.bind(_gmm_p, lhs, rhs, group_sizes, group_offset, transpose_rhs=bool(transpose_rhs),
                           out_dtype=jnp.dtype(out_dtype), precision=precision, impl=impl)


def _tgmm(lhs, rhs, group_sizes, group_offset, num_groups, out_dtype, impl, precision=None):
    """The ``moe_tgmm`` primitive on validated operands: lhs [M,K]^T x rhs [M,N] -> [num_groups,K,N]."""
    return primitives.bind(_tgmm_p, lhs, rhs, group_sizes, group_offset, num_groups=int(num_groups),
                           out_dtype=jnp.dtype(out_dtype), precision=precision, impl=impl)


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("lhs", 0), spec("rhs", 1 if a["transpose_rhs"] else 2)))
def gmm(lhs, rhs, group_sizes, *, group_offset=None, transpose_rhs=False, preferred_element_type=None,
        existing_out=None, precision=None, implementation=None):
    """Grouped matmul over ragged row groups: lhs [M,K], rhs [G_local,K,N] ([G_local,N,K] with ``transpose_rhs``),
    group_sizes [G] int -> [M,N].

    Row block g of lhs (in order) is multiplied by ``rhs[g - group_offset]``. Rows of groups outside
    ``[group_offset, group_offset + G_local)`` and rows at or beyond ``sum(group_sizes)`` come out as zeros, or,
    with ``existing_out`` [M,N] (dtype = the output dtype), as those rows of ``existing_out`` (megablox semantics:
    local-group rows are overwritten, every other row is kept; its gradient is ``dout`` on the kept rows, zero on
    the overwritten ones). ``sum(group_sizes) > M`` truncates the last groups at row M (see ``validation``).
    ``precision``: as for ``jax.lax.dot`` (see ``moe_ops.precision.kernel_precision`` for what each backend runs).
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
    precision = precision_lib.kernel_precision(precision, impl)
    if out is None:
        out = _gmm(lhs, rhs, sizes, offset, bool(transpose_rhs), out_dtype, impl, precision)
    if existing_out is None:
        return out
    keep = ~local_row_mask(sizes, offset, rhs.shape[0], lhs.shape[0])
    return jnp.where(keep[:, None], existing_out, out)


@validation.named_op
@on_explicit_axes(lambda spec, a: P(None, spec("lhs", 1), spec("rhs", 1)))
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
    precision = precision_lib.kernel_precision(precision, impl)
    return _tgmm(lhs, rhs, sizes, offset, num_groups, out_dtype, impl, precision)
