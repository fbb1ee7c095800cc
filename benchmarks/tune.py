"""Config sweep for the Triton GMM / TGMM on a GPU: time a pruned grid of tile configs per shape, print the ranking
next to the shipped choice, and optionally store the winners in the autotune cache.

    python -m benchmarks.tune [--shapes qwen3-30b-w1,decode] [--kinds gmm,dlhs,tgmm,gather_tgmm,swiglu,swiglu_bwd]
                              [--budget-s 120] [--json PATH] [--write-cache] [--list]

Kinds, for a GMM preset (lhs [M,K] @ rhs [E,K,N]): ``gmm`` the forward; ``dlhs`` its input gradient (``[M,N] x
[E,K,N]^T``, the ``gmm`` table with ``transpose_rhs``); ``tgmm`` its weight gradient (``[M,K]^T x [M,N] ->
[E,K,N]``); ``gather_tgmm`` the same with the lhs rows read through a random row permutation (the fused backward's
``dw_gate`` / ``dw_up`` / ``dw_down``, which use the tgmm table). Routing is balanced. Each candidate is compiled
and checked against the shipped config's output on the first call, then timed (median of ``--repeats``); a candidate
that fails to compile or launch, or disagrees, is listed with why. ``--write-cache`` stores each winner in
``kernels.triton.tuning``'s autotune cache (``MOE_OPS_TUNING_CACHE``), which ``pick_config`` then prefers for that
shape bucket; promote lasting winners into ``tuning.TABLES``. ``gather_tgmm`` winners are printed, not cached (they
would overwrite the plain tgmm's entry for the shape). The SwiGLU kinds (``swiglu``: gate/up + activation in one
GMM, saved mode; ``swiglu_bwd``: the saved-mode backward kernel) derive their config from the gmm entry, so their
winners are printed, not cached: promote them into ``kernels.triton.swiglu`` by hand. On CPU only ``--list`` runs
(the candidate grid); timing needs a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

from kernels.host import prefer_cpu_without_accelerator

prefer_cpu_without_accelerator()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import shapes  # noqa: E402
from benchmarks.timing import measure, random_normal, rel_err  # noqa: E402
from kernels.triton import tuning  # noqa: E402

KINDS = ("gmm", "dlhs", "tgmm", "gather_tgmm", "swiglu", "swiglu_bwd")
CACHED = ("gmm", "dlhs", "tgmm")  # kinds whose winners --write-cache stores (the others share a table entry)
# kind -> (tuning table its config derives from, f32 accumulator tiles held at once, B tiles per pipeline stage,
# flops per 2*M*K*N)
SPECS = {"gmm": ("gmm", 1, 1, 1), "dlhs": ("gmm", 1, 1, 1), "tgmm": ("tgmm", 1, 1, 1),
         "gather_tgmm": ("tgmm", 1, 1, 1), "swiglu": ("gmm", 2, 2, 2), "swiglu_bwd": ("gmm", 2, 1, 1)}
SHARED_LIMIT = {"sm90": 227 * 1024, "gfx950": 160 * 1024, "gfx942": 64 * 1024}
# Output tiles (gmm: block_m x block_n; tgmm: block_k x block_n) with the warp counts worth trying for each: wgmma
# wants >= 64 rows per warpgroup; at most 128 f32 accumulator registers per thread (SwiGLU kinds hold 2 tiles).
# Largest first: a sweep cut short by its time budget has tried the likelier winners of compute-bound shapes.
OUT_TILES = {(128, 256): (8,), (256, 128): (8,), (128, 128): (4, 8), (64, 256): (4, 8), (64, 128): (4,),
             (64, 64): (4,)}
DEPTHS = {"gmm": (64, 128), "tgmm": (32, 64, 128)}  # gmm: block_k; tgmm: block_m (rows reduced per step)
# Groups of at most 32 rows (decode): thin gmm tiles on the mma.sync path, deep K steps to stream the weights.
SHORT_TILES = tuple(itertools.product((16, 32), (128, 256), (128, 256)))  # (block_m, block_n, block_k)
# The tile order's L2 locality: the picked gmm config again with these GROUP_M (row tiles per swizzle band). On the
# H200 the Qwen3-30B forward moved ~1.5 MB per 128x256 tile at about the HBM rate, where reuse within an expert's
# 12 tiles should keep it compute-bound (benchmarks/RESULTS.md).
GROUP_MS = (1, 4, 16, 32)
SETTLE_S = 0.5  # seconds of running the shipped config before any timing
TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One kernel problem: ``table`` is the tuning table kind; (m, k, n, g) as ``tuning.pick_config`` sees them."""
    shape: str
    kind: str
    m: int
    k: int
    n: int
    g: int

    @property
    def table(self) -> str:
        return SPECS[self.kind][0]

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * SPECS[self.kind][3]


def problems(shape: shapes.GmmShape, kinds) -> list[Problem]:
    """The kernel problems of a GMM preset (``dlhs`` contracts over N and produces K columns; the SwiGLU kinds read
    the preset as D = K, F = N: gate/up + activation forward in saved mode, and the saved-mode backward kernel)."""
    dims = {kind: (shape.k, shape.n) for kind in KINDS} | {"dlhs": (shape.n, shape.k)}
    return [Problem(shape.name, kind, shape.m, *dims[kind], shape.e) for kind in kinds]


def _smem_bytes(problem: Problem, cfg: tuning.GmmConfig, itemsize: int) -> int:
    """Operand buffers in shared memory: stages x (A tile + B tiles)."""
    if problem.table == "gmm":
        per_stage = cfg.block_m * cfg.block_k + SPECS[problem.kind][2] * cfg.block_k * cfg.block_n
    else:  # tgmm: block_m rows of lhs [BM, BK] and rhs [BM, BN] per step
        per_stage = cfg.block_m * cfg.block_k + cfg.block_m * cfg.block_n
    return cfg.num_stages * per_stage * itemsize


def picked(problem: Problem, dtype, arch: str) -> tuning.GmmConfig:
    """The config the kernel picks for this problem today."""
    cfg = tuning.pick_config(problem.table, problem.m, problem.k, problem.n, problem.g, dtype, arch=arch)
    if problem.kind.startswith("swiglu"):
        from kernels.triton import swiglu as ts  # noqa: PLC0415 (Triton is optional)
        cfg = ts.swiglu_config(cfg) if problem.kind == "swiglu" else ts.swiglu_bwd_config(
            cfg, recompute=False, arch=arch, dtype=dtype)
    return cfg


def candidates(problem: Problem, arch: str = "sm90", dtype=jnp.bfloat16) -> list[tuning.GmmConfig]:
    """The shipped entries for ``dtype`` (SwiGLU kinds: the config their kernel picks) first, then ``OUT_TILES`` x
    ``DEPTHS`` x stages (sm90: 3-5 within shared memory; AMD: 2), pruned to tiles that fit the problem: gmm
    ``block_m`` at most max(64, 2 x rows per group) and 64x64 only for such short groups; no tile dimension above
    twice the problem's; accumulator registers and shared memory within bounds; groups of <= 32 rows try
    ``SHORT_TILES`` first, groups of more than 64 the picked gmm config with each of ``GROUP_MS`` first. Up to
    about 50 per problem."""
    itemsize = jnp.dtype(dtype).itemsize
    rows_per_group = max(1, problem.m // max(problem.g, 1))
    short = rows_per_group <= 64
    if problem.kind.startswith("swiglu"):
        out = [picked(problem, dtype, arch)]
    else:
        out = list(tuning.shipped(arch, problem.table, dtype).values())
    accumulators = SPECS[problem.kind][1]
    if problem.table == "gmm" and not short:
        base = picked(problem, dtype, arch)
        out += [c for c in (dataclasses.replace(base, group_m=g) for g in GROUP_MS if g != base.group_m)
                if _smem_bytes(problem, c, itemsize) <= SHARED_LIMIT[arch]]
    if problem.table == "gmm" and rows_per_group <= 32:
        thin = (tuning.GmmConfig(bm, bn, bk, group_m=1, num_warps=4, num_stages=stages)
                for (bm, bn, bk), stages in itertools.product(SHORT_TILES, (3, 4) if arch == "sm90" else (2,)))
        out += [c for c in thin if c.block_n <= 2 * problem.n and c.block_k <= problem.k
                and _smem_bytes(problem, c, itemsize) <= SHARED_LIMIT[arch]]
    stage_choice = (3, 4, 5) if arch == "sm90" else (2,)
    for ((rows, cols), warp_choice), depth, stages in itertools.product(OUT_TILES.items(), DEPTHS[problem.table],
                                                                        stage_choice):
        if problem.table == "gmm":
            bm, bn, bk = rows, cols, depth
            fits = bm <= max(64, 2 * rows_per_group) and bn <= 2 * problem.n and bk <= problem.k
            fits &= short or (rows, cols) != (64, 64)
        else:
            bm, bk, bn = depth, rows, cols
            fits = bk <= 2 * problem.k and bn <= 2 * problem.n and (rows, cols) != (64, 64)
        for warps in warp_choice:
            cfg = tuning.GmmConfig(bm, bn, bk, group_m=1 if short else 8, num_warps=warps, num_stages=stages)
            if (fits and accumulators * (rows * cols) // (32 * warps) <= 128
                    and _smem_bytes(problem, cfg, itemsize) <= SHARED_LIMIT[arch]):
                out.append(cfg)
    return list(dict.fromkeys(out))


def _runner(problem: Problem, dtype):
    """(inputs, fn(cfg, *inputs)) for the problem on balanced groups."""
    from kernels.triton import gmm as kernels  # noqa: PLC0415 (Triton is optional)
    p = problem
    ks = jax.random.split(jax.random.key(0), 2)
    sizes = jnp.asarray(np.full(p.g, p.m // p.g) + (np.arange(p.g) < p.m % p.g), jnp.int32)
    offset = jnp.zeros((1,), jnp.int32)
    if p.kind.startswith("swiglu"):
        return _swiglu_runner(p, dtype, sizes, offset)
    if p.kind == "tgmm":
        inputs = (random_normal(ks[0], (p.m, p.k), dtype), random_normal(ks[1], (p.m, p.n), dtype))
        return inputs, lambda cfg, a, b: kernels.tgmm(a, b, sizes, offset, num_groups=p.g, out_dtype=dtype,
                                                      config=cfg)
    if p.kind == "gather_tgmm":
        inputs = (random_normal(ks[0], (p.m, p.k), dtype), random_normal(ks[1], (p.m, p.n), dtype),
                  jax.random.permutation(jax.random.key(2), p.m).astype(jnp.int32))
        return inputs, lambda cfg, a, b, perm: kernels.gather_tgmm(
            a, b, sizes, offset, perm, 1, num_groups=p.g, out_dtype=dtype, gather_lhs=True, gather_rhs=False,
            config=cfg)
    transpose = p.kind == "dlhs"
    rhs_shape = (p.g, p.n, p.k) if transpose else (p.g, p.k, p.n)
    inputs = (random_normal(ks[0], (p.m, p.k), dtype), random_normal(ks[1], rhs_shape, dtype, p.k ** -0.5))
    return inputs, lambda cfg, a, b: kernels.gmm(a, b, sizes, offset, transpose_rhs=transpose, out_dtype=dtype,
                                                 config=cfg)


def _swiglu_runner(p: Problem, dtype, sizes, offset):
    """The saved-mode SwiGLU kernels, reading rows through an identity row map (the gather code path)."""
    from kernels.triton import swiglu as ts  # noqa: PLC0415 (Triton is optional)
    ks = jax.random.split(jax.random.key(1), 4)
    sort_idx = jnp.arange(p.m, dtype=jnp.int32)
    w = lambda key, shape: random_normal(key, shape, dtype, shape[1] ** -0.5)
    if p.kind == "swiglu":
        inputs = (random_normal(ks[0], (p.m, p.k), dtype), w(ks[1], (p.g, p.k, p.n)), w(ks[2], (p.g, p.k, p.n)))
        return inputs, lambda cfg, x, wg, wu: ts.swiglu_gmm_saved(x, wg, wu, sizes, offset, sort_idx, 1,
                                                                  activation="silu", out_dtype=dtype, config=cfg)
    inputs = (random_normal(ks[0], (p.m, p.k), dtype), w(ks[1], (p.g, p.n, p.k)),
              random_normal(ks[2], (p.m, p.n), dtype), random_normal(ks[3], (p.m, p.n), dtype))
    weights = jnp.ones((p.m,), jnp.float32)
    return inputs, lambda cfg, dout, wd, gate, up: ts.swiglu_down_bwd_saved(
        dout, wd, gate, up, sizes, offset, sort_idx, weights, 1, activation="silu", config=cfg)


def sweep(problem: Problem, dtype, *, arch: str, budget_s: float, repeats: int) -> dict:
    """Time every candidate (until ``budget_s`` runs out; the first always)
    -> {shipped, rows: [{config, ms, tflops, error}]}."""
    inputs, run = _runner(problem, dtype)
    shipped = picked(problem, dtype, arch)
    reference = jax.jit(lambda *xs: run(shipped, *xs))
    want = reference(*inputs)
    # Clocks up before the first timing (the first config timed read ~5 % slow on an H200).
    settle_until = time.perf_counter() + (SETTLE_S if arch != "cpu" else 0)
    while time.perf_counter() < settle_until:
        jax.block_until_ready(reference(*inputs))
    tol = TOL[jnp.dtype(dtype).name]
    rows, start = [], time.perf_counter()
    for cfg in candidates(problem, "sm90" if arch == "cpu" else arch, dtype):  # cpu: the interpreter (plumbing)
        if rows and time.perf_counter() - start > budget_s:  # at least one is timed
            rows.append({"config": cfg.name, "error": "time budget spent"})
            continue
        fn = jax.jit(lambda *xs, cfg=cfg: run(cfg, *xs))
        try:
            err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(fn(*inputs)), jax.tree.leaves(want)))
            if not err <= tol:
                raise ValueError(f"rel err {err:.2e} vs the shipped config > {tol}")
            seconds = measure(fn, [inputs], warmup=0, repeats=repeats, pipelined=False)[0].median_s
        except Exception as exc:  # noqa: BLE001 - a config that does not compile / launch / agree is a row
            rows.append({"config": cfg.name, "error": str(exc).strip().splitlines()[-1][:160] if str(exc) else
                         type(exc).__name__})
            continue
        rows.append({"config": cfg.name, "fields": dataclasses.asdict(cfg), "ms": seconds * 1e3,
                     "tflops": problem.flops / seconds / 1e12})
    timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    return {**dataclasses.asdict(problem), "shipped": shipped.name, "rows": timed + [r for r in rows if "ms" not in r]}


def _print(result: dict, top: int) -> None:
    timed = [r for r in result["rows"] if "ms" in r]
    shipped = next((r for r in timed if r["config"] == result["shipped"]), None)
    base = f"{shipped['ms']:.3f} ms" if shipped else "not timed"
    print(f"\n{result['shape']} {result['kind']} M={result['m']} K={result['k']} N={result['n']} G={result['g']}: "
          f"shipped {result['shipped']} {base}")
    for r in timed[:top]:
        speedup = f"{shipped['ms'] / r['ms']:.2f}x" if shipped else "-"
        print(f"  {r['config']:36} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s  {speedup} vs shipped")
    failed = [r for r in result["rows"] if "ms" not in r]
    if failed:
        print(f"  ({len(failed)} not timed; first: {failed[0]['config']}: {failed[0]['error']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="qwen3-30b-w1,decode", help="GMM presets (benchmarks.shapes.GMM_SHAPES)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {KINDS}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--budget-s", type=float, default=120.0, help="seconds of sweeping per problem")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--top", type=int, default=8, help="rows printed per problem")
    p.add_argument("--json", help="write every timing here")
    p.add_argument("--write-cache", action="store_true", help="store winners in the autotune cache")
    p.add_argument("--list", action="store_true", help="print the candidate grid per problem and exit (CPU too)")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(kinds) - set(KINDS):
        p.error(f"unknown --kinds {sorted(set(kinds) - set(KINDS))}; valid: {KINDS}")
    dtype = jnp.dtype(args.dtype)
    arch = tuning.detect_arch()
    todo = [q for s in shapes.select(shapes.GMM_SHAPES, args.shapes) for q in problems(s, kinds)]
    if args.list:
        for q in todo:
            grid = candidates(q, "sm90" if arch == "cpu" else arch, dtype)
            print(f"{q.shape} {q.kind}: {len(grid)} candidates: {' '.join(c.name for c in grid)}")
        return 0
    if arch == "cpu":
        p.error("timing needs a GPU (this backend is cpu); --list shows the candidate grid")
    results = []
    for q in todo:
        result = sweep(q, dtype, arch=arch, budget_s=args.budget_s, repeats=args.repeats)
        results.append(result)
        _print(result, args.top)
        best = next((r for r in result["rows"] if "ms" in r), None)
        if args.write_cache and best is not None and q.kind not in CACHED:
            print(f"  (not cached: the {q.kind} config shares the {q.table} table's entry; promote it by hand)")
        elif args.write_cache and best is not None:
            tuning.store(arch, q.table, q.m, q.k, q.n, q.g, dtype, tuning.GmmConfig(**best["fields"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": arch, "device": str(jax.devices()[0]), "dtype": dtype.name, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
