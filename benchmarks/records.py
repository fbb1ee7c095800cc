"""One JSON record per measurement (schema in benchmarks/README.md), and the cross-record ratios.

Every record carries the device and versions it was measured with, so records can be pooled across runs.
"""

from __future__ import annotations

import datetime

from benchmarks import env

# 2: memory, peak_vs_unfused, temp_vs_unfused; ratios across moe_ffn variants / peers. 3: pipelined_ms / _ratio_to
SCHEMA_VERSION = 4


def record(*, suite: str, op: str, pass_: str, implementation: str, kind: str, shape: dict, dtype: str,
           pattern: dict | None = None, requested: str | None = None, emulated: str | None = None,
           status: str = "ok", reason: str = "", timing=None, parity=None, flops: float | None = None,
           bytes_moved: float | None = None, config: str | None = None, routing: dict | None = None,
           memory: dict | None = None, extra: dict | None = None) -> dict:
    """A measurement (``status`` ok) or the reason there is none (unavailable / error / oom / parity_fail)."""
    rec = {
        "schema_version": SCHEMA_VERSION, "suite": suite, "op": op, "pass": pass_,
        "implementation": implementation, "requested": requested or implementation, "kind": kind,
        "emulated": emulated is not None, "emulation": emulated, "status": status, "reason": reason,
        "shape": shape, "dtype": dtype, "pattern": pattern, "routing": routing, "config": config,
        "time_ms": None, "samples_ms": None, "warmup": None, "repeats": None, "rotations": None,
        "flops": flops, "tflops": None, "bytes": bytes_moved, "gbps": None,
        "ceiling_basis": None, "pct_of_ceiling": None, "ceiling": None, "ratio_to": {}, "pipelined_ms": None,
        "pipelined_ratio_to": {}, "slowdown_vs_balanced": None,
        "pipelined_slowdown_vs_balanced": None,
        "memory": memory, "peak_vs_unfused": None, "temp_vs_unfused": None,
        "parity": parity.as_dict() if parity is not None else None, "note": "",
        "device": env.device(), "versions": env.versions(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if timing is not None:
        rec.update(timing.as_dict())
        t = timing.median_s
        if flops:
            rec["tflops"] = flops / t / 1e12
        if bytes_moved:
            rec["gbps"] = bytes_moved / t / 1e9
    if parity is not None and status == "ok" and not parity.ok:
        rec["status"] = "parity_fail"
        rec["reason"] = f"max rel err {parity.max_rel_err:.3g} > tol {parity.tol:g} vs {parity.against}"
    if extra:
        rec.update(extra)
    return rec


def op_family(op: str) -> str:
    """The op whose rows are compared with each other: a layer op's variants (``moe_ffn:unfused``, ...; the layer
    peers are ``moe_ffn`` rows) share its name before the colon (``gpt_oss_ffn`` / ``gpt_oss_ffn:unfused`` are
    another family); every other op is its own family."""
    head = op.split(":", 1)[0]
    return head if head in _LAYER_OPS else op


_LAYER_OPS = ("moe_ffn", "gpt_oss_ffn")


def contender(rec: dict) -> str:
    """The name a row goes by in other rows' ``ratio_to``: its implementation, plus the variant for layer variants
    (``triton:unfused``, ``triton:fused-no-swiglu``)."""
    op = rec["op"]
    return rec["implementation"] if op == op_family(op) else f"{rec['implementation']}:{op.split(':', 1)[1]}"


def _key(rec: dict) -> tuple:
    return rec["suite"], op_family(rec["op"]), rec["pass"], rec["shape"].get("name"), rec["dtype"], \
        (rec["pattern"] or {}).get("label")


def add_ratios(records: list[dict], ceilings: dict) -> None:
    """Fill ``ratio_to`` (other's time / this time: > 1 means this is faster; ``pipelined_ratio_to`` the same of
    the back-to-back ``pipelined_ms``), ``slowdown_vs_balanced`` (and ``pipelined_slowdown_vs_balanced``) and
    ``pct_of_ceiling`` (TFLOP/s vs the dense matmul, or GB/s vs the copy rate) in place. Emulated records take no
    part: they get none of the three and are no other record's comparison. Rows compared: same suite, op family
    (``op_family``), pass, shape, dtype and pattern. Our fused layer rows, emulated ones included, also get
    ``peak_vs_unfused`` / ``temp_vs_unfused``: their compiled peak / temp bytes over the same implementation's
    unfused row of their op family (``moe_ffn:unfused``, ``gpt_oss_ffn:unfused``)."""
    timed = [r for r in records if r["status"] == "ok" and r["time_ms"] and not r["emulated"]]
    for r in records:  # an emulated time (interpreter / interpret mode) says nothing about the hardware: no ratios
        if r["emulated"] and r["status"] == "ok":
            r["note"] = r["note"] or "emulated: no ratios or % of ceiling"
    groups: dict = {}
    for r in timed:
        groups.setdefault(_key(r), []).append(r)
    for r in timed:
        for other in groups[_key(r)]:
            if other is not r:
                r["ratio_to"][contender(other)] = other["time_ms"] / r["time_ms"]
                if r["pipelined_ms"] and other["pipelined_ms"]:
                    r["pipelined_ratio_to"][contender(other)] = other["pipelined_ms"] / r["pipelined_ms"]
        if r["pattern"] and r["pattern"].get("name") != "balanced":
            key = _key(r)[:-1] + ("balanced",)
            base = [b for b in groups.get(key, []) if contender(b) == contender(r)]
            if base:
                r["slowdown_vs_balanced"] = r["time_ms"] / base[0]["time_ms"]
                if r["pipelined_ms"] and base[0]["pipelined_ms"]:
                    r["pipelined_slowdown_vs_balanced"] = r["pipelined_ms"] / base[0]["pipelined_ms"]
        basis = r.get("ceiling_basis")
        if basis == "copy" and r["gbps"] and ceilings.get("copy_gbps"):
            r["pct_of_ceiling"], r["ceiling"] = 100 * r["gbps"] / ceilings["copy_gbps"], "copy"
        elif basis == "matmul" and r["tflops"] and ceilings.get("matmul_tflops"):
            r["pct_of_ceiling"], r["ceiling"] = 100 * r["tflops"] / ceilings["matmul_tflops"], "matmul"
    # memory ratios also on emulated rows: buffer sizes are a property of the compiled program, not of its speed
    unfused = {(_key(u), u["implementation"]): u["memory"] for u in records
               if u["status"] == "ok" and u["op"].endswith(":unfused") and u["memory"]}
    for r in records:
        base = unfused.get((_key(r), r["implementation"]))   # the unfused row of the same layer op family
        if r["status"] != "ok" or r["kind"] != "moe_ops" or r["op"].endswith(":unfused") or not r["memory"] \
                or not base:
            continue
        mem = r["memory"]
        r["peak_vs_unfused"] = mem["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
        r["temp_vs_unfused"] = mem["temp_bytes"] / base["temp_bytes"] if base["temp_bytes"] else None
