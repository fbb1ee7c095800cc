"""Gate/up projections + gated activation in one Pallas grouped matmul (the optional ``swiglu_gmm`` of the
``moe_ops.backend`` interface; same contract as ``kernels.triton.swiglu``): ``h = act(x_i @ w_gate[g]) *
(x_i @ w_up[g])`` [M, F], ``gate`` / ``up`` not written to HBM (``swiglu_gmm_saved``: written too, from the same
accumulators, as the saved-mode backward's residuals).

The gmm schedule and grid ``(n, step, k)`` of ``kernels.pallas.gmm`` (invariants G1-G5), with the lhs rows gathered
from token-order x by ``kernels.pallas.fused.gathered_lhs`` (row DMAs into a VMEM tile through ``sort_idx // k``;
without ``sort_idx`` the identity row map). Each K step multiplies the one lhs block by the ``w_gate`` and the
``w_up`` block (as given, [G_local, K, F]) into two f32 accumulators; the store applies the activation in f32
(``gated``: silu, gelu (tanh form, = ``jax.nn.gelu``), relu, with a ``kernels.activation.GatedActivation``'s clamp,
alpha and offset; the optional gate / up biases [G_local, F] added first, from the step's group's [1, tn] blocks)
and writes only the group's rows of ``h`` (zeros for rows of no local group, as in gmm). VMEM (``FOOTPRINT``): the
two gathered x buffers, two double-buffered rhs blocks, two f32 accumulators (``fused_tiling`` halves the gmm
heuristic's ``tn`` when it is a multiple of 256, so the last two take one gmm tile's, then halves ``tn`` or ``tm``
until the call fits the budget).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.activation import resolve
from kernels.groups import bias_pair
from kernels.pallas.fused import (Footprint, _rhs_spec, accumulate, fused_call, fused_tiling, gather_scratch,
                                  gathered_lhs, store_group_rows)
from kernels.platform import tpu_or_interpret
from kernels.pallas.gmm import STORE, _has, gmm_schedule
from kernels.pallas.sort import _blocked
from kernels.shapes import require_static

__all__ = ["swiglu_gmm", "swiglu_gmm_saved", "gated", "gated_parts", "bias_specs", "with_bias"]


_GELU_C, _GELU_A = 0.7978845608028654, 0.044715   # sqrt(2 / pi) and the cubic coefficient of the tanh form


def _clamped(gate, up, spec):
    """f32 (g, u) after the spec's clamps (``kernels.activation``; NaN stays NaN), ``u`` not yet offset."""
    if spec.limit is not None:
        lim = spec.limit
        gate = jnp.where(gate >= lim, lim, gate)
        up = jnp.where(up >= lim, lim, jnp.where(up <= -lim, -lim, up))
    return gate, up


def _offset(u, spec):
    return u + spec.up_offset if spec.up_offset else u   # the plain activations: no add


def _scaled(g, spec):
    return g if spec.alpha == 1.0 else spec.alpha * g


def _act_and_grad(g, spec):
    """``(act(g), act'(g))`` of the clamped f32 ``g``."""
    if spec.name == "silu":
        sig = 1.0 / (1.0 + jnp.exp(-_scaled(g, spec)))
        return g * sig, sig * (1.0 + spec.alpha * g * (1.0 - sig))
    if spec.name == "gelu":
        c, a = _GELU_C, _GELU_A
        th = jnp.tanh(c * (g + a * g * g * g))
        return 0.5 * g * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * c * (1.0 + 3.0 * a * g * g)
    return jnp.maximum(g, 0.0), (g > 0).astype(jnp.float32)


def gated(gate, up, activation):
    """``h = act(clamped gate) * (clamped up + offset)`` of f32 blocks (``kernels.activation``'s spec)."""
    spec = resolve(activation)
    g, u = _clamped(gate, up, spec)
    if spec.name == "silu":
        act = g / (1.0 + jnp.exp(-_scaled(g, spec)))
    elif spec.name == "gelu":
        act = 0.5 * g * (1.0 + jnp.tanh(_GELU_C * (g + _GELU_A * g * g * g)))
    else:
        act = jnp.maximum(g, 0.0)
    return act * _offset(u, spec)


def gated_parts(gate, up, activation):
    """``(a, da, u, du)`` of f32 blocks with ``h = a * u``, ``dh/dgate = da * u``, ``dh/dup = a * du``, the
    derivative written out (= ``moe_ops.reference.activation_parts``)."""
    spec = resolve(activation)
    g, u = _clamped(gate, up, spec)
    a, da = _act_and_grad(g, spec)
    if spec.limit is None:
        return a, da, _offset(u, spec), jnp.ones_like(u)
    lim = spec.limit
    return a, jnp.where(g >= lim, 0.0, da), _offset(u, spec), jnp.where((u >= lim) | (u <= -lim), 0.0, 1.0)


FOOTPRINT = Footprint(sources=1, rhs=2, outs=1, accs=2)   # the gathered x, w_gate / w_up blocks, h, gate / up
FOOTPRINT_SAVED = Footprint(sources=1, rhs=2, outs=3, accs=2)  # and the gate / up output blocks


def act_and_grad(g, activation):
    """``(act(g), act'(g))`` of f32 ``g``, the derivative written out (= ``moe_ops.reference.activation_grad``)."""
    if activation == "silu":
        sig = 1.0 / (1.0 + jnp.exp(-g))
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    if activation == "gelu":
        c, a = _GELU_C, _GELU_A
        th = jnp.tanh(c * (g + a * g * g * g))
        return 0.5 * g * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * c * (1.0 + 3.0 * a * g * g)
    return jnp.maximum(g, 0.0), (g > 0).astype(jnp.float32)


def _swiglu_kernel(sched, x_hbm, idx_hbm, wg_ref, wu_ref, *refs, top_k, num_rows, tiles_k, k_rem, activation,
                   saved, has_bias):
    """h (and with ``saved`` gate / up, in h's dtype, from the same accumulators) of a gmm-schedule step; with
    ``has_bias`` the first two refs are the group's gate / up bias blocks [1, tn], added to the accumulators."""
    bias, refs = (refs[:2], refs[2:]) if has_bias else ((), refs)
    outs, (acc_g, acc_u, xtile, idx_smem, sems) = refs[:-5], refs[-5:]
    s, kb = pl.program_id(1), pl.program_id(2)
    lhs_ref, = gathered_lhs(sched, [x_hbm], idx_hbm, [xtile], idx_smem, sems, top_k=top_k, num_rows=num_rows,
                            tiles_k=tiles_k)
    accumulate(sched, [acc_g, acc_u], [(lhs_ref, wg_ref, False), (lhs_ref, wu_ref, False)], tiles_k=tiles_k,
               k_rem=k_rem)

    def values():
        gate, up = with_bias(acc_g[...], acc_u[...], bias)
        return [gated(gate, up, activation)] + ([gate, up] if saved else [])

    @pl.when((kb == tiles_k - 1) & _has(sched.flags[s], STORE))
    def _store():
        store_group_rows(sched, s, list(outs), values)


def _out_index(n, s, k, sched):
    return sched.m_tiles[s], n


def _bias_index(n, s, k, sched):
    return sched.groups[s], 0, n


def with_bias(gate, up, bias):
    """f32 gate / up blocks plus the step's bias blocks ``bias`` = (b_gate, b_up) refs [1, tn] (none when empty)."""
    if not bias:
        return gate, up
    return gate + bias[0][...].astype(jnp.float32), up + bias[1][...].astype(jnp.float32)


def bias_specs(t, b_gate, b_up):
    """(in_specs, operands) of the optional gate / up biases [G_local, F]: the step's group's [1, tn] block of
    each (as [G_local, 1, F]), or nothing."""
    if b_gate is None:
        return [], []
    return [pl.BlockSpec((None, 1, t.tn), _bias_index)] * 2, [b[:, None, :] for b in (b_gate, b_up)]


@functools.partial(jax.jit, static_argnames=("top_k", "activation", "out_dtype", "tiling", "interpret", "saved"))
def _swiglu(x, w_gate, w_up, group_sizes, group_offset, sort_idx, b_gate, b_up, *, top_k, activation, out_dtype,
            tiling, interpret, saved=False):
    (m,), kdim, (num_local, _, n) = sort_idx.shape, x.shape[1], w_gate.shape
    footprint = FOOTPRINT_SAVED if saved else FOOTPRINT
    t = fused_tiling(tiling, m, kdim, n, num_local, x.dtype, out_dtype, gather=True, footprint=footprint)
    tiles_k = pl.cdiv(kdim, t.tk)
    sched, num_steps = gmm_schedule(group_sizes, group_offset, num_local, m, t.tm, tiles_k)
    rhs_spec = _rhs_spec(t, False)
    bias_in, biases = bias_specs(t, b_gate, b_up)
    in_specs = [pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY), rhs_spec, rhs_spec, *bias_in]
    kernel = functools.partial(_swiglu_kernel, top_k=top_k, num_rows=m, tiles_k=tiles_k, k_rem=kdim % t.tk,
                               activation=activation, saved=saved, has_bias=b_gate is not None)
    scratch = gather_scratch(t, kdim, x.dtype)
    item = jnp.dtype(x.dtype).itemsize
    cost = pl.CostEstimate(flops=4 * m * kdim * n, transcendentals=m * n,
                           bytes_accessed=item * (m * kdim + 2 * num_local * kdim * n)
                           + jnp.dtype(out_dtype).itemsize * m * n)
    outs = 3 if saved else 1
    operands = [x, _blocked(sort_idx, t.tm), w_gate, w_up, *biases]
    return fused_call(kernel, sched, num_steps, tiles_k, t, operands, in_specs,
                      [pl.BlockSpec((t.tm, t.tn), _out_index)] * outs, [jax.ShapeDtypeStruct((m, n), out_dtype)] * outs,
                      scratch, interpret, cost, accs=2)


@tpu_or_interpret
def swiglu_gmm(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, activation, out_dtype,
               tiling=None, interpret=None, b_gate=None, b_up=None):
    """x [M,K] (or [T,K] in token order with ``sort_idx`` [M = T*k]), w_gate / w_up [G_local,K,F], clamped
    group_sizes [G], group_offset int32[1], optional b_gate / b_up [G_local,F] -> h [M,F] (``out_dtype``):
    ``act(x_i @ w_gate[g] + b_gate[g]) * (x_i @ w_up[g] + b_up[g])`` in f32; rows outside local groups are zero.
    ``tiling`` (``Tiling``: tn is the F block of each of the two projections) / ``interpret`` as for
    ``kernels.pallas.gmm.gmm``."""
    return _call(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, activation, out_dtype, tiling, interpret,
                 False, b_gate, b_up)[0]


@tpu_or_interpret
def swiglu_gmm_saved(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, activation, out_dtype,
                     tiling=None, interpret=None, b_gate=None, b_up=None):
    """``swiglu_gmm`` that also writes ``gate`` / ``up`` [M,F] (``out_dtype``, biases added, from the same
    accumulators) -> (h, gate, up): the residuals of ``kernels.pallas.swiglu_bwd.swiglu_down_bwd_saved``."""
    return _call(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, activation, out_dtype, tiling, interpret,
                 True, b_gate, b_up)


def _call(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, activation, out_dtype, tiling, interpret, saved,
          b_gate, b_up):
    activation = resolve(activation)
    m = x.shape[0] if sort_idx is None else sort_idx.shape[0]
    n = w_gate.shape[2]
    b_gate, b_up = bias_pair(b_gate, b_up, w_gate.shape[0], n)
    require_static("K / N of the Pallas grouped matmul", x.shape[1], n)
    if m == 0 or x.shape[1] == 0:
        return (jnp.zeros((m, n), out_dtype),) * 3
    if sort_idx is None:
        sort_idx, k = jnp.arange(m, dtype=jnp.int32), 1   # the identity row map
    return tuple(_swiglu(x, w_gate, w_up, group_sizes, group_offset, sort_idx.astype(jnp.int32), b_gate, b_up,
                         top_k=int(k), activation=activation, out_dtype=jnp.dtype(out_dtype), tiling=tiling,
                         interpret=interpret, saved=saved))
