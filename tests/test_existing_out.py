"""``moe_ops.gmm(..., existing_out=)`` (megablox semantics) and ``precision=`` on every backend.

Local-group rows are overwritten, all other rows (non-local groups, rows at or beyond ``sum(group_sizes)``) keep
``existing_out``; ``d existing_out`` is ``dout`` on the kept rows and zero on the overwritten ones. Checked against
``reference.gmm(existing_out=)`` and against an explicit row mask built in numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference
from tests.helpers import TOL, assert_close, group_sizes, keys, randn

M, K, N, G = 37, 24, 20, 5
IMPLS = ["xla", "triton", "pallas"]
# (group_offset, G_local)
SHARDS = {"all": (None, G), "middle": (1, 3), "last": (4, 1)}


def _kept_rows(sizes, off, g_local):
    """numpy: True for rows outside the local groups (an independent formulation of the mask)."""
    ends = np.cumsum(np.asarray(sizes))
    starts = ends - np.asarray(sizes)
    off = 0 if off is None else off
    kept = np.ones(M, bool)
    for g in range(off, off + g_local):
        kept[starts[g]:ends[g]] = False
    return kept


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("case", ["uneven", "sum_below_m", "empty_groups"])
def test_existing_out_forward(impl, shard, case):
    off, g_local = SHARDS[shard]
    k1, k2, k3 = keys(11, 3)
    lhs, rhs, ex = randn(k1, (M, K)), randn(k2, (g_local, K, N)), randn(k3, (M, N))
    sizes = group_sizes(case, G, M, seed=5)
    out = moe_ops.gmm(lhs, rhs, sizes, group_offset=off, existing_out=ex, implementation=impl)
    assert_close(out, reference.gmm(lhs, rhs, sizes, group_offset=off, existing_out=ex), TOL[jnp.float32], impl)
    kept = _kept_rows(sizes, off, g_local)
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(ex)[kept])
    plain = moe_ops.gmm(lhs, rhs, sizes, group_offset=off, implementation=impl)
    np.testing.assert_array_equal(np.asarray(out)[~kept], np.asarray(plain)[~kept])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
def test_existing_out_gradients(impl, transpose):
    off, g_local = SHARDS["middle"]
    k1, k2, k3, k4 = keys(12, 4)
    lhs, ex, cot = randn(k1, (M, K)), randn(k3, (M, N)), randn(k4, (M, N))
    rhs = randn(k2, (g_local, N, K) if transpose else (g_local, K, N))
    sizes = group_sizes("sum_below_m", G, M, seed=2)

    def loss(fn, **kw):
        return lambda a, b, e: jnp.sum(cot * fn(a, b, sizes, group_offset=off, transpose_rhs=transpose,
                                                existing_out=e, **kw))

    ours = jax.jit(jax.grad(loss(moe_ops.gmm, implementation=impl), argnums=(0, 1, 2)))(lhs, rhs, ex)
    want = jax.grad(loss(reference.gmm), argnums=(0, 1, 2))(lhs, rhs, ex)
    for name, a, b in zip(["lhs", "rhs", "existing_out"], ours, want):
        assert_close(a, b, TOL[jnp.float32], f"{impl} d{name}")
    kept = _kept_rows(sizes, off, g_local)
    np.testing.assert_array_equal(np.asarray(ours[2]), np.where(kept[:, None], np.asarray(cot), 0))


@pytest.mark.parametrize("impl", IMPLS)
def test_existing_out_bf16_in_f32_out(impl):
    k1, k2, k3 = keys(13, 3)
    lhs, rhs, ex = randn(k1, (M, K), jnp.bfloat16), randn(k2, (G, K, N), jnp.bfloat16), randn(k3, (M, N))
    sizes = group_sizes("sum_below_m", G, M, seed=1)
    out = moe_ops.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, existing_out=ex, implementation=impl)
    assert out.dtype == jnp.float32
    ref = reference.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, existing_out=ex)
    assert_close(out, ref, TOL[jnp.bfloat16], impl)


def test_existing_out_errors_name_the_argument():
    lhs, rhs, sizes = jnp.ones((M, K)), jnp.ones((G, K, N)), jnp.full((G,), 2, jnp.int32)
    with pytest.raises(ValueError, match=r"existing_out must be the output's shape \(37, 20\) and dtype float32"):
        moe_ops.gmm(lhs, rhs, sizes, existing_out=jnp.ones((M, N + 1)))
    with pytest.raises(ValueError, match="existing_out.*bfloat16"):
        moe_ops.gmm(lhs, rhs, sizes, preferred_element_type=jnp.bfloat16, existing_out=jnp.ones((M, N)))
    with pytest.raises(TypeError, match="existing_out must be None or an array"):
        moe_ops.gmm(lhs, rhs, sizes, existing_out=[[0.0]])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("precision", [None, "highest", jax.lax.Precision.HIGH, (jax.lax.Precision.DEFAULT,) * 2])
def test_precision_levels_run(impl, precision):
    k1, k2 = keys(14, 2)
    lhs, rhs, sizes = randn(k1, (M, K)), randn(k2, (G, K, N)), group_sizes("uneven", G, M)
    out = moe_ops.gmm(lhs, rhs, sizes, precision=precision, implementation=impl)
    assert_close(out, reference.gmm(lhs, rhs, sizes), TOL[jnp.float32], f"{impl} {precision}")
    drhs = moe_ops.tgmm(lhs, out, sizes, precision=precision, implementation=impl)
    assert_close(drhs, reference.tgmm(lhs, out, sizes), TOL[jnp.float32], f"{impl} tgmm {precision}")


@pytest.mark.parametrize("impl", ["triton", "pallas"])
def test_precision_algorithms_the_kernels_meet_run(impl):
    """Failed before the fix: every dot algorithm raised on the kernels, also ``BF16_BF16_F32`` on bf16 operands
    (what they compute: tokamax's own ragged-dot suite passes it). Now the f32 / tf32 / 16-bit ones run, with their
    gradients; f64 and f8 ones, which no kernel meets, raise by name."""
    presets = jax.lax.DotAlgorithmPreset
    k1, k2 = keys(15, 2)
    sizes = group_sizes("uneven", G, M)
    for dtype, precision in [(jnp.bfloat16, presets.BF16_BF16_F32), (jnp.float32, presets.F32_F32_F32),
                             (jnp.float32, presets.BF16_BF16_F32_X3),
                             (jnp.bfloat16, jax.lax.DotAlgorithm(jnp.bfloat16, jnp.bfloat16, jnp.float32))]:
        lhs, rhs = randn(k1, (M, K), dtype), randn(k2, (G, K, N), dtype)
        call = lambda a, b: moe_ops.gmm(a, b, sizes, precision=precision, preferred_element_type=jnp.float32,
                                        implementation=impl)
        want = lambda a, b: reference.gmm(a, b, sizes, preferred_element_type=jnp.float32)
        assert_close(call(lhs, rhs), want(lhs, rhs), TOL[jnp.float32], f"{impl} {precision}")
        got_grads = jax.grad(lambda a, b: call(a, b).sum(), (0, 1))(lhs, rhs)
        want_grads = jax.grad(lambda a, b: want(a, b).sum(), (0, 1))(lhs, rhs)
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, TOL[dtype], f"{impl} {precision} grad")
    lhs, rhs = jnp.ones((M, K)), jnp.ones((G, K, N))
    for precision in (presets.F64_F64_F64, presets.ANY_F8_ANY_F8_F32):
        with pytest.raises(ValueError, match=f"precision=.*implementation='{impl}'.*f64 / f8"):
            moe_ops.gmm(lhs, rhs, sizes, precision=precision, implementation=impl)
    with pytest.raises(ValueError, match="precision"):
        moe_ops.gmm(lhs, rhs, sizes, precision="not-a-precision", implementation=impl)


def test_pallas_highest_lowers_to_mosaic_fp32():
    """HIGHEST reaches the Pallas kernel's dot, and Mosaic accepts it (TPU lowering from this CPU host)."""
    from kernels.pallas import gmm as pg
    lhs, rhs, sizes = jnp.ones((256, 128)), jnp.ones((2, 128, 128)), jnp.array([100, 100], jnp.int32)
    f = lambda p: lambda a, b, s: pg.gmm(a, b, s, jnp.zeros((1,), jnp.int32), transpose_rhs=False,
                                        out_dtype=jnp.float32, interpret=False, precision=p)
    jax.export.export(jax.jit(f(jax.lax.Precision.HIGHEST)), platforms=["tpu"])(lhs, rhs, sizes)
    with jax.default_matmul_precision("default"):  # conftest makes "highest" the default; undo it here
        text = lambda p: str(jax.make_jaxpr(f(p))(lhs, rhs, sizes))
        assert "precision=(Precision.HIGHEST" in text(jax.lax.Precision.HIGHEST)
        assert "precision=(Precision.HIGHEST" not in text(None)
