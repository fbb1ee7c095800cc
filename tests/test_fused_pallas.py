"""Pallas fused dispatch / combine (``kernels.pallas.fused``) in TPU interpret mode: kernel parity against the
unfused reference composition, one strict-interpreter test per kernel, the custom VJPs and ``moe_ffn`` (fused by
default on Pallas) against the dense layer, and Mosaic lowering through the public API.

Kernel calls run with ``uninitialized_memory="nan"``: a sorted row / token slot the kernel fails to write is NaN
and fails ``rel_err``. T*k = 39 rows against 16-row tiles (a partial last tile), K = N = 256 against 128 tiles (two K
steps through the gathered VMEM tile, two column blocks of slot DMAs); the strict test adds K = 200 (a partial K
block: the gathered tile is padded and masked). Routings as in ``tests/test_fused.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from kernels.pallas import fused as pf, tiling
from moe_ops import fused, reference as R
from tests.helpers import (POISON, SHAPES, TOL, assert_close, case_seed, grads_of, keys, layer_inputs, loss,
                           offset_array, randn)
from tests.routed_cases import E, T, TOP_K, expert_ids, rand_rhs, routed

K = N = 256
T16 = tiling.Tiling(16, 128, 128)
# (routing, dtype, transpose_rhs): every routing once, both rhs layouts, bf16 once (interpret mode is slow)
PARITY_CASES = [("uneven_dropped", jnp.float32, False), ("empty_groups", jnp.bfloat16, True),
                ("one_expert", jnp.float32, True), ("all_dropped", jnp.float32, False)]


# Interpret-mode kernels run io_callbacks that dispatch JAX ops; dispatching other JAX work on the main thread while
# they are still in flight (async dispatch) deadlocked in one run here. Every call is waited for (``_ready``).
_ready = jax.block_until_ready


def _gather(x, rhs, sizes, off, sort_idx, transpose=False, dtype=None, interpret=POISON, t=T16, **kw):
    return _ready(pf.gather_gmm(x, rhs, sizes, offset_array(off), sort_idx, TOP_K, transpose_rhs=transpose,
                                out_dtype=dtype or x.dtype, tiling=t, interpret=interpret, **kw))


def _scatter(h, rhs, sizes, off, sort_idx, w, transpose=False, dtype=None, interpret=POISON, t=T16):
    return _ready(pf.scatter_gmm(h, rhs, sizes, offset_array(off), sort_idx, w, transpose_rhs=transpose,
                                 out_dtype=dtype or h.dtype, tiling=t, interpret=interpret))


def _weights(key):
    return jax.random.uniform(key, (T, TOP_K), jnp.float32, 0.1, 1.0)


@pytest.mark.parametrize("routing,dtype,transpose", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_gather_and_scatter_parity(routing, dtype, transpose):
    ids, sizes, sort_idx = routed(routing, case_seed(routing))
    k1, k2, k3, k4 = keys(case_seed(routing, transpose, str(dtype), "pallas"), 4)
    x, h = randn(k1, (T, K), dtype), randn(k2, (T * TOP_K, K), dtype)  # rows beyond the sum are not zero
    rhs, w = rand_rhs(k3, E, transpose, dtype, K, N), _weights(k4)
    out = _gather(x, rhs, sizes, 0, sort_idx, transpose)
    ref = R.gmm(R.permute(x, ids, E)[0], rhs, sizes, transpose_rhs=transpose)
    assert out.dtype == dtype and out.shape == (T * TOP_K, N)
    assert_close(out, ref, TOL[dtype], f"gather_gmm {routing}")
    assert np.all(np.asarray(out)[int(jnp.sum(sizes)):] == 0), "rows beyond sum(group_sizes) must be zero"
    out = _scatter(h, rhs, sizes, 0, sort_idx, w, transpose)
    ref = R.unpermute(R.gmm(h, rhs, sizes, transpose_rhs=transpose, preferred_element_type=jnp.float32), sort_idx, w)
    assert out.dtype == dtype and out.shape == (T, N)
    if routing == "all_dropped":
        assert np.all(np.asarray(out) == 0)
    else:
        assert_close(out, ref, TOL[dtype], f"scatter_gmm {routing}")


def test_strict_interpreter_gather_gmm(strict_interpreter):
    """No out-of-bounds reads, no races, every row written: a middle shard, row weights, a partial K block, and a
    row tile shared by several groups (fetched once, read by each)."""
    ids, sizes, sort_idx = routed("uneven_dropped", 21)
    k1, k2, k3 = keys(21, 3)
    x, rhs, w = randn(k1, (T, 200)), rand_rhs(k2, 2, False, jnp.float32, 200, N), _weights(k3)
    out = _gather(x, rhs, sizes, 1, sort_idx, row_weights=w, interpret=strict_interpreter)
    ref = R.gmm(R.permute(x, ids, E)[0], rhs, sizes, group_offset=1) * w.reshape(-1)[sort_idx][:, None]
    assert_close(out, ref, 1e-5, "strict weighted gather_gmm")


@pytest.mark.parametrize("routing,off", [("uneven_dropped", 1), pytest.param("one_expert", 0, marks=pytest.mark.slow)])
def test_strict_interpreter_gather_pipeline(routing, off, strict_interpreter):
    """The double-buffered row DMAs of ``gathered_lhs``: 8-row tiles (five consecutive row tiles, the last partial,
    each prefetched while the previous computes; tiles shared by two groups fetched once), two K blocks, three column
    blocks (the pipeline restarts at each: after the last step of one block the next fresh tile is step 0 of the
    next), and with ``off = 1`` a cold start past row tile 0 (group 0's rows are not local)."""
    ids, sizes, sort_idx = routed(routing, 41)
    k1, k2 = keys(41, 2)
    x, rhs = randn(k1, (T, K)), rand_rhs(k2, E, False, jnp.float32, K, 384)
    out = _gather(x, rhs, sizes, off, sort_idx, interpret=strict_interpreter, t=tiling.Tiling(8, 128, 128))
    ref = R.gmm(R.permute(x, ids, E)[0], rhs, sizes, group_offset=off)
    assert_close(out, ref, 1e-5, f"pipelined gather_gmm {routing}")
    if off:
        assert int(sizes[0]) >= 8, "group 0 should fill the first row tile (cold start past tile 0)"


def test_gather_vmem_counts_both_buffers():
    """``fused_vmem_bytes`` of a gather counts two [tm, Kp] buffers per gathered source (Kp: K rounded up to tk)."""
    t, dt = tiling.Tiling(128, 512, 256), jnp.bfloat16
    base = pf.fused_vmem_bytes(t, 1000, dt, dt, gather=True, footprint=pf.Footprint(sources=0))
    assert pf.fused_vmem_bytes(t, 1000, dt, dt, gather=True) - base == 2 * 128 * 1024 * 2
    two = pf.fused_vmem_bytes(t, 1000, dt, dt, gather=True, footprint=pf.Footprint(sources=2))
    assert two - base == 4 * 128 * 1024 * 2


def test_strict_interpreter_scatter_gmm(strict_interpreter):
    """No out-of-bounds reads, no races, every slot written: the last shard, transposed rhs, two column blocks."""
    _, sizes, sort_idx = routed("uneven_dropped", 22)
    k1, k2, k3 = keys(22, 3)
    h, rhs, w = randn(k1, (T * TOP_K, K)), rand_rhs(k2, 2, True, jnp.float32, K, N), _weights(k3)
    out = _scatter(h, rhs, sizes, 3, sort_idx, w, transpose=True, interpret=strict_interpreter)
    ref = R.unpermute(R.gmm(h, rhs, sizes, group_offset=3, transpose_rhs=True), sort_idx, w)
    assert_close(out, ref, 1e-5, "strict sharded scatter_gmm")


def test_heuristic_tiling_and_tn_rule():
    """Default tilings run (tiny whole-dim blocks), and scatter refuses a tn that does not divide N."""
    ids, sizes, sort_idx = routed("empty_groups", 5)
    k1, k2, k3 = keys(5, 3)
    x, rhs, w = randn(k1, (T, 20)), rand_rhs(k2, E, False, jnp.float32, 20, 24), _weights(k3)
    hid, ref = _gather(x, rhs, sizes, 0, sort_idx, t=None), R.gmm(R.permute(x, ids, E)[0], rhs, sizes)
    assert_close(hid, ref, 1e-5, "heuristic gather")
    back = jnp.swapaxes(rhs, 1, 2)                                  # [E, 24, 20]
    out = _scatter(hid, back, sizes, 0, sort_idx, w, t=None)
    assert_close(out, R.unpermute(R.gmm(ref, back, sizes), sort_idx, w), 1e-5, "heuristic scatter")
    with pytest.raises(ValueError, match="tn to divide"):
        _scatter(randn(k1, (T * TOP_K, K)), rand_rhs(k2, E, False, jnp.float32, K, 384), sizes, 0, sort_idx, w,
                 t=tiling.Tiling(16, 128, 256))


# ---------------------------------------------------------------------------------------------------------------
# Public ops (custom VJPs of moe_ops.fused on the Pallas backend) and the layer.


def test_public_ops_gradients_pallas():
    """gather_gmm (dx, drhs) and scatter_gmm (dh, drhs, dweights) vs jax.grad of the reference composition."""
    ids, sizes, sort_idx = routed("uneven_dropped", 3)
    k1, k2, k3, k4, k5 = keys(case_seed("pallas", "grads"), 5)
    x = randn(k1, (T, K))
    w_in, w_out = rand_rhs(k2, E, False, jnp.float32, K, N), rand_rhs(k3, E, True, jnp.float32, N, K)
    w, cot = _weights(k4), randn(k5, (T, K))

    def ours(a, b, c, wt):
        hid = jnp.tanh(fused.gather_gmm(a, b, sizes, sort_idx, implementation="pallas"))
        return fused.scatter_gmm(hid, c, sizes, sort_idx, wt, transpose_rhs=True, implementation="pallas")

    def ref(a, b, c, wt):
        hid = jnp.tanh(R.gmm(R.permute(a, ids, E)[0], b, sizes))
        return R.unpermute(R.gmm(hid, c, sizes, transpose_rhs=True), sort_idx, wt)

    args = (x, w_in, w_out, w)
    assert_close(_ready(jax.jit(ours)(*args)), ref(*args), 1e-5, "forward")
    got = _ready(jax.jit(lambda *a: grads_of(ours, a, cot))(*args))
    for name, g, e in zip(("dx", "dw_in", "dw_out", "dweights"), got, grads_of(ref, args, cot)):
        assert_close(g, e, 1e-5, name)
    dropped = np.asarray(expert_ids("uneven_dropped", 3)).reshape(-1)
    dropped = (dropped < 0) | (dropped >= E)
    assert dropped.any() and np.all(np.asarray(got[3]).reshape(-1)[dropped] == 0)


LAYER_CASES = [  # (E, top_k, routing, dtype); the first is the default-path check, the rest sweep
    (8, 2, "hot", jnp.float32),
    pytest.param(8, 1, "one_expert", jnp.float32, marks=pytest.mark.slow),
    pytest.param(64, 8, "balanced", jnp.float32, marks=pytest.mark.slow),
    pytest.param(8, 2, "balanced", jnp.bfloat16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("num_experts,top_k,routing,dtype", LAYER_CASES)
def test_moe_ffn_default_fuses_on_pallas(num_experts, top_k, routing, dtype, monkeypatch):
    """moe_ffn(fused=None) on Pallas takes the fused path; forward and all five gradients match the dense layer (f32
    reference on the same values) and the unfused Pallas path."""
    calls = []
    real = fused.sort_by_expert   # the fused path's first step (the unfused path sorts inside permute)
    monkeypatch.setattr(fused, "sort_by_expert", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    b, s, d, f, _ = SHAPES["pallas"]
    x, logits, ws = layer_inputs((b, s, d, f, num_experts), routing, seed=top_k, dtype=dtype)
    tol = TOL[dtype]
    f32 = [a.astype(jnp.float32) for a in (x, *ws)]
    run = lambda fz: jax.jit(lambda *a: moe_ops.moe_ffn(*a, top_k=top_k, implementation="pallas", fused=fz))
    got = _ready(run(None)(x, logits, *ws))
    assert calls, "moe_ffn(fused=None) did not take the fused path on Pallas"
    assert got.dtype == dtype
    dense = lambda *a, top_k: R.moe_ffn_dense(*a, top_k=top_k)
    assert_close(got, dense(f32[0], logits, *f32[1:], top_k=top_k), tol, "forward")
    cot = randn(keys(19, 1)[0], x.shape)
    grads = jax.jit(jax.grad(loss(lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, implementation="pallas"),
                                  top_k, cot), argnums=range(5)))(x, logits, *ws)
    grads = _ready(grads)
    expected = jax.jit(jax.grad(loss(dense, top_k, cot), argnums=range(5)))(f32[0], logits, *f32[1:])
    for name, g, e in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], grads, expected):
        assert_close(g, e, tol, f"d{name}")
    if dtype == jnp.float32:
        assert_close(got, _ready(run(False)(x, logits, *ws)), 1e-5, "fused vs unfused")


# ---------------------------------------------------------------------------------------------------------------
# Mosaic lowering through the public API (Mosaic chosen per lowering platform from this CPU host).


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_public_fused_ops_lower_to_mosaic(dtype, monkeypatch):
    sds = jax.ShapeDtypeStruct
    t, k, d, f, e = 256, 2, 512, 384, 8
    sizes, idx = sds((e,), jnp.int32), sds((t * k,), jnp.int32)

    def fwd_bwd(x, w_in, w_out, sizes, sort_idx, weights):
        def f_(x, w_in, w_out, weights):
            hid = fused.gather_gmm(x, w_in, sizes, sort_idx, implementation="pallas")
            return jnp.sum(fused.scatter_gmm(hid, w_out, sizes, sort_idx, weights, implementation="pallas")
                           .astype(jnp.float32))
        return jax.grad(f_, argnums=(0, 1, 2, 3))(x, w_in, w_out, weights)

    args = (sds((t, d), dtype), sds((e, d, f), dtype), sds((e, f, d), dtype), sizes, idx, sds((t, k), jnp.float32))
    text = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(*args).mlir_module()
    assert text.count("tpu_custom_call") >= 4, "expected the fused kernels and their backward GMMs as Mosaic calls"
    layer = lambda x, lg, wg, wu, wd: moe_ops.moe_ffn(x, lg, wg, wu, wd, top_k=k, implementation="pallas")
    largs = (sds((t, d), dtype), sds((t, e), jnp.float32), sds((e, d, f), dtype), sds((e, d, f), dtype),
             sds((e, f, d), dtype))
    assert "tpu_custom_call" in jax.export.export(jax.jit(layer), platforms=["tpu"])(*largs).mlir_module()


@pytest.mark.parametrize("chip", sorted(tiling.CHIPS))
def test_fused_heuristic_fits_vmem(chip):
    """The fused tilings of the benchmark layer shapes (gate/up gather, down scatter) fit the chip's VMEM budget."""
    from benchmarks.shapes import LAYER_SHAPES  # noqa: PLC0415
    budget = tiling.CHIPS[chip].budget_bytes
    for s in LAYER_SHAPES.values():
        for gather, (k, n) in ((True, (s.d, s.f)), (False, (s.f, s.d))):
            t = pf.fused_tiling(None, s.t * s.topk, k, n, s.e, jnp.bfloat16, jnp.bfloat16, gather=gather, chip=chip)
            assert pf.fused_vmem_bytes(t, k, jnp.bfloat16, jnp.bfloat16, gather=gather) <= budget, (s.name, t)
            assert gather or n % t.tn == 0
