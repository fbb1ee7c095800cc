"""Sort / unsort suite: ``moe_ops.permute`` and ``moe_ops.unpermute`` (forward and forward+backward) vs the XLA
compositions (argsort + take; scatter + weighted einsum, i.e. ``moe_ops.reference``), in % of the copy rate.

Bytes counted (the minimum traffic of the op, itemsize b): permute forward reads T*D and writes T*k*D;
unpermute forward reads T*k*D and writes T*D; forward+backward adds the backward's own minimum (the same pair
reversed, and for unpermute one more read of T*k*D + T*D for the weight gradient).
Parity: permute outputs must equal the reference exactly (tolerance 0); unpermute and every gradient are compared
norm-relative against the reference's (``jax.vjp`` of ``moe_ops.reference``) on the same inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import moe_ops
from moe_ops import reference
from benchmarks import env, routing
from benchmarks.records import record
from benchmarks.shapes import SortShape
from benchmarks.timing import Parity, Progress, measure, random_normal, rel_err, rotations_for

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def make_inputs(shape: SortShape, dtype, pattern: routing.Pattern, seed: int):
    """(x [T,D], expert_ids [T,k], weights [T,k] f32 summing to 1, y_sorted [T*k,D], ct_sorted, ct [T,D])."""
    ids = jnp.asarray(routing.expert_ids(shape.t, shape.e, shape.topk, pattern, seed=seed))
    ks = jax.random.split(jax.random.key(seed), 5)
    x = random_normal(ks[0], (shape.t, shape.d), dtype)
    w = jax.nn.softmax(random_normal(ks[1], (shape.t, shape.topk), jnp.float32), axis=-1)
    y = random_normal(ks[2], (shape.t * shape.topk, shape.d), dtype)
    ct_sorted = random_normal(ks[3], (shape.t * shape.topk, shape.d), dtype)
    ct = random_normal(ks[4], (shape.t, shape.d), dtype)
    return x, ids, w, y, ct_sorted, ct


# Each op: (forward, forward+backward) builders over the same argument tuple, per implementation / peer.
# permute args: (x, ids, ct_sorted); unpermute args: (y, sort_idx, w, ct).

def _permute_fns(permute):
    def fwd(x, ids, _ct):
        return permute(x, ids)

    def fb(x, ids, ct):
        out, vjp = jax.vjp(lambda a: permute(a, ids)[0], x)
        return out, vjp(ct)[0]
    return jax.jit(fwd), jax.jit(fb)


def _unpermute_fns(unpermute):
    def fwd(y, idx, w, _ct):
        return unpermute(y, idx, w)

    def fb(y, idx, w, ct):
        out, vjp = jax.vjp(lambda a, b: unpermute(a, idx, b), y, w)
        return (out,) + vjp(ct)
    return jax.jit(fwd), jax.jit(fb)


def ours(impl: str, num_experts: int):
    p = functools.partial(moe_ops.permute, num_experts=num_experts, implementation=impl)
    u = functools.partial(moe_ops.unpermute, implementation=impl)
    return {"permute": _permute_fns(lambda x, ids: p(x, ids)), "unpermute": _unpermute_fns(u)}


@functools.cache
def xla_peers(num_experts: int):
    return {"permute": ("xla:argsort+take", _permute_fns(lambda x, ids: reference.permute(x, ids, num_experts))),
            "unpermute": ("xla:scatter+einsum", _unpermute_fns(reference.unpermute))}


def _bytes(shape: SortShape, op: str, pass_: str, itemsize: int) -> float:
    small, big = shape.t * shape.d * itemsize, shape.t * shape.topk * shape.d * itemsize
    fwd = small + big
    if pass_ == "fwd":
        return fwd
    return 2 * fwd if op == "permute" else 3 * fwd


def _checker(op: str, pass_: str, ref, tol: float):
    names = {("permute", "fwd"): ("x_sorted", "group_sizes", "sort_idx"), ("permute", "fwd+bwd"): ("x_sorted", "dx"),
             ("unpermute", "fwd"): ("out",), ("unpermute", "fwd+bwd"): ("out", "dy", "dweights")}[(op, pass_)]
    exact = op == "permute" and pass_ == "fwd"

    def check(result) -> Parity:
        result = result if isinstance(result, tuple) else (result,)
        errors = {n: rel_err(got, want) for n, got, want in zip(names, result, ref)}
        return Parity(errors, "moe_ops.reference" + (" (exact)" if exact else ""), 0.0 if exact else tol)
    return check


def run_case(shape: SortShape, dtype, pattern, contenders, *, warmup, repeats, emulated_counts=None,
             seed=0) -> list[dict]:
    dname, itemsize = jnp.dtype(dtype).name, jnp.dtype(dtype).itemsize
    n_sets = rotations_for((shape.t + 2 * shape.t * shape.topk) * shape.d * itemsize)
    sets = [make_inputs(shape, dtype, pattern, seed + i) for i in range(n_sets)]
    refp, refu = xla_peers(shape.e)["permute"][1], xla_peers(shape.e)["unpermute"][1]
    x0, ids0, w0, y0, cts0, ct0 = sets[0]
    _, _, idx0 = reference.permute(x0, ids0, shape.e)
    refs = {("permute", "fwd"): refp[0](x0, ids0, cts0), ("permute", "fwd+bwd"): refp[1](x0, ids0, cts0),
            ("unpermute", "fwd"): (refu[0](y0, idx0, w0, ct0),), ("unpermute", "fwd+bwd"): refu[1](y0, idx0, w0, ct0)}
    sizes = np.asarray(refs[("permute", "fwd")][1])
    args = {"permute": [(x, ids, cts) for x, ids, _, _, cts, _ in sets],
            "unpermute": [(y, reference.permute(x, ids, shape.e)[2], w, ct) for x, ids, w, y, _, ct in sets]}
    out = []
    for c in contenders:
        for op in ("permute", "unpermute"):
            for pass_ in ("fwd", "fwd+bwd"):
                name = c["names"][op] if "names" in c else c["name"]
                common = dict(suite="sort", op=op, pass_=pass_, implementation=name, requested=c["requested"],
                              kind=c["kind"], shape=shape.as_dict(), dtype=dname, pattern=pattern.as_dict(),
                              emulated=c["emulated"], routing=routing.describe(sizes),
                              bytes_moved=_bytes(shape, op, pass_, itemsize), extra={"ceiling_basis": "copy"})
                if not c["available"]:
                    out.append(record(status="unavailable", reason=c["reason"], **common))
                    continue
                fn = c["fns"][op][0 if pass_ == "fwd" else 1]
                try:
                    w, r = emulated_counts if c["emulated"] and emulated_counts else (warmup, repeats)
                    timing, parity = measure(fn, args[op], warmup=w, repeats=r,
                                             check=_checker(op, pass_, refs[(op, pass_)], TOL[dname]))
                except Exception as exc:  # noqa: BLE001 - reported per row
                    out.append(record(status="oom" if env.is_oom(exc) else "error", reason=env.reason(exc),
                                      **common))
                    continue
                out.append(record(timing=timing, parity=parity, **common))
    return out


def run_suite(avail, shapes, patterns, dtype, *, warmup, repeats, emulated_counts=None, progress=True,
              records: list | None = None) -> list[dict]:
    """Every (shape, pattern) case, appended to ``records`` (returned; a new list by default) as it finishes."""
    cases = [(s, p) for s in shapes for p in patterns]
    bar = Progress(len(cases), "sort", enabled=progress)
    records = [] if records is None else records
    for shape, pattern in cases:
        contenders = [dict(name=a.implementation, requested=a.requested, kind="moe_ops", emulated=a.emulated,
                           available=a.available, reason=a.reason,
                           fns=ours(a.implementation, shape.e) if a.available else None) for a in avail]
        peers = xla_peers(shape.e)
        contenders.append(dict(names={op: peers[op][0] for op in peers}, name="xla-composition",
                               requested="xla-composition", kind="peer", emulated=None, available=True, reason="",
                               fns={op: peers[op][1] for op in peers}))
        records += run_case(shape, dtype, pattern, contenders, warmup=warmup, repeats=repeats,
                            emulated_counts=emulated_counts)
        bar.step(f"{shape.name} {pattern.label}")
    bar.close()
    return records
