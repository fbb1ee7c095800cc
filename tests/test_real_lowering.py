"""The GPU and TPU paths proven from a CPU host: per-platform kernel choice at lowering time, and jax-triton's real
CUDA / ROCm lowering (``kernels.lowering``) with the decoded launch checked against the tuning table.

Needs jaxlib's CUDA plugin (the ``test`` extra installs it on Linux x86-64); elsewhere the GPU-lowering tests skip
with that reason. The TPU export tests need nothing extra.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import moe_ops
from kernels import aot, lowering
from moe_ops import export_check
from tests.helpers import fused_layer_grad
from kernels.registry import cases_for
from kernels.triton import schedule, tuning

needs_plugin = pytest.mark.skipif(lowering.unavailable_reason() is not None,
                                  reason=str(lowering.unavailable_reason()))
TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")
M, K, N, G = export_check.M, export_check.K, export_check.N, export_check.G
OPS = export_check.ops()
_export = export_check.export_text


@pytest.mark.parametrize("name", ["gmm_grad", "gmm_shard_transposed_grad", "tgmm_grad", "permute_unpermute_grad",
                                  "moe_ffn_fused_grad"])
def test_tpu_export_emits_mosaic_not_the_interpreter(name):
    text = _export(name, jnp.bfloat16, ["tpu"])
    assert "tpu_custom_call" in text
    assert "callback" not in text and "triton_kernel_call" not in text


def test_cpu_lowering_keeps_the_xla_backend():
    text = _export("moe_ffn_fused_grad", jnp.float32, ["cpu"])
    assert "tpu_custom_call" not in text and "triton_kernel_call" not in text and "callback" not in text


@needs_plugin
def test_one_module_carries_every_platform():
    with lowering.pinned_targets():
        text = _export("moe_ffn_fused_grad", jnp.bfloat16, ["cpu", "cuda", "tpu"])
    assert "tpu_custom_call" in text and "triton_kernel_call" in text


def _expected_launches(name, dtype, arch):
    """(kernel, grid, num_warps) of the GMM / TGMM launches a plain-gmm op must make: the tuning table's choice."""
    def gmm(m, k, n, g):
        cfg = tuning.pick_config("gmm", m, k, n, g, dtype, arch=arch)
        return ("_gmm_kernel", (schedule.max_row_tiles(m, cfg.block_m, g) * -(-n // cfg.block_n),), cfg.num_warps)

    def tgmm(m, k, n, g):
        cfg = tuning.pick_config("tgmm", m, k, n, g, dtype, arch=arch)
        return ("_tgmm_kernel", (g * -(-k // cfg.block_k) * -(-n // cfg.block_n),), cfg.num_warps)
    return {"gmm": [gmm(M, K, N, G)],
            "gmm_grad": [gmm(M, N, K, G), tgmm(M, K, N, G)],
            "tgmm_grad": [gmm(M, N, K, G), gmm(M, K, N, G)]}.get(name)


QUICK_GFX950 = ("gmm_grad", "moe_ffn_fused_grad")  # the rest of gfx950, and f32, are the slow-marked sweep
# every op x {sm90, gfx950} x {bf16, f32}, except the two f32 layers on gfx950 (bf16 there, f32 on sm90)
LAUNCH_CASES = [(name, dtype, arch) for name in OPS for arch in ("sm90", "gfx950")
                for dtype in (jnp.bfloat16, jnp.float32)
                if not (dtype == jnp.float32 and name.startswith("moe_ffn") and arch == "gfx950")]


@needs_plugin
@pytest.mark.parametrize("name,dtype,arch", [  # f32 is the slow-marked sweep; bf16 stays in the quick loop
    pytest.param(n, d, a, id=f"{n}-{jnp.dtype(d).name}-{a}",
                 marks=[pytest.mark.slow] if d == jnp.float32 or (a == "gfx950" and n not in QUICK_GFX950) else [])
    for n, d, a in LAUNCH_CASES])
def test_gpu_lowering_launches(name, dtype, arch):
    """Every public op lowers through jax-triton for cuda (sm_90) and rocm (gfx950): real Triton compiles, launches
    within the device's shared memory, and for the plain grouped matmuls exactly the tuning table's config."""
    with lowering.pinned_targets(compute_capability=90, rocm_arch=arch):
        text = _export(name, dtype, [lowering.PLATFORM_OF[arch]])
    launches = lowering.kernel_calls(text)
    assert launches and "tpu_custom_call" not in text and "callback" not in text
    problems = [f"{c.kernel}: {p}" for c in launches for p in c.problems(arch)]
    assert not problems, problems
    assert launches == [c for c in launches if c.binary == ("ptx" if arch == "sm90" else "hsaco")]
    expected = _expected_launches(name, dtype, arch)
    if expected is not None:
        assert sorted((c.kernel, c.grid[:1], c.num_warps) for c in launches) == sorted(expected)


@needs_plugin
def test_default_layer_launches_the_fused_kernels_on_gpu():
    """``moe_ffn(fused=None)`` exported for cuda from a CPU host runs the fused forward: gate / up and the activation
    in one kernel, the down GMM with its scatter epilogue, and no row gather / combine kernels (the unfused forward
    has both, and three GMMs). Its gradient runs the forward gate/up kernel once (writing the saved gate / up) and
    the one fused backward kernel (the activation derivative in the down projection's dlhs GMM), and row-gathering
    TGMMs."""
    with lowering.pinned_targets():
        fused, unfused, grad = ([c.kernel for c in lowering.kernel_calls(_export(name, jnp.bfloat16, ["cuda"]))]
                                for name in ("moe_ffn_fused", "moe_ffn_unfused", "moe_ffn_fused_grad"))
    assert fused.count("_swiglu_kernel") == 1 and fused.count("_gmm_kernel") == 1
    assert grad.count("_swiglu_down_bwd_kernel") == 1 and grad.count("_swiglu_kernel") == 1
    # its TGMMs read x / dout in token order: no gathered [T*k, D] copy (those broke the peak-memory bound)
    assert grad.count("_tgmm_kernel") == 3 and "_gather_rows_kernel" not in grad, grad
    assert unfused.count("_gmm_kernel") == 3
    assert not {"_gather_rows_kernel", "_combine_rows_kernel"} & set(fused)
    assert {"_gather_rows_kernel", "_combine_rows_kernel"} <= set(unfused)


def _first_cases(target, key):
    """Indices of the first registered case of ``target`` for each ``key(case)``."""
    first = {}
    for i, case in enumerate(cases_for(target, None)):
        first.setdefault(key(case), i)
    return sorted(first.values())


def _via_jax_failures(target, indices):
    """Lower the registered cases at ``indices`` through jax-triton in two spawned processes (the CI machine's two
    cores)."""
    reports = aot.run_cases(target, None, indices, via_jax=True, workers=2)
    return reports, [f"{r.kernel} {r.config}: {r.error}" for r in reports if not r.clean]


@needs_plugin
@pytest.mark.parametrize("target", ["sm90", "gfx950"])
def test_every_kernel_lowers_via_jax(target):
    reports, failures = _via_jax_failures(target, _first_cases(target, _kernel))
    assert len(reports) >= 10 and not failures, failures


def _kernel(case):
    return case.kernel_name


def _kernel_and_entry(case):
    return case.kernel_name, case.config_name.split(":")[0]


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm90", "gfx950"])  # gfx942: the direct AOT compile (tests/test_aot.py)
def test_every_shipped_config_lowers_via_jax(target):
    """Every kernel x shipped table entry once (its first dtype / shape point); every dtype and shape point of every
    entry compiles, within the target's shared memory, in tests/test_aot.py. The first case of each kernel is left to
    test_every_kernel_lowers_via_jax (CI runs both), so each case is lowered once."""
    per_kernel = set(_first_cases(target, _kernel))
    indices = [i for i in _first_cases(target, _kernel_and_entry) if i not in per_kernel]
    reports, failures = _via_jax_failures(target, indices)
    cases = cases_for(target, None)
    covered = {r.config.split(":")[0] for r in reports} | {_kernel_and_entry(cases[i])[1] for i in per_kernel}
    entries = {name for kind in ("gmm", "tgmm") for name in tuning.shipped(target, kind, jnp.bfloat16)}
    assert covered >= entries and not failures, failures


@needs_plugin
def test_broken_config_is_caught(monkeypatch):
    """A config whose tiles exceed shared memory compiles, but the decoded launch fails the check."""
    big = tuning.GmmConfig(256, 256, 256, num_warps=8, num_stages=4)
    case = next(c for c in cases_for("sm90", ["gmm"]) if c.kernel_name == "gmm")
    broken = aot.AotCase(case.kernel_name, "broken", case.fn, case.signature,
                         {**case.constexprs, "BM": big.block_m, "BN": big.block_n, "BK": big.block_k},
                         big.compile_options("cuda"))
    report = aot.lower_case_via_jax(broken, "sm90")
    assert not report.clean and "shared memory" in report.error and "limit" in report.error, report


@needs_plugin
def test_export_check_cli_prints_rows(capsys):
    assert export_check.main(["--op", "gmm_grad", "--platform", "cuda", "tpu"]) == 0
    out = capsys.readouterr().out
    assert "_tgmm_kernel" in out and "Mosaic kernels" in out and "0 failures" in out


def test_aot_cli_rejects_unknown_family(capsys):
    with pytest.raises(SystemExit) as exc:
        aot.main(["--family", "nope"])
    assert exc.value.code == 2
    assert "unknown --family nope; valid:" in capsys.readouterr().err


@functools.cache
def _arch_on_lowering(platform):
    seen = []

    def probe(a):
        seen.append(tuning.detect_arch())
        return a
    from kernels import platform as kp
    jax.jit(lambda a: kp.platform_call({platform: kp.Rule(probe)}, a)).trace(jnp.zeros(1)).lower(
        lowering_platforms=(platform,))
    return seen[-1]


def test_tuning_arch_follows_the_lowering_platform():
    assert tuning.detect_arch() == "cpu"
    assert _arch_on_lowering("cpu") == "cpu"
    assert _arch_on_lowering("cuda") == "sm90" and _arch_on_lowering("rocm") == "gfx950"  # exported from a CPU host
    assert _arch_on_lowering("tpu") == "cpu"  # not a Triton platform: the interpreter's config


@needs_plugin
def test_precision_is_chosen_per_platform():
    """``implementation=None`` with a dot algorithm the kernels cannot meet (f64): XLA (cpu) takes it, the Triton
    kernels (cuda) refuse it by name, and only when that platform is lowered; one they meet and a plain ``Precision``
    lower everywhere."""
    data = export_check.example_inputs(jnp.float32)
    args = (data["lhs"], data["rhs"], data["sizes"])

    def export(precision, platforms):
        fn = jax.jit(lambda a, b, g: moe_ops.gmm(a, b, g, precision=precision))
        with lowering.pinned_targets():
            return jax.export.export(fn, platforms=platforms, disabled_checks=[TRITON_CALL])(*args).mlir_module()
    algorithm = jax.lax.DotAlgorithmPreset.F64_F64_F64
    assert "triton_kernel_call" not in export(algorithm, ["cpu"])
    with pytest.raises(ValueError, match="precision"):
        export(algorithm, ["cuda"])
    assert "triton_kernel_call" in export(jax.lax.Precision.HIGHEST, ["cpu", "cuda"])
    assert "triton_kernel_call" in export(jax.lax.DotAlgorithmPreset.F32_F32_F32, ["cpu", "cuda"])


@needs_plugin
def test_recompute_mode_grad_launches_no_forward_kernel_on_gpu():
    """``fused_experts_ffn(recompute=True)``'s gradient exported for cuda: the recomputing backward kernel, the
    row-gathering TGMMs (``_tgmm_kernel`` reading token-order rows) and no forward gate/up kernel, no row gather of
    x."""
    grad, args = fused_layer_grad("triton", recompute=True)
    with lowering.pinned_targets():
        text = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=[TRITON_CALL])(*args).mlir_module()
    kernels = [c.kernel for c in lowering.kernel_calls(text)]
    assert kernels.count("_swiglu_down_bwd_kernel") == 1 and "_swiglu_kernel" not in kernels, kernels
    assert kernels.count("_tgmm_kernel") == 3 and "_gather_rows_kernel" not in kernels, kernels


@needs_plugin
@pytest.mark.parametrize("fused", [False, True])
def test_moe_ffn_recompute_grad_lowers_for_gpu_and_tpu(fused):
    """``moe_ffn(recompute=True)``'s gradient exported from this CPU host: Triton kernels for cuda, where the unfused
    path (``jax.checkpoint`` of the gate / up GMMs) launches those two GMMs again in the backward and the fused path
    runs the recomputing backward kernel instead of the gate/up kernel that saves them, and Mosaic for tpu, with no
    interpreter callback."""
    t, d, f, e, k = 64, 128, 256, 4, 2
    sds = jax.ShapeDtypeStruct
    args = (sds((t, d), jnp.bfloat16), sds((t, e), jnp.float32), sds((e, d, f), jnp.bfloat16),
            sds((e, d, f), jnp.bfloat16), sds((e, f, d), jnp.bfloat16))

    def grad(recompute):
        def loss(*a):
            return jnp.sum(moe_ops.moe_ffn(*a, top_k=k, fused=fused, recompute=recompute).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=range(5)))
    with lowering.pinned_targets():
        cuda = {rc: [c.kernel for c in lowering.kernel_calls(jax.export.export(
            grad(rc), platforms=["cuda"], disabled_checks=[TRITON_CALL])(*args).mlir_module())] for rc in (False, True)}
    if fused:  # the recomputing backward kernel; the saving forward kernel only without recompute
        assert cuda[True].count("_swiglu_down_bwd_kernel") == 1 and "_swiglu_kernel" not in cuda[True], cuda
        assert "_swiglu_kernel" in cuda[False], cuda
    else:
        assert cuda[True].count("_gmm_kernel") == cuda[False].count("_gmm_kernel") + 2, cuda
    tpu = jax.export.export(grad(True), platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in tpu and "callback" not in tpu and "triton_kernel_call" not in tpu


_COMPOSITE = re.compile(r'stablehlo\.composite "([^"]+)"(?:(?!stablehlo\.composite).)*?'
                        r"composite_attributes = \{([^{}]*)\}, decomposition = @([\w.$-]+)", re.S)


def _without_scan_decompositions(text):
    """``text`` less the bodies of the decomposition functions of associative ``chlo.scan`` composites, and their
    names. jax >= 0.11 lowers ``cumsum`` for cuda to ``stablehlo.composite "chlo.scan"`` (``is_associative = true``)
    whose decomposition is a sequential ``while``; XLA GPU rewrites the composite into its own scan (a CUB kernel for
    a sum, a reduce-window tree otherwise, says jax's comment at that lowering) and never runs that fallback. jax
    0.10 lowered cumsum to a reduce_window, with no composite. Every other function, composites of other names and
    non-associative scans stay."""
    exempt = {fn for name, attrs, fn in _COMPOSITE.findall(text)
              if name == "chlo.scan" and "is_associative = true" in attrs}
    kept, skipping = [], False
    for line in text.splitlines():
        head = re.match(r"  func\.func \w+ @([\w.$-]+)\(", line)
        if head:
            skipping = head.group(1) in exempt
        if not skipping:
            kept.append(line)
        if skipping and line.startswith("  }"):
            skipping = False
    return "\n".join(kept), exempt


def test_scan_decompositions_are_the_only_exemption():
    """``_without_scan_decompositions`` drops an associative chlo.scan's decomposition and nothing else: a ``while``
    in the main function, in a non-associative scan's decomposition or in another composite's stays visible."""
    def composite(name, fn, associative):
        return (f'    %0:2 = stablehlo.composite "{name}" %arg0, %c ({{\n    }}) {{composite_attributes = '
                f"{{dimension = 0 : i64, is_associative = {str(associative).lower()}}}, decomposition = @{fn}, "
                "version = 1 : i32}\n")

    def func(fn, body):
        return f"  func.func private @{fn}(%arg0: tensor<8xi32>) -> tensor<8xi32> {{\n{body}  }} loc(#loc7)\n"
    loop = "    %3:3 = stablehlo.while(%iterArg = %c_1) : tensor<i64>\n"
    scan = composite("chlo.scan", "chlo.scan.impl", True) + func("chlo.scan.impl", loop)
    text, exempt = _without_scan_decompositions(scan)
    assert exempt == {"chlo.scan.impl"} and "stablehlo.while" not in text
    for kept in (scan + func("main", loop),
                 composite("chlo.scan", "chlo.scan.impl", False) + func("chlo.scan.impl", loop),
                 composite("chlo.other", "chlo.other.impl", True) + func("chlo.other.impl", loop)):
        assert "stablehlo.while" in _without_scan_decompositions(kept)[0]


@needs_plugin
@pytest.mark.parametrize("name", sorted(OPS))
def test_gpu_and_tpu_programs_hold_no_while_loop(name):
    """The device-side tile schedules around the kernels are loop-free: no ``stablehlo.while`` in any public op's
    cuda or tpu program. (``jnp.searchsorted``'s default binary search is a ``while``, which XLA GPU steps from the
    host with a few launches per step before every grouped matmul; ``kernels.groups.segment_of`` counts instead.)
    The one ``while`` allowed is the fallback decomposition of jax >= 0.11's cumsum composite on cuda, which XLA GPU
    replaces by its own scan (``_without_scan_decompositions``); tpu's cumsum is a reduce_window on every version."""
    with lowering.pinned_targets():
        text = _export(name, jnp.bfloat16, ["cuda", "tpu"])
    assert "triton_kernel_call" in text and "tpu_custom_call" in text
    rest, exempt = _without_scan_decompositions(text)
    assert "stablehlo.while" not in rest, sorted(exempt)
    if jax.__version_info__ < (0, 11):
        assert not exempt, exempt
