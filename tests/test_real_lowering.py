"""The GPU and TPU paths proven from a CPU host: per-platform kernel choice at lowering time, and jax-triton's real
CUDA / ROCm lowering (``kernels.lowering``) with the decoded launch checked against the tuning table.

Needs jaxlib's CUDA plugin (the ``test`` extra installs it on Linux x86-64); elsewhere the GPU-lowering tests skip
with that reason. The TPU export tests need nothing extra.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import moe_ops
from kernels import aot, lowering
from kernels.registry import cases_for, registered_families
from kernels.triton import schedule, tuning

needs_plugin = pytest.mark.skipif(lowering.unavailable_reason() is not None,
                                  reason=str(lowering.unavailable_reason()))
TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")
M, K, N, G, T, TOP_K = 512, 256, 384, 8, 128, 2


def _data(dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    sizes = jnp.array([100, 0, 37, 120, 1, 64, 90, 100], jnp.int32)  # uneven, an empty group, sum = M
    return dict(lhs=jax.random.normal(keys[0], (M, K), dtype), rhs=jax.random.normal(keys[1], (G, K, N), dtype),
                rhs_t=jax.random.normal(keys[1], (G, N, K), dtype), out=jax.random.normal(keys[2], (M, N), dtype),
                sizes=sizes, x=jax.random.normal(keys[3], (T, K), dtype),
                logits=jax.random.normal(keys[4], (T, G), jnp.float32),
                w_gate=jax.random.normal(keys[5], (G, K, N), dtype) * 0.05,
                w_down=jax.random.normal(keys[5], (G, N, K), dtype) * 0.05)


def _grad(f, argnums):
    return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=argnums)


def _round_trip(x, logits):
    weights, ids = moe_ops.route(logits, TOP_K)
    x_sorted, _, sort_idx = moe_ops.permute(x, ids, G)
    return moe_ops.unpermute(x_sorted * 2, sort_idx, weights)


def _ffn(fused):
    return lambda x, l, wg, wd: moe_ops.moe_ffn(x, l, wg, wg, wd, top_k=TOP_K, fused=fused)


# name -> (function, argument names); every public op, forward and gradient, with group_offset and transpose_rhs.
OPS = {
    "gmm": (lambda a, b, g: moe_ops.gmm(a, b, g), ("lhs", "rhs", "sizes")),
    "gmm_grad": (_grad(lambda a, b, g: moe_ops.gmm(a, b, g), (0, 1)), ("lhs", "rhs", "sizes")),
    "gmm_shard_transposed_grad": (
        _grad(lambda a, b, g: moe_ops.gmm(a, b[2:6], g, group_offset=2, transpose_rhs=True), (0, 1)),
        ("lhs", "rhs_t", "sizes")),
    "tgmm_grad": (_grad(lambda a, b, g: moe_ops.tgmm(a, b, g), (0, 1)), ("lhs", "out", "sizes")),
    "permute_unpermute_grad": (_grad(_round_trip, (0, 1)), ("x", "logits")),
    "moe_ffn_fused_grad": (_grad(_ffn(None), (0, 2, 3)), ("x", "logits", "w_gate", "w_down")),
    "moe_ffn_unfused_grad": (_grad(_ffn(False), (0, 2, 3)), ("x", "logits", "w_gate", "w_down")),
}


def _export(name, dtype, platforms):
    fn, argnames = OPS[name]
    data = _data(dtype)
    exported = jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=[TRITON_CALL])(
        *(data[a] for a in argnames))
    return exported.mlir_module()


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


# every op x {sm90, gfx950} x {bf16, f32}, except the two f32 layers on gfx950 (bf16 there, f32 on sm90)
LAUNCH_CASES = [(name, dtype, arch) for name in OPS for arch in ("sm90", "gfx950")
                for dtype in (jnp.bfloat16, jnp.float32)
                if not (dtype == jnp.float32 and name.startswith("moe_ffn") and arch == "gfx950")]


@needs_plugin
@pytest.mark.parametrize("name,dtype,arch", LAUNCH_CASES,
                         ids=[f"{n}-{jnp.dtype(d).name}-{a}" for n, d, a in LAUNCH_CASES])
def test_gpu_lowering_launches(name, dtype, arch):
    """Every public op lowers through jax-triton for cuda (sm_90) and rocm (gfx950): real Triton compiles, launches
    within the device's shared memory, and for the plain grouped matmuls exactly the tuning table's config."""
    with lowering.pinned_targets(compute_capability=90, rocm_arch=arch):
        text = _export(name, dtype, [lowering.PLATFORM_OF[arch]])
    launches = lowering.kernel_calls(text)
    assert launches and "tpu_custom_call" not in text and "callback" not in text
    problems = [f"{c.kernel}: {p}" for c in launches for p in c.problems(arch)]
    assert not problems, problems
    expected = _expected_launches(name, dtype, arch)
    if expected is not None:
        assert sorted((c.kernel, c.grid[:1], c.num_warps) for c in launches) == sorted(expected)


@needs_plugin
def test_default_layer_launches_the_fused_kernels_on_gpu():
    """``moe_ffn(fused=None)`` exported for cuda from a CPU host runs the fused forward: three GMM launches and no
    row gather / combine kernels (the unfused forward has both)."""
    data = _data(jnp.bfloat16)
    args = [data[a] for a in ("x", "logits", "w_gate", "w_down")]
    kernels = {}
    with lowering.pinned_targets():
        for fused in (None, False):
            text = jax.export.export(jax.jit(_ffn(fused)), platforms=["cuda"], disabled_checks=[TRITON_CALL])(
                *args).mlir_module()
            kernels[fused] = [c.kernel for c in lowering.kernel_calls(text)]
    assert kernels[None].count("_gmm_kernel") == 3
    assert not {"_gather_rows_kernel", "_combine_rows_kernel"} & set(kernels[None])
    assert {"_gather_rows_kernel", "_combine_rows_kernel"} <= set(kernels[False])


def _via_jax_failures(target, families=None, one_per_kernel=False):
    reports = []
    seen = set()
    for case in cases_for(target, families):
        if one_per_kernel and case.kernel_name in seen:
            continue
        seen.add(case.kernel_name)
        reports.append(aot.lower_case_via_jax(case, target))
    return reports, [f"{r.kernel} {r.config}: {r.error}" for r in reports if not r.clean]


@needs_plugin
@pytest.mark.parametrize("target", ["sm90", "gfx950"])
def test_every_kernel_lowers_via_jax(target):
    reports, failures = _via_jax_failures(target, one_per_kernel=True)
    assert len(reports) >= 10 and not failures, failures


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm90", "gfx950", "gfx942"])
def test_every_shipped_config_lowers_via_jax(target):
    reports, failures = _via_jax_failures(target)
    assert len(reports) == len(cases_for(target, registered_families())) and not failures, failures


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
