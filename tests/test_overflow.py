"""Adversarial group sizes and offsets: saturating clamps, no out-of-bounds access on any backend, one defined
result for ``group_offset`` outside ``[0, G)``.

Pallas runs under the strict interpreter (out-of-bounds block reads raise, uninitialised memory is NaN); Triton's
interpreted kernels always run bounds-checked (``kernels.triton.bounds``): every masked-in load / store address must
lie inside one of the launch's buffers, else the call raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import moe_ops
from moe_ops import reference as R
from moe_ops import validation
from tests.helpers import assert_close, keys, randn

MAX, MIN = 2**31 - 1, -2**31
M, K, N = 16, 8, 12
ADVERSARIAL = {
    "max_in_middle": [5, MAX, 0],
    "all_max": [MAX, MAX, MAX],
    "max_min_max": [MAX, MIN, MAX],
    "min_then_max": [MIN, 7, MAX],
    "sum_wraps_to_small": [MAX, MAX, 4],
    "negative_and_big": [-3, 9, 2**30, 2**30],
}
BACKENDS = ["xla", "triton", "pallas"]


def saturated(sizes, m):
    """The documented clamp in int64 numpy: negatives as zero, group ends capped at ``m``."""
    ends = np.minimum(np.cumsum(np.maximum(np.asarray(sizes, np.int64), 0)), m)
    return np.diff(ends, prepend=0).astype(np.int32)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_clamp_saturates(name):
    sizes = ADVERSARIAL[name]
    got = np.asarray(jax.jit(validation.clamp_group_sizes, static_argnums=1)(jnp.array(sizes, jnp.int32), M))
    np.testing.assert_array_equal(got, saturated(sizes, M))
    assert got.min() >= 0 and got.sum() <= M


@given(st.lists(st.integers(MIN, MAX), min_size=1, max_size=9), st.integers(0, MAX))
def test_clamp_saturates_any_int32(sizes, m):
    got = np.asarray(validation.clamp_group_sizes(jnp.array(sizes, jnp.int32), m))
    np.testing.assert_array_equal(got, saturated(sizes, m))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.uint16, np.uint32])
def test_clamp_other_integer_dtypes(dtype):
    info = np.iinfo(dtype)
    sizes = np.array([info.max, info.min, 3, info.max], dtype)
    got = validation.clamp_group_sizes(jnp.asarray(sizes), 300)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), saturated(sizes, 300))


@pytest.mark.parametrize("op", ["gmm", "gather_gmm", "ragged_dot"])
def test_numpy_int64_sizes_are_clamped_at_full_width(op):
    """Host int64 sizes (NumPy, x64 off) are judged before the int32 device copy: 2**32 + 1 does not wrap to 1 and
    2**31 + 3 does not wrap negative; both saturate like any oversized group."""
    k1, k2 = keys(31, 2)
    x, rhs = randn(k1, (M, K)), randn(k2, (4, K, N))
    ops = {"gmm": lambda s: moe_ops.gmm(x, rhs, s, implementation="xla"),
           "gather_gmm": lambda s: moe_ops.gather_gmm(x, rhs, s, jnp.arange(M, dtype=jnp.int32), implementation="xla"),
           "ragged_dot": lambda s: moe_ops.ragged_dot(x, rhs, s, implementation="xla")}
    for big in (2**32 + 1, 2**31 + 3, 2**40):
        sizes = np.array([3, big, 0, 2], np.int64)
        want = ops[op](jnp.asarray(saturated(sizes, M)))
        assert_close(ops[op](sizes), want, 1e-6, f"{op} with size {big}")


def test_checked_mode_reports_the_true_sum():
    with moe_ops.checked(), pytest.raises(Exception, match=r"got sum 4294967294"):
        jax.block_until_ready(moe_ops.gmm(jnp.ones((M, K)), jnp.ones((2, K, N)), jnp.array([MAX, MAX], jnp.int32)))


@pytest.fixture
def checked_backend(request):
    """The implementation, run checked: Triton's interpreted kernels always check every load / store against their
    buffers (``kernels.triton.bounds``: an access out of bounds raises), Pallas runs strict-interpreted."""
    impl = request.param
    if impl == "pallas":
        from jax.experimental.pallas import tpu as pltpu

        from kernels.platform import interpret_mode
        strict = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
        try:
            with interpret_mode(strict):
                yield impl
        finally:
            pltpu.reset_tpu_interpret_mode_state()
    else:
        yield impl


def test_bounds_checker_catches_an_out_of_bounds_read():
    """The checker is live: a kernel-level call with unclamped sizes (bypassing moe_ops) is reported."""
    from kernels.triton import gmm as triton_gmm
    lhs, rhs = randn(keys(0, 1)[0], (M, K)), randn(keys(1, 1)[0], (M, N))
    with pytest.raises(Exception, match="_tgmm_kernel loads .* out of bounds"):
        jax.block_until_ready(triton_gmm.tgmm(lhs, rhs, jnp.array([M + 40, 0], jnp.int32), jnp.zeros((1,), jnp.int32),
                                              num_groups=2, out_dtype=jnp.float32))


# ------------------------------------------------------------------------------------- every backend, every op
@pytest.mark.parametrize("checked_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", ["max_in_middle", "all_max", "max_min_max"])
def test_adversarial_sizes_match_reference(checked_backend, name):
    impl = checked_backend
    sizes = jnp.array(ADVERSARIAL[name], jnp.int32)
    g = sizes.shape[0]
    clamped = jnp.asarray(saturated(ADVERSARIAL[name], M))
    k1, k2, k3 = keys(3, 3)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (g, K, N)), randn(k3, (M, N))
    out = moe_ops.gmm(lhs, rhs, sizes, implementation=impl)
    assert_close(out, R.gmm(lhs, rhs, clamped), 1e-5, f"{impl} gmm {name}")
    out = moe_ops.tgmm(lhs, rhs2, sizes, implementation=impl)
    assert_close(out, R.tgmm(lhs, rhs2, clamped), 1e-5, f"{impl} tgmm {name}")
    if impl != "pallas":  # fused ops (k=1, a reversing permutation)
        perm = jnp.arange(M, dtype=jnp.int32)[::-1]
        out = moe_ops.gather_gmm(lhs, rhs, sizes, perm, implementation=impl)
        assert_close(out, R.gmm(lhs[perm], rhs, clamped), 1e-5, f"{impl} gather_gmm {name}")
        out = moe_ops.scatter_gmm(lhs, rhs, sizes, perm, jnp.ones((M, 1)), implementation=impl)
        assert_close(out, R.gmm(lhs, rhs, clamped)[perm], 1e-5, f"{impl} scatter_gmm {name}")
    grads = jax.grad(lambda a, b: jnp.sum(moe_ops.gmm(a, b, sizes, implementation=impl) * rhs2), (0, 1))(lhs, rhs)
    expected = jax.grad(lambda a, b: jnp.sum(R.gmm(a, b, clamped) * rhs2), (0, 1))(lhs, rhs)
    for got, want, what in zip(grads, expected, ("dlhs", "drhs")):
        assert_close(got, want, 1e-5, f"{impl} {what} {name}")


# ---------------------------------------------------------------------------------------- group_offset range
@pytest.mark.parametrize("checked_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("offset", [-1, 4, 9, MIN, MAX])
def test_offset_outside_range_means_no_local_groups(checked_backend, offset):
    """G=4 groups, 2 local: an offset outside [0, 4) selects no group -> zeros forward and backward."""
    impl = checked_backend
    sizes = jnp.array([3, 5, 4, 2], jnp.int32)
    k1, k2, k3 = keys(4, 3)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (2, K, N)), randn(k3, (M, N))
    off = jnp.array(offset, jnp.int32)
    out = moe_ops.gmm(lhs, rhs, sizes, group_offset=off, implementation=impl)
    np.testing.assert_array_equal(np.asarray(out), 0)
    out = moe_ops.tgmm(lhs, rhs2, sizes, group_offset=off, num_groups=2, implementation=impl)
    np.testing.assert_array_equal(np.asarray(out), 0)
    dlhs, drhs = jax.grad(lambda a, b: jnp.sum(moe_ops.gmm(a, b, sizes, group_offset=off, implementation=impl)
                                               * rhs2), (0, 1))(lhs, rhs)
    np.testing.assert_array_equal(np.asarray(dlhs), 0)
    np.testing.assert_array_equal(np.asarray(drhs), 0)
    np.testing.assert_array_equal(np.asarray(R.gmm(lhs, rhs, sizes, group_offset=off)), 0)


def test_offset_outside_range_raises_when_checked():
    sizes = jnp.array([3, 5, 4, 2], jnp.int32)
    lhs, rhs = jnp.ones((M, K)), jnp.ones((2, K, N))
    with moe_ops.checked(), pytest.raises(Exception, match=r"group_offset must lie in \[0, G=4\).*got -1"):
        jax.block_until_ready(jax.jit(lambda o: moe_ops.gmm(lhs, rhs, sizes, group_offset=o))(jnp.int32(-1)))
    with moe_ops.checked():  # in range: no error
        jax.block_until_ready(moe_ops.gmm(lhs, rhs, sizes, group_offset=3))


@pytest.mark.parametrize("checked_backend", BACKENDS, indirect=True)
def test_extreme_expert_ids_are_dropped(checked_backend):
    """Ids at the int32 extremes sort last and are dropped (permute, unpermute, the fused ops), no out-of-bounds."""
    impl = checked_backend
    ids = jnp.array([[0, MAX], [MIN, 2], [3, MAX - 1], [1, -1], [MIN + 1, 0]], jnp.int32)
    t, k, e = ids.shape[0], ids.shape[1], 4
    k1, k2, k3 = keys(5, 3)
    x, rhs, w = randn(k1, (t, K)), randn(k2, (e, K, N)), jax.random.uniform(k3, (t, k), jnp.float32, 0.1, 1.0)
    xs, sizes, sort_idx = moe_ops.permute(x, ids, e, implementation=impl)
    rxs, rsizes, rsort = R.permute(x, ids, e)
    np.testing.assert_array_equal(np.asarray(sizes), np.asarray(rsizes))
    np.testing.assert_array_equal(np.asarray(sort_idx), np.asarray(rsort))
    assert_close(xs, rxs, 0, f"{impl} permute")
    y = moe_ops.gmm(xs, rhs, sizes, implementation=impl)
    assert_close(moe_ops.unpermute(y, sort_idx, w, implementation=impl), R.unpermute(R.gmm(rxs, rhs, rsizes), rsort, w),
                 1e-5, f"{impl} unpermute")
    if impl != "pallas":
        assert_close(moe_ops.gather_gmm(x, rhs, sizes, sort_idx, implementation=impl), R.gmm(rxs, rhs, rsizes), 1e-5,
                     f"{impl} gather_gmm")
