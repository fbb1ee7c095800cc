"""Per-expert biases (``moe_ops.expert_bias``: ``b_gate`` / ``b_up`` [E,F], ``b_down`` [E,D], gpt-oss's experts):
the layer against the dense einsum layer with the same biases, forward and all eight gradients, on every backend,
fused and unfused, with gpt-oss's activation form; ``experts_ffn`` on an expert shard with rows beyond the groups
(zero rows, NaN biases of other experts reach nothing); dropped copies in ``fused_experts_ffn``; argument errors.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import GatedActivation, reference as R
from tests.helpers import SHAPES, assert_close, keys, layer_inputs, randn

CLAMPED = GatedActivation("silu", alpha=1.702, limit=0.75, up_offset=1.0)   # gpt-oss's form, a limit the data meets
NAMES = ("x", "router_logits", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


def _biases(seed, e, d, f, dtype=jnp.float32):
    k = keys(seed, 3)
    return randn(k[0], (e, f), dtype, 0.5), randn(k[1], (e, f), dtype, 0.5), randn(k[2], (e, d), dtype, 0.5)


def _loss(fn, cot):
    def loss(x, lg, wg, wu, wd, bg, bu, bd):
        return jnp.sum(fn(x, lg, wg, wu, wd, top_k=2, b_gate=bg, b_up=bu, b_down=bd).astype(jnp.float32) * cot)
    return loss


@pytest.mark.parametrize("impl,fused,recompute,activation", [
    ("xla", False, False, "silu"), ("xla", True, False, CLAMPED), ("xla", False, True, CLAMPED),
    ("triton", True, False, CLAMPED), ("triton", False, False, "silu"), ("triton", True, True, "gelu"),
    ("pallas", True, False, CLAMPED), pytest.param("pallas", False, False, "silu", marks=pytest.mark.slow)],
    ids=lambda v: "clamped" if isinstance(v, GatedActivation) else None)
def test_layer_matches_dense(impl, fused, recompute, activation):
    b, s, d, f, e = SHAPES[impl]
    x, logits, ws = layer_inputs(SHAPES[impl], "hot", seed=31)
    bs = _biases(32, e, d, f)
    ours = jax.jit(functools.partial(moe_ops.moe_ffn, activation=activation, implementation=impl, fused=fused,
                                     recompute=recompute), static_argnames="top_k")
    dense = functools.partial(R.moe_ffn_dense, activation=activation)
    args = (x, logits, *ws, *bs)
    kw = lambda a: dict(zip(("b_gate", "b_up", "b_down"), a[5:]))  # noqa: E731
    assert_close(ours(*args[:5], top_k=2, **kw(args)), dense(*args[:5], top_k=2, **kw(args)), 1e-5, "forward")
    assert_close(R.moe_ffn(*args[:5], top_k=2, activation=activation, **kw(args)),
                 dense(*args[:5], top_k=2, **kw(args)), 1e-5, "reference.moe_ffn")
    cot = randn(keys(33, 1)[0], x.shape)
    got = jax.jit(jax.grad(_loss(ours, cot), argnums=range(8)))(*args)
    want = jax.jit(jax.grad(_loss(dense, cot), argnums=range(8)))(*args)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-5, f"d{name}")


@pytest.mark.parametrize("which", ["b_gate", "b_up", "b_down"])
def test_each_bias_alone(which):
    """One bias at a time (the others None), on the fused Triton path (the one-kernel SwiGLU with each)."""
    b, s, d, f, e = SHAPES["triton"]
    x, logits, ws = layer_inputs(SHAPES["triton"], "balanced", seed=34)
    bias = dict(zip(("b_gate", "b_up", "b_down"), _biases(35, e, d, f)))
    only = {which: bias[which]}
    got = moe_ops.moe_ffn(x, logits, *ws, top_k=2, implementation="triton", **only)
    assert_close(got, R.moe_ffn_dense(x, logits, *ws, top_k=2, **only), 1e-5, which)
    without = R.moe_ffn_dense(x, logits, *ws, top_k=2)
    assert float(jnp.max(jnp.abs(got - without))) > 1e-2, "the bias must change the output"


def test_experts_ffn_on_a_shard_with_rows_beyond_the_groups():
    """``experts_ffn`` with ``group_offset`` (experts 2..4 local of 6) and sum(group_sizes) < M: rows of other
    groups and beyond the sum are zero, and a NaN bias of a non-local expert reaches nothing (forward or grads)."""
    m, d, f = 40, 16, 24
    sizes = jnp.array([5, 0, 7, 3, 9, 4], jnp.int32)        # sum 28 < 40; local groups 2, 3, 4 -> rows 5..23
    k = keys(36, 5)
    xs = randn(k[0], (m, d))
    wg, wu = randn(k[1], (3, d, f), scale=d ** -0.5), randn(k[2], (3, d, f), scale=d ** -0.5)
    wd = randn(k[3], (3, f, d), scale=f ** -0.5)
    bg, bu, bd = _biases(37, 3, d, f)

    def ours(xs, wg, wu, wd, bg, bu, bd):
        return moe_ops.experts_ffn(xs, sizes, wg, wu, wd, group_offset=2, activation=CLAMPED, b_gate=bg, b_up=bu,
                                   b_down=bd, implementation="triton")

    def ref(xs, wg, wu, wd, bg, bu, bd):
        local = R.local_row_ids(sizes, m, 2, 3)
        pick = lambda b: jnp.where((local >= 0)[:, None], b[jnp.maximum(local, 0)], 0.0)  # noqa: E731
        kw = dict(group_offset=2)
        h = R.activate(R.gmm(xs, wg, sizes, **kw) + pick(bg), R.gmm(xs, wu, sizes, **kw) + pick(bu), CLAMPED)
        return R.gmm(h, wd, sizes, **kw) + pick(bd)
    args = (xs, wg, wu, wd, bg, bu, bd)
    out = jax.jit(ours)(*args)
    assert_close(out, ref(*args), 1e-5, "forward")
    rows = np.arange(m)
    assert np.all(np.asarray(out)[(rows < 5) | (rows >= 24)] == 0), "rows outside local groups must be zero"
    cot = randn(keys(38, 1)[0], (m, d))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=range(7)))(*args)
    for name, g, w in zip(("xs", "wg", "wu", "wd", "bg", "bu", "bd"), got,
                          jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=range(7)))(*args)):
        assert_close(g, w, 1e-5, f"d{name}")
    # a NaN bias on local expert index 1 whose group (global 3) is empty of rows reaches nothing
    empty = sizes.at[3].set(0)
    poisoned = bd.at[1].set(jnp.nan)
    out = moe_ops.experts_ffn(xs, empty, wg, wu, wd, group_offset=2, b_down=poisoned, implementation="xla")
    assert np.all(np.isfinite(np.asarray(out)))


def test_dropped_copies_add_no_bias():
    """A copy with an id outside [0, E) contributes nothing, its down bias included, on the fused path."""
    t, d, f, e = 12, 16, 24, 4
    k = keys(39, 5)
    x = randn(k[0], (t, d))
    ws = (randn(k[1], (e, d, f), scale=d ** -0.5), randn(k[2], (e, d, f), scale=d ** -0.5),
          randn(k[3], (e, f, d), scale=f ** -0.5))
    bs = _biases(40, e, d, f)
    ids = jax.random.randint(k[4], (t, 2), 0, e).at[3, 1].set(e).at[7, 0].set(-1)
    weights = jnp.full((t, 2), 0.5, jnp.float32)
    kw = dict(zip(("b_gate", "b_up", "b_down"), bs))
    got = jax.jit(lambda *a: moe_ops.fused_experts_ffn(*a, implementation="xla", **kw))(x, weights, ids, *ws)
    kept = jnp.where((ids >= 0) & (ids < e), weights, 0.0)
    want = sum(kept[:, j:j + 1] * _one_expert(x, ids[:, j], ws, bs) for j in range(2))
    assert_close(got, want, 1e-5, "fused with dropped copies")


def _one_expert(x, ids, ws, bs):
    """Each token through expert ``ids[t]`` (clipped: its weight is zero where the id is out of range)."""
    i = jnp.clip(ids, 0, ws[0].shape[0] - 1)
    gate = jnp.einsum("td,tdf->tf", x, ws[0][i]) + bs[0][i]
    up = jnp.einsum("td,tdf->tf", x, ws[1][i]) + bs[1][i]
    return jnp.einsum("tf,tfd->td", R.activate(gate, up), ws[2][i]) + bs[2][i]


def test_argument_errors():
    b, s, d, f, e = SHAPES["xla"]
    x, logits, ws = layer_inputs(SHAPES["xla"], "balanced")
    bg, bu, bd = _biases(41, e, d, f)
    cases = (("b_gate", bg[:, :-1], r"b_gate must be \[E,F\]"), ("b_up", bu[None], "b_up must have rank 2"),
             ("b_down", bg, r"b_down must be \[E,D\]"), ("b_down", bd.astype(jnp.int32), "b_down must be float"))
    for name, bad, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            moe_ops.moe_ffn(x, logits, *ws, top_k=2, **{name: bad})
    with pytest.raises(ValueError, match=r"b_down must be \[E,D\]"):
        moe_ops.moe_ffn(x, logits, *ws, top_k=2, b_gate=bg, b_down=bg, sharding=moe_ops.MoEShardingConfig())
    x2, (w, ids) = x.reshape(-1, d), moe_ops.route(logits.reshape(-1, e), 2)
    with pytest.raises(ValueError, match=r"b_up must be \[E,F\]"):
        moe_ops.fused_experts_ffn(x2, w, ids, *ws, swiglu=True, b_up=bu[:, :-1], implementation="xla")


@pytest.mark.parametrize("strategy,tokens_on_expert,fsdp,impl", [
    ("all_to_all", True, False, "xla"), ("ring", True, False, "xla"), ("ep_tp", False, False, "xla"),
    ("all_to_all", False, True, "xla"), pytest.param("ring", False, True, "xla", marks=pytest.mark.slow),
    ("all_to_all", True, False, "triton"), ("ep_tp", False, False, "triton")])
def test_inside_user_shard_map(strategy, tokens_on_expert, fsdp, impl):
    """``moe_ffn_shard`` with the biases as local blocks laid out like the weights (ep_tp: b_gate / b_up split on F,
    b_down replicated over the expert axis and added once), E over (expert, fsdp) when ``fsdp``; forward and the
    eight gradients against the dense layer (check_vma on)."""
    from jax.sharding import AxisType, PartitionSpec as P
    t, d, f, e = 32, 16, 16, 8
    mesh = jax.make_mesh((2, 4), ("fsdp" if fsdp else "data", "expert"), axis_types=(AxisType.Auto,) * 2)
    k = keys(42, 6)
    x, logits = randn(k[0], (t, d)), randn(k[1], (t, e))
    ws = (randn(k[2], (e, d, f), scale=0.3), randn(k[3], (e, d, f), scale=0.3), randn(k[4], (e, f, d), scale=0.3))
    bs = _biases(43, e, d, f)
    batch = ("fsdp" if fsdp else "data",)
    tokens = P(batch + ("expert",)) if tokens_on_expert else P(batch)
    e_axes = ("expert", "fsdp") if fsdp else "expert"
    if strategy == "ep_tp":
        w_specs = (P(None, None, "expert"),) * 2 + (P(None, "expert", None),)
        b_specs = (P(None, "expert"),) * 2 + (P(None, None),)
    else:
        w_specs, b_specs = (P(e_axes),) * 3, (P(e_axes),) * 3
    config = moe_ops.MoEShardingConfig(strategy=strategy)

    def shard(x, lg, wg, wu, wd, bg, bu, bd):
        return moe_ops.moe_ffn_shard(x, lg, wg, wu, wd, top_k=2, config=config, tokens_on_expert=tokens_on_expert,
                                     fsdp_axis="fsdp" if fsdp else None, activation=CLAMPED, implementation=impl,
                                     b_gate=bg, b_up=bu, b_down=bd)
    fn = jax.shard_map(shard, mesh=mesh, in_specs=(tokens, tokens) + w_specs + b_specs, out_specs=tokens)
    args = (x, logits, *ws, *bs)
    cot = randn(k[5], (t, d))
    dense = functools.partial(R.moe_ffn_dense, activation=CLAMPED)
    out = jax.jit(fn)(*args)
    assert_close(out, dense(*args[:5], top_k=2, b_gate=bs[0], b_up=bs[1], b_down=bs[2]), 1e-5, "forward")
    got = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=range(8)))(*args)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(dense(*a[:5], top_k=2, b_gate=a[5], b_up=a[6], b_down=a[7]) * cot),
                            argnums=range(8)))(*args)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, 1e-5, f"d{name}")


@pytest.mark.parametrize("strategy,fsdp,shardy", [
    ("all_to_all", False, True), ("ring", False, True), ("ep_tp", False, True), ("all_to_all", True, True),
    ("all_to_all", False, False), pytest.param("ep_tp", True, False, marks=pytest.mark.slow)])
def test_partitioned_layer(strategy, fsdp, shardy):
    """``moe_ffn(sharding=...)`` with b_gate and b_down (b_up left out): the custom-partitioned op shards them like
    their weights; forward and the gradients (b_up's: None in, nothing out) against the dense layer."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from tests.helpers import partitioner
    t, d, f, e = 32, 16, 16, 8
    mesh = jax.make_mesh((2, 4), ("fsdp" if fsdp else "data", "expert"), axis_types=(AxisType.Auto,) * 2)
    k = keys(44, 6)
    x, logits = randn(k[0], (t, d)), randn(k[1], (t, e))
    ws = (randn(k[2], (e, d, f), scale=0.3), randn(k[3], (e, d, f), scale=0.3), randn(k[4], (e, f, d), scale=0.3))
    bg, _, bd = _biases(45, e, d, f)
    config = moe_ops.MoEShardingConfig(strategy=strategy)
    tokens = P(("fsdp" if fsdp else "data", "expert"))
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, logits, *ws, bg, bd), (tokens,) * 2 +
                                                                         (P("expert"),) * 5)]
    cot = randn(k[5], (t, d))

    def ours(x, lg, wg, wu, wd, bg, bd):
        return moe_ops.moe_ffn(x, lg, wg, wu, wd, top_k=2, sharding=config, activation=CLAMPED, b_gate=bg, b_down=bd)

    def dense(x, lg, wg, wu, wd, bg, bd):
        return R.moe_ffn_dense(x, lg, wg, wu, wd, top_k=2, activation=CLAMPED, b_gate=bg, b_down=bd)
    args = (x, logits, *ws, bg, bd)
    with partitioner(shardy):
        out = jax.jit(ours)(*placed)
        got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=range(7)))(*placed)
    assert_close(out, dense(*args), 1e-5, "forward")
    want = jax.jit(jax.grad(lambda *a: jnp.sum(dense(*a) * cot), argnums=range(7)))(*args)
    for name, g, w in zip(("x", "logits", "wg", "wu", "wd", "b_gate", "b_down"), got, want):
        assert_close(g, w, 1e-5, f"d{name}")


@pytest.mark.parametrize("impl,fused", [("xla", None), ("xla", False), ("triton", None), ("triton", False)])
def test_nan_biases_of_an_unpicked_expert_reach_nothing(impl, fused):
    """Expert 0 is nobody's choice and its three biases are NaN: the output is the dense layer's with finite biases,
    and those biases get exact zero gradients (the module doc's selection, as for weights)."""
    b, s, d, f, e = SHAPES[impl]
    x, logits, ws = layer_inputs(SHAPES[impl], "hot", seed=46)
    logits = logits.at[..., 0].add(-100.0)
    bs = _biases(47, e, d, f)
    poisoned = [bias.at[0].set(jnp.nan) for bias in bs]

    def total(*biases):
        return jnp.sum(moe_ops.moe_ffn(x, logits, *ws, top_k=2, implementation=impl, fused=fused,
                                       **dict(zip(("b_gate", "b_up", "b_down"), biases))))
    want = jnp.sum(R.moe_ffn_dense(x, logits, *ws, top_k=2, **dict(zip(("b_gate", "b_up", "b_down"), bs))))
    assert_close(jax.jit(total)(*poisoned), want, 1e-5, "output")
    for name, g in zip(("b_gate", "b_up", "b_down"), jax.jit(jax.grad(total, argnums=(0, 1, 2)))(*poisoned)):
        assert np.all(np.asarray(g[0]) == 0) and np.all(np.isfinite(np.asarray(g))), name


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_forward_mode_and_deterministic_bias_gradients(impl):
    """The unfused layer with biases: jax.jvp in the biases matches the dense layer's, and the biases' gradients
    are grouped-matmul transposes (``moe_tgmm`` of a column of ones: fixed-order sums), no scatter-add."""
    b, s, d, f, e = SHAPES[impl]
    x, logits, ws = layer_inputs(SHAPES[impl], "hot", seed=43)
    bs = _biases(44, e, d, f)
    tangents = _biases(45, e, d, f)

    def ours(*bs):
        return moe_ops.moe_ffn(x, logits, *ws, top_k=2, activation=CLAMPED, implementation=impl, fused=False,
                               **dict(zip(("b_gate", "b_up", "b_down"), bs)))

    def dense(*bs):
        return R.moe_ffn_dense(x, logits, *ws, top_k=2, activation=CLAMPED,
                               **dict(zip(("b_gate", "b_up", "b_down"), bs)))
    (out, tan), (want, want_tan) = jax.jvp(ours, bs, tangents), jax.jvp(dense, bs, tangents)
    assert_close(out, want, 1e-5, "forward")
    assert_close(tan, want_tan, 1e-5, "tangent")
    text = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(ours(*a)), argnums=(0, 1, 2)))(*bs))
    assert "moe_tgmm" in text
    assert not re.search(r"f32\[[^\]]*\] = scatter-add", text), "a float scatter-add (the routing's int counts aside)"


@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_user_data_parallel_step_with_biases(impl):
    """A user's own data-parallel step inside shard_map (``permute`` then ``experts_ffn`` with biases, weights and
    biases replicated): the group sizes and row map come back typed as varying like the ids, so the replicated
    biases' gradients are the sum over shards of each shard's own group sums. (On Triton they were typed invariant
    and the bias gradients came out wrong, relative error ~1.)"""
    from jax.sharding import AxisType, PartitionSpec as P
    from kernels.platform import varying_axes
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    t, d, f, e = 64, 16, 16, 4
    k = keys(46, 8)
    x, ids = randn(k[0], (t, d)), jax.random.randint(k[1], (t, 2), 0, e)
    ws = (randn(k[2], (e, d, f)), randn(k[3], (e, d, f)), randn(k[4], (e, f, d)))
    bg, bd = randn(k[5], (e, f)), randn(k[6], (e, d))
    cot = randn(k[7], (2 * t, d))

    def shard(x, ids, wg, wu, wd, bg, bd):
        xs, sizes, sort_idx = moe_ops.permute(x, ids, e, implementation=impl)
        assert varying_axes(sizes) == varying_axes(sort_idx) == varying_axes(ids) == {"data", "expert"}
        return moe_ops.experts_ffn(xs, sizes, wg, wu, wd, b_gate=bg, b_down=bd, implementation=impl)
    fn = jax.shard_map(shard, mesh=mesh, in_specs=(P(("data", "expert")),) * 2 + (P(),) * 5,
                       out_specs=P(("data", "expert")))

    def ref(x, ids, wg, wu, wd, bg, bd):
        outs = []
        for s in range(8):   # each shard's 8 tokens, 16 sorted rows
            xs, sizes, _ = R.permute(x[8 * s:8 * s + 8], ids[8 * s:8 * s + 8], e)
            local = R.local_row_ids(sizes, 16, 0, e)
            h = R.activate(R.gmm(xs, wg, sizes) + bg[local], R.gmm(xs, wu, sizes))
            outs.append(R.gmm(h, wd, sizes) + bd[local])
        return jnp.concatenate(outs)
    args = (x, ids, *ws, bg, bd)
    assert_close(jax.jit(fn)(*args), ref(*args), 1e-5, "forward")
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 2, 3, 4, 5, 6)))(*args)
             for f in (fn, ref)]
    for name, g, w in zip(("x", "w_gate", "w_up", "w_down", "b_gate", "b_down"), *grads):
        assert_close(g, w, 1e-5, f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_combine_forms_agree(impl):
    """``expert_bias.combine`` with only the routing (XLA's autodiff of the gather) and with ``sort_by_expert``'s
    group sizes / row map (the TGMM gradient): the same [T, D] f32 sum and the same b_down / weights gradients as
    the einsum of the picked rows; a copy with an id outside [0, E) adds nothing and gets a zero weight gradient."""
    t, k, e, d = 9, 3, 5, 6
    ks = keys(47, 4)
    b_down, weights, cot = randn(ks[0], (e, d)), jax.random.uniform(ks[1], (t, k)), randn(ks[2], (t, d))
    ids = jax.random.randint(ks[3], (t, k), 0, e).at[2, 1].set(e).at[5, 0].set(-1)   # two dropped copies
    sizes, sort_idx = moe_ops.sort_by_expert(ids, e, implementation=impl)
    kept = (ids >= 0) & (ids < e)

    def want(b, w):
        rows = jnp.where(kept[..., None], b[jnp.clip(ids, 0, e - 1)], 0.0)
        return jnp.einsum("tk,tkd->td", jnp.where(kept, w, 0.0), rows, precision="highest")
    forms = {"plain": lambda b, w: moe_ops.expert_bias.combine(b, w, ids),
             "tgmm": lambda b, w: moe_ops.expert_bias.combine(b, w, ids, sizes, sort_idx, implementation=impl)}
    ref_grads = jax.grad(lambda b, w: jnp.sum(want(b, w) * cot), argnums=(0, 1))(b_down, weights)
    for name, fn in forms.items():
        out = jax.jit(fn)(b_down, weights)
        assert out.dtype == jnp.float32
        assert_close(out, want(b_down, weights), 1e-6, f"{name} forward")
        grads = jax.jit(jax.grad(lambda b, w: jnp.sum(fn(b, w) * cot), argnums=(0, 1)))(b_down, weights)
        assert_close(grads[0], ref_grads[0], 1e-5, f"{name} db_down")
        assert_close(grads[1], ref_grads[1], 1e-5, f"{name} dweights")
        assert float(grads[1][2, 1]) == float(grads[1][5, 0]) == 0.0
