"""The fused MoE layer's Triton kernels one by one, each next to the alternative it replaced, at a layer shape:

    python -m benchmarks.pieces [--shapes qwen3-30b] [--dtype bfloat16] [--repeats 10] [--json PATH] [--tiny]

What the layer suite cannot show: where the fused forward+backward spends its time. Rows, for M = T*k sorted rows
(balanced routing, saved mode, as ``moe_ops.swiglu.swiglu_ffn`` runs them):

* forward: ``swiglu_gmm_saved`` (gate/up + activation, writes h / gate / up), ``scatter_gmm`` (weighted down);
* backward: ``swiglu_down_bwd_saved``; ``dw_gate``: ``gather_tgmm`` over x in token order vs ``gather_rows`` +
  ``tgmm``; ``dw_down``: ``gather_tgmm`` of ``hw`` (the routing weight applied by the backward kernel) over dout
  in token order vs ``gather_rows`` + ``tgmm``; ``dx``:
  ``scatter_gmm_sum`` (one launch) vs two ``scatter_gmm``;
* the row-tile table every GMM-family launch computes first in XLA ops (``validation.clamp_group_sizes``, then
  ``schedule.gmm_row_tiles``; again with the TMA variant's ``order_tiles``): device time outside the kernels.

Each pair is checked to agree (norm-relative error <= the dtype's tolerance) before it is timed; a disagreement is
an error row and exit status 1. On CPU (always the tiny presets) the kernels run in the Triton interpreter: the
timings mean nothing there, the plumbing and the agreement checks are what runs (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import json
import sys

from kernels.host import prefer_cpu_without_accelerator

prefer_cpu_without_accelerator()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import moe_ops  # noqa: E402
from benchmarks import routing, shapes  # noqa: E402
from benchmarks.timing import measure, random_normal, rel_err  # noqa: E402
from moe_ops import validation  # noqa: E402

TOL = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-4}


def _operands(shape: shapes.LayerShape, dtype, seed: int = 0) -> dict:
    """Routed operands of the layer's kernels (arrays only): x / dout [T,D], weights [T,k], the three weights,
    group sizes, sort_idx and a zero group offset."""
    t, d, f, e, k = shape.t, shape.d, shape.f, shape.e, shape.topk
    ids = jnp.asarray(routing.expert_ids(t, e, k, routing.BALANCED, seed=seed))
    sizes, sort_idx = moe_ops.sort_by_expert(ids, e)
    ks = jax.random.split(jax.random.key(seed), 6)
    return dict(x=random_normal(ks[0], (t, d), dtype), dout=random_normal(ks[1], (t, d), dtype),
                w_gate=random_normal(ks[2], (e, d, f), dtype, d ** -0.5),
                w_up=random_normal(ks[3], (e, d, f), dtype, d ** -0.5),
                w_down=random_normal(ks[4], (e, f, d), dtype, f ** -0.5),
                weights=jax.random.uniform(ks[5], (t, k), jnp.float32, 0.1, 1.0),
                sizes=sizes, sort_idx=sort_idx, offset=jnp.zeros((1,), jnp.int32))


def pieces(k: int, e: int, dtype):
    """[(name, fn, alternative name or None, alternative fn or None, flops per 2*M*D*F)]: each fn maps the operand
    dict (``_operands`` plus the forward's ``gate`` / ``up`` / ``h`` and the backward kernel's ``dgate`` / ``dup`` /
    ``hw``, see ``run``) to its outputs."""
    from kernels.triton import batching, fused, gmm, gmm_tma, schedule, swiglu, tuning  # noqa: PLC0415 (optional)
    tg = dict(num_groups=e, out_dtype=dtype)

    def block_m(a):  # the row tile the gate/up GMM's config picks here
        return tuning.pick_config("gmm", a["sort_idx"].shape[0], a["x"].shape[1], a["w_gate"].shape[2], e,
                                  dtype).block_m

    def tiles(a):  # what a moe_ops GMM-family call computes before its kernel: clamped sizes, then the table
        rows = a["sort_idx"].shape[0]
        return schedule.gmm_row_tiles(validation.clamp_group_sizes(a["sizes"], rows), a["offset"], rows, e,
                                      block_m(a))

    def common(a):
        return a["sizes"], a["offset"], a["sort_idx"]

    def fwd_swiglu(a):
        return swiglu.swiglu_gmm_saved(a["x"], a["w_gate"], a["w_up"], *common(a), k, activation="silu",
                                       out_dtype=dtype)

    def bwd_kernel(a):
        w_sorted = a["weights"].reshape(-1)[a["sort_idx"]]
        return swiglu.swiglu_down_bwd_saved(a["dout"], a["w_down"], a["gate"], a["up"], *common(a), w_sorted, k,
                                            activation="silu")

    def scatter(a, h, w, weights, transpose):
        return fused.scatter_gmm(h, w, *common(a), weights, transpose_rhs=transpose, out_dtype=dtype)

    def ones(a):
        return jnp.ones_like(a["weights"])

    def gathered(a, name):
        return batching.gather_rows(a[name], a["sort_idx"], k)
    return [
        ("fwd swiglu_gmm_saved", fwd_swiglu, None, None, 2),
        ("fwd scatter_gmm (down)", lambda a: scatter(a, a["h"], a["w_down"], a["weights"], False), None, None, 1),
        ("bwd swiglu_down_bwd_saved", bwd_kernel, None, None, 1),
        ("bwd dw_gate gather_tgmm(x)",
         lambda a: gmm.gather_tgmm(a["x"], a["dgate"], *common(a)[:2], a["sort_idx"], k, gather_lhs=True,
                                   gather_rhs=False, **tg),
         "gather_rows + tgmm", lambda a: gmm.tgmm(gathered(a, "x"), a["dgate"], *common(a)[:2], **tg), 1),
        ("bwd dw_down gather_tgmm(dout)",
         lambda a: gmm.gather_tgmm(a["hw"], a["dout"], *common(a)[:2], a["sort_idx"], k, gather_lhs=False,
                                   gather_rhs=True, **tg),
         "gather_rows + tgmm", lambda a: gmm.tgmm(a["hw"], gathered(a, "dout"), *common(a)[:2], **tg), 1),
        ("bwd dx scatter_gmm_sum",
         lambda a: fused.scatter_gmm_sum(a["dgate"], a["w_gate"], a["dup"], a["w_up"], *common(a), ones(a),
                                         transpose_rhs=True, out_dtype=dtype),
         "2 x scatter_gmm",
         lambda a: (scatter(a, a["dgate"], a["w_gate"], ones(a), True).astype(jnp.float32)
                    + scatter(a, a["dup"], a["w_up"], ones(a), True).astype(jnp.float32)).astype(dtype), 2),
        ("row-tile table (XLA ops)", tiles, None, None, 0),
        ("row-tile table + order_tiles (tma)",
         lambda a: gmm_tma.order_tiles(tiles(a), a["sort_idx"].shape[0], block_m(a)), None, None, 0),
    ]


def _time(fn, arrays, repeats: int) -> float:
    """ms per call issued back-to-back (``timing.measure``'s pipelined figure): a piece is one or two launches,
    so a synchronised call would time the host's dispatch and sync as much as the kernel."""
    return measure(jax.jit(fn), [(arrays,)], warmup=1, repeats=repeats)[0].pipelined_s * 1e3


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run(shape: shapes.LayerShape, dtype, repeats: int = 10) -> list[dict]:
    """One row per piece: ms (and TFLOP/s), the alternative's ms, and their agreement."""
    a = _operands(shape, dtype)
    table = pieces(shape.topk, shape.e, dtype)
    a["h"], a["gate"], a["up"] = jax.jit(table[0][1])(a)
    a["dgate"], a["dup"], a["hw"], _ = jax.jit(table[2][1])(a)
    mdf = 2.0 * shape.t * shape.topk * shape.d * shape.f
    tol = TOL[jnp.dtype(dtype).name]
    rows = []
    for name, fn, alt_name, alt, flops in table:
        row = {"shape": shape.name, "piece": name, "alternative": alt_name}
        if alt is not None:
            got, want = jax.tree.leaves(jax.jit(fn)(a)), jax.tree.leaves(jax.jit(alt)(a))
            err = max(rel_err(x, y) for x, y in zip(got, want))
            row["rel_err"] = err
            if not err <= tol:
                rows.append({**row, "error": f"disagrees with {alt_name}: rel err {err:.2e} > {tol}"})
                continue
        ms = _time(fn, a, repeats)
        row.update(ms=ms, tflops=flops * mdf / ms / 1e9 if flops else None)
        if alt is not None:
            row["alternative_ms"] = _time(alt, a, repeats)
            row["speedup"] = row["alternative_ms"] / ms
        rows.append(row)
    return rows


def _print(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:12} {r['piece']:34} ERROR {r['error']}")
            continue
        alt = (f"   vs {r['alternative']} {r['alternative_ms']:8.3f} ms = {r['speedup']:.2f}x"
               if r["alternative"] else "")
        rate = f"{r['tflops']:7.1f} TFLOP/s" if r["tflops"] else " " * 15
        print(f"{r['shape']:12} {r['piece']:34} {r['ms']:8.3f} ms {rate}{alt}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pieces", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen3-30b", help="layer presets (benchmarks.shapes.LAYER_SHAPES)")
    p.add_argument("--tiny", action="store_true", help="tiny presets (always on CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(TOL))
    p.add_argument("--repeats", type=_positive, default=10)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    presets = shapes.LAYER_TINY if args.tiny or jax.default_backend() == "cpu" else shapes.LAYER_SHAPES
    rows = [r for s in shapes.select(presets, args.shapes) for r in run(s, jnp.dtype(args.dtype), args.repeats)]
    _print(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(jax.devices()[0]), "dtype": args.dtype, "rows": rows}, fh, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
