"""The issues' performance targets, judged from one run's records (same-run ratios only; meaningful on a GPU);
``report.targets_table`` prints them.

* GMM (issue 11), per moe_ops implementation of the ``gmm`` suite, each judged on the synchronised figures and on
  the back-to-back (``pipelined``) ones: forward and forward+backward >= 1.0x ``torch._grouped_mm`` (geomean over
  the training shapes measured), Mixtral forward >= 85 % of the dense-matmul ceiling, Qwen3-30B forward+backward
  >= 500 TFLOP/s, 4x skew (``hot:1:4``) <= 1.10x balanced, decode >= 90 % of the copy rate.
* Layer (issue 12), per fused ``moe_ffn`` forward+backward row: >= 2x the best JAX composition, >= 1.15x our
  unfused path, compiled peak <= 0.7x the unfused path.
"""

from __future__ import annotations

import math

LAYER = {"vs_best_composition": 2.0, "vs_unfused": 1.15, "peak_vs_unfused": 0.7}
TRAINING_SHAPES = 6  # issue 11's geomeans are over the six training presets (benchmarks.shapes.GMM_SHAPES)
PEER = "torch._grouped_mm"


def judge(records: list[dict]) -> list[dict]:
    """Every target the records can say something about: GMM rows, then layer rows."""
    return gmm_targets(records) + layer_targets(records)


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _pipelined_ceilings(records: list[dict]) -> dict:
    """The same run's ceilings from their back-to-back times: {"matmul": TFLOP/s, "copy": GB/s}."""
    out = {}
    for r in records:
        if r["suite"] != "ceiling" or r["status"] != "ok" or not r["pipelined_ms"]:
            continue
        if r["op"] == "dense_matmul" and r["flops"]:
            out["matmul"] = max(out.get("matmul", 0.0), r["flops"] / r["pipelined_ms"] / 1e9)
        elif r["op"] == "copy" and r["bytes"]:
            out["copy"] = max(out.get("copy", 0.0), r["bytes"] / r["pipelined_ms"] / 1e6)
    return out


def _pipelined_rate(r: dict) -> float | None:
    """TFLOP/s (matmul basis) or GB/s (copy basis) of the back-to-back time."""
    if not r["pipelined_ms"]:
        return None
    if r["ceiling_basis"] == "copy":
        return r["bytes"] / r["pipelined_ms"] / 1e6 if r["bytes"] else None
    return r["flops"] / r["pipelined_ms"] / 1e9 if r["flops"] else None


def _row(impl, target, threshold, value, pipelined, detail, at_most=False) -> dict:
    def met(v):
        return None if v is None else (v <= threshold if at_most else v >= threshold)
    return {"suite": "gmm", "implementation": impl, "target": target, "threshold": threshold, "value": value,
            "pipelined": pipelined, "met": met(value), "pipelined_met": met(pipelined), "detail": detail}


def gmm_targets(records: list[dict]) -> list[dict]:
    ours = [r for r in records if r["suite"] == "gmm" and r["kind"] == "moe_ops" and r["status"] == "ok"
            and not r["emulated"]]
    ceil = _pipelined_ceilings(records)
    out = []
    for impl in dict.fromkeys(r["implementation"] for r in ours):
        rows = [r for r in ours if r["implementation"] == impl]
        bal = [r for r in rows if (r["pattern"] or {}).get("name") == "balanced"]
        train = [r for r in bal if r["ceiling_basis"] == "matmul"]
        for pass_ in ("fwd", "fwd+bwd"):
            vs = [r for r in train if r["pass"] == pass_ and PEER in r["ratio_to"]]
            if vs:
                out.append(_row(impl, f"{pass_} vs {PEER} (geomean)", 1.0,
                                _geomean([r["ratio_to"][PEER] for r in vs]),
                                _geomean([r["pipelined_ratio_to"][PEER] for r in vs
                                          if PEER in r["pipelined_ratio_to"]]),
                                f"{len(vs)} of {TRAINING_SHAPES} training shapes"))
        mixtral = [r for r in train if r["pass"] == "fwd" and r["shape"]["name"].startswith("mixtral")]
        if mixtral:
            piped = [_pipelined_rate(r) for r in mixtral]
            out.append(_row(impl, "Mixtral fwd % of dense ceiling (worst)", 85.0,
                            min(r["pct_of_ceiling"] for r in mixtral),
                            min(100 * p / ceil["matmul"] for p in piped) if "matmul" in ceil and all(piped) else None,
                            ", ".join(r["shape"]["name"] for r in mixtral)))
        for r in train:
            if r["pass"] == "fwd+bwd" and r["shape"]["name"] == "qwen3-30b-w1":
                out.append(_row(impl, "Qwen3-30B fwd+bwd TFLOP/s", 500.0, r["tflops"], _pipelined_rate(r),
                                "M65536 K2048 N768 E128"))
        skew = [r for r in rows if (r["pattern"] or {}).get("label") == "hot:1:4" and r["slowdown_vs_balanced"]]
        if skew:
            piped = [r["pipelined_slowdown_vs_balanced"] for r in skew]
            out.append(_row(impl, "4x skew (hot:1:4) slowdown vs balanced (worst)", 1.10,
                            max(r["slowdown_vs_balanced"] for r in skew), max(piped) if all(piped) else None,
                            f"{len({r['shape']['name'] for r in skew})} shapes, fwd and fwd+bwd", at_most=True))
        for r in bal:
            if r["pass"] == "fwd" and r["ceiling_basis"] == "copy":
                p = _pipelined_rate(r)
                out.append(_row(impl, f"{r['shape']['name']} fwd % of copy rate", 90.0, r["pct_of_ceiling"],
                                100 * p / ceil["copy"] if p and "copy" in ceil else None, "weight bytes read"))
    return out


def layer_targets(records: list[dict]) -> list[dict]:
    """Issue 12's same-run ratios for every measured fused ``moe_ffn`` forward+backward row of ours in the layer suite
    (an implementation whose ``moe_ffn:unfused`` variant was measured beside it, i.e. ``moe_ffn`` fuses there):
    speed vs the fastest layer composition (``<gemm>+argsort`` peer rows) and vs our own unfused path, and the
    compiled peak (and temp) bytes vs the unfused path, each with whether it meets ``LAYER`` (None: not measured,
    e.g. no composition ran)."""
    peer_names = {r["implementation"] for r in records if r["suite"] == "layer" and r["kind"] == "peer"}
    out = []
    for r in records:
        if (r["suite"], r["op"], r["pass"], r["kind"], r["status"]) != ("layer", "moe_ffn", "fwd+bwd", "moe_ops",
                                                                         "ok") or r["emulated"]:
            continue
        if f"{r['implementation']}:unfused" not in r["ratio_to"]:
            continue  # not the fused path (or its unfused twin did not run): the targets do not apply
        comps = {k: v for k, v in r["ratio_to"].items() if k in peer_names}
        best = min(comps, key=comps.get) if comps else None
        row = {"suite": "layer", "implementation": r["implementation"], "shape": r["shape"]["name"],
               "pattern": (r["pattern"] or {}).get("label"), "best_composition": best,
               "vs_best_composition": comps.get(best), "vs_unfused": r["ratio_to"].get(
                   f"{r['implementation']}:unfused"), "peak_vs_unfused": r["peak_vs_unfused"],
               "temp_vs_unfused": r["temp_vs_unfused"], "peak_floor_vs_unfused": _peak_floor(r)}
        row["met"] = {k: (None if row[k] is None else (row[k] <= t if k == "peak_vs_unfused" else row[k] >= t))
                      for k, t in LAYER.items()}
        out.append(row)
    return out


def _peak_floor(r: dict) -> float | None:
    """The lowest ``peak_vs_unfused`` any path can reach: the arguments and outputs (weights, inputs and their
    gradients) over the unfused peak. At Qwen3-30B on an H200 it read 0.84, above the 0.7 target."""
    mem, ratio = r["memory"] or {}, r["peak_vs_unfused"]
    if not ratio or not mem.get("peak_bytes") or None in (mem.get("argument_bytes"), mem.get("output_bytes")):
        return None
    return (mem["argument_bytes"] + mem["output_bytes"] - mem.get("alias_bytes", 0)) * ratio / mem["peak_bytes"]
