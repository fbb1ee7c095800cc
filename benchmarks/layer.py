"""The full MoE layer suite (and the CPU main job): ``moe_ops.moe_ffn`` forward and forward+backward.

Forward+backward is ``jax.value_and_grad`` of ``sum(moe_ffn(...) * ct)`` over x, router logits and all three weight
tensors. Parity: against ``moe_ops.reference.moe_ffn_dense`` (forward output and the five gradients). At large
shapes the dense reference runs on a token subset that is still exact: every token routed to one sampled expert plus
64 random tokens (outputs and dx/dlogits of those tokens, and the sampled expert's weight gradients, depend on nothing
else).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import moe_ops
from benchmarks import env, routing
from benchmarks.records import record
from benchmarks.shapes import LayerShape
from benchmarks.timing import Parity, Progress, measure, random_normal, rel_err, rotations_for

DENSE_FULL_LIMIT = 1 << 26  # T*E*D*F below which the dense reference runs on every token
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
GRAD_NAMES = ("dx", "dlogits", "dw_gate", "dw_up", "dw_down")


def make_inputs(shape: LayerShape, dtype, pattern: routing.Pattern, seed: int):
    """(x, logits, w_gate, w_up, w_down, ct) with router logits that realise ``pattern``'s expert choice."""
    ids = routing.expert_ids(shape.t, shape.e, shape.topk, pattern, seed=seed)
    logits = jnp.asarray(routing.logits_for_ids(ids, shape.e, seed=seed))
    ks = jax.random.split(jax.random.key(seed), 6)
    x = random_normal(ks[1], (shape.t, shape.d), dtype)
    w_gate = random_normal(ks[2], (shape.e, shape.d, shape.f), dtype, shape.d ** -0.5)
    w_up = random_normal(ks[3], (shape.e, shape.d, shape.f), dtype, shape.d ** -0.5)
    w_down = random_normal(ks[4], (shape.e, shape.f, shape.d), dtype, shape.f ** -0.5)
    ct = random_normal(ks[5], (shape.t, shape.d), dtype)
    return (x, logits.astype(dtype), w_gate, w_up, w_down), ct


# The layer suite's moe_ffn variants on backends that fuse by default (op name -> path): the default (fused, gate/up
# and the activation in one op where the backend has that kernel), fused dispatch / combine with gate / up as two
# gather-GMMs and the activation in XLA, and the unfused permute -> gmm -> unpermute path.
VARIANTS = ("moe_ffn", "moe_ffn:fused-no-swiglu", "moe_ffn:unfused")
DENSE = "reference:moe_ffn_dense"  # the einsum ground truth, timed beside the XLA backend in the CPU main job


def _layer(impl: str, top_k: int, variant: str = "moe_ffn"):
    if variant == DENSE:
        return functools.partial(moe_ops.reference.moe_ffn_dense, top_k=top_k)
    if variant == "moe_ffn:unfused":
        return functools.partial(moe_ops.moe_ffn, top_k=top_k, implementation=impl, fused=False)
    if variant == "moe_ffn:fused-no-swiglu":
        def layer(x, logits, w_gate, w_up, w_down):
            weights, ids = moe_ops.route(logits.reshape(-1, logits.shape[-1]), top_k)
            return moe_ops.fused_experts_ffn(x.reshape(-1, x.shape[-1]), weights, ids, w_gate, w_up, w_down,
                                             implementation=impl, swiglu=False).reshape(x.shape)
        return layer
    return functools.partial(moe_ops.moe_ffn, top_k=top_k, implementation=impl)


def variants_for(impl: str, suite: str) -> tuple[str, ...]:
    """Variants measured for ``impl``: all of them in the layer suite where ``fused=None`` fuses, else the default;
    the CPU main job also times the dense einsum reference on the XLA rows (the bar the XLA backend must beat)."""
    if suite == "main" and impl == "xla":
        return VARIANTS[:1] + (DENSE,)
    return VARIANTS if suite == "layer" and moe_ops.fused.use_fused(None, impl) else VARIANTS[:1]


@functools.cache
def forward_fn(impl: str, top_k: int, variant: str = "moe_ffn"):
    return jax.jit(_layer(impl, top_k, variant))


def _loss(f, ct):
    return lambda *args: jnp.sum(f(*args).astype(jnp.float32) * ct.astype(jnp.float32))


@functools.cache
def fwd_bwd_fn(impl: str, top_k: int, variant: str = "moe_ffn"):
    """(args, ct) -> (loss, (dx, dlogits, dw_gate, dw_up, dw_down)); one jit per (impl, k, variant) so shapes share
    it."""
    def run(*args_ct):
        *args, ct = args_ct
        return jax.value_and_grad(_loss(_layer(impl, top_k, variant), ct), argnums=tuple(range(5)))(*args)
    return jax.jit(run)


def _subset(shape: LayerShape, ids: np.ndarray, seed: int):
    """(token indices, expert indices) for the exact dense check (all of them at small shapes)."""
    if shape.t * shape.e * shape.d * shape.f <= DENSE_FULL_LIMIT:
        return np.arange(shape.t), np.arange(shape.e)
    counts = np.bincount(ids.ravel(), minlength=shape.e)
    nonempty = np.flatnonzero(counts)
    expert = int(nonempty[np.argsort(counts[nonempty])[len(nonempty) // 2]])  # median-loaded expert
    rng = np.random.default_rng(seed)
    tokens = np.union1d(np.flatnonzero((ids == expert).any(axis=1)), rng.choice(shape.t, 64, replace=False))
    return tokens, np.array([expert])


@functools.cache
def _dense_fn(top_k: int):
    """(x, logits, w_gate, w_up, w_down, ct) -> (out, (dx, dlogits, dw_gate, dw_up, dw_down)) of the dense twin."""
    dense = functools.partial(moe_ops.reference.moe_ffn_dense, top_k=top_k)

    def run(*args_ct):
        out, vjp = jax.vjp(dense, *args_ct[:-1])
        return out, vjp(args_ct[-1].astype(out.dtype))
    return jax.jit(run)


def oracle(shape: LayerShape, args, ct, seed: int = 0):
    """Dense-reference outputs on the exact subset: dict of name -> (index fn over our output, expected)."""
    weights, ids = moe_ops.reference.route(args[1].astype(jnp.float32), shape.topk)
    tokens, experts = _subset(shape, np.asarray(ids), seed)
    sub = (args[0][tokens], args[1][tokens]) + tuple(args[2:])
    out, (dx, dl, dwg, dwu, dwd) = _dense_fn(shape.topk)(*sub, ct[tokens])
    label = "reference.moe_ffn_dense" + ("" if len(tokens) == shape.t else
                                         f" on {len(tokens)} tokens incl. all of expert {int(experts[0])}")
    return {
        "label": label,
        "out": (lambda y: y[tokens], out),
        "dx": (lambda g: g[tokens], dx), "dlogits": (lambda g: g[tokens], dl),
        "dw_gate": (lambda g: g[experts], dwg[experts]), "dw_up": (lambda g: g[experts], dwu[experts]),
        "dw_down": (lambda g: g[experts], dwd[experts]),
    }


def _checker(ref: dict, names, tol: float):
    def check(result) -> Parity:
        values = {"out": result} if names == ("out",) else dict(zip(GRAD_NAMES, result[1]))
        errors = {n: rel_err(ref[n][0](values[n]), ref[n][1]) for n in names}
        return Parity(errors, ref["label"], tol)
    return check


def run_case(avail: env.Availability, shape: LayerShape, dtype, pattern: routing.Pattern, *,
             warmup: int, repeats: int, seed: int = 0, suite: str = "layer") -> list[dict]:
    """Forward and forward+backward records of one (implementation, shape, pattern)."""
    dtype_name = jnp.dtype(dtype).name
    common = dict(suite=suite, op="moe_ffn", implementation=avail.implementation, requested=avail.requested,
                  kind="moe_ops", shape=shape.as_dict(), dtype=dtype_name,
                  pattern=pattern.as_dict(), emulated=avail.emulated,
                  extra={"ceiling_basis": "matmul"})
    if not avail.available:
        return [record(pass_=p, status="unavailable", reason=avail.reason, **common) for p in ("fwd", "fwd+bwd")]
    bytes_per_set = 2 * shape.t * shape.d * jnp.dtype(dtype).itemsize + 3 * shape.e * shape.d * shape.f * \
        jnp.dtype(dtype).itemsize
    n_sets = 1 if avail.emulated else rotations_for(bytes_per_set)
    try:
        sets = [make_inputs(shape, dtype, pattern, seed + i) for i in range(n_sets)]
        ref = oracle(shape, *sets[0], seed=seed)
    except Exception as exc:  # noqa: BLE001 - without inputs and a reference there is no checked measurement
        return [record(pass_=p, status="oom" if env.is_oom(exc) else "error",
                       reason=f"inputs / dense reference failed: {env.reason(exc)}", **common)
                for p in ("fwd", "fwd+bwd")]
    _, ids = moe_ops.reference.route(sets[0][0][1].astype(jnp.float32), shape.topk)
    common["routing"] = routing.describe(np.bincount(np.asarray(ids).ravel(), minlength=shape.e))
    common["config"] = env.kernel_config(avail.implementation, "gmm", m=shape.t * shape.topk, k=shape.d,
                                         n=shape.f, e=shape.e, dtype=dtype_name)
    out = []
    impl = avail.implementation
    jobs = [(v, "fwd", forward_fn(impl, shape.topk, v), [a for a, _ in sets], ("out",), 1)
            for v in variants_for(impl, suite)]
    jobs += [(v, "fwd+bwd", fwd_bwd_fn(impl, shape.topk, v), [a + (c,) for a, c in sets], GRAD_NAMES, 3)
             for v in variants_for(impl, suite)]
    for variant, pass_, fn, inputs, names, flop_mult in jobs:
        common["op"] = variant
        try:
            timing, parity = measure(fn, inputs, warmup=warmup, repeats=repeats,
                                     check=_checker(ref, names, TOL[dtype_name]))
        except Exception as exc:  # noqa: BLE001 - reported as the row's status, never swallowed
            out.append(record(pass_=pass_, status="oom" if env.is_oom(exc) else "error", reason=env.reason(exc),
                              **common))
            continue
        out.append(record(pass_=pass_, timing=timing, parity=parity, flops=flop_mult * shape.flops(), **common))
    return out


def run_suite(cases, dtype, *, progress=True, suite="layer") -> list[dict]:
    """cases: (Availability, LayerShape, Pattern, warmup, repeats) tuples, run in order under one progress bar."""
    bar = Progress(len(cases), suite, enabled=progress)
    records = []
    for avail, shape, pattern, warmup, repeats in cases:
        records += run_case(avail, shape, dtype, pattern, warmup=warmup, repeats=repeats,
                            suite=suite)
        bar.step(f"{avail.implementation} {shape.name} {pattern.label}")
    bar.close()
    return records
