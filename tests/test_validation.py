"""Bad input gets a clear error naming the argument; value problems have defined behaviour or a checked mode."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import keys, randn

M, K, N, G = 16, 8, 12, 4
lhs = randn(keys(0, 1)[0], (M, K))
rhs = randn(keys(1, 1)[0], (G, K, N))
sizes = jnp.array([3, 5, 0, 6], jnp.int32)


@pytest.mark.parametrize("call,err,match", [
    (lambda: moe_ops.gmm(lhs[None], rhs, sizes), ValueError, r"lhs must have rank 2"),
    (lambda: moe_ops.gmm(lhs, rhs[0], sizes), ValueError, r"rhs must have rank 3"),
    (lambda: moe_ops.gmm(lhs, rhs[:, :5], sizes), ValueError, r"rhs must be \[G_local, K, N\] with K=8"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes, transpose_rhs=True), ValueError, r"\[G_local, N, K\]"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes.astype(jnp.float32)), TypeError, r"group_sizes must be an integer"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes[None]), ValueError, r"group_sizes must have rank 1"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes[:2]), ValueError, r"G_local\) must be <= len\(group_sizes\)"),
    (lambda: moe_ops.gmm(lhs.astype(jnp.int32), rhs, sizes), TypeError, r"lhs must be float32, bfloat16"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes, preferred_element_type=jnp.int8), TypeError, "preferred_element_type"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes, group_offset=1.5), TypeError, "group_offset"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes, group_offset=np.array([1.0])), TypeError, "group_offset"),
    (lambda: moe_ops.gmm(lhs, rhs[:, :, :K], sizes, transpose_rhs="False"), TypeError, "transpose_rhs must be True"),
    (lambda: moe_ops.ragged_dot(np.asarray(lhs).tolist(), rhs, sizes), TypeError, "lhs must be an array, got list"),
    (lambda: moe_ops.gmm(lhs, rhs, sizes, implementation="cuda"), ValueError, "implementation must be"),
    (lambda: moe_ops.tgmm(lhs, lhs[:5], sizes), ValueError, r"must share M"),
    (lambda: moe_ops.tgmm(lhs, lhs, sizes, num_groups=9), ValueError, r"num_groups must be"),
    (lambda: moe_ops.route(lhs, 9), ValueError, r"top_k must be an int in \[1, E=8\]"),
    (lambda: moe_ops.route(lhs, 2, bias=jnp.zeros(3)), ValueError, r"bias must have shape \[E\]"),
    (lambda: moe_ops.route(lhs, 2, score_fn="tanh"), ValueError, r"score_fn must be"),
    (lambda: moe_ops.permute(lhs, jnp.zeros((M + 1, 2), jnp.int32), 4), ValueError, r"expert_ids must be \[T, k\]"),
    (lambda: moe_ops.permute(lhs, jnp.zeros((M, 2)), 4), TypeError, r"expert_ids must be an integer"),
    (lambda: moe_ops.unpermute(lhs, jnp.arange(M), jnp.ones((M, 2))), ValueError, r"disagree"),
    (lambda: moe_ops.moe_ffn(lhs, lhs[:, :4], rhs, rhs, rhs, top_k=2), ValueError, r"w_down must be \[E,F,D\]"),
    (lambda: moe_ops.moe_ffn(lhs, lhs[:, :3], rhs, rhs, jnp.swapaxes(rhs, 1, 2), top_k=2), ValueError,
     r"router_logits must be"),
])
def test_bad_inputs_raise_named_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_sum_beyond_m_truncates_without_out_of_bounds():
    """sum(group_sizes) > M: the last groups are cut at row M (documented); the checked mode raises instead."""
    big = jnp.array([6, 7, 9, 4], jnp.int32)  # sum 26 > 16
    step = jax.jit(moe_ops.gmm)
    expected = R.gmm(lhs, rhs, jnp.array([6, 7, 3, 0], jnp.int32))
    np.testing.assert_allclose(step(lhs, rhs, big), expected, rtol=1e-5, atol=1e-5)
    with moe_ops.checked(), pytest.raises(Exception, match=r"sum to at most M=16; got sum 26"):
        jax.block_until_ready(step(lhs, rhs, big))


def test_negative_sizes_count_as_zero_and_checked_mode_raises():
    neg = jnp.array([4, -3, 5, 2], jnp.int32)
    np.testing.assert_allclose(moe_ops.gmm(lhs, rhs, neg), R.gmm(lhs, rhs, jnp.maximum(neg, 0)), rtol=1e-5,
                               atol=1e-5)
    with moe_ops.checked(), pytest.raises(Exception, match="must be >= 0"):
        jax.block_until_ready(moe_ops.gmm(lhs, rhs, neg))


def test_out_of_range_expert_ids_are_dropped_or_raise_when_checked():
    ids = jnp.array([[0, 5], [1, 2], [-1, 3]] * 5 + [[0, 1]], jnp.int32)
    xs, group_sizes, sort_idx = moe_ops.permute(lhs, ids, 4)
    assert int(group_sizes.sum()) == ids.size - 10
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1)[np.asarray(sort_idx)[-10:]], [5, -1] * 5)
    with moe_ops.checked(), pytest.raises(Exception, match=r"expert_ids must lie in \[0, 4\)"):
        jax.block_until_ready(jax.jit(lambda x, i: moe_ops.permute(x, i, 4))(lhs, ids))


@pytest.mark.parametrize("offset", [2 ** 40, -2 ** 40, np.int64(2 ** 32 + 1), np.uint64(2 ** 32), np.array([G]),
                                    np.int8(-1)])
def test_host_group_offsets_out_of_range_at_full_width(offset):
    """An offset outside [0, G) selects no group however wide its host type: 2**32 + 1 must not wrap to 1 in the
    int32 cast. The checked mode names the value instead."""
    assert not np.asarray(jax.jit(lambda a, b: moe_ops.gmm(a, b, sizes, group_offset=offset))(lhs, rhs)).any()
    with moe_ops.checked(), pytest.raises(ValueError, match=r"group_offset must lie in \[0, G=4\)"):
        moe_ops.gmm(lhs, rhs, sizes, group_offset=offset)


def test_checked_env_variable_takes_flag_words_and_rejects_others(monkeypatch):
    from moe_ops import validation
    for value, on in (("1", True), ("true", True), ("On", True), ("0", False), ("no", False), ("", False)):
        monkeypatch.setenv("MOE_OPS_CHECKED", value)
        assert validation.checks_enabled() is on, value
    monkeypatch.setenv("MOE_OPS_CHECKED", "maybe")
    with pytest.raises(ValueError, match="MOE_OPS_CHECKED='maybe'"):
        validation.checks_enabled()


def test_checked_block_is_in_the_jit_cache_key():
    """A function jit traced outside ``checked()`` is traced again, with checks, inside it, and the checked trace is
    not reused outside. Before, the block was a thread-local that jit's cache did not see: the cached unchecked trace
    ran inside the block and the bad sizes were silently truncated."""
    bad = jnp.array([4, -3, 5, 2], jnp.int32)
    step = jax.jit(lambda a, b, s: moe_ops.gmm(a, b, s))
    want = R.gmm(lhs, rhs, jnp.maximum(bad, 0))
    np.testing.assert_allclose(step(lhs, rhs, bad), want, rtol=1e-5, atol=1e-5)
    with moe_ops.checked(), pytest.raises(Exception, match="must be >= 0"):
        jax.block_until_ready(step(lhs, rhs, bad))
    np.testing.assert_allclose(step(lhs, rhs, bad), want, rtol=1e-5, atol=1e-5)
    with moe_ops.checked(), moe_ops.checked(False):  # the inner block turns checks off again
        np.testing.assert_allclose(step(lhs, rhs, bad), want, rtol=1e-5, atol=1e-5)


def test_checked_block_is_per_thread():
    """Each thread's block is its own: a thread outside any block runs the unchecked trace while another is inside."""
    bad = jnp.array([4, -3, 5, 2], jnp.int32)
    step = jax.jit(lambda a, b, s: moe_ops.gmm(a, b, s))
    inside, release = threading.Event(), threading.Event()
    errors = []

    def checked_thread():
        with moe_ops.checked():
            inside.set()
            release.wait(60)
            try:
                jax.block_until_ready(step(lhs, rhs, bad))
            except Exception as e:  # noqa: BLE001 - the runtime check surfaces as XLA's runtime error
                errors.append(str(e))
    worker = threading.Thread(target=checked_thread)
    worker.start()
    assert inside.wait(60)
    np.testing.assert_allclose(step(lhs, rhs, bad), R.gmm(lhs, rhs, jnp.maximum(bad, 0)), rtol=1e-5, atol=1e-5)
    release.set()
    worker.join(120)
    assert len(errors) == 1 and "must be >= 0" in errors[0], errors


def test_checked_takes_a_bool():
    with pytest.raises(TypeError, match="checked's enabled must be True or False, got 'no'"):
        with moe_ops.checked("no"):
            pass


def test_ragged_dot_rejects_a_bad_implementation_on_the_lax_path_too():
    a, b = jnp.ones((4, 3), jnp.int8), jnp.ones((2, 3, 5), jnp.int8)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        moe_ops.ragged_dot(a, b, jnp.array([2, 2], jnp.int32), preferred_element_type=jnp.int32,
                           implementation="no-such-backend")


@pytest.mark.parametrize("call, match", [
    (lambda: moe_ops.gmm(lhs, rhs, np.array([2 ** 40, 1, 1, 1], np.int64)), r"sum to at most M=16; got sum 1099511627779"),
    (lambda: moe_ops.tgmm(lhs, lhs, np.array([2 ** 32, 1, 1, 1], np.uint64)), r"sum to at most M=16; got sum 4294967299"),
    (lambda: moe_ops.gmm(lhs, rhs, np.array([2 ** 64 - 1, 1, 0, 0], np.uint64)), r"sum to at most M=16"),
    (lambda: moe_ops.permute(lhs, np.array([[0, 1]] * (M - 1) + [[2, 2 ** 32 + 1]], np.int64), 4),
     r"expert_ids must lie in \[0, 4\)"),
    (lambda: moe_ops.unpermute(jnp.ones((4, K)), np.array([2 ** 32, 1, 2, 3], np.int64), jnp.ones((2, 2))),
     r"sort_idx must be a permutation"),
], ids=["int64_sizes", "uint64_sizes", "uint64_max_size", "int64_expert_id", "int64_sort_idx"])
def test_checked_mode_judges_numpy_operands_at_full_width(call, match):
    """NumPy int64 / uint64 operands are judged on the host at full width. Failed before the fix: the checked mode's
    device callback saw JAX's int32 copy (2**40 -> 0, 2**32 + 1 -> 1), so these passed silently, although the
    unchecked path clamps / drops them at full width."""
    with moe_ops.checked(), pytest.raises(ValueError, match=match):
        jax.block_until_ready(call())
