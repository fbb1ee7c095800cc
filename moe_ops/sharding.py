"""Sharding rules for the partitioned MoE op, as data: the config object, logical axes -> mesh axes, spec helpers;
and how every public op runs on operands sharded over Explicit mesh axes (``on_explicit_axes``).

Logical axes (names of array dimensions, independent of any mesh) are mapped to mesh axes by ``rules``
(a tuple of ``(logical name, mesh axes)`` pairs). Two invariants hold for every spec built here:

1. One mesh axis never shards two dimensions of one array (``check_no_duplicate_axes``).
2. With ``keep_batch_off_expert=True`` (the default) dimensions whose logical name is an *expert* axis claim their
   mesh axes first; every other dimension (the batch of the dispatched activations) drops the claimed axes. Without
   the switch the naive mapping of e.g. ``("expert", "batch", "embed")`` puts ``expert`` on two dims, and a
   partitioner given that spec abandons the expert-parallel all-to-all for all-gather + reduce-scatter.

Expert weights ``[E, D, F]`` / ``[E, F, D]`` keep E sharded over ``(expert, fsdp)`` together (expert major); the op
gathers them over ``fsdp`` at its boundary, so inside the op each expert shard holds ``E / EP`` whole experts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Iterable, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_ops import validation

__all__ = [
    "MoEShardingConfig", "STRATEGIES", "DEFAULT_RULES", "LOGICAL_AXES", "logical_to_spec", "remove_axes",
    "spec_axes", "check_no_duplicate_axes", "dispatched_spec", "token_spec", "weight_spec", "choose_strategy",
    "explicit_mesh", "auto_axes_like", "on_explicit_axes",
]

STRATEGIES = ("auto", "all_to_all", "ring", "ep_tp")


@dataclasses.dataclass(frozen=True)
class MoEShardingConfig:
    """How ``moe_ffn`` partitions over a mesh.

    strategy: ``auto`` | ``all_to_all`` | ``ring`` | ``ep_tp`` (see ``moe_ops.partitioned``).
    expert_axis: mesh axis the experts are split over (EP). ``fsdp_axis``: mesh axis the expert weights are
    additionally sharded over on E (gathered at the op boundary); ignored when absent from the mesh.
    batch_axes: mesh axes (a name or a sequence of names) the token dim is sharded over when the operand sharding
    does not say; names absent from the mesh are ignored, so the default, ``("data", "fsdp", expert_axis)``, fits
    data / fsdp / expert meshes alike (with a renamed ``expert_axis`` too).
    capacity_factor: ``None`` = dropless; else each device's all-to-all receive buffer holds ``ceil(cf * T_local *
    top_k)`` rows, the mean it receives (``ceil(cf * T_local * top_k / EP)`` when the tokens are replicated over the
    expert axis: each device then takes only its own experts' copies), capped at the dropless worst case, and copies
    past it are dropped deterministically (last sender's highest local experts first); a dropped copy adds nothing to
    its token's output and nothing flows back through it (the token's kept copies keep their routing weights: no
    renormalisation over the kept ones). Only ``all_to_all`` has such a buffer: ``ring`` and ``ep_tp`` are always
    dropless, so under ``auto`` whether copies can drop depends on the strategy it picks for the token count.
    ep_tp_max_tokens: ``auto`` picks ``ep_tp`` when the global token count is at most this.
    """
    strategy: str = "auto"
    expert_axis: str = "expert"
    batch_axes: tuple | str | None = None  # None: ("data", "fsdp", expert_axis)
    fsdp_axis: str | None = "fsdp"
    capacity_factor: float | None = None
    ep_tp_max_tokens: int = 64

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.expert_axis, str) or not isinstance(self.fsdp_axis, (str, type(None))):
            raise TypeError(f"expert_axis must be a mesh axis name and fsdp_axis a name or None, got "
                            f"{self.expert_axis!r} / {self.fsdp_axis!r}")
        if self.batch_axes is None:
            object.__setattr__(self, "batch_axes", tuple(dict.fromkeys(("data", "fsdp", self.expert_axis))))
        axes = self.batch_axes
        axes = tuple(axes) if isinstance(axes, Iterable) and not isinstance(axes, str) else (axes,)
        if not all(isinstance(a, str) for a in axes):
            raise TypeError(f"batch_axes must be a mesh axis name or a sequence of them, got {self.batch_axes!r}")
        object.__setattr__(self, "batch_axes", axes)
        if self.fsdp_axis is not None and self.fsdp_axis == self.expert_axis:
            raise ValueError(f"fsdp_axis must differ from expert_axis, got both {self.expert_axis!r}")
        cf = self.capacity_factor
        if cf is not None and not (isinstance(cf, numbers.Real) and not isinstance(cf, bool) and math.isfinite(cf)
                                   and cf > 0):
            raise ValueError(f"capacity_factor must be None or a finite number > 0, got {cf!r}")
        if not validation.is_static_int(self.ep_tp_max_tokens):
            raise TypeError(f"ep_tp_max_tokens must be an int, got {self.ep_tp_max_tokens!r}")


def choose_strategy(config: MoEShardingConfig, num_tokens: int, ep: int) -> str:
    """The concrete strategy: ``config.strategy`` unless ``auto``; ``auto`` = ``ep_tp`` for at most
    ``ep_tp_max_tokens`` global tokens (decode / small prefill), ``all_to_all`` when the tokens split over EP,
    else ``ring`` (``partitioned.plan`` then takes ``ep_tp`` where E does not split over EP)."""
    if config.strategy != "auto":
        return config.strategy
    if num_tokens <= config.ep_tp_max_tokens:
        return "ep_tp"
    return "all_to_all" if num_tokens % ep == 0 else "ring"


# Logical dimension names of the arrays the op sees or builds.
LOGICAL_AXES = {
    "tokens": ("batch", "embed"),                 # x / out [T, D]
    "logits": ("batch", "experts_unsharded"),     # router logits [T, E]
    "dispatched": ("expert", "batch", "embed"),   # all-to-all buffer [EP, B, D] (global view)
    "w_in": ("expert_fsdp", "embed", "mlp"),      # w_gate / w_up [E, D, F]
    "w_out": ("expert_fsdp", "mlp", "embed"),     # w_down [E, F, D]
    "w_in_tp": ("fsdp", "embed", "mlp_tp"),       # ep_tp: F split over the expert axis
    "w_out_tp": ("fsdp", "mlp_tp", "embed"),
}


def default_rules(config: MoEShardingConfig | None = None):
    """``(logical name, mesh axes)`` pairs for ``config`` (absent mesh axes are dropped by ``logical_to_spec``)."""
    c = config or MoEShardingConfig()
    fsdp = (c.fsdp_axis,) if c.fsdp_axis else ()
    return (("batch", c.batch_axes), ("expert", (c.expert_axis,)), ("expert_fsdp", (c.expert_axis,) + fsdp),
            ("fsdp", fsdp), ("mlp_tp", (c.expert_axis,)), ("embed", ()), ("mlp", ()), ("experts_unsharded", ()))


DEFAULT_RULES = default_rules()


def _is_expert_logical(name: str) -> bool:
    return name.startswith("expert") or name == "mlp_tp"


def logical_to_spec(logical_axes: Sequence[str], rules=DEFAULT_RULES, mesh_axis_names=None,
                    keep_batch_off_expert: bool = True) -> P:
    """PartitionSpec for an array with the given logical dims.

    Mesh axes not in ``mesh_axis_names`` (when given) are dropped. With ``keep_batch_off_expert`` the expert-like
    dims claim their axes first and the others drop claimed ones (invariant 2); without it the naive mapping is
    returned even when it maps one mesh axis twice (``check_no_duplicate_axes`` rejects it)."""
    table = dict(rules)
    resolved = []
    for name in logical_axes:
        axes = tuple(table.get(name, ()) or ())
        if mesh_axis_names is not None:
            axes = tuple(a for a in axes if a in mesh_axis_names)
        resolved.append(axes)
    if keep_batch_off_expert:
        claimed = set()
        for name, axes in zip(logical_axes, resolved):
            if _is_expert_logical(name):
                claimed.update(axes)
        resolved = [axes if _is_expert_logical(name) else tuple(a for a in axes if a not in claimed)
                    for name, axes in zip(logical_axes, resolved)]
    return P(*[_entry(axes) for axes in resolved])


def _entry(axes):
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def spec_axes(entry) -> tuple:
    """The mesh axes of one PartitionSpec entry (None / str / tuple) as a tuple."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def remove_axes(spec: P, axes) -> P:
    """``spec`` with the given mesh axes removed from every entry (e.g. drop ``fsdp`` from a weight spec before the
    per-shard computation, or ``expert`` from a token spec for a replicated batch)."""
    drop = {axes} if isinstance(axes, str) else set(axes)
    return P(*[_entry(a for a in spec_axes(e) if a not in drop) for e in spec])


def check_no_duplicate_axes(spec: P) -> P:
    """Raise ``ValueError`` if one mesh axis shards two dims of ``spec``; return ``spec``."""
    seen = {}
    for dim, entry in enumerate(spec):
        for axis in spec_axes(entry):
            if axis in seen:
                raise ValueError(f"mesh axis {axis!r} maps dims {seen[axis]} and {dim} of {spec}")
            seen[axis] = dim
    return spec


def dispatched_spec(config: MoEShardingConfig | None = None, mesh_axis_names=None,
                    keep_batch_off_expert: bool = True) -> P:
    """Spec of the global dispatched activations ``[EP, B, D]``: EP on ``expert``, B on the batch axes minus
    ``expert`` (with the switch)."""
    return logical_to_spec(LOGICAL_AXES["dispatched"], default_rules(config), mesh_axis_names, keep_batch_off_expert)


def token_spec(config: MoEShardingConfig | None = None, mesh_axis_names=None) -> P:
    """Spec of x / out ``[T, D]``: T over the batch axes."""
    return logical_to_spec(LOGICAL_AXES["tokens"], default_rules(config), mesh_axis_names)


def weight_spec(config: MoEShardingConfig | None = None, mesh_axis_names=None, *, down: bool = False,
                tensor_parallel: bool = False) -> P:
    """Spec of expert weights: ``[E, D, F]`` (``down``: ``[E, F, D]``) with E over ``(expert, fsdp)``; with
    ``tensor_parallel`` (ep_tp) E over ``fsdp`` and F over ``expert``."""
    key = ("w_out" if down else "w_in") + ("_tp" if tensor_parallel else "")
    return logical_to_spec(LOGICAL_AXES[key], default_rules(config), mesh_axis_names)


def explicit_mesh(*operands):
    """The mesh with Explicit axes (``jax.make_mesh``'s default) that the context (``jax.set_mesh``) or an operand's
    type carries, or None; None as well inside a ``shard_map`` (any Manual axis): the op then runs on the local
    blocks, and JAX allows no way from Manual back to Auto axes."""
    meshes = [jax.sharding.get_abstract_mesh()]
    meshes += [getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None) for a in operands]
    meshes = [m for m in meshes if m is not None and not m.empty]
    if any(AxisType.Manual in tuple(m.axis_types) for m in meshes):
        return None
    return next((m for m in meshes if AxisType.Explicit in tuple(m.axis_types)), None)


def auto_axes_like(fn, like):
    """``fn`` run on Auto axes, its result handed back with ``like``'s sharding (an operand with no mesh, e.g.
    uncommitted under ``jax.set_mesh``: its spec on the context mesh). For ops whose sort / scatter / kernel
    calls have no Explicit-axes sharding rule: XLA partitions them inside, as on an Auto mesh."""
    sharding = jax.typeof(like).sharding
    return jax.sharding.auto_axes(fn, out_sharding=P(*sharding.spec) if sharding.mesh.empty else sharding)


def on_explicit_axes(out_specs):
    """Decorator making a public op run on operands sharded over Explicit mesh axes (``jax.make_mesh``'s default).

    Its sorts, gathers and kernel calls have no Explicit sharding rule, so there the op runs on Auto axes (XLA
    partitions it, as on an Auto mesh) and its result is resharded to ``out_specs(spec, args)``: PartitionSpecs
    shaped like the result, from ``args`` (the op's arguments by name) and ``spec(name, dim)`` (the mesh axes that
    shard that dim of that argument, None if none); an axis taken by an earlier output dim is dropped from later
    ones. So do operands committed unsharded to an Explicit mesh with no context mesh (the op's own mesh-less
    intermediates would not match their types). Elsewhere (Auto meshes, unsharded operands under ``jax.set_mesh``,
    inside a ``shard_map``) the op runs as is. Only ``jax.Array`` operands cross the boundary (NumPy ones and static
    arguments are closed over); malformed arguments reach the op's own checks unchanged. NumPy float64 operands enter
    as float32 first, as JAX would take them (``validation.numpy_floats_as_jax``)."""
    def wrap(op):
        signature = inspect.signature(op)

        @functools.wraps(op)
        def run(*args, **kwargs):
            leaves, tree = jax.tree.flatten((args, kwargs))
            where = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
            arrays = [leaves[i] for i in where]
            mesh = explicit_mesh(*arrays)
            sharded = any(any(_type_spec(a)) for a in arrays)
            if mesh is None or not (sharded or jax.sharding.get_abstract_mesh().empty):
                return op(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                specs = out_specs(functools.partial(_dim_spec, bound.arguments), bound.arguments)
            except (TypeError, ValueError, IndexError, AttributeError):
                return op(*args, **kwargs)  # the op's own checks raise
            out = jax.tree.map(lambda s: NamedSharding(mesh, _distinct(s)), specs,
                               is_leaf=lambda s: isinstance(s, P))

            def body(*operands):
                filled = list(leaves)
                for i, a in zip(where, operands):
                    filled[i] = a
                a, k = jax.tree.unflatten(tree, filled)
                return op(*a, **k)
            return jax.sharding.auto_axes(body, out_sharding=out)(*arrays)
        return validation.numpy_floats_as_jax(run)
    return wrap


def _type_spec(a) -> tuple:
    """The PartitionSpec entries of ``a``'s type (its Explicit axes; empty when it has no mesh)."""
    return tuple(getattr(getattr(jax.typeof(a), "sharding", None), "spec", None) or ())


def _dim_spec(arguments, name, dim):
    a = arguments.get(name)
    spec = _type_spec(a) if isinstance(a, jax.Array) else ()
    return spec[dim] if -len(spec) <= dim < len(spec) else None


def _distinct(spec: P) -> P:
    """``spec`` with each mesh axis kept on its first dim only."""
    seen, entries = set(), []
    for e in spec:
        axes = tuple(a for a in spec_axes(e) if a not in seen)
        seen.update(axes)
        entries.append(_entry(axes))
    return P(*entries)
