"""``ragged_dot`` / ``ragged_dot_general`` with ``jax.lax``'s signatures and semantics, run by this package's kernels.

The three modes of ``lax.ragged_dot_general`` (``g`` groups; ``b...`` batch, ``m...`` / ``n...`` free dims):

1. ragged non-contracting lhs dim -> ``gmm``: ``[b...,m...,k...] x [g,b...,k...,n...] -> [b...,m...,n...]``.
2. ragged contracting dim -> ``tgmm``: ``[b...,m...,k...] x [b...,k...,n...] -> [g,b...,m...,n...]``.
3. ragged batch dim -> an ordinary batched ``dot_general`` (each batch row meets its own rhs slice, so the grouping
   changes nothing; this is how lax defines it too).

Operands are transposed to ``[rows, K]`` / ``[G, K, N]`` (or ``[rows, M] / [rows, N]`` for mode 2). Free dims inner
to the ragged dim (and, with a 1-D ``group_sizes``, outer ones too) fold into rows, scaling ``group_sizes`` by the
fold, so one kernel call covers them. Batch dims of both operands, and group sizes that differ along outer dims, are
``jax.vmap``-ed (on the Triton backend that needs its batching rule).

Beyond lax: ``group_offset`` (which lax 0.10 rejects: ``NotImplementedError`` for an int, ``TypeError`` for an
array) is supported in mode 1 with ``gmm``'s meaning: rhs holds ``G_local <= g`` groups, row block ``i`` uses
``rhs[i - group_offset]`` and rows of non-local groups come out as zeros. Negative group sizes, undefined in lax,
count as zero here.

Operands of a dtype no kernel takes (integers such as int8 with ``preferred_element_type=int32``, float8 alone or
mixed with other floats, float64), and an integer ``preferred_element_type``, run ``jax.lax.ragged_dot_general``
itself, with lax's semantics (no ``group_offset``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_ops.gmm import gmm, tgmm
from moe_ops import backend, validation
from moe_ops.sharding import explicit_mesh, on_explicit_axes

__all__ = ["ragged_dot", "ragged_dot_general", "RaggedDotDimensionNumbers"]

RaggedDotDimensionNumbers = jax.lax.RaggedDotDimensionNumbers
BASIC_DIMENSION_NUMBERS = RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [1]), ([], [])),
                                                    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


@validation.named_op
def ragged_dot(lhs, rhs, group_sizes, precision=None, preferred_element_type=None, group_offset=None,
               out_sharding=None, *, implementation=None):
    """``jax.lax.ragged_dot``: lhs [m,k], rhs [g,k,n], group_sizes [g] -> [m,n]; rows at or beyond
    ``sum(group_sizes)`` are zero. ``implementation`` picks the backend as for ``moe_ops.gmm``."""
    return ragged_dot_general(lhs, rhs, group_sizes, BASIC_DIMENSION_NUMBERS, precision, preferred_element_type,
                              group_offset, out_sharding, implementation=implementation)


def _out_spec(spec, a):
    """dot_general's output order, each dim with the spec of the operand dim it comes from: lhs batch, lhs free, rhs
    free (rhs group dim dropped); the group dim that a ragged contraction puts first is replicated."""
    lhs, rhs, dims = a["lhs"], a["rhs"], a["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    groups = [None] if dims.lhs_ragged_dimensions[0] in lc else []
    lfree, rfree = _free(lhs.ndim, lc, lb), _free(rhs.ndim, rc, rb, dims.rhs_group_dimensions)
    return P(*groups, *(spec("lhs", d) for d in list(lb) + lfree), *(spec("rhs", d) for d in rfree))


@validation.named_op
@on_explicit_axes(_out_spec)
def ragged_dot_general(lhs, rhs, group_sizes, ragged_dot_dimension_numbers, precision=None,
                       preferred_element_type=None, group_offset=None, out_sharding=None, *, implementation=None):
    """``jax.lax.ragged_dot_general`` (see the module docstring for the modes and what ``group_offset`` means)."""
    dims = ragged_dot_dimension_numbers
    if not isinstance(dims, RaggedDotDimensionNumbers):
        raise TypeError("ragged_dot_dimension_numbers must be a jax.lax.RaggedDotDimensionNumbers, "
                        f"got {type(dims).__name__}")
    if out_sharding is not None:
        raise NotImplementedError("out_sharding is not supported by moe_ops.ragged_dot(_general); shard the "
                                  "operands (or reshard the result) instead")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not hasattr(group_sizes, "dtype") or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        got = getattr(group_sizes, "dtype", type(group_sizes).__name__)
        raise TypeError(f"group_sizes must be an integer array, got {got}")
    backend.choose(implementation)  # a bad name raises on every path, the lax one included
    mode, ragged = _mode(lhs, dims)
    lax_sharding = _lax_out_sharding(lhs, rhs, group_sizes)
    out = _lax_out_aval(lhs, rhs, group_sizes, dims, precision, preferred_element_type, group_offset, mode,
                        lax_sharding)
    kw = dict(precision=precision, preferred_element_type=out.dtype, implementation=implementation)
    in_dtype = _kernel_input_dtype(lhs.dtype, rhs.dtype, out.dtype)
    if in_dtype is None:  # integers, float8, float64, an integer result: lax's own op (no kernel takes them)
        if group_offset is not None:
            raise ValueError(f"group_offset needs float32 / bfloat16 / float16 operands (the kernels' dtypes), got "
                             f"lhs {lhs.dtype}, rhs {rhs.dtype}")
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=precision,
                                          preferred_element_type=preferred_element_type, out_sharding=lax_sharding)
    lhs, rhs = lhs.astype(in_dtype), rhs.astype(in_dtype)
    if mode == "batch":
        if group_offset is not None:
            raise ValueError("group_offset is only supported when the lhs ragged dimension is non-contracting "
                             "(ragged_dot / gmm mode)")
        return jax.lax.dot_general(lhs, rhs, dims.dot_dimension_numbers, precision=precision,
                                   preferred_element_type=out.dtype)
    if mode == "noncontracting":
        result = _ragged_rows(lhs, rhs, group_sizes, dims, ragged, group_offset, kw)
    else:
        if group_offset is not None:
            raise ValueError("group_offset is only supported when the lhs ragged dimension is non-contracting "
                             "(ragged_dot / gmm mode), not for a ragged contracting dimension")
        result = _ragged_contraction(lhs, rhs, group_sizes, dims, ragged, kw)
    assert result.shape == out.shape, (result.shape, out.shape)
    return result


def _kernel_input_dtype(lhs_dtype, rhs_dtype, out_dtype):
    """The promoted float dtype the kernels multiply in, or None when lax must run the product: operands or result
    of a dtype no kernel takes, or operands JAX does not promote to one another (float8 mixes, which lax accepts)."""
    try:
        in_dtype = validation.standard_promotion(lhs_dtype, rhs_dtype)   # lax's rule, in strict mode too
    except jax.dtypes.TypePromotionError:  # e.g. float8_e4m3fn x bfloat16 (lax accepts the pair)
        return None
    return in_dtype if validation.is_kernel_float(in_dtype) and validation.is_kernel_float(out_dtype) else None


def _mode(lhs, dims):
    if len(dims.lhs_ragged_dimensions) != 1:
        raise TypeError("ragged_dot_general expects exactly one lhs ragged dimension: "
                        f"ragged_dot_dimension_numbers.lhs_ragged_dimensions={dims.lhs_ragged_dimensions}")
    ragged = dims.lhs_ragged_dimensions[0]
    (lc, _), (lb, _) = dims.dot_dimension_numbers
    if not 0 <= ragged < lhs.ndim:
        raise TypeError("ragged_dot_general requires lhs ragged dimension numbers to be nonnegative and less than "
                        f"the number of axes of the lhs value: ragged_dot_dimension_numbers.lhs_ragged_dimensions="
                        f"{ragged} for lhs of rank {lhs.ndim}")
    return ("contracting" if ragged in lc else "batch" if ragged in lb else "noncontracting"), ragged


def _lax_out_sharding(*operands):
    """``out_sharding`` for lax's ragged_dot_general, which has no Explicit sharding rule: replicated where an
    Explicit mesh holds the operands unsharded (sharded ones run on Auto axes, ``on_explicit_axes``), else None."""
    mesh = explicit_mesh(*operands)
    return None if mesh is None else NamedSharding(mesh, P())


def _lax_out_aval(lhs, rhs, group_sizes, dims, precision, preferred_element_type, group_offset, mode,
                  out_sharding=None):
    """The result shape / dtype lax defines (its shape rule raises lax's own errors for bad dimension numbers).
    With ``group_offset`` in mode 1 the rhs may hold fewer groups than ``group_sizes``; checked here instead."""
    rhs_like = rhs
    if mode == "noncontracting" and group_offset is not None and len(dims.rhs_group_dimensions) == 1:
        gdim, num_groups = dims.rhs_group_dimensions[0], group_sizes.shape[-1]
        if 0 <= gdim < rhs.ndim and rhs.shape[gdim] > num_groups:
            raise ValueError(f"rhs has {rhs.shape[gdim]} groups (dimension {gdim}) but group_sizes only "
                             f"{num_groups}: with group_offset the rhs holds G_local <= G groups")
        shape = list(rhs.shape)
        shape[gdim] = num_groups if 0 <= gdim < rhs.ndim else shape[gdim]
        rhs_like = jax.ShapeDtypeStruct(tuple(shape), rhs.dtype)
    struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    return jax.eval_shape(lambda a, b, s: jax.lax.ragged_dot_general(
        a, b, s, dims, precision=precision, preferred_element_type=preferred_element_type, out_sharding=out_sharding),
        struct(lhs), struct(rhs_like), struct(group_sizes))


def _free(ndim, *used):
    taken = {d for ds in used for d in ds}
    return [d for d in range(ndim) if d not in taken]


def _prod(shape, axes):
    return math.prod(shape[a] for a in axes)


def _vmapped(fn, lhs, rhs, sizes, rhs_levels, implementation):
    """``fn(lhs, rhs, sizes)`` vmapped over lhs's and sizes' leading axes; rhs carries only the first ``rhs_levels``.

    ``lax.ragged_dot``'s batching rule (the xla backend) needs every operand batched at axis 0, so there the rhs is
    broadcast over the remaining levels (only group sizes that differ along outer free dims of lhs need that)."""
    levels = lhs.ndim - 2
    if rhs_levels < levels and backend.resolve(implementation) == "xla":
        rhs = jnp.broadcast_to(rhs[(slice(None),) * rhs_levels + (None,) * (levels - rhs_levels)],
                               lhs.shape[:levels] + rhs.shape[rhs_levels:])
        rhs_levels = levels
    for level in reversed(range(levels)):
        fn = jax.vmap(fn, in_axes=(0, 0 if level < rhs_levels else None, 0))
    return fn(lhs, rhs, sizes)


def _sizes(group_sizes, lead_shape, scale, limit):
    """Group sizes as ``lead_shape + (g,)`` (1-D sizes broadcast: batching rules want every operand batched), times
    the row fold. Each size is first clipped to ``[-1, limit]`` (``limit`` = the ragged dim's length) in its own
    dtype, so neither the cast to int32 (uint32 ``2**32 - 1``, int64 under x64) nor the fold can wrap; a negative
    size stays negative (zero rows for ``gmm`` / ``tgmm``, reported by ``checked()``). NumPy sizes are clipped on
    the host, before JAX's int32 copy."""
    low = -1 if jnp.issubdtype(group_sizes.dtype, jnp.signedinteger) else 0
    if isinstance(group_sizes, np.ndarray):  # host sizes at full width (NumPy int64 would wrap on the device copy)
        group_sizes = np.clip(group_sizes, low, limit).astype(np.int32)
    elif jnp.dtype(group_sizes.dtype).itemsize < 4:
        group_sizes = group_sizes.astype(jnp.int32)
    sizes = jnp.clip(group_sizes, low, limit).astype(jnp.int32) * scale
    return jnp.broadcast_to(sizes.reshape(lead_shape + (sizes.shape[-1],)) if sizes.ndim > 1 else sizes,
                            lead_shape + (sizes.shape[-1],))


def _ragged_rows(lhs, rhs, group_sizes, dims, ragged, group_offset, kw):
    """Mode 1 -> gmm over ``[rows, K] x [G, K, N]``; out axes ordered as dot_general's (batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    gdim = dims.rhs_group_dimensions[0]
    lfree, rfree = _free(lhs.ndim, lc, lb), _free(rhs.ndim, rc, rb, [gdim])
    outer, inner = lfree[:lfree.index(ragged)], lfree[lfree.index(ragged) + 1:]
    shared = group_sizes.ndim == 1          # the same sizes for every batch / outer index: fold outer dims into rows
    row_axes = [ragged] + outer + inner if shared else [ragged] + inner
    lead = list(lb) + ([] if shared else outer)
    bshape = tuple(lhs.shape[a] for a in lb)
    lead_shape = bshape + (() if shared else tuple(lhs.shape[a] for a in outer))
    num_rows, k = _prod(lhs.shape, row_axes), _prod(lhs.shape, lc)
    n = _prod(rhs.shape, rfree)
    lhs2 = jnp.transpose(lhs, lead + row_axes + list(lc)).reshape(lead_shape + (num_rows, k))
    rhs2 = jnp.transpose(rhs, list(rb) + [gdim] + list(rc) + rfree).reshape(bshape + (rhs.shape[gdim], k, n))
    sizes = _sizes(group_sizes, lead_shape, _prod(lhs.shape, row_axes[1:]), lhs.shape[ragged])
    fn = lambda a, b, s: gmm(a, b, s, group_offset=group_offset, **kw)
    out = _vmapped(fn, lhs2, rhs2, sizes, len(lb), kw["implementation"])   # lead_shape + (num_rows, n)
    out = out.reshape(lead_shape + tuple(lhs.shape[a] for a in row_axes) + tuple(rhs.shape[a] for a in rfree))
    have = lead + row_axes                                          # lhs axes labelling out's leading dims
    want = list(lb) + lfree
    perm = [have.index(a) for a in want] + list(range(len(have), out.ndim))
    return jnp.transpose(out, perm)


def _ragged_contraction(lhs, rhs, group_sizes, dims, ragged, kw):
    """Mode 2 -> tgmm over ``[rows, M] x [rows, N] -> [G, M, N]``; out is ``[g, batch..., lhs free..., rhs free...]``.
    Group sizes that differ along outer contracting dims give one tgmm per index, summed (in f32)."""
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    i = list(lc).index(ragged)
    lfree, rfree = _free(lhs.ndim, lc, lb), _free(rhs.ndim, rc, rb)
    shared = group_sizes.ndim == 1
    l_rows = [ragged] + list(lc[:i]) + list(lc[i + 1:]) if shared else [ragged] + list(lc[i + 1:])
    r_rows = [rc[i]] + list(rc[:i]) + list(rc[i + 1:]) if shared else [rc[i]] + list(rc[i + 1:])
    l_lead = list(lb) + ([] if shared else list(lc[:i]))
    r_lead = list(rb) + ([] if shared else list(rc[:i]))
    bshape = tuple(lhs.shape[a] for a in lb)
    lead_shape = tuple(lhs.shape[a] for a in l_lead)
    num_rows, m, n = _prod(lhs.shape, l_rows), _prod(lhs.shape, lfree), _prod(rhs.shape, rfree)
    lhs2 = jnp.transpose(lhs, l_lead + l_rows + lfree).reshape(lead_shape + (num_rows, m))
    rhs2 = jnp.transpose(rhs, r_lead + r_rows + rfree).reshape(lead_shape + (num_rows, n))
    sizes = _sizes(group_sizes, lead_shape, _prod(lhs.shape, l_rows[1:]), lhs.shape[ragged])
    out_dtype = kw["preferred_element_type"]
    summed = len(l_lead) > len(lb)
    kw = dict(kw, preferred_element_type=jnp.float32 if summed else out_dtype)
    fn = lambda a, b, s: tgmm(a, b, s, **kw)
    levels = len(l_lead)
    out = _vmapped(fn, lhs2, rhs2, sizes, levels, kw["implementation"])
    if summed:                                                      # sum over the outer contracting indices
        out = out.sum(axis=tuple(range(len(bshape), levels))).astype(out_dtype)
    g = group_sizes.shape[-1]
    out = out.reshape(bshape + (g,) + tuple(lhs.shape[a] for a in lfree) + tuple(rhs.shape[a] for a in rfree))
    return jnp.moveaxis(out, len(bshape), 0)
