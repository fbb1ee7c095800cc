"""The public ops on operands sharded over Explicit mesh axes (``jax.make_mesh``'s default, under ``jax.set_mesh`` or
committed with no context mesh): forward and every gradient against the same op on unsharded operands, the output
sharding each op documents (``moe_ops.sharding.on_explicit_axes``, README "Explicit mesh axes"), the gradients typed
like their operands; and no change on Auto meshes, replicated operands or inside a ``shard_map``."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import moe_ops
from tests.helpers import assert_close, keys, partitioner, randn

T, D, F, E, K = 16, 8, 8, 4, 2
M = T * K
ROWS, ROWS_M, EXPERTS, REP = P("data", None), P("data", "model"), P("model", None, None), P()
BIAS = P("model", None)   # per-expert biases sharded like the weights
RAGGED_CONTRACTING = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                                       lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _mesh(axis_type=AxisType.Explicit):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _data(seed):
    ks = keys(seed, 12)
    ids = jax.random.randint(ks[0], (T, K), 0, E, jnp.int32)
    sizes = jax.random.randint(ks[1], (E,), 0, M // 2, jnp.int32).at[1].set(0)   # an empty group, sum <= M
    return dict(
        x=randn(ks[2], (M, D)), y=randn(ks[3], (M, F)), xt=randn(ks[4], (T, D)), logits=randn(ks[5], (T, E)),
        w=randn(ks[6], (E, D, F), scale=0.3), wg=randn(ks[7], (E, D, F), scale=0.3),
        wu=randn(ks[8], (E, D, F), scale=0.3), wd=randn(ks[9], (E, F, D), scale=0.3),
        weights=jax.nn.softmax(randn(ks[10], (T, K))), ids=ids, sizes=sizes,
        sort_idx=moe_ops.sort_by_expert(ids, E, implementation="xla")[1],
        routed=moe_ops.sort_by_expert(ids, E, implementation="xla")[0],
        **dict(zip(("bg", "bu", "bd"), (randn(k, s, scale=0.3) for k, s in zip(keys(seed + 7, 3),
                                                                                 ((E, F), (E, F), (E, D)))))))


# name -> (op on (data, impl, *differentiable operands), differentiable operands as (data key, spec), the output
# spec(s) the op documents for those operand specs). Non-differentiable operands (ids, sizes, sort_idx) are placed
# by _place: ids / sort_idx sharded over "data" like the token rows, group sizes replicated.
CASES = {
    "gmm": (lambda d, i, a, b: moe_ops.gmm(a, b, d["sizes"], implementation=i),
            [("x", ROWS), ("w", EXPERTS)], ROWS),
    "gmm_transpose_rhs": (lambda d, i, a, b: moe_ops.gmm(a, jnp.swapaxes(b, 1, 2), d["sizes"], transpose_rhs=True,
                                                         implementation=i),
                          [("x", ROWS), ("w", EXPERTS)], ROWS),
    "tgmm": (lambda d, i, a, b: moe_ops.tgmm(a, b, d["sizes"], implementation=i),
             [("x", ROWS), ("y", ROWS_M)], P(None, None, "model")),
    "sort_by_expert": (lambda d, i: moe_ops.sort_by_expert(d["ids"], E, implementation=i), [], (REP, P("data"))),
    "permute": (lambda d, i, a: moe_ops.permute(a, d["ids"], E, implementation=i),
                [("xt", ROWS)], (ROWS, REP, P("data"))),
    "unpermute": (lambda d, i, a, b: moe_ops.unpermute(a, d["sort_idx"], b, implementation=i),
                  [("x", ROWS), ("weights", ROWS)], ROWS),
    "route": (lambda d, i, a: moe_ops.route(a, K), [("logits", ROWS)], (ROWS, ROWS)),
    "gather_gmm": (lambda d, i, a, b: moe_ops.gather_gmm(a, b, d["routed"], d["sort_idx"], implementation=i),
                   [("xt", ROWS), ("w", EXPERTS)], ROWS),
    "scatter_gmm": (lambda d, i, a, b, c: moe_ops.scatter_gmm(a, b, d["routed"], d["sort_idx"], c, implementation=i),
                    [("y", ROWS), ("wd", EXPERTS), ("weights", ROWS)], ROWS),
    "swiglu_gmm": (lambda d, i, a, b, c: moe_ops.swiglu_gmm(a, b, c, d["sizes"], implementation=i),
                   [("x", ROWS), ("wg", EXPERTS), ("wu", EXPERTS)], ROWS),
    "swiglu_ffn": (lambda d, i, *a: moe_ops.swiglu_ffn(*a[:4], d["routed"], d["sort_idx"], a[4], implementation=i),
                   [("xt", ROWS), ("wg", EXPERTS), ("wu", EXPERTS), ("wd", EXPERTS), ("weights", ROWS)], ROWS),
    "experts_ffn": (lambda d, i, a, *w: moe_ops.experts_ffn(a, d["sizes"], *w, implementation=i),
                    [("x", ROWS), ("wg", EXPERTS), ("wu", EXPERTS), ("wd", EXPERTS)], ROWS),
    "fused_experts_ffn": (lambda d, i, a, b, *w: moe_ops.fused_experts_ffn(a, b, d["ids"], *w, implementation=i),
                          [("xt", ROWS), ("weights", ROWS), ("wg", EXPERTS), ("wu", EXPERTS), ("wd", EXPERTS)],
                          ROWS),
    "experts_ffn_biases": (
        lambda d, i, a, *w: moe_ops.experts_ffn(a, d["sizes"], *w[:3], b_gate=w[3], b_up=w[4], b_down=w[5],
                                                implementation=i),
        [("x", ROWS), ("wg", EXPERTS), ("wu", EXPERTS), ("wd", EXPERTS), ("bg", BIAS), ("bu", BIAS), ("bd", BIAS)],
        ROWS),
    "moe_ffn_biases": (
        lambda d, i, a, lg, *w: moe_ops.moe_ffn(a, lg, *w[:3], top_k=K, b_gate=w[3], b_up=w[4], b_down=w[5],
                                                implementation=i),
        [("xt", ROWS), ("logits", ROWS), ("wg", EXPERTS), ("wu", EXPERTS), ("wd", EXPERTS), ("bg", BIAS),
         ("bu", BIAS), ("bd", BIAS)], ROWS),
    "ragged_dot": (lambda d, i, a, b: moe_ops.ragged_dot(a, b, d["sizes"], implementation=i),
                   [("x", ROWS), ("w", EXPERTS)], ROWS),
    "ragged_dot_general_contracting": (
        lambda d, i, a, b: moe_ops.ragged_dot_general(a, b, d["sizes"], RAGGED_CONTRACTING, implementation=i),
        [("x", ROWS_M), ("y", ROWS)], P(None, "model", None)),
}


def _place(mesh, d):
    """The non-differentiable operands on ``mesh``: ids / sort_idx over "data", group sizes replicated."""
    specs = {"ids": ROWS, "sort_idx": P("data"), "sizes": REP, "routed": REP}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) if k in specs else v for k, v in d.items()}


def _same(a: P, b: P) -> bool:
    """Equal PartitionSpecs up to trailing unsharded dims (``P(None,) == P()``)."""
    trim = lambda s: tuple(s)[:max([i + 1 for i, e in enumerate(s) if e is not None], default=0)]
    return trim(a) == trim(b)


def _loss(fn, cts):
    return lambda *a: sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(jax.tree.leaves(fn(*a)), cts)
                          if jnp.issubdtype(o.dtype, jnp.floating))


def _compare(name, impl, context, seed):
    op, diff, want = CASES[name]
    mesh, d = _mesh(), _data(seed)
    args = [d[k] for k, _ in diff]
    expected = jax.tree.leaves(op(d, impl, *args))
    cts = [randn(k, o.shape) for k, o in zip(keys(seed + 100, len(expected)), expected)]
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, (_, s) in zip(args, diff)]
    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        dp = _place(mesh, d)
        fn = lambda *a: op(dp, impl, *a)
        got = jax.jit(fn)(*placed)
        for g, e, s in zip(jax.tree.leaves(got), expected, jax.tree.leaves(want, is_leaf=lambda s: isinstance(s, P))):
            assert _same(g.sharding.spec, s), f"{name}: output spec {g.sharding.spec} != documented {s}"
            assert_close(g, e, 0.0 if e.dtype == jnp.int32 else 1e-6, f"{name} forward")
        if not diff:
            return
        grads = jax.jit(jax.grad(_loss(fn, cts), argnums=range(len(args))))(*placed)
    want_grads = jax.grad(_loss(lambda *a: op(d, impl, *a), cts), argnums=range(len(args)))(*args)
    for (k, s), g, e in zip(diff, grads, want_grads):
        assert _same(g.sharding.spec, s), f"{name}: d{k} spec {g.sharding.spec} != its operand's {s}"
        assert_close(g, e, 1e-6, f"{name} d{k}")


@pytest.mark.parametrize("name", list(CASES))
def test_op_on_explicit_shards_matches_unsharded(name):
    _compare(name, "xla", True, seed=sorted(CASES).index(name))


@pytest.mark.parametrize("name", ["gmm", "unpermute", "fused_experts_ffn"])
def test_committed_operands_without_context_mesh(name):
    """No ``jax.set_mesh``: the mesh comes from the operands. (Not ``permute``: its dx reads no jit argument, and
    JAX then cannot place a jit's Explicit-typed output without a context mesh, as for ``grad(jnp.sum)``.)"""
    _compare(name, "xla", False, seed=50 + sorted(CASES).index(name))


@pytest.mark.parametrize("name, impl", [("gmm", None), ("swiglu_ffn", None), ("gmm", "pallas"), ("permute", "triton"),
                                        ("gather_gmm", "triton")])
def test_default_interpret_and_bridge_backends(name, impl):
    _compare(name, impl, True, seed=70)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_eager_calls_on_explicit_shards(impl):
    """Not jit-ed. Failed before on the CPU Triton bridge: its host callback's eager result sat on one device, and
    resharding it raised "Cannot convert GSPMDSharding {maximal device=0} into SdyArray"."""
    mesh, d = _mesh(), _data(90)
    with jax.set_mesh(mesh):
        x, xt = (jax.device_put(d[k], NamedSharding(mesh, ROWS)) for k in ("x", "xt"))
        dp = _place(mesh, d)
        y = moe_ops.gmm(x, d["w"], dp["sizes"], implementation=impl)
        dx = jax.grad(lambda a: jnp.sum(jnp.sin(moe_ops.gmm(a, d["w"], dp["sizes"], implementation=impl))))(x)
        xs, sizes, sort_idx = moe_ops.permute(xt, dp["ids"], E, implementation=impl)
        layer = moe_ops.moe_ffn(xt, d["logits"], d["wg"], d["wu"], d["wd"], top_k=K, implementation=impl)
    assert all(_same(a.sharding.spec, ROWS) for a in (y, dx, xs, layer))
    assert_close(y, moe_ops.gmm(d["x"], d["w"], d["sizes"], implementation="xla"), 1e-6, "eager gmm")
    assert_close(dx, jax.grad(lambda a: jnp.sum(jnp.sin(moe_ops.gmm(a, d["w"], d["sizes"], implementation="xla"))))(
        d["x"]), 1e-6, "eager grad of gmm")
    assert_close(layer, moe_ops.moe_ffn(d["xt"], d["logits"], d["wg"], d["wu"], d["wd"], top_k=K,
                                        implementation="xla"), 1e-5, "eager moe_ffn")
    want = moe_ops.permute(d["xt"], d["ids"], E, implementation="xla")
    for g, e in zip((xs, sizes, sort_idx), want):
        assert_close(g, e, 0.0, "eager permute")


def test_column_sharded_weights_keep_their_axis():
    """rhs sharded on N ("model"): gmm / gather_gmm rows keep "data", columns keep "model" (as jnp.dot would); an
    axis both operands name stays on the first dim only."""
    mesh, d = _mesh(), _data(80)
    with jax.set_mesh(mesh):
        x, xt = (jax.device_put(d[k], NamedSharding(mesh, ROWS)) for k in ("x", "xt"))
        w_n = jax.device_put(d["w"], NamedSharding(mesh, P(None, None, "model")))
        w_nt = jax.device_put(jnp.swapaxes(d["w"], 1, 2), NamedSharding(mesh, P(None, "model", None)))
        w_data = jax.device_put(d["w"], NamedSharding(mesh, P(None, None, "data")))
        dp = _place(mesh, d)
        outs = jax.jit(lambda x, xt, a, b, c: (
            moe_ops.gmm(x, a, dp["sizes"], implementation="xla"),
            moe_ops.gmm(x, b, dp["sizes"], transpose_rhs=True, implementation="xla"),
            moe_ops.gather_gmm(xt, a, dp["routed"], dp["sort_idx"], implementation="xla"),
            moe_ops.gmm(x, c, dp["sizes"], implementation="xla")))(x, xt, w_n, w_nt, w_data)
    assert all(_same(o.sharding.spec, s) for o, s in zip(outs, [ROWS_M] * 3 + [ROWS])), [o.sharding for o in outs]
    want = moe_ops.gmm(d["x"], d["w"], d["sizes"], implementation="xla")
    for o in outs[:2] + outs[3:]:
        assert_close(o, want, 1e-6, "column-sharded gmm")
    assert_close(outs[2], moe_ops.gather_gmm(d["xt"], d["w"], d["routed"], d["sort_idx"], implementation="xla"),
                 1e-6, "column-sharded gather_gmm")


@pytest.fixture
def no_auto_axes(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("auto_axes used")
    monkeypatch.setattr(jax.sharding, "auto_axes", refuse)


def test_unchanged_on_auto_meshes_replicated_operands_and_in_shard_map(no_auto_axes):
    """No Explicit axis shards an operand: the op runs as before (no auto_axes)."""
    d = _data(90)
    want = moe_ops.gmm(d["x"], d["w"], d["sizes"], implementation="xla")
    gmm = jax.jit(lambda a, b, s: moe_ops.gmm(a, b, s, implementation="xla"))
    auto = _mesh(AxisType.Auto)
    out = gmm(*(jax.device_put(d[k], NamedSharding(auto, s)) for k, s in (("x", ROWS), ("w", REP), ("sizes", REP))))
    assert_close(out, want, 1e-6, "auto mesh")
    mesh = _mesh()
    with jax.set_mesh(mesh):
        assert_close(gmm(d["x"], d["w"], d["sizes"]), want, 1e-6, "replicated on an explicit mesh")
        body = jax.shard_map(lambda a, b, s: moe_ops.gmm(a, b, s, implementation="xla"), mesh=mesh,
                             in_specs=(ROWS, REP, REP), out_specs=ROWS)
        x = jax.device_put(d["x"], NamedSharding(mesh, ROWS))
        local = jax.jit(body)(x, d["w"], d["sizes"])
    # per shard: each half of the rows with the same group sizes (clamped to its M/2 rows)
    halves = [moe_ops.gmm(h, d["w"], d["sizes"], implementation="xla") for h in jnp.split(d["x"], 2)]
    assert_close(local, jnp.concatenate(halves), 1e-6, "shard_map")


@pytest.mark.parametrize("shardy", [True, False], ids=["shardy", "gspmd"])
def test_triton_bridge_on_auto_mesh_shards(shardy):
    """The CPU Triton bridge under automatic partitioning, jit-ed and eager. Failed before: its host callback's
    one-device ("maximal") sharding reached the program's outputs, and JAX raised "Cannot convert GSPMDSharding
    {maximal device=0} into SdyArray"; the bridge now replicates the callback's results."""
    d, auto = _data(95), _mesh(AxisType.Auto)
    x, xt, ids = (jax.device_put(d[k], NamedSharding(auto, ROWS)) for k in ("x", "xt", "ids"))
    gmm = lambda a: moe_ops.gmm(a, d["w"], d["sizes"], implementation="triton")
    permute = lambda a, i: moe_ops.permute(a, i, E, implementation="triton")
    want_y = moe_ops.gmm(d["x"], d["w"], d["sizes"], implementation="xla")
    want_p = moe_ops.permute(d["xt"], d["ids"], E, implementation="xla")
    with partitioner(shardy):
        for run in (jax.jit, lambda f: f):
            assert_close(run(gmm)(x), want_y, 1e-6, "gmm")
            for g, e in zip(run(permute)(xt, ids), want_p):
                assert_close(g, e, 0.0, "permute")



def test_ragged_dot_on_replicated_operands_under_set_mesh():
    """Failed before the fix: unsharded operands under ``jax.set_mesh`` of an Explicit mesh ran ``ragged_dot(_general)``
    as is, and lax's ragged_dot_general, which both the result-shape check and the integer path call, has no
    Explicit sharding rule: NotImplementedError asking for an ``out_sharding`` that moe_ops refuses. Every other op
    ran there; the kernel path, the ragged contraction and the lax-only integer path now do too (replicated)."""
    mesh, d = _mesh(), _data(95)
    x_int, w_int = (jnp.round(d[k] * 4).astype(jnp.int32) for k in ("x", "w"))
    calls = {"f32": lambda x, w, y, s: moe_ops.ragged_dot(x, w, s, implementation="xla"),
             "contracting": lambda x, w, y, s: moe_ops.ragged_dot_general(x, y, s, RAGGED_CONTRACTING,
                                                                         implementation="xla"),
             "int32": lambda x, w, y, s: moe_ops.ragged_dot(x_int, w_int, s)}
    args = [d[k] for k in ("x", "w", "y", "sizes")]
    want = {name: fn(*args) for name, fn in calls.items()}
    with jax.set_mesh(mesh):
        got = {name: (fn(*args), jax.jit(fn)(*args)) for name, fn in calls.items()}
    for name, outs in got.items():
        for out in outs:
            assert_close(out, want[name], 1e-6, name)


def test_committed_replicated_operands_without_context_mesh():
    """Failed before the fix: operands committed to an Explicit mesh unsharded (``device_put(x, NamedSharding(mesh,
    P()))``, no ``jax.set_mesh``) ran the op as is, and the XLA backend's row-tile loop updated a mesh-less buffer
    with mesh-typed tiles: ShardingTypeError from dynamic_update_slice (gmm, tgmm, experts_ffn, ragged_dot). The op
    now runs on Auto axes there too; results come back replicated on the operands' mesh."""
    mesh, d = _mesh(), _data(96)
    calls = {"gmm": lambda x, y, w, s: moe_ops.gmm(x, w, s, implementation="xla"),
             "tgmm": lambda x, y, w, s: moe_ops.tgmm(x, y, s, implementation="xla"),
             "experts_ffn": lambda x, y, w, s: moe_ops.experts_ffn(x, s, w, w, jnp.swapaxes(w, 1, 2),
                                                                   implementation="xla"),
             "ragged_dot": lambda x, y, w, s: moe_ops.ragged_dot(x, w, s, implementation="xla")}
    args = [d[k] for k in ("x", "y", "w", "sizes")]
    placed = [jax.device_put(a, NamedSharding(mesh, REP)) for a in args]
    for name, fn in calls.items():
        for got in (fn(*placed), jax.jit(fn)(*placed)):
            assert got.sharding.mesh.shape == mesh.shape and _same(got.sharding.spec, REP), (name, got.sharding)
            assert_close(got, fn(*args), 1e-6, name)
