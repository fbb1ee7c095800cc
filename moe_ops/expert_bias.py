"""Per-expert biases of the SwiGLU experts (gpt-oss's, MaxText's ``mlp_bias``): ``b_gate`` / ``b_up`` [E,F] are
added to the gate / up projections and ``b_down`` [E,D] to the down projection, before the routing weight:

    y[t] = sum_k w[t,k] * ((act(x[t] @ w_gate[e] + b_gate[e]) * (x[t] @ w_up[e] + b_up[e])) @ w_down[e] + b_down[e])

with ``e = expert_ids[t,k]``. Each is optional. On the fused path with the one-kernel SwiGLU (``moe_ops.swiglu``)
b_gate / b_up are the initial values of the kernel's f32 accumulators (no [M, F] pass) and their gradients per-group
f32 sums of the backward's dgate / dup; elsewhere they are added in XLA around the grouped matmuls (one [M, N]
elementwise pass each, in the layer's dtype), with XLA's gradients. Rows of non-local groups and rows beyond
``sum(group_sizes)`` get no bias. b_down is added in XLA (``rows``; ``combine`` on the fused path).
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels import groups
from moe_ops import validation

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


def rows(bias, group_sizes, num_rows, dtype, group_offset=None):
    """bias [G_local, N] -> [num_rows, N] in ``dtype``: each row of a local group gets its group's bias; rows of
    other groups and rows beyond ``sum(group_sizes)`` get zeros (selected, so a NaN bias reaches no other row)."""
    sizes = validation.clamp_group_sizes(group_sizes, num_rows)   # the rows the grouped matmuls give to groups
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    return groups.group_rows(bias, sizes, offset, num_rows, dtype)


def combine(b_down, weights, expert_ids):
    """``sum_k weights[t,k] * b_down[expert_ids[t,k]]`` [T, D] f32: the down bias in token order, for the fused
    path whose down GMM scatters the weighted rows itself. Copies with an id outside [0, E) add nothing."""
    e = b_down.shape[0]
    kept = (expert_ids >= 0) & (expert_ids < e)
    picked = jnp.take(b_down.astype(jnp.float32), jnp.clip(expert_ids, 0, e - 1), axis=0)   # [T, k, D]
    w = jnp.where(kept, weights.astype(jnp.float32), 0.0)
    return jnp.einsum("tk,tkd->td", w, jnp.where(kept[..., None], picked, 0.0), precision="highest")
