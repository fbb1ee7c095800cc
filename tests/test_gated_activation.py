"""Clamped / scaled / offset SwiGLU (``moe_ops.GatedActivation``, gpt-oss's experts and DeepSeek-V4's clamp):
the spec's checks, the reference against an independent NumPy transcription of MaxText's / triton_kernels' formula,
its written-out derivative against autodiff, every kernel family's forward and backward epilogue (Triton through
the bridge, Pallas in the interpreter; outputs poisoned) against the reference, and the layer end to end against
the dense einsum layer, on each backend and partitioned.

Test data: the projections here are about unit-scale, so ``CLAMPED`` uses a limit of 0.75 (gpt-oss's 7.0 would
never bind): about a fifth of the gates and a third of the ups lie beyond it, so both clamps and their zero
gradients are exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import moe_ops
from kernels.activation import NAMES
from kernels.pallas import swiglu as ps, swiglu_bwd as pb
from kernels.triton import swiglu as ts
from moe_ops import GatedActivation, GPT_OSS, reference as R
from tests.helpers import (POISON, SHAPES, TOL, assert_close, case_seed, grads_of, keys, layer_inputs, loss,
                           offset_array, randn)
from tests.routed_cases import CFG, E, K, T, TOP_K, ffn_operands, routed

CLAMPED = GatedActivation("silu", alpha=1.702, limit=0.75, up_offset=1.0)
CLAMPED_RELU = GatedActivation("relu", limit=0.5, up_offset=-0.25)
F = 24


def _maxtext_numpy(gate, up, alpha, limit):
    """MaxText's ``apply_ffn_activation`` for gpt-oss (= triton_kernels' ``swiglu_torch``), in float64 NumPy."""
    g = np.minimum(gate, limit)
    u = np.clip(up, -limit, limit)
    return g * (1.0 / (1.0 + np.exp(-alpha * g))) * (u + 1.0)


def test_gpt_oss_matches_maxtext_formula():
    g, u = (np.asarray(randn(k, (4096,), scale=5.0)) for k in keys(1, 2))
    for spec in (GPT_OSS, CLAMPED):
        want = _maxtext_numpy(g.astype(np.float64), u.astype(np.float64), spec.alpha, spec.limit)
        assert_close(R.activate(jnp.asarray(g), jnp.asarray(u), spec), want, 1e-6, f"activate {spec}")
    assert (GPT_OSS.name, GPT_OSS.alpha, GPT_OSS.limit, GPT_OSS.up_offset) == ("silu", 1.702, 7.0, 1.0)


@pytest.mark.parametrize("spec", [CLAMPED, CLAMPED_RELU, GatedActivation("gelu", limit=1.0),
                                  GatedActivation("silu", alpha=0.5, up_offset=2.0)],
                         ids=["gpt_oss_form", "relu_clamped", "gelu_clamped", "silu_alpha_offset"])
def test_written_out_derivative_matches_autodiff(spec):
    """``activation_parts`` (what the kernels compute) against ``jax.grad`` of ``activate``; values beyond a clamp
    get zero gradient, values at the bound the full one, NaN stays NaN."""
    g, u = (randn(k, (2048,), scale=1.5) for k in keys(2, 2))
    lim = spec.limit or 1.0
    g, u = g.at[:2].set(jnp.array([lim, lim + 1])), u.at[:2].set(jnp.array([-lim, lim + 1]))
    a, da, uu, du = R.activation_parts(g, u, spec)
    dg, dup = jax.grad(lambda g, u: jnp.sum(R.activate(g, u, spec)), argnums=(0, 1))(g, u)
    assert_close(a * uu, R.activate(g, u, spec), 1e-6, "h")
    assert_close(da * uu, dg, 1e-5, "dh/dgate")
    assert_close(a * du, dup, 1e-6, "dh/dup")
    if spec.limit is not None:   # zero gradient at and beyond a bound (module doc of kernels.activation)
        assert float(da[0]) == float(da[1]) == float(du[0]) == float(du[1]) == 0.0
        clamped = R.activation_parts(jnp.minimum(g, lim), jnp.clip(u, -lim, lim), spec)
        for name, x, y in zip(("a", "da", "u", "du"), clamped, (a, da, uu, du)):
            np.testing.assert_array_equal(x, y, err_msg=f"{name}: raw and clamped projections must agree")
    nan = jnp.array([jnp.nan, 0.5])
    assert np.isnan(np.asarray(R.activate(nan, nan[::-1], spec))).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="tanh"), "name"), (dict(alpha=0.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=True), "alpha"), (dict(name="gelu", alpha=1.5), "alpha"), (dict(limit=-1.0), "limit"),
    (dict(limit=0.0), "limit"), (dict(limit=float("inf")), "limit"), (dict(up_offset="1"), "up_offset")])
def test_spec_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=f"GatedActivation.{match}"):
        GatedActivation(**kwargs)


def test_spec_is_static_and_names_still_work():
    assert hash(CLAMPED) == hash(GatedActivation("silu", 1.702, 0.75, 1.0)) and CLAMPED == GatedActivation(
        "silu", alpha=1.702, limit=0.75, up_offset=1)
    assert GatedActivation(limit=3).limit == 3.0 and isinstance(GatedActivation(limit=3).limit, float)
    g, u = (randn(k, (64,)) for k in keys(3, 2))
    for name in NAMES:   # a name is the plain spec
        assert GatedActivation(name).plain
        np.testing.assert_array_equal(R.activate(g, u, name), R.activate(g, u, GatedActivation(name)))
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'silu'\] or a"):
        moe_ops.swiglu_gmm(jnp.ones((4, 8)), jnp.ones((2, 8, 8)), jnp.ones((2, 8, 8)), jnp.array([2, 2]),
                           activation={"name": "silu"}, implementation="xla")


# ---------------------------------------------------------------------------------------------------------------
# Kernel epilogues against the reference.

def _projections(o, sizes, sort_idx, off):
    kw = dict(group_offset=off, preferred_element_type=jnp.float32)
    rows = o["x"][sort_idx // TOP_K]
    return R.gmm(rows, o["w_gate"], sizes, **kw), R.gmm(rows, o["w_up"], sizes, **kw)


def _check_bwd(got, ref, tol, what):
    for name, a, b in zip(("dgate", "dup", "hw", "dweights_sorted"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.shape, b.shape)
        assert_close(a, b, tol, f"{what} {name}")


@pytest.mark.parametrize("spec,routing,off,g_local,dtype", [
    (CLAMPED, "uneven_dropped", 1, 3, jnp.float32), (CLAMPED_RELU, "one_expert", 0, E, jnp.float32),
    (CLAMPED, "empty_groups", 0, E, jnp.bfloat16)], ids=["gpt_oss_form", "relu", "bf16"])
def test_triton_kernels(spec, routing, off, g_local, dtype):
    """Forward (h; saved mode's gate / up), and the backward kernel recomputing and from saved gate / up (a 16x16
    tile and the split epilogue's 64x128 tile with F = 100), against ``reference.swiglu_down_bwd``."""
    _, sizes, sort_idx = routed(routing, case_seed(routing, "act"))
    o = ffn_operands(case_seed("triton", routing), g_local, dtype)
    gate, up = _projections(o, sizes, sort_idx, off)
    assert 0.1 < float(jnp.mean(jnp.abs(up[gate != 0]) > spec.limit)) < 0.9, "the clamp must bind on the data"
    h, g_saved, u_saved = ts.swiglu_gmm_saved(o["x"], o["w_gate"], o["w_up"], sizes, offset_array(off), sort_idx,
                                              TOP_K, activation=spec, out_dtype=dtype, config=CFG)
    assert_close(h, R.activate(gate, up, spec).astype(dtype), TOL[dtype], "forward h")
    for name, got, want in (("gate", g_saved, jnp.minimum(gate, spec.limit)),
                            ("up", u_saved, jnp.clip(up, -spec.limit, spec.limit))):   # the clamped residuals
        assert_close(got, want.astype(dtype), TOL[dtype], f"saved {name}")
    w_sorted = o["weights"].reshape(-1)[sort_idx]
    args = (o["x"], o["dout"], o["w_gate"], o["w_up"], o["w_down"], sizes, offset_array(off), sort_idx, w_sorted)
    ref = R.swiglu_down_bwd(*args[:6], sort_idx, w_sorted, TOP_K, group_offset=off, activation=spec)
    _check_bwd(ts.swiglu_down_bwd(*args, TOP_K, activation=spec, config=CFG), ref, TOL[dtype], "recompute")
    tol = TOL[dtype] if dtype == jnp.float32 else 5e-2   # bf16 gate / up residuals
    saved = ts.swiglu_down_bwd_saved(o["dout"], o["w_down"], g_saved, u_saved, *args[5:], TOP_K, activation=spec,
                                     config=CFG)
    _check_bwd(saved, ref, tol, "saved")


def test_triton_split_epilogue():
    _, sizes, sort_idx = routed("uneven_dropped", 5)
    o = ffn_operands(6, 3, f=100)
    gate, up = (p.astype(jnp.float32) for p in _projections(o, sizes, sort_idx, 1))
    w_sorted = o["weights"].reshape(-1)[sort_idx]
    ref = R.swiglu_down_bwd(o["x"], o["dout"], o["w_gate"], o["w_up"], o["w_down"], sizes, sort_idx, w_sorted, TOP_K,
                            group_offset=1, activation=CLAMPED)
    wide = ts.tuning.GmmConfig(block_m=64, block_n=128, block_k=16, group_m=2, num_warps=4, num_stages=1)
    got = ts.swiglu_down_bwd_saved(o["dout"], o["w_down"], gate, up, sizes, offset_array(1), sort_idx, w_sorted,
                                   TOP_K, activation=CLAMPED, config=wide)
    _check_bwd(got, ref, 1e-5, "split epilogue")


def test_pallas_kernels():
    """Forward and both backward kernels (recompute, saved) in the Pallas interpreter (uninitialised memory NaN,
    out-of-bounds reads raise), D = F = 128."""
    _, sizes, sort_idx = routed("uneven_dropped", 8)
    o = ffn_operands(9, 3, d=128, f=128)
    gate, up = _projections(o, sizes, sort_idx, 1)
    common = (sizes, offset_array(1), sort_idx, TOP_K)
    h, g_saved, u_saved = ps.swiglu_gmm_saved(o["x"], o["w_gate"], o["w_up"], *common, activation=CLAMPED,
                                              out_dtype=jnp.float32, interpret=POISON)
    assert_close(h, R.activate(gate, up, CLAMPED), 1e-5, "pallas forward h")
    w_sorted = o["weights"].reshape(-1)[sort_idx]
    ref = R.swiglu_down_bwd(o["x"], o["dout"], o["w_gate"], o["w_up"], o["w_down"], sizes, sort_idx, w_sorted, TOP_K,
                            group_offset=1, activation=CLAMPED)
    got = pb.swiglu_down_bwd(o["x"], o["dout"], o["w_gate"], o["w_up"], o["w_down"], sizes, offset_array(1),
                             sort_idx, w_sorted, TOP_K, activation=CLAMPED, interpret=POISON)
    _check_bwd(got, ref, 1e-5, "pallas recompute")
    got = pb.swiglu_down_bwd_saved(o["dout"], o["w_down"], g_saved, u_saved, sizes, offset_array(1), sort_idx,
                                   w_sorted, TOP_K, activation=CLAMPED, interpret=POISON)
    _check_bwd(got, ref, 1e-5, "pallas saved")


# ---------------------------------------------------------------------------------------------------------------
# Public ops and the layer.

@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
def test_swiglu_gmm_gradients(impl):
    """dx, dw_gate, dw_up of ``swiglu_gmm``'s custom VJP vs jax.grad of the reference composition (middle shard)."""
    ids, sizes, sort_idx = routed("uneven_dropped", 11)
    d, f = (128, 128) if impl == "pallas" else (K, F)
    o = ffn_operands(case_seed(impl, "gmm"), 3, d=d, f=f)
    cot = randn(keys(case_seed(impl, "cot"), 1)[0], (T * TOP_K, f))

    def ref(x, wg, wu):
        xs = R.permute(x, ids, E)[0]
        kw = dict(group_offset=1, preferred_element_type=jnp.float32)
        return R.activate(R.gmm(xs, wg, sizes, **kw), R.gmm(xs, wu, sizes, **kw), CLAMPED)
    ours = lambda x, wg, wu: moe_ops.swiglu_gmm(x, wg, wu, sizes, sort_idx, group_offset=1, activation=CLAMPED,
                                                implementation=impl)
    args = (o["x"], o["w_gate"], o["w_up"])
    assert_close(jax.jit(ours)(*args), ref(*args), 1e-5, "forward")
    got = jax.jit(lambda *a: grads_of(ours, a, cot))(*args)
    for name, g, e in zip(("dx", "dw_gate", "dw_up"), got, grads_of(ref, args, cot)):
        assert_close(g, e, 1e-5, name)


@pytest.mark.parametrize("impl,fused,recompute", [
    ("xla", False, False), ("xla", True, True), ("triton", True, False), ("triton", True, True),
    ("triton", False, False), ("pallas", True, False),
    pytest.param("pallas", True, True, marks=pytest.mark.slow)])
def test_layer_matches_dense(impl, fused, recompute):
    """``moe_ffn`` with gpt-oss's activation form: forward and the five gradients equal the dense einsum layer's."""
    x, logits, ws = layer_inputs(SHAPES[impl], "hot", seed=21)
    ours = jax.jit(lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, activation=CLAMPED, implementation=impl,
                                                     fused=fused, recompute=recompute), static_argnames="top_k")
    dense = functools.partial(R.moe_ffn_dense, activation=CLAMPED)
    assert_close(ours(x, logits, *ws, top_k=2), dense(x, logits, *ws, top_k=2), 1e-5, "forward")
    cot = randn(keys(22, 1)[0], x.shape)
    got = jax.jit(jax.grad(loss(ours, 2, cot), argnums=range(5)))(x, logits, *ws)
    want = jax.jit(jax.grad(loss(dense, 2, cot), argnums=range(5)))(x, logits, *ws)
    for name, g, e in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], got, want):
        assert_close(g, e, 1e-5, f"d{name}")


@pytest.mark.parametrize("strategy", ["all_to_all", "ep_tp"])
def test_partitioned_layer(strategy):
    """The spec is a static argument of the ``custom_partitioning`` op: 4 expert shards, forward and gradients."""
    mesh = jax.make_mesh((4,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    x, logits, ws = layer_inputs((1, 32, 16, 16, 8), "hot", seed=23)
    x, logits = x[0], logits[0]
    cfg = moe_ops.MoEShardingConfig(strategy=strategy)
    w_spec = (P(None, None, "expert"),) * 2 + (P(None, "expert", None),) if strategy == "ep_tp" else (P("expert"),) * 3
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, logits, *ws),
                                                                         (P("expert"),) * 2 + w_spec)]
    cot = randn(keys(24, 1)[0], x.shape)
    ours = lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, activation=GPT_OSS, sharding=cfg)
    dense = functools.partial(R.moe_ffn_dense, activation=GPT_OSS)
    assert_close(jax.jit(ours, static_argnames="top_k")(*placed, top_k=2), dense(x, logits, *ws, top_k=2), 1e-5,
                 "forward")
    got = jax.jit(jax.grad(loss(ours, 2, cot), argnums=range(5)))(*placed)
    for name, g, e in zip("x logits w_gate w_up w_down".split(), got,
                          jax.jit(jax.grad(loss(dense, 2, cot), argnums=range(5)))(x, logits, *ws)):
        assert_close(g, e, 1e-5, f"d{name}")


@pytest.mark.parametrize("options", [dict(), dict(fused=False), dict(fused=True),
                                     dict(sharding=moe_ops.MoEShardingConfig())], ids=str)
def test_bad_activation_is_named_on_every_path(options):
    """An unhashable or unknown activation is refused by name before any tracing (the partitioned op's static
    argument included)."""
    x, logits, ws = layer_inputs(SHAPES["xla"], "balanced")
    if "sharding" in options:
        mesh = jax.make_mesh((2,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
        x, logits = (jax.device_put(a, NamedSharding(mesh, P())) for a in (x, logits))
    for bad in (["silu"], "tanh", None):
        with pytest.raises(ValueError, match="activation must be one of"):
            moe_ops.moe_ffn(x, logits, *ws, top_k=2, activation=bad, **options)


@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("alpha,limit", [(1.1, 1.4), (1.0, 1.2), (0.7, 1.0), (1.0, None)])
def test_triton_kernels_swiglu_form(impl, alpha, limit):
    """OpenAI triton_kernels' fused SwiGLU (``swiglu_torch``: gate / linear interleaved in one weight's columns,
    ``g * sigmoid(alpha * g) * (linear + 1)`` with gate clamped above and linear on both sides at ``limit``) is
    ``swiglu_gmm`` with the even / odd columns as w_gate / w_up and ``GatedActivation(alpha, limit, up_offset=1)``;
    reference in float64 NumPy."""
    t, d, n = 40, 24, 32
    x, w = randn(keys(71, 1)[0], (t, d)), randn(keys(72, 1)[0], (1, d, n), scale=1 / 3)
    spec = GatedActivation("silu", alpha=alpha, limit=limit, up_offset=1.0)
    h = moe_ops.swiglu_gmm(x, w[..., ::2], w[..., 1::2], jnp.array([t], jnp.int32), activation=spec,
                           implementation=impl)
    a = np.asarray(x, np.float64) @ np.asarray(w[0], np.float64)
    g, lin = a[:, ::2], a[:, 1::2]
    if limit is not None:
        g, lin = np.minimum(g, limit), np.clip(lin, -limit, limit)
    assert_close(h, g / (1 + np.exp(-alpha * g)) * (lin + 1), 1e-5, f"alpha={alpha} limit={limit}")
