"""Gate/up + gated activation in one GMM (``moe_ops.swiglu``, ``kernels.triton.swiglu``): the Triton kernel (bridge,
outputs poisoned) against the reference composition, the custom VJP (recomputing gate / up) against ``jax.grad`` of
that composition on every backend, ``moe_ffn`` fused (now gate/up/act in one op on Triton) against the dense layer
over top_k / E, and the peak-memory bound of the fused ``jax.grad(moe_ffn)`` against the unfused one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops

from kernels.pallas import swiglu as ps, tiling
from kernels.triton import swiglu as ts
from moe_ops import reference as R
from moe_ops import swiglu
from tests.helpers import SHAPES, TOL, assert_close, case_seed, grads_of, keys, layer_inputs, loss, offset_array, randn
from tests.routed_cases import CFG, E, K, T, TOP_K, routed

F = 24


def _weights(seed, g, dtype=jnp.float32, d=K, f=F):
    k1, k2 = keys(seed, 2)
    return randn(k1, (g, d, f), dtype, d ** -0.5), randn(k2, (g, d, f), dtype, d ** -0.5)


def _ref(x, w_gate, w_up, sizes, ids, off, activation, gather=True):
    xs = R.permute(x, ids, E)[0] if gather else x
    kw = dict(group_offset=off, preferred_element_type=jnp.float32)
    return R.activate(R.gmm(xs, w_gate, sizes, **kw), R.gmm(xs, w_up, sizes, **kw), activation)


@pytest.mark.parametrize("routing,activation,gather,off,g_local,dtype", [
    ("uneven_dropped", "silu", True, 0, E, jnp.float32),
    ("empty_groups", "gelu", True, 2, 3, jnp.float32),
    ("one_expert", "relu", False, 1, 2, jnp.float32),
    ("all_dropped", "silu", True, 0, E, jnp.float32),
    ("uneven_dropped", "silu", True, 1, 3, jnp.bfloat16),
])
def test_triton_kernel_parity(routing, activation, gather, off, g_local, dtype):
    """h only (no gate / up), rows outside local groups zero; group_offset shards; gather and plain row maps."""
    ids, sizes, sort_idx = routed(routing, case_seed(routing, "swiglu"))
    x = randn(keys(case_seed(routing, activation), 1)[0], (T, K) if gather else (T * TOP_K, K), dtype)
    w_gate, w_up = _weights(case_seed(routing, "w"), g_local, dtype)
    out = ts.swiglu_gmm(x, w_gate, w_up, sizes, offset_array(off), sort_idx if gather else None, TOP_K,
                        activation=activation, out_dtype=dtype, config=CFG)
    ref = _ref(x, w_gate, w_up, sizes, ids, off, activation, gather)
    assert out.dtype == dtype and out.shape == (T * TOP_K, F)
    assert_close(out, ref, TOL[dtype], f"swiglu_gmm {routing} {activation}")
    rows = R.local_row_ids(sizes, T * TOP_K, off, g_local)
    assert np.all(np.asarray(out)[np.asarray(rows) < 0] == 0), "rows outside local groups must be zero"


@pytest.mark.parametrize("impl,gather,activation", [("triton", True, "silu"), ("triton", False, "gelu"),
                                                    ("xla", True, "gelu"), ("pallas", True, "silu")])
def test_public_op_gradients(impl, gather, activation):
    """dx, dw_gate, dw_up of the custom VJP (recomputed gate / up, dx through combine_rows) vs jax.grad of the
    reference composition, on a middle expert shard (rows of other groups: zero output, zero gradient)."""
    ids, sizes, sort_idx = routed("uneven_dropped", 11)
    d, f = (128, 128) if impl == "pallas" else (K, F)
    x = randn(keys(case_seed(impl, "x"), 1)[0], (T, d) if gather else (T * TOP_K, d))
    w_gate, w_up = _weights(case_seed(impl, "w"), 3, d=d, f=f)
    cot = randn(keys(case_seed(impl, "cot"), 1)[0], (T * TOP_K, f))
    ours = lambda a, b, c: moe_ops.swiglu_gmm(a, b, c, sizes, sort_idx if gather else None, group_offset=1,
                                              activation=activation, implementation=impl)
    ref = lambda a, b, c: _ref(a, b, c, sizes, ids, 1, activation, gather)
    assert_close(jax.block_until_ready(jax.jit(ours)(x, w_gate, w_up)), ref(x, w_gate, w_up), 1e-5, "forward")
    got = jax.block_until_ready(jax.jit(lambda *a: grads_of(ours, a, cot))(x, w_gate, w_up))
    for name, g, e in zip(("dx", "dw_gate", "dw_up"), got, grads_of(ref, (x, w_gate, w_up), cot)):
        assert_close(g, e, 1e-5, name)


def test_errors_name_the_argument():
    _, sizes, sort_idx = routed("uneven_dropped", 1)
    x, (w_gate, w_up) = jnp.ones((T, K)), _weights(1, E)
    with pytest.raises(ValueError, match="w_up"):
        moe_ops.swiglu_gmm(x, w_gate, w_up[:, :, :-1], sizes, sort_idx, implementation="xla")
    with pytest.raises(ValueError, match="activation"):
        moe_ops.swiglu_gmm(x, w_gate, w_up, sizes, sort_idx, activation="tanh", implementation="xla")
    with pytest.raises(ValueError, match="multiple of T"):
        moe_ops.swiglu_gmm(x, w_gate, w_up, sizes, sort_idx[:-1], implementation="xla")
    assert swiglu.has_kernel("triton") and swiglu.has_kernel("pallas") and not swiglu.has_kernel("xla")


@pytest.mark.parametrize("activation,gather", [("silu", True), ("gelu", False)])
def test_pallas_kernel_strict_interpreter(activation, gather, strict_interpreter):
    """The Pallas kernel: no out-of-bounds reads, no races, every row written (uninitialised memory is NaN); a middle
    shard, a partial K block (K = 200 against 128) and two F blocks, gathered and plain row maps."""
    ids, sizes, sort_idx = routed("uneven_dropped", 31)
    x = randn(keys(31, 1)[0], (T, 200) if gather else (T * TOP_K, 200))
    w_gate, w_up = _weights(32, 2, d=200, f=256)
    out = jax.block_until_ready(ps.swiglu_gmm(x, w_gate, w_up, sizes, offset_array(1), sort_idx if gather else None,
                                              TOP_K, activation=activation, out_dtype=jnp.float32,
                                              tiling=tiling.Tiling(16, 128, 128), interpret=strict_interpreter))
    assert_close(out, _ref(x, w_gate, w_up, sizes, ids, 1, activation, gather), 1e-5, f"pallas {activation}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_lowers_to_mosaic_through_public_api(dtype, monkeypatch):
    """jax.export(platforms=["tpu"]) of jax.grad through moe_ops.swiglu_gmm (the kernel and its backward GMMs) and of
    the fused layer, with Mosaic chosen per lowering platform (no interpret-mode override)."""
    sds = jax.ShapeDtypeStruct
    t, k, d, f, e = 256, 2, 512, 768, 8

    def grads(x, w_gate, w_up, sizes, sort_idx):
        fn = lambda *a: jnp.sum(moe_ops.swiglu_gmm(*a, sizes, sort_idx, implementation="pallas").astype(jnp.float32))
        return jax.grad(fn, argnums=(0, 1, 2))(x, w_gate, w_up)

    args = (sds((t, d), dtype), sds((e, d, f), dtype), sds((e, d, f), dtype), sds((e,), jnp.int32),
            sds((t * k,), jnp.int32))
    text = jax.export.export(jax.jit(grads), platforms=["tpu"])(*args).mlir_module()
    assert text.count("tpu_custom_call") >= 4
    layer = lambda *a: moe_ops.moe_ffn(*a, top_k=k, implementation="pallas")
    largs = (sds((t, d), dtype), sds((t, e), jnp.float32), sds((e, d, f), dtype), sds((e, d, f), dtype),
             sds((e, f, d), dtype))
    assert "tpu_custom_call" in jax.export.export(jax.jit(layer), platforms=["tpu"])(*largs).mlir_module()


# ---------------------------------------------------------------------------------------------------------------
# The layer: fused (gather -> gate/up/act in one op -> scatter) vs dense and vs unfused, forward and five gradients.

LAYER_CASES = [  # (impl, E, top_k, dtype)
    ("triton", 8, 2, jnp.float32),
    ("xla", 8, 1, jnp.float32),
    pytest.param("xla", 64, 8, jnp.float32, marks=pytest.mark.slow),
    pytest.param("triton", 64, 8, jnp.float32, marks=pytest.mark.slow),
    pytest.param("triton", 8, 1, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param("pallas", 8, 2, jnp.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl,num_experts,top_k,dtype", LAYER_CASES)
def test_moe_ffn_fused_swiglu_matches_dense(impl, num_experts, top_k, dtype):
    b, s, d, f, _ = SHAPES[impl]
    x, logits, ws = layer_inputs((b, s, d, f, num_experts), "hot", seed=top_k, dtype=dtype)
    f32 = [a.astype(jnp.float32) for a in (x, *ws)]
    ours = lambda *a, top_k: moe_ops.fused_experts_ffn(
        a[0].reshape(-1, d), *moe_ops.route(a[1].reshape(-1, num_experts), top_k), *a[2:], implementation=impl,
        swiglu=True).reshape(a[0].shape)
    dense = lambda *a, top_k: R.moe_ffn_dense(*a, top_k=top_k)
    tol = TOL[dtype]
    got = jax.block_until_ready(jax.jit(ours, static_argnames="top_k")(x, logits, *ws, top_k=top_k))
    assert got.dtype == dtype
    assert_close(got, dense(f32[0], logits, *f32[1:], top_k=top_k), tol, "forward")
    cot = randn(keys(23, 1)[0], x.shape)
    grads = jax.block_until_ready(jax.jit(jax.grad(loss(ours, top_k, cot), argnums=range(5)))(x, logits, *ws))
    expected = jax.jit(jax.grad(loss(dense, top_k, cot), argnums=range(5)))(f32[0], logits, *f32[1:])
    for name, g, e in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], grads, expected):
        if name == "router_logits" and top_k == 1:  # renormalised top-1 weights are 1: d/dlogits is zero up to rounding
            assert float(jnp.max(jnp.abs(g))) < 1e-5 and float(jnp.max(jnp.abs(e))) < 1e-5
            continue
        assert_close(g, e, tol, f"d{name}")
    if dtype == jnp.float32:
        unfused = moe_ops.moe_ffn(x, logits, *ws, top_k=top_k, implementation=impl, fused=False)
        assert_close(got, unfused, 1e-5, "fused vs unfused")


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fused_grad_peak_memory_not_above_unfused(dtype):
    """Temp (peak working set) of the compiled jax.grad(moe_ffn): fused (gather / gate-up-act / scatter ops, no
    [T*k, F] residual) <= unfused (permute, three GMMs, unpermute). Triton through the bridge: every kernel is one
    custom call, so the program's buffers are those a GPU run allocates (kernel workspaces aside)."""
    b, s, d, f, e = 1, 64, 32, 96, 8
    x, logits, ws = layer_inputs((b, s, d, f, e), "balanced", seed=3, dtype=dtype)
    cot = randn(keys(5, 1)[0], x.shape)
    temps = {}
    for fused_arg in (True, False):
        layer = lambda *a, top_k, fz=fused_arg: moe_ops.moe_ffn(*a, top_k=top_k, implementation="triton", fused=fz)
        temps[fused_arg] = _temp_bytes(jax.grad(loss(layer, 2, cot), argnums=range(5)), x, logits, *ws)
    assert temps[True] <= temps[False], temps


def test_layer_benchmark_variants():
    """benchmarks/layer.py measures default / fused-no-swiglu / unfused where moe_ffn fuses by default (layer suite
    only), and each variant takes its path."""
    from benchmarks import layer as bench_layer  # noqa: PLC0415 (benchmarks sit above moe_ops)
    assert bench_layer.variants_for("pallas", "layer") == bench_layer.VARIANTS
    assert bench_layer.variants_for("xla", "layer") == ("moe_ffn",)
    assert bench_layer.variants_for("triton", "main") == ("moe_ffn",)
    x, logits, ws = layer_inputs(SHAPES["xla"], "balanced", seed=2)
    outs = [bench_layer._layer("xla", 2, v)(x, logits, *ws) for v in bench_layer.VARIANTS]
    for v, o in zip(bench_layer.VARIANTS[1:], outs[1:]):
        assert_close(o, outs[0], 1e-5, v)
