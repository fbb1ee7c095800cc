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

The backward runs ``jax.vjp`` of the same per-shard function (recomputing the forward) for x, router_logits and
the weights; router_bias, which only moves the selection, gets zeros from the custom VJP. Its collectives are
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
from moe_ops import backend, layer, partitioned_vmap, validation, vma
from moe_ops.ep_strategies import moe_ffn_shard
from moe_ops.sharding import (MoEShardingConfig, auto_axes_like, choose_strategy, remove_axes, spec_axes,
                              weight_spec)

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

    def routing(self, router_bias):
        """``moe_ffn``'s routing keywords, with the bias operand (ignored unless ``has_bias``)."""
        names = ("renormalize", "num_groups", "top_groups", "group_score", "routed_scale")
        return dict(router_bias=router_bias if self.has_bias else None, **{n: getattr(self, n) for n in names})


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the partition rule decided (see module docstring items 1-3); specs come from ``sharding``'s rules."""
    strategy: str
    token_axes: tuple
    expert_axis: str
    fsdp_axis: str | None
    mesh_axis_names: tuple = ()

    @property
    def tokens_on_expert(self):
        return self.expert_axis in self.token_axes

    def token_spec(self):
        return P(self.token_axes or None, None)

    def weight_specs(self):
        """Specs of (w_gate, w_up, w_down) at the op boundary: E over (expert, fsdp), or for ep_tp E over fsdp and
        F over expert."""
        cfg = MoEShardingConfig(expert_axis=self.expert_axis, fsdp_axis=self.fsdp_axis)
        kw = dict(mesh_axis_names=self.mesh_axis_names, tensor_parallel=self.strategy == "ep_tp")
        w_in = weight_spec(cfg, **kw)
        return w_in, w_in, weight_spec(cfg, down=True, **kw)

    def arg_specs(self):
        """Specs of (x, router_logits, w_gate, w_up, w_down, router_bias): the bias is replicated."""
        return (self.token_spec(), self.token_spec()) + self.weight_specs() + (P(None),)


def _operand_token_axes(sharding):
    spec = getattr(sharding, "spec", None)
    return spec_axes(spec[0]) if spec is not None and len(spec) > 0 else ()


def plan(config: MoEShardingConfig, mesh, x_sharding, num_tokens: int, num_experts: int, hidden_f: int) -> Plan:
    """The partition decision for x [T, D] with sharding ``x_sharding`` (may be None) on ``mesh``."""
    axis = config.expert_axis
    if axis not in mesh.axis_names:
        raise ValueError(f"sharding.expert_axis {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}: the "
                         f"mesh lacks the expert axis (name it in MoEShardingConfig(expert_axis=...))")
    ep = mesh.shape[axis]
    strategy = choose_strategy(config, num_tokens, ep)
    if num_experts % ep and config.strategy == "auto" and hidden_f % ep == 0:
        strategy = "ep_tp"  # the experts do not split over the axis, F does: every device keeps all E experts
    if strategy == "ep_tp" and hidden_f % ep:
        if config.strategy == "ep_tp" or num_experts % ep:
            raise ValueError(f"strategy ep_tp splits w_gate's F={hidden_f} over the expert axis {axis!r} of size "
                             f"{ep}: F must be a multiple of {ep} (or use strategy 'ring' / 'all_to_all' with E a "
                             f"multiple of {ep}; E={num_experts})")
        strategy = "ring"
    if strategy != "ep_tp" and num_experts % ep:
        raise ValueError(f"w_gate / w_up / w_down have E={num_experts} experts, which do not split over the expert "
                         f"axis {axis!r} of size {ep} (strategy {strategy!r}): E must be a multiple of {ep}, or use "
                         f"strategy 'ep_tp' (F split over the axis)")
    axes = [a for a in dict.fromkeys(_operand_token_axes(x_sharding) or config.batch_axes) if a in mesh.axis_names]
    if strategy == "all_to_all" and axis not in axes:
        axes.append(axis)
    if strategy == "ep_tp":  # replicated batch: drop expert from the token spec
        axes = list(spec_axes(remove_axes(P(tuple(axes)), axis)[0]))
    kept, size = [], 1
    for a in axes:  # keep the axes whose product divides T
        if num_tokens % (size * mesh.shape[a]) == 0:
            kept.append(a)
            size *= mesh.shape[a]
    fsdp = config.fsdp_axis
    e_split = 1 if strategy == "ep_tp" else ep
    if fsdp not in mesh.axis_names or fsdp == axis or num_experts % (e_split * mesh.shape[fsdp]):
        fsdp = None
    return Plan(strategy, tuple(kept), axis, fsdp, tuple(mesh.axis_names))


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
    """The per-shard function of (x, router_logits, w_gate, w_up, w_down, router_bias)."""
    cfg = dataclasses.replace(static.config, strategy=p.strategy)

    def shard(x, router_logits, w_gate, w_up, w_down, router_bias):
        return moe_ffn_shard(x, router_logits, w_gate, w_up, w_down, top_k=static.top_k, config=cfg,
                             tokens_on_expert=p.tokens_on_expert, fsdp_axis=p.fsdp_axis, activation=static.activation,
                             score_fn=static.score_fn, implementation=static.implementation,
                             **static.routing(router_bias))
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


def _single_device(x, router_logits, w_gate, w_up, w_down, router_bias, static):
    with validation.checked(False):  # traced inside custom_partitioning too (see _per_shard)
        return layer.moe_ffn(x, router_logits, w_gate, w_up, w_down, top_k=static.top_k,
                             activation=static.activation, score_fn=static.score_fn,
                             implementation=static.implementation, **static.routing(router_bias))


# ---- forward op ------------------------------------------------------------------------------------------------
@functools.partial(custom_partitioning, static_argnums=(6,))
def _forward(x, router_logits, w_gate, w_up, w_down, router_bias, static):
    return _single_device(x, router_logits, w_gate, w_up, w_down, router_bias, static)


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


_FWD_RULE = "t d, t e, w i f, w i f, w f i, e -> t d"  # the last operand: router_bias [E], replicated
_forward.def_partition(partition=_forward_partition, infer_sharding_from_operands=_forward_infer,
                       propagate_user_sharding=_propagate_user, sharding_rule=_checked_rule(_FWD_RULE))


# ---- backward op: gradients of x, router_logits and the weights (router_bias only selects: its gradient is zero,
# which ``_moe_bwd`` returns without a partitioned output) ------------------------------------------------------
def _backward_one_device(x, router_logits, w_gate, w_up, w_down, router_bias, dy, static):
    _, vjp = jax.vjp(lambda *a: _single_device(*a, router_bias, static), x, router_logits, w_gate, w_up, w_down)
    return vjp(dy)


@functools.partial(custom_partitioning, static_argnums=(7,))
def _backward(x, router_logits, w_gate, w_up, w_down, router_bias, dy, static):
    return _backward_one_device(x, router_logits, w_gate, w_up, w_down, router_bias, dy, static)


def _backward_partition(static, mesh, arg_shapes, result_shape):
    p = _plan_from_args(static, mesh, arg_shapes)
    if p is None:
        return (mesh, _per_shard(lambda *a: _backward_one_device(*a, static)),
                tuple(a.sharding for a in arg_shapes[:5]), tuple(a.sharding for a in arg_shapes))
    specs = p.arg_specs()
    shard = _shard_fn(static, p)
    out_copies = math.prod(mesh.shape[a] for a in _replicated_axes(mesh, p.token_spec()))

    def lower(x, router_logits, w_gate, w_up, w_down, router_bias, dy):
        _, vjp = jax.vjp(lambda *a: shard(*a, router_bias), x, router_logits, w_gate, w_up, w_down)
        grads = vjp((dy / out_copies).astype(dy.dtype))
        return tuple(_psum(g, _replicated_axes(mesh, s)) for g, s in zip(grads, specs))

    return mesh, _per_shard(lower), _named(mesh, specs[:5]), _named(mesh, specs + (p.token_spec(),))


def _psum(g, axes):
    return jax.lax.psum(g, axes) if axes else g


def _backward_infer(static, mesh, arg_shapes, result_shape):
    p = _plan_from_args(static, mesh, arg_shapes)
    return tuple(a.sharding for a in arg_shapes[:5]) if p is None else _named(mesh, p.arg_specs()[:5])


_BWD_RULE = "t d, t e, w i f, w i f, w f i, e, t d -> t d, t e, w i f, w i f, w f i"
_backward.def_partition(partition=_backward_partition, infer_sharding_from_operands=_backward_infer,
                        sharding_rule=_checked_rule(_BWD_RULE))


# ---- vmap (custom_partitioning has no batching rule: ``partitioned_vmap``) ---------------------------------------
_forward_b = partitioned_vmap.batched(_forward, partitioned_vmap.fold_tokens)
_backward_b = partitioned_vmap.batched(_backward, partitioned_vmap.no_fold)  # per-element weight gradients


# ---- differentiable op -----------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _moe(x, router_logits, w_gate, w_up, w_down, router_bias, static):
    return _forward_b(x, router_logits, w_gate, w_up, w_down, router_bias, static)


def _moe_fwd(x, router_logits, w_gate, w_up, w_down, router_bias, static):
    operands = (x, router_logits, w_gate, w_up, w_down, router_bias)
    return _forward_b(*operands, static), operands


def _moe_bwd(static, residuals, dy):
    """Gradients of the five differentiable operands from the backward op; router_bias [E] f32 gets zeros (it moves
    the selection only, a step function of it)."""
    return tuple(_backward_b(*residuals, dy, static)) + (jnp.zeros_like(residuals[5]),)


_moe.defvjp(_moe_fwd, _moe_bwd)


@validation.numpy_floats_as_jax
def moe_ffn_partitioned(x, router_logits, w_gate, w_up, w_down, *, top_k, sharding: MoEShardingConfig,
                        activation="silu", score_fn="softmax", implementation=None, router_bias=None,
                        renormalize=True, num_groups=None, top_groups=None, group_score="top2_sum", routed_scale=1.0):
    """``layer.moe_ffn`` partitioned over the mesh of its operands' shardings: x [..., D], router_logits [..., E],
    w_gate/w_up [E, D, F], w_down [E, F, D] -> x's shape (see module docstring); the routing options are
    ``moe_ffn``'s (``router_bias`` [E]: an operand of the partitioned ops, replicated, with a zero gradient)."""
    if not isinstance(sharding, MoEShardingConfig):
        raise TypeError(f"sharding must be a MoEShardingConfig, got {type(sharding).__name__}")
    layer.check_weights(x, router_logits, w_gate, w_up, w_down)
    activation = layer.check_activation(activation)   # a GatedActivation: hashable, as the static part must be
    top_k = layer.check_top_k(top_k, w_gate.shape[0])  # an int (the static part must hash as one)
    routing = layer.check_routing(router_logits, top_k, router_bias, renormalize, num_groups, top_groups,
                                  routed_scale, group_score)
    dims = (math.prod(x.shape[:-1]), w_gate.shape[0], w_gate.shape[2])
    if 0 in x.shape or 0 in w_gate.shape:  # nothing to exchange: zeros and zero gradients, as on one device
        return layer.moe_ffn(x, router_logits, w_gate, w_up, w_down, top_k=top_k, activation=activation,
                             score_fn=score_fn, implementation=implementation, **routing)
    bias = routing.pop("router_bias")
    static = _Static(top_k, activation, score_fn, implementation, sharding, dims, has_bias=bias is not None,
                     **routing)
    # always an operand (zeros when None, then unused: without a bias the selection is by logits, not scores + 0)
    bias = jnp.zeros((w_gate.shape[0],), jnp.float32) if bias is None else bias.astype(jnp.float32)
    # inside a shard_map manual over part of the mesh: replicated weights' cotangents must be psum'd over the token
    # shards' manual axes, which the cast to their union does in its transpose (no-op outside shard_map)
    operands = vma.match_vma(x, router_logits, w_gate, w_up, w_down, bias)
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


def _flat(x, router_logits, w_gate, w_up, w_down, router_bias, static):
    """The op on x / router_logits flattened to [T, D] / [T, E]; the result in x's shape."""
    out = _moe(x.reshape(-1, x.shape[-1]), router_logits.reshape(-1, router_logits.shape[-1]), w_gate, w_up, w_down,
               router_bias, static)
    return out.reshape(x.shape)


_compiled_flat = jax.jit(_flat, static_argnames="static")
