"""What an audit of the expert-parallel ops (``moe_ffn(..., sharding=)`` / ``moe_ffn_partitioned`` and
``moe_ffn_shard``) found: an eager call ran the one-device layer op by op (no expert-parallel strategy, so a
``capacity_factor`` dropped nothing), nested ``jax.vmap`` had no batching rule, and bad arguments to ``moe_ffn_shard``
or ``MoEShardingConfig`` raised errors naming an internal argument (``x_sorted``, ``expert_ids``) or none at all."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_ops import moe_ffn, reference
from moe_ops.partitioned import moe_ffn_shard
from moe_ops.sharding import MoEShardingConfig
from tests.helpers import assert_close, keys, randn

T, D, F, E, K = 32, 8, 8, 8, 2


def _mesh(shape=(8,), names=("expert",)):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _inputs(seed, tokens=(T,), hot=None):
    ks = keys(seed, 6)
    logits = randn(ks[1], tokens + (E,))
    if hot is not None:  # one expert takes most tokens: its device's receive buffer overflows
        logits = logits.at[..., hot].add(3.0)
    return (randn(ks[0], tokens + (D,)), logits, randn(ks[2], (E, D, F), scale=0.3),
            randn(ks[3], (E, D, F), scale=0.3), randn(ks[4], (E, F, D), scale=0.3)), randn(ks[5], tokens + (D,))


def _value_and_grads(fn, args, dy):
    out, vjp = jax.vjp(fn, *args)
    return (out,) + tuple(vjp(dy))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_eager_call_is_partitioned_like_a_jitted_one(axis_type):
    """custom_partitioning partitions only inside a jit: called eagerly, the op ran its one-device body op by op on
    the sharded arrays, which is dropless, so with a capacity_factor that drops copies the eager result (and its
    gradients) differed from the jitted one by 100 %. On Explicit axes (committed, no jax.set_mesh) the eager
    backward must see the Auto types the op runs on inside."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(axis_type,))
    args, dy = _inputs(0, hot=2)
    placed = [jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in args]
    dy = jax.device_put(dy, NamedSharding(mesh, P("expert")))
    cfg = MoEShardingConfig(strategy="all_to_all", capacity_factor=1.0)
    fn = functools.partial(moe_ffn, top_k=K, sharding=cfg, implementation="xla")
    jitted = jax.jit(functools.partial(_value_and_grads, fn))(placed, dy)
    dropless = reference.moe_ffn_dense(*args, top_k=K)
    assert float(jnp.linalg.norm(jitted[0] - dropless)) > 0.1 * float(jnp.linalg.norm(dropless))  # copies dropped
    eager = _value_and_grads(fn, placed, dy)
    for name, a, b in zip(("out", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"), eager, jitted):
        assert_close(a, b, 1e-6, f"eager {name}")


@pytest.mark.parametrize("capacity_factor", [None, 100.0], ids=["fold", "per_element"])
def test_nested_vmap(capacity_factor):
    """vmap(vmap(op)): the batching rule called the custom-partitioned op itself, which has no batching rule for
    the outer vmap (NotImplementedError); forward and the gradient of x through both vmaps against the dense op."""
    mesh = _mesh((2, 4), ("data", "expert"))
    (x, logits, wg, wu, wd), _ = _inputs(1, tokens=(2, 3, 8))
    cfg = MoEShardingConfig(strategy="all_to_all", capacity_factor=capacity_factor)
    ours = lambda a, b: moe_ffn(a, b, wg, wu, wd, top_k=K, sharding=cfg, implementation="xla")
    dense = lambda a, b: reference.moe_ffn_dense(a, b, wg, wu, wd, top_k=K)
    spec = NamedSharding(mesh, P(None, None, ("data", "expert")))
    xs, ls = jax.device_put(x, spec), jax.device_put(logits, spec)
    assert_close(jax.jit(jax.vmap(jax.vmap(ours)))(xs, ls), jax.vmap(jax.vmap(dense))(x, logits), 1e-5, "forward")
    loss = lambda fn: lambda a: jnp.sum(jnp.sin(jax.vmap(jax.vmap(fn))(a, logits)))
    assert_close(jax.jit(jax.grad(loss(ours)))(xs), jax.grad(loss(dense))(x), 1e-5, "dx")


# ---- bad arguments name themselves ------------------------------------------------------------------------------

def _shard_call(mesh, in_specs, out_specs, args, check_vma=True, **kw):
    fn = functools.partial(moe_ffn_shard, top_k=K, implementation="xla", **kw)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)).trace(
        *args)


def test_shard_config_must_be_a_sharding_config():
    args, _ = _inputs(2)
    with pytest.raises(TypeError, match="^config must be a MoEShardingConfig, got dict"):
        _shard_call(_mesh(), (P("expert"),) * 5, P("expert"), args, config={"strategy": "ring"})


@pytest.mark.parametrize("which", ["expert_axis", "fsdp_axis"])
def test_shard_axis_names_missing_from_the_mesh(which):
    """A JAX NameError 'unbound axis name: ep' named neither the argument nor the mesh's axes."""
    args, _ = _inputs(3)
    kw = dict(config=MoEShardingConfig(expert_axis="ep")) if which == "expert_axis" else dict(fsdp_axis="fsdp")
    with pytest.raises(ValueError, match=rf"{which} '(ep|fsdp)' is not an axis of the shard_map mesh \('expert',\)"):
        _shard_call(_mesh(), (P("expert"),) * 5, P("expert"), args, **kw)


@pytest.mark.parametrize("strategy", ["all_to_all", "ring", "ep_tp"])
def test_shard_operand_shapes_are_named(strategy):
    """x with the wrong D was reported as 'x_sorted', router_logits with another token count as 'expert_ids'."""
    mesh = _mesh()
    args, _ = _inputs(4)
    cfg = MoEShardingConfig(strategy=strategy)
    w = ((P(None, None, "expert"),) * 2 + (P(None, "expert", None),) if strategy == "ep_tp" else (P("expert"),) * 3)
    tok = P() if strategy == "ep_tp" else P("expert")
    wide = [jnp.ones((T, 2 * D))] + list(args[1:])
    with pytest.raises(ValueError, match=r"^x \[\.\.\., D\] must have D=8"):
        _shard_call(mesh, (tok, tok) + w, tok, wide, config=cfg)
    other = P("expert") if tok == P() else P()
    with pytest.raises(ValueError, match=r"^router_logits must be \[T, E\] with x's T=\d+ tokens"):
        _shard_call(mesh, (tok, other) + w, tok, args, config=cfg)


def test_shard_tokens_on_expert_must_be_a_bool():
    """A string was taken by truthiness ('no' -> sharded), silently misreading replicated tokens."""
    args, _ = _inputs(5)
    with pytest.raises(TypeError, match="^tokens_on_expert must be None, True or False, got 'no'"):
        _shard_call(_mesh(), (P(),) * 2 + (P("expert"),) * 3, P(), args, check_vma=False, tokens_on_expert="no")


@pytest.mark.parametrize("batch_axes", [3, ("data", 3)])
def test_config_batch_axes_type_is_named(batch_axes):
    """batch_axes=3 raised a bare "'int' object is not iterable"."""
    with pytest.raises(TypeError, match="^batch_axes must be a mesh axis name or a sequence of them"):
        MoEShardingConfig(batch_axes=batch_axes)


@pytest.mark.parametrize("flag", ["fused", "recompute"])
def test_layer_flags_are_checked_with_sharding(flag):
    """Failed before the fix for ``fused``: with ``sharding=`` a string ``fused="no"`` was not checked (the shards
    choose the fused path themselves), where without it the same call raises."""
    x, logits, wg, wu, wd = _inputs(7)[0]
    with pytest.raises(TypeError, match=flag):
        moe_ffn(x, logits, wg, wu, wd, top_k=K, sharding=MoEShardingConfig(), **{flag: "no"})
