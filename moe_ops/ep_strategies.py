"""Per-shard MoE computations with explicit collectives over named mesh axes (run inside ``shard_map`` or as the
lowering of the custom-partitioned op). All shapes below are per device.

Common inputs: x [T, D], router_logits [T, E] (all E experts), expert axis of size EP, ``E_l = E / EP``.
``moe_ffn_shard`` (public) picks one of the strategies below from the config and the weight layout.

* ``all_to_all`` (weights [E_l, D, F] / [E_l, F, D]): route -> permute by global expert (so copies are grouped by
  destination device) -> all_gather the [EP, E_l] count matrix -> ragged all-to-all into a receive buffer of
  ``buffer_rows`` -> permute by local expert -> expert FFN -> reverse ragged all-to-all -> weighted unpermute.
  With the batch replicated over the expert axis no rows cross devices; the partial outputs are psum'd.
* ``ring`` (weights [E_l, ...]): all_gather tokens over the expert axis (if sharded on it), route + permute every
  token, GMMs with ``group_offset = axis_index * E_l`` (non-local rows give zeros), unpermute, reduce-scatter
  (psum for a replicated batch).
* ``ep_tp`` (weights [E, D, F/EP] / [E, F/EP, D]): same skeleton, every expert local, F split across the expert axis
  as tensor parallelism; each device holds a partial sum over its F slice, combined by psum / reduce-scatter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_ops import ep_exchange, expert_bias, validation, vma
from moe_ops.layer import check_routing, experts_ffn, route_tokens
from moe_ops.sharding import MoEShardingConfig
from moe_ops.sort import permute, unpermute
from moe_ops.vma import match_vma

__all__ = ["moe_ffn_shard", "all_to_all_shard", "ring_shard", "ep_tp_shard", "received_expert_ids", "gather_fsdp"]


def gather_fsdp(weights, fsdp_axis):
    """All-gather expert weights over ``fsdp_axis`` on E (E was sharded over (expert, fsdp), expert major, so the
    gathered block is this expert shard's contiguous E_l experts)."""
    if fsdp_axis is None:
        return weights
    return tuple(None if w is None else jax.lax.all_gather(w, fsdp_axis, axis=0, tiled=True) for w in weights)


def received_expert_ids(recv_counts, recv_offsets, recv_sizes, num_rows):
    """Local expert id of each receive-buffer row (``E_l`` for rows nobody wrote).

    recv_counts [EP, E_l]: copies sender i routed to each of my local experts (sorted by expert in its chunk);
    recv_offsets/recv_sizes [EP]: where sender i's chunk starts here and how many rows of it arrived."""
    num_local = recv_counts.shape[1]
    r = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    member = (r >= recv_offsets[None, :]) & (r < (recv_offsets + recv_sizes)[None, :])   # [rows, EP]
    sender = jnp.argmax(member, axis=1)
    pos = r[:, 0] - recv_offsets[sender]
    ends = jnp.cumsum(recv_counts, axis=1)[sender]                                         # [rows, E_l]
    local = jnp.sum(pos[:, None] >= ends, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(member, axis=1), local, num_local)


def all_to_all_shard(x, router_logits, w_gate, w_up, w_down, *, top_k, expert_axis, batch_sharded=True,
                     capacity_factor=None, activation="silu", score_fn="softmax", implementation=None, biases=None,
                     **routing):
    """Expert-parallel all-to-all MoE on one shard: x [T, D], logits [T, E], weights [E_l, ...] -> [T, D].
    ``routing``: ``moe_ffn``'s routing options (router_bias, renormalize, num_groups, top_groups, group_score,
    routed_scale); ``biases``: the local experts' b_gate / b_up / b_down by name (``moe_ops.expert_bias``)."""
    ep = jax.lax.axis_size(expert_axis)
    me = jax.lax.axis_index(expert_axis)
    t, num_experts = router_logits.shape
    num_local = w_gate.shape[0]
    if num_local * ep != num_experts:
        raise ValueError(f"local w_gate holds E_l={num_local} experts; times the expert axis {expert_axis!r}={ep} "
                         f"that must equal router_logits' E={num_experts}")
    x, router_logits, w_gate, w_up, w_down = match_vma(x, router_logits, w_gate, w_up, w_down)
    weights, ids = route_tokens(router_logits, top_k, score_fn=score_fn, **routing)
    x_sorted, sizes, sort_idx = permute(x, ids, num_experts, implementation=implementation)
    local_counts = sizes.reshape(ep, num_local)                        # [dst device, its local expert]
    if batch_sharded:
        all_counts = jax.lax.all_gather(local_counts, expert_axis)     # [src, dst, E_l]
    else:
        all_counts = jnp.broadcast_to(local_counts, (ep,) + local_counts.shape)
    rows = ep_exchange.buffer_rows(t, top_k, ep, num_experts, batch_sharded, capacity_factor)
    plan = ep_exchange.exchange_plan(jnp.sum(all_counts, axis=2), rows, batch_sharded)
    a2a = dict(axis_name=expert_axis, local_only=not batch_sharded)
    empty_buf = match_vma(jnp.zeros((rows, x.shape[1]), x.dtype), x_sorted)[0]  # result takes its vma
    buf = ep_exchange.ragged_all_to_all(x_sorted, empty_buf, *ep_exchange.all_to_all_params(plan, me), **a2a)
    recv_ids = received_expert_ids(all_counts[:, me, :], plan.out_off[:, me], plan.sent[:, me], rows)
    n_valid = jnp.sum(plan.sent[:, me])  # received rows; unwritten rows have id E_l and sort after them
    with validation.checked(False):  # the padding id E_l is ours, out of range on purpose: no value check
        x_local, local_sizes, local_idx = permute(buf, recv_ids[:, None], num_local, n_valid=n_valid,
                                                  implementation=implementation)
    y_local = experts_ffn(x_local, local_sizes, w_gate, w_up, w_down, activation=activation,
                          implementation=implementation, **(biases or {}))
    ones = match_vma(jnp.ones((rows, 1), jnp.float32), y_local)[0]
    y_buf = unpermute(y_local, local_idx, ones, n_valid=n_valid, implementation=implementation)
    empty_back = match_vma(jnp.zeros_like(x_sorted), y_buf)[0]
    y_back = ep_exchange.ragged_all_to_all(y_buf, empty_back, *ep_exchange.reverse_params(plan, me), **a2a)
    out = unpermute(y_back, sort_idx, weights, implementation=implementation)
    return out if batch_sharded else jax.lax.psum(out, expert_axis)


def _gathered_shard(x, router_logits, w_gate, w_up, w_down, *, top_k, expert_axis, tokens_on_expert,
                    tensor_parallel, activation, score_fn, implementation, biases=None, **routing):
    """Skeleton of ``ring`` / ``ep_tp``: every device routes the (gathered) batch, computes its slice of the experts,
    and the partial outputs are reduce-scattered (or psum'd for a replicated batch). ``ep_tp``'s b_down (all
    experts, full D) is added on expert-axis index 0 only: the partial outputs are summed over the axis."""
    biases = dict(biases or {})
    if tensor_parallel and biases.get("b_down") is not None:
        first = jax.lax.axis_index(expert_axis) == 0
        biases["b_down"] = jnp.where(first, biases["b_down"], jnp.zeros((), biases["b_down"].dtype))
    if tokens_on_expert:
        x = jax.lax.all_gather(x, expert_axis, axis=0, tiled=True)
        router_logits = jax.lax.all_gather(router_logits, expert_axis, axis=0, tiled=True)
    x, router_logits, w_gate, w_up, w_down = match_vma(x, router_logits, w_gate, w_up, w_down)
    num_experts = router_logits.shape[1]
    weights, ids = route_tokens(router_logits, top_k, score_fn=score_fn, **routing)
    x_sorted, sizes, sort_idx = permute(x, ids, num_experts, implementation=implementation)
    offset = None if tensor_parallel else jax.lax.axis_index(expert_axis) * w_gate.shape[0]
    y = experts_ffn(x_sorted, sizes, w_gate, w_up, w_down, activation=activation, group_offset=offset,
                    implementation=implementation, **biases)
    partial = unpermute(y, sort_idx, weights, implementation=implementation)
    if tokens_on_expert:
        return jax.lax.psum_scatter(partial, expert_axis, scatter_dimension=0, tiled=True)
    return jax.lax.psum(partial, expert_axis)


def ring_shard(x, router_logits, w_gate, w_up, w_down, *, top_k, expert_axis, tokens_on_expert=True,
               activation="silu", score_fn="softmax", implementation=None, **routing):
    """Ring of experts on one shard: x [T, D], logits [T, E], weights [E_l, ...] -> [T, D] (``routing``: as
    ``all_to_all_shard``'s)."""
    ep = jax.lax.axis_size(expert_axis)
    if w_gate.shape[0] * ep != router_logits.shape[1]:
        raise ValueError(f"local w_gate holds E_l={w_gate.shape[0]} experts; times the expert axis "
                         f"{expert_axis!r}={ep} that must equal router_logits' E={router_logits.shape[1]}")
    return _gathered_shard(x, router_logits, w_gate, w_up, w_down, top_k=top_k, expert_axis=expert_axis,
                           tokens_on_expert=tokens_on_expert, tensor_parallel=False, activation=activation,
                           score_fn=score_fn, implementation=implementation, **routing)


def ep_tp_shard(x, router_logits, w_gate, w_up, w_down, *, top_k, expert_axis, tokens_on_expert=False,
                activation="silu", score_fn="softmax", implementation=None, **routing):
    """Experts as tensor parallelism on one shard: x [T, D], logits [T, E], w_gate/w_up [E, D, F/EP],
    w_down [E, F/EP, D] -> [T, D] (``routing``: as ``all_to_all_shard``'s)."""
    if w_gate.shape[0] != router_logits.shape[1]:
        raise ValueError(f"ep_tp needs all router_logits' E={router_logits.shape[1]} experts in the local w_gate, "
                         f"got {w_gate.shape[0]}")
    return _gathered_shard(x, router_logits, w_gate, w_up, w_down, top_k=top_k, expert_axis=expert_axis,
                           tokens_on_expert=tokens_on_expert, tensor_parallel=True, activation=activation,
                           score_fn=score_fn, implementation=implementation, **routing)


def _bound_axis_size(name, axis):
    """The size of the named mesh axis of the enclosing ``shard_map``; a ``ValueError`` naming the argument (JAX's
    own is a bare 'unbound axis name') when there is no such axis."""
    try:
        return jax.lax.axis_size(axis)
    except NameError:
        mesh = jax.sharding.get_abstract_mesh()
        names = () if mesh is None or mesh.empty else tuple(mesh.axis_names)
        raise ValueError(f"{name} {axis!r} is not an axis of the shard_map mesh {names}: moe_ffn_shard runs inside "
                         f"a jax.shard_map over a mesh with its expert (and fsdp) axes") from None


@validation.named_op
@validation.numpy_floats_as_jax
def moe_ffn_shard(x, router_logits, w_gate, w_up, w_down, *, top_k, config=MoEShardingConfig(),
                  tokens_on_expert=None, fsdp_axis=None, activation="silu", score_fn="softmax", implementation=None,
                  router_bias=None, renormalize=True, num_groups=None, top_groups=None, group_score="top2_sum",
                  routed_scale=1.0, b_gate=None, b_up=None, b_down=None):
    """Per-shard MoE for use inside ``shard_map`` over a mesh with ``config.expert_axis``.

    x [T_l, D] and router_logits [T_l, E] are this device's tokens (sharded over the expert axis iff
    ``tokens_on_expert``; by default read from x's varying manual axes under ``check_vma`` (any operand typed as
    varying shows it is on), else ``expert_axis in config.batch_axes``); weights are the local blocks (E_l experts,
    or for ``ep_tp`` all experts with F/EP), additionally sharded over ``fsdp_axis`` on E when given. ``auto`` reads
    the weight layout: ``ep_tp`` when every expert is local, else ``all_to_all``. Under ``check_vma``, weights
    typed as replicated over the expert axis are refused for ``ep_tp`` (it would sum EP full copies). The routing
    options are ``moe_ffn``'s (``router_bias`` [E] replicated: every device routes with all E experts).
    ``b_gate`` / ``b_up`` / ``b_down``: per-expert biases (``moe_ops.expert_bias``) as local blocks laid out like
    the weights (b_gate / b_up [E_l, F], ``ep_tp``: [E, F/EP]; b_down [E_l, D], ``ep_tp``: [E, D] replicated over
    the expert axis, added once), sharded over ``fsdp_axis`` on E like them. Zero tokens (T_l = 0) give [0, D] and
    zero gradients, with no collective."""
    if not isinstance(config, MoEShardingConfig):
        raise TypeError(f"config must be a MoEShardingConfig, got {type(config).__name__}")
    validation.flag("tokens_on_expert", tokens_on_expert, optional=True)
    validation.float_array("x", x, 2)
    validation.float_array("router_logits", router_logits, 2)
    if router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"router_logits must be [T, E] with x's T={x.shape[0]} tokens (this shard's x is "
                         f"{tuple(x.shape)}), got {tuple(router_logits.shape)}")
    validation.check_expert_weights(x, w_gate, w_up, w_down)
    expert_bias.check(b_gate, b_up, b_down, w_gate, w_down)
    routing = check_routing(router_logits, top_k, router_bias, renormalize, num_groups, top_groups, routed_scale,
                            group_score)
    axis = config.expert_axis
    ep = _bound_axis_size("config.expert_axis", axis)
    if fsdp_axis is not None:
        _bound_axis_size("fsdp_axis", fsdp_axis)
    empty = validation.zeros_if_empty(x.shape, x.dtype, (x.shape[0],), x)
    if empty is not None:   # no local tokens (then on no shard: shapes are static): nothing to exchange
        return empty
    operands = (x, router_logits, w_gate, w_up, w_down)
    typed = any(vma.varying_axes(a) for a in operands)  # check_vma is on: "varies over nothing" means replicated
    if tokens_on_expert is None:  # what x's type says (shard_map's check_vma), else the config's batch axes
        tokens_on_expert = axis in vma.varying_axes(x) if typed else axis in config.batch_axes
    w_gate, w_up, w_down = gather_fsdp((w_gate, w_up, w_down), fsdp_axis)
    biases = {n: b for n, b in zip(expert_bias.NAMES, gather_fsdp((b_gate, b_up, b_down), fsdp_axis))
              if b is not None}
    strategy = config.strategy
    if strategy == "auto":  # the caller fixed the weight layout: all experts local means ep_tp
        strategy = "ep_tp" if w_gate.shape[0] == router_logits.shape[1] and ep > 1 else "all_to_all"
    if strategy == "ep_tp" and ep > 1 and typed and any(axis not in vma.varying_axes(w) for w in operands[2:]):
        raise ValueError(f"strategy ep_tp (chosen by {config.strategy!r}) needs w_gate / w_up / w_down split on F over "
                         f"the expert axis {axis!r}, but their types say they are replicated over it: shard F over "
                         f"{axis!r} (in_specs P(None, None, {axis!r}) / P(None, {axis!r}, None)), or shard E over it "
                         f"with strategy 'all_to_all' / 'ring'")
    common = dict(top_k=top_k, expert_axis=axis, activation=activation, score_fn=score_fn,
                  implementation=implementation, biases=biases, **routing)
    if strategy == "all_to_all":
        return all_to_all_shard(x, router_logits, w_gate, w_up, w_down, batch_sharded=tokens_on_expert,
                                capacity_factor=config.capacity_factor, **common)
    fn = ring_shard if strategy == "ring" else ep_tp_shard
    return fn(x, router_logits, w_gate, w_up, w_down, tokens_on_expert=tokens_on_expert, **common)
