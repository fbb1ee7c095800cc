"""Per-expert biases of the SwiGLU experts (gpt-oss's, MaxText's ``mlp_bias``): ``b_gate`` / ``b_up`` [E,F] are
added to the gate / up projections and ``b_down`` [E,D] to the down projection, before the routing weight:

    y[t] = sum_k w[t,k] * ((act(x[t] @ w_gate[e] + b_gate[e]) * (x[t] @ w_up[e] + b_up[e])) @ w_down[e] + b_down[e])

with ``e = expert_ids[t,k]``. Each is optional. On the fused path with the one-kernel SwiGLU (``moe_ops.swiglu``)
b_gate / b_up are the initial values of the kernel's f32 accumulators (no [M, F] pass); elsewhere they are added in
XLA around the grouped matmuls (``rows``: one [M, N] elementwise pass each, in the layer's dtype). Their gradients
are per-group f32 sums of the projections' cotangents, computed as TGMMs against a column of ones (fixed order,
deterministic). Rows of non-local groups and rows beyond ``sum(group_sizes)`` get no bias. b_down is added in XLA
(``rows``; ``combine`` on the fused path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import groups
from moe_ops import backend, validation, vma
from moe_ops.gmm import _gmm
from moe_ops.swiglu import token_order_tgmm

__all__ = ["NAMES", "check", "rows", "combine"]

NAMES = ("b_gate", "b_up", "b_down")


def check(b_gate, b_up, b_down, w_gate, w_down) -> None:
    """Each given bias is a float array [E,F] (b_gate / b_up) or [E,D] (b_down), E / F / D from the weights."""
    e, d, f = w_gate.shape
    for name, b, want in (("b_gate", b_gate, (e, f)), ("b_up", b_up, (e, f)), ("b_down", b_down, (e, d))):
        if b is None:
            continue
        validation.float_array(name, b, 2)
        if tuple(b.shape) != want:
            dims = "[E,F]" if name != "b_down" else "[E,D]"
            raise ValueError(f"{name} must be {dims}={want} to match w_gate [E,D,F] {tuple(w_gate.shape)}, got "
                             f"{tuple(b.shape)}")


def rows(bias, group_sizes, num_rows, dtype, group_offset=None, implementation=None):
    """bias [G_local, N] -> [num_rows, N] in ``dtype``: each row of a local group gets its group's bias; rows of
    other groups and rows beyond ``sum(group_sizes)`` get zeros (selected, so a NaN bias reaches no other row).
    Forward: an XLA gather that fuses into the add. Derivative: the same map as a grouped matmul of a column of ones
    by ``bias[:, None, :]`` (on ``implementation``'s backend), so the gradient is that GMM's transpose, a TGMM of
    the ones against the cotangent rows: fixed-order per-group sums (deterministic, no [M, N] scatter-add operand);
    forward-mode autodiff works too."""
    empty = validation.zeros_if_empty((num_rows, bias.shape[1]), dtype, (num_rows, *bias.shape), bias, group_sizes)
    if empty is not None:   # no rows, no columns or no local group: no grouped matmul gets a zero-size dimension
        return empty
    sizes = validation.clamp_group_sizes(group_sizes, num_rows)   # the rows the grouped matmuls give to groups
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    return _rows(bias, sizes, offset, num_rows, jnp.dtype(dtype), backend.choose(implementation))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _rows(bias, sizes, offset, num_rows, dtype, impl):
    return groups.group_rows(bias, sizes, offset, num_rows, dtype)


@_rows.defjvp
def _rows_jvp(num_rows, dtype, impl, primals, tangents):
    bias, sizes, offset = primals
    ones, rhs, sizes, offset = vma.match_vma(jnp.ones((num_rows, 1), dtype), tangents[0].astype(dtype)[:, None, :],
                                             sizes, offset)
    return _rows(bias, sizes, offset, num_rows, dtype, impl), _gmm(ones, rhs, sizes, offset, False, dtype, impl)


def combine(b_down, weights, expert_ids, group_sizes=None, sort_idx=None, *, dtype=None, implementation=None):
    """``sum_k weights[t,k] * b_down[expert_ids[t,k]]`` [T, D] f32: the down bias in token order, for the fused
    path whose down GMM scatters the weighted rows itself. Copies with an id outside [0, E) add nothing.
    ``group_sizes`` / ``sort_idx``: ``sort_by_expert``'s of ``expert_ids``; ``dtype``: the layer's, in which the
    cotangent arrives. With them the gradient of b_down is one TGMM of the sorted routing weights [M, 1] against
    the cotangent's rows read in token order (fixed-order per-expert sums, no scatter-add; the weights' is a per-copy
    dot); without them, XLA's autodiff of the gather (a scatter-add)."""
    ids = validation.expert_ids_int32(expert_ids, b_down.shape[0])
    if group_sizes is None or sort_idx is None:
        return _weighted_rows(b_down, weights, ids)
    dtype = jnp.dtype(b_down.dtype if dtype is None else dtype)
    # typed like the routing inside a user's shard_map: a replicated b_down's cotangent is then psum'd (moe_ops.vma)
    b_down, weights, ids, group_sizes, sort_idx = vma.match_vma(b_down, weights, ids, group_sizes, sort_idx)
    return _combine(b_down, weights, ids, group_sizes, sort_idx, dtype, backend.choose(implementation))


def _picked(b_down, weights, ids):
    """(kept weights [T, k] f32, the copies' bias rows [T, k, D] f32, zero for dropped copies)."""
    e = b_down.shape[0]
    kept = (ids >= 0) & (ids < e)
    picked = jnp.take(b_down.astype(jnp.float32), jnp.clip(ids, 0, e - 1), axis=0)
    return jnp.where(kept, weights.astype(jnp.float32), 0.0), jnp.where(kept[..., None], picked, 0.0)


def _weighted_rows(b_down, weights, ids):
    w, picked = _picked(b_down, weights, ids)
    return jnp.einsum("tk,tkd->td", w, picked, precision="highest")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _combine(b_down, weights, ids, group_sizes, sort_idx, dtype, impl):
    return _weighted_rows(b_down, weights, ids)


def _combine_fwd(b_down, weights, ids, group_sizes, sort_idx, dtype, impl):
    out = _combine(b_down, weights, ids, group_sizes, sort_idx, dtype, impl)
    return out, (b_down, weights, ids, group_sizes, sort_idx)


def _combine_bwd(dtype, impl, residuals, dy):
    b_down, weights, ids, group_sizes, sort_idx = residuals
    w, picked = _picked(b_down, weights, ids)
    dweights = jnp.einsum("td,tkd->tk", dy.astype(jnp.float32), picked, precision="highest")
    sizes = validation.clamp_group_sizes(group_sizes, sort_idx.shape[0])
    w_sorted = w.reshape(-1)[sort_idx][:, None].astype(dtype)     # [M, 1]; dropped copies sort last with weight 0
    db = token_order_tgmm(w_sorted, dy.astype(dtype), sizes, jnp.zeros((1,), jnp.int32), sort_idx, ids.shape[1],
                          b_down.shape[0], jnp.float32, False, impl)
    return db[:, 0, :].astype(b_down.dtype), dweights.astype(weights.dtype), None, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)
