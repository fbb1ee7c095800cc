"""Degenerate shapes (T=0, M=0, G=0, G_local=0, K=0, N=0, D=0, F=0, top_k=0, a vmap over zero examples): every op
on every backend returns correctly shaped zeros, and every gradient is zeros shaped like its input; top_k=0 in the
layer is a named error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from tests.helpers import keys, randn
from tests.op_cases import public_op_cases, value_and_grads

BACKENDS = ["xla", "triton", "pallas"]


def _check_zeros(out, shape, dtype=jnp.float32, what=""):
    assert out.shape == shape and out.dtype == dtype, f"{what}: {out.shape} {out.dtype} != {shape} {dtype}"
    assert np.all(np.asarray(out, np.float32) == 0), f"{what}: not all zeros"


def _check_op(fn, args, out_shape, what):
    """Forward zeros of ``out_shape``; the gradient of ``sum(out * probe)`` wrt every float arg is zeros of its
    shape (the probe is random, so an op that leaked a non-zero would show)."""
    out = jax.jit(fn)(*args)
    _check_zeros(out, out_shape, what=what)
    probe = randn(keys(9, 1)[0], out_shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * probe), tuple(range(len(args)))))(*args)
    for i, (g, a) in enumerate(zip(grads, args)):
        _check_zeros(g, a.shape, a.dtype, f"{what} d(arg {i})")


# (M, K, N, G, G_local)
GMM_DIMS = {"M0": (0, 8, 4, 3, 3), "K0": (16, 0, 4, 3, 3), "N0": (16, 8, 0, 3, 3), "G0": (16, 8, 4, 0, 0),
            "G_local0": (16, 8, 4, 3, 0)}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dims", list(GMM_DIMS))
def test_gmm_tgmm(impl, dims):
    m, k, n, g, gl = GMM_DIMS[dims]
    k1, k2, k3 = keys(1, 3)
    lhs, rhs, rhs2 = randn(k1, (m, k)), randn(k2, (gl, k, n)), randn(k3, (m, n))
    sizes = jnp.full((g,), m // 2, jnp.int32)
    _check_op(lambda a, b: moe_ops.gmm(a, b, sizes, implementation=impl), (lhs, rhs), (m, n), f"{impl} gmm {dims}")
    _check_op(lambda a, b: moe_ops.gmm(a, jnp.swapaxes(b, 1, 2), sizes, transpose_rhs=True, implementation=impl),
              (lhs, rhs), (m, n), f"{impl} gmm transposed {dims}")
    _check_op(lambda a, b: moe_ops.tgmm(a, b, sizes, num_groups=gl, implementation=impl), (lhs, rhs2),
              (gl, k, n), f"{impl} tgmm {dims}")
    _check_op(lambda a, b, c: moe_ops.swiglu_gmm(a, b, c, sizes, implementation=impl), (lhs, rhs, rhs + 1),
              (m, n), f"{impl} swiglu_gmm {dims}")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dims", list(GMM_DIMS))
def test_gmm_existing_out(impl, dims):
    """With ``existing_out``, rows of no local group keep it (value and gradient ``dout``) and local rows of an
    empty contraction (K=0) are zeros. Failed before the fix with G_local=0 / G=0: an IndexError from the row mask
    (``local_bounds`` indexed the first of zero local groups)."""
    m, k, n, g, gl = GMM_DIMS[dims]
    k1, k2, k3, k4 = keys(2, 4)
    lhs, rhs, prev, probe = randn(k1, (m, k)), randn(k2, (gl, k, n)), randn(k3, (m, n)), randn(k4, (m, n))
    sizes = jnp.full((g,), m // 2, jnp.int32)
    local = (jnp.arange(m) < (m // 2) * min(g, gl))[:, None]   # the local groups' rows
    fn = jax.jit(lambda a, b, c: moe_ops.gmm(a, b, sizes, existing_out=c, implementation=impl))
    np.testing.assert_array_equal(fn(lhs, rhs, prev), jnp.where(local, 0.0, prev), err_msg=f"{impl} {dims}")
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) * probe), (0, 1, 2))(lhs, rhs, prev)
    for grad, arg in zip(grads[:2], (lhs, rhs)):
        _check_zeros(grad, arg.shape, what=f"{impl} {dims}")
    np.testing.assert_array_equal(grads[2], jnp.where(local, 0.0, probe), err_msg=f"{impl} {dims} d existing_out")


# (T, top_k, D)
SORT_DIMS = {"T0": (0, 2, 8), "top_k0": (6, 0, 8), "D0": (6, 2, 0)}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dims", list(SORT_DIMS))
def test_permute_unpermute_and_fused(impl, dims):
    t, k, d = SORT_DIMS[dims]
    k1, k2, k3, k4 = keys(2, 4)
    x, y, w = randn(k1, (t, d)), randn(k2, (t * k, d)), jax.nn.softmax(randn(k3, (t, k)))
    ids = jax.random.randint(k4, (t, k), 0, 4)
    xs, sizes, sort_idx = moe_ops.permute(x, ids, 4, implementation=impl)
    assert sizes.shape == (4,) and sort_idx.shape == (t * k,) and int(sizes.sum()) == t * k
    _check_op(lambda a: moe_ops.permute(a, ids, 4, implementation=impl)[0], (x,), (t * k, d), f"{impl} permute")
    _check_op(lambda a, b: moe_ops.unpermute(a, sort_idx, b, implementation=impl),
              (y, w), (t, d), f"{impl} unpermute")
    rhs = randn(k2, (4, d, 5))
    _check_op(lambda a, b: moe_ops.gather_gmm(a, b, sizes, sort_idx, implementation=impl), (x, rhs), (t * k, 5),
              f"{impl} gather_gmm")
    _check_op(lambda a, b, c: moe_ops.scatter_gmm(a, b, sizes, sort_idx, c, implementation=impl), (y, rhs, w),
              (t, 5), f"{impl} scatter_gmm")


# (T, D, F)
LAYER_DIMS = {"T0": (0, 8, 4), "D0": (5, 0, 4), "F0": (5, 8, 0)}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dims", list(LAYER_DIMS))
def test_moe_ffn(impl, dims):
    t, d, f = LAYER_DIMS[dims]
    k = keys(3, 5)
    args = (randn(k[0], (t, d)), randn(k[1], (t, 4)), randn(k[2], (4, d, f)), randn(k[3], (4, d, f)),
            randn(k[4], (4, f, d)))
    for fused in (False, True):
        _check_op(lambda *a: moe_ops.moe_ffn(*a, top_k=2, implementation=impl, fused=fused), args, (t, d),
                  f"{impl} moe_ffn fused={fused} {dims}")
    assert moe_ops.reference.moe_ffn_dense(*args, top_k=2).shape == (t, d)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dims", list(LAYER_DIMS))
def test_moe_ffn_with_biases(impl, dims):
    """With the three expert biases a zero D or F still leaves a non-zero layer (the biases alone): forward and the
    eight gradients against the dense reference, fused (its b_down TGMM included) and unfused; T = 0 gives zeros."""
    t, d, f = LAYER_DIMS[dims]
    k = keys(4, 9)
    args = (randn(k[0], (t, d)), randn(k[1], (t, 4)), randn(k[2], (4, d, f)), randn(k[3], (4, d, f)),
            randn(k[4], (4, f, d)), randn(k[5], (4, f)), randn(k[6], (4, f)), randn(k[7], (4, d)))
    probe = randn(k[8], (t, d))

    def layer(fn, **kw):
        return lambda *a: fn(*a[:5], top_k=2, b_gate=a[5], b_up=a[6], b_down=a[7], **kw)
    want = layer(moe_ops.reference.moe_ffn_dense)
    want_grads = jax.grad(lambda *a: jnp.sum(want(*a) * probe), tuple(range(8)))(*args)
    for fused in (False, True):
        ours = layer(moe_ops.moe_ffn, implementation=impl, fused=fused)
        np.testing.assert_allclose(jax.jit(ours)(*args), want(*args), atol=1e-5, rtol=1e-5)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * probe), tuple(range(8))))(*args)
        for i, (g, w) in enumerate(zip(grads, want_grads)):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"fused={fused} d(arg {i})")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("rows,num_local", [(0, 4), (6, 0)])
def test_experts_ffn_with_biases_and_no_rows_or_no_local_group(impl, rows, num_local):
    """``experts_ffn`` on M = 0 sorted rows, or on a shard with no local expert, with all three biases: zeros and
    zero gradients (the bias rows' grouped matmul is not called with a zero-size dimension)."""
    k = keys(5, 7)
    d, f = 8, 5
    args = (randn(k[0], (rows, d)), randn(k[1], (num_local, d, f)), randn(k[2], (num_local, d, f)),
            randn(k[3], (num_local, f, d)), randn(k[4], (num_local, f)), randn(k[5], (num_local, f)),
            randn(k[6], (num_local, d)))
    sizes = jnp.array([rows // 2, 0, rows - rows // 2, 0], jnp.int32)
    _check_op(lambda x, *p: moe_ops.experts_ffn(x, sizes, *p[:3], b_gate=p[3], b_up=p[4], b_down=p[5],
                                                group_offset=4 if num_local == 0 else None, implementation=impl),
              args, (rows, d), f"{impl} experts_ffn M={rows} G_local={num_local}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_vmap_over_zero_examples(impl):
    """``jax.vmap`` of every public op over a batch of zero examples: outputs [0, *one example's shape] and
    [0, ...] gradients, with no kernel launched (Pallas's batching rule and the Triton folds once indexed example
    0 or divided by the batch: TypeError / ZeroDivisionError)."""
    for name, (op, args) in public_op_cases(impl).items():
        empty = [jnp.zeros((0, *a.shape), a.dtype) for a in args]
        want = jax.eval_shape(op, *args)
        out, grads = jax.jit(value_and_grads, static_argnums=0)(jax.vmap(op), empty)
        for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
            assert o.shape == (0, *w.shape) and o.dtype == w.dtype, f"{impl} {name}: {o.shape} {o.dtype}"
        floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
        assert [g.shape for g in grads] == [empty[i].shape for i in floats], f"{impl} {name} gradients"


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dims", ["M0", "N0", "G0"])
def test_ragged_contraction_with_per_index_group_sizes(impl, dims):
    """``ragged_dot_general`` with a ragged contracting dim whose group sizes differ along an outer contracting dim
    (one TGMM per index, summed), on an empty result: lax's zeros, zero gradients (the sum reshaped with -1 and
    raised ZeroDivisionError)."""
    m, n, g = {"M0": (0, 3, 2), "N0": (4, 0, 2), "G0": (4, 3, 0)}[dims]
    ks = keys(12, 3)
    lhs, rhs = randn(ks[0], (2, 6, m)), randn(ks[1], (2, 6, n))
    sizes = jax.random.randint(ks[2], (2, g), 0, 4)
    dims_ = dict(dot_dimension_numbers=(([0, 1], [0, 1]), ([], [])), lhs_ragged_dimensions=[1],
                 rhs_group_dimensions=[])
    want = jax.lax.ragged_dot_general(lhs, rhs, sizes, jax.lax.RaggedDotDimensionNumbers(**dims_))
    ours = lambda a, b: moe_ops.ragged_dot_general(a, b, sizes, moe_ops.RaggedDotDimensionNumbers(**dims_),
                                                   implementation=impl)
    assert want.shape == (g, m, n)
    _check_op(ours, (lhs, rhs), want.shape, f"{impl} ragged contraction {dims}")


def test_top_k_zero_is_a_named_error():
    x, logits, w = jnp.ones((5, 8)), jnp.ones((5, 4)), jnp.ones((4, 8, 8))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E=4\], got 0"):
        moe_ops.moe_ffn(x, logits, w, w, w, top_k=0)
    with pytest.raises(ValueError, match=r"num_experts must be a static int in \[1, 2\*\*31 - 1\) .*got 0"):
        moe_ops.permute(x, jnp.zeros((5, 2), jnp.int32), 0)
