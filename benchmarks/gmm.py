"""GMM / TGMM suite: ``moe_ops.gmm`` forward and forward+backward (dlhs = GMM, drhs = TGMM) vs peers.

Inputs: lhs [M,K], rhs [E,K,N], group sizes from a routing pattern (summing to M), output cotangent ct [M,N].
Parity on the first call of every measured function, against an exact f32 oracle on sampled groups (every group at
small shapes): ``out[rows g] = lhs[rows g] @ rhs[g]``, ``dlhs[rows g] = ct[rows g] @ rhs[g].T``,
``drhs[g] = lhs[rows g].T @ ct[rows g]`` (each group's values depend on nothing else).
Figures: TFLOP/s (2*M*K*N forward, 3x that for forward+backward) and % of the dense-matmul ceiling; the decode case
in GB/s over the weight bytes of non-empty groups and % of the copy rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import moe_ops
from benchmarks import env, routing
from benchmarks.peers import NotApplicable
from benchmarks.records import record
from benchmarks.shapes import GmmShape
from benchmarks.timing import Parity, Progress, measure, random_normal, rel_err, rotations_for

TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
FULL_CHECK_LIMIT = 1 << 24  # M*K*N*E below which every group is checked
HI = jax.lax.Precision.HIGHEST


def make_inputs(shape: GmmShape, dtype, seed: int):
    ks = jax.random.split(jax.random.key(seed), 3)
    lhs = random_normal(ks[0], (shape.m, shape.k), dtype)
    rhs = random_normal(ks[1], (shape.e, shape.k, shape.n), dtype, shape.k ** -0.5)
    ct = random_normal(ks[2], (shape.m, shape.n), dtype)
    return lhs, rhs, ct


def checked_groups(shape: GmmShape, sizes: np.ndarray, seed: int) -> list[int]:
    nonempty = [int(g) for g in np.flatnonzero(sizes)]
    if shape.m * shape.k * shape.n * shape.e <= FULL_CHECK_LIMIT or len(nonempty) <= 2:
        return nonempty
    largest = int(np.argmax(sizes))
    others = [g for g in nonempty if g != largest]
    return [largest, int(np.random.default_rng(seed).choice(others))]


def oracle(lhs, rhs, ct, sizes: np.ndarray, groups: list[int]) -> dict:
    """{group: (row slice, out, dlhs, drhs)} in f32 at HIGHEST precision."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out = {}
    for g in groups:
        rows = slice(int(starts[g]), int(starts[g] + sizes[g]))
        a, w, c = f32(lhs[rows]), f32(rhs[g]), f32(ct[rows])
        out[g] = (rows, jnp.dot(a, w, precision=HI), jnp.dot(c, w.T, precision=HI), jnp.dot(a.T, c, precision=HI))
    return out


def _checker(ref: dict, pass_: str, tol: float, label: str):
    def check(result) -> Parity:
        errors = {}
        for g, (rows, out, dlhs, drhs) in ref.items():
            if pass_ == "fwd":
                errors[f"out[g{g}]"] = rel_err(result[rows], out)
            else:
                errors[f"dlhs[g{g}]"] = rel_err(result[0][rows], dlhs)
                errors[f"drhs[g{g}]"] = rel_err(result[1][g], drhs)
        return Parity(errors, label, tol)
    return check


def _ours(impl: str, variant: str | None = None):
    """Jitted forward and forward+backward of ``moe_ops.gmm``; ``variant`` forces a Triton GMM variant while they
    trace (``kernels.triton.gmm_tma.use_variant``)."""
    def f(lhs, rhs, gs, _ct):
        return moe_ops.gmm(lhs, rhs, gs, implementation=impl)

    def fb(lhs, rhs, gs, ct):  # the forward's output is returned too: unused, XLA drops the forward (peers.fwd_bwd)
        out, vjp = jax.vjp(lambda a, b: moe_ops.gmm(a, b, gs, implementation=impl), lhs, rhs)
        return vjp(ct) + (out,)
    if variant is None:
        return jax.jit(f), jax.jit(fb)
    from kernels.triton.gmm_tma import use_variant  # noqa: PLC0415 (Triton is optional)

    def forced(fn):
        jitted = jax.jit(fn)

        def call(*args):
            with use_variant(variant):
                return jitted(*args)
        return call
    return forced(f), forced(fb)


def _figures(shape: GmmShape, sizes: np.ndarray, pass_: str, itemsize: int) -> dict:
    """flops / bytes / ceiling basis of one record."""
    mult = 1 if pass_ == "fwd" else 3
    if not shape.decode:
        return {"flops": mult * shape.flops(int(sizes.sum())), "bytes_moved": None, "basis": "matmul"}
    weight_bytes = int(np.count_nonzero(sizes)) * shape.k * shape.n * itemsize
    # the issue-3 measure: weight bytes of non-empty groups (activations are < 1 % here). fwd reads them once;
    # fwd+bwd reads them again (dlhs) and writes their gradient (drhs)
    return {"flops": mult * shape.flops(int(sizes.sum())), "bytes_moved": mult * weight_bytes,
            "basis": "copy"}


def run_case(shape: GmmShape, dtype, pattern: routing.Pattern, contenders: list, *, warmup: int, repeats: int,
             emulated_counts: tuple[int, int] | None = None,
             passes=("fwd", "fwd+bwd"), seed: int = 0) -> list[dict]:
    """Records of every contender (dicts from ``contenders``) x pass on one (shape, pattern)."""
    dname = jnp.dtype(dtype).name
    sizes = routing.group_sizes(shape.m, shape.e, pattern, seed=seed)
    itemsize = jnp.dtype(dtype).itemsize
    n_sets = rotations_for((shape.m * (shape.k + shape.n) + shape.e * shape.k * shape.n) * itemsize)
    groups = checked_groups(shape, sizes, seed)
    try:
        sets = [make_inputs(shape, dtype, seed + i) for i in range(n_sets)]
        ref = oracle(*sets[0], sizes, groups)
    except Exception as exc:  # noqa: BLE001 - without inputs and a reference there is no checked measurement
        sets, ref, setup_error = None, None, exc
    else:
        setup_error = None
    label = f"f32 oracle on groups {groups}" if len(groups) < shape.e else "f32 oracle on every group"
    out = []
    for c in contenders:
        for pass_ in passes:
            fig = _figures(shape, sizes, pass_, itemsize)
            common = dict(suite="gmm", op="gmm", pass_=pass_, implementation=c["name"], requested=c["requested"],
                          kind=c["kind"], shape=shape.as_dict(), dtype=dname, pattern=pattern.as_dict(),
                          emulated=c["emulated"], routing=routing.describe(sizes), flops=fig["flops"],
                          bytes_moved=fig["bytes_moved"], config=c.get("config"),
                          extra={"ceiling_basis": fig["basis"], "note": c.get("note", "")})
            if not c["available"]:
                out.append(record(status="unavailable", reason=c["reason"], **common))
                continue
            if setup_error is not None:
                out.append(record(status="oom" if env.is_oom(setup_error) else "error",
                                  reason=f"inputs / oracle failed: {env.reason(setup_error)}", **common))
                continue
            try:
                inputs = [c["prepare"](lhs, rhs, sizes, ct) for lhs, rhs, ct in sets]
                fn = c["fwd"] if pass_ == "fwd" else c["fwd_bwd"]
                w, r = emulated_counts if c["emulated"] and emulated_counts else (warmup, repeats)
                timing, parity = measure(fn, inputs, warmup=w, repeats=r,
                                         check=_checker(ref, pass_, TOL[dname], label))
                del inputs
            except NotApplicable as exc:
                out.append(record(status="unavailable", reason=str(exc), **common))
                continue
            except Exception as exc:  # noqa: BLE001 - reported per row (OOM of ragged_dot's backward included)
                out.append(record(status="oom" if env.is_oom(exc) else "error", reason=env.reason(exc), **common))
                continue
            out.append(record(timing=timing, parity=parity, **common))
    return out


TRITON_VARIANTS = ("pointer", "tma")


def contenders(avails, peer_list, variants=TRITON_VARIANTS) -> list:
    """moe_ops implementations (already probed) then peers, as dicts for ``run_case`` (``config`` filled per shape);
    Triton once per GMM variant in ``variants``."""
    out = []
    for a in avails:
        # Triton: every GMM variant side by side (the pointer kernel is the default, see kernels.triton.gmm_tma)
        for variant in variants if a.implementation == "triton" else (None,):
            f, fb = _ours(a.implementation, variant) if a.available else (None, None)
            name = a.implementation if variant in (None, "pointer") else f"{a.implementation}[{variant}]"
            out.append(dict(name=name, requested=a.requested, kind="moe_ops", emulated=a.emulated,
                            available=a.available, reason=a.reason, config=None,
                            prepare=lambda lhs, rhs, sizes, ct: (lhs, rhs, jnp.asarray(sizes, jnp.int32), ct),
                            fwd=f, fwd_bwd=fb, note=f"gmm variant {variant}" if variant else ""))
    for p in peer_list:
        out.append(dict(name=p.name, requested=p.name, kind="peer", emulated=None, available=p.available,
                        reason=p.reason, prepare=p.prepare, fwd=p.fwd, fwd_bwd=p.fwd_bwd, note=p.note))
    return out


def run_suite(avails, peer_list, shapes, patterns, dtype, *, warmup, repeats, emulated_counts=None,
              progress=True, variants=TRITON_VARIANTS, records: list | None = None) -> list[dict]:
    """Every (shape, pattern) case; ``emulated_counts``: (warmup, repeats) for the emulated implementations (the
    Triton interpreter, Pallas interpret mode), the others run ``warmup`` / ``repeats``. Each case's records are
    appended to ``records`` (returned; a new list by default) as it finishes."""
    dname = jnp.dtype(dtype).name
    cases = [(s, p) for s in shapes for p in patterns]
    bar = Progress(len(cases), "gmm", enabled=progress)
    records = [] if records is None else records
    base = contenders(avails, peer_list, variants)
    for shape, pattern in cases:
        for c in base:  # the config the kernel picks depends on the shape
            if c["kind"] == "moe_ops" and c["available"]:
                c["config"] = env.kernel_config(c["name"].split("[")[0], "gmm", m=shape.m, k=shape.k, n=shape.n,
                                                e=shape.e, dtype=dname)
        records += run_case(shape, dtype, pattern, base, warmup=warmup, repeats=repeats,
                            emulated_counts=emulated_counts)
        bar.step(f"{shape.name} {pattern.label}")
    bar.close()
    return records
