"""``moe_ops.ragged_dot`` / ``ragged_dot_general`` against ``jax.lax.ragged_dot`` / ``ragged_dot_general`` on every
backend, forward and gradients, in the three ragged modes.

Gradient references: lax's own transpose rule exists only for the ragged non-contracting mode; for the contracting
and batch modes the reference is the gradient of lax's dense formulation (``_ragged_dot_general_impl``, the function
lax lowers to on CPU), which defines the same function.
"""

import jax
import jax.numpy as jnp
import pytest
from jax._src.lax.lax import _ragged_dot_general_impl as lax_dense

import moe_ops
from moe_ops import reference
from tests.helpers import GROUP_CASES, TOL, assert_close, group_sizes, keys, randn

R = jax.lax.RaggedDotDimensionNumbers
IMPLS = ["xla", "triton", "pallas"]

# name -> (lhs shape, rhs shape, group_sizes shape prefix, dimension numbers, needs vmap on the backend)
DIMS = {
    "gmm_k_first": ((6, 19), (4, 6, 5), (), R((([0], [1]), ([], [])), [1], [0]), False),
    "gmm_free_dims_fold": ((3, 19, 2, 6), (6, 4, 5), (), R((([3], [0]), ([], [])), [1], [1]), False),
    "gmm_batch": ((2, 19, 6), (4, 2, 6, 5), (2,), R((([2], [2]), ([0], [1])), [1], [0]), True),
    "gmm_batch_shared_sizes": ((2, 19, 6), (2, 4, 6, 5), (), R((([2], [2]), ([0], [0])), [1], [1]), True),
    "gmm_outer_sizes": ((3, 19, 6), (4, 6, 5), (3,), R((([2], [1]), ([], [])), [1], [0]), True),
    "tgmm": ((19, 6), (19, 5), (), R((([0], [0]), ([], [])), [0], []), False),
    "tgmm_two_contracting": ((2, 19, 6), (19, 2, 5), (), R((([0, 1], [1, 0]), ([], [])), [1], []), False),
    "tgmm_batch": ((2, 19, 6), (2, 19, 5), (2,), R((([1], [1]), ([0], [0])), [1], []), True),
    "tgmm_outer_sizes": ((2, 19, 6), (19, 2, 5), (2,), R((([0, 1], [1, 0]), ([], [])), [1], []), True),
    "ragged_batch": ((19, 3, 6), (19, 6, 5), (), R((([2], [1]), ([0], [0])), [0], []), False),
}


_KERNEL_GRADS = ("gmm_free_dims_fold", "gmm_batch", "tgmm_two_contracting")


def _sizes(prefix, num_rows, seed, num_groups=4):
    cases = ["uneven", "sum_below_m", "empty_groups", "one_hot_group"]
    flat = [group_sizes(cases[(seed + i) % len(cases)], num_groups, num_rows, seed=seed + i)
            for i in range(max(1, int(jnp.prod(jnp.array(prefix))) if prefix else 1))]
    return jnp.stack(flat).reshape(prefix + (num_groups,)) if prefix else flat[0]


QUICK_LAYOUTS = ("gmm_k_first", "gmm_batch")  # the quick loop keeps one layout of gmm and one batch mode


def _params(names):
    return [pytest.param(name, impl, id=f"{name}-{impl}", marks=[] if name in QUICK_LAYOUTS else [pytest.mark.slow])
            for name in names for impl in IMPLS]


@pytest.mark.parametrize("name,impl", _params(DIMS))
def test_ragged_dot_general_matches_lax(name, impl):
    lshape, rshape, prefix, dims, _ = DIMS[name]
    k1, k2, k3 = keys(len(name), 3)
    lhs, rhs = randn(k1, lshape), randn(k2, rshape)
    sizes = _sizes(prefix, lshape[dims.lhs_ragged_dimensions[0]], len(name))
    want = jax.lax.ragged_dot_general(lhs, rhs, sizes, dims)
    got = jax.jit(lambda a, b, s: moe_ops.ragged_dot_general(a, b, s, dims, implementation=impl))(lhs, rhs, sizes)
    assert got.dtype == want.dtype
    assert_close(got, want, TOL[jnp.float32], name)
    if impl != "xla" and name not in _KERNEL_GRADS:
        return  # the layout mapping's gradient is backend-independent; kernels' VJPs are tested on two layouts

    cot = randn(k3, want.shape)
    loss = lambda fn: lambda a, b: jnp.sum(cot * fn(a, b, sizes, dims))
    ours = jax.grad(loss(lambda *a: moe_ops.ragged_dot_general(*a, implementation=impl)), argnums=(0, 1))(lhs, rhs)
    ref_fn = jax.lax.ragged_dot_general if dims.rhs_group_dimensions else lax_dense  # see the module docstring
    theirs = jax.grad(loss(ref_fn), argnums=(0, 1))(lhs, rhs)
    assert_close(ours[0], theirs[0], TOL[jnp.float32], f"{name} dlhs")
    assert_close(ours[1], theirs[1], TOL[jnp.float32], f"{name} drhs")


# the kernels' own tests sweep group cases; here the ones where lax's row semantics could differ from ours
_KERNEL_CASES = ("empty_groups", "sum_below_m", "sum_above_m")


@pytest.mark.parametrize("impl,case", [(i, c) for i in IMPLS for c in list(GROUP_CASES) + ["sum_above_m"]
                                       if i == "xla" or c in _KERNEL_CASES])
def test_ragged_dot_group_cases(impl, case):
    m, k, n, g = 21, 12, 10, 5
    k1, k2, k3 = keys(7, 3)
    lhs, rhs = randn(k1, (m, k)), randn(k2, (g, k, n))
    sizes = (jnp.array([4, 9, 0, 7, 6], jnp.int32) if case == "sum_above_m" else group_sizes(case, g, m, seed=2))
    want = jax.lax.ragged_dot(lhs, rhs, sizes)           # rows past the sum are zero; a sum past m truncates
    assert_close(moe_ops.ragged_dot(lhs, rhs, sizes, implementation=impl), want, TOL[jnp.float32], case)
    cot = randn(k3, (m, n))
    loss = lambda fn: lambda a, b: jnp.sum(cot * fn(a, b, sizes))
    ours = jax.grad(loss(lambda *a: moe_ops.ragged_dot(*a, implementation=impl)), argnums=(0, 1))(lhs, rhs)
    theirs = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
    for what, a, b in zip(["dlhs", "drhs"], ours, theirs):
        assert_close(a, b, TOL[jnp.float32], f"{case} {what}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,preferred", [(jnp.bfloat16, None), (jnp.bfloat16, jnp.float32),
                                             (jnp.float32, jnp.bfloat16)])
def test_ragged_dot_dtypes_and_precision(impl, dtype, preferred):
    m, k, n, g = 21, 12, 10, 3
    k1, k2 = keys(8, 2)
    lhs, rhs, sizes = randn(k1, (m, k), dtype), randn(k2, (g, k, n), dtype), group_sizes("uneven", g, m)
    want = jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST, preferred_element_type=preferred)
    got = moe_ops.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST, preferred_element_type=preferred,
                             implementation=impl)
    assert got.dtype == want.dtype
    assert_close(got, want, TOL[jnp.bfloat16], f"{dtype} -> {preferred}")


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_dot_group_offset(impl):
    """lax (0.10) raises NotImplementedError for group_offset; ours has gmm's meaning (rhs holds G_local groups)."""
    m, k, n, g = 21, 12, 10, 5
    k1, k2 = keys(9, 2)
    lhs, rhs, sizes = randn(k1, (m, k)), randn(k2, (2, k, n)), group_sizes("uneven", g, m, seed=4)
    off = jnp.array([2], jnp.int32)
    got = moe_ops.ragged_dot(lhs, rhs, sizes, group_offset=off, implementation=impl)
    assert_close(got, reference.gmm(lhs, rhs, sizes, group_offset=off), TOL[jnp.float32], "group_offset")


def test_ragged_dot_errors_name_the_argument():
    lhs, rhs, sizes = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([3, 5], jnp.int32)
    for bad in ([0, 1], [], [2], [-1]):  # lax raises TypeError for these (tests/lax_test.py); so do we
        with pytest.raises(TypeError, match="lhs_ragged_dimensions"):
            moe_ops.ragged_dot_general(lhs, rhs, sizes, R((([1], [1]), ([], [])), bad, [0]))
    with pytest.raises(TypeError, match="ragged_dot_dimension_numbers must be"):
        moe_ops.ragged_dot_general(lhs, rhs, sizes, (([1], [1]), ([], [])))
    with pytest.raises(TypeError, match="group_sizes must be an integer"):
        moe_ops.ragged_dot(lhs, rhs, sizes.astype(jnp.float32))
    with pytest.raises(TypeError, match="rhs group dimension size"):    # lax's own shape rule, same message
        moe_ops.ragged_dot(lhs, jnp.ones((3, 4, 3)), sizes)
    with pytest.raises(ValueError, match="group_offset"):
        moe_ops.ragged_dot_general(lhs, jnp.ones((8, 3)), sizes, R((([0], [0]), ([], [])), [0], []), group_offset=1)
    with pytest.raises(ValueError, match="with group_offset the rhs holds G_local <= G"):
        moe_ops.ragged_dot(lhs, jnp.ones((3, 4, 3)), sizes, group_offset=jnp.array([0]))
    with pytest.raises(NotImplementedError, match="out_sharding"):
        moe_ops.ragged_dot(lhs, rhs, sizes, out_sharding=jax.sharding.PartitionSpec())
    with pytest.raises(ValueError, match="precision=.*implementation='triton'"):
        moe_ops.ragged_dot(lhs, rhs, sizes, precision=jax.lax.DotAlgorithmPreset.F64_F64_F64,
                           implementation="triton")


def test_signatures_are_lax_signatures():
    import inspect
    for ours, theirs in [(moe_ops.ragged_dot, jax.lax.ragged_dot),
                         (moe_ops.ragged_dot_general, jax.lax.ragged_dot_general)]:
        params = inspect.signature(ours).parameters
        assert [p for p in params if p != "implementation"] == list(inspect.signature(theirs).parameters)
        assert params["implementation"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("lhs_dtype,rhs_dtype,preferred", [
    (jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.float8_e4m3fn, None),
    (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float32), (jnp.float32, jnp.float32, jnp.int32),
    (jnp.bfloat16, jnp.bfloat16, jnp.int8)])
def test_pairs_no_kernel_takes_run_lax(lhs_dtype, rhs_dtype, preferred):
    """Float8 mixed with another float (no JAX promotion between them) and an integer result: lax accepts them,
    so they run lax's own op, with its result exactly."""
    m, k, n, g = 13, 8, 6, 3
    k1, k2 = keys(11, 2)
    lhs, rhs = randn(k1, (m, k)).astype(lhs_dtype), randn(k2, (g, k, n)).astype(rhs_dtype)
    sizes = group_sizes("uneven", g, m)
    want = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=preferred)
    got = moe_ops.ragged_dot(lhs, rhs, sizes, preferred_element_type=preferred, implementation="triton")
    assert got.dtype == want.dtype and bool(jnp.all(got == want))


@pytest.mark.parametrize("impl", ["triton", "pallas"])
@pytest.mark.parametrize("name", ["gmm_k_first", "tgmm"])
def test_second_order_matches_lax(impl, name):
    """grad of grad (README: second order works for the grouped matmuls, whose backward is again grouped matmuls)."""
    lhs_shape, rhs_shape, _, dims, _ = DIMS[name]
    k1, k2 = keys(12, 2)
    lhs, rhs = randn(k1, lhs_shape), randn(k2, rhs_shape)
    sizes = group_sizes("uneven", 4, 19)

    def second(fn):
        inner = jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), argnums=(0, 1))
        return jax.grad(lambda a, b: sum(jnp.sum(jnp.cos(g)) for g in inner(a, b)), argnums=(0, 1))(lhs, rhs)
    got = second(lambda a, b: moe_ops.ragged_dot_general(a, b, sizes, dims, implementation=impl))
    want = second(lambda a, b: lax_dense(a, b, sizes, dims, None, None))
    for g, w in zip(got, want):
        assert_close(g, w, TOL[jnp.float32], f"{name} second order")
