"""The persistent TMA GMM variant (``kernels.triton.gmm_tma``, ``MOE_OPS_GMM_VARIANT=tma``) and its global scratch
(``kernels.triton.scratch``): interpreter parity against ``moe_ops.reference`` (tensor descriptors, TMA stores
included, run in the Triton interpreter) for every epilogue, ``jax.vmap`` against per-example calls, gradients through
the public op, the scratch operand in jax-triton's real CUDA / ROCm lowering, TMA loads and stores in the sm_90 SASS,
and the persistent kernel's AMD builds (CU-count programs, no spills).
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

import moe_ops
from kernels import aot, lowering
from kernels.registry import cases_for
from kernels.triton import gmm as tg, gmm_tma, schedule, tuning
from moe_ops import reference
from tests.gmm_cases import CFG, SHARDS, G, K, M, N, rand_rhs
from tests.helpers import (GROUP_CASES, TOL, assert_close, case_seed, group_sizes, group_sizes_strategy, keys,
                           offset_array, randn)

needs_plugin = pytest.mark.skipif(lowering.unavailable_reason() is not None,
                                  reason=str(lowering.unavailable_reason()))


@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shard", ["all", pytest.param("middle", marks=pytest.mark.slow),
                                   pytest.param("last", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", GROUP_CASES)
def test_tma_gmm_parity(case, shard, transpose):
    """Tiny non-tile-multiple shapes (M=70, K=40, N=56; 16x32x16 tiles), every group case, three programs walking
    the tile list: every row written (outputs are poisoned), zeros outside local groups."""
    off, g_local = SHARDS[shard]
    k1, k2 = keys(case_seed("tma", case, shard, transpose), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), rand_rhs(k2, g_local, transpose), group_sizes(case, G, M, seed=3)
    out = gmm_tma.gmm(lhs, rhs, sizes, offset_array(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    ref = reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose)
    assert_close(out, ref, TOL[jnp.float32], f"tma gmm {case} {shard}")


@pytest.mark.parametrize("shard", ["all", pytest.param("middle", marks=pytest.mark.slow), "last"])
@pytest.mark.parametrize("case", GROUP_CASES)
def test_tma_tgmm_parity(case, shard):
    """TGMM with TMA operands: full chunks unmasked, the tail chunk zeroed past the group's end in registers."""
    off, g_local = SHARDS[shard]
    k1, k2 = keys(case_seed("tma-tgmm", case, shard), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), randn(k2, (M, N)), group_sizes(case, G, M, seed=4)
    out = gmm_tma.tgmm(lhs, rhs, sizes, offset_array(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    ref = reference.tgmm(lhs, rhs, sizes, group_offset=off, num_groups=g_local)
    assert_close(out, ref, TOL[jnp.float32], f"tma tgmm {case} {shard}")


EPILOGUES = {"tma_split": gmm_tma.Epilogue(True, True), "tma_whole": gmm_tma.Epilogue(True, False),
             "pointer": gmm_tma.Epilogue(False, False)}


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("case", ["uneven", "one_hot_group", "sum_below_m"])
def test_tma_gmm_epilogues(case, epilogue):
    """Each store path on its own: whole tiles through the output descriptor (in halves or not) and partial tiles by
    the masked store, or every tile by the masked store; the last shard (zero-fill rows before and after)."""
    off, g_local = SHARDS["last"]
    k1, k2 = keys(case_seed("tma-epilogue", case, epilogue), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), rand_rhs(k2, g_local, False), group_sizes(case, G, M, seed=5)
    out = gmm_tma.gmm(lhs, rhs, sizes, offset_array(off), transpose_rhs=False, out_dtype=jnp.float32, config=CFG,
                      ep=EPILOGUES[epilogue])
    assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=off), TOL[jnp.float32], f"{case} {epilogue}")


def test_tma_gmm_unaligned_output_rows():
    """``transpose_rhs`` with N whose output rows are not 16-byte aligned (N=54 f32: 216 B): the rhs descriptor only
    needs K aligned, the output takes the masked store and no output descriptor is built (its stride is illegal)."""
    k1, k2 = keys(case_seed("tma-unaligned"), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), rand_rhs(k2, G, True, n=54), group_sizes("uneven", G, M, seed=6)
    assert not gmm_tma.epilogue("cpu", CFG, 54, jnp.float32).tma_store
    out = gmm_tma.gmm(lhs, rhs, sizes, offset_array(None), transpose_rhs=True, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.gmm(lhs, rhs, sizes, transpose_rhs=True), TOL[jnp.float32], "unaligned N")


def test_order_tiles_partitions_whole_partial_zero_idle():
    """Whole local tiles (full BM rows, or ending at M) first, then partial local ones, then ZERO_FILL, then IDLE,
    each in table order."""
    sizes = jnp.array([20, 0, 16, 30], jnp.int32)          # M = 70: groups of 20, 16, 30 rows, 4 rows beyond the sum
    tiles = schedule.gmm_row_tiles(sizes, offset_array(0), 70, 4, 16)
    ordered, (whole, local, active) = gmm_tma.order_tiles(tiles, 70, 16)
    group, start, end = (list(map(int, row)) for row in ordered)
    assert (int(whole), int(local), int(active)) == (3, 5, 6)
    assert list(zip(start, end))[:6] == [(0, 16), (20, 36), (36, 52),   # whole
                                         (16, 20), (52, 66),            # a group's last, partial tile
                                         (66, 70)]                      # beyond the sum: zeros
    assert group[:6] == [0, 2, 3, 0, 3, schedule.ZERO_FILL]
    assert all(g == schedule.IDLE for g in group[6:])


@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shared_rhs", [False, True], ids=["batched_rhs", "shared_rhs"])
def test_tma_gmm_vmap_matches_per_example(shared_rhs, transpose):
    """``jax.vmap`` folds the batch into one persistent launch (rows ``[B*M, K]``, rhs ``[B*G, K, N]`` or shared):
    equal to the per-example calls, with per-batch group sizes (one with every row in one group, one all empty)."""
    b, (off, g_local) = 3, SHARDS["last"]
    k1, k2 = keys(case_seed("tma-vmap", shared_rhs, transpose), 2)
    lhs = randn(k1, (b, M, K))
    rhs = rand_rhs(k2, g_local, transpose) if shared_rhs else jnp.stack([rand_rhs(k, g_local, transpose)
                                                                         for k in keys(7, b)])
    sizes = jnp.stack([group_sizes("uneven", G, M, seed=1), group_sizes("one_hot_group", G, M),
                       group_sizes("all_empty", G, M)])

    def one(a, w, s):
        return gmm_tma.gmm(a, w, s, offset_array(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    out = jax.vmap(one, in_axes=(0, None if shared_rhs else 0, 0))(lhs, rhs, sizes)
    jaxpr = str(jax.make_jaxpr(jax.vmap(one, in_axes=(0, None if shared_rhs else 0, 0)))(lhs, rhs, sizes))
    assert jaxpr.count("moe_triton_scratch_call") == 1 and f"f32[{b * M},{N}]" in jaxpr  # one folded launch
    for i in range(b):
        w = rhs if shared_rhs else rhs[i]
        assert jnp.array_equal(out[i], one(lhs[i], w, sizes[i])), i
        assert_close(out[i], reference.gmm(lhs[i], w, sizes[i], group_offset=off, transpose_rhs=transpose),
                     TOL[jnp.float32], f"vmap example {i}")


def test_tma_tgmm_vmap_matches_per_example():
    b, (off, g_local) = 2, SHARDS["first"]
    k1, k2 = keys(case_seed("tma-tgmm-vmap"), 2)
    lhs, rhs = randn(k1, (b, M, K)), randn(k2, (b, M, N))
    sizes = jnp.stack([group_sizes("uneven", G, M, seed=2), group_sizes("sum_below_m", G, M, seed=3)])

    def one(a, c, s):
        return gmm_tma.tgmm(a, c, s, offset_array(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    out = jax.vmap(one)(lhs, rhs, sizes)
    for i in range(b):
        assert jnp.array_equal(out[i], one(lhs[i], rhs[i], sizes[i])), i
        assert_close(out[i], reference.tgmm(lhs[i], rhs[i], sizes[i], group_offset=off, num_groups=g_local),
                     TOL[jnp.float32], f"vmap tgmm example {i}")


def test_public_op_vmap_with_the_variant(monkeypatch):
    """``MOE_OPS_GMM_VARIANT=tma``: ``vmap`` of bf16 ``moe_ops.gmm`` and its gradients runs the descriptor kernels
    (no fallback) and matches the reference per example."""
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "tma")
    b = 2
    k1, k2, k3 = keys(47, 3)
    lhs, rhs = randn(k1, (b, M, 48), jnp.bfloat16), randn(k2, (3, 48, 64), jnp.bfloat16)
    sizes = jnp.stack([group_sizes("empty_groups", G, M), group_sizes("uneven", G, M, seed=9)])
    cot = randn(k3, (b, M, 64))

    def loss(fn):
        return lambda a, w, s, c: jnp.sum(fn(a, w, s).astype(jnp.float32) * c)
    ours = lambda a, w, s: moe_ops.gmm(a, w, s, group_offset=1, implementation="triton")
    want = lambda a, w, s: reference.gmm(a, w, s, group_offset=1)
    launched = []

    def recording(launch):
        return lambda *a, kernel, **kw: launched.append((kernel.__name__, a[0].shape)) or launch(*a, kernel=kernel,
                                                                                                 **kw)
    monkeypatch.setattr(gmm_tma, "triton_call_with_scratch", recording(gmm_tma.triton_call_with_scratch))
    monkeypatch.setattr(tg, "triton_call", recording(tg.triton_call))
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss(ours), argnums=(0, 1)), in_axes=(0, None, 0, 0)))
    got = batched(lhs, rhs, sizes, cot)
    # custom_vmap also traces the per-example call (for its output types); the launches are the folded ones.
    assert {name for name, _ in launched} == {"_gmm_tma_kernel", "_tgmm_tma_kernel"}, launched  # no pointer kernel
    assert {("_gmm_tma_kernel", (b * M, 48)), ("_gmm_tma_kernel", (b * M, 64)),
            ("_tgmm_tma_kernel", (b * M, 48))} <= set(launched), launched
    for i in range(b):
        ref = jax.value_and_grad(loss(want), argnums=(0, 1))(lhs[i], rhs, sizes[i], cot[i])
        for name, g, r in zip(("loss", "dlhs", "drhs"), jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert_close(g[i], r, TOL[jnp.bfloat16], f"{name} example {i}")


@given(data=st.data())
def test_tma_gmm_random_group_sizes(data):
    m, k, n, g = 48, 24, 40, 4
    sizes = data.draw(group_sizes_strategy(g, m))
    g_local = data.draw(st.integers(1, g))
    off = data.draw(st.integers(0, g - g_local))
    transpose = data.draw(st.booleans())
    k1, k2 = keys(data.draw(st.integers(0, 10**6)), 2)
    lhs, rhs = randn(k1, (m, k)), rand_rhs(k2, g_local, transpose, k=k, n=n)
    out = gmm_tma.gmm(lhs, rhs, sizes, offset_array(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose), 1e-5, "tma gmm")
    rhs2 = randn(k1, (m, n))
    out = gmm_tma.tgmm(lhs, rhs2, sizes, offset_array(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.tgmm(lhs, rhs2, sizes, group_offset=off, num_groups=g_local), 1e-5, "tma tgmm")


@pytest.mark.parametrize("transpose", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["kn", "nk"])
def test_public_op_uses_the_variant_with_gradients(monkeypatch, transpose):
    """``MOE_OPS_GMM_VARIANT=tma``: bf16 ``moe_ops.gmm`` and its gradients (dlhs is a transposed GMM, drhs a TGMM:
    both through the TMA kernels too)."""
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "tma")
    k1, k2, k3 = keys(41 + transpose, 3)
    lhs, rhs = randn(k1, (M, 48), jnp.bfloat16), rand_rhs(k2, 3, transpose, jnp.bfloat16, k=48, n=64)
    sizes, cot = group_sizes("empty_groups", G, M), randn(k3, (M, 64))
    kw = dict(group_offset=1, transpose_rhs=transpose)

    def loss(fn):
        return lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * cot)
    ours = jax.jit(jax.value_and_grad(loss(lambda a, b: moe_ops.gmm(a, b, sizes, implementation="triton", **kw)),
                                      argnums=(0, 1)))(lhs, rhs)
    want = jax.value_and_grad(loss(lambda a, b: reference.gmm(a, b, sizes, **kw)), argnums=(0, 1))(lhs, rhs)
    for name, got, ref in zip(("loss", "dlhs", "drhs"), jax.tree.leaves(ours), jax.tree.leaves(want)):
        assert_close(got, ref, TOL[jnp.bfloat16], name)


def test_variant_choice(monkeypatch):
    monkeypatch.delenv("MOE_OPS_GMM_VARIANT", raising=False)
    assert gmm_tma.variant() == "pointer"  # the default until a GPU run shows the TMA kernel faster
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "cutlass")
    with pytest.raises(ValueError, match="MOE_OPS_GMM_VARIANT must be one of"):
        gmm_tma.variant()
    with gmm_tma.use_variant("persistent"):
        assert gmm_tma.variant() == "persistent"
    bf16, f32 = jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((8, 64), jnp.float32)
    assert gmm_tma.eligible(bf16, jnp.zeros((2, 64, 128), jnp.bfloat16))
    assert not gmm_tma.eligible(f32, jnp.zeros((2, 64, 128), jnp.float32))      # f32: pointer kernel
    assert not gmm_tma.eligible(bf16[:, :60], jnp.zeros((2, 60, 128), jnp.bfloat16))  # 120-byte rows
    assert not gmm_tma.eligible(bf16[:0], jnp.zeros((2, 64, 128), jnp.bfloat16))       # no rows
    assert not gmm_tma.eligible(bf16[:, :0], jnp.zeros((2, 0, 128), jnp.bfloat16))    # K = 0: the K loop must run


def test_use_variant_is_in_the_jit_cache_key(monkeypatch):
    """A function jit traced under one variant is traced again under another (the benchmark times every variant
    through one jitted step), and not again under the same one; both variants give the reference's output."""
    monkeypatch.delenv("MOE_OPS_GMM_VARIANT", raising=False)
    lhs, rhs = randn(keys(47, 1)[0], (M, 48), jnp.bfloat16), rand_rhs(keys(48, 1)[0], 3, False, jnp.bfloat16, k=48,
                                                                      n=64)
    sizes, traces = group_sizes("uneven", G, M), []

    @jax.jit
    def step(a, b):
        traces.append(gmm_tma.variant())
        return moe_ops.gmm(a, b, sizes, group_offset=1, implementation="triton")
    want = reference.gmm(lhs, rhs, sizes, group_offset=1)
    for forced in (None, "tma", "tma", None):
        with gmm_tma.use_variant(forced) if forced else contextlib.nullcontext():
            assert_close(step(lhs, rhs), want, TOL[jnp.bfloat16], str(forced))
    assert traces == ["pointer", "tma"], traces


def test_symbolic_rows_take_the_pointer_kernel(monkeypatch):
    """Failed before the fix: with a symbolic M (``jax.export``) ``eligible``'s ``min(shape)`` compared ``m`` with K
    and raised InconclusiveDimensionOperation, hiding the CPU bridge's clear export error. The descriptor kernel
    needs a static M (a constexpr, and a table without a static bound), so symbolic shapes are not eligible: the
    pointer kernel runs (it launches at M's bound), and on CPU its clear error is what the export reports."""
    m = jax.export.symbolic_shape("m", constraints=("m <= 256",))[0]
    specs = [jax.ShapeDtypeStruct((m, 64), jnp.bfloat16), jax.ShapeDtypeStruct((4, 64, 128), jnp.bfloat16),
             jax.ShapeDtypeStruct((4,), jnp.int32)]
    assert not gmm_tma.eligible(*specs[:2]) and not gmm_tma.eligible(specs[0], jax.ShapeDtypeStruct((m, 128),
                                                                                                    jnp.bfloat16))
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "tma")
    with pytest.raises(NotImplementedError, match="cannot export Triton kernel 'moe_gmm' for symbolic shapes"):
        jax.export.export(jax.jit(lambda a, b, s: moe_ops.gmm(a, b, s, implementation="triton")),
                          platforms=["cpu"])(*specs)


@needs_plugin
@pytest.mark.parametrize("arch", ["sm90", "gfx950"])
def test_scratch_operand_in_the_real_lowering(monkeypatch, arch):
    """The launch carries one array parameter more than the kernel's operands + output: the uint8 scratch output of
    ``programs x SCRATCH_PER_PROGRAM`` bytes that lands in the kernel's hidden global-scratch slot."""
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "tma")
    m, k, n, g = 4096, 1024, 2048, 8
    args = (jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((g, k, n), jnp.bfloat16), jnp.full((g,), m // g, jnp.int32))
    with lowering.pinned_targets(rocm_arch=arch):
        text = jax.jit(lambda a, b, s: moe_ops.gmm(a, b, s)).trace(*args).lower(
            lowering_platforms=(lowering.PLATFORM_OF[arch],)).as_text()
        grad_text = jax.jit(jax.grad(lambda a, b, s: moe_ops.gmm(a, b, s).astype(jnp.float32).sum(),
                                     argnums=(0, 1))).trace(*args).lower(
            lowering_platforms=(lowering.PLATFORM_OF[arch],)).as_text()
    assert sorted(c.kernel for c in lowering.kernel_calls(grad_text)) == ["_gmm_tma_kernel", "_tgmm_tma_kernel"]
    assert all(c.num_parameters == c.num_operands + 2 for c in lowering.kernel_calls(grad_text))
    (launch,) = lowering.kernel_calls(text)
    cfg = tuning.pick_config("gmm", m, k, n, g, jnp.bfloat16, arch=arch)
    programs = min(tuning.NUM_SMS[arch], schedule.max_row_tiles(m, cfg.block_m, g) * (n // cfg.block_n))
    assert launch.kernel == "_gmm_tma_kernel" and launch.grid == (programs, 1, 1)
    assert launch.num_parameters == launch.num_operands + 2  # + output + scratch
    assert f"tensor<{programs * gmm_tma.SCRATCH_PER_PROGRAM}xui8>" in text
    assert not launch.problems(arch, num_warps=cfg.num_warps)


@needs_plugin
def test_vmap_lowers_to_one_folded_launch(monkeypatch):
    """Under ``jax.vmap`` the real CUDA lowering has one ``_gmm_tma_kernel`` launch over ``B*M`` rows, with its
    scratch operand (no per-example loop, no pointer fallback)."""
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "tma")
    b, m, k, n, g = 2, 2048, 1024, 2048, 8
    args = (jnp.zeros((b, m, k), jnp.bfloat16), jnp.zeros((g, k, n), jnp.bfloat16), jnp.full((b, g), m // g, jnp.int32))
    with lowering.pinned_targets():
        text = jax.jit(jax.vmap(lambda a, w, s: moe_ops.gmm(a, w, s), in_axes=(0, None, 0))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    (launch,) = lowering.kernel_calls(text)
    cfg = tuning.pick_config("gmm", m, k, n, g, jnp.bfloat16, arch="sm90")
    folded_tiles = b * schedule.max_row_tiles(m, cfg.block_m, g) * (n // cfg.block_n)
    programs = min(tuning.NUM_SMS["sm90"], folded_tiles)
    assert launch.kernel == "_gmm_tma_kernel" and launch.grid == (programs, 1, 1)
    assert launch.num_parameters == launch.num_operands + 2
    assert f"tensor<{programs * gmm_tma.SCRATCH_PER_PROGRAM}xui8>" in text and f"tensor<{b * m}x{n}xbf16>" in text


def test_large_config_gets_four_stages_beside_the_split_epilogue():
    """The sm90 large config gets 4 stages next to the split epilogue's staging buffer. (The family's compiled facts,
    TMA instructions in the SASS, scratch and shared memory within bounds, no spills, are checked on the reports of
    tests/test_aot.py's sweep, which compiles it with every other family.)"""
    large = tuning.TABLES["sm90"]["gmm"]["large"]
    cfg, ep = gmm_tma.gmm_setup("sm90", large, 14336, jnp.bfloat16, jnp.bfloat16)
    assert ep == gmm_tma.Epilogue(True, True) and cfg.num_stages == 4 > large.num_stages  # deeper where it fits


@pytest.mark.parametrize("target", ["gfx950", "gfx942"])
def test_amd_persistent_builds_fill_the_cus(target):
    """The persistent variant on AMD registers one program per CU (256 on gfx950, 304 on gfx942) at the AOT shape and
    the masked store (no TMA); tests/test_aot.py's sweep compiles these cases with no spills within the LDS limit."""
    cases = cases_for(target, ["gmm_tma"])
    assert {c.constexprs["NUM_PROGRAMS"] for c in cases if "NUM_PROGRAMS" in c.constexprs} == {
        tuning.NUM_SMS[target]}
    assert all(not c.constexprs.get("TMA_STORE", False) for c in cases)  # no TMA on AMD: the masked store
