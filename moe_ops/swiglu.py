"""Gate/up projections and the gated activation as one op: ``h = act(x @ w_gate[g]) * (x @ w_up[g])`` [M, F],
with ``gate`` / ``up`` [M, F] never stored; and the whole routed expert FFN on top of it (``moe_ffn``'s fused path).

``swiglu_gmm(x, w_gate, w_up, group_sizes, sort_idx=None)``: x [M,D] in expert order, or x [T,D] in token order with
``sort_idx`` [M = T*k] (the gather row map of ``moe_ops.fused``: row i reads ``x[sort_idx[i] // k]``); w_gate /
w_up [G_local,D,F] as given (no interleaved copy). Rows of non-local groups and rows beyond ``sum(group_sizes)``
are zero. The activation runs in f32 on the f32 accumulators (``reference.activate``'s activations). Custom VJP
with only the inputs as residuals: ``gate`` / ``up`` recomputed in x's dtype (two (gather-)GMMs), the activation's
VJP in XLA, ``dw_gate`` / ``dw_up`` by TGMM over the (gathered) x rows, ``dx = dgate @ w_gate^T + dup @ w_up^T``
taken back to token order by one scatter-GMM over both products with unit weights (fixed order, no scatter-add).
Optional gate / up biases ``b_gate`` / ``b_up`` [G_local,F] (gpt-oss): the kernels' f32 accumulators start from
them; their gradients are each local group's f32 sum of its dgate / dup rows (a TGMM against a column of ones).

``swiglu_ffn(x, w_gate, w_up, w_down, group_sizes, sort_idx, weights)`` -> [T,D]: ``swiglu_gmm`` with the gather,
then the weighted down projection back to token order (``scatter_gmm``). Custom VJP; residuals (``recompute``):

* default (speed): the inputs plus ``gate`` / ``up`` [M, F] in x's dtype, written by the forward kernel from its
  accumulators (``swiglu_gmm_saved``; the unfused path keeps those two, the permuted x and ``h``). No extra matmul.
* ``recompute=True`` (memory): the inputs only; the backward recomputes gate / up (one more gate/up GMM, about 22 %
  more layer flops): nothing of size [M, F] lives between forward and backward.

Either way the backward's TGMMs read x / dout in token order (``gather_tgmm``), so no gathered [M, D] copy is built.
Gathering x and dout once for plain TGMMs ran 0.7 ms faster at Qwen3-30B on an H200 but took the compiled peak of
``jax.grad`` to 1.07x the unfused path's, whose peak the fused path must not exceed (benchmarks/RESULTS.md).

Backward, for ``dout`` [T,D]:

1. One kernel on Triton (``swiglu_down_bwd`` / ``swiglu_down_bwd_saved``; twin ``reference.swiglu_down_bwd``):
   per row tile ``a = dout[token] @ w_down^T`` accumulates over D in f32 (with recompute, gate and up in two more
   accumulators; saved, they are loaded in the epilogue), and the epilogue writes ``dgate = w*a*up*act'(gate)``,
   ``dup = w*a*act(gate)``, ``hw = w*act(gate)*up`` (x's dtype) and the routing-weight gradient ``<h_i, a_i>``
   (f32): ``a`` and ``dh`` never reach memory.
2. ``dw_down = tgmm(hw, dout[token])`` (the weight already in ``hw``, so the TGMM reads dout's rows as they are),
   ``dw_gate`` / ``dw_up`` by TGMM over the x rows (rows gathered in the kernel), ``dx`` scattered straight back
   to token order (``_input_grads``), ``dweights`` a permutation write of ``<h_i, a_i>``.

Backends provide ``swiglu_gmm`` / ``swiglu_down_bwd`` optionally (``moe_ops.backend``). Under ``jax.vmap`` the
kernels give way to their compositions (``custom_vmap``), whose (gather-)GMMs fold the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.sharding import PartitionSpec as P

from kernels import groups
from kernels.activation import GatedActivation, resolve as resolve_activation
from moe_ops import backend, reference, validation, vma
from moe_ops.fused import _check_rows
from moe_ops.gmm import _gmm, _tgmm
from moe_ops.sharding import on_explicit_axes

__all__ = ["swiglu_gmm", "swiglu_ffn", "has_kernel", "check_activation"]


def check_activation(activation) -> GatedActivation:
    """``activation`` as a ``GatedActivation`` spec: a name of ``reference.activate``'s gated activations or a spec;
    anything else (a non-str such as ``["silu"]`` included) raises a ``ValueError`` naming the argument and the
    names."""
    return resolve_activation(activation)


def has_kernel(implementation=None) -> bool:
    """Whether the backend of ``implementation`` runs gate/up + activation as one kernel."""
    return hasattr(backend.ops(implementation), "swiglu_gmm")


def _project(x, w, sizes, offset, sort_idx, k, out_dtype, impl):
    """x @ w over the sorted rows (through the gather row map when ``sort_idx`` is given) -> [M, F]."""
    ops = backend.ops(impl)
    if sort_idx is None:
        return ops.gmm(x, w, sizes, offset, transpose_rhs=False, out_dtype=out_dtype)
    return backend.gather_gmm_of(ops)(x, w, sizes, offset, sort_idx, k, transpose_rhs=False, out_dtype=out_dtype)


def _one_kernel(name, operands, composed, *, rows, impl, named=None, **static):
    """``backend.ops(impl).<name>(*operands, **named, **static)`` where that kernel exists and ``rows`` is static,
    else ``composed(*operands, **named)``. Under ``jax.vmap`` the kernel (it has no batching rule) gives way to the
    composition, whose (gather-)GMMs fold the batch (``kernels.triton.batching``). ``None`` operands (positional or
    in ``named``, the keyword operands) are passed through as such."""
    named = named or {}
    if not hasattr(backend.ops(impl), name) or not isinstance(rows, int):
        return composed(*operands, **named)
    slots = [*enumerate(operands), *named.items()]
    present = [key for key, a in slots if a is not None]

    def full(args):
        filled = dict(slots) | dict(zip(present, args))
        return [filled[i] for i in range(len(operands))], {key: filled[key] for key in named}

    def run(fn, args):
        pos, kw = full(args)
        return fn(*pos, **kw)

    call = functools.partial(getattr(backend.ops(impl), name), **static)

    # Both forms return results typed like all the operands (manual-axis variance inside a user's shard_map): the
    # kernel call drops it and the composition may keep it, and a cast recorded outside this op would be batched
    # onto an already varying value when an enclosing vmap swaps the kernel for the composition.
    @custom_vmap
    def kernel(*args):
        return vma.like_all(run(call, args), args)

    @kernel.def_vmap
    def batched(axis_size, in_batched, *args):
        del axis_size
        out = jax.vmap(lambda *a: run(composed, a), in_axes=[0 if b else None for b in in_batched])(*args)
        out = vma.like_all(out, args)
        return out, jax.tree.map(lambda _: True, out)

    return kernel(*(dict(slots)[key] for key in present))


def _forward(x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx, k, activation, out_dtype, impl):
    composed = functools.partial(_composed_forward, k=k, activation=activation, out_dtype=out_dtype, impl=impl)
    rows = x.shape[0] if sort_idx is None else sort_idx.shape[0]
    return _one_kernel("swiglu_gmm", (x, w_gate, w_up, sizes, offset, sort_idx), composed, rows=rows, impl=impl,
                       named=dict(b_gate=b_gate, b_up=b_up), k=k, activation=activation, out_dtype=out_dtype)


def _composed_forward(x, w_gate, w_up, sizes, offset, sort_idx, *, k, activation, out_dtype, impl, b_gate, b_up):
    """gate / up through the backend's (gather-)GMMs, the biases and the activation in XLA."""
    return backend.compose_swiglu_gmm(x, w_gate, w_up, sizes, offset, sort_idx, k, ops=backend.ops(impl),
                                      activation=activation, out_dtype=out_dtype, b_gate=b_gate, b_up=b_up)


def _bias_grads(dgate, dup, b_gate, b_up, sizes, offset, impl):
    """The cotangents of the gate / up biases [G_local, F]: each local group's f32 sum of its dgate / dup rows, as
    the TGMM of a column of ones against them (fixed-order sums: deterministic, unlike a scatter-add; None for absent
    biases)."""
    def sums(d, b):
        ones = jnp.ones_like(d[:, :1])
        return vma.like(_tgmm(ones, d, sizes, offset, b.shape[0], jnp.float32, impl)[:, 0, :].astype(b.dtype), b)
    return tuple(None if b is None else sums(d, b) for d, b in ((dgate, b_gate), (dup, b_up)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _swiglu(x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx, k, activation, out_dtype, impl):
    return vma.like(_forward(x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx, k, activation, out_dtype, impl),
                    x)


def _swiglu_fwd(x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx, k, activation, out_dtype, impl):
    out = _swiglu(x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx, k, activation, out_dtype, impl)
    return out, (x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx)   # no [M, F] residual (module doc)


def _swiglu_bwd(k, activation, out_dtype, impl, residuals, dh):
    x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx = residuals
    f32 = jnp.dtype(jnp.float32)
    # Recomputed, transient, in x's dtype: the size of the residuals the unfused path keeps (and its numerics).
    # typed like x (and so like dh) inside a user's shard_map: the kernel calls drop the manual-axis variance
    gate, up = (vma.like(_project(x, w, sizes, offset, sort_idx, k, x.dtype, impl), x) for w in (w_gate, w_up))
    gate, up = (p if b is None else p + groups.group_rows(b, sizes, offset, p.shape[0], x.dtype)
                for p, b in ((gate, b_gate), (up, b_up)))
    _, act_vjp = jax.vjp(lambda g, u: reference.activate(g, u, activation), gate, up)
    dgate, dup = (d.astype(x.dtype) for d in act_vjp(dh.astype(f32)))  # f32 inside; zero rows outside local groups
    return (*_input_grads(x, w_gate, w_up, dgate, dup, sizes, offset, sort_idx, k, impl),
            *_bias_grads(dgate, dup, b_gate, b_up, sizes, offset, impl), None, None, None)


def _input_grads(x, w_gate, w_up, dgate, dup, sizes, offset, sort_idx, k, impl):
    """(dx, dw_gate, dw_up) from the [M, F] cotangents of gate and up: two TGMMs over the x rows, and
    ``dx = dgate @ w_gate^T + dup @ w_up^T`` per sorted row, in x's dtype as the unfused path has it. With the
    gather both products go straight back to token order in one ``scatter_gmm_sum`` (unit weights: the k rows of a
    token summed in f32 in a fixed order, no scatter-add; on Triton one launch over K = 2F and one slot buffer), so
    no [M, D] f32 buffer exists; the TGMMs read the x rows in token order (``gather_tgmm``: no gathered copy)."""
    if sort_idx is None:
        dw_gate = _tgmm(x, dgate, sizes, offset, w_gate.shape[0], w_gate.dtype, impl)
        dw_up = _tgmm(x, dup, sizes, offset, w_up.shape[0], w_up.dtype, impl)
        return (_gmm(dgate, w_gate, sizes, offset, True, x.dtype, impl)
                + _gmm(dup, w_up, sizes, offset, True, x.dtype, impl)), dw_gate, dw_up
    dw_gate, dw_up = (token_order_tgmm(x, d, sizes, offset, sort_idx, k, w.shape[0], w.dtype, True, impl)
                      for d, w in ((dgate, w_gate), (dup, w_up)))
    ones = jnp.ones((x.shape[0], k), jnp.float32)
    static = dict(transpose_rhs=True, out_dtype=x.dtype)
    composed = functools.partial(backend.compose_scatter_gmm_sum, ops=backend.ops(impl), **static)
    dx = _one_kernel("scatter_gmm_sum", (dgate, w_gate, dup, w_up, sizes, offset, sort_idx, ones), composed,
                     rows=sort_idx.shape[0], impl=impl, **static)  # Triton: one K = 2F launch, one slot buffer
    return vma.like(dx, x), dw_gate, dw_up


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _check_biases(b_gate, b_up, w_gate, dtype):
    """The optional gate / up biases: float [G_local,F] (w_gate [G_local,D,F]) -> both in ``dtype`` (a missing one
    as zeros), or (None, None)."""
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b is not None:
            validation.float_array(name, b, 2)
    b_gate, b_up = groups.bias_pair(b_gate, b_up, w_gate.shape[0], w_gate.shape[2])
    return (None, None) if b_gate is None else (b_gate.astype(dtype), b_up.astype(dtype))


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("x", 0), spec("w_gate", 2)))
def swiglu_gmm(x, w_gate, w_up, group_sizes, sort_idx=None, *, group_offset=None, activation="silu",
               preferred_element_type=None, implementation=None, b_gate=None, b_up=None):
    """h [M,F] = ``act(x_i @ w_gate[g] + b_gate[g]) * (x_i @ w_up[g] + b_up[g])`` over expert-sorted rows (module
    doc): x [M,D], or x [T,D] in token order with sort_idx [M = T*k]; w_gate / w_up [G_local,D,F]; group_sizes [G];
    the optional biases b_gate / b_up [G_local,F] (in x's dtype, added to the f32 projections in the kernel)."""
    validation.check_gmm(x, w_gate, group_sizes, False, names=("x", "w_gate"))
    validation.float_array("w_up", w_up, 3)
    if tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"w_up must have w_gate's shape [G_local,D,F]={tuple(w_gate.shape)}, got "
                         f"{tuple(w_up.shape)}")
    activation = check_activation(activation)
    out_dtype = validation.out_dtype(preferred_element_type, x.dtype)
    b_gate, b_up = _check_biases(b_gate, b_up, w_gate, x.dtype)
    impl = backend.choose(implementation)
    k = 1
    if sort_idx is not None:
        k = _check_rows(sort_idx, x.shape[0], "x is [T, D]")
        sort_idx = sort_idx.astype(jnp.int32)
    rows = x.shape[0] if sort_idx is None else sort_idx.shape[0]
    if b_gate is not None and x.shape[1] == 0:   # D = 0: h is the biases' activation alone (one zero column of x /
        x = jnp.pad(x, ((0, 0), (0, 1)))          # w_gate / w_up keeps the kernels' K non-empty)
        w_gate, w_up = (jnp.pad(w, ((0, 0), (0, 1), (0, 0))) for w in (w_gate, w_up))
    empty = validation.zeros_if_empty((rows, w_gate.shape[2]), out_dtype, (rows, *x.shape, *w_gate.shape), x, w_gate)
    if empty is not None:
        return empty
    sizes = validation.clamp_group_sizes(group_sizes, rows)
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx = _match(x, w_gate.astype(x.dtype), w_up.astype(x.dtype),
                                                                    b_gate, b_up, sizes, offset, sort_idx)
    return _swiglu(x, w_gate, w_up, b_gate, b_up, sizes, offset, sort_idx, k, activation, out_dtype, impl)


def _match(*operands):
    """``vma.match_vma`` of the operands that are not None (the others stay None)."""
    present = iter(vma.match_vma(*(a for a in operands if a is not None)))
    return [None if a is None else next(present) for a in operands]


# ---------------------------------------------------------------------------------------------------------------
# gate/up + activation + weighted down projection with its fused backward.

@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _ffn(x, w_gate, w_up, w_down, bias, weights, sizes, offset, sort_idx, k, activation, recompute, impl):
    h = _forward(x, w_gate, w_up, *bias, sizes, offset, sort_idx, k, activation, x.dtype, impl)
    return _down(h, w_down, weights, sizes, offset, sort_idx, impl)


def _down(h, w_down, weights, sizes, offset, sort_idx, impl):
    out = backend.ops(impl).scatter_gmm(h, w_down, sizes, offset, sort_idx, weights, transpose_rhs=False,
                                        out_dtype=h.dtype)
    return vma.like(out, h)


def _ffn_fwd(x, w_gate, w_up, w_down, bias, weights, sizes, offset, sort_idx, k, activation, recompute, impl):
    inputs = (x, w_gate, w_up, w_down, bias, weights, sizes, offset, sort_idx)
    if recompute:  # residuals: the inputs only
        return _ffn(*inputs, k, activation, recompute, impl), (inputs, None)
    composed = functools.partial(_composed_saved, k=k, activation=activation, impl=impl)
    h, gate, up = _one_kernel("swiglu_gmm_saved", (x, w_gate, w_up, sizes, offset, sort_idx), composed,
                              rows=sort_idx.shape[0], impl=impl, named=dict(b_gate=bias[0], b_up=bias[1]), k=k,
                              activation=activation, out_dtype=x.dtype)
    return _down(vma.like(h, x), w_down, weights, sizes, offset, sort_idx, impl), (inputs, (gate, up))


def _ffn_bwd(k, activation, recompute, impl, residuals, dout):
    (x, w_gate, w_up, w_down, bias, weights, sizes, offset, sort_idx), saved = residuals
    dout = dout.astype(x.dtype)
    w_sorted = weights.reshape(-1).astype(jnp.float32)[sort_idx]
    static = dict(rows=sort_idx.shape[0], impl=impl, k=k, activation=activation)
    if saved is None:
        composed = functools.partial(_composed_down_bwd, k=k, activation=activation, impl=impl)
        operands = (x, dout, w_gate, w_up, w_down, sizes, offset, sort_idx, w_sorted)
        dgate, dup, hw, dw_sorted = _one_kernel("swiglu_down_bwd", operands, composed,
                                                named=dict(b_gate=bias[0], b_up=bias[1]), **static)
    else:
        composed = functools.partial(_composed_down_bwd_saved, k=k, activation=activation, impl=impl)
        operands = (dout, w_down, *saved, sizes, offset, sort_idx, w_sorted)
        dgate, dup, hw, dw_sorted = _one_kernel("swiglu_down_bwd_saved", operands, composed, **static)
    dgate, dup, hw = (vma.like(a, x) for a in (dgate, dup, hw))
    dx, dw_gate, dw_up = _input_grads(x, w_gate, w_up, dgate, dup, sizes, offset, sort_idx, k, impl)
    # hw = w * h (the kernel's epilogue applied the routing weight), so dout's rows are read unscaled
    dw_down = token_order_tgmm(hw, dout, sizes, offset, sort_idx, k, w_down.shape[0], w_down.dtype, False, impl)
    dweights = jnp.zeros_like(dw_sorted).at[sort_idx].set(dw_sorted, unique_indices=True)  # permutation write
    dweights = vma.like(dweights.reshape(weights.shape).astype(weights.dtype), weights)
    return (dx, dw_gate, dw_up, dw_down, _bias_grads(dgate, dup, *bias, sizes, offset, impl), dweights, None, None,
            None)


def token_order_tgmm(lhs, rhs, sizes, offset, sort_idx, k, num_groups, out_dtype, gather_lhs, impl):
    """``tgmm`` with one operand read in token order (``gather_tgmm``: lhs when ``gather_lhs``, else rhs): no
    gathered [M, *] copy where the backend has the kernel. (Also the fused path's down-bias gradient.)"""
    dims = (sort_idx.shape[0], lhs.shape[1], rhs.shape[1], num_groups)
    empty = validation.zeros_if_empty((num_groups, lhs.shape[1], rhs.shape[1]), out_dtype, dims, lhs, rhs)
    if empty is not None:   # no tokens (T = 0): the kernels never see a zero-size dimension
        return empty
    static = dict(k=k, num_groups=num_groups, out_dtype=out_dtype, gather_lhs=gather_lhs, gather_rhs=not gather_lhs)
    composed = functools.partial(backend.compose_gather_tgmm, ops=backend.ops(impl), **static)
    out = _one_kernel("gather_tgmm", (lhs, rhs, sizes, offset, sort_idx), composed, rows=sort_idx.shape[0],
                      impl=impl, **static)
    return vma.like(out, lhs)


def _composed_saved(x, w_gate, w_up, sizes, offset, sort_idx, *, k, activation, impl, b_gate, b_up):
    return backend.compose_swiglu_gmm_saved(x, w_gate, w_up, sizes, offset, sort_idx, k, ops=backend.ops(impl),
                                            activation=activation, out_dtype=x.dtype, b_gate=b_gate, b_up=b_up)


def _composed_down_bwd(x, dout, w_gate, w_up, w_down, sizes, offset, sort_idx, w_sorted, *, k, activation, impl,
                       b_gate, b_up):
    return backend.compose_swiglu_down_bwd(x, dout, w_gate, w_up, w_down, sizes, offset, sort_idx, w_sorted, k,
                                           ops=backend.ops(impl), activation=activation, b_gate=b_gate, b_up=b_up)


def _composed_down_bwd_saved(dout, w_down, gate, up, sizes, offset, sort_idx, w_sorted, *, k, activation, impl):
    return backend.compose_swiglu_down_bwd_saved(dout, w_down, gate, up, sizes, offset, sort_idx, w_sorted, k,
                                                 ops=backend.ops(impl), activation=activation)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("x", 0), spec("x", 1)))
def swiglu_ffn(x, w_gate, w_up, w_down, group_sizes, sort_idx, weights, *, group_offset=None, activation="silu",
               recompute=False, implementation=None, b_gate=None, b_up=None):
    """The routed experts on token-order rows, fused: x [T,D], w_gate / w_up [G_local,D,F], w_down [G_local,F,D],
    group_sizes [G], sort_idx [T*k] (``sort_by_expert``), weights [T,k] -> [T,D] in x's dtype,
    ``out[t] = sum_j weights[t,j] * (act(x_t @ w_gate[e]) * (x_t @ w_up[e])) @ w_down[e]`` for the local experts
    ``e`` of token ``t``'s copies (module doc: one forward kernel for gate / up / activation, the weighted scatter
    in the down GMM, the activation derivative in the epilogue of the backward's down dlhs GMM). ``recompute``:
    keep only the inputs for the backward and recompute gate / up there (least memory, one more gate/up GMM)
    instead of saving them (default: two [T*k, F] residuals in x's dtype, no extra matmul). ``b_gate`` / ``b_up``
    [G_local,F]: optional biases of the gate / up projections, added in the kernels (their gradients: per-group f32
    sums of dgate / dup)."""
    validation.flag("recompute", recompute)
    validation.float_array("x", x, 2)
    validation.check_expert_weights(x, w_gate, w_up, w_down)
    validation.check_group_sizes(group_sizes, w_gate.shape[0], "w_gate")
    validation.float_array("weights", weights, 2)
    x, weights = jnp.asarray(x), jnp.asarray(weights)  # NumPy ones would be indexed by traced rows in the backward
    validation.sort_idx_array(sort_idx)
    t, k = weights.shape
    if t != x.shape[0] or sort_idx.shape[0] != t * k:
        raise ValueError(f"x [T,D], weights [T,k] and sort_idx [T*k] disagree: x {tuple(x.shape)}, weights "
                         f"{tuple(weights.shape)}, sort_idx {tuple(sort_idx.shape)}")
    activation = check_activation(activation)
    b_gate, b_up = _check_biases(b_gate, b_up, w_gate, x.dtype)
    impl = backend.choose(implementation)
    rows = sort_idx.shape[0]
    dims = (rows, *x.shape, *w_gate.shape)
    empty = validation.zeros_if_empty(tuple(x.shape), x.dtype, dims, x, w_gate, weights)
    if empty is not None:
        return empty
    sizes = validation.clamp_group_sizes(group_sizes, rows)
    offset = validation.group_offset_array(group_offset, group_sizes.shape[0])
    x, w_gate, w_up, w_down, b_gate, b_up, weights, sizes, offset, sort_idx = _match(
        x, *(w.astype(x.dtype) for w in (w_gate, w_up, w_down)), b_gate, b_up, weights, sizes, offset,
        sort_idx.astype(jnp.int32))
    return _ffn(x, w_gate, w_up, w_down, (b_gate, b_up), weights, sizes, offset, sort_idx, k, activation,
                bool(recompute), impl)
