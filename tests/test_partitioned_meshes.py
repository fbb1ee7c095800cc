"""The partitioned MoE op on the meshes and transforms model code brings: ``jax.make_mesh``'s default Explicit axes,
``jax.set_mesh`` with uncommitted operands, a ``shard_map`` manual over part of the mesh, a renamed expert axis,
``jax.vmap`` (forward, ``vmap(grad)``, ``grad(vmap)``), against the dense reference; and the clear errors for what
cannot run (the Triton interpreter inside the partitioned program, non-finite or mistyped config values)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_ops import moe_ffn, reference
from moe_ops.partitioned import moe_ffn_shard
from moe_ops.sharding import MoEShardingConfig
from tests.helpers import assert_close, keys, randn

T, D, F, E, K = 32, 16, 16, 8, 2


def _inputs(seed=0):
    ks = keys(seed, 6)
    return (randn(ks[0], (T, D)), randn(ks[1], (T, E)), randn(ks[2], (E, D, F), scale=0.3),
            randn(ks[3], (E, D, F), scale=0.3), randn(ks[4], (E, F, D), scale=0.3)), randn(ks[5], (T, D))


def _loss(fn, dy):
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * dy)


def _dense(*a):
    return reference.moe_ffn_dense(*a, top_k=K)


def _check(fn, args, dy, what, placed=None, placed_dy=None):
    """``fn`` (on ``placed`` operands when given) against the dense reference on the unsharded ``args``."""
    placed, placed_dy = placed or args, dy if placed_dy is None else placed_dy
    assert_close(fn(*placed), _dense(*args), 1e-5, f"{what} forward")
    got = jax.jit(jax.grad(_loss(fn, placed_dy), argnums=range(5)))(*placed)
    for name, g, e in zip(("x", "logits", "w_gate", "w_up", "w_down"), got,
                          jax.jit(jax.grad(_loss(_dense, dy), argnums=range(5)))(*args)):
        assert_close(g, e, 1e-5, f"{what} d{name}")


@pytest.mark.parametrize("context", [False, True], ids=["committed", "set_mesh"])
@pytest.mark.parametrize("strategy", ["all_to_all", "ring", "ep_tp"])
def test_explicit_axes_mesh(strategy, context):
    """jax.make_mesh's default axis types are Explicit: the op runs on Auto axes inside and returns x's sharding;
    also under ``jax.set_mesh`` of that mesh (jax >= 0.11 traces the partition's lowering under it)."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    args, dy = _inputs()
    specs = (P(("data", "expert")),) * 2 + (P("expert"),) * 3
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    cfg = MoEShardingConfig(strategy=strategy)
    fn = jax.jit(lambda *a: moe_ffn(*a, top_k=K, sharding=cfg, implementation="xla"))
    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        out = fn(*placed)
        assert out.sharding.spec == P(("data", "expert"), None)
        _check(fn, args, dy, f"explicit {strategy}", placed, jax.device_put(dy, NamedSharding(mesh, specs[0])))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_set_mesh_with_uncommitted_operands_runs_the_one_device_body(axis_type):
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(axis_type,) * 2)
    args, dy = _inputs(1)
    fn = jax.jit(lambda *a: moe_ffn(*a, top_k=K, sharding=MoEShardingConfig(strategy="all_to_all"),
                                    implementation="xla"))
    with jax.set_mesh(mesh):
        _check(fn, args, dy, "set_mesh, uncommitted")


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("strategy", [None, "all_to_all", "ep_tp"])
def test_shard_map_manual_over_part_of_the_mesh(strategy, axis_type):
    """Manual over "data" only (check_vma on): the tile schedules and the partitioned op inside. The replicated
    weights' gradients are the sum over the data shards (they once held shard 0's part alone). On an Explicit mesh
    the layer must not try to leave the Manual axes (JAX forbids Manual -> Auto)."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(axis_type,) * 2)
    args, dy = _inputs(2)
    specs = (P("data"), P("data"), P(), P(), P())
    kw = {} if strategy is None else {"sharding": MoEShardingConfig(strategy=strategy)}
    body = jax.shard_map(lambda *a: moe_ffn(*a, top_k=K, implementation="xla", **kw), mesh=mesh,
                         in_specs=specs, out_specs=P("data"), axis_names={"data"})
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    _check(jax.jit(body), args, dy, f"partial manual {strategy}", placed,
           jax.device_put(dy, NamedSharding(mesh, P("data"))))


@pytest.mark.parametrize("strategy", ["all_to_all", "ring"])
def test_renamed_expert_axis_with_the_default_batch_axes(strategy):
    """Tokens sharded over an expert axis named "ep": the default batch_axes follow expert_axis, and
    moe_ffn_shard reads the token sharding from x's type (it treated them as replicated: wrong output)."""
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(AxisType.Auto,))
    args, _ = _inputs(3)
    cfg = MoEShardingConfig(strategy=strategy, expert_axis="ep")
    assert "ep" in cfg.batch_axes
    body = jax.shard_map(lambda *a: moe_ffn_shard(*a, top_k=K, config=cfg, implementation="xla"), mesh=mesh,
                         in_specs=(P("ep"),) * 5, out_specs=P("ep"))
    assert_close(jax.jit(body)(*args), _dense(*args), 1e-5, f"renamed axis {strategy}")


@pytest.mark.parametrize("on_mesh,capacity_factor", [(False, None), (True, 4.0)])
def test_vmap(on_mesh, capacity_factor):
    """Shared weights: the forward folds the batch into tokens (one call per element with a capacity); the
    backward runs per element (each element's weight gradient is its own)."""
    args, _ = _inputs(4)
    x, logits, wg, wu, wd = args
    xs, ls = jnp.stack([x, 0.5 * x]), jnp.stack([logits, -logits])
    if on_mesh:
        mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
        xs, ls = (jax.device_put(a, NamedSharding(mesh, P(None, ("data", "expert")))) for a in (xs, ls))
    cfg = MoEShardingConfig(strategy="all_to_all", capacity_factor=capacity_factor)

    def ours(a, b, *w):
        return jnp.sum(jnp.sin(moe_ffn(a, b, *w, top_k=K, sharding=cfg, implementation="xla")))

    def dense(a, b, *w):
        return jnp.sum(jnp.sin(_dense(a, b, *w)))
    fwd = jax.jit(jax.vmap(lambda a, b: moe_ffn(a, b, wg, wu, wd, top_k=K, sharding=cfg, implementation="xla")))
    assert_close(fwd(xs, ls), jax.vmap(lambda a, b: _dense(a, b, wg, wu, wd))(xs, ls), 1e-5, "vmap forward")
    per_element = (0, 0, None, None, None)
    got = jax.jit(jax.vmap(jax.grad(ours, argnums=(0, 2, 4)), in_axes=per_element))(xs, ls, wg, wu, wd)
    want = jax.vmap(jax.grad(dense, argnums=(0, 2, 4)), in_axes=per_element)(xs, ls, wg, wu, wd)
    for g, e in zip(got, want):
        assert_close(g, e, 1e-5, "vmap(grad)")
    summed = jax.jit(jax.grad(lambda a, w: jnp.sum(jax.vmap(lambda p: ours(p, ls[0], w, wu, wd))(a)), (0, 1)))
    want = jax.grad(lambda a, w: jnp.sum(jax.vmap(lambda p: dense(p, ls[0], w, wu, wd))(a)), (0, 1))(xs, wg)
    for g, e in zip(summed(xs, wg), want):
        assert_close(g, e, 1e-5, "grad(vmap)")
    weights = jnp.stack([wg, 2 * wg])
    batched_w = jax.jit(jax.vmap(lambda w: moe_ffn(x, logits, w, wu, wd, top_k=K, sharding=cfg, implementation="xla")))
    assert_close(batched_w(weights), jax.vmap(lambda w: _dense(x, logits, w, wu, wd))(weights), 1e-5, "batched w")


def test_triton_interpreter_in_the_partitioned_program_is_refused():
    """On CPU the Triton kernels run through a host callback, which the partitioned program cannot keep alive (the
    process crashed): a clear error instead, at trace time when the mesh is known."""
    mesh = jax.make_mesh((2,), ("expert",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    args, _ = _inputs(5)
    placed = [jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in args]
    fn = jax.jit(lambda *a: moe_ffn(*a, top_k=K, sharding=MoEShardingConfig(strategy="ring"), implementation="triton"))
    with pytest.raises(NotImplementedError, match="implementation='triton' on a CPU host"):
        fn(*placed)


@pytest.mark.parametrize("kw,err", [(dict(capacity_factor=float("inf")), ValueError),
                                    (dict(capacity_factor=float("nan")), ValueError),
                                    (dict(capacity_factor="2"), ValueError),
                                    (dict(ep_tp_max_tokens="64"), TypeError)])
def test_config_values_checked_up_front(kw, err):
    with pytest.raises(err, match=next(iter(kw))):
        MoEShardingConfig(**kw)


@pytest.mark.parametrize("strategy", ["all_to_all", "ring"])
def test_shard_body_reads_replicated_tokens_from_their_type(strategy):
    """Tokens replicated over every manual axis (x typed as varying over none, check_vma on): the body must take
    them as not sharded over the expert axis, although the default batch axes name it."""
    mesh = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Auto,))
    args, dy = _inputs(3)
    cfg = MoEShardingConfig(strategy=strategy)
    fn = jax.shard_map(lambda *a: moe_ffn_shard(*a, top_k=K, config=cfg, implementation="xla"), mesh=mesh,
                       in_specs=(P(), P(), P("expert"), P("expert"), P("expert")), out_specs=P())
    _check(jax.jit(fn), args, dy, f"replicated tokens {strategy}")


def test_shard_body_refuses_replicated_weights_for_ep_tp():
    """``auto`` with every expert local picks ep_tp, which sums F-slices over the expert axis: weights typed as
    replicated over it would come out EP times too large, so the body says so instead."""
    mesh = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Auto,))
    args, _ = _inputs(4)
    fn = jax.shard_map(lambda *a: moe_ffn_shard(*a, top_k=K, implementation="xla"), mesh=mesh,
                       in_specs=(P("expert"), P("expert"), P(), P(), P()), out_specs=P("expert"))
    with pytest.raises(ValueError, match="split on F over the expert axis 'expert'"):
        jax.jit(fn)(*args)


@pytest.mark.parametrize("strategy", ["all_to_all", "ring", "ep_tp"])
def test_shard_body_forward_mode(strategy):
    """Forward mode across expert shards (README: the partitioned op is first-order; moe_ffn_shard is not)."""
    mesh = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Auto,))
    args, _ = _inputs(5)
    tangents = _inputs(6)[0]
    cfg = MoEShardingConfig(strategy=strategy)
    w_spec = P(None, None, "expert") if strategy == "ep_tp" else P("expert")
    wd_spec = P(None, "expert", None) if strategy == "ep_tp" else P("expert")
    tok = P() if strategy == "ep_tp" else P("expert")
    fn = jax.shard_map(lambda *a: moe_ffn_shard(*a, top_k=K, config=cfg, implementation="xla"), mesh=mesh,
                       in_specs=(tok, tok, w_spec, w_spec, wd_spec), out_specs=tok)
    out, tan = jax.jit(lambda p, t: jax.jvp(fn, p, t))(args, tangents)
    ref_out, ref_tan = jax.jvp(_dense, args, tangents)
    assert_close(out, ref_out, 1e-5, f"{strategy} jvp primal")
    assert_close(tan, ref_tan, 1e-5, f"{strategy} jvp tangent")


@pytest.mark.parametrize("strategy", ["all_to_all", "ep_tp"])
def test_checked_mode_on_expert_shards(strategy, monkeypatch):
    """MOE_OPS_CHECKED=1 (process-wide: the partitioner traces the per-shard code at compile time) adds no host
    callback inside the partitioned program (it killed the process) and no check of the op's own padding ids (the
    all_to_all receive buffer's id E_l was refused), in the partitioned op and in moe_ffn_shard."""
    monkeypatch.setenv("MOE_OPS_CHECKED", "1")
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    args, dy = _inputs(7)
    cfg = MoEShardingConfig(strategy=strategy)
    specs = (P(("data", "expert")),) * 2 + (P("expert"),) * 3
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    fn = jax.jit(lambda *a: moe_ffn(*a, top_k=K, sharding=cfg, implementation="xla"))
    _check(fn, args, dy, f"checked {strategy}", placed, jax.device_put(dy, NamedSharding(mesh, specs[0])))
    if strategy == "all_to_all":
        body = jax.shard_map(lambda *a: moe_ffn_shard(*a, top_k=K, config=cfg, implementation="xla"), mesh=mesh,
                             in_specs=specs, out_specs=specs[0])
        _check(jax.jit(body), args, dy, "checked moe_ffn_shard")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_one_device_layer_on_explicit_token_shards(impl):
    """moe_ffn without sharding= on tokens sharded over an Explicit mesh (jax.make_mesh's default): the sort had no
    Explicit sharding rule (ShardingTypeError); the layer now runs on Auto axes and keeps x's sharding."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    args, dy = _inputs(8)
    specs = (P("data"),) * 2 + (P(),) * 3
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    fn = jax.jit(lambda *a: moe_ffn(*a, top_k=K, implementation=impl))
    assert fn(*placed).sharding.spec == P("data", None)
    _check(fn, args, dy, f"explicit token shards {impl}", placed, jax.device_put(dy, NamedSharding(mesh, specs[0])))
