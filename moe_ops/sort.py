"""Public token permutation ops (expert order and back) with VJPs that need no scatter-add.

* ``permute``:  ``x_sorted[i] = x[sort_idx[i] // k]``.  ``dx = combine_rows(dx_sorted, sort_idx, ones)``.
* ``unpermute``: ``out[t] = sum_j w[t,j] * y[inverse[t*k+j]]``.
  ``dy = gather_rows(dout, sort_idx, k, row_weights=w)`` (a weighted permute) and
  ``dw[t,j] = <dout[t], y[inverse[t*k+j]]>`` (``combine_weight_grad``); these two and the combine are custom VJPs
  of each other's kernels, so every derivative order runs the same three kernels.

Valid-prefix form (expert parallelism, worst-case-sized buffers): with ``n_valid`` (an int32 device scalar), only
sorted rows ``i < n_valid`` exist. ``permute`` writes zeros to rows ``>= n_valid`` (and reads nothing for them);
``unpermute`` ignores ``y_sorted`` rows ``>= n_valid`` and the weights of their slots (they contribute zero and get
zero gradient, even when they hold NaN / Inf: the kernels select or mask them away, never multiply them by zero;
``tests/test_nonfinite.py``). The two are
adjoint with the same ``n_valid``, so the VJPs above carry it unchanged. Ids that should not be routed are given an
out-of-range expert id: they sort after every valid row, so ``n_valid = sum(group_sizes)`` covers exactly the
routed copies.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_ops import backend, primitives, validation
from moe_ops.sharding import on_explicit_axes
from moe_ops import vma

__all__ = ["sort_by_expert", "permute", "unpermute"]


def _n(rest):
    """The optional trailing ``n_valid`` operand (``None``: every row is valid)."""
    return rest[0] if rest else None


def _define(name, n_linear, ranks, kernel, shape, transpose):
    return primitives.define(primitives.Spec(name, n_linear, ranks, kernel, shape, transpose))


# The gather (``permute``'s row copy), the combine and its two adjoints. The last three form a closed family of
# bilinear primitives, each one's transpose made of the other two, so every order of derivative, forward or reverse,
# runs the same kernels (``k`` = slots per token, static; ``pos`` = inverse of s; n = optional ``n_valid``):
#   _gather(x)[i]             = x[s_i // k]                       (gather_rows; 0 past n_valid)
#   _combine(y, w)[t]         = sum_j w[t,j] * y[pos(t,j)]       (combine_rows)
#   _weighted_gather(x, w)[i] = w.flat[s_i] * x[s_i // k]        (gather_rows with row weights; 0 past n_valid)
#   _weight_grad(d, y)[t,j]   = <d[t], y[pos(t,j)]>              (combine_weight_grad, f32)
_gather_p = _define(
    "moe_gather_rows", 1, (2, 1, 1),
    lambda ops, x, s, *n, k: ops.gather_rows(x, s, k, n_valid=_n(n)),
    lambda x, s, *n, k: ((s.shape[0], x.shape[1]), x.dtype),
    lambda ct, ops_, wanted, *, k, impl, nb: (_bind(_combine_p, ct, jnp.ones((ct.shape[-2] // k, k), jnp.float32),
                                                    *ops_[1:], impl=impl, nb=nb),))
_combine_p = _define(
    "moe_combine_rows", 2, (2, 2, 1, 1),
    lambda ops, y, w, s, *n: ops.combine_rows(y, s, w, n_valid=_n(n)),
    lambda y, w, s, *n: ((w.shape[0], y.shape[1]), y.dtype),
    lambda ct, ops_, wanted, *, impl, nb: (
        _bind(_weighted_gather_p, ct, *ops_[1:], impl=impl, nb=nb, when=wanted[0]),
        _bind(_weight_grad_p, ct, ops_[0], *ops_[2:], impl=impl, nb=nb, when=wanted[1])))
_weighted_gather_p = _define(
    "moe_weighted_gather_rows", 2, (2, 2, 1, 1),
    lambda ops, x, w, s, *n: ops.gather_rows(x, s, w.shape[1], row_weights=w, n_valid=_n(n)),
    lambda x, w, s, *n: ((s.shape[0], x.shape[1]), x.dtype),
    lambda ct, ops_, wanted, *, impl, nb: (
        _bind(_combine_p, ct, *ops_[1:], impl=impl, nb=nb, when=wanted[0]),
        _bind(_weight_grad_p, ops_[0], ct, *ops_[2:], impl=impl, nb=nb, when=wanted[1])))
_weight_grad_p = _define(
    "moe_combine_weight_grad", 2, (2, 2, 1, 1),
    lambda ops, d, y, s, *n: ops.combine_weight_grad(d, y, s, s.shape[0] // d.shape[0], n_valid=_n(n)),
    lambda d, y, s, *n: ((d.shape[0], s.shape[0] // d.shape[0]), jnp.float32),
    lambda ct, ops_, wanted, *, impl, nb: (
        _bind(_combine_p, ops_[1], ct, *ops_[2:], impl=impl, nb=nb, when=wanted[0]),
        _bind(_weighted_gather_p, ops_[0], ct, *ops_[2:], impl=impl, nb=nb, when=wanted[1])))


def _bind(prim, a, *rest, impl, nb, when=True, **params):
    """``primitives.bind(prim, a, *rest)``, or ``None`` unless ``when`` (a cotangent nobody asked for)."""
    if not when:
        return None
    return primitives.bind(prim, a, *rest, impl=impl, nb=nb, **params)


def _gather(x, sort_idx, n_valid, k, impl):
    """x [T,D] -> [T*k,D] rows ``x[sort_idx // k]`` (zeros past ``n_valid``), as one ``moe_gather_rows``."""
    return primitives.bind(_gather_p, *_operands(x, sort_idx, n_valid=n_valid), k=k, impl=impl)


def _combine(y, weights, sort_idx, n_valid, impl):
    """y [T*k,D], weights [T,k] -> [T,D] weighted combine, as one ``moe_combine_rows``."""
    return primitives.bind(_combine_p, *_operands(y, weights, sort_idx, n_valid=n_valid), impl=impl)


def _operands(*arrays, n_valid):
    """The primitive operands: ``arrays`` plus ``n_valid`` when given, all with one manual-axis type."""
    return vma.match_vma(*arrays, *(() if n_valid is None else (n_valid,)))


def _n_valid_array(n_valid):
    """``None`` (every row), a Python int or an integer scalar / shape-(1,) array -> None or int32 shape (1,)."""
    if n_valid is None:
        return None
    host = _host_int(n_valid)
    if host is not None:  # judged at full width: JAX's int32 copy of np.int64(2**33) would wrap to 0 rows
        return jnp.full((1,), min(max(host, 0), jnp.iinfo(jnp.int32).max), jnp.int32)
    value = jnp.asarray(n_valid)
    if not jnp.issubdtype(value.dtype, jnp.integer) or value.size != 1 or value.ndim > 1:
        raise TypeError(f"n_valid must be None or an integer scalar / shape-(1,) array, got {value.dtype}{value.shape}")
    if value.dtype != jnp.int32 and value.dtype.itemsize >= 4:   # saturate in its own dtype: no wrap (uint32 2**32-1)
        value = jnp.clip(value, 0, jnp.iinfo(jnp.int32).max)
    return value.reshape(1).astype(jnp.int32)


def _host_int(value):
    """A Python / NumPy integer scalar or shape-(1,) NumPy integer array as a Python int, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (np.integer, np.ndarray)) and np.asarray(value).dtype.kind in "iu" and np.size(value) == 1 \
            and np.ndim(value) <= 1:
        return int(np.asarray(value).reshape(()))
    return None


@validation.named_op
@on_explicit_axes(lambda spec, a: (P(), P(spec("expert_ids", 0))))
def sort_by_expert(expert_ids, num_experts, *, implementation=None):
    """expert_ids [T,k] int -> (group_sizes [E] int32, sort_idx [T*k] int32): ``permute`` without the row copy
    (stable in flat index within an expert; ids outside ``[0, E)`` sort last and are counted in no group)."""
    validation.int_array("expert_ids", expert_ids, 2)
    if not validation.is_static_int(num_experts) or not 1 <= num_experts < 2**31 - 1:
        raise ValueError(f"num_experts must be a static int in [1, 2**31 - 1) (ids and the dropped key E are int32), "
                         f"got {num_experts!r}")
    num_experts = int(num_experts)
    validation.check_expert_ids(expert_ids, num_experts)
    out = backend.ops(implementation).sort_by_expert(validation.expert_ids_int32(expert_ids, num_experts),
                                                     num_experts)
    # typed to vary like the ids inside a shard_map (a kernel call drops it): typed invariant, per-shard sizes made
    # every float they index look invariant too, and its cotangent was summed over shards before the transpose
    # applied this shard's groups (wrong expert-bias gradients on the Triton / Pallas backends)
    return tuple(vma.like(a, expert_ids) for a in out)


@validation.named_op
@on_explicit_axes(lambda spec, a: (P(spec("x", 0), spec("x", 1)), P(), P(spec("x", 0))))
def permute(x, expert_ids, num_experts, *, n_valid=None, implementation=None):
    """Sort token copies by expert: x [T,D], expert_ids [T,k] int ->
    (x_sorted [T*k,D], group_sizes [E] int32, sort_idx [T*k] int32), ``x_sorted[i] = x[sort_idx[i] // k]``, stable in
    flat index within an expert. Ids outside ``[0, E)`` are dropped: sorted last, counted in no group.
    With ``n_valid`` (device int scalar), rows ``i >= n_valid`` of x_sorted are zero (valid-prefix form)."""
    validation.float_array("x", x, 2)
    group_sizes, sort_idx = sort_by_expert(expert_ids, num_experts, implementation=implementation)
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids must be [T, k] with T={x.shape[0]} (x is {tuple(x.shape)}), "
                         f"got {tuple(expert_ids.shape)}")
    impl = backend.choose(implementation)
    t, k = expert_ids.shape
    x_sorted = validation.zeros_if_empty((t * k, x.shape[1]), x.dtype, (t * k, x.shape[1]), x)
    if x_sorted is not None:
        return x_sorted, group_sizes, sort_idx
    x_sorted = _gather(x, sort_idx, _n_valid_array(n_valid), k, impl)
    return x_sorted, group_sizes, sort_idx


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("weights", 0), spec("y_sorted", 1)))
def unpermute(y_sorted, sort_idx, weights, *, n_valid=None, implementation=None):
    """Weighted top-k combine back to token order: y_sorted [T*k,D], sort_idx [T*k], weights [T,k] -> [T,D],
    ``out[t] = sum_j weights[t,j] * y_sorted[position of flat index t*k+j]``, f32 accumulation, y's dtype.
    ``sort_idx`` must be a permutation of ``[0, T*k)`` (as ``permute`` returns). With ``n_valid``, y rows
    ``>= n_valid`` are ignored, and so are the weights of their slots: whatever they hold (NaN, Inf, 3e38) they
    contribute exactly zero and get exactly zero gradient, and the weight gradient of such a slot is zero for any
    cotangent. Without ``n_valid`` every slot contributes ``weights[t,j] * row`` as written, so the zero row of a
    dropped copy (an id outside ``[0, E)``, sorted past ``sum(group_sizes)``) times an Inf / NaN weight is NaN:
    pass ``n_valid=sum(group_sizes)`` (or zero those weights, as ``fused_experts_ffn`` does) to drop them."""
    validation.float_array("y_sorted", y_sorted, 2)
    validation.sort_idx_array(sort_idx)
    validation.float_array("weights", weights, 2)
    y_sorted, weights = jnp.asarray(y_sorted), jnp.asarray(weights)  # NumPy ones: indexed by traced rows in the bwd
    if not (sort_idx.shape[0] == y_sorted.shape[0] == weights.shape[0] * weights.shape[1]):
        raise ValueError(f"y_sorted [T*k,D], sort_idx [T*k] and weights [T,k] disagree: y_sorted "
                         f"{tuple(y_sorted.shape)}, sort_idx {tuple(sort_idx.shape)}, weights {tuple(weights.shape)}")
    impl = backend.choose(implementation)
    shape = (weights.shape[0], y_sorted.shape[1])
    empty = validation.zeros_if_empty(shape, y_sorted.dtype, (sort_idx.shape[0], shape[1]), y_sorted, weights)
    if empty is not None:
        return empty
    return _combine(y_sorted, weights, sort_idx.astype(jnp.int32), _n_valid_array(n_valid), impl)
