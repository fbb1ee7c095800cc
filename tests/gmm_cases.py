"""The GMM test world of the Triton GMM / TGMM and TMA-variant tests: M rows in G groups, K x N weights, a small
explicit tile config, and expert shards (``group_offset``, G_local). Shapes are deliberately not multiples of the test
tiles (M=70, K=40, N=56 against 16x32x16)."""

import jax.numpy as jnp

from kernels.triton import tuning
from tests.helpers import randn

M, K, N, G = 70, 40, 56, 5
CFG = tuning.GmmConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1)
# (group_offset, G_local): all groups, then the first, a middle and the last shard of size 2 / 1 / 2.
SHARDS = {"all": (None, G), "first": (0, 2), "middle": (2, 1), "last": (3, 2)}


def rand_rhs(key, g_local, transpose, dtype=jnp.float32, k=K, n=N):
    return randn(key, (g_local, n, k) if transpose else (g_local, k, n), dtype)
