"""Compile every registered Triton kernel x shipped config for real GPU targets, without a GPU.

    python -m kernels.aot [--target sm90|gfx950|gfx942|all] [--family gmm ...]

prints one row per kernel x config (target, shared memory / LDS bytes, spills, ok) and exits non-zero on any failure
or any register spill on sm90.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

from kernels.registry import TARGETS, AotCase, cases_for

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

    @property
    def clean(self) -> bool:
        """Compiled, and no spills on NVIDIA (where spills are a tuning bug)."""
        return self.ok and (self.spills == 0 or not self.target.startswith("sm"))


def _ptxas_spills(ptx: str, arch: int) -> int:
    """Spill bytes (stores + loads) that ptxas reports for ``ptx``; -1 if ptxas is unavailable."""
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
    return sum(int(a) + int(b) for a, b in _SPILL_RE.findall(proc.stdout + proc.stderr))


def _amd_spills(amdgcn: str) -> int:
    return sum(int(n) for n in re.findall(r"\.[sv]gpr_spill_count:\s*(\d+)", amdgcn))


def _pointer_attrs(case: AotCase) -> dict:
    """16-byte divisibility of every pointer argument: the specialisation ``jax_triton.triton_call`` compiles with
    (it assumes every array is 16-byte aligned), so AOT sees the same vectorised, pipelined code as the runtime."""
    return {(case.fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in case.signature.items() if ty.startswith("*")}


def _ensure_cache_dir() -> None:
    """``import jax_triton`` sets ``TRITON_CACHE_DIR=""``, which makes ``triton.compile`` fail: use a private one."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_ops_aot_")


def compile_case(case: AotCase, target: str) -> AotReport:
    """Compile one case for ``target`` (a key of ``TARGETS``) and report resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    backend, arch, warp = TARGETS[target]
    _ensure_cache_dir()
    try:
        src = triton.compiler.ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs,
                                        attrs=_pointer_attrs(case))
        compiled = triton.compile(src, target=GPUTarget(backend, arch, warp), options=dict(case.options))
        if backend == "cuda":
            spills = _ptxas_spills(compiled.asm["ptx"], arch)
        else:
            spills = _amd_spills(compiled.asm["amdgcn"])
        return AotReport(target, case.kernel_name, case.config_name, compiled.metadata.shared, spills)
    except Exception as e:  # a failed compile is a reported result, not a crash of the checker
        message = str(e).strip().splitlines()
        return AotReport(target, case.kernel_name, case.config_name, ok=False,
                         error=(message[-1] if message else type(e).__name__)[:200])


def check(targets=("sm90", "gfx950"), families=None) -> list[AotReport]:
    return [compile_case(case, t) for t in targets for case in cases_for(t, families)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="all", choices=[*TARGETS, "all"])
    parser.add_argument("--family", action="append", help="kernel family to compile (default: all registered)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    targets = list(TARGETS) if args.target == "all" else [args.target]
    reports = check(targets, args.family)
    print(f"{'target':8} {'kernel':28} {'config':36} {'smem/LDS':>9} {'spills':>6}  ok")
    for r in reports:
        status = "ok" if r.clean else f"FAIL {r.error}" if not r.ok else "FAIL spills"
        print(f"{r.target:8} {r.kernel:28} {r.config:36} {r.shared_bytes:9d} {r.spills:6d}  {status}")
    failures = [r for r in reports if not r.clean]
    print(f"{len(reports)} compiles, {len(failures)} failures")
    return 1 if failures or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
