"""The partition decision of the expert-parallel op (``moe_ops.partitioned``, items 1-5 of its docstring): which
strategy, which mesh axes shard the tokens, and the operand specs that follow."""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec as P

from moe_ops.sharding import MoEShardingConfig, choose_strategy, remove_axes, spec_axes, weight_spec

__all__ = ["Plan", "plan"]


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
        """Specs of (x, router_logits, w_gate, w_up, w_down, router_bias, b_gate, b_up, b_down): router_bias is
        replicated, the expert biases follow their weights' E / F sharding (b_down [E, D]: E only, so under ep_tp it
        is replicated over the expert axis and the shard adds it once)."""
        w_gate, w_up, w_down = self.weight_specs()
        biases = (P(w_gate[0], w_gate[2]), P(w_up[0], w_up[2]), P(w_down[0], None))
        return (self.token_spec(), self.token_spec(), w_gate, w_up, w_down, P(None)) + biases


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
