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
    sizes = validation.clamp_group_sizes(group_sizes, num_rows)   # the rows the grouped matmuls give to groups
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    return _rows(bias, sizes, offset, int(num_rows), jnp.dtype(dtype), backend.choose(implementation))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _rows(bias, sizes, offset, num_rows, dtype, impl):
    return groups.group_rows(bias, sizes, offset, num_rows, dtype)


@_rows.defjvp
def _rows_jvp(num_rows, dtype, impl, primals, tangents):
    bias, sizes, offset = primals
    ones, rhs, sizes, offset = vma.match_vma(jnp.ones((num_rows, 1), dtype), tangents[0].astype(dtype)[:, None, :],
                                             sizes, offset)
    return _rows(bias, sizes, offset, num_rows, dtype, impl), _gmm(ones, rhs, sizes, offset, False, dtype, impl)


def combine(b_down, weights, expert_ids):
    """``sum_k weights[t,k] * b_down[expert_ids[t,k]]`` [T, D] f32: the down bias in token order, for the fused
    path whose down GMM scatters the weighted rows itself. Copies with an id outside [0, E) add nothing."""
    e = b_down.shape[0]
    kept = (expert_ids >= 0) & (expert_ids < e)
    picked = jnp.take(b_down.astype(jnp.float32), jnp.clip(expert_ids, 0, e - 1), axis=0)   # [T, k, D]
    w = jnp.where(kept, weights.astype(jnp.float32), 0.0)
    return jnp.einsum("tk,tkd->td", w, jnp.where(kept[..., None], picked, 0.0), precision="highest")
