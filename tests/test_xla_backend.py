"""The XLA backend (the CPU default): row-tile loop parity with small tiles (multi-tile groups, shifted windows at the
end), no densified memory in ``jax.grad(gmm)``, and no row that sees another expert's weights (NaN isolation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import moe_ops
from moe_ops import reference as R
from moe_ops import xla
from tests.helpers import GROUP_CASES, TOL, assert_close, group_sizes, group_sizes_strategy, keys, randn

M, K, N, G = 37, 8, 12, 4  # M not a multiple of the tile: the last windows are shifted back


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(xla, "BLOCK_ROWS", 8)
    monkeypatch.setattr(xla, "MIN_BLOCK_ROWS", 8)


@given(group_sizes_strategy(G, M))
def test_row_tiles_partition_the_local_rows(sizes):
    for offset, num_local in [(0, G), (1, 2), (3, 2), (G, 2)]:
        group, start, end, count = map(np.asarray, xla.row_tiles(sizes, jnp.array([offset]), num_local, M, 8))
        s = np.asarray(sizes)
        bounds = np.concatenate([[0], np.cumsum(s)])
        want = [(j, r) for j in range(num_local) if offset + j < G
                for r in range(bounds[offset + j], bounds[offset + j + 1])]
        got = [(group[i], r) for i in range(count) for r in range(start[i], end[i])]
        assert got == want
        assert ((end[:count] - start[:count] > 0) & (end[:count] - start[:count] <= 8)).all()
        assert count <= len(group)


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("offset,num_local", [(0, G), (1, 2), (3, 1)])
def test_gmm_tgmm_parity_small_tiles(small_tiles, case, offset, num_local):
    k1, k2, k3 = keys(5, 3)
    sizes = group_sizes(case, G, M, seed=3)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (num_local, K, N)), randn(k3, (M, N))
    kw = dict(group_offset=offset, implementation="xla")
    assert_close(moe_ops.gmm(lhs, rhs, sizes, **kw), R.gmm(lhs, rhs, sizes, group_offset=offset), 1e-5, "gmm")
    assert_close(moe_ops.gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, transpose_rhs=True, **kw),
                 R.gmm(lhs, rhs, sizes, group_offset=offset), 1e-5, "gmm transposed")
    assert_close(moe_ops.tgmm(lhs, rhs2, sizes, num_groups=num_local, **kw),
                 R.tgmm(lhs, rhs2, sizes, group_offset=offset, num_groups=num_local), 1e-5, "tgmm")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gmm_gradients_small_tiles(small_tiles, dtype):
    k1, k2, k3 = keys(6, 3)
    sizes = group_sizes("sum_below_m", G, M, seed=4)
    lhs, rhs, ct = randn(k1, (M, K), dtype), randn(k2, (2, K, N), dtype), randn(k3, (M, N))
    loss = lambda f: lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * ct)
    got = jax.grad(loss(lambda a, b: moe_ops.gmm(a, b, sizes, group_offset=1, implementation="xla")), (0, 1))(lhs, rhs)
    want = jax.grad(loss(lambda a, b: R.gmm(a, b, sizes, group_offset=1)), (0, 1))(lhs, rhs)
    for g, w, what in zip(got, want, ("dlhs", "drhs")):
        assert_close(g, w, TOL[dtype], what)


def test_grad_gmm_memory_is_linear_not_densified():
    """jax.grad(gmm) at M=4096, K=N=512, G=64 (lax.ragged_dot on XLA:CPU: 1.68 GiB of temporaries, G+2 copies of
    [M, N]): temporaries stay within one f32 copy of O(M*(K+N) + G*K*N) = 84 MB."""
    m, k, n, g = 4096, 512, 512, 64
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    f = jax.jit(jax.grad(lambda a, b, s: jnp.sum(moe_ops.gmm(a, b, s, implementation="xla")), (0, 1)))
    temp = f.lower(spec(m, k), spec(g, k, n), spec(g, dtype=jnp.int32)).compile().memory_analysis().temp_size_in_bytes
    bound = 4 * (m * (k + n) + g * k * n)
    assert temp <= bound, f"temporaries {temp / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ NaN isolation
def _poisoned_gmm_inputs(offset):
    """G=4 groups, 2 local (``offset``), sizes [5, 9, 0, 11] (sum 25 < M): NaN in local expert 1 (global group
    offset+1) only when that group is empty, NaN / Inf in rows of non-local groups and in rows beyond the sum."""
    k1, k2, k3 = keys(7, 3)
    sizes = jnp.array([5, 9, 0, 11], jnp.int32)
    lhs, rhs, ct = randn(k1, (M, K)), randn(k2, (2, K, N)), randn(k3, (M, N))
    bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes))])
    local_rows = np.zeros(M, bool)
    local_rows[bounds[offset]:bounds[offset + 2]] = True
    bad = jnp.asarray(~local_rows)
    lhs = jnp.where(bad[:, None], jnp.array([jnp.nan, jnp.inf] * (K // 2)), lhs)
    ct = jnp.where(bad[:, None], jnp.inf, ct)  # cotangents of rows that do not exist are ignored, even Inf
    if int(sizes[offset + 1]) == 0:
        rhs = rhs.at[1].set(jnp.nan)
    return lhs, rhs, sizes, ct, jnp.asarray(local_rows)


@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
@pytest.mark.parametrize("offset", [0, 1], ids=["experts01", "experts12_nan_empty"])
def test_no_row_sees_another_experts_weights(impl, offset):
    lhs, rhs, sizes, ct, local = _poisoned_gmm_inputs(offset)
    clean = lambda a: jnp.where(local[:, None], a, 0)
    want = R.gmm(clean(lhs), jnp.nan_to_num(rhs), sizes, group_offset=offset)
    out = moe_ops.gmm(lhs, rhs, sizes, group_offset=offset, implementation=impl)
    assert_close(out, want, 1e-5, f"{impl} forward")
    assert np.all(np.asarray(out)[~np.asarray(local)] == 0)
    dlhs, drhs = jax.grad(lambda a, b: jnp.sum(moe_ops.gmm(a, b, sizes, group_offset=offset, implementation=impl)
                                               * ct), (0, 1))(lhs, rhs)
    want_dlhs, want_drhs = jax.grad(lambda a, b: jnp.sum(R.gmm(a, b, sizes, group_offset=offset) * clean(ct)),
                                    (0, 1))(clean(lhs), jnp.nan_to_num(rhs))
    assert_close(dlhs, want_dlhs, 1e-5, f"{impl} dlhs")
    assert_close(drhs, want_drhs, 1e-5, f"{impl} drhs")
    drhs = moe_ops.tgmm(lhs, ct, sizes, group_offset=offset, num_groups=2, implementation=impl)  # Inf ct rows
    assert_close(drhs, R.tgmm(clean(lhs), clean(ct), sizes, group_offset=offset, num_groups=2), 1e-5,
                 f"{impl} tgmm with Inf/NaN outside the local rows")


@pytest.mark.parametrize("fused", [False, True])
def test_moe_ffn_nan_in_an_unused_expert_stays_there(fused):
    t, d, f, e = 24, 16, 32, 8
    k = keys(8, 5)
    x = randn(k[0], (t, d))
    logits = randn(k[1], (t, e)).at[:, 5].set(-1e4)  # expert 5 is never selected
    w = [randn(k[2], (e, d, f), scale=d ** -0.5), randn(k[3], (e, d, f), scale=d ** -0.5),
         randn(k[4], (e, f, d), scale=f ** -0.5)]
    poisoned = [a.at[5].set(jnp.nan) for a in w]
    run = lambda *a: moe_ops.moe_ffn(*a, top_k=2, implementation="xla", fused=fused)
    assert_close(jax.jit(run)(x, logits, *poisoned), R.moe_ffn_dense(x, logits, *w, top_k=2), 1e-5, "forward")
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a)), tuple(range(5))))(x, logits, *poisoned)
    want = jax.grad(lambda *a: jnp.sum(R.moe_ffn_dense(*a, top_k=2)), tuple(range(5)))(x, logits, *w)
    for i, (g, wg) in enumerate(zip(grads, want)):
        assert_close(g, wg, 1e-4, f"grad {i}")


def test_fused_twins_small_tiles(small_tiles):
    """gather_gmm gathers its rows per tile (and scales them by row_weights); scatter_gmm composes; gradients."""
    t, k, e = 19, 2, 4
    k1, k2, k3, k4, k5 = keys(9, 5)
    ids = jax.random.randint(k1, (t, k), -1, e)  # some dropped copies
    x, w_in, w_out = randn(k2, (t, K)), randn(k3, (e, K, N)), randn(k4, (e, N, K))
    weights = jax.random.uniform(k5, (t, k), jnp.float32, 0.1, 1.0)
    _, sizes, sort_idx = R.permute(x, ids, e)
    x_sorted = x[sort_idx // k]
    row_w = weights.reshape(-1)[sort_idx][:, None]
    got = xla.gather_gmm(x, w_in, sizes, jnp.zeros((1,), jnp.int32), sort_idx, k, transpose_rhs=False,
                         out_dtype=jnp.float32, row_weights=weights)
    assert_close(got, R.gmm(x_sorted, w_in, sizes) * row_w, 1e-5, "gather_gmm row_weights")

    def layer(gather, scatter):
        return lambda a, b, c, w: jnp.sum(scatter(jnp.tanh(gather(a, b)), c, w) ** 2)
    ours = layer(lambda a, b: moe_ops.gather_gmm(a, b, sizes, sort_idx, implementation="xla"),
                 lambda h, c, w: moe_ops.scatter_gmm(h, c, sizes, sort_idx, w, implementation="xla"))
    ref = layer(lambda a, b: R.gmm(a[sort_idx // k], b, sizes),
                lambda h, c, w: R.unpermute(R.gmm(h, c, sizes), sort_idx, w))
    args = (x, w_in, w_out, weights)
    assert_close(ours(*args), ref(*args), 1e-5, "value")
    for i, (g, want) in enumerate(zip(jax.grad(ours, (0, 1, 2, 3))(*args), jax.grad(ref, (0, 1, 2, 3))(*args))):
        assert_close(g, want, 1e-5, f"grad {i}")
