"""Forward mode and transposition (``jax.jvp``, ``jax.linearize``, ``jax.linear_transpose``, ``jax.hessian``,
forward-over-reverse Hessian-vector products) of the primitive-backed ops (``moe_ops.primitives``): ``gmm``, ``tgmm``,
``ragged_dot``, ``permute``, ``unpermute`` and ``moe_ffn(fused=False)``, against the same transformation of the
pure-jnp reference twins (or of ``lax.ragged_dot``) on fresh random data, with uneven and empty groups and a group
sum below M. Also the nestings with ``vmap`` (a shared rhs, which the batching rule keeps unbatched) and with a
``shard_map`` under ``check_vma``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import TOL, assert_close, group_sizes, keys, randn

M, K, N, G = 20, 12, 10, 4
IMPLS = ["xla", "triton", "pallas"]
SLOW_IMPLS = ["xla", pytest.param("triton", marks=pytest.mark.slow), pytest.param("pallas", marks=pytest.mark.slow)]


def _operands(seed, transpose_rhs=False):
    k = keys(seed, 4)
    rhs_shape = (G, N, K) if transpose_rhs else (G, K, N)
    sizes = group_sizes("sum_below_m", G, M, seed=seed).at[1].set(0)  # uneven, one empty group, sum below M
    return (randn(k[0], (M, K)), randn(k[1], rhs_shape), sizes), (randn(k[2], (M, K)), randn(k[3], rhs_shape))


def _jvp_pair(ours, ref, primals, tangents):
    out, tan = jax.jit(lambda p, t: jax.jvp(ours, p, t))(primals, tangents)
    want_out, want_tan = jax.jvp(ref, primals, tangents)
    return (out, want_out), (tan, want_tan)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_jvp_and_linear_transpose(impl, transpose_rhs):
    (lhs, rhs, sizes), tangents = _operands(1, transpose_rhs)
    ours = lambda a, b: moe_ops.gmm(a, b, sizes, transpose_rhs=transpose_rhs, implementation=impl)
    ref = lambda a, b: R.gmm(a, b, sizes, transpose_rhs=transpose_rhs)
    for got, want in _jvp_pair(ours, ref, (lhs, rhs), tangents):
        assert_close(got, want, TOL[jnp.float32], "gmm jvp")
    ct = randn(keys(9, 1)[0], (M, N))
    got = jax.jit(lambda c: jax.linear_transpose(lambda b: ours(lhs, b), rhs)(c))(ct)[0]
    want = jax.linear_transpose(lambda b: ref(lhs, b), rhs)(ct)[0]
    assert_close(got, want, TOL[jnp.float32], "linear_transpose in rhs")


@pytest.mark.parametrize("impl", SLOW_IMPLS)
def test_tgmm_jvp_with_group_offset(impl):
    (lhs, _, sizes), (t_lhs, _) = _operands(2)
    k = keys(3, 2)
    rhs, t_rhs = randn(k[0], (M, N)), randn(k[1], (M, N))
    offset = jnp.array([1], jnp.int32)
    ours = lambda a, b: moe_ops.tgmm(a, b, sizes, group_offset=offset, num_groups=2, implementation=impl)
    ref = lambda a, b: R.tgmm(a, b, sizes, group_offset=offset, num_groups=2)
    for got, want in _jvp_pair(ours, ref, (lhs, rhs), (t_lhs, t_rhs)):
        assert_close(got, want, TOL[jnp.float32], "tgmm jvp")


def test_hessian_and_jacfwd_of_gmm_loss():
    (lhs, rhs, sizes), _ = _operands(4)
    lhs = lhs[:, :3]
    rhs = rhs[:, :3]
    loss = lambda f: lambda a: jnp.sum(jnp.tanh(f(a, rhs, sizes)))
    ours = loss(lambda a, b, s: moe_ops.gmm(a, b, s, implementation="xla"))
    ref = loss(R.gmm)
    assert_close(jax.jit(jax.hessian(ours))(lhs), jax.hessian(ref)(lhs), 1e-5, "hessian")
    assert_close(jax.jit(jax.jacfwd(jax.grad(ours)))(lhs), jax.jacrev(jax.grad(ref))(lhs), 1e-5, "jacfwd of grad")


def test_ragged_dot_jvp_matches_lax_in_all_three_modes():
    sizes = _operands(5)[0][2]
    modes = {  # ragged non-contracting (gmm), ragged contracting (tgmm), ragged batch
        "gmm": (moe_ops.RaggedDotDimensionNumbers((((1,), (1,)), ((), ())), (0,), (0,)), (M, K), (G, K, N)),
        "tgmm": (moe_ops.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), (0,), ()), (M, K), (M, N)),
        "batch": (moe_ops.RaggedDotDimensionNumbers((((2,), (1,)), ((0,), (0,))), (0,), ()), (M, 3, K), (M, K, N)),
    }
    for name, (dn, lhs_shape, rhs_shape) in modes.items():
        k = keys(6, 4)
        args = [randn(k[0], lhs_shape), randn(k[1], rhs_shape)]
        tans = [randn(k[2], lhs_shape), randn(k[3], rhs_shape)]
        ours = lambda a, b: moe_ops.ragged_dot_general(a, b, sizes, dn, implementation="xla")
        ref = lambda a, b: jax.lax.ragged_dot_general(a, b, sizes, dn, precision=jax.lax.Precision.HIGHEST)
        (out, want_out), (tan, want_tan) = _jvp_pair(ours, ref, tuple(args), tuple(tans))
        if name == "gmm":  # lax leaves rows past sum(group_sizes) unspecified: compare the covered rows only
            rows = int(sizes.sum())
            out, want_out, tan, want_tan = out[:rows], want_out[:rows], tan[:rows], want_tan[:rows]
        assert_close(out, want_out, TOL[jnp.float32], f"{name} forward")
        assert_close(tan, want_tan, TOL[jnp.float32], f"{name} tangent")


@pytest.mark.parametrize("impl", SLOW_IMPLS)
def test_jvp_of_vmap_with_a_shared_rhs_and_vmap_of_jvp(impl):
    (lhs, rhs, sizes), (t_lhs, t_rhs) = _operands(7)
    lhs2, t_lhs2 = jnp.stack([lhs, -2 * lhs]), jnp.stack([t_lhs, 0.5 * t_lhs])
    sizes2 = jnp.stack([sizes, jnp.roll(sizes, 1)])
    ours = jax.vmap(lambda a, b, s: moe_ops.gmm(a, b, s, implementation=impl), (0, None, 0))
    ref = jax.vmap(lambda a, b, s: R.gmm(a, b, s), (0, None, 0))
    got = jax.jit(lambda: jax.jvp(lambda a, b: ours(a, b, sizes2), (lhs2, rhs), (t_lhs2, t_rhs)))()
    want = jax.jvp(lambda a, b: ref(a, b, sizes2), (lhs2, rhs), (t_lhs2, t_rhs))
    assert_close(got[1], want[1], TOL[jnp.float32], "jvp(vmap)")
    per_example = jax.jit(jax.vmap(lambda a, t, s: jax.jvp(lambda x: moe_ops.gmm(x, rhs, s, implementation=impl),
                                                           (a,), (t,))[1]))(lhs2, t_lhs2, sizes2)
    assert_close(per_example, want[1] - ref(lhs2, t_rhs, sizes2), TOL[jnp.float32], "vmap(jvp)")


@pytest.mark.parametrize("impl", SLOW_IMPLS)
def test_permute_unpermute_jvp_and_linear_transpose(impl):
    t, d, e, k = 9, 6, 4, 2
    ks = keys(8, 5)
    x, t_x = randn(ks[0], (t, d)), randn(ks[1], (t, d))
    ids = jax.random.randint(ks[2], (t, k), -1, e + 1)  # some copies dropped (ids outside [0, E))
    w, t_w = randn(ks[3], (t, k)), randn(ks[4], (t, k))

    def ours(x, w):
        y, _, s = moe_ops.permute(x, ids, e, implementation=impl)
        return moe_ops.unpermute(jnp.sin(y), s, w, implementation=impl)

    def ref(x, w):
        y, _, s = R.permute(x, ids, e)
        return R.unpermute(jnp.sin(y), s, w)
    for got, want in _jvp_pair(ours, ref, (x, w), (t_x, t_w)):
        assert_close(got, want, TOL[jnp.float32], "permute/unpermute jvp")
    ct = randn(keys(10, 1)[0], (t * k, d))
    got = jax.jit(jax.linear_transpose(lambda a: moe_ops.permute(a, ids, e, implementation=impl)[0], x))(ct)[0]
    want = jax.linear_transpose(lambda a: R.permute(a, ids, e)[0], x)(ct)[0]
    assert_close(got, want, TOL[jnp.float32], "linear_transpose of permute")


@pytest.mark.parametrize("impl", SLOW_IMPLS)
def test_moe_ffn_unfused_jvp_and_forward_over_reverse_hvp(impl):
    t, d, f, e, k = 10, 8, 6, 4, 2
    ks = keys(11, 10)
    args = (randn(ks[0], (t, d)), randn(ks[1], (t, e)), randn(ks[2], (e, d, f), scale=0.3),
            randn(ks[3], (e, d, f), scale=0.3), randn(ks[4], (e, f, d), scale=0.3))
    tans = tuple(randn(kk, a.shape) for kk, a in zip(ks[5:], args))
    ours = lambda *a: moe_ops.moe_ffn(*a, top_k=k, fused=False, implementation=impl)
    ref = lambda *a: R.moe_ffn_dense(*a, top_k=k)
    for got, want in _jvp_pair(ours, ref, args, tans):
        assert_close(got, want, TOL[jnp.float32], "moe_ffn jvp")
    hvp = lambda fn: jax.jvp(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 2, 4)), args, tans)[1]
    for i, (got, want) in enumerate(zip(jax.jit(lambda: hvp(ours))(), jax.jit(lambda: hvp(ref))())):
        assert_close(got, want, 1e-4, f"hvp of arg {i}")


def test_jvp_inside_shard_map_with_replicated_weights():
    (lhs, rhs, sizes), (t_lhs, t_rhs) = _operands(12)
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    lhs2, t_lhs2 = jnp.concatenate([lhs, lhs[::-1]]), jnp.concatenate([t_lhs, t_lhs[::-1]])
    sizes2 = jnp.concatenate([sizes, sizes[::-1]])

    def per_shard(a, b, s, ta, tb):
        return jax.jvp(lambda x, w: moe_ops.gmm(x, w, s, implementation="xla"), (a, b), (ta, tb))[1]
    f = jax.shard_map(per_shard, mesh=mesh, in_specs=(jax.P("d"), jax.P(), jax.P("d"), jax.P("d"), jax.P()),
                      out_specs=jax.P("d"))
    got = jax.jit(f)(lhs2, rhs, sizes2, t_lhs2, t_rhs)
    halves = [jax.jvp(lambda x, w: R.gmm(x, w, s), (a, rhs), (ta, t_rhs))[1]
              for a, s, ta in ((lhs, sizes, t_lhs), (lhs[::-1], sizes[::-1], t_lhs[::-1]))]
    assert_close(got, jnp.concatenate(halves), TOL[jnp.float32], "jvp in shard_map")
    assert np.isfinite(np.asarray(got)).all()


def test_fused_ops_still_name_their_limit():
    """The fused ops stay first-order custom VJPs: forward mode raises (it does not silently densify)."""
    t, d, f, e, k = 6, 8, 4, 2, 1
    ks = keys(13, 5)
    args = (randn(ks[0], (t, d)), randn(ks[1], (t, e)), randn(ks[2], (e, d, f)), randn(ks[3], (e, d, f)),
            randn(ks[4], (e, f, d)))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda *a: moe_ops.moe_ffn(*a, top_k=k, fused=True, implementation="xla"), args, args)


def test_second_order_of_a_fused_kernel_backward_names_the_way_out():
    """grad of grad through the fused ops' backward kernels: a clear error that points to fused=False (it used to
    name only an internal primitive)."""
    t, d, f, e, k = 6, 8, 4, 2, 1
    ks = keys(14, 5)
    args = (randn(ks[0], (t, d)), randn(ks[1], (t, e)), randn(ks[2], (e, d, f)), randn(ks[3], (e, d, f)),
            randn(ks[4], (e, f, d)))
    layer = lambda x: moe_ops.moe_ffn(x, *args[1:], top_k=k, fused=True, implementation="triton")
    with pytest.raises(NotImplementedError, match="fused=False"):
        jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(layer(y) ** 2))(x)))).lower(args[0])
