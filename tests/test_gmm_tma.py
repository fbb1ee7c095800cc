"""The persistent TMA GMM variant (``kernels.triton.gmm_tma``, ``MOE_OPS_GMM_VARIANT=tma``) and its global scratch
(``kernels.triton.scratch``): interpreter parity against ``moe_ops.reference`` (tensor descriptors run in the Triton
interpreter), gradients through the public op, the scratch operand in jax-triton's real CUDA / ROCm lowering, and
TMA instructions in the sm_90 SASS.
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

import moe_ops
from kernels import aot, lowering
from kernels.registry import cases_for
from kernels.triton import gmm_tma, schedule, tuning
from moe_ops import reference
from tests.helpers import GROUP_CASES, TOL, assert_close, group_sizes, group_sizes_strategy, keys, randn
from tests.test_triton_gmm import CFG, SHARDS, G, K, M, N, _offset, _rhs, _seed

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
    k1, k2 = keys(_seed("tma", case, shard, transpose), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), _rhs(k2, g_local, transpose), group_sizes(case, G, M, seed=3)
    out = gmm_tma.gmm(lhs, rhs, sizes, _offset(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    ref = reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose)
    assert_close(out, ref, TOL[jnp.float32], f"tma gmm {case} {shard}")


@pytest.mark.parametrize("shard", ["all", pytest.param("middle", marks=pytest.mark.slow), "last"])
@pytest.mark.parametrize("case", GROUP_CASES)
def test_tma_tgmm_parity(case, shard):
    """TGMM with TMA operands: full chunks unmasked, the tail chunk zeroed past the group's end in registers."""
    off, g_local = SHARDS[shard]
    k1, k2 = keys(_seed("tma-tgmm", case, shard), 2)
    lhs, rhs, sizes = randn(k1, (M, K)), randn(k2, (M, N)), group_sizes(case, G, M, seed=4)
    out = gmm_tma.tgmm(lhs, rhs, sizes, _offset(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    ref = reference.tgmm(lhs, rhs, sizes, group_offset=off, num_groups=g_local)
    assert_close(out, ref, TOL[jnp.float32], f"tma tgmm {case} {shard}")


@given(data=st.data())
def test_tma_gmm_random_group_sizes(data):
    m, k, n, g = 48, 24, 40, 4
    sizes = data.draw(group_sizes_strategy(g, m))
    g_local = data.draw(st.integers(1, g))
    off = data.draw(st.integers(0, g - g_local))
    transpose = data.draw(st.booleans())
    k1, k2 = keys(data.draw(st.integers(0, 10**6)), 2)
    lhs, rhs = randn(k1, (m, k)), _rhs(k2, g_local, transpose, k=k, n=n)
    out = gmm_tma.gmm(lhs, rhs, sizes, _offset(off), transpose_rhs=transpose, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose), 1e-5, "tma gmm")
    rhs2 = randn(k1, (m, n))
    out = gmm_tma.tgmm(lhs, rhs2, sizes, _offset(off), num_groups=g_local, out_dtype=jnp.float32, config=CFG)
    assert_close(out, reference.tgmm(lhs, rhs2, sizes, group_offset=off, num_groups=g_local), 1e-5, "tma tgmm")


@pytest.mark.parametrize("transpose", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["kn", "nk"])
def test_public_op_uses_the_variant_with_gradients(monkeypatch, transpose):
    """``MOE_OPS_GMM_VARIANT=tma``: bf16 ``moe_ops.gmm`` and its gradients (dlhs is a transposed GMM, drhs a TGMM:
    both through the TMA kernels too)."""
    monkeypatch.setenv("MOE_OPS_GMM_VARIANT", "tma")
    k1, k2, k3 = keys(41 + transpose, 3)
    lhs, rhs = randn(k1, (M, 48), jnp.bfloat16), _rhs(k2, 3, transpose, jnp.bfloat16, k=48, n=64)
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


@pytest.mark.slow
def test_sm90_sass_has_tma_and_scratch_fits():
    reports = [aot.compile_case(c, "sm90") for c in cases_for("sm90", ["gmm_tma"])]
    assert reports and all(r.clean for r in reports), [r for r in reports if not r.clean]
    assert all(r.tma > 0 for r in reports), [(r.config, r.tma) for r in reports]
    assert all(0 < r.scratch_bytes <= gmm_tma.SCRATCH_PER_PROGRAM for r in reports)
    assert all(r.shared_bytes <= lowering.SHARED_LIMIT["sm90"] for r in reports)
    large = tuning.TABLES["sm90"]["gmm"]["large"]
    assert gmm_tma.tma_config(large, 2, "sm90").num_stages == 4 > large.num_stages  # deeper where it fits
