"""Bad input to ``moe_ffn`` (single device, fused, partitioned) fails at trace time with an error naming the user's
argument or mesh axis: int / wrong-rank weights, x and router_logits, and sharding mistakes (E not divisible by the
expert axis, a mesh without the expert axis, ep_tp with F not divisible, the fsdp axis equal to the expert axis).
Cheap: only ``jax.jit(...).trace`` / ``.lower`` on the 8 forced CPU devices, nothing compiles or runs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_ops import experts_ffn, fused_experts_ffn, moe_ffn
from moe_ops.partitioned import moe_ffn_shard
from moe_ops.sharding import MoEShardingConfig

T, D, F, E, K = 16, 8, 8, 8, 2


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def shapes(t=T, d=D, f=F, e=E, dtype=jnp.float32):
    """ShapeDtypeStructs (x, router_logits, w_gate, w_up, w_down): tracing needs no data."""
    s = jax.ShapeDtypeStruct
    return [s((t, d), dtype), s((t, e), jnp.float32), s((e, d, f), dtype), s((e, d, f), dtype), s((e, f, d), dtype)]


def placed(mesh, args, specs):
    """The arguments as abstract values sharded on ``mesh`` (what ``device_put`` arrays look like to ``jit``)."""
    return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)) for a, s in zip(args, specs)]


ARG_NAMES = ("x", "router_logits", "w_gate", "w_up", "w_down")


@pytest.mark.parametrize("path", ["unfused", "fused", "partitioned"])
@pytest.mark.parametrize("bad", range(5), ids=ARG_NAMES)
def test_int_argument_is_named(bad, path):
    args = shapes()
    args[bad] = jax.ShapeDtypeStruct(args[bad].shape, jnp.int32)
    kw = dict(sharding=MoEShardingConfig()) if path == "partitioned" else dict(fused=path == "fused",
                                                                                 implementation="xla")
    with pytest.raises(TypeError, match=rf"^{ARG_NAMES[bad]} must be float"):
        jax.jit(functools.partial(moe_ffn, top_k=K, **kw)).trace(*args)


@pytest.mark.parametrize("bad,shape", [(0, (T,)), (1, (T, E, 1)), (2, (E, D)), (3, (E, D, F + 1)), (4, (E, F + 1, D))],
                         ids=ARG_NAMES)
def test_wrong_shape_is_named(bad, shape):
    args = shapes()
    args[bad] = jax.ShapeDtypeStruct(shape, args[bad].dtype)
    with pytest.raises(ValueError, match=rf"^{ARG_NAMES[bad]}\b"):
        jax.jit(functools.partial(moe_ffn, top_k=K, implementation="xla")).trace(*args)


def test_public_expert_helpers_name_their_arguments():
    x, _, wg, wu, wd = shapes()
    ints = jax.ShapeDtypeStruct(wu.shape, jnp.int32)
    sizes = jax.ShapeDtypeStruct((E,), jnp.int32)
    with pytest.raises(TypeError, match="^w_up must be float"):
        jax.eval_shape(experts_ffn, x, sizes, wg, ints, wd)
    ids = jax.ShapeDtypeStruct((T, K), jnp.int32)
    with pytest.raises(TypeError, match="^w_up must be float"):
        jax.eval_shape(fused_experts_ffn, x, jax.ShapeDtypeStruct((T, K), jnp.float32), ids, wg, ints, wd)


# ---- sharding mistakes: trace-time ValueError, not a compile-time custom_partitioner INTERNAL error ---------------

def _trace_sharded(mesh, config, args, specs):
    fn = jax.jit(functools.partial(moe_ffn, top_k=K, sharding=config))
    return fn.trace(*placed(mesh, args, specs)).lower()


def test_experts_not_divisible_by_expert_axis():
    mesh = make_mesh((8,), ("expert",))
    with pytest.raises(ValueError, match=r"w_gate.*E=12.*'expert'.*8"):
        _trace_sharded(mesh, MoEShardingConfig(strategy="all_to_all"), shapes(e=12), (P("expert"),) * 2 + (P(),) * 3)


@pytest.mark.parametrize("strategy", ["auto", "ring"])
def test_mesh_without_expert_axis(strategy):
    mesh = make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"expert_axis 'expert'.*\('data', 'model'\)"):
        _trace_sharded(mesh, MoEShardingConfig(strategy=strategy), shapes(), (P("data"),) * 2 + (P(),) * 3)


def test_ep_tp_hidden_not_divisible():
    mesh = make_mesh((2, 4), ("data", "expert"))
    with pytest.raises(ValueError, match=r"ep_tp.*w_gate.*F=6.*'expert'.*4"):
        _trace_sharded(mesh, MoEShardingConfig(strategy="ep_tp"), shapes(f=6), (P("data"),) * 2 + (P(),) * 3)


def test_fsdp_axis_equal_to_expert_axis():
    with pytest.raises(ValueError, match="fsdp_axis"):
        MoEShardingConfig(fsdp_axis="expert")


def test_mesh_from_context_is_checked_too():
    """Unsharded operands under ``jax.set_mesh``: the mesh comes from the context."""
    mesh = make_mesh((8,), ("expert",))
    a2a = MoEShardingConfig(strategy="all_to_all")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"w_gate.*E=12"):
        jax.jit(functools.partial(moe_ffn, top_k=K, sharding=a2a)).trace(*shapes(e=12))
    with jax.set_mesh(mesh):  # auto takes ep_tp where the experts do not split (F does)
        jax.jit(functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig())).trace(*shapes(e=12))


def test_valid_configuration_still_lowers():
    """The checks pass what the partitioner accepts: a (data, expert) mesh, auto, E and F divisible."""
    mesh = make_mesh((2, 4), ("data", "expert"))
    _trace_sharded(mesh, MoEShardingConfig(), shapes(), (P(("data", "expert")),) * 2 + (P("expert"),) * 3)


def test_shard_map_body_names_the_local_weights():
    """Inside a user's shard_map: local w_gate with the wrong expert count for the expert axis."""
    mesh = make_mesh((8,), ("expert",))
    fn = jax.shard_map(functools.partial(moe_ffn_shard, top_k=K, config=MoEShardingConfig(strategy="all_to_all")),
                       mesh=mesh, in_specs=(P("expert"),) * 2 + (P(),) * 3, out_specs=P("expert"))
    with pytest.raises(ValueError, match=r"w_gate.*E_l=8.*'expert'=8.*E=8"):
        jax.jit(fn).trace(*shapes())


def test_mesh_known_only_to_the_lowering():
    """``jit(in_shardings=...)`` over unsharded abstract arguments: trace time sees no mesh; Shardy's sharding rule
    (a callable, ``partitioned._checked_rule``) checks the jit's mesh while lowering: ValueError before partitioning.
    (The GSPMD partitioner has no such hook: there the partition rule's ValueError is raised inside XLA's callback,
    which aborts the process in jax 0.10.2; so it is not exercised here.)"""
    mesh = make_mesh((8,), ("expert",))
    shardings = (NamedSharding(mesh, P("expert")),) * 2 + (NamedSharding(mesh, P()),) * 3
    fn = jax.jit(functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy="ring")),
                 in_shardings=shardings)
    traced = fn.trace(*shapes(e=12))  # nothing raised at trace time: no mesh there
    with pytest.raises(ValueError, match=r"w_gate.*E=12.*'expert' of size 8"):
        traced.lower()


def test_inside_shard_map_the_local_blocks_are_not_checked_against_the_mesh():
    """moe_ffn(sharding=...) called inside a user's shard_map runs on local blocks: E=12 replicated on an 8-way
    expert axis is fine there (no false error from the manual mesh)."""
    mesh = make_mesh((8,), ("expert",))
    fn = jax.shard_map(functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig()), mesh=mesh,
                       in_specs=(P("expert"),) * 2 + (P(),) * 3, out_specs=P("expert"), check_vma=False)
    out = jax.eval_shape(fn, *shapes(e=12))
    assert out.shape == (T, D)


def test_partitioned_top_k_is_a_static_int():
    """As on one device (``moe_ops.route``): a NumPy integer ``top_k`` traces like an int (before: 'must be an int'
    on the partitioned path only), a bool is refused rather than taken as 1."""
    mesh = make_mesh((8,), ("expert",))
    with jax.set_mesh(mesh):
        jax.jit(functools.partial(moe_ffn, top_k=np.int64(K), sharding=MoEShardingConfig())).trace(*shapes())
        with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E=8\], got True"):
            jax.jit(functools.partial(moe_ffn, top_k=True, sharding=MoEShardingConfig())).trace(*shapes())
