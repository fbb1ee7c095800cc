"""The gated activation (``kernels.activation.GatedActivation``) in Triton epilogues, in f32.

A spec reaches a kernel as four constexprs (``act_params``): ``ACT`` (0 silu, 1 gelu (tanh form, = ``jax.nn.gelu``),
2 relu), ``ALPHA`` (silu's sigmoid scale), ``LIMIT`` (0.0: no clamp) and ``UP_OFFSET``. The plain activations
compile to exactly the unclamped, unscaled math (every extra term sits behind a constexpr branch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.activation import resolve

__all__ = ["ACT_CODES", "act_params", "clamp", "gated", "gated_parts"]

ACT_CODES = {"silu": 0, "gelu": 1, "relu": 2}


def act_params(activation) -> dict:
    """The kernel constexprs of ``activation`` (a name or a ``GatedActivation``)."""
    spec = resolve(activation)
    return dict(ACT=ACT_CODES[spec.name], ALPHA=spec.alpha, LIMIT=spec.limit or 0.0, UP_OFFSET=spec.up_offset)


@triton.jit
def clamp(gate, up, LIMIT: tl.constexpr):
    """``(min(gate, LIMIT), clip(up, -LIMIT, LIMIT))`` (no-ops for LIMIT 0.0); NaN stays NaN. Idempotent, so the
    backward's masks read the same from raw or clamped projections."""
    if LIMIT > 0.0:
        gate = tl.minimum(gate, LIMIT, propagate_nan=tl.PropagateNan.ALL)
        up = tl.clamp(up, -LIMIT, LIMIT, propagate_nan=tl.PropagateNan.ALL)
    return gate, up


@triton.jit
def _offset(u, UP_OFFSET: tl.constexpr):
    if UP_OFFSET != 0.0:   # not ``u + 0.0``: without fast-math the compiler keeps that add
        u = u + UP_OFFSET
    return u


@triton.jit
def _act(g, ACT: tl.constexpr, ALPHA: tl.constexpr):
    if ACT == 0:
        if ALPHA != 1.0:
            a = g * tl.sigmoid(ALPHA * g)
        else:
            a = g * tl.sigmoid(g)
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)   # sqrt(2 / pi) * (...)
        a = g * tl.sigmoid(2.0 * inner)  # = 0.5 * g * (1 + tanh(inner)), tanh(z) = 2 sigmoid(2z) - 1
    else:
        a = tl.maximum(g, 0.0)
    return a


@triton.jit
def gated(g, u, ACT: tl.constexpr, ALPHA: tl.constexpr, UP_OFFSET: tl.constexpr):
    """``h = act(g) * (u + UP_OFFSET)`` of f32 tiles ``g`` / ``u`` already through ``clamp`` (the forward clamps its
    accumulators in place: they are also the saved residuals)."""
    return _act(g, ACT, ALPHA) * _offset(u, UP_OFFSET)


@triton.jit
def gated_parts(gate, up, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, UP_OFFSET: tl.constexpr):
    """``(a, da, u, a_du)`` of f32 tiles with ``h = a * u``, ``dh/dgate = da * u``, ``dh/dup = a_du`` (the
    ``a * du`` of ``moe_ops.reference.activation_parts``, without a mask tile: zero gradient at and beyond a
    clamp's bound; ``a`` itself without a limit). ``gate`` / ``up`` raw or already clamped."""
    g, u = clamp(gate, up, LIMIT)
    if ACT == 0:
        s = tl.sigmoid(ALPHA * g)
        a, da = g * s, s * (1.0 + ALPHA * g * (1.0 - s))
    elif ACT == 1:
        th = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) - 1.0
        a = 0.5 * g * (1.0 + th)
        da = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    else:
        a, da = tl.maximum(g, 0.0), (g > 0.0).to(tl.float32)
    if LIMIT > 0.0:
        da = tl.where(g >= LIMIT, 0.0, da)
        a_du = tl.where((u >= LIMIT) | (u <= -LIMIT), 0.0, a)
    else:
        a_du = a
    return a, da, _offset(u, UP_OFFSET), a_du
