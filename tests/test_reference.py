"""The reference twins against an independent, loop-based numpy formulation (f64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_ops import reference as R
from tests.helpers import GROUP_CASES, group_sizes, keys, randn

M, K, N, G = 37, 11, 13, 5


def np_gmm(lhs, rhs, sizes, offset, num_local):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    row = 0
    for g, size in enumerate(sizes):
        for r in range(row, min(row + size, lhs.shape[0])):
            if offset <= g < offset + num_local:
                out[r] = lhs[r] @ rhs[g - offset]
        row += size
    return out


def np_tgmm(lhs, rhs, sizes, offset, num_local):
    out = np.zeros((num_local, lhs.shape[1], rhs.shape[1]))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(offset, min(offset + num_local, len(sizes))):
        rows = slice(starts[g], starts[g + 1])
        out[g - offset] = lhs[rows].T @ rhs[rows]
    return out


def f64(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("offset,num_local", [(0, G), (0, 2), (2, 2), (3, 2), (4, 2)])
def test_gmm_tgmm_match_numpy(case, offset, num_local):
    k = keys(1, 3)
    lhs, rhs_all, other = randn(k[0], (M, K)), randn(k[1], (G, K, N)), randn(k[2], (M, N))
    sizes = group_sizes(case, G, M, seed=7)
    rhs = jnp.concatenate([rhs_all, rhs_all])[offset:offset + num_local]  # (4, 2): a shard past the last group
    got = R.gmm(lhs, rhs, sizes, group_offset=offset)
    np.testing.assert_allclose(got, np_gmm(f64(lhs), f64(rhs), np.asarray(sizes), offset, num_local), atol=1e-4)
    got_t = R.gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, group_offset=offset, transpose_rhs=True)
    np.testing.assert_allclose(got_t, got, atol=1e-5)
    got_tg = R.tgmm(lhs, other, sizes, group_offset=offset, num_groups=num_local)
    np.testing.assert_allclose(got_tg, np_tgmm(f64(lhs), f64(other), np.asarray(sizes), offset, num_local),
                               atol=1e-4)


def np_route(logits, top_k, score_fn, bias):
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores = scores / scores.sum(-1, keepdims=True) if score_fn == "softmax" else 1 / (1 + np.exp(-logits))
    sel = scores + (0 if bias is None else bias)
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(scores, ids, -1)
    return w / w.sum(-1, keepdims=True), ids


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_numpy(score_fn, with_bias):
    k = keys(2, 2)
    logits = randn(k[0], (29, 8))
    bias = randn(k[1], (8,)) if with_bias else None
    w, ids = R.route(logits, 3, score_fn=score_fn, bias=bias)
    nw, nids = np_route(f64(logits), 3, score_fn, None if bias is None else f64(bias))
    np.testing.assert_array_equal(ids, nids)
    np.testing.assert_allclose(w, nw, rtol=1e-5)


def test_permute_unpermute_match_numpy():
    t, k, e, d = 23, 3, 6, 5
    rng = np.random.default_rng(3)
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    ids[4, 1] = e + 2  # out of range: dropped
    x = randn(keys(3, 1)[0], (t, d))
    xs, sizes, sort_idx = R.permute(x, jnp.asarray(ids), e)
    order = sorted(range(t * k), key=lambda i: (ids.flat[i] if ids.flat[i] < e else e, i))
    np.testing.assert_array_equal(sort_idx, order)
    np.testing.assert_array_equal(sizes, np.bincount(ids.flat[ids.flat < e], minlength=e))
    np.testing.assert_array_equal(xs, np.asarray(x)[np.asarray(order) // k])
    w = rng.random((t, k)).astype(np.float32)
    y = rng.standard_normal((t * k, d)).astype(np.float32)
    pos = {flat: i for i, flat in enumerate(order)}
    expected = np.stack([sum(w[ti, j] * y[pos[ti * k + j]] for j in range(k)) for ti in range(t)])
    np.testing.assert_allclose(R.unpermute(jnp.asarray(y), sort_idx, jnp.asarray(w)), expected, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_moe_ffn_dense_matches_per_token_numpy():
    t, d, f, e, top_k = 9, 6, 7, 4, 2
    kk = keys(4, 5)
    x, logits = randn(kk[0], (t, d)), randn(kk[1], (t, e))
    wg, wu, wd = randn(kk[2], (e, d, f)), randn(kk[3], (e, d, f)), randn(kk[4], (e, f, d))
    got = R.moe_ffn_dense(x, logits, wg, wu, wd, top_k=top_k)
    w, ids = np_route(f64(logits), top_k, "softmax", None)
    silu = lambda z: z / (1 + np.exp(-z))
    expected = np.zeros((t, d))
    for ti in range(t):
        for j in range(top_k):
            ex = ids[ti, j]
            h = silu(f64(x)[ti] @ f64(wg)[ex]) * (f64(x)[ti] @ f64(wu)[ex])
            expected[ti] += w[ti, j] * (h @ f64(wd)[ex])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(R.moe_ffn(x, logits, wg, wu, wd, top_k=top_k), expected, rtol=1e-4, atol=1e-5)


def test_gmm_twin_runs_inside_a_checked_shard_map():
    """The twin's per-group scan carry starts typed like its operands, so it runs (and differentiates) inside a
    ``shard_map`` with ``check_vma`` on, with a token-sharded lhs and replicated weights (the carry mismatch raised
    a TypeError there before)."""
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(7), 2)
    lhs, rhs = jax.random.normal(k[0], (4, 8, 6)), jax.random.normal(k[1], (3, 6, 5))
    sizes = jnp.array([3, 0, 4], jnp.int32)
    f = jax.shard_map(lambda a, w: R.gmm(a[0], w, sizes)[None], mesh=mesh, in_specs=(P("data"), P()),
                      out_specs=P("data"))
    np.testing.assert_allclose(jax.jit(f)(lhs, rhs), jnp.stack([R.gmm(a, rhs, sizes) for a in lhs]), rtol=1e-6)
    dlhs, drhs = jax.grad(lambda a, w: jnp.sum(f(a, w) ** 2), argnums=(0, 1))(lhs, rhs)
    want = jax.grad(lambda a, w: sum(jnp.sum(R.gmm(x, w, sizes) ** 2) for x in a), argnums=(0, 1))(lhs, rhs)
    np.testing.assert_allclose(dlhs, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(drhs, want[1], rtol=1e-5, atol=1e-5)
