"""The partitioned MoE op: ``jax.custom_partitioning`` around the per-shard strategies of ``ep_strategies``.

``moe_ffn_partitioned`` (reached through ``moe_ops.moe_ffn(..., sharding=MoEShardingConfig(...))``) is a
``custom_vjp`` whose forward and backward are each a custom-partitioned op. Their partition rule (``plan``) reads
the operand shardings and fixes:

1. tokens: x / logits / out ``[T, ·]`` sharded on T over the operand's token axes (``config.batch_axes`` when the
   operand has none); ``all_to_all`` adds the expert axis, ``ep_tp`` removes it; axes that do not divide T drop.
2. weights: ``[E, ...]`` with E over ``(expert, fsdp)`` (``ep_tp``: E over ``fsdp``, F over ``expert``); the
   per-shard code all-gathers over ``fsdp`` (so dW is reduce-scattered over it in the backward).
3. the per-shard function: one of the strategies with collectives over the named axes.
4. router_bias ``[E]`` (``moe_ffn``'s selection bias; zeros when not given, then unused): replicated. The other
   routing options are static (``_Static``); every shard routes its tokens over all E experts.
5. expert biases b_gate / b_up ``[E, F]``, b_down ``[E, D]`` (zeros when not given, then unused): sharded like
   their weights' E and F; under ``ep_tp`` b_down is replicated over the expert axis and added by its index 0.

The backward runs ``jax.vjp`` of the same per-shard function (recomputing the forward) for x, router_logits, the
weights and the expert biases; router_bias, which only moves the selection, gets zeros from the custom VJP. Its collectives are
transposed per device (psum -> psum, all_gather -> psum_scatter, all_to_all -> all_to_all), which is the exact
transpose of the global map once (a) the cotangent of an output replicated over mesh axes R is divided by |R| and
(b) the gradient of an input replicated over axes R' is psum'd over R' (``_replicated_axes``).

Shardy (default) gets a ``sharding_rule``; the old GSPMD partitioner gets ``infer_sharding_from_operands`` /
``propagate_user_sharding``; both use the same ``plan``. On one device the op runs ``layer.moe_ffn``, and so does
an empty problem (a zero T, D or F: zeros out, zero gradients, no collective with zero-sized operands).
Inside a user's ``shard_map`` call ``moe_ffn_shard`` directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kernels.activation import GatedActivation
from moe_ops import backend, expert_bias, layer, partitioned_vmap, reference, validation, vma
from moe_ops.ep_strategies import moe_ffn_shard
from moe_ops.ep_plan import Plan, plan
from moe_ops.sharding import MoEShardingConfig, auto_axes_like, spec_axes

__all__ = ["moe_ffn_partitioned", "moe_ffn_shard", "Plan", "plan"]  # moe_ffn_shard: ep_strategies


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static arguments of the custom-partitioned ops."""
    top_k: int
    activation: GatedActivation
    score_fn: str
    implementation: str | None
    config: MoEShardingConfig
    dims: tuple = ()  # (T, E, F) of the flattened operands, for the lowering-time check (``_checked_rule``)
    has_bias: bool = False  # whether the router_bias operand is the caller's (else zeros, unused: select by logits)
    renormalize: bool = True
    num_groups: int | None = None
    top_groups: int | None = None
    group_score: str = "top2_sum"
    routed_scale: float = 1.0
    biases: tuple = ()  # the names of the caller's expert biases (the other bias operands are zeros, unused)

    def bias_kw(self, b_gate, b_up, b_down):
        """The expert-bias keywords, with the operands the caller did not give left out."""
        return {n: b for n, b in zip(expert_bias.NAMES, (b_gate, b_up, b_down)) if n in self.biases}

    def routing(self, router_bias):
        """``moe_ffn``'s routing keywords, with the bias operand (ignored unless ``has_bias``)."""
        names = ("renormalize", "num_groups", "top_groups", "group_score", "routed_scale")
        return dict(router_bias=router_bias if self.has_bias else None, **{n: getattr(self, n) for n in names})


def _known_mesh(*operands):
    """The mesh the op will be partitioned over, when trace time knows it: the context mesh (``jax.set_mesh``) or
    the mesh of an operand's sharding (``jax.typeof``; under ``jit`` the arguments' mesh). None for one device, and
    inside a ``shard_map`` (manual axes: the op then runs its per-shard body on the local blocks)."""
    mesh = jax.sharding.get_abstract_mesh()
    for a in operands:
        if mesh is not None and not mesh.empty:
            break
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1 or AxisType.Manual in tuple(mesh.axis_types):
        return None
    return mesh


def _checked_rule(rule: str):
    """Shardy's sharding rule as a callable: JAX calls it while lowering, with the mesh of the jit (known there even
    when trace time saw none, e.g. ``jit(in_shardings=...)``), so the plan's checks raise before partitioning."""
    def callback(static, mesh, operand_types, result_types):
        del operand_types, result_types
        if static.dims and mesh is not None and not mesh.empty and mesh.size > 1:
            plan(static.config, mesh, None, *static.dims)
        return rule
    return callback


def _shard_fn(static: _Static, p: Plan):
    """The per-shard function of (x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down)."""
    cfg = dataclasses.replace(static.config, strategy=p.strategy)

    def shard(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down):
        return moe_ffn_shard(x, router_logits, w_gate, w_up, w_down, top_k=static.top_k, config=cfg,
                             tokens_on_expert=p.tokens_on_expert, fsdp_axis=p.fsdp_axis, activation=static.activation,
                             score_fn=static.score_fn, implementation=static.implementation,
                             **static.routing(router_bias), **static.bias_kw(b_gate, b_up, b_down))
    return shard


def _replicated_axes(mesh, spec):
    used = {a for entry in spec for a in spec_axes(entry)}
    return tuple(a for a in mesh.axis_names if a not in used and mesh.shape[a] > 1)


def _check_partitionable(implementation):
    """On a CPU host the Triton kernels run in the interpreter through a host callback, which the partitioned
    program cannot keep alive (the process dies); say so instead."""
    if jax.default_backend() == "cpu" and backend.resolve(implementation) == "triton":
        raise NotImplementedError(
            "moe_ffn(sharding=...) with implementation='triton' on a CPU host: the Triton interpreter runs through a "
            "host callback, which jax.custom_partitioning cannot carry into the partitioned program. On CPU use "
            "implementation='xla' or 'pallas' here, or call moe_ffn_shard inside jax.shard_map")


def _plan_from_args(static, mesh, arg_shapes):
    """The plan, or None on a mesh without axes (what the partitioner passes for operands that carry no mesh, e.g.
    uncommitted arrays under ``jax.set_mesh``, or inside a shard_map manual over part of the mesh): the op then
    runs its one-device body on whatever the operands hold."""
    if not mesh.axis_names:
        return None
    _check_partitionable(static.implementation)
    x, logits, w_gate = arg_shapes[0], arg_shapes[1], arg_shapes[2]
    return plan(static.config, mesh, x.sharding, x.shape[0], logits.shape[1], w_gate.shape[2])


def _per_shard(fn):
    """``fn`` traced as the partitioned program's per-shard code, whenever JAX traces it (at lowering, after the
    caller's trace has returned):

    * with no runtime value checks: a checked-mode host callback cannot live in the partitioned program (the
      process dies), and the op's group sizes and expert ids are its own, never the caller's values;
    * with the context mesh's Explicit axes made Auto: jax >= 0.11 traces a partition's lowering under the context
      mesh (``jax.set_mesh``), where collectives and ``jnp`` ops would carry sharding types meant for the global
      program."""
    @functools.wraps(fn)
    def traced(*args):
        with validation.checked(False):
            am = jax.sharding.get_abstract_mesh()
            if am is None or am.empty or AxisType.Explicit not in tuple(am.axis_types):
                return fn(*args)
            auto = {n: AxisType.Auto for n, t in zip(am.axis_names, am.axis_types) if t == AxisType.Explicit}
            with jax.sharding.use_abstract_mesh(am.update_axis_types(auto)):
                return fn(*args)
    return traced


def _named(mesh, specs):
    return tuple(NamedSharding(mesh, s) for s in specs)


def _single_device(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, static):
    with validation.checked(False):  # traced inside custom_partitioning too (see _per_shard)
        return layer.moe_ffn(x, router_logits, w_gate, w_up, w_down, top_k=static.top_k,
                             activation=static.activation, score_fn=static.score_fn,
                             implementation=static.implementation, **static.routing(router_bias),
                             **static.bias_kw(b_gate, b_up, b_down))


_OPERANDS = 9   # x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down
_DIFF = (0, 1, 2, 3, 4, 6, 7, 8)  # the differentiable ones (router_bias only selects: a zero gradient)


# ---- forward op ------------------------------------------------------------------------------------------------
@functools.partial(custom_partitioning, static_argnums=(_OPERANDS,))
def _forward(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, static):
    return _single_device(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, static)


def _forward_partition(static, mesh, arg_shapes, result_shape):
    p = _plan_from_args(static, mesh, arg_shapes)
    if p is None:
        return (mesh, _per_shard(functools.partial(_single_device, static=static)), result_shape.sharding,
                tuple(a.sharding for a in arg_shapes))
    return mesh, _per_shard(_shard_fn(static, p)), NamedSharding(mesh, p.token_spec()), _named(mesh, p.arg_specs())


def _forward_infer(static, mesh, arg_shapes, result_shape):
    p = _plan_from_args(static, mesh, arg_shapes)
    return arg_shapes[0].sharding if p is None else NamedSharding(mesh, p.token_spec())


def _propagate_user(static, mesh, user_shape):
    spec = getattr(user_shape.sharding, "spec", P())
    return NamedSharding(mesh, P(spec[0] if len(spec) else None, None))


# router_bias [E] (replicated), then the expert biases [E, F], [E, F], [E, D] (sharded like their weights)
_FWD_RULE = "t d, t e, w i f, w i f, w f i, e, w f, w f, w i -> t d"
_forward.def_partition(partition=_forward_partition, infer_sharding_from_operands=_forward_infer,
                       propagate_user_sharding=_propagate_user, sharding_rule=_checked_rule(_FWD_RULE))


# ---- backward op: gradients of x, router_logits, the weights and the expert biases (router_bias only selects: its
# gradient is zero, which ``_moe_bwd`` returns without a partitioned output) -------------------------------------
def _grads(fn, args, dy):
    """``jax.vjp`` of ``fn(*args)`` w.r.t. the differentiable operands (``_DIFF``) at cotangent ``dy``."""
    def diff(*d):
        full = list(args)
        for i, a in zip(_DIFF, d):
            full[i] = a
        return fn(*full)
    _, vjp = jax.vjp(diff, *(args[i] for i in _DIFF))
    return vjp(dy)


def _backward_one_device(*args):
    *operands, dy, static = args
    return _grads(lambda *a: _single_device(*a, static), operands, dy)


@functools.partial(custom_partitioning, static_argnums=(_OPERANDS + 1,))
def _backward(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, dy, static):
    return _backward_one_device(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, dy,
                                static)


def _backward_partition(static, mesh, arg_shapes, result_shape):
    p = _plan_from_args(static, mesh, arg_shapes)
    if p is None:
        return (mesh, _per_shard(lambda *a: _backward_one_device(*a, static)),
                tuple(arg_shapes[i].sharding for i in _DIFF), tuple(a.sharding for a in arg_shapes))
    specs = p.arg_specs()
    grad_specs = tuple(specs[i] for i in _DIFF)
    shard = _shard_fn(static, p)
    out_copies = math.prod(mesh.shape[a] for a in _replicated_axes(mesh, p.token_spec()))

    def lower(*args):
        *operands, dy = args
        grads = _grads(shard, operands, (dy / out_copies).astype(dy.dtype))
        return tuple(_psum(g, _replicated_axes(mesh, s)) for g, s in zip(grads, grad_specs))

    return mesh, _per_shard(lower), _named(mesh, grad_specs), _named(mesh, specs + (p.token_spec(),))


def _psum(g, axes):
    return jax.lax.psum(g, axes) if axes else g


def _backward_infer(static, mesh, arg_shapes, result_shape):
    p = _plan_from_args(static, mesh, arg_shapes)
    if p is None:
        return tuple(arg_shapes[i].sharding for i in _DIFF)
    specs = p.arg_specs()
    return _named(mesh, tuple(specs[i] for i in _DIFF))


_BWD_RULE = "t d, t e, w i f, w i f, w f i, e, w f, w f, w i, t d -> t d, t e, w i f, w i f, w f i, w f, w f, w i"
_backward.def_partition(partition=_backward_partition, infer_sharding_from_operands=_backward_infer,
                        sharding_rule=_checked_rule(_BWD_RULE))


# ---- vmap (custom_partitioning has no batching rule: ``partitioned_vmap``) ---------------------------------------
_forward_b = partitioned_vmap.batched(_forward, partitioned_vmap.fold_tokens)
_backward_b = partitioned_vmap.batched(_backward, partitioned_vmap.no_fold)  # per-element weight gradients


# ---- differentiable op -----------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(_OPERANDS,))
def _moe(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, static):
    return _forward_b(x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down, static)


def _moe_fwd(*args):
    *operands, static = args
    return _forward_b(*operands, static), tuple(operands)


def _moe_bwd(static, residuals, dy):
    """Gradients of the eight differentiable operands from the backward op; router_bias [E] f32 gets zeros (it
    moves the selection only, a step function of it)."""
    grads = tuple(_backward_b(*residuals, dy, static))
    return grads[:5] + (jnp.zeros_like(residuals[5]),) + grads[5:]


_moe.defvjp(_moe_fwd, _moe_bwd)


@validation.named_op
@validation.numpy_floats_as_jax
def moe_ffn_partitioned(x, router_logits, w_gate, w_up, w_down, *, top_k, sharding: MoEShardingConfig,
                        activation="silu", score_fn="softmax", implementation=None, router_bias=None,
                        renormalize=True, num_groups=None, top_groups=None, group_score="top2_sum", routed_scale=1.0,
                        b_gate=None, b_up=None, b_down=None):
    """``layer.moe_ffn`` partitioned over the mesh of its operands' shardings: x [..., D], router_logits [..., E],
    w_gate/w_up [E, D, F], w_down [E, F, D] -> x's shape (see module docstring); the routing options are
    ``moe_ffn``'s (``router_bias`` [E]: an operand of the partitioned ops, replicated, with a zero gradient);
    ``b_gate`` / ``b_up`` [E, F], ``b_down`` [E, D]: expert biases, sharded like their weights (item 5)."""
    if not isinstance(sharding, MoEShardingConfig):
        raise TypeError(f"sharding must be a MoEShardingConfig, got {type(sharding).__name__}")
    layer.check_weights(x, router_logits, w_gate, w_up, w_down)
    expert_bias.check(b_gate, b_up, b_down, w_gate, w_down)
    given = {n: b for n, b in zip(expert_bias.NAMES, (b_gate, b_up, b_down)) if b is not None}
    activation = layer.check_activation(activation)   # a GatedActivation: hashable, as the static part must be
    top_k = layer.check_top_k(top_k, w_gate.shape[0])  # an int (the static part must hash as one)
    routing = layer.check_routing(router_logits, top_k, router_bias, renormalize, num_groups, top_groups,
                                  routed_scale, group_score)
    dims = (math.prod(x.shape[:-1]), w_gate.shape[0], w_gate.shape[2])
    if 0 in x.shape or 0 in w_gate.shape:  # nothing to exchange: zeros and zero gradients, as on one device
        return layer.moe_ffn(x, router_logits, w_gate, w_up, w_down, top_k=top_k, activation=activation,
                             score_fn=score_fn, implementation=implementation, **routing, **given)
    bias = routing.pop("router_bias")
    static = _Static(top_k, activation, score_fn, implementation, sharding, dims, has_bias=bias is not None,
                     biases=tuple(given), **routing)
    # always operands (zeros when None, then unused: without a bias the selection is by logits, not scores + 0)
    bias = jnp.zeros((w_gate.shape[0],), jnp.float32) if bias is None else bias.astype(jnp.float32)
    e, d, f = w_gate.shape
    expert_biases = [given.get(n, jnp.zeros(shape, w_gate.dtype))
                     for n, shape in zip(expert_bias.NAMES, ((e, f), (e, f), (e, d)))]
    # inside a shard_map manual over part of the mesh: replicated weights' cotangents must be psum'd over the token
    # shards' manual axes, which the cast to their union does in its transpose (no-op outside shard_map)
    operands = vma.match_vma(x, router_logits, w_gate, w_up, w_down, bias, *expert_biases)
    mesh = _known_mesh(*operands)
    if mesh is not None:  # the partition rule's own checks, at trace time (else they fail inside the compiler)
        plan(sharding, mesh, None, *dims)
        _check_partitionable(implementation)
    # always compiled: custom_partitioning partitions only inside a jit (called eagerly, even under an eager
    # jax.grad / vmap, its body ran op by op on the sharded arrays: the one-device layer, dropless whatever the
    # capacity_factor)
    run = functools.partial(_compiled_flat, static=static)
    if mesh is not None and AxisType.Explicit in tuple(mesh.axis_types):
        # Explicit axes (jax.make_mesh's default): the custom partitioning plans the shardings itself, so the op
        # runs on Auto axes and hands back x's sharding (the jit inside: an eager backward then sees Auto types)
        run = auto_axes_like(run, operands[0])
    return run(*operands)


def _flat(x, router_logits, *rest, static):
    """The op on x / router_logits flattened to [T, D] / [T, E] (``rest``: the weights and biases); the result in
    x's shape."""
    out = _moe(reference.flatten_tokens(x), reference.flatten_tokens(router_logits), *rest, static)
    return out.reshape(x.shape)


_compiled_flat = jax.jit(_flat, static_argnames="static")
