"""Triton GMM / TGMM (``kernels.triton.gmm``) through the CPU interpreter bridge, against ``moe_ops.reference``.

Outputs are poisoned by the bridge (NaN), so a row the kernel fails to write fails ``rel_err``. Shapes are tiny and
deliberately not multiples of the test tiles (M=70, K=40, N=56 against 16x32x16 tiles); the kernel-level functions get
an explicit small config, the ``moe_ops`` paths use the CPU default from ``tuning.pick_config``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import moe_ops
from kernels.triton import gmm as tg, schedule, tuning
from moe_ops import reference
from tests.gmm_cases import CFG, SHARDS, G, K, M, N, rand_rhs
from tests.helpers import (GROUP_CASES, TOL, assert_close, case_seed, grads_of, group_sizes, group_sizes_strategy, keys,
                           offset_array, randn)

# ---------------------------------------------------------------------------------------------------------------
# Kernel-level parity.

@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("case", GROUP_CASES)
def test_gmm_parity(case, shard, transpose):
    off, g_local = SHARDS[shard]
    k1, k2 = keys(case_seed(case, shard, transpose), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), rand_rhs(k2, g_local, transpose), group_sizes(case, G, M, seed=3)
    out = tg.gmm(lhs, rhs, sizes, offset_array(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    ref = reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose)
    assert out.dtype == jnp.float32
    assert_close(out, ref, TOL[jnp.float32], f"gmm {case} {shard}")


@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("case", GROUP_CASES)
def test_tgmm_parity(case, shard):
    off, g_local = SHARDS[shard]
    k1, k2 = keys(case_seed(case, shard), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), randn(k2, (M, N)), group_sizes(case, G, M, seed=4)
    out = tg.tgmm(lhs, rhs, sizes, offset_array(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    ref = reference.tgmm(lhs, rhs, sizes, group_offset=off, num_groups=g_local)
    assert out.shape == (g_local, K, N)
    assert_close(out, ref, TOL[jnp.float32], f"tgmm {case} {shard}")


@pytest.mark.parametrize("cfg", [pytest.param(tuning.GmmConfig(32, 16, 32, group_m=1, num_stages=1),
                                              marks=pytest.mark.slow),
                                 tuning.GmmConfig(16, 64, 32, group_m=4, num_stages=1)], ids=["tall", "wide"])
def test_tile_multiples_and_other_tiles(cfg):
    """Sizes that are exact tile multiples (the unmasked K / N path) and sizes that are not, under other tiles."""
    for m, k, n in [(64, 32, 64), (45, 24, 72)]:
        k1, k2, k3 = keys(m + k + n, 3)
        lhs, sizes = randn(k1, (m, k)), group_sizes("uneven", 4, m, seed=m)
        rhs = randn(k2, (3, k, n))
        out = tg.gmm(lhs, rhs, sizes, offset_array(1), transpose_rhs=False, out_dtype=jnp.float32, config=cfg)
        assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=1), 1e-5, f"gmm {m}x{k}x{n}")
        rhs2 = randn(k3, (m, n))
        out = tg.tgmm(lhs, rhs2, sizes, offset_array(1), num_groups=3, out_dtype=jnp.float32, config=cfg)
        assert_close(out, reference.tgmm(lhs, rhs2, sizes, group_offset=1, num_groups=3), 1e-5, f"tgmm {m}x{k}x{n}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32], ids=["out_in", "out_f32"])
def test_low_precision_inputs(dtype, out_dtype):
    k1, k2, k3 = keys(11, 3)
    lhs, rhs, sizes = randn(k1, (M, K), dtype), rand_rhs(k2, 3, False, dtype), group_sizes("empty_groups", G, M)
    want = jnp.dtype(out_dtype or dtype)
    out = moe_ops.gmm(lhs, rhs, sizes, group_offset=1, preferred_element_type=out_dtype, implementation="triton")
    assert out.dtype == want
    ref = reference.gmm(lhs, rhs, sizes, group_offset=1, preferred_element_type=out_dtype)
    assert_close(out, ref, TOL[dtype], "gmm")
    rhs2 = randn(k3, (M, N), dtype)
    out = moe_ops.tgmm(lhs, rhs2, sizes, group_offset=1, num_groups=3, preferred_element_type=out_dtype,
                       implementation="triton")
    assert out.dtype == want
    ref = reference.tgmm(lhs, rhs2, sizes, group_offset=1, num_groups=3, preferred_element_type=out_dtype)
    assert_close(out, ref, TOL[dtype], "tgmm")


def test_jit_traced_group_sizes():
    """One jitted function, group sizes and offset traced: different routings reuse it and stay right."""
    k1, k2 = keys(5, 2)
    lhs, rhs = randn(k1, (M, K)), rand_rhs(k2, 2, True)
    traces = []

    def traced_once(*args):
        traces.append(1)   # runs at trace time only
        return tg.gmm(*args, transpose_rhs=True, out_dtype=jnp.float32, config=CFG)
    fn = jax.jit(traced_once)
    for case, off in [("uneven", 0), ("one_hot_group", 2), ("sum_below_m", 3)]:
        sizes = group_sizes(case, G, M, seed=9)
        out = fn(lhs, rhs, sizes, offset_array(off))
        assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=True), 1e-5, case)
    assert len(traces) == 1, "new group sizes / offset must not retrace"


# ---------------------------------------------------------------------------------------------------------------
# Gradients through moe_ops (generic custom VJP calling these kernels) vs jax.grad of the reference.

@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shard", ["all", "middle", "last"])
def test_gmm_gradients(shard, transpose):
    off, g_local = SHARDS[shard]
    k1, k2, k3 = keys(21 + len(shard), 3)
    lhs, rhs, sizes = randn(k1, (M, K)), rand_rhs(k2, g_local, transpose), group_sizes("sum_below_m", G, M, seed=2)
    cot = randn(k3, (M, N))
    kw = dict(group_offset=off, transpose_rhs=transpose)
    got = jax.jit(lambda a, b: grads_of(lambda x, w: moe_ops.gmm(x, w, sizes, implementation="triton", **kw),
                                      (a, b), cot))(lhs, rhs)
    want = grads_of(lambda x, w: reference.gmm(x, w, sizes, **kw), (lhs, rhs), cot)
    for name, g, w in zip(("dlhs", "drhs"), got, want):
        assert_close(g, w, 1e-5, name)
    if off is not None:  # rows of non-local groups get exactly zero gradient
        local = reference.local_row_ids(sizes, M, off, g_local)
        assert np.all(np.asarray(got[0])[np.asarray(local) < 0] == 0)


@pytest.mark.parametrize("shard", ["all", "middle"])
def test_tgmm_gradients(shard):
    off, g_local = SHARDS[shard]
    k1, k2, k3 = keys(31 + len(shard), 3)
    lhs, rhs, sizes = randn(k1, (M, K)), randn(k2, (M, N)), group_sizes("empty_groups", G, M, seed=5)
    cot = randn(k3, (g_local, K, N))
    kw = dict(group_offset=off, num_groups=g_local)
    got = grads_of(lambda a, b: moe_ops.tgmm(a, b, sizes, implementation="triton", **kw), (lhs, rhs), cot)
    want = grads_of(lambda a, b: reference.tgmm(a, b, sizes, **kw), (lhs, rhs), cot)
    for name, g, w in zip(("dlhs", "drhs"), got, want):
        assert_close(g, w, 1e-5, name)


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis sweep over group sizes and shards.

@pytest.mark.slow
@given(data=st.data())
def test_gmm_tgmm_random_group_sizes(data):
    m, k, n, g = 48, 24, 40, 4
    sizes = data.draw(group_sizes_strategy(g, m))
    g_local = data.draw(st.integers(1, g))
    off = data.draw(st.integers(0, g - g_local))
    transpose = data.draw(st.booleans())
    k1, k2, k3 = keys(data.draw(st.integers(0, 10**6)), 3)
    lhs, rhs = randn(k1, (m, k)), rand_rhs(k2, g_local, transpose, k=k, n=n)
    out = tg.gmm(lhs, rhs, sizes, offset_array(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose), 1e-5, "gmm")
    rhs2 = randn(k3, (m, n))
    out = tg.tgmm(lhs, rhs2, sizes, offset_array(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.tgmm(lhs, rhs2, sizes, group_offset=off, num_groups=g_local), 1e-5, "tgmm")


# ---------------------------------------------------------------------------------------------------------------
# The device-side schedule (pure jnp: checked directly, many routings) and the tuning module.

@pytest.mark.slow
@given(data=st.data())
def test_row_tile_schedule_invariants(data):
    g = data.draw(st.sampled_from([1, 3, 8]))
    m = data.draw(st.sampled_from([1, 37, 64, 300]))  # few distinct shapes: eager jnp compiles once per shape
    bm = data.draw(st.sampled_from([16, 32, 64]))
    sizes = np.asarray(data.draw(group_sizes_strategy(g, m)))
    g_local = data.draw(st.integers(1, g))
    off = data.draw(st.integers(0, g - g_local))
    group, start, end = np.asarray(schedule.gmm_row_tiles(jnp.asarray(sizes), offset_array(off), m, g_local, bm))
    assert len(group) == schedule.max_row_tiles(m, bm, g_local)  # invariant 4: static worst case
    total = int(np.sum(group != schedule.IDLE))
    assert np.all(group[total:] == schedule.IDLE) and np.all(start[total:] == 0) and np.all(end[total:] == 0)
    group, start, end = group[:total], start[:total], end[:total]
    assert start[0] == 0 and end[-1] == m and np.all(start[1:] == end[:-1])  # invariant 2: partition of [0, M)
    assert np.all((end - start > 0) & (end - start <= bm))  # invariant 1
    row_group = np.repeat(group, end - start)
    want = np.asarray(reference.local_row_ids(jnp.asarray(sizes), m, off, g_local))
    assert np.array_equal(row_group, want)  # invariant 3 (so tiles never straddle groups, invariant 1)


def test_tuning_tables_and_heuristic():
    for arch, table in tuning.TABLES.items():
        for kind in tuning.KINDS:
            assert set(tuning.shipped(arch, kind, jnp.float32)) == {"small_f32"}
            names = set(tuning.shipped(arch, kind, jnp.bfloat16))
            assert names and "small_f32" not in names
            for shape in [(16384, 4096, 14336, 8), (256, 7168, 2048, 32), (512, 256, 256, 8)]:
                for dtype in (jnp.bfloat16, jnp.float32):
                    cfg = tuning.pick_config(kind, *shape, dtype, arch=arch)
                    assert cfg in tuning.shipped(arch, kind, dtype).values()
    pick = lambda kind, shape, arch="sm90": tuning.heuristic(kind, *shape, jnp.bfloat16, arch)
    decode, qwen3, mixtral = (256, 7168, 2048, 32), (65536, 2048, 768, 128), (16384, 4096, 14336, 8)
    assert (pick("gmm", decode), pick("gmm", (2048, 7168, 2048, 32)), pick("gmm", decode, "gfx950")) == (
        "thin", "decode", "decode")
    assert (pick("gmm", qwen3), pick("gmm", (65536, 768, 2048, 128)), pick("gmm", mixtral)) == (
        "large", "large", "large")
    assert (pick("tgmm", decode), pick("tgmm", mixtral), pick("gmm", qwen3, "gfx950")) == ("medium", "large", "large")
    cpu = tuning.pick_config("gmm", 16384, 4096, 14336, 8, jnp.bfloat16, arch="cpu")
    assert max(cpu.block_m, cpu.block_n, cpu.block_k) <= tuning.CPU_MAX_TILE
    with pytest.raises(ValueError):
        tuning.GmmConfig(48, 32, 32)
    if jax.default_backend() != "cpu":  # a GPU host (benchmarks/run_on_gpu.sh): its table, and autotune may run
        assert tuning.detect_arch() in tuning.TABLES
        return
    assert tuning.detect_arch() == "cpu"
    with pytest.raises(RuntimeError, match="GPU"):
        tuning.autotune("gmm", 64, 32, 32, 2, jnp.bfloat16)


def test_amd_options_only_for_hip():
    cfg = tuning.TABLES["gfx950"]["gmm"]["large"]
    assert {"waves_per_eu", "matrix_instr_nonkdim", "kpack"} <= set(cfg.compile_options("hip"))
    assert set(cfg.compile_options("cuda")) == {"num_warps", "num_stages"}


# ---------------------------------------------------------------------------------------------------------------
# The shipped GPU tile shapes, executed (not only compiled): the CPU default caps tiles at 32, so without this the
# 128x256-style tiles of the tables would run nowhere before a GPU does.

@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(tuning.TABLES))
@pytest.mark.parametrize("kind", ["gmm", "tgmm"])
def test_shipped_tiles_in_the_interpreter(kind, arch):
    m, k, n, g = 300, 200, 264, 4  # not multiples of any shipped tile
    k1, k2 = keys(case_seed(kind, arch), 2)
    lhs, sizes = randn(k1, (m, k)), jnp.array([90, 0, 130, 50], jnp.int32)  # an empty group, sum < m
    configs = {**tuning.shipped(arch, kind, jnp.bfloat16), **tuning.shipped(arch, kind, jnp.float32)}
    assert configs == tuning.TABLES[arch][kind]
    for name, cfg in configs.items():
        if kind == "gmm":
            rhs = randn(k2, (g, k, n))
            out = tg.gmm(lhs, rhs, sizes, offset_array(None), transpose_rhs=False, out_dtype=jnp.float32, config=cfg)
            ref = reference.gmm(lhs, rhs, sizes)
        else:
            rhs = randn(k2, (m, n))
            out = tg.tgmm(lhs, rhs, sizes, offset_array(None), num_groups=g, out_dtype=jnp.float32, config=cfg)
            ref = reference.tgmm(lhs, rhs, sizes)
        assert_close(out, ref, TOL[jnp.float32], f"{kind} {arch} {name}")


@given(data=st.data())
def test_tgmm_bounds_longest_first(data):
    """Every local group exactly once, in descending size (stable), with its own rows; out-of-range ids are empty."""
    g, m = 6, 64
    sizes = data.draw(group_sizes_strategy(g, m))
    g_local = data.draw(st.integers(1, g))
    off = data.draw(st.integers(-1, g))
    ids, start, end = np.asarray(schedule.tgmm_group_bounds(sizes, offset_array(off), g_local))
    assert sorted(ids) == list(range(g_local))
    lengths = end - start
    assert np.all(np.diff(lengths) <= 0)
    ends = np.cumsum(np.asarray(sizes))
    for j, gid in enumerate(ids):
        glob = off + gid
        want = (ends[glob] - sizes[glob], ends[glob]) if 0 <= glob < g else None
        assert (want is None and lengths[j] == 0) or (start[j], end[j]) == tuple(want)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="reads the program XLA GPU compiles: runs on a GPU host (benchmarks/run_on_gpu.sh)")
def test_gpu_compiled_programs_hold_no_while_loop():
    """jax >= 0.11 lowers the tile schedule's cumsum for CUDA to a ``chlo.scan`` composite whose fallback
    decomposition is a ``while``; ``tests/test_real_lowering.py`` exempts it on the promise that XLA GPU replaces the
    composite by its own scan kernel. This checks the promise: no ``while`` in the optimised GPU program of the GMM's
    gradient or of the default layer's."""
    k = keys(41, 5)
    lhs, rhs = randn(k[0], (M, K), jnp.bfloat16), randn(k[1], (G, K, N), jnp.bfloat16)
    sizes = group_sizes("uneven", G, M, seed=7)
    gmm_grad = jax.jit(jax.grad(lambda a, b: jnp.sum(moe_ops.gmm(a, b, sizes).astype(jnp.float32) ** 2), (0, 1)))
    x, logits = randn(k[2], (32, K), jnp.bfloat16), randn(k[3], (32, G))
    wg, wu = randn(k[4], (G, K, N), jnp.bfloat16), randn(k[4], (G, K, N), jnp.bfloat16, 0.5)
    wd = jnp.swapaxes(wu, 1, 2)
    layer_grad = jax.jit(jax.grad(lambda *a: jnp.sum(moe_ops.moe_ffn(*a, top_k=2).astype(jnp.float32) ** 2),
                                  (0, 1, 2, 3, 4)))
    for name, fn, args in (("gmm", gmm_grad, (lhs, rhs)), ("moe_ffn", layer_grad, (x, logits, wg, wu, wd))):
        text = fn.lower(*args).compile().as_text()
        assert not re.search(r"\bwhile\(", text), f"{name}: a while loop in the compiled GPU program"
