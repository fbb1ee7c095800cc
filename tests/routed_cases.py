"""The routed test world of the fused-op, SwiGLU and Pallas-fused tests: T tokens routed to E experts top-k, named
routings (uneven with dropped copies, empty experts, one expert taking everything, every copy dropped) and the
expert-sorted group sizes / row map of each. Shapes are tiny and not multiples of the 16x16x16 test tiles
(T*k = 39 rows, K = 20, N = 24)."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels.triton import tuning
from moe_ops import reference as R
from tests.helpers import keys, randn

T, TOP_K, K, N, E = 13, 3, 20, 24, 5
CFG = tuning.GmmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)
ROUTINGS = ["uneven_dropped", "empty_groups", "one_expert", "all_dropped"]


def expert_ids(routing, seed):
    """[T, k] int32 expert ids for a named routing (ids outside [0, E) are dropped copies)."""
    rng = np.random.default_rng(seed)
    if routing == "uneven_dropped":
        ids = rng.choice(np.arange(-1, E + 1), size=(T, TOP_K), p=[0.1, 0.4, 0.2, 0.1, 0.05, 0.05, 0.1])
    elif routing == "empty_groups":
        ids = rng.choice([0, 2, 4], size=(T, TOP_K))
    elif routing == "one_expert":
        ids = np.full((T, TOP_K), 2)
    else:
        ids = np.where(rng.random((T, TOP_K)) < 0.5, -3, E)
    return jnp.asarray(ids, jnp.int32)


def routed(routing, seed):
    """(ids, group_sizes, sort_idx) from the reference permutation."""
    ids = expert_ids(routing, seed)
    _, sizes, sort_idx = R.permute(jnp.zeros((T, 1)), ids, E)
    return ids, sizes, sort_idx


def rand_rhs(key, g, transpose, dtype, k=K, n=N):
    return randn(key, (g, n, k) if transpose else (g, k, n), dtype)


def ffn_operands(seed, g_local, dtype=jnp.float32, d=K, f=N):
    """x / dout [T, d], w_gate / w_up [g_local, d, f] and w_down [g_local, f, d] (unit-scale projections) and the
    routing weights [T, k] of the SwiGLU FFN tests."""
    ks = keys(seed, 6)
    return dict(x=randn(ks[0], (T, d), dtype), dout=randn(ks[1], (T, d), dtype),
                w_gate=randn(ks[2], (g_local, d, f), dtype, d ** -0.5),
                w_up=randn(ks[3], (g_local, d, f), dtype, d ** -0.5),
                w_down=randn(ks[4], (g_local, f, d), dtype, f ** -0.5),
                weights=jax.random.uniform(ks[5], (T, TOP_K), jnp.float32, 0.1, 1.0))
