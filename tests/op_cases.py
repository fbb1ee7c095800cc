"""One small example of every public op, for the tests that run them all under one transformation or setting
(``tests/test_degenerate.py``: a vmap over zero examples; ``tests/test_config_modes.py``: the caller's JAX settings),
and the forward-and-gradients runner they share."""

import jax
import jax.numpy as jnp

import moe_ops
from tests.helpers import keys, randn


def public_op_cases(impl):
    """name -> (op, args) of one example for every public op (tiny, uneven routing)."""
    t, k, e, d, f = 5, 2, 4, 8, 6
    ks = keys(11, 10)
    ids = jax.random.randint(ks[0], (t, k), 0, e)
    sizes, sort_idx = moe_ops.sort_by_expert(ids, e)
    x, xs, w = randn(ks[1], (t, d)), randn(ks[2], (t * k, d)), jax.nn.softmax(randn(ks[3], (t, k)))
    wg, wu, wd, hs, logits = (randn(ks[4], (e, d, f)), randn(ks[5], (e, d, f)), randn(ks[6], (e, f, d)),
                              randn(ks[7], (t * k, f)), randn(ks[8], (t, e)))
    kw = dict(implementation=impl)
    return {
        "gmm": (lambda a, b: moe_ops.gmm(a, b, sizes, **kw), (xs, wg)),
        "tgmm": (lambda a, b: moe_ops.tgmm(a, b, sizes, **kw), (xs, hs)),
        "ragged_dot": (lambda a, b: moe_ops.ragged_dot(a, b, sizes, **kw), (xs, wg)),
        "sort_by_expert": (lambda i: moe_ops.sort_by_expert(i, e, **kw), (ids,)),
        "permute": (lambda a, i: moe_ops.permute(a, i, e, **kw), (x, ids)),
        "unpermute": (lambda a, c: moe_ops.unpermute(a, sort_idx, c, **kw), (xs, w)),
        "gather_gmm": (lambda a, b: moe_ops.gather_gmm(a, b, sizes, sort_idx, **kw), (x, wg)),
        "scatter_gmm": (lambda a, b, c: moe_ops.scatter_gmm(a, b, sizes, sort_idx, c, **kw), (hs, wd, w)),
        "swiglu_gmm": (lambda a, b, c: moe_ops.swiglu_gmm(a, b, c, sizes, sort_idx, **kw), (x, wg, wu)),
        "swiglu_ffn": (lambda a, b, c, d_, c2: moe_ops.swiglu_ffn(a, b, c, d_, sizes, sort_idx, c2, **kw),
                       (x, wg, wu, wd, w)),
        "experts_ffn": (lambda a, b, c, d_: moe_ops.experts_ffn(a, sizes, b, c, d_, **kw), (xs, wg, wu, wd)),
        "fused_experts_ffn": (lambda a, c, b, c2, d_: moe_ops.fused_experts_ffn(a, c, ids, b, c2, d_, **kw),
                              (x, w, wg, wu, wd)),
        "moe_ffn": (lambda a, lg, b, c, d_: moe_ops.moe_ffn(a, lg, b, c, d_, top_k=k, **kw), (x, logits, wg, wu, wd)),
        "moe_ffn_unfused": (lambda a, lg, b, c, d_: moe_ops.moe_ffn(a, lg, b, c, d_, top_k=k, fused=False, **kw),
                            (x, logits, wg, wu, wd)),
    }


def value_and_grads(op, args):
    """``op(*args)`` and the gradient of the sum of squares of its float outputs wrt every float input."""
    floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))

    def loss(*a):
        return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in jax.tree.leaves(op(*a))
                   if jnp.issubdtype(o.dtype, jnp.floating))
    return op(*args), (jax.grad(loss, floats)(*args) if floats else ())
