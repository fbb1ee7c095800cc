"""A small stacked MoE model for the model-code tests (``test_model_transforms``, ``test_model_data_parallel``):
router + expert weights, residual blocks, a scanned loss under a ``jax.checkpoint`` policy, tree comparison."""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import moe_ops
from moe_ops import reference as R
from tests.helpers import assert_close, keys, randn

T, D, F, E, K, L = 16, 8, 12, 4, 2, 2
TOL32, TOL16 = 2e-5, 3e-2
CP = jax.checkpoint_policies


def params(seed, dtype=jnp.float32, layers=None):
    """Router and expert weights (stacked [L, ...] when ``layers``)."""
    lead = () if layers is None else (layers,)
    k = keys(seed, 4)
    return dict(wr=randn(k[0], lead + (D, E), dtype), wg=randn(k[1], lead + (E, D, F), dtype, D ** -0.5),
                wu=randn(k[2], lead + (E, D, F), dtype, D ** -0.5), wd=randn(k[3], lead + (E, F, D), dtype, F ** -0.5))


def tokens(seed, shape=(T, D), dtype=jnp.float32):
    return randn(keys(seed, 1)[0], shape, dtype)


def moe(impl, fused=None, recompute=False):
    return lambda x, lg, wg, wu, wd: moe_ops.moe_ffn(x, lg, wg, wu, wd, top_k=K, implementation=impl, fused=fused,
                                                     recompute=recompute)


def dense(x, lg, wg, wu, wd):
    return R.moe_ffn_dense(x, lg, wg, wu, wd, top_k=K)


def block(layer, x, p):
    """One residual MoE block: router logits from the block's input."""
    return x + layer(x, (x @ p["wr"].astype(x.dtype)).astype(jnp.float32), p["wg"], p["wu"], p["wd"])


def stack_loss(layer, policy=None, names=False):
    """Sum of squares after ``lax.scan`` over the stacked layers, each block under ``jax.checkpoint(policy)``."""
    def body(h, p):
        def f(h, p):
            if names:
                h = checkpoint_name(h, "block_in")
            return block(layer, h, p)
        f = f if policy is None else jax.checkpoint(f, policy=policy)
        return f(h, p), None

    def loss(p, x):
        h, _ = jax.lax.scan(body, x, p)
        return jnp.sum(h.astype(jnp.float32) ** 2)
    return loss


def close_tree(got, want, tol, what=""):
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{what} {name}: dtype {got[name].dtype} != {want[name].dtype}"
        assert_close(got[name], want[name], tol, f"{what} {name}")
