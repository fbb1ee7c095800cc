"""The routed MoE feed-forward layer built from the public ops (single device; see ``partitioned`` for EP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_ops import expert_bias, reference, validation
from moe_ops import fused as fused_ops
from moe_ops.validation import check_expert_weights
from moe_ops.swiglu import check_activation, has_kernel as swiglu_has_kernel, swiglu_ffn
from moe_ops.gmm import gmm
from moe_ops.sharding import auto_axes_like, explicit_mesh, on_explicit_axes
from moe_ops.sort import permute, unpermute

__all__ = ["moe_ffn", "experts_ffn", "fused_experts_ffn", "route"]


@validation.named_op
@on_explicit_axes(lambda spec, a: (P(spec("logits", 0), None),) * 2)
def route(logits, top_k, *, score_fn="softmax", bias=None, renormalize=True, num_groups=None, top_groups=None,
          group_score="top2_sum", scale=1.0):
    """Top-k routing: logits [T,E] -> (weights [T,k] f32, expert_ids [T,k] int32); ``bias`` [E] moves selection only;
    ``num_groups`` / ``top_groups``: select among the experts of each token's ``top_groups`` best groups of
    ``E / num_groups``, a group scored by ``group_score`` ("top2_sum" or "max"); ``scale`` multiplies the weights
    (``reference.route`` defines each)."""
    validation.float_array("logits", logits, 2)
    top_k = check_top_k(top_k, logits.shape[1])
    num_groups, top_groups, scale, group_score = validation.routing_options(
        logits.shape[1], top_k, bias=bias, renormalize=renormalize, num_groups=num_groups, top_groups=top_groups,
        scale=scale, group_score=group_score)
    return reference.route(logits, top_k, score_fn=score_fn, bias=bias, renormalize=renormalize,
                           num_groups=num_groups, top_groups=top_groups, group_score=group_score, scale=scale)


def check_top_k(top_k, num_experts) -> int:
    if not validation.is_static_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    return int(top_k)


def check_routing(router_logits, top_k, router_bias, renormalize, num_groups, top_groups, routed_scale,
                  group_score="top2_sum") -> dict:
    """``moe_ffn``'s routing options (errors name its arguments) -> them as keywords, static ones normalised."""
    num_experts = router_logits.shape[-1]
    top_k = check_top_k(top_k, num_experts)
    num_groups, top_groups, routed_scale, group_score = validation.routing_options(
        num_experts, top_k, bias=router_bias, renormalize=renormalize, num_groups=num_groups, top_groups=top_groups,
        scale=routed_scale, group_score=group_score, names=("router_bias", "routed_scale"))
    return dict(router_bias=router_bias, renormalize=bool(renormalize), num_groups=num_groups,
                top_groups=top_groups, group_score=group_score, routed_scale=routed_scale)


def route_tokens(router_logits, top_k, *, score_fn="softmax", router_bias=None, renormalize=True, num_groups=None,
                 top_groups=None, group_score="top2_sum", routed_scale=1.0):
    """``route`` with ``moe_ffn``'s names for the options (router_logits [T, E])."""
    return route(router_logits, top_k, score_fn=score_fn, bias=router_bias, renormalize=renormalize,
                 num_groups=num_groups, top_groups=top_groups, group_score=group_score, scale=routed_scale)


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("x_sorted", 0), spec("x_sorted", 1)))
def experts_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, *, activation="silu", group_offset=None,
                implementation=None, recompute: bool = False, b_gate=None, b_up=None, b_down=None):
    """SwiGLU experts on expert-sorted rows: x_sorted [M,D] -> [M,D] (rows of non-local groups are zero). Like every
    layer here it computes in x's dtype: weights of another float dtype are cast to it (as the fused path does).
    ``recompute``: the backward recomputes gate / up [M,F] instead of keeping them from the forward
    (``jax.checkpoint`` of the two projections and the activation: one more gate/up matmul; gate, up and the
    activation's [M,F] intermediates are not kept). ``b_gate`` / ``b_up`` [G_local,F], ``b_down`` [G_local,D]:
    per-expert biases of the projections (``moe_ops.expert_bias``)."""
    validation.flag("recompute", recompute)
    activation = check_activation(activation)
    validation.float_array("x_sorted", x_sorted, 2)
    check_expert_weights(x_sorted, w_gate, w_up, w_down, x_name="x_sorted")
    expert_bias.check(b_gate, b_up, b_down, w_gate, w_down)
    validation.check_group_sizes(group_sizes, w_gate.shape[0], rhs_name="w_gate")
    w_gate, w_up, w_down = (w.astype(x_sorted.dtype) for w in (w_gate, w_up, w_down))
    kw = dict(group_offset=group_offset, implementation=implementation)
    rows = functools.partial(expert_bias.rows, group_sizes=group_sizes, num_rows=x_sorted.shape[0],
                             dtype=x_sorted.dtype, **kw)
    h = _gated(lambda x, w: gmm(x, w, group_sizes, **kw), x_sorted, w_gate, w_up, activation, recompute,
               b_gate, b_up, rows)
    y = gmm(h, w_down, group_sizes, **kw)
    return y if b_down is None else y + rows(b_down)


def _gated(project, x, w_gate, w_up, activation, recompute, b_gate=None, b_up=None, rows=None):
    """``act(project(x, w_gate) + rows(b_gate)) * (project(x, w_up) + rows(b_up))`` [M,F] in x's dtype (a bias
    None: not added); with ``recompute`` under ``jax.checkpoint``, so the backward recomputes the two projections
    instead of keeping them."""
    def gated(x, wg, wu, bg, bu):
        gate, up = project(x, wg), project(x, wu)
        gate, up = (p if b is None else p + rows(b) for p, b in ((gate, bg), (up, bu)))
        return reference.activate(gate, up, activation).astype(x.dtype)
    return (jax.checkpoint(gated) if recompute else gated)(x, w_gate, w_up, b_gate, b_up)


def check_weights(x, router_logits, w_gate, w_up, w_down):
    """``moe_ffn``'s arguments: x [..., D], router_logits [..., E], w_gate / w_up [E,D,F], w_down [E,F,D]."""
    check_expert_weights(x, w_gate, w_up, w_down)
    validation.float_array("router_logits", router_logits)
    e = w_gate.shape[0]
    if tuple(router_logits.shape) != tuple(x.shape[:-1]) + (e,):
        raise ValueError(f"router_logits must be [..., E]={tuple(x.shape[:-1]) + (e,)}, got "
                         f"{tuple(router_logits.shape)}")


@validation.named_op
@on_explicit_axes(lambda spec, a: P(spec("x", 0), spec("x", 1)))
def fused_experts_ffn(x, weights, expert_ids, w_gate, w_up, w_down, *, activation="silu", implementation=None,
                      swiglu: bool | None = None, recompute: bool = False, b_gate=None, b_up=None, b_down=None):
    """The fused form of permute -> ``experts_ffn`` -> unpermute: x [T,D] (token order), weights / expert_ids [T,k]
    -> [T,D]. The gate / up GMMs gather their rows from x, the down GMM scatters weighted rows back to token order
    (``moe_ops.fused``): no permuted copy of x or of the output is built. ``swiglu``: gate, up and the activation
    as one op with its fused backward (``moe_ops.swiglu.swiglu_ffn``); ``None`` -> where the backend has that kernel
    (``swiglu.has_kernel``), ``False`` -> two gather-GMMs and the activation in XLA. ``recompute``: recompute gate /
    up in the backward instead of saving them (``swiglu_ffn``'s residual choice; ``jax.checkpoint`` of the two
    gather-GMMs and the activation without the SwiGLU kernel). A copy with an id outside ``[0, E)`` is dropped: it
    contributes zero whatever its weight (inf / NaN included), and its weight gets a zero gradient.
    ``b_gate`` / ``b_up`` [E,F], ``b_down`` [E,D]: per-expert biases (``moe_ops.expert_bias``); the SwiGLU kernel
    adds b_gate / b_up to its f32 projections, the two gather-GMMs in XLA."""
    validation.flag("swiglu", swiglu, optional=True)
    validation.flag("recompute", recompute)
    activation = check_activation(activation)
    validation.float_array("x", x, 2)
    check_expert_weights(x, w_gate, w_up, w_down)
    expert_bias.check(b_gate, b_up, b_down, w_gate, w_down)
    validation.float_array("weights", weights, 2)
    validation.int_array("expert_ids", expert_ids, 2)
    if tuple(weights.shape) != tuple(expert_ids.shape) or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"weights and expert_ids must both be [T, k] with T={x.shape[0]} (x is {tuple(x.shape)}), "
                         f"got weights {tuple(weights.shape)}, expert_ids {tuple(expert_ids.shape)}")
    kw = dict(implementation=implementation)
    sizes, sort_idx = fused_ops.sort_by_expert(expert_ids, w_gate.shape[0], **kw)
    ids = validation.expert_ids_int32(expert_ids, w_gate.shape[0])  # out of range stays out, at any width
    dropped = (ids < 0) | (ids >= w_gate.shape[0])
    weights = jnp.where(dropped, jnp.zeros((), weights.dtype), weights)  # a dropped copy adds 0, even at w = inf / nan
    if swiglu or (swiglu is None and swiglu_has_kernel(implementation)):
        y = swiglu_ffn(x, w_gate, w_up, w_down, sizes, sort_idx, weights, activation=activation,
                       recompute=recompute, b_gate=b_gate, b_up=b_up, **kw)
    else:
        w_gate, w_up, w_down = (w.astype(x.dtype) for w in (w_gate, w_up, w_down))  # layers compute in x's dtype
        rows = functools.partial(expert_bias.rows, group_sizes=sizes, num_rows=sort_idx.shape[0], dtype=x.dtype,
                                 **kw)
        h = _gated(lambda x, w: fused_ops.gather_gmm(x, w, sizes, sort_idx, **kw), x, w_gate, w_up, activation,
                   recompute, b_gate, b_up, rows)
        y = fused_ops.scatter_gmm(h, w_down, sizes, sort_idx, weights, **kw)
    if b_down is None:
        return y
    bias = expert_bias.combine(b_down, weights, ids, sizes, sort_idx, dtype=x.dtype, **kw)
    return (y.astype(jnp.float32) + bias).astype(x.dtype)


@validation.named_op
@validation.numpy_floats_as_jax
def moe_ffn(x, router_logits, w_gate, w_up, w_down, *, top_k, activation="silu", score_fn="softmax",
            router_bias=None, renormalize=True, num_groups=None, top_groups=None, group_score="top2_sum",
            routed_scale=1.0, implementation=None, sharding=None, fused: bool | None = None, recompute: bool = False,
            b_gate=None, b_up=None, b_down=None):
    """Routed SwiGLU MoE: x [..., D], router_logits [..., E], w_gate/w_up [E,D,F], w_down [E,F,D] -> x's shape.

    route (top-k of the softmax, renormalised) -> permute -> gate/up/down grouped matmuls -> weighted unpermute.
    Routing options (``route``'s, ``reference.route`` defines them): ``router_bias`` [E] (route's ``bias``:
    moves the selection only, gets a zero gradient), ``renormalize``, ``num_groups`` / ``top_groups`` /
    ``group_score`` (group-limited selection), ``routed_scale`` (route's ``scale``: multiplies the weights).
    ``fused``: gather / scatter inside the GMMs instead of permute / unpermute (``fused_experts_ffn``). ``None``
    (default) fuses on the backends of ``moe_ops.fused.FUSED_BY_DEFAULT`` (Triton, Pallas); ``True`` fuses wherever
    the backend provides the fused ops (Triton, Pallas, XLA twins); ``False`` never fuses. On backends with that
    kernel (Triton, Pallas) the fused path runs gate, up and the activation as one op (``moe_ops.swiglu``). Same results
    either way (up to rounding).
    ``sharding`` (a ``MoEShardingConfig``): run the expert-parallel partitioned op (``moe_ops.partitioned``; its
    per-shard layers use the default ``fused=None``).
    ``recompute``: keep less for the backward and recompute gate / up [T*k, F] there (one more gate/up matmul, about
    22 % more layer flops); the default keeps them. The partitioned op keeps only its inputs either way (its
    backward re-runs the shard's forward).
    ``b_gate`` / ``b_up`` [E,F], ``b_down`` [E,D]: per-expert biases of the three projections (gpt-oss;
    ``moe_ops.expert_bias``), differentiable, also with ``sharding`` (sharded like their weights)."""
    validation.flag("recompute", recompute)
    validation.flag("fused", fused, optional=True)  # checked with sharding too, where the shards choose it
    routing = dict(renormalize=renormalize, num_groups=num_groups, top_groups=top_groups, group_score=group_score,
                   routed_scale=routed_scale)
    biases = {n: b for n, b in zip(expert_bias.NAMES, (b_gate, b_up, b_down)) if b is not None}
    if sharding is not None:
        from moe_ops.partitioned import moe_ffn_partitioned  # noqa: PLC0415 (partitioned imports this module)
        return moe_ffn_partitioned(x, router_logits, w_gate, w_up, w_down, top_k=top_k, sharding=sharding,
                                   activation=activation, score_fn=score_fn, implementation=implementation,
                                   router_bias=router_bias, **routing, **biases)
    check_weights(x, router_logits, w_gate, w_up, w_down)
    expert_bias.check(b_gate, b_up, b_down, w_gate, w_down)
    routing = check_routing(router_logits, top_k, router_bias, **routing)
    bias = routing.pop("router_bias")
    optional = dict(biases, **({} if bias is None else {"router_bias": bias}))
    if explicit_mesh(x, router_logits, w_gate, w_up, w_down, *optional.values()) is not None:
        # tokens on an Explicit mesh (jax.make_mesh's default): the sort and the kernels have no Explicit sharding
        # rule, so the layer runs on Auto axes (XLA partitions it) and hands back x's sharding
        names = tuple(optional)

        def layer(x, router_logits, w_gate, w_up, w_down, *rest):
            return moe_ffn(x, router_logits, w_gate, w_up, w_down, top_k=top_k, activation=activation,
                           score_fn=score_fn, implementation=implementation, fused=fused, recompute=recompute,
                           **dict(zip(names, rest)), **routing)
        return auto_axes_like(layer, x)(x, router_logits, w_gate, w_up, w_down, *optional.values())
    shape = x.shape
    x2 = reference.flatten_tokens(x)
    weights, ids = route_tokens(reference.flatten_tokens(router_logits), top_k, score_fn=score_fn, router_bias=bias,
                                **routing)
    if fused_ops.use_fused(fused, implementation):
        return fused_experts_ffn(x2, weights, ids, w_gate, w_up, w_down, activation=activation,
                                 implementation=implementation, recompute=recompute, **biases).reshape(shape)
    xs, sizes, sort_idx = permute(x2, ids, w_gate.shape[0], implementation=implementation)
    y = experts_ffn(xs, sizes, w_gate, w_up, w_down, activation=activation, implementation=implementation,
                    recompute=recompute, **biases)
    return unpermute(y, sort_idx, weights, implementation=implementation).reshape(shape)
