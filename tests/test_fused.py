"""Fused dispatch / combine (``moe_ops.fused``, ``kernels.triton.fused``): the gather-GMM and the weighted
scatter-GMM against the unfused reference composition (``reference.permute`` / ``gmm`` / ``unpermute``), their
custom VJPs against ``jax.grad`` of that composition, and ``moe_ffn(fused=True)`` against the dense einsum layer.

Kernel outputs are poisoned by the bridge (NaN), so a sorted row or token slot the kernel fails to write fails
``rel_err``. Routings cover uneven and empty groups, one expert taking every copy, dropped copies (expert ids
below 0 and at or above E sort last, beyond ``sum(group_sizes)``) and every copy dropped. Shapes are tiny and not
multiples of the 16x16x16 test tiles (T*k = 39 rows, K = 20, N = 24).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from kernels.triton import fused as tf
from moe_ops import fused, reference as R
from tests.helpers import (SHAPES, TOL, assert_close, case_seed, grads_of, keys, layer_inputs, loss, offset_array,
                           randn, sharded_sum, unsharded_sum)
from tests.routed_cases import CFG, E, K, N, ROUTINGS, T, TOP_K, expert_ids, rand_rhs, routed

# ---------------------------------------------------------------------------------------------------------------
# Kernel-level parity (Triton backend functions, explicit small tiles).

DTYPE_CASES = [(jnp.float32, False), (jnp.float32, True), (jnp.bfloat16, False)]
DTYPE_IDS = ["f32-kn", "f32-nk", "bf16-kn"]


@pytest.mark.parametrize("dtype,transpose", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_gather_gmm_parity(routing, dtype, transpose):
    ids, sizes, sort_idx = routed(routing, case_seed(routing))
    k1, k2 = keys(case_seed(routing, transpose, str(dtype)), 2)
    x, rhs = randn(k1, (T, K), dtype), rand_rhs(k2, E, transpose, dtype)
    out = tf.gather_gmm(x, rhs, sizes, offset_array(0), sort_idx, TOP_K, transpose_rhs=transpose, out_dtype=dtype,
                        config=CFG)
    ref = R.gmm(R.permute(x, ids, E)[0], rhs, sizes, transpose_rhs=transpose)
    assert out.dtype == dtype and out.shape == (T * TOP_K, N)
    assert_close(out, ref, TOL[dtype], f"gather_gmm {routing}")
    tail = np.asarray(out)[int(jnp.sum(sizes)):]
    assert np.all(tail == 0), "rows beyond sum(group_sizes) must be zero"


@pytest.mark.parametrize("dtype,transpose", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_scatter_gmm_parity(routing, dtype, transpose):
    _, sizes, sort_idx = routed(routing, case_seed(routing))
    k1, k2, k3 = keys(case_seed(routing, transpose, str(dtype), "s"), 3)
    h, rhs = randn(k1, (T * TOP_K, K), dtype), rand_rhs(k2, E, transpose, dtype)  # rows beyond the sum are not zero
    weights = jax.random.uniform(k3, (T, TOP_K), jnp.float32, 0.1, 1.0)
    out = tf.scatter_gmm(h, rhs, sizes, offset_array(0), sort_idx, weights, transpose_rhs=transpose, out_dtype=dtype,
                         config=CFG)
    ref = R.unpermute(R.gmm(h, rhs, sizes, transpose_rhs=transpose, preferred_element_type=jnp.float32), sort_idx,
                      weights)
    assert out.dtype == dtype and out.shape == (T, N)
    if routing == "all_dropped":  # every copy dropped: exact zeros, not merely small
        assert np.all(np.asarray(out) == 0)
    else:
        assert_close(out, ref, TOL[dtype], f"scatter_gmm {routing}")


SUM_CASES = [(r, jnp.float32, t, 0, E) for r in ROUTINGS for t in (False, True)] + [
    ("uneven_dropped", jnp.bfloat16, True, 0, E), ("uneven_dropped", jnp.float32, True, 2, 3),
    ("one_expert", jnp.float32, False, 2, 1)]


@pytest.mark.parametrize("routing,dtype,transpose,off,g_local", SUM_CASES)
def test_scatter_gmm_sum_parity(routing, dtype, transpose, off, g_local):
    """Two operand pairs in one launch (the second K2 = 28 wide, not a multiple of the 16-wide tiles): the scatter of
    ``h @ rhs + h2 @ rhs2``, local groups only, against the reference composition in f32."""
    _, sizes, sort_idx = routed(routing, case_seed(routing, "sum"))
    k1, k2, k3, k4, k5 = keys(case_seed(routing, transpose, str(dtype), off, "sum"), 5)
    h, h2 = randn(k1, (T * TOP_K, K), dtype), randn(k2, (T * TOP_K, 28), dtype)
    rhs, rhs2 = rand_rhs(k3, g_local, transpose, dtype), rand_rhs(k4, g_local, transpose, dtype, k=28)
    weights = jax.random.uniform(k5, (T, TOP_K), jnp.float32, 0.1, 1.0)
    out = tf.scatter_gmm_sum(h, rhs, h2, rhs2, sizes, offset_array(off), sort_idx, weights, transpose_rhs=transpose,
                             out_dtype=dtype, config=CFG)
    kw = dict(group_offset=off, transpose_rhs=transpose, preferred_element_type=jnp.float32)
    ref = R.unpermute(R.gmm(h, rhs, sizes, **kw) + R.gmm(h2, rhs2, sizes, **kw), sort_idx, weights)
    assert out.dtype == dtype and out.shape == (T, N)
    if routing == "all_dropped":
        assert np.all(np.asarray(out) == 0)
    else:
        assert float(jnp.max(jnp.abs(ref))) > 0
        assert_close(out, ref, TOL[dtype], f"scatter_gmm_sum {routing}")


@pytest.mark.parametrize("off,g_local", [(0, 2), (2, 3)], ids=["first", "last"])
def test_sharded_groups_and_row_weights(off, g_local):
    """group_offset (rows of non-local groups are zero / contribute zero) and the gather's row-weight epilogue."""
    ids, sizes, sort_idx = routed("uneven_dropped", 7 + off)
    k1, k2, k3, k4 = keys(40 + off, 4)
    x, h = randn(k1, (T, K)), randn(k2, (T * TOP_K, K))
    rhs = rand_rhs(k3, g_local, False, jnp.float32)
    weights = jax.random.uniform(k4, (T, TOP_K), jnp.float32, 0.1, 1.0)
    out = tf.gather_gmm(x, rhs, sizes, offset_array(off), sort_idx, TOP_K, transpose_rhs=False, out_dtype=jnp.float32,
                        row_weights=weights, config=CFG)
    ref = R.gmm(R.permute(x, ids, E)[0], rhs, sizes, group_offset=off) * weights.reshape(-1)[sort_idx][:, None]
    assert_close(out, ref, 1e-5, "weighted gather_gmm")
    out = tf.scatter_gmm(h, rhs, sizes, offset_array(off), sort_idx, weights, transpose_rhs=False,
                         out_dtype=jnp.float32, config=CFG)
    ref = R.unpermute(R.gmm(h, rhs, sizes, group_offset=off), sort_idx, weights)
    assert_close(out, ref, 1e-5, "sharded scatter_gmm")


# ---------------------------------------------------------------------------------------------------------------
# Public ops: forward and custom VJPs vs jax.grad of the unfused reference composition.


@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_gather_gmm_gradients(impl, transpose):
    ids, sizes, sort_idx = routed("uneven_dropped", 3)
    k1, k2, k3 = keys(case_seed(impl, transpose, "gg"), 3)
    x, rhs, cot = randn(k1, (T, K)), rand_rhs(k2, E, transpose, jnp.float32), randn(k3, (T * TOP_K, N))
    ours = lambda a, b: fused.gather_gmm(a, b, sizes, sort_idx, transpose_rhs=transpose, implementation=impl)
    ref = lambda a, b: R.gmm(R.permute(a, ids, E)[0], b, sizes, transpose_rhs=transpose)
    assert_close(jax.jit(ours)(x, rhs), ref(x, rhs), 1e-5, "forward")
    for name, g, w in zip(("dx", "drhs"), jax.jit(lambda a, b: grads_of(ours, (a, b), cot))(x, rhs),
                          grads_of(ref, (x, rhs), cot)):
        assert_close(g, w, 1e-5, name)


@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_scatter_gmm_gradients(impl, transpose):
    _, sizes, sort_idx = routed("uneven_dropped", 4)
    k1, k2, k3, k4 = keys(case_seed(impl, transpose, "sg"), 4)
    h, rhs, cot = randn(k1, (T * TOP_K, K)), rand_rhs(k2, E, transpose, jnp.float32), randn(k3, (T, N))
    weights = jax.random.uniform(k4, (T, TOP_K), jnp.float32, 0.1, 1.0)
    ours = lambda a, b, w: fused.scatter_gmm(a, b, sizes, sort_idx, w, transpose_rhs=transpose, implementation=impl)
    ref = lambda a, b, w: R.unpermute(R.gmm(a, b, sizes, transpose_rhs=transpose), sort_idx, w)
    assert_close(jax.jit(ours)(h, rhs, weights), ref(h, rhs, weights), 1e-5, "forward")
    got = jax.jit(lambda *a: grads_of(ours, a, cot))(h, rhs, weights)
    want = grads_of(ref, (h, rhs, weights), cot)
    for name, g, w in zip(("dh", "drhs", "dweights"), got, want):
        assert_close(g, w, 1e-5, name)
    beyond = np.asarray(got[0])[int(jnp.sum(sizes)):]  # dropped copies: exactly zero gradient
    assert beyond.size and np.all(beyond == 0)
    dropped = np.asarray(expert_ids("uneven_dropped", 4)).reshape(-1)
    dropped = (dropped < 0) | (dropped >= E)
    assert dropped.any() and np.all(np.asarray(got[2]).reshape(-1)[dropped] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_fused_ops_in_shard_map_grads_of_replicated_weights(impl):
    """Tokens sharded, weights replicated, check_vma on: weight gradients are the sum over shards."""
    t = 4  # tokens per shard
    ids = expert_ids("uneven_dropped", 8)[:t]
    _, sizes, sort_idx = R.permute(jnp.zeros((t, 1)), ids, E)
    k1, k2, k3, k4 = keys(case_seed(impl, "shard_map"), 4)
    x = randn(k1, (4 * t, K))
    w_in, w_out = rand_rhs(k2, E, False, jnp.float32), rand_rhs(k3, E, False, jnp.float32, N, K)
    weights = jax.random.uniform(k4, (t, TOP_K), jnp.float32, 0.1, 1.0)

    def per_shard(tokens, w_in, w_out, weights, gather_gmm, scatter_gmm):
        h = jnp.tanh(gather_gmm(tokens, w_in))
        return jnp.sum(scatter_gmm(h, w_out, weights) ** 2)

    ours = (lambda a, b: fused.gather_gmm(a, b, sizes, sort_idx, implementation=impl),
            lambda a, b, w: fused.scatter_gmm(a, b, sizes, sort_idx, w, implementation=impl))
    ref = (lambda a, b: R.gmm(R.permute(a, ids, E)[0], b, sizes),
           lambda a, b, w: R.unpermute(R.gmm(a, b, sizes), sort_idx, w))
    args = (x, w_in, w_out, weights)
    got = jax.jit(jax.grad(sharded_sum(lambda *a: per_shard(*a, *ours)), argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(unsharded_sum(lambda *a: per_shard(*a, *ref)), argnums=(0, 1, 2, 3)))(*args)
    for name, g, e in zip(["x", "w_in", "w_out", "weights"], got, want):
        assert_close(g, e, 1e-5, name)


# ---------------------------------------------------------------------------------------------------------------
# The layer: moe_ffn(fused=...) vs the dense einsum layer, and the backend choice.


@pytest.mark.slow
@pytest.mark.parametrize("impl,fused_arg,takes_fused", [("triton", None, True), ("xla", True, True),
                                                      ("triton", False, False)])
def test_moe_ffn_fused_matches_dense(impl, fused_arg, takes_fused, monkeypatch):
    """Forward and all five gradients, f32; the default (None) on Triton is the fused path, False the unfused one."""
    calls = []
    real = fused.sort_by_expert   # the fused path's first step (the unfused path sorts inside permute)
    monkeypatch.setattr(fused, "sort_by_expert", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, logits, ws = layer_inputs(SHAPES[impl], "hot", seed=5)
    top_k = 2
    ours = jax.jit(lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, implementation=impl, fused=fused_arg),
                   static_argnames="top_k")
    assert_close(ours(x, logits, *ws, top_k=top_k), R.moe_ffn_dense(x, logits, *ws, top_k=top_k), 1e-5, "forward")
    assert bool(calls) == takes_fused, "moe_ffn took the wrong (fused / unfused) path"
    cot = randn(keys(19, 1)[0], x.shape)
    grads = jax.jit(jax.grad(loss(ours, top_k, cot), argnums=range(5)))(x, logits, *ws)
    expected = jax.jit(jax.grad(loss(R.moe_ffn_dense, top_k, cot), argnums=range(5)))(x, logits, *ws)
    for name, g, e in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], grads, expected):
        assert_close(g, e, 1e-5, f"d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["triton", "xla"])
def test_moe_ffn_fused_bf16(impl):
    """bf16 forward and gradients vs the dense layer in f32 on the same (bf16-valued) inputs."""
    x, logits, ws = layer_inputs(SHAPES[impl], "balanced", seed=6, dtype=jnp.bfloat16)
    ours = lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, implementation=impl, fused=True)
    got = jax.jit(functools.partial(ours, top_k=2))(x, logits, *ws)  # jitted: op-by-op dispatch took ~40 s on CPU
    assert got.dtype == jnp.bfloat16 and got.shape == x.shape
    f32 = [a.astype(jnp.float32) for a in (x, *ws)]
    assert_close(got, R.moe_ffn_dense(f32[0], logits, *f32[1:], top_k=2), 2e-2, "bf16 forward")
    cot = randn(keys(3, 1)[0], x.shape)
    grads = jax.jit(jax.grad(loss(ours, 2, cot), argnums=range(5)))(x, logits, *ws)
    expected = jax.jit(jax.grad(loss(R.moe_ffn_dense, 2, cot), argnums=range(5)))(f32[0], logits, *f32[1:])
    for name, g, e in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], grads, expected):
        assert g.dtype == (jnp.float32 if name == "router_logits" else jnp.bfloat16)
        assert_close(g, e, 2e-2, f"bf16 d{name}")


def test_fused_choice_and_errors(monkeypatch):
    assert fused.use_fused(None, "triton") and not fused.use_fused(None, "xla")
    assert fused.use_fused(True, "xla") and not fused.use_fused(False, "triton")
    assert all(fused.supports_fused(i) for i in ("triton", "xla", "pallas"))
    assert fused.use_fused(None, "pallas") and fused.use_fused(True, "pallas")
    _, sizes, sort_idx = routed("uneven_dropped", 1)
    x, rhs = randn(keys(1, 1)[0], (T, K)), jnp.ones((E, K, N))
    monkeypatch.setattr(fused, "supports_fused", lambda impl=None: impl != "pallas")  # a backend without them
    with pytest.raises(NotImplementedError, match="pallas"):
        fused.gather_gmm(x, rhs, sizes, sort_idx, implementation="pallas")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="multiple of T"):
        fused.gather_gmm(x, rhs, sizes, sort_idx[:-1], implementation="xla")
    with pytest.raises(ValueError, match="disagree"):
        fused.scatter_gmm(jnp.ones((T * TOP_K, K)), rhs, sizes, sort_idx, jnp.ones((T, TOP_K + 1)),
                          implementation="xla")
    # fused=False never touches the fused ops.
    monkeypatch.setattr(fused, "gather_gmm", lambda *a, **kw: pytest.fail("fused op called with fused=False"))
    x3, logits, ws = layer_inputs(SHAPES["xla"], "balanced")
    moe_ops.moe_ffn(x3, logits, *ws, top_k=2, implementation="xla", fused=False)
