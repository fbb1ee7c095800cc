"""Shared test data: named group-size cases, hypothesis strategies, random inputs, and a norm-relative check.

Group-size cases cover what kernels get wrong: uneven and empty groups, one expert taking every row, sums below M,
and (with ``group_offset``) local groups at the first, a middle and the last shard.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import jax
import jax.numpy as jnp
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

# name -> function (num_groups, num_rows, rng) -> int32 numpy sizes
GROUP_CASES = {
    "uneven": lambda g, m, rng: _split(m, rng.dirichlet(np.ones(g)), rng),
    "empty_groups": lambda g, m, rng: _split(m, rng.dirichlet(np.ones(g)) * (np.arange(g) % 3 != 1), rng),
    "one_hot_group": lambda g, m, rng: np.eye(g, dtype=np.int32)[g // 2] * m,
    "sum_below_m": lambda g, m, rng: _split(m - max(1, m // 3), rng.dirichlet(np.ones(g)), rng),
    "all_empty": lambda g, m, rng: np.zeros(g, np.int32),
}


def _split(total, probs, rng):
    """Integer sizes summing to ``total`` (multinomial over ``probs``; zero-probability groups stay empty)."""
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum() if probs.sum() > 0 else np.full(len(probs), 1.0 / len(probs))
    return rng.multinomial(total, probs).astype(np.int32)


def group_sizes(name, num_groups, num_rows, seed=0):
    return jnp.asarray(GROUP_CASES[name](num_groups, num_rows, np.random.default_rng(seed)), jnp.int32)


@st.composite
def group_sizes_strategy(draw, num_groups, num_rows, allow_below_m=True):
    """Random sizes: some groups empty, sometimes one hot group, sometimes summing below ``num_rows``."""
    total = draw(st.integers(0 if allow_below_m else num_rows, num_rows))
    mode = draw(st.sampled_from(["spread", "hot", "sparse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if mode == "hot":
        sizes = np.zeros(num_groups, np.int32)
        sizes[draw(st.integers(0, num_groups - 1))] = total
        return jnp.asarray(sizes)
    probs = rng.dirichlet(np.ones(num_groups))
    if mode == "sparse":
        probs = probs * (rng.random(num_groups) < 0.4)
    return jnp.asarray(_split(total, probs, rng))


def randn(key, shape, dtype=jnp.float32, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def rel_err(actual, expected):
    """``||actual - expected|| / ||expected||`` in f64 (NaN anywhere -> inf, so poisoned rows fail)."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if not np.isfinite(a).all():
        return np.inf
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# Tolerances by input dtype (norm-relative): f32 kernels in the interpreter are f32-exact up to summation order.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


# Pallas interpret-mode parameters: outputs poisoned (an unwritten element is NaN) and out-of-bounds reads raise;
# STRICT also detects races between DMAs and compute (the ``strict_interpreter`` fixture of ``conftest.py``).
POISON = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
STRICT = pltpu.InterpretParams(out_of_bounds_reads="raise", detect_races=True, uninitialized_memory="nan")


def fused_layer_grad(implementation, recompute, top_k=2, shape=(256, 512, 768, 8), dtype=jnp.bfloat16):
    """(jax.grad over all five inputs of the public fused layer ``fused_experts_ffn`` with routing, its argument
    ShapeDtypeStructs) at ``shape`` (T, D, F, E): what the lowering tests export for a platform."""
    import moe_ops  # noqa: PLC0415 (tests.helpers also serves kernel-level tests)
    t, d, f, e = shape

    def loss(x, logits, w_gate, w_up, w_down):
        weights, ids = moe_ops.route(logits, top_k)
        out = moe_ops.fused_experts_ffn(x, weights, ids, w_gate, w_up, w_down, implementation=implementation,
                                        recompute=recompute)
        return jnp.sum(out.astype(jnp.float32))
    sds = jax.ShapeDtypeStruct
    args = (sds((t, d), dtype), sds((t, e), jnp.float32), sds((e, d, f), dtype), sds((e, d, f), dtype),
            sds((e, f, d), dtype))
    return jax.grad(loss, argnums=range(5)), args


# ---------------------------------------------------------------------------------------------------------------
# Case plumbing shared by the kernel and op tests.

def case_seed(*parts):
    """A deterministic seed per test case (``hash`` of a str varies between processes)."""
    return zlib.crc32(repr(parts).encode()) % 10_000


def offset_array(off):
    """``group_offset`` as the kernels take it: int32[1] (None -> 0)."""
    return jnp.array([0 if off is None else off], jnp.int32)


def grads_of(fn, args, cot):
    """Gradients of ``sum(fn(*args) * cot)`` (in f32) with respect to every argument, jitted (one XLA:CPU compile,
    not one per op)."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot),
                            argnums=tuple(range(len(args)))))(*args)


# ---------------------------------------------------------------------------------------------------------------
# The MoE layer end to end: inputs per implementation and the loss whose gradients the tests compare.

# Small shapes: the Triton interpreter and Pallas interpret mode are slow on CPU. Pallas tiles want 128-lane dims.
SHAPES = {"xla": (2, 24, 32, 48, 6), "triton": (2, 12, 16, 24, 4), "pallas": (2, 12, 128, 128, 4)}


def layer_inputs(shape, routing, seed=0, dtype=jnp.float32):
    b, s, d, f, e = shape
    k = keys(seed, 5)
    x = randn(k[0], (b, s, d), dtype)
    logits = randn(k[1], (b, s, e))
    if routing == "one_expert":
        logits = logits.at[..., 1].add(30.0)  # every token's top choice is expert 1
    elif routing == "hot":
        logits = logits.at[..., 0].add(2.0)
    ws = [randn(k[2], (e, d, f), dtype, d ** -0.5), randn(k[3], (e, d, f), dtype, d ** -0.5),
          randn(k[4], (e, f, d), dtype, f ** -0.5)]
    return x, logits, ws


def loss(fn, top_k, cotangent):
    return lambda x, lg, wg, wu, wd: jnp.sum(fn(x, lg, wg, wu, wd, top_k=top_k).astype(jnp.float32) * cotangent)



# ---------------------------------------------------------------------------------------------------------------
# Tokens sharded over a shard_map, replicated weights: sum over shards vs the unsharded sum.

SUM_SHARDS = 4


def _mesh():
    """A SUM_SHARDS-device mesh, built when a test needs it (so these helpers import on a 1-GPU host too; the CPU runs
    force 8 host devices in conftest.py)."""
    return jax.make_mesh((SUM_SHARDS,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:SUM_SHARDS])


def sharded_sum(per_shard):
    """sum over shards of per_shard(token block, replicated args...), through shard_map (check_vma on)."""
    def total(tokens, *replicated):
        f = jax.shard_map(lambda t, *r: per_shard(t, *r)[None], mesh=_mesh(),
                          in_specs=(jax.P("d"),) + (jax.P(),) * len(replicated), out_specs=jax.P("d"))
        return f(tokens, *replicated).sum()
    return total


def unsharded_sum(per_shard):
    def total(tokens, *replicated):
        blocks = jnp.split(tokens, SUM_SHARDS)
        return sum(per_shard(b, *replicated) for b in blocks)
    return total


@contextlib.contextmanager
def partitioner(shardy: bool):
    """Shardy (True) or the GSPMD partitioner (False) for the block, restored after."""
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", shardy)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)
