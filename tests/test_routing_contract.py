"""Contract checks of the routing / permutation ops and the single-device layer that the older files missed: host
(Python / NumPy) ``n_valid`` values judged at full width, and ``experts_ffn``'s errors naming its own arguments.
Each test failed before its fix; fresh random data, tiny shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import TOL, assert_close, keys, randn

T, K, E, D, F = 9, 3, 5, 6, 10


def _routing(seed):
    k1, k2, k3, k4 = keys(seed, 4)
    x, y, w = randn(k1, (T, D)), randn(k2, (T * K, D)), randn(k3, (T, K))
    ids = R.route(randn(k4, (T, E)), K)[1]
    return x, y, w, ids


# Before the fix, a host n_valid went through JAX's int32 copy first: np.int64(2**33) wrapped to 0 (permute zeroed
# every row, unpermute dropped every copy) and a Python int past int32 raised an OverflowError naming nothing.
@pytest.mark.parametrize("impl", ["xla", "triton"])
@pytest.mark.parametrize("n_valid, all_rows", [
    (np.int64(2 ** 33), True), (np.array([2 ** 33 + 5], np.int64), True), (np.uint64(2 ** 63), True),
    (2 ** 40, True), (-2 ** 40, False), (np.int64(-2 ** 32 + 4), False)],
    ids=["np_int64_2^33", "np_array_int64", "np_uint64_2^63", "py_2^40", "py_-2^40", "np_int64_-2^32+4"])
def test_host_n_valid_is_judged_at_full_width(impl, n_valid, all_rows):
    x, y, w, ids = _routing(11)
    want_x, _, sort_idx = R.permute(x, ids, E)
    want_y = R.unpermute(y, sort_idx, w)
    xs, _, got_idx = moe_ops.permute(x, ids, E, n_valid=n_valid, implementation=impl)
    np.testing.assert_array_equal(got_idx, sort_idx)
    out = moe_ops.unpermute(y, sort_idx, w, n_valid=n_valid, implementation=impl)
    if all_rows:   # any n_valid >= T*k means every row, as for a device scalar
        np.testing.assert_array_equal(xs, want_x)
        assert_close(out, want_y, TOL[jnp.float32], "unpermute")
    else:          # any n_valid <= 0 means no row
        assert not np.asarray(xs).any() and not np.asarray(out).any()


def test_host_n_valid_small_values_unchanged():
    x, y, w, ids = _routing(12)
    want_x, _, sort_idx = R.permute(x, ids, E)
    for n in (np.int64(7), np.int8(7), 7, np.array([7], np.uint16)):
        xs = moe_ops.permute(x, ids, E, n_valid=n, implementation="xla")[0]
        np.testing.assert_array_equal(xs, jnp.where(jnp.arange(T * K)[:, None] < 7, want_x, 0))
    with pytest.raises(TypeError, match="n_valid must be None or an integer"):
        moe_ops.permute(x, ids, E, n_valid=True, implementation="xla")
    with pytest.raises(TypeError, match="n_valid must be None or an integer"):
        moe_ops.unpermute(y, sort_idx, w, n_valid=np.array([[3]]), implementation="xla")


# Before the fix, experts_ffn's rank and group-count errors came from the inner gmm and named its "lhs" / "rhs".
@pytest.mark.parametrize("bad, match", [
    ("x_rank3", r"x_sorted must have rank 2, got shape \(1, 12, 6\)"),
    ("few_sizes", r"w_gate has 5 groups but group_sizes has only 4: w_gate.shape\[0\]"),
], ids=["x_rank3", "few_sizes"])
def test_experts_ffn_errors_name_its_arguments(bad, match):
    k1, k2, k3, k4 = keys(13, 4)
    xs = randn(k1, (12, D))
    wg, wu, wd = randn(k2, (E, D, F)), randn(k3, (E, D, F)), randn(k4, (E, F, D))
    sizes = jnp.array([3, 0, 4, 2, 3], jnp.int32)
    if bad == "x_rank3":
        xs = xs[None]
    else:
        sizes = sizes[:4]
    with pytest.raises(ValueError, match=match):
        moe_ops.experts_ffn(xs, sizes, wg, wu, wd, implementation="xla")
