"""The Pallas backend under program transforms the other backends already support.

* Inside a user's ``jax.shard_map`` with ``check_vma=True`` (tokens sharded, weights replicated): every
  ``pallas_call`` raised "manual_axis_type on jax.ShapeDtypeStruct must not be None" (its ``out_shape`` said nothing
  about the varying manual axes), and the Pallas interpreters then failed on the varying operands when lowered
  ("Primitive ... requires varying manual axes to match"). ``kernels.pallas.vma.pallas_call`` fixes both.

Data are drawn from a fresh seed each run (printed, and named in every failure message).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import assert_close, sharded_sum, unsharded_sum, SUM_SHARDS

PALLAS = "pallas"
TOL = 2e-5


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed={value}")
    return value


def _data(seed, t=32, d=8, f=16, e=4, k=2):
    """Tokens x [t, d], top-k expert ids / weights, expert weights (gate / up [e, d, f], down [e, f, d])."""
    ks = jax.random.split(jax.random.key(seed), 7)
    n = lambda i, s, sc=1.0: jax.random.normal(ks[i], s, jnp.float32) * sc
    return dict(x=n(0, (t, d)), wg=n(1, (e, d, f), d ** -0.5), wu=n(2, (e, d, f), d ** -0.5),
                wd=n(3, (e, f, d), f ** -0.5), ids=jax.random.randint(ks[4], (t // SUM_SHARDS, k), 0, e),
                w=jax.nn.softmax(n(5, (t // SUM_SHARDS, k)), axis=-1), logits=n(6, (t, e)))


def _check_grads(ours, ref, args, names, seed, what):
    got = jax.jit(jax.grad(sharded_sum(ours), argnums=range(len(args))))(*args)
    want = jax.grad(unsharded_sum(ref), argnums=range(len(args)))(*args)
    for name, g, e in zip(names, got, want):
        assert_close(g, e, TOL, f"{what}: d{name} (seed {seed})")
    value = jax.jit(sharded_sum(ours))(*args)
    assert_close(value, unsharded_sum(ref)(*args), TOL, f"{what}: forward (seed {seed})")


# ------------------------------------------------------------------------------------- shard_map, check_vma
def test_gmm_tgmm_in_shard_map(seed):
    p = _data(seed)
    sizes = jax.random.multinomial(jax.random.key(seed + 1), 8, jnp.full((4,), 0.25)).astype(jnp.int32)
    other = jax.random.normal(jax.random.key(seed + 2), (4, 8, 8))

    def loss(gmm, tgmm):
        return lambda x, w, o: jnp.sum(gmm(x, w, sizes) ** 2) + jnp.sum(tgmm(x, x, sizes) * o)

    ours = loss(lambda *a: moe_ops.gmm(*a, implementation=PALLAS), lambda *a: moe_ops.tgmm(*a, implementation=PALLAS))
    _check_grads(ours, loss(R.gmm, R.tgmm), (p["x"], p["wg"], other), ["x", "rhs", "other"], seed, "gmm / tgmm")


def test_permute_unpermute_sort_in_shard_map(seed):
    p = _data(seed)
    ids, w = p["ids"], p["w"]
    scale = jax.random.normal(jax.random.key(seed + 1), (8,))

    def loss(permute, unpermute):
        def f(tokens, scale, w):
            xs, _, sort_idx = permute(tokens, ids, 4)
            return jnp.sum(unpermute(xs * scale, sort_idx, w) ** 2)
        return f

    ours = loss(lambda *a: moe_ops.permute(*a, implementation=PALLAS),
                lambda *a: moe_ops.unpermute(*a, implementation=PALLAS))
    _check_grads(ours, loss(R.permute, R.unpermute), (p["x"], scale, w), ["x", "scale", "weights"], seed,
                 "permute / unpermute")

    # sort_by_expert of token-sharded ids: each shard's group sizes and sort order
    all_ids = jax.random.randint(jax.random.key(seed + 3), (16, 2), 0, 4)
    mesh = jax.make_mesh((SUM_SHARDS,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:SUM_SHARDS])
    f = jax.shard_map(lambda i: [o[None] for o in moe_ops.sort_by_expert(i, 4, implementation=PALLAS)], mesh=mesh,
                      in_specs=jax.P("d"), out_specs=jax.P("d"))
    sizes, sort_idx = jax.jit(f)(all_ids)
    for s, block in enumerate(jnp.split(all_ids, SUM_SHARDS)):
        want_sizes, want_idx = moe_ops.sort_by_expert(block, 4, implementation="xla")
        np.testing.assert_array_equal(sizes[s], want_sizes, f"sort_by_expert sizes, shard {s} (seed {seed})")
        np.testing.assert_array_equal(sort_idx[s], want_idx, f"sort_by_expert sort_idx, shard {s} (seed {seed})")


def test_gather_scatter_gmm_in_shard_map(seed):
    p = _data(seed)
    ids, w = p["ids"], p["w"]

    def loss(gather_gmm, scatter_gmm):
        def f(tokens, w1, w2, w):
            sizes, sort_idx = moe_ops.sort_by_expert(ids, 4, implementation="xla")
            h = gather_gmm(tokens, w1, sizes, sort_idx)
            return jnp.sum(scatter_gmm(jnp.tanh(h), w2, sizes, sort_idx, w) ** 2)
        return f

    ours = loss(lambda *a: moe_ops.gather_gmm(*a, implementation=PALLAS),
                lambda *a: moe_ops.scatter_gmm(*a, implementation=PALLAS))
    ref = loss(lambda x, r, g, s: R.gmm(R.permute(x, ids, 4)[0], r, g),
               lambda h, r, g, s, w: R.unpermute(R.gmm(h, r, g), s, w))
    _check_grads(ours, ref, (p["x"], p["wg"], p["wd"], w), ["x", "w1", "w2", "weights"], seed,
                 "gather_gmm / scatter_gmm")


@pytest.mark.parametrize("recompute", [False, True])
def test_swiglu_ffn_in_shard_map(seed, recompute):
    p = _data(seed)
    ids, w = p["ids"], p["w"]

    def ours(tokens, wg, wu, wd, w):
        sizes, sort_idx = moe_ops.sort_by_expert(ids, 4, implementation=PALLAS)
        return jnp.sum(moe_ops.swiglu_ffn(tokens, wg, wu, wd, sizes, sort_idx, w, recompute=recompute,
                                          implementation=PALLAS) ** 2)

    def ref(tokens, wg, wu, wd, w):
        xs, sizes, sort_idx = R.permute(tokens, ids, 4)
        h = R.activate(R.gmm(xs, wg, sizes), R.gmm(xs, wu, sizes))
        return jnp.sum(R.unpermute(R.gmm(h, wd, sizes), sort_idx, w) ** 2)

    _check_grads(ours, ref, (p["x"], p["wg"], p["wu"], p["wd"], w), ["x", "w_gate", "w_up", "w_down", "weights"],
                 seed, f"swiglu_ffn(recompute={recompute})")


@pytest.mark.parametrize("strategy", ["ring", "all_to_all"])
def test_moe_ffn_shard_in_shard_map(seed, strategy):
    """Tokens and experts split over 4 expert shards (the layer's own collectives inside the user's shard_map)."""
    p = _data(seed, t=16, e=8)
    args = (p["x"], p["logits"], p["wg"], p["wu"], p["wd"])
    mesh = jax.make_mesh((SUM_SHARDS,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:SUM_SHARDS])
    cfg = moe_ops.MoEShardingConfig(strategy=strategy)
    body = jax.shard_map(lambda *a: moe_ops.moe_ffn_shard(*a, top_k=2, config=cfg, implementation=PALLAS),
                         mesh=mesh, in_specs=(jax.P("expert"),) * 5, out_specs=jax.P("expert"))
    dense = lambda *a: R.moe_ffn_dense(*a, top_k=2)
    assert_close(jax.jit(body)(*args), dense(*args), TOL, f"moe_ffn_shard({strategy}) forward (seed {seed})")
    cot = jax.random.normal(jax.random.key(seed + 1), p["x"].shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
    got = jax.jit(jax.grad(loss(body), argnums=range(5)))(*args)
    want = jax.grad(loss(dense), argnums=range(5))(*args)
    for name, g, e in zip(["x", "logits", "w_gate", "w_up", "w_down"], got, want):
        assert_close(g, e, TOL, f"moe_ffn_shard({strategy}): d{name} (seed {seed})")


def test_export_tpu_of_a_shard_mapped_op():
    """Lowered for TPU (Mosaic), the shard_map'd ops still emit the Pallas kernels."""
    mesh = jax.make_mesh((SUM_SHARDS,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:SUM_SHARDS])
    sizes = jnp.array([3, 0, 4, 1], jnp.int32)

    def per_shard(x, w, ids):
        xs, _, _ = moe_ops.permute(x, ids, 4, implementation=PALLAS)
        return moe_ops.gmm(xs, w, sizes, implementation=PALLAS)

    f = jax.shard_map(per_shard, mesh=mesh, in_specs=(jax.P("d"), jax.P(), jax.P("d")), out_specs=jax.P("d"))
    sds = jax.ShapeDtypeStruct
    args = (sds((32, 128), jnp.float32), sds((4, 128, 128), jnp.float32), sds((32, 2), jnp.int32))
    text = jax.export.export(jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1))),
                             platforms=["tpu"])(*args).mlir_module()
    assert text.count("tpu_custom_call") >= 4, "expected the sort, gather, gmm and tgmm kernels"
