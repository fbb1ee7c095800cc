"""``jax.vmap`` over the public ops on every backend (XLA, Triton through the CPU bridge, Pallas in interpret mode),
against a per-batch Python loop of the reference twins: the forward, the gradient of the vmapped op
(``grad(vmap(f))``) and the vmapped per-example gradient (``vmap(grad(f))``), all under ``jit``.

The Triton backend batches by folding the batch into its kernels' ragged dimension (``kernels.triton.batching``);
the bridge poisons unwritten outputs (NaN), so a row that a folded launch misses fails ``rel_err``. Batches differ
in their group sizes (uneven with an empty group and a sum below M; one group taking every row), so a fold that
mixed batches up would show. Shapes are tiny and not multiples of the interpreter's tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import TOL, assert_close, group_sizes, keys, randn

IMPLS = ["xla", "triton", "pallas"]
B, M, K, N, G = 2, 20, 12, 10, 3
MODES = {  # name -> in_axes of (lhs, rhs, group_sizes)
    "batched_group_sizes": (None, None, 0),
    "batched_lhs_shared_rhs": (0, None, None),
    "all_batched": (0, 0, 0),
}


def _sizes(batched):
    """[B, G] (batch 0: uneven, an empty group, sum below M; batch 1: one group takes every row) or [G]."""
    sizes = jnp.stack([group_sizes("sum_below_m", G, M, seed=3).at[1].set(0), group_sizes("one_hot_group", G, M)])
    return sizes if batched else sizes[0]


def _replace(args, diff, values):
    args = list(args)
    for i, v in zip(diff, values):
        args[i] = v
    return args


def check_vmap(op, ref, args, in_axes, diff, tol, seed=0):
    """``op`` vmapped over ``in_axes`` (0 or None per arg) against a loop of ``ref`` over the batch: outputs, VJP of
    the vmapped op (shared args' cotangents summed over the batch) and vmap of the per-example VJP. ``diff`` are the
    indices of the differentiable args. ``op`` / ``ref`` return one array. One jit for ours, one for the loop."""
    def per_example_vjp(fn, ex, cot):
        out, vjp = jax.vjp(lambda *d: fn(*_replace(ex, diff, d)), *[ex[i] for i in diff])
        return out, vjp(cot.astype(out.dtype))

    @jax.jit
    def expected(args, cot):
        per = [per_example_vjp(ref, [a[b] if ax == 0 else a for a, ax in zip(args, in_axes)], cot[b])
               for b in range(B)]
        return jnp.stack([p[0] for p in per]), [jnp.stack([p[1][j] for p in per]) for j in range(len(diff))]

    @jax.jit
    def ours(args, cot):
        out, vjp = jax.vjp(lambda *d: jax.vmap(op, in_axes)(*_replace(args, diff, d)), *[args[i] for i in diff])
        pe = jax.vmap(lambda *a: per_example_vjp(op, list(a[:-1]), a[-1]), (*in_axes, 0))(*args, cot)
        return out, vjp(cot.astype(out.dtype)), pe

    out_shape = jax.eval_shape(lambda a: jax.vmap(ref, in_axes)(*a), args)
    cot = randn(keys(seed, 1)[0], out_shape.shape)
    want, want_pe = expected(args, cot)
    out, grads, (pe_out, pe_grads) = ours(args, cot)
    assert_close(out, want.astype(out.dtype), tol, "vmap forward")
    assert_close(pe_out, want.astype(out.dtype), tol, "vmap(vjp) forward")
    for j, i in enumerate(diff):
        want_grad = want_pe[j] if in_axes[i] == 0 else want_pe[j].sum(0)
        assert_close(grads[j], want_grad.astype(grads[j].dtype), tol, f"grad(vmap) of arg {i}")
        assert_close(pe_grads[j], want_pe[j].astype(pe_grads[j].dtype), tol, f"vmap(grad) of arg {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", [m if m == "all_batched" else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_gmm_vmap(impl, mode):
    ax_l, ax_r, ax_s = MODES[mode]
    kl, kr = keys(1, 2)
    lhs = randn(kl, (B, M, K) if ax_l == 0 else (M, K))
    rhs = randn(kr, (B, G, K, N) if ax_r == 0 else (G, K, N))
    op = lambda l, r, s: moe_ops.gmm(l, r, s, implementation=impl)
    check_vmap(op, R.gmm, (lhs, rhs, _sizes(ax_s == 0)), (ax_l, ax_r, ax_s), (0, 1), TOL[jnp.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_gmm_vmap_group_offset_transposed_bf16(impl):
    """Batched group offsets (local groups [0, 2) and [1, 3) of 3), transposed batched rhs, bf16."""
    kl, kr = keys(2, 2)
    lhs, rhs = randn(kl, (B, M, K), jnp.bfloat16), randn(kr, (B, G - 1, N, K), jnp.bfloat16)
    offsets = jnp.array([0, 1], jnp.int32)
    op = lambda l, r, s, o: moe_ops.gmm(l, r, s, group_offset=o, transpose_rhs=True, implementation=impl)
    ref = lambda l, r, s, o: R.gmm(l, r, s, group_offset=o, transpose_rhs=True)
    check_vmap(op, ref, (lhs, rhs, _sizes(True), offsets), (0, 0, 0, 0), (0, 1), TOL[jnp.bfloat16])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["batched_group_sizes", "all_batched"])
def test_tgmm_vmap(impl, mode):
    """tgmm(lhs [M,K], rhs [M,N]): the modes batch (lhs, rhs, group_sizes) as for gmm."""
    ax_l, ax_r, ax_s = MODES[mode]
    kl, kr = keys(3, 2)
    lhs = randn(kl, (B, M, K) if ax_l == 0 else (M, K))
    rhs = randn(kr, (B, M, N) if ax_r == 0 else (M, N))
    op = lambda l, r, s: moe_ops.tgmm(l, r, s, implementation=impl)
    check_vmap(op, R.tgmm, (lhs, rhs, _sizes(ax_s == 0)), (ax_l, ax_r, ax_s), (0, 1), TOL[jnp.float32])


T, TOP_K, E, D = 7, 2, 4, 12


def _ids(seed):
    """[B, T, k]: batch 0 uneven with dropped copies (ids -1 and E), batch 1 every copy to expert 2."""
    rng = np.random.default_rng(seed)
    uneven = rng.choice(np.arange(-1, E + 1), size=(T, TOP_K))
    return jnp.asarray(np.stack([uneven, np.full((T, TOP_K), 2)]), jnp.int32)


@pytest.mark.parametrize("impl", IMPLS)
def test_permute_unpermute_vmap(impl):
    """permute -> scale -> unpermute per batch, x / expert ids / weights batched; also checks the batched group
    sizes and sort_idx of sort_by_expert exactly."""
    kx, kw = keys(4, 2)
    x = randn(kx, (B, T, D))
    weights = randn(kw, (B, T, TOP_K))
    ids = _ids(5)
    sizes, sort_idx = jax.jit(jax.vmap(lambda i: moe_ops.sort_by_expert(i, E, implementation=impl)))(ids)
    for b in range(B):
        want_sizes, want_idx = R.sort_by_expert(ids[b], E)
        np.testing.assert_array_equal(sizes[b], want_sizes)
        np.testing.assert_array_equal(sort_idx[b], want_idx)

    def layer(permute, unpermute):
        def fn(x, ids, w):
            xs, _, idx = permute(x, ids)
            return unpermute(xs * 1.5, idx, w)
        return fn

    op = layer(lambda x, i: moe_ops.permute(x, i, E, implementation=impl),
               lambda y, idx, w: moe_ops.unpermute(y, idx, w, implementation=impl))
    ref = layer(lambda x, i: R.permute(x, i, E), R.unpermute)
    check_vmap(op, ref, (x, ids, weights), (0, 0, 0), (0, 2), TOL[jnp.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_permute_unpermute_vmap_batched_n_valid(impl):
    """Valid-prefix form with a different ``n_valid`` per batch and x shared by the batch: rows past n_valid are
    zero in permute's output and ignored (NaN there must not leak) by unpermute."""
    kx, kw = keys(6, 2)
    x, weights, ids = randn(kx, (T, D)), randn(kw, (B, T, TOP_K)), _ids(7)
    n_valid = jnp.array([5, T * TOP_K - 3], jnp.int32)

    def op(x, ids, w, nv):
        xs, _, idx = moe_ops.permute(x, ids, E, n_valid=nv, implementation=impl)
        rows = jnp.arange(xs.shape[0])[:, None]
        poisoned = jnp.where(rows < nv, xs, jnp.nan)  # unpermute must not read rows >= n_valid
        return jnp.concatenate([xs, moe_ops.unpermute(poisoned, idx, w, n_valid=nv, implementation=impl)])

    def ref(x, ids, w, nv):
        xs, _, idx = R.permute(x, ids, E)
        xs = jnp.where(jnp.arange(xs.shape[0])[:, None] < nv, xs, 0.0)
        return jnp.concatenate([xs, R.unpermute(xs, idx, w)])

    check_vmap(op, ref, (x, ids, weights, n_valid), (None, 0, 0, 0), (0, 2), TOL[jnp.float32])


@pytest.mark.parametrize("impl, shared_rhs", [("xla", False), ("triton", False), ("triton", True)])
def test_fused_vmap(impl, shared_rhs):
    """gather_gmm -> scatter_gmm (the fused layer's row maps) per batch against permute / gmm / unpermute twins."""
    kx, kr1, kr2, kw = keys(8, 4)
    x, weights, ids = randn(kx, (B, T, K)), randn(kw, (B, T, TOP_K)), _ids(9)
    shape = lambda *s: s if shared_rhs else (B, *s)
    r1, r2 = randn(kr1, shape(E, K, N)), randn(kr2, shape(E, N, D))

    def op(x, r1, r2, ids, w):
        sizes, idx = moe_ops.sort_by_expert(ids, E, implementation=impl)
        h = moe_ops.gather_gmm(x, r1, sizes, idx, implementation=impl)
        return moe_ops.scatter_gmm(h, r2, sizes, idx, w, implementation=impl)

    def ref(x, r1, r2, ids, w):
        xs, sizes, idx = R.permute(x, ids, E)
        return R.unpermute(R.gmm(R.gmm(xs, r1, sizes), r2, sizes), idx, w)

    rhs_ax = None if shared_rhs else 0
    check_vmap(op, ref, (x, r1, r2, ids, weights), (0, rhs_ax, rhs_ax, 0, 0), (0, 1, 2, 4), TOL[jnp.float32])


@pytest.mark.parametrize("impl", ["triton", pytest.param("pallas", marks=pytest.mark.slow)])
def test_moe_ffn_vmap(impl):
    """The routed layer end to end (fused by default on Triton, unfused on Pallas; the XLA backend runs the ops
    tested above), vmapped over a batch of token sets with shared
    expert weights, against the reference layer."""
    kx, kl, kg, ku, kd = keys(10, 5)
    f = 8
    x, logits = randn(kx, (B, T, D)), randn(kl, (B, T, E))
    wg, wu, wd = randn(kg, (E, D, f)), randn(ku, (E, D, f)), randn(kd, (E, f, D))
    op = lambda x, lg, a, b, c: moe_ops.moe_ffn(x, lg, a, b, c, top_k=TOP_K, implementation=impl)
    ref = lambda x, lg, a, b, c: R.moe_ffn(x, lg, a, b, c, top_k=TOP_K)
    check_vmap(op, ref, (x, logits, wg, wu, wd), (0, 0, None, None, None), (0, 1, 2, 3, 4), 1e-4)


def test_nested_vmap_triton():
    """Two vmapped axes: each Triton rule folds one axis and calls the folded launch again (forward only)."""
    kl, kr, kx = keys(11, 3)
    lhs, rhs = randn(kl, (2, B, M, K)), randn(kr, (G, K, N))
    sizes = jnp.stack([_sizes(True), _sizes(True)[::-1]])
    out = jax.jit(jax.vmap(jax.vmap(lambda l, s: moe_ops.gmm(l, rhs, s, implementation="triton"))))(lhs, sizes)
    ids, x = jnp.stack([_ids(12), _ids(13)]), randn(kx, (2, B, T, D))
    xs = jax.jit(jax.vmap(jax.vmap(lambda x, i: moe_ops.permute(x, i, E, implementation="triton")[0])))(x, ids)
    for a in range(2):
        for b in range(B):
            assert_close(out[a, b], R.gmm(lhs[a, b], rhs, sizes[a, b]), TOL[jnp.float32], f"gmm [{a},{b}]")
            assert_close(xs[a, b], R.permute(x[a, b], ids[a, b], E)[0], TOL[jnp.float32], f"permute [{a},{b}]")


def test_vmap_over_an_explicitly_sharded_batch():
    """vmap over an operand sharded on the vmapped axis (an Explicit-axes mesh, jax.make_mesh's default): unbatched
    operands (weights, group sizes, the routing) are not copied along the batch, and the result keeps the batch
    sharding. The first primitive batching rule broadcast them, and vmap then refused the mixed shardings."""
    b, m, k, n, g = 4, 16, 4, 3, 4
    ks = keys(42, 2)
    x, w = randn(ks[0], (b, m, k)), randn(ks[1], (g, k, n))
    sizes = jnp.array([5, 0, 6, 3], jnp.int32)
    ids = jax.random.randint(keys(43, 1)[0], (m, 2), 0, g)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        xb = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data")))
        out = jax.jit(jax.vmap(lambda a: moe_ops.gmm(a, w, sizes, implementation="xla")))(xb)
        assert out.sharding.spec[0] == "data"
        assert_close(out, jax.vmap(lambda a: R.gmm(a, w, sizes))(x), 1e-6, "gmm")
        perm = jax.jit(jax.vmap(lambda a: moe_ops.permute(a, ids, g, implementation="xla")[0]))(xb)
        assert_close(perm, jax.vmap(lambda a: R.permute(a, ids, g)[0])(x), 0.0, "permute")
        grad = jax.jit(jax.grad(lambda a: jnp.sum(jax.vmap(lambda r: moe_ops.gmm(r, w, sizes,
                                                                              implementation="xla"))(a) ** 2)))(xb)
        want = jax.grad(lambda a: jnp.sum(jax.vmap(lambda r: R.gmm(r, w, sizes))(a) ** 2))(x)
        assert_close(grad, want, 1e-5, "grad of vmap")
