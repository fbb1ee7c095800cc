"""Adversarial inputs on every public op: each gets a named ``ValueError`` / ``TypeError`` at trace time or the
documented semantics (``moe_ops.validation``), checked against ``moe_ops.reference``; never a crash deep inside a
kernel or a silently wrong answer. Tiny shapes; xla and triton (interpreter) everywhere, pallas (interpret) where
cheap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import assert_close, keys, randn

T, D, F, E, TOPK = 12, 8, 16, 4, 2
_k = keys(31, 6)
X = randn(_k[0], (T, D))
LOGITS = randn(_k[1], (T, E))
WG, WU = randn(_k[2], (E, D, F), scale=0.3), randn(_k[3], (E, D, F), scale=0.3)
WD = randn(_k[4], (E, F, D), scale=0.3)
W, IDS = R.route(LOGITS, TOPK)
XS, SIZES, SIDX = R.permute(X, IDS, E)
H = randn(_k[5], (T * TOPK, F))
IMPLS = ["xla", "triton"]


def _ffn_ref(x=X, ids=IDS, weights=W, wg=WG, wu=WU, wd=WD):
    xs, sizes, sidx = R.permute(x, ids, wg.shape[0])
    h = R.activate(R.gmm(xs, wg, sizes), R.gmm(xs, wu, sizes), "silu")
    return R.unpermute(R.gmm(h, wd, sizes), sidx, weights)


# every public op, called with operands that tests below replace by numpy arrays / ShapeDtypeStructs
OPS = {
    "gmm": (lambda a, i: moe_ops.gmm(a[0], a[1], a[2], implementation=i), (XS, WG, SIZES),
            lambda: R.gmm(XS, WG, SIZES)),
    "tgmm": (lambda a, i: moe_ops.tgmm(a[0], a[1], a[2], implementation=i), (XS, H, SIZES),
             lambda: R.tgmm(XS, H, SIZES)),
    "ragged_dot": (lambda a, i: moe_ops.ragged_dot(a[0], a[1], a[2], implementation=i), (XS, WG, SIZES),
                   lambda: R.gmm(XS, WG, SIZES)),
    "sort_by_expert": (lambda a, i: moe_ops.sort_by_expert(a[0], E, implementation=i), (IDS,),
                       lambda: R.sort_by_expert(IDS, E)),
    "permute": (lambda a, i: moe_ops.permute(a[0], a[1], E, implementation=i), (X, IDS), lambda: R.permute(X, IDS, E)),
    "unpermute": (lambda a, i: moe_ops.unpermute(a[0], a[1], a[2], implementation=i), (XS, SIDX, W),
                  lambda: R.unpermute(XS, SIDX, W)),
    "route": (lambda a, i: moe_ops.route(a[0], TOPK), (LOGITS,), lambda: R.route(LOGITS, TOPK)),
    "gather_gmm": (lambda a, i: moe_ops.gather_gmm(a[0], a[1], a[2], a[3], implementation=i), (X, WG, SIZES, SIDX),
                   lambda: R.gmm(XS, WG, SIZES)),
    "scatter_gmm": (lambda a, i: moe_ops.scatter_gmm(*a, implementation=i), (H, WD, SIZES, SIDX, W),
                    lambda: R.unpermute(R.gmm(H, WD, SIZES), SIDX, W)),
    "swiglu_gmm": (lambda a, i: moe_ops.swiglu_gmm(*a, implementation=i), (X, WG, WU, SIZES, SIDX),
                   lambda: R.activate(R.gmm(XS, WG, SIZES), R.gmm(XS, WU, SIZES), "silu")),
    "swiglu_ffn": (lambda a, i: moe_ops.swiglu_ffn(*a, implementation=i), (X, WG, WU, WD, SIZES, SIDX, W), _ffn_ref),
    "experts_ffn": (lambda a, i: moe_ops.experts_ffn(*a, implementation=i), (XS, SIZES, WG, WU, WD),
                    lambda: R.gmm(R.activate(R.gmm(XS, WG, SIZES), R.gmm(XS, WU, SIZES), "silu"), WD, SIZES)),
    "fused_experts_ffn": (lambda a, i: moe_ops.fused_experts_ffn(*a, implementation=i), (X, W, IDS, WG, WU, WD),
                          _ffn_ref),
    "moe_ffn": (lambda a, i: moe_ops.moe_ffn(*a, top_k=TOPK, implementation=i), (X, LOGITS, WG, WU, WD),
                lambda: R.moe_ffn_dense(X, LOGITS, WG, WU, WD, top_k=TOPK)),
}


# public ops whose kernels another op in OPS already reaches with the same operands
KERNEL_ALIASES = {"route", "ragged_dot", "experts_ffn", "fused_experts_ffn", "swiglu_gmm"}


def _close(got, want, tol=1e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jnp.issubdtype(b.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)
        else:
            assert_close(a, b, tol)


@pytest.mark.slow   # the sweep takes about 13 s on 2 cores (one interpreter compile per op)
@pytest.mark.parametrize("op,impl", [(op, "triton") for op in sorted(set(OPS) - KERNEL_ALIASES)]
                         + [(op, "pallas") for op in ("gmm", "permute")])
def test_numpy_operands(op, impl):
    """Failed before the fix on triton / pallas: a NumPy operand reached the kernel dispatch as a static argument
    (``TypeError: unhashable type``); now every op takes NumPy arrays as jnp does (one op per kernel entry point:
    ``KERNEL_ALIASES`` reach the same kernels through another public op listed here)."""
    fn, args, ref = OPS[op]
    _close(fn(tuple(np.asarray(a) for a in args), impl), ref())


def _float64(a):
    return np.asarray(a, np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else np.asarray(a)


@pytest.mark.parametrize("op", sorted(OPS))
def test_numpy_float64_operands_enter_as_float32(op):
    """Failed before the fix: NumPy float64 operands (``np.random.randn``'s) raised 'must be float32' where
    ``jnp.dot``, ``lax.ragged_dot`` and megablox take them as float32 (x64 off). Now the same result, bit for bit,
    as from the float32 operands."""
    fn, args, _ = OPS[op]
    want = fn(args, None)
    got = fn(tuple(_float64(a) for a in args), None)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_float64_under_x64_is_refused_by_name():
    """With x64 on, float64 is a real dtype that no kernel takes: a named error, NumPy or jax operand alike."""
    with jax.enable_x64(True):
        for lhs in (np.asarray(XS, np.float64), jnp.asarray(XS, jnp.float64)):
            with pytest.raises(TypeError, match="lhs must be float32, bfloat16 or float16, got float64"):
                moe_ops.gmm(lhs, WG, SIZES)
        with pytest.raises(TypeError, match="router_logits must be float32, bfloat16 or float16, got float64"):
            moe_ops.moe_ffn(X, np.asarray(LOGITS, np.float64), WG, WU, WD, top_k=TOPK)


@pytest.mark.parametrize("op", sorted(OPS))
def test_eval_shape_with_shape_dtype_structs(op):
    """Every op traces from abstract operands (no host sync, no concrete value needed), with the reference's
    shapes and dtypes, on the backend chosen per lowering platform."""
    fn, args, ref = OPS[op]
    got = jax.eval_shape(lambda *a: fn(a, None), *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    want = jax.eval_shape(ref)
    assert [(g.shape, g.dtype) for g in jax.tree.leaves(got)] == [(w.shape, w.dtype) for w in jax.tree.leaves(want)]


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_float_dtypes_multiply_in_the_promoted_dtype(impl):
    """Failed before the fix: gmm / tgmm / gather_gmm / scatter_gmm rounded a f32 rhs to a bf16 lhs's dtype (lax.dot
    and megablox multiply bf16 x f32 in f32; so does ``reference``). Output dtype: preferred, else lhs's."""
    xb, hb = XS.astype(jnp.bfloat16), H.astype(jnp.bfloat16)
    kw = dict(preferred_element_type=jnp.float32, implementation=impl)
    f32 = dict(preferred_element_type=jnp.float32)
    assert_close(moe_ops.gmm(xb, WG, SIZES, **kw), R.gmm(xb, WG, SIZES, **f32), 1e-6, "gmm")
    assert_close(moe_ops.tgmm(xb, H, SIZES, **kw), R.tgmm(xb, H, SIZES, **f32), 1e-6, "tgmm")
    assert_close(moe_ops.gather_gmm(X.astype(jnp.bfloat16), WG, SIZES, SIDX, **kw), R.gmm(xb, WG, SIZES, **f32), 1e-6)
    assert_close(moe_ops.scatter_gmm(hb, WD, SIZES, SIDX, W, **kw),
                 R.unpermute(R.gmm(hb, WD, SIZES, **f32), SIDX, W), 1e-6)
    assert moe_ops.gmm(xb, WG, SIZES, implementation=impl).dtype == jnp.bfloat16
    grads = jax.grad(lambda a, b: moe_ops.gmm(a, b, SIZES, **kw).sum(), (0, 1))(xb, WG)
    assert (grads[0].dtype, grads[1].dtype) == (jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_swiglu_ffn_validates_its_group_sizes_and_x(impl):
    """Failed before the fix: swiglu_ffn took float or too-short group_sizes silently, crashed on 2-D ones, and on
    triton returned a [3, D] result for a rank-3 x (also through fused_experts_ffn)."""
    call = lambda x=X, gs=SIZES, sidx=SIDX, w=W: moe_ops.swiglu_ffn(x, WG, WU, WD, gs, sidx, w, implementation=impl)
    with pytest.raises(TypeError, match="group_sizes must be an integer array"):
        call(gs=SIZES.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"group_sizes must have rank 1"):
        call(gs=SIZES[None])
    with pytest.raises(ValueError, match=r"w_gate has 4 groups but group_sizes has only 2"):
        call(gs=SIZES[:2])
    with pytest.raises(ValueError, match=r"x must have rank 2, got shape \(3, 4, 8\)"):
        call(x=X.reshape(3, 4, D), sidx=SIDX[:6], w=W[:3])
    with pytest.raises(ValueError, match=r"x must have rank 2"):
        moe_ops.fused_experts_ffn(X.reshape(3, 4, D), W[:3], IDS[:3], WG, WU, WD, implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_experts_ffn_names_weights_and_expert_ids(impl):
    call = lambda w=W, ids=IDS: moe_ops.fused_experts_ffn(X, w, ids, WG, WU, WD, implementation=impl)
    with pytest.raises(ValueError, match=r"weights and expert_ids must both be \[T, k\] with T=12"):
        call(w=W[:, :1])
    with pytest.raises(ValueError, match=r"weights and expert_ids must both be \[T, k\] with T=12"):
        call(ids=IDS[:5], w=W[:5])
    with pytest.raises(ValueError, match=r"weights must have rank 2"):
        call(w=W.reshape(-1))
    with pytest.raises(TypeError, match=r"expert_ids must be an integer array"):
        call(ids=IDS.astype(jnp.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_expert_ids_are_dropped_not_wrapped(impl):
    """Failed before the fix: with x64 on, an int64 id 2**32 + 1 was narrowed to 1 and routed to expert 1 (in the
    reference too); ids outside [0, E) are dropped whatever their width."""
    with jax.enable_x64(True):
        ids = jnp.array([[2**32 + 1, 0], [3, -(2**40)], [2**33, 2]], jnp.int64)
        sizes, _ = moe_ops.sort_by_expert(ids, E, implementation=impl)
        np.testing.assert_array_equal(sizes, [1, 0, 1, 1])
        np.testing.assert_array_equal(R.sort_by_expert(ids, E)[0], [1, 0, 1, 1])
        _, sizes, sort_idx = moe_ops.permute(X[:3], ids, E, implementation=impl)
        np.testing.assert_array_equal(sizes, [1, 0, 1, 1])
        assert sorted(np.asarray(sort_idx[3:]).tolist()) == [0, 3, 4]     # the dropped copies sort last
        y = moe_ops.gmm(randn(keys(41, 1)[0], (6, D)), WG, sizes, implementation=impl)
        assert not np.asarray(y[3:]).any()                                # and get no expert
        uids = jnp.array([[2**31 + 1, 0], [2**32 - 3, 3]], jnp.uint32)
        np.testing.assert_array_equal(moe_ops.sort_by_expert(uids, E, implementation=impl)[0], [1, 0, 0, 1])


def test_static_sizes_take_numpy_ints_and_reject_bools():
    """top_k / num_experts / num_groups: NumPy integers work like ints (failed before: 'must be an int'); a bool is
    a mistake, not 1 (before: top_k=True and num_groups=True ran as 1)."""
    _close(moe_ops.route(LOGITS, np.int64(2)), R.route(LOGITS, 2))
    _close(moe_ops.sort_by_expert(IDS, np.int32(E)), R.sort_by_expert(IDS, E))
    _close(moe_ops.moe_ffn(X, LOGITS, WG, WU, WD, top_k=np.int64(2)), R.moe_ffn_dense(X, LOGITS, WG, WU, WD, top_k=2))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E=4\], got True"):
        moe_ops.route(LOGITS, True)
    with pytest.raises(ValueError, match=r"num_experts must be a static int in \[1, 2\*\*31 - 1\)"):
        moe_ops.sort_by_expert(IDS, True)
    with pytest.raises(ValueError, match=r"num_experts must be a static int .*, got 1000000000000"):
        moe_ops.permute(X, IDS, 10**12)  # failed before: JAX's OverflowError from inside the sort
    with pytest.raises(ValueError, match="num_groups must be a static int"):
        moe_ops.tgmm(XS, H, SIZES, num_groups=True)


@pytest.mark.parametrize("call,err,match", [
    (lambda: moe_ops.gmm(XS.tolist(), WG, SIZES), TypeError, "lhs must be an array, got list"),
    (lambda: moe_ops.gmm(XS.astype(jnp.int32), WG, SIZES), TypeError, "lhs must be float32, bfloat16 or float16"),
    (lambda: moe_ops.gmm(XS, WG, SIZES > 2), TypeError, "group_sizes must be an integer array, got bool"),
    (lambda: moe_ops.gmm(XS, WG, jnp.int32(3)), ValueError, r"group_sizes must have rank 1, got shape \(\)"),
    (lambda: moe_ops.gmm(XS, WG, SIZES, group_offset=jnp.array([1, 2])), TypeError, "group_offset must be"),
    (lambda: moe_ops.gmm(XS, WG, SIZES, preferred_element_type=3), TypeError,
     "preferred_element_type must be None or a dtype .*, got 3"),
    (lambda: moe_ops.tgmm(XS, H[:5], SIZES), ValueError, "must share M"),
    (lambda: moe_ops.ragged_dot(XS, WG, SIZES[:3]), TypeError, "group dimension size"),
    (lambda: moe_ops.ragged_dot(XS, WG, SIZES.astype(jnp.float32)), TypeError,
     "group_sizes must be an integer array, got float32$"),
    (lambda: moe_ops.ragged_dot(XS, WG, SIZES.tolist()), TypeError, "group_sizes must be an integer array, got list"),
    (lambda: moe_ops.route(LOGITS, E + 1), ValueError, r"top_k must be an int in \[1, E=4\], got 5"),
    (lambda: moe_ops.route(LOGITS.astype(jnp.int32), 2), TypeError, "logits must be float32"),
    (lambda: moe_ops.sort_by_expert(IDS[:, 0], E), ValueError, r"expert_ids must have rank 2"),
    (lambda: moe_ops.permute(X, IDS, E, n_valid=3.0), TypeError, "n_valid must be None or an integer"),
    (lambda: moe_ops.unpermute(XS, SIDX.astype(jnp.float32), W), TypeError, "sort_idx must be an integer array"),
    (lambda: moe_ops.unpermute(XS, SIDX, W.astype(jnp.int32)), TypeError, "weights must be float32"),
    (lambda: moe_ops.gather_gmm(X, WG, SIZES, jnp.arange(T * TOPK + 1)), ValueError, "multiple of T=12"),
    (lambda: moe_ops.scatter_gmm(H, WD, SIZES, SIDX, jnp.ones((T, TOPK + 1))), ValueError, "disagree"),
    (lambda: moe_ops.scatter_gmm(H, WD, SIZES, SIDX.tolist(), W), TypeError, "sort_idx must be an integer array"),
    (lambda: moe_ops.gather_gmm(X[None], WG, SIZES, SIDX), ValueError, "x must have rank 2"),
    (lambda: moe_ops.gather_gmm(X, WD, SIZES, SIDX), ValueError, r"rhs must be \[G_local, K, N\] with K=\d+ \(x is"),
    (lambda: moe_ops.scatter_gmm(H[None], WD, SIZES, SIDX, W), ValueError, "h must have rank 2"),
    (lambda: moe_ops.swiglu_gmm(X, WD, WD, SIZES, SIDX), ValueError,
     r"w_gate must be \[G_local, K, N\] with K=\d+ \(x"),
    (lambda: moe_ops.swiglu_gmm(X, WG, WU[:, :, :4], SIZES, SIDX), ValueError, "w_up must have w_gate's shape"),
    (lambda: moe_ops.swiglu_gmm(X, WG, WU, SIZES, SIDX, activation="tanh"), ValueError, "activation must be one of"),
    (lambda: moe_ops.experts_ffn(XS, SIZES.astype(jnp.float32), WG, WU, WD), TypeError, "group_sizes must be an int"),
    (lambda: moe_ops.moe_ffn(X, LOGITS, WG, WU, WD, top_k=E + 1), ValueError, "top_k must be an int in"),
    (lambda: moe_ops.moe_ffn(X, LOGITS.astype(jnp.int32), WG, WU, WD, top_k=2), TypeError, "router_logits must be"),
])
def test_bad_arguments_raise_named_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


SEMANTICS = [
    ([5, -3, 9, 6], None, 4),                  # negative counts as zero
    ([10, 10, 10, 10], None, 4),               # sum > M truncates
    ([0, 24, 0, 0], None, 4),                  # all rows in one group
    ([5, 0, 9, 6], 1, 2),                      # python int offset, local shard
    ([5, 0, 9, 6], jnp.array(3, jnp.uint8), 2),  # offset whose shard runs past G
    ([5, 0, 9, 6], -1, 2),                     # out of range: no local group
    ([5, 0, 9, 6], jnp.array([255], jnp.uint8), 2)]


@pytest.mark.slow   # the sweep takes about 8 s on 2 cores
@pytest.mark.parametrize("impl,sizes,offset,num_local", [("triton", *c) for c in SEMANTICS]   # xla: test_overflow
                         + [("pallas", *SEMANTICS[i]) for i in (1, 4, 5)])
def test_defined_semantics_match_reference(impl, sizes, offset, num_local):
    sizes = jnp.array(sizes, jnp.int32)
    got = moe_ops.gmm(XS, WG[:num_local], sizes, group_offset=offset, implementation=impl)
    ref_offset = None if offset is None else jnp.asarray(offset).reshape(1).astype(jnp.int32)
    if offset is not None and not 0 <= int(jnp.asarray(offset).reshape(())) < 4:
        ref_offset = jnp.array([4], jnp.int32)     # the reference's "no local group"
    assert_close(got, R.gmm(XS, WG[:num_local], jnp.clip(sizes, 0), group_offset=ref_offset), 1e-5)
    if impl != "pallas":
        t = moe_ops.tgmm(XS, H, sizes, group_offset=offset, num_groups=num_local, implementation=impl)
        assert_close(t, R.tgmm(XS, H, jnp.clip(sizes, 0), group_offset=ref_offset, num_groups=num_local), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_degenerate_layers(impl):
    """E=1 (top_k=1) and top_k=E give the dense reference (a zero T: tests/test_degenerate.py)."""
    kw = dict(implementation=impl)
    _close(moe_ops.moe_ffn(X, LOGITS[:, :1], WG[:1], WU[:1], WD[:1], top_k=1, **kw),
           R.moe_ffn_dense(X, LOGITS[:, :1], WG[:1], WU[:1], WD[:1], top_k=1))
    if impl == "xla":   # top_k = E on triton: tests/test_moe_ffn.py's routings
        _close(moe_ops.moe_ffn(X, LOGITS, WG, WU, WD, top_k=E, **kw), R.moe_ffn_dense(X, LOGITS, WG, WU, WD, top_k=E))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_stay_in_their_rows(impl):
    """A NaN in one token reaches only that token's rows; an Inf in an expert no token uses reaches nothing; a NaN
    past sum(group_sizes) reaches no output row, no group of tgmm and no gradient."""
    kw = dict(implementation=impl)
    sizes = jnp.array([5, 0, 9, 3], jnp.int32)                    # rows 17.. are past the sum
    out = moe_ops.gmm(XS.at[6, 2].set(jnp.nan), WG, sizes, **kw)
    assert np.where(np.isnan(np.asarray(out)).any(1))[0].tolist() == [6]
    assert np.isfinite(np.asarray(moe_ops.gmm(XS, WG.at[1, 0, 0].set(jnp.inf), sizes, **kw))).all()
    past = XS.at[20, 0].set(jnp.nan)
    assert np.isfinite(np.asarray(moe_ops.gmm(past, WG, sizes, **kw))).all()
    assert np.isfinite(np.asarray(moe_ops.tgmm(past, H, sizes, **kw))).all()
    grads = jax.grad(lambda a, b: moe_ops.gmm(a, b, sizes, **kw).sum(), (0, 1))(past, WG)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    x_nan = X.at[3, 0].set(jnp.nan)
    y = moe_ops.moe_ffn(x_nan, LOGITS, WG, WU, WD, top_k=TOPK, **kw)
    assert np.where(np.isnan(np.asarray(y)).any(1))[0].tolist() == [3]
    unused = LOGITS.at[:, 3].set(-1e9)                             # no token picks expert 3, whose weights are NaN
    y, dx = jax.value_and_grad(lambda a: moe_ops.moe_ffn(a, unused, WG, WU, WD.at[3].set(jnp.nan), top_k=TOPK,
                                                         **kw).sum())(X)
    assert np.isfinite(float(y)) and np.isfinite(np.asarray(dx)).all()


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")  # XLA:CPU may not reuse them
@pytest.mark.parametrize("impl", IMPLS)
def test_jit_with_donated_buffers(impl):
    f = jax.jit(lambda a, b, e: moe_ops.gmm(a, b, SIZES, existing_out=e, implementation=impl), donate_argnums=(0, 2))
    ex = randn(keys(40, 1)[0], (T * TOPK, F))
    want = R.gmm(XS, WG, SIZES, existing_out=ex)
    assert_close(f(XS + 0, WG, ex + 0), want, 1e-5)
    g = jax.jit(lambda *a: moe_ops.moe_ffn(*a, top_k=TOPK, implementation=impl), donate_argnums=(0, 2, 3, 4))
    assert_close(g(X + 0, LOGITS, WG + 0, WU + 0, WD + 0), R.moe_ffn_dense(X, LOGITS, WG, WU, WD, top_k=TOPK), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_offsets_and_sizes(impl):
    got = jax.vmap(lambda o, s: moe_ops.gmm(XS, WG[:2], s, group_offset=o, implementation=impl))(
        jnp.array([0, 2, 7]), jnp.stack([SIZES, SIZES[::-1], SIZES]))
    want = [R.gmm(XS, WG[:2], s, group_offset=jnp.array([o])) for o, s in ((0, SIZES), (2, SIZES[::-1]), (4, SIZES))]
    assert_close(got, jnp.stack(want), 1e-5)


@pytest.mark.slow   # the sweep takes about 12 s on 2 cores
@pytest.mark.parametrize("impl,op", [("xla", op) for op in ("tgmm", "scatter_gmm", "swiglu_ffn", "moe_ffn")]
                         + [("triton", "scatter_gmm"), ("triton", "swiglu_ffn")])
def test_grad_wrt_every_float_input(impl, op):
    fn, args, _ = OPS[op]
    floats = [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]
    ref_fns = {"gmm": lambda a: R.gmm(*a), "tgmm": lambda a: R.tgmm(*a), "unpermute": lambda a: R.unpermute(*a),
               "gather_gmm": lambda a: R.gmm(R.permute(a[0], IDS, E)[0], a[1], a[2]),
               "scatter_gmm": lambda a: R.unpermute(R.gmm(a[0], a[1], a[2]), a[3], a[4]),
               "swiglu_ffn": lambda a: _ffn_ref(a[0], IDS, a[6], a[1], a[2], a[3]),
               "moe_ffn": lambda a: R.moe_ffn_dense(*a, top_k=TOPK)}

    def loss(f):
        def run(*fl):
            a = list(args)
            for i, v in zip(floats, fl):
                a[i] = v
            return jnp.sum(jnp.sin(f(tuple(a))))
        return run
    got = jax.grad(loss(lambda a: fn(a, impl)), tuple(range(len(floats))))(*(args[i] for i in floats))
    want = jax.grad(loss(ref_fns[op]), tuple(range(len(floats))))(*(args[i] for i in floats))
    for g, w in zip(got, want):
        assert_close(g, w, 1e-4, op)


@pytest.mark.parametrize("impl", ["xla"])   # the check lives in moe_ops.validation, before any backend
def test_checked_mode_rejects_a_sort_idx_that_is_not_a_permutation(impl):
    """Unchecked, a duplicated / out-of-range sort_idx gives unspecified rows (the Triton scatter leaves a slot
    unwritten: NaN in the interpreter); inside ``checked()`` every op that takes one raises instead (new check)."""
    bad = SIDX.at[3].set(SIDX[4])
    calls = {"unpermute": lambda s: moe_ops.unpermute(XS, s, W, implementation=impl),
             "gather_gmm": lambda s: moe_ops.gather_gmm(X, WG, SIZES, s, implementation=impl),
             "scatter_gmm": lambda s: moe_ops.scatter_gmm(H, WD, SIZES, s, W, implementation=impl),
             "swiglu_ffn": lambda s: moe_ops.swiglu_ffn(X, WG, WU, WD, SIZES, s, W, implementation=impl)}
    with moe_ops.checked():
        for name, call in calls.items():
            with pytest.raises(Exception, match=r"sort_idx must be a permutation of \[0, 24\).*1 duplicates"):
                jax.block_until_ready(jax.jit(call)(bad))
            _close(jax.jit(call)(SIDX), OPS[name][2]())


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_n_valid_saturates_instead_of_wrapping(impl):
    """Failed before the fix: n_valid = uint32 2**32 - 1 was narrowed to -1, so permute zeroed every row and unpermute
    dropped every copy; it now means "all rows", like any n_valid >= T*k."""
    big = jnp.array(2**32 - 1, jnp.uint32)
    xs, _, _ = moe_ops.permute(X, IDS, E, n_valid=big, implementation=impl)
    _close(xs, XS)
    _close(moe_ops.unpermute(XS, SIDX, W, n_valid=big, implementation=impl), R.unpermute(XS, SIDX, W))
    assert not np.asarray(moe_ops.permute(X, IDS, E, n_valid=-3, implementation=impl)[0]).any()


def test_adapter_and_route_argument_errors():
    from moe_ops.integrations import maxtext  # noqa: PLC0415
    with pytest.raises(ValueError, match=r"megablox.tgmm's \[k, m\] and rhs \[m, n\] with the same m, got lhs "
                                         r"\(24, 8\), rhs \(24, 16\)"):
        maxtext.tgmm(XS, H, SIZES)                       # lhs given as [m, k]: megablox's layout is [k, m]
    with pytest.raises(TypeError, match=r"bias must be None or an array of shape \[E\]=\(4,\), got list"):
        moe_ops.route(LOGITS, 2, bias=[0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"num_actual_groups must be None or a static int in \[0, len"):
        maxtext.tgmm(XS.T, H, SIZES, num_actual_groups=5)
    with pytest.raises(ValueError, match=r"batch_size \* sequence_length = 5 \* 3 tokens, got weights \(12, 2\)"):
        maxtext.unpermute(XS, SIDX, W, 5, 3)


def test_switches_take_bools_only():
    """``fused`` / ``swiglu`` / ``recompute`` pick a code path: a string such as "no" is truthy and silently took the
    fused path before; now every non-bool is a named TypeError (None where it means "the backend's default")."""
    with pytest.raises(TypeError, match=r"fused must be None, True or False, got 'no'"):
        moe_ops.moe_ffn(X, LOGITS, WG, WU, WD, top_k=TOPK, implementation="xla", fused="no")
    with pytest.raises(TypeError, match=r"swiglu must be None, True or False, got 1"):
        moe_ops.fused_experts_ffn(X, W, IDS, WG, WU, WD, implementation="xla", swiglu=1)
    with pytest.raises(TypeError, match=r"recompute must be True or False, got None"):
        moe_ops.fused_experts_ffn(X, W, IDS, WG, WU, WD, implementation="xla", recompute=None)
    with pytest.raises(TypeError, match=r"recompute must be True or False, got 'yes'"):
        moe_ops.swiglu_ffn(X, WG, WU, WD, SIZES, SIDX, W, implementation="xla", recompute="yes")
    out = moe_ops.moe_ffn(X, LOGITS, WG, WU, WD, top_k=TOPK, implementation="xla", fused=np.bool_(False))
    assert_close(out, _ffn_ref(), 1e-5, "fused=np.bool_(False)")
