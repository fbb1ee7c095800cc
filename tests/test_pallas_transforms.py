"""The Pallas backend under program transforms the other backends already support.

* Inside a user's ``jax.shard_map`` with ``check_vma=True`` (tokens sharded, weights replicated): every
  ``pallas_call`` raised "manual_axis_type on jax.ShapeDtypeStruct must not be None" (its ``out_shape`` said nothing
  about the varying manual axes), and the Pallas interpreters then failed on the varying operands when lowered
  ("Primitive ... requires varying manual axes to match"). ``kernels.pallas.vma.pallas_call`` fixes both.
* With ``jax_enable_x64``: index arithmetic with Python ints on traced int32 values became int64 (``lax.div ...
  int32, int64`` in the row DMAs, ``lax.rem`` in the fused gather pipeline, int64 schedules / counts). Run in a
  subprocess (x64 is process-global), against the xla backend.

Data are drawn from a fresh seed each run (printed, and named in every failure message).
"""

import os
import subprocess
import sys
import textwrap

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
    want = jax.jit(jax.grad(loss(dense), argnums=range(5)))(*args)
    for name, g, e in zip(["x", "logits", "w_gate", "w_up", "w_down"], got, want):
        assert_close(g, e, TOL, f"moe_ffn_shard({strategy}): d{name} (seed {seed})")


@pytest.mark.parametrize("interpreter", ["hlo", "tpu"])
def test_sharded_group_sizes_in_shard_map(seed, interpreter):
    """Group sizes varying over the shards too (so do the schedule and the dynamic grid bound), in the HLO
    interpreter and in the TPU interpreter (``InterpretParams``: its ordered effects thread through the call)."""
    from kernels import platform  # noqa: PLC0415
    from tests.helpers import POISON  # noqa: PLC0415
    p = _data(seed)
    sizes = jax.random.multinomial(jax.random.key(seed + 1), 8, jnp.full((SUM_SHARDS, 4), 0.25)).astype(jnp.int32)
    mesh = jax.make_mesh((SUM_SHARDS,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:SUM_SHARDS])
    f = jax.shard_map(lambda x, w, g: moe_ops.gmm(x, w, g[0], implementation=PALLAS), mesh=mesh,
                      in_specs=(jax.P("d"), jax.P(), jax.P("d")), out_specs=jax.P("d"))
    with platform.interpret_mode(POISON if interpreter == "tpu" else True):
        got = jax.jit(f)(p["x"], p["wg"], sizes)
    want = jnp.concatenate([R.gmm(b, p["wg"], sizes[i]) for i, b in enumerate(jnp.split(p["x"], SUM_SHARDS))])
    assert_close(got, want, TOL, f"gmm, sharded group sizes, {interpreter} interpreter (seed {seed})")
    # outside shard_map the program is unchanged: no casts, no invariant call
    text = str(jax.make_jaxpr(lambda x: moe_ops.gmm(x, p["wg"], sizes[0], implementation=PALLAS))(p["x"]))
    assert "moe_pallas_invariant_call" not in text and "pvary" not in text


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


# ------------------------------------------------------------------------------------------------------- x64
X64_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import moe_ops
    assert jax.config.jax_enable_x64
    seed = {seed}
    k = jax.random.split(jax.random.key(seed), 8)
    t, d, f, e = 16, 8, 16, 4
    x = jax.random.normal(k[0], (t, d), jnp.float32)
    wg, wu = (jax.random.normal(k[i], (e, d, f), jnp.float32) * d ** -0.5 for i in (1, 2))
    wd = jax.random.normal(k[3], (e, f, d), jnp.float32) * f ** -0.5
    ids = jax.random.randint(k[4], (t, 2), 0, e, dtype=jnp.int64)
    w = jax.nn.softmax(jax.random.normal(k[5], (t, 2), jnp.float32), axis=-1)
    logits = jax.random.normal(k[6], (t, e), jnp.float32)
    sizes = jnp.bincount(ids.reshape(-1), length=e)
    assert ids.dtype == sizes.dtype == jnp.int64
    def rel(a, b, what):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert a.shape == b.shape and err < 2e-5, (what, a.shape, b.shape, err, seed)
    def both(fn, *args, argnums=None):
        outs = [jax.jit(fn(impl))(*args) if argnums is None else jax.jit(jax.grad(fn(impl), argnums=argnums))(*args)
                for impl in ("pallas", "xla")]
        return outs
    # permute / unpermute, int64 ids
    def perm(impl):
        def g(x, w):
            xs, _, s = moe_ops.permute(x, ids, e, implementation=impl)
            return jnp.sum(moe_ops.unpermute(xs * 1.5, s, w, implementation=impl) ** 2)
        return g
    for a, b in zip(*both(perm, x, w, argnums=(0, 1))):
        rel(a, b, "permute/unpermute grad")
    p, q = (moe_ops.permute(x, ids, e, implementation=i) for i in ("pallas", "xla"))
    rel(p[0], q[0], "permute rows"); np.testing.assert_array_equal(p[2], q[2])
    # gmm / tgmm, int64 group sizes
    xs = q[0]
    other = jax.random.normal(k[7], (e, d, d), jnp.float32)
    gm = lambda impl: lambda xs, wg, o: jnp.sum(moe_ops.gmm(xs, wg, sizes, implementation=impl) ** 2) + jnp.sum(
        moe_ops.tgmm(xs, xs, sizes, implementation=impl) * o)
    rel(*both(gm, xs, wg, other), "gmm/tgmm forward")
    for a, b in zip(*both(gm, xs, wg, other, argnums=(0, 1, 2))):
        rel(a, b, "gmm/tgmm grad")
    # the fused layer and the unfused one, forward and gradients
    for fused in (None, False):
        layer = lambda impl: lambda *a: jnp.sum(moe_ops.moe_ffn(*a, top_k=2, fused=fused, implementation=impl) ** 2)
        args = (x, logits, wg, wu, wd)
        rel(*both(layer, *args), f"moe_ffn(fused={{fused}}) forward")
        for a, b in zip(*both(layer, *args, argnums=range(5))):
            rel(a, b, f"moe_ffn(fused={{fused}}) grad")
    # Mosaic export under x64: the kernels' scalars stay int32
    sds = jax.ShapeDtypeStruct
    fn = lambda x, w, wg: moe_ops.fused_experts_ffn(x, w, ids, wg, wg, jnp.swapaxes(wg, 1, 2), implementation="pallas")
    text = jax.export.export(jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))), platforms=["tpu"])(
        sds((t, 128), jnp.float32), sds((t, 2), jnp.float32), sds((e, 128, 128), jnp.float32)).mlir_module()
    assert "tpu_custom_call" in text
    print("X64-OK")
""")


def test_x64_int64_ids_and_group_sizes(seed):
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", X64_SCRIPT.format(seed=seed)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "X64-OK" in run.stdout, f"seed {seed}: " + run.stderr[-3000:]
