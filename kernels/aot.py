"""Compile every registered Triton kernel x shipped config for real GPU targets, without a GPU.

    python -m kernels.aot [--target sm90|gfx950|gfx942|all] [--family gmm ...] [--via-jax]

prints one row per kernel x config as it compiles (target, shared memory / LDS bytes, spills, TMA instructions in the
sm90 SASS as ``UTMALDG/UTMASTG`` counts, global scratch bytes per program, ok) and exits non-zero on any failure or
any register spill (sm90: ptxas's spill bytes; AMD: the sgpr + vgpr spill counts of the amdgcn metadata).
``--via-jax`` compiles the same cases through jax-triton's real ``triton_kernel_call`` lowering instead (needs
``moe-ops[lowering]``; ``kernels.lowering``) and reports the decoded launch: kernel, warps, shared memory against the
target's limit. On ROCm only num_warps / num_stages / num_ctas / enable_fp_fusion reach the compiler through
jax-triton 0.3.1; waves_per_eu, matrix_instr_nonkdim and kpack do not.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile

from kernels.registry import TARGETS, AotCase, cases_for, registered_families

_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclasses.dataclass(frozen=True)
class AotReport:
    target: str
    kernel: str
    config: str
    shared_bytes: int = 0
    spills: int = 0
    ok: bool = True
    error: str = ""
    tma_loads: int = -1    # UTMALDG instructions in the SASS (sm90 compiles; -1: not inspected)
    tma_stores: int = -1   # UTMASTG instructions in the SASS
    scratch_bytes: int = 0  # global scratch per program (device-side tensor descriptors)

    @property
    def tma(self) -> int:
        """UTMALDG + UTMASTG instructions (-1: not inspected)."""
        return -1 if self.tma_loads < 0 else self.tma_loads + self.tma_stores

    @property
    def clean(self) -> bool:
        """Compiled, and no register spills on any target (a spill is a tuning bug; -1, ptxas missing, is not
        clean either: spill-freedom must be shown)."""
        return self.ok and self.spills == 0


def _ptxas_spills(ptx: str, arch: int) -> int:
    """Spill bytes (stores + loads) that ptxas reports for ``ptx``; -1 if ptxas is unavailable. The fallback when
    Triton's own ``ptxas -v`` log is missing (``_compile``): without Triton's flags (triton 3.9 adds
    ``--regAllocOptLevel=2``) its figure can differ from the real build's when a kernel spills."""
    from triton.backends.nvidia import compiler as nv
    try:
        ptxas = nv.get_ptxas(arch).path if hasattr(nv, "get_ptxas") else nv._path_to_binary("ptxas")[0]
    except Exception:  # pragma: no cover - depends on the triton wheel layout
        return -1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    return _spill_bytes(proc.stdout + proc.stderr) or 0


def _spill_bytes(ptxas_log: str) -> int | None:
    """Spill stores + loads summed over the functions of a ``ptxas -v`` log; None if it reports none."""
    found = _SPILL_RE.findall(ptxas_log)
    return sum(int(a) + int(b) for a, b in found) if found else None


def _sass_tma(ptx: str, cubin: bytes) -> tuple[int, int]:
    """(``UTMALDG``, ``UTMASTG``) instruction counts in the SASS of ``cubin``; (-1, -1) without cuobjdump. SASS TMA
    instructions only come from PTX ``cp.async.bulk.tensor``: without one the counts are (0, 0), no disassembly."""
    if "cp.async.bulk.tensor" not in ptx:
        return 0, 0
    try:
        from triton.tools.disasm import get_sass
        sass = get_sass(cubin)
    except Exception:  # pragma: no cover - depends on the triton wheel layout
        return -1, -1
    return len(re.findall(r"\bUTMALDG\b", sass)), len(re.findall(r"\bUTMASTG\b", sass))


def _amd_spills(amdgcn: str) -> int:
    return sum(int(n) for n in re.findall(r"\.[sv]gpr_spill_count:\s*(\d+)", amdgcn))


def _pointer_attrs(case: AotCase) -> dict:
    """16-byte divisibility of every pointer argument: the specialisation ``jax_triton.triton_call`` compiles with
    (it assumes every array is 16-byte aligned), so AOT sees the same vectorised, pipelined code as the runtime."""
    return {(case.fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in case.signature.items() if ty.startswith("*")}


def _ensure_cache_dir() -> None:
    """``import jax_triton`` sets ``TRITON_CACHE_DIR=""``, which makes ``triton.compile`` fail: use a private one,
    removed when the process exits (tens of MB of compiled kernels otherwise stay behind in the temp dir)."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix="moe_ops_aot_")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["TRITON_CACHE_DIR"] = path


def _compile(src, target, options):
    """``triton.compile``, never from the cache, with the log of the ``ptxas -v`` that Triton runs for CUDA targets
    captured: its spill figures are those of the cubin Triton builds (with Triton's own ptxas flags) and save a
    second ptxas run. The log is empty for other targets."""
    import triton
    from triton import knobs
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=target, options=options)
    return compiled, log.getvalue()


def compile_case(case: AotCase, target: str) -> AotReport:
    """Compile one case for ``target`` (a key of ``TARGETS``) and report resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    backend, arch, warp = TARGETS[target]
    _ensure_cache_dir()
    try:
        src = triton.compiler.ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs,
                                        attrs=_pointer_attrs(case))
        compiled, ptxas_log = _compile(src, GPUTarget(backend, arch, warp), dict(case.options))
        tma = (-1, -1)
        if backend == "cuda":
            spills = _spill_bytes(ptxas_log)
            if spills is None:  # a Triton that stops printing the log: run ptxas ourselves
                spills = _ptxas_spills(compiled.asm["ptx"], arch)
            tma = _sass_tma(compiled.asm["ptx"], compiled.asm["cubin"])
        else:
            spills = _amd_spills(compiled.asm["amdgcn"])
        scratch = getattr(compiled.metadata, "global_scratch_size", 0) or 0
        return AotReport(target, case.kernel_name, case.config_name, compiled.metadata.shared, spills,
                         tma_loads=tma[0], tma_stores=tma[1], scratch_bytes=scratch)
    except Exception as e:  # a failed compile is a reported result, not a crash of the checker
        message = str(e).strip().splitlines()
        return AotReport(target, case.kernel_name, case.config_name, ok=False,
                         error=(message[-1] if message else type(e).__name__)[:200])


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "i32": "int32"}


def lower_case_via_jax(case: AotCase, target: str) -> AotReport:
    """Lower one case through ``jax_triton.triton_call`` for ``target``'s platform and check the decoded launch
    (every pointer but the last is an input, the last the output; buffers are 16 elements, the launch one program)."""
    import jax
    import jax.numpy as jnp
    from kernels import lowering
    from kernels.triton.bridge import load_jax_triton

    pointers = [ty[1:] for ty in case.signature.values() if ty.startswith("*")]
    arrays = [jax.ShapeDtypeStruct((16,), jnp.dtype(_DTYPES[ty])) for ty in pointers[:-1]]
    out = jax.ShapeDtypeStruct((16,), jnp.dtype(_DTYPES[pointers[-1]]))
    options = {k: v for k, v in case.options.items() if k in ("num_warps", "num_stages")}

    def call(*xs):
        return load_jax_triton().triton_call(*xs, kernel=case.fn, out_shape=out, grid=(1,), name=case.kernel_name,
                                             **options, **case.constexprs)
    arch = target if TARGETS[target][0] == "hip" else "gfx950"
    try:
        with lowering.pinned_targets(compute_capability=90, rocm_arch=arch):
            text = jax.jit(call).trace(*arrays).lower(lowering_platforms=(lowering.PLATFORM_OF[target],)).as_text()
        (launch,) = lowering.kernel_calls(text)
        problems = launch.problems(target, num_warps=case.options["num_warps"], grid=(1,))
        return AotReport(target, case.kernel_name, case.config_name, launch.shared_bytes, 0, not problems,
                         "; ".join(problems))
    except Exception as e:  # a failed lowering is a reported result, not a crash of the checker
        message = str(e).strip().splitlines()
        return AotReport(target, case.kernel_name, case.config_name, ok=False,
                         error=(message[-1] if message else type(e).__name__)[:200])


def check(targets=("sm90", "gfx950"), families=None, *, via_jax=False, on_report=None, workers=1) -> list[AotReport]:
    """Compile (or, ``via_jax``, lower through jax-triton) every case, in case order; ``on_report(report)`` is called
    for each in that order. ``workers > 1`` runs in that many spawned processes (see ``run_cases``)."""
    reports = []
    for t in targets:
        for report in run_cases(t, families, range(len(cases_for(t, families))), via_jax=via_jax, workers=workers):
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports


def _compile_key(case: AotCase):
    """Cases with equal keys are one compile under several names (a config table's entries that differ only in
    what this kernel does not read)."""
    return (case.fn, tuple(sorted(case.signature.items())), tuple(sorted(case.constexprs.items())),
            tuple(sorted(case.options.items())))


def run_cases(target, families, indices, *, via_jax=False, workers=1) -> list[AotReport]:
    """Reports for cases ``indices`` of ``cases_for(target, families)``, in that order; a case that is the same
    compile as an earlier one (``_compile_key``) gets that one's report under its own names. With ``workers > 1``
    each of that many spawned processes rebuilds the case list and takes every ``workers``-th distinct index
    (Triton's compiler is not thread-safe: threads failed a case now and then)."""
    cases = cases_for(target, families)
    indices = list(indices)
    first = {}
    for i in indices:
        first.setdefault(_compile_key(cases[i]), i)
    distinct = sorted(set(first.values()))
    if workers <= 1 or len(distinct) <= 1:
        by_index = {i: _run_one(cases[i], target, via_jax) for i in distinct}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        shares = [distinct[i::workers] for i in range(min(workers, len(distinct)))]
        with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_share, [(target, families, share, via_jax) for share in shares]))
        by_index = {i: r for share, reports in zip(shares, results) for i, r in zip(share, reports)}
    return [dataclasses.replace(by_index[first[_compile_key(cases[i])]], kernel=cases[i].kernel_name,
                                config=cases[i].config_name) for i in indices]


def _run_one(case, target, via_jax) -> AotReport:
    return lower_case_via_jax(case, target) if via_jax else compile_case(case, target)


def _run_share(job) -> list[AotReport]:
    """A worker process: cases ``share`` of ``cases_for(target, families)``."""
    target, families, share, via_jax = job
    if via_jax:
        _lowering_only_jax()
    cases = cases_for(target, families)
    return [_run_one(cases[i], target, via_jax) for i in share]


def _lowering_only_jax() -> None:
    """Lowering never initialises an (absent) GPU: JAX runs on the CPU unless platforms were chosen."""
    import jax
    jax.config.update("jax_platforms", jax.config.jax_platforms or "cpu")


def _print_row(r: AotReport) -> None:
    status = "ok" if r.clean else f"FAIL {r.error}" if not r.ok else "FAIL spills"
    tma = "-" if r.tma_loads < 0 else f"{r.tma_loads}/{r.tma_stores}"
    print(f"{r.target:8} {r.kernel:28} {r.config:36} {r.shared_bytes:9d} {r.spills:6d} {tma:>7} {r.scratch_bytes:7d}"
          f"  {status}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="all", choices=[*TARGETS, "all"])
    parser.add_argument("--family", action="append", help="kernel family to compile (default: all registered)")
    parser.add_argument("--via-jax", action="store_true",
                        help="lower through jax-triton's real CUDA / ROCm path and decode the launch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU; rows print per target)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.family or ()) - set(registered_families()))
    if unknown:
        parser.error(f"unknown --family {', '.join(unknown)}; valid: {', '.join(registered_families())}")
    if args.via_jax:
        _lowering_only_jax()
        from kernels.lowering import unavailable_reason
        if unavailable_reason():
            parser.error(f"--via-jax: {unavailable_reason()}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    targets = list(TARGETS) if args.target == "all" else [args.target]
    print(f"{'target':8} {'kernel':28} {'config':36} {'smem/LDS':>9} {'spills':>6} {'ldg/stg':>7} {'scratch':>7}  ok",
          flush=True)
    reports = check(targets, args.family, via_jax=args.via_jax, on_report=_print_row, workers=args.workers)
    failures = [r for r in reports if not r.clean]
    print(f"{len(reports)} compiles, {len(failures)} failures")
    return 1 if failures or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
