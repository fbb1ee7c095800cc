"""What users of megablox, ``jax.lax.ragged_dot`` and tokamax would run against this package's adapters, compared
with the real functions: megablox's Pallas ``gmm`` / ``tgmm`` (interpret mode on CPU), ``jax.lax.ragged_dot`` (its
XLA:CPU lowering) and ``tokamax.ragged_dot``. Fresh random data; f32 tight, bf16 / f16 loose.

Megablox in interpret mode leaves the rows at or past ``sum(group_sizes)`` uninitialised (NaN) unless
``existing_out`` is given, so those comparisons cover the rows before the sum; the zero rows past it are checked
against the documented semantics separately.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops.integrations import maxtext
from tests.helpers import TOL, assert_close, keys, randn

mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")   # the kernels (the package's
mb_ops = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.ops")  # ``gmm`` name is ops.gmm)

IMPLS = ["xla", "triton"]
M, K, N, G = 32, 16, 24, 4
SIZES = jnp.array([7, 0, 11, 6], jnp.int32)          # an empty group, sum 24 < M
VALID = int(SIZES.sum())
TILE = (8, 16, 24)


def _data(seed, dtype=jnp.float32):
    k1, k2, k3, k4 = keys(seed, 4)
    return (randn(k1, (M, K), dtype), randn(k2, (G, K, N), dtype), randn(k3, (M, N)), randn(k4, (G, K, N)))


# ---------------------------------------------------------------------------------------------------------------
# megablox.gmm / tgmm through moe_ops.integrations.maxtext


@pytest.fixture(scope="module")
def megablox_cases():
    """Each case: (our call, megablox's result, rows to compare), megablox run once per module."""
    lhs, rhs, ex, _ = _data(1)
    off = jnp.array(1, jnp.int32)                      # megablox wants a ()-shaped offset
    bf = lhs.astype(jnp.bfloat16)
    cases = {
        "default_f32_out": (lambda i: maxtext.gmm(lhs, rhs, SIZES, implementation=i),
                            mb.gmm(lhs, rhs, SIZES, tiling=TILE, interpret=True), VALID),
        "tiling_callable_transpose_rhs": (
            lambda i: maxtext.gmm(lhs, jnp.swapaxes(rhs, 1, 2), SIZES, jnp.float32, lambda m, k, n: (8, k, n),
                                  transpose_rhs=True, implementation=i),
            mb.gmm(lhs, jnp.swapaxes(rhs, 1, 2), SIZES, tiling=lambda m, k, n: (8, k, n), transpose_rhs=True,
                   interpret=True), VALID),
        "group_offset_local_shard": (lambda i: maxtext.gmm(lhs, rhs[:2], SIZES, group_offset=off, implementation=i),
                                     mb.gmm(lhs, rhs[:2], SIZES, tiling=TILE, group_offset=off, interpret=True), M),
        "existing_out_with_offset": (
            lambda i: maxtext.gmm(lhs, rhs[:2], SIZES, group_offset=off, existing_out=ex, implementation=i),
            mb.gmm(lhs, rhs[:2], SIZES, tiling=TILE, group_offset=off, existing_out=ex, interpret=True), M),
        "mixed_bf16_lhs_f32_rhs": (lambda i: maxtext.gmm(bf, rhs, SIZES, implementation=i),
                                   mb.gmm(bf, rhs, SIZES, tiling=TILE, interpret=True), VALID),
        "bf16_out": (lambda i: maxtext.gmm(bf, rhs.astype(jnp.bfloat16), SIZES, jnp.bfloat16, implementation=i),
                     mb.gmm(bf, rhs.astype(jnp.bfloat16), SIZES, jnp.bfloat16, TILE, interpret=True), VALID),
    }
    return cases


@pytest.mark.slow   # the sweep takes about 9 s on 2 cores (megablox in interpret mode)
@pytest.mark.parametrize("case,impl", [(c, i) for c in ("default_f32_out", "existing_out_with_offset",
                                                        "mixed_bf16_lhs_f32_rhs") for i in IMPLS]
                         + [(c, "xla") for c in ("tiling_callable_transpose_rhs", "group_offset_local_shard",
                                                 "bf16_out")])
def test_megablox_gmm(megablox_cases, impl, case):
    """mixed_bf16_lhs_f32_rhs failed before the fix: gmm rounded the f32 rhs to bf16 (megablox multiplies in f32)."""
    ours, theirs, rows = megablox_cases[case]
    out = ours(impl)
    assert out.dtype == theirs.dtype
    tol = TOL[jnp.bfloat16] if out.dtype == jnp.bfloat16 else 1e-6
    assert_close(out[:rows], theirs[:rows], tol, case)
    if rows < M:                                         # documented: rows past the sum are zero
        assert not np.asarray(out[rows:]).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_megablox_tgmm(impl):
    """megablox.tgmm's layout (lhs [k, m]), num_actual_groups with group_offset, and existing_out accumulation."""
    lhs, _, dout, acc = _data(2)
    off = jnp.array(1, jnp.int32)
    plain = maxtext.tgmm(lhs.T, dout, SIZES, implementation=impl)
    assert_close(plain, mb.tgmm(lhs.T, dout, SIZES, tiling=TILE, interpret=True), 1e-6, "tgmm")
    local = maxtext.tgmm(lhs.T, dout, SIZES, jnp.float32, TILE, off, 2, acc[:2], implementation=impl)
    expected = mb.tgmm(lhs.T, dout, SIZES, tiling=TILE, group_offset=off, num_actual_groups=2,
                       existing_out=acc[:2], interpret=True)
    assert local.shape == (2, K, N)
    assert_close(local, expected, 1e-6, "tgmm local shard + existing_out")
    with pytest.raises(ValueError, match=r"existing_out must be the output's shape \(2, 16, 24\)"):
        maxtext.tgmm(lhs.T, dout, SIZES, group_offset=off, num_actual_groups=2, existing_out=acc)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_megablox_gmm_gradients(impl):
    """Gradients of the megablox-signature gmm against megablox's own custom VJP (interpret mode), rows < sum."""
    lhs, rhs, _, _ = _data(3)
    mask = (jnp.arange(M) < VALID)[:, None]             # megablox leaves rows past the sum undefined
    loss = lambda f: (lambda a, b: jnp.sum(jnp.where(mask, jnp.sin(f(a, b)), 0.0)))
    ours = jax.grad(loss(lambda a, b: maxtext.gmm(a, b, SIZES, implementation=impl)), (0, 1))(lhs, rhs)
    theirs = jax.grad(loss(lambda a, b: mb_ops.gmm(a, b, SIZES, jnp.float32, TILE, None, None, False, True)),
                      (0, 1))(lhs, rhs)
    assert_close(ours[0][:VALID], theirs[0][:VALID], 1e-5, "dlhs")
    assert_close(ours[1], theirs[1], 1e-5, "drhs")


# ---------------------------------------------------------------------------------------------------------------
# jax.lax.ragged_dot semantics through moe_ops.ragged_dot, against lax itself


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lhs_dtype,rhs_dtype,preferred", [
    (jnp.float32, jnp.float32, None), (jnp.bfloat16, jnp.bfloat16, None), (jnp.bfloat16, jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float16, None), (jnp.bfloat16, jnp.float32, None), (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.bfloat16, None)])
def test_ragged_dot_dtypes_match_lax(impl, lhs_dtype, rhs_dtype, preferred):
    lhs, rhs, _, _ = _data(4)
    lhs, rhs = lhs.astype(lhs_dtype), rhs.astype(rhs_dtype)
    ours = moe_ops.ragged_dot(lhs, rhs, SIZES, preferred_element_type=preferred, implementation=impl)
    theirs = jax.lax.ragged_dot(lhs, rhs, SIZES, preferred_element_type=preferred)
    assert ours.dtype == theirs.dtype
    narrow = jnp.float32 not in (jnp.dtype(lhs_dtype), jnp.dtype(rhs_dtype)) or ours.dtype != jnp.float32
    assert_close(ours, theirs, TOL[jnp.bfloat16] if narrow else 1e-6, str(ours.dtype))


@pytest.mark.parametrize("dtypes", [(jnp.int8, jnp.int32), (jnp.int32, None), (jnp.float8_e4m3fn, jnp.float32)],
                         ids=["int8_to_int32", "int32", "float8_to_f32"])
def test_ragged_dot_other_dtypes_run_lax(dtypes):
    """Integer and float8 operands (no kernel takes them) give lax's own result, exactly; with group_offset (a
    kernel-only feature) they are a named error."""
    in_dtype, preferred = dtypes
    lhs, rhs, _, _ = _data(9)
    lhs, rhs = (jnp.round(a * 3).astype(in_dtype) for a in (lhs, rhs))
    ours = moe_ops.ragged_dot(lhs, rhs, SIZES, preferred_element_type=preferred)
    theirs = jax.lax.ragged_dot(lhs, rhs, SIZES, preferred_element_type=preferred)
    assert ours.dtype == theirs.dtype and np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(ValueError, match="group_offset needs float32 / bfloat16 / float16 operands"):
        moe_ops.ragged_dot(lhs, rhs, SIZES, preferred_element_type=preferred, group_offset=jnp.array([1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [
    np.array([7, 0, 11, 6], np.int64), jnp.array([7, 0, 11, 6], jnp.uint32), jnp.array([3, 2, 0, 1], jnp.int16),
    jnp.array([0, 0, 32, 0], jnp.int32), jnp.array([20, 0, 30, 5], jnp.int32)],
    ids=["np_int64", "uint32", "int16_sum_below_m", "all_in_one", "sum_above_m"])
def test_ragged_dot_group_size_dtypes_match_lax(impl, sizes):
    lhs, rhs, _, _ = _data(5)
    expected = jax.lax.ragged_dot(lhs, rhs, jnp.asarray(sizes).astype(jnp.int32))
    assert_close(moe_ops.ragged_dot(lhs, rhs, sizes, implementation=impl), expected, 1e-6, str(sizes.dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_dot_wide_group_sizes_match_lax(impl):
    """Failed before the fix: ragged_dot cast sizes to int32 (and scaled them by the row fold) before clamping, so
    uint32 2**32 - 1 became -1 (no rows), int64 2**32 + 3 under x64 became 3 and a folded 2**30 x 3 wrapped; lax
    (and moe_ops.gmm) give those groups every remaining row."""
    lhs, rhs, _, _ = _data(10)
    for sizes in (jnp.array([2**32 - 1, 0, 0, 0], jnp.uint32), jnp.array([3, 2**31, 5, 0], jnp.uint32)):
        assert_close(moe_ops.ragged_dot(lhs, rhs, sizes, implementation=impl), jax.lax.ragged_dot(lhs, rhs, sizes),
                     1e-6, str(sizes))
    folded = lhs.reshape(8, 4, K)                         # ragged dim 0, free dim 1 folds into rows (x4)
    dims = jax.lax.RaggedDotDimensionNumbers((([2], [1]), ([], [])), [0], [0])
    sizes = jnp.array([2, 2**30, 0, 0], jnp.int32)
    assert_close(moe_ops.ragged_dot_general(folded, rhs, sizes, dims, implementation=impl),
                 jax.lax.ragged_dot_general(folded, rhs, sizes, dims), 1e-6, "folded")
    with jax.enable_x64(True):
        sizes = jnp.array([2**32 + 3, 0, 0, 0], jnp.int64)
        assert_close(moe_ops.ragged_dot(lhs, rhs, sizes, implementation=impl), jax.lax.ragged_dot(lhs, rhs, sizes),
                     1e-6, "int64")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("precision", [None, jax.lax.Precision.DEFAULT, "highest",
                                       (jax.lax.Precision.HIGH, jax.lax.Precision.HIGHEST)])
def test_ragged_dot_precision_values_match_lax(impl, precision):
    lhs, rhs, _, _ = _data(6)
    expected = jax.lax.ragged_dot(lhs, rhs, SIZES, precision=jax.lax.Precision.HIGHEST)
    assert_close(moe_ops.ragged_dot(lhs, rhs, SIZES, precision=precision, implementation=impl), expected, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtypes", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                    (jnp.bfloat16, jnp.float32)], ids=["f32", "bf16", "mixed"])
def test_ragged_dot_gradients_match_lax(impl, dtypes):
    lhs, rhs, _, _ = _data(7)
    lhs, rhs = lhs.astype(dtypes[0]), rhs.astype(dtypes[1])
    sizes = jnp.array([7, 0, 11, 30], jnp.int32)          # also past M: lax truncates the same way
    loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b, sizes, preferred_element_type=jnp.float32))))
    ours = jax.grad(loss(lambda *a, **kw: moe_ops.ragged_dot(*a, **kw, implementation=impl)), (0, 1))(lhs, rhs)
    theirs = jax.grad(loss(jax.lax.ragged_dot), (0, 1))(lhs, rhs)
    for name, a, b in zip(("dlhs", "drhs"), ours, theirs):
        assert a.dtype == b.dtype, name
        assert_close(a, b, TOL[jnp.bfloat16] if a.dtype == jnp.bfloat16 else 1e-5, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_dot_errors_are_lax_errors(impl):
    """Shape mistakes lax rejects are rejected here too, at trace time."""
    lhs, rhs, _, _ = _data(8)
    for sizes in (SIZES[:3], jnp.append(SIZES, 1), SIZES[None]):
        with pytest.raises(TypeError, match="group"):
            jax.lax.ragged_dot(lhs, rhs, sizes)
        with pytest.raises(TypeError, match="group"):
            moe_ops.ragged_dot(lhs, rhs, sizes, implementation=impl)
    with pytest.raises(TypeError, match="group_sizes must be an integer array"):
        moe_ops.ragged_dot(lhs, rhs, SIZES.astype(jnp.float32), implementation=impl)


# ---------------------------------------------------------------------------------------------------------------
# tokamax.ragged_dot with this package as its implementation


@pytest.mark.parametrize("impl", IMPLS)
def test_tokamax_calls_match_lax(impl):
    tokamax = pytest.importorskip("tokamax", reason="tokamax is an optional peer (the `tokamax` extra)")
    from moe_ops.integrations.tokamax import MoeOpsRaggedDot  # noqa: PLC0415
    lhs, rhs, _, _ = _data(9)
    ours = [MoeOpsRaggedDot(impl)]
    for preferred in (None, jnp.float32):
        got = tokamax.ragged_dot(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), SIZES,
                                 preferred_element_type=preferred, implementation=ours)
        want = jax.lax.ragged_dot(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), SIZES,
                                  preferred_element_type=preferred)
        assert got.dtype == want.dtype
        assert_close(got, want, TOL[jnp.bfloat16], f"tokamax preferred={preferred}")
    loss = lambda f: (lambda a, b: jnp.sum(jnp.sin(f(a, b))))
    grads = jax.grad(loss(lambda a, b: tokamax.ragged_dot(a, b, SIZES, implementation=ours)), (0, 1))(lhs, rhs)
    expected = jax.grad(loss(lambda a, b: jax.lax.ragged_dot(a, b, SIZES)), (0, 1))(lhs, rhs)
    assert_close(grads[0], expected[0], 1e-5, "dlhs")
    assert_close(grads[1], expected[1], 1e-5, "drhs")
    uint_sizes = SIZES.astype(jnp.uint32)
    assert_close(tokamax.ragged_dot(lhs, rhs, uint_sizes, implementation=ours),
                 jax.lax.ragged_dot(lhs, rhs, SIZES), 1e-6, "uint32 group sizes")
