"""Hardware counters (Nsight Compute) of one call of each target at one GMM shape: where our kernels lose time to
the peers', counted instead of timed.

    python -m benchmarks.profile [--shape qwen3-30b-w1] [--targets gmm,gmm:tma,torch._grouped_mm,torch.bmm]
                                 [--json PATH] [--ncu ncu] [--timeout-s 240] [--tiny]

Each target runs in a process of its own under ``ncu --profile-from-start off``. The process builds its inputs
(balanced routing), compiles the target and warms it up, then brackets one call with ``cudaProfilerStart`` /
``cudaProfilerStop``: exactly that call's kernels are profiled (ours: the row-tile table's XLA kernels, then the
Triton kernel; the peers: their CUTLASS / cuBLAS kernels). Clocks are left alone (``--clock-control none``).

Per kernel: duration; DRAM bytes read and written, next to the problem's compulsory bytes (each operand read once,
the output written once); L2 hit rate and L2 traffic; SM and tensor-pipe utilisation; registers, grid, shared
memory, achieved occupancy; the three largest warp-stall reasons. The counters are requested by name
(``METRICS``); if this ncu rejects one, the run is repeated with the stock sections (``SECTIONS``) and the summary
reads whatever they hold.

Targets: our kernels by the kinds of ``benchmarks.tune`` (``gmm`` the default pointer variant, ``gmm:tma`` the TMA
variant, ``dlhs``, ``tgmm``, ``gather_tgmm``, ``swiglu``, ``swiglu_bwd``, each on the config the kernel picks) and
the GMM peers ``torch._grouped_mm`` and ``torch.bmm``. A target that cannot run (no ncu on the PATH, no CUDA torch)
is reported ``unavailable`` with the reason; ``--child TARGET`` runs one target's process without the profiler.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from kernels.host import prefer_cpu_without_accelerator

prefer_cpu_without_accelerator()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import gmm as gmm_suite, peers, routing, shapes, tune  # noqa: E402

OURS = ("gmm", "gmm:tma", "dlhs", "tgmm", "gather_tgmm", "swiglu", "swiglu_bwd")
PEERS = ("torch._grouped_mm", "torch.bmm")
METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum",
           "lts__t_sector_hit_rate.pct", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
           "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread", "launch__grid_size",
           "launch__block_size", "launch__shared_mem_per_block_dynamic", "launch__shared_mem_per_block_static",
           "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
           r"regex:sm__pipe_tensor.*cycles_active\.avg\.pct_of_peak_sustained_(active|elapsed)",
           r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio")
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
UNAVAILABLE_RC = 3  # a child's exit status for "this target cannot run here" (its reason on stderr)
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
_TENSOR = re.compile(r"sm__pipe_tensor\w*cycles_active\.avg\.pct_of_peak_sustained_(active|elapsed)")


class Unavailable(Exception):
    """The target cannot run on this machine (the message says why)."""


# ---------------------------------------------------------------------------------------------------------------
# The child: one target, one profiled call.


def _target(name: str, shape: shapes.GmmShape, dtype):
    """(fn, args): one call of the target on balanced routing at ``shape``."""
    sizes = routing.group_sizes(shape.m, shape.e, routing.BALANCED)
    if name in PEERS:
        peer = peers.gmm_peers([name])[0]
        if not peer.available:
            raise Unavailable(peer.reason)
        lhs, rhs, ct = gmm_suite.make_inputs(shape, dtype, 0)
        try:
            return peer.fwd, peer.prepare(lhs, rhs, sizes, ct)
        except peers.NotApplicable as exc:
            raise Unavailable(str(exc)) from exc
    if name in ("gmm", "gmm:tma"):
        import moe_ops  # noqa: PLC0415
        from kernels.triton.gmm_tma import use_variant  # noqa: PLC0415 (Triton is optional)
        lhs, rhs, _ = gmm_suite.make_inputs(shape, dtype, 0)
        jitted = jax.jit(lambda a, b, gs: moe_ops.gmm(a, b, gs, implementation="triton"))

        def call(*args):
            with use_variant("tma" if name == "gmm:tma" else "pointer"):
                return jitted(*args)
        return call, (lhs, rhs, jnp.asarray(sizes))
    problem = tune.problems(shape, [name])[0]
    inputs, run = tune._runner(problem, dtype)
    arch = tune.tuning.detect_arch()
    cfg = tune.picked(problem, dtype, "sm90" if arch == "cpu" else arch)
    return jax.jit(lambda *xs: run(cfg, *xs)), inputs


def _sync(out) -> None:
    if type(out).__module__.startswith("torch"):
        import torch  # noqa: PLC0415
        torch.cuda.synchronize()
    else:
        jax.block_until_ready(out)


def _profiler_api():
    """(start, stop) of the CUDA profiler API (torch's binding, else libcudart), or no-ops without CUDA."""
    try:
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            rt = torch.cuda.cudart()
            return rt.cudaProfilerStart, rt.cudaProfilerStop
    except ImportError:
        pass
    for lib in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            cudart = ctypes.CDLL(lib)
            return cudart.cudaProfilerStart, cudart.cudaProfilerStop
        except OSError:
            continue
    return (lambda: None), (lambda: None)


@contextlib.contextmanager
def profiled():
    """Only the work inside the block is profiled under ``ncu --profile-from-start off``."""
    start, stop = _profiler_api()
    start()
    try:
        yield
    finally:
        stop()


def child(name: str, shape: shapes.GmmShape, dtype, warmup: int = 3) -> int:
    try:
        fn, args = _target(name, shape, dtype)
    except Unavailable as exc:
        print(f"UNAVAILABLE: {exc}", file=sys.stderr)
        return UNAVAILABLE_RC
    for _ in range(warmup):  # compile, autotune caches, allocator, clocks
        _sync(fn(*args))
    with profiled():
        _sync(fn(*args))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: ncu around each child, the raw page parsed into a per-kernel summary.


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw(text: str) -> list[dict]:
    """``ncu --import R --csv --page raw`` -> one {column: value} per kernel (numbers as floats; the units row that
    follows the header is dropped)."""
    rows = list(csv.reader(io.StringIO("\n".join(l for l in text.splitlines() if l.startswith('"')))))
    if not rows:
        return []
    header, out = rows[0], []
    for row in rows[1:]:
        if not row or not row[0].strip().isdigit():  # the units row
            continue
        out.append({h: (_number(v) if _number(v) is not None else v) for h, v in zip(header, row)})
    return out


def summarise(kernel: dict) -> dict:
    """The figures of one profiled kernel (``None`` where this run's counters lack one)."""
    get = lambda key, scale=1.0: None if not isinstance(kernel.get(key), float) else kernel[key] * scale
    stalls = sorted(((m.group(1), v) for k, v in kernel.items() if (m := _STALL.fullmatch(k)) and isinstance(v, float)),
                    key=lambda kv: -kv[1])
    tensor = [v for k, v in kernel.items() if _TENSOR.fullmatch(k) and isinstance(v, float)]
    smem = [get("launch__shared_mem_per_block_dynamic"), get("launch__shared_mem_per_block_static")]
    return {"kernel": str(kernel.get("Kernel Name", "?"))[:90], "time_us": get("gpu__time_duration.sum", 1e-3),
            "dram_read_mb": get("dram__bytes_read.sum", 1e-6), "dram_write_mb": get("dram__bytes_write.sum", 1e-6),
            "dram_pct": get("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
            "l2_mb": get("lts__t_bytes.sum", 1e-6), "l2_hit_pct": get("lts__t_sector_hit_rate.pct"),
            "sm_pct": get("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
            "tensor_pct": max(tensor) if tensor else None,
            "occupancy_pct": get("sm__warps_active.avg.pct_of_peak_sustained_active"),
            "registers": get("launch__registers_per_thread"), "grid": get("launch__grid_size"),
            "block": get("launch__block_size"),
            "smem_kb": None if smem[0] is None else (smem[0] + (smem[1] or 0)) / 1024,
            "stalls": [[name, round(v, 2)] for name, v in stalls[:3]]}


def compulsory_mb(shape: shapes.GmmShape, itemsize: int) -> dict:
    """Each operand read once and the output written once (MB): lhs [M,K] + rhs [E,K,N] in, out [M,N] out."""
    return {"read": (shape.m * shape.k + shape.e * shape.k * shape.n) * itemsize / 1e6,
            "write": shape.m * shape.n * itemsize / 1e6}


def _tail(proc) -> str:
    return " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])[:400]


def profile(name: str, args, ncu: str) -> dict:
    """One target under ncu -> {target, status, counters, kernels | reason}."""
    app = [sys.executable, "-m", "benchmarks.profile", "--child", name, "--shape", args.shape, "--dtype", args.dtype]
    app += ["--tiny"] if args.tiny else []
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        rep = os.path.join(tmp, "target")
        base = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all", "-f",
                "--export", rep]
        for label, counters in (("metrics", ["--metrics", ",".join(METRICS)]),
                                ("sections", [a for s in SECTIONS for a in ("--section", s)])):
            try:
                proc = subprocess.run(base + counters + app, capture_output=True, text=True, timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                return {"target": name, "status": "error", "reason": f"ncu ran past {args.timeout_s} s"}
            if proc.returncode == UNAVAILABLE_RC or "UNAVAILABLE:" in (proc.stderr or ""):
                reason = next(l for l in (proc.stderr or "UNAVAILABLE: ?").splitlines() if "UNAVAILABLE:" in l)
                return {"target": name, "status": "unavailable", "reason": reason.split("UNAVAILABLE:", 1)[1].strip()}
            if proc.returncode == 0 and os.path.exists(rep + ".ncu-rep"):
                break
            errors.append(f"{label}: rc {proc.returncode}: {_tail(proc)}")
        else:
            return {"target": name, "status": "error", "reason": "; ".join(errors)}
        raw = subprocess.run([ncu, "--import", rep + ".ncu-rep", "--csv", "--page", "raw", "--print-units", "base"],
                             capture_output=True, text=True, timeout=120)
    kernels = [summarise(k) for k in parse_raw(raw.stdout)]
    if not kernels:
        return {"target": name, "status": "error", "reason": f"no kernel in the report: {_tail(raw)}"}
    return {"target": name, "status": "ok", "counters": label, "notes": errors, "kernels": kernels}


def find_ncu(name: str) -> str | None:
    """``name`` on the PATH, else (for plain ``ncu``) the CUDA toolkit's or an Nsight Compute install's copy."""
    found = shutil.which(name)
    if found or name != "ncu":
        return found
    installs = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")) + ["/usr/local/cuda/bin/ncu"]
    return next((path for path in reversed(installs) if os.access(path, os.X_OK)), None)


def _print(result: dict, need: dict) -> None:
    if result["status"] != "ok":
        print(f"{result['target']:18} {result['status']}: {result['reason']}")
        return
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for k in result["kernels"]:
        dram = fmt(k["dram_read_mb"], ".0f") + ("" if k["dram_read_mb"] is None else
                                                 f" ({k['dram_read_mb'] / need['read']:.2f}x)")
        stalls = " ".join(f"{n}={v}" for n, v in k["stalls"])
        print(f"{result['target']:18} {fmt(k['time_us'], '8.1f')} us  DRAM rd {dram:>12} MB wr "
              f"{fmt(k['dram_write_mb'], '.0f'):>5} ({fmt(k['dram_pct'], '.0f')}% of peak)  L2 hit "
              f"{fmt(k['l2_hit_pct'], '.0f'):>3}%  SM "
              f"{fmt(k['sm_pct'], '.0f'):>3}%  TC {fmt(k['tensor_pct'], '.0f'):>3}%  occ "
              f"{fmt(k['occupancy_pct'], '.0f'):>3}%  regs {fmt(k['registers'], '.0f')}  smem "
              f"{fmt(k['smem_kb'], '.0f')} KB  stalls {stalls}  {k['kernel'][:48]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen3-30b-w1", help="a GMM preset (benchmarks.shapes.GMM_SHAPES)")
    p.add_argument("--targets", default="gmm,gmm:tma,torch._grouped_mm,torch.bmm",
                   help=f"comma list of {OURS + PEERS}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--ncu", default="ncu", help="the Nsight Compute command line")
    p.add_argument("--timeout-s", type=int, default=240, help="per ncu run")
    p.add_argument("--tiny", action="store_true", help="the preset's tiny twin (CPU plumbing)")
    p.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = shapes.select(shapes.GMM_TINY if args.tiny else shapes.GMM_SHAPES, args.shape)[0]
    dtype = jnp.dtype(args.dtype)
    if args.child:
        return child(args.child, shape, dtype)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(OURS) - set(PEERS))
    if unknown:
        p.error(f"unknown --targets {unknown}; known: {OURS + PEERS}")
    ncu = find_ncu(args.ncu)
    results = [profile(t, args, ncu) if ncu else {"target": t, "status": "unavailable",
                                                  "reason": f"{args.ncu!r} is not on the PATH"} for t in targets]
    need = compulsory_mb(shape, dtype.itemsize)
    print(f"{shape.name}: M={shape.m} K={shape.k} N={shape.n} E={shape.e} {dtype.name}; compulsory DRAM "
          f"{need['read']:.4g} MB read, {need['write']:.4g} MB written")
    for r in results:
        _print(r, need)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape.as_dict(), "dtype": dtype.name, "device": str(jax.devices()[0]),
                       "compulsory_mb": need, "results": results}, f, indent=1)
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
