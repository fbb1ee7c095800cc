"""The op x shape world of ``tests/test_model_shapes_lowering.py``: the model and adversarial shapes as
(T, D, F, E, top_k), each public op built on ``jax.ShapeDtypeStruct`` operands (forward, or ``jax.grad`` w.r.t.
every float input), lowered for TPU (``jax.export``) or through jax-triton's real CUDA / ROCm lowering, and the
checks of the kernels each path must launch."""

import re

import jax
import jax.numpy as jnp
import pytest

import moe_ops
from benchmarks.shapes import GMM_SHAPES, LAYER_SHAPES
from kernels import lowering

needs_plugin = pytest.mark.skipif(lowering.unavailable_reason() is not None,
                                  reason=f"GPU lowering needs jaxlib's CUDA plugin: {lowering.unavailable_reason()}")
TRITON_CALL = jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")
SDS = jax.ShapeDtypeStruct
I32, F32 = jnp.int32, jnp.float32
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "f16": jnp.float16}


def _layer(name):
    s = LAYER_SHAPES[name]
    return (s.t, s.d, s.f, s.e, s.topk)


def _gmm_shape(name, k):
    """A GMM_SHAPES entry as (T, D=K, F=N, E, k) with T*k = M."""
    s = GMM_SHAPES[name]
    assert s.m % k == 0
    return (s.m // k, s.k, s.n, s.e, k)


# (T, D, F, E, top_k): the four model layers, the GMM-only shapes, and adversarial ones
SHAPES = {
    "gpt-oss": _layer("gpt-oss"),           # T8192 D2880 F2880 E32 k4 (2880 % 128 != 0)
    "qwen3-30b": _layer("qwen3-30b"),       # T8192 D2048 F768 E128 k8
    "dsv3-ep8": _layer("dsv3-ep8"),         # T4096 D7168 F2048 E32 k8
    "mixtral": _layer("mixtral"),           # T8192 D4096 F14336 E8 k2
    "decode": _gmm_shape("decode", 8),      # M256 K7168 N2048 E32
    "gpt-oss-w1": _gmm_shape("gpt-oss-w1", 4),  # M32768 K2880 N5760 E32
    "D7-F129": (64, 7, 129, 4, 2),
    "D129-F1000": (128, 129, 1000, 8, 2),
    "D1000-F129": (64, 1000, 129, 8, 2),
    "F7": (64, 256, 7, 8, 2),
    "D1": (64, 1, 128, 8, 2),
    "F1": (64, 128, 1, 4, 2),
    "E1": (64, 256, 256, 1, 1),
    "E3-k3": (64, 256, 384, 3, 3),          # top_k = E
    "E256": (256, 256, 128, 256, 8),
    "T1": (1, 2048, 768, 128, 8),           # one token at the Qwen3 layer
}
assert SHAPES["decode"] == (32, 7168, 2048, 32, 8) and SHAPES["gpt-oss"] == (8192, 2880, 2880, 32, 4)

GMM_OPS = ("gmm", "gmm_t", "gmm_offset", "gmm_existing", "tgmm", "ragged_dot")
OPS = GMM_OPS + ("permute_unpermute", "gather_gmm", "scatter_gmm", "swiglu_gmm", "swiglu_ffn", "swiglu_ffn_rc",
                 "experts_ffn", "fused_experts_ffn", "fused_experts_ffn_rc") + tuple(
    f"moe_ffn-{f}-{'rc' if rc else 'keep'}" for f in ("None", "True", "False") for rc in (False, True))


def build(op, shape, dtype):
    """(fn, abstract args, argnums of the float inputs) of ``op`` at ``shape`` = (T, D, F, E, top_k), M = T*k. At
    gpt-oss's shape the gated ops use its activation (``moe_ops.GPT_OSS``: clamped, scaled, offset), else silu."""
    t, d, f, e, k = shape
    act = moe_ops.GPT_OSS if shape == SHAPES["gpt-oss"] else "silu"
    m = t * k
    el = max(1, e // 2)  # group_offset: the last half of the experts is local
    sizes, rows = SDS((e,), I32), SDS((m,), I32)
    w = lambda *s: SDS(s, dtype)  # noqa: E731
    if op == "gmm":
        return lambda a, b, g: moe_ops.gmm(a, b, g), (w(m, d), w(e, d, f), sizes), (0, 1)
    if op == "gmm_t":
        return lambda a, b, g: moe_ops.gmm(a, b, g, transpose_rhs=True), (w(m, d), w(e, f, d), sizes), (0, 1)
    if op == "gmm_offset":
        return (lambda a, b, g: moe_ops.gmm(a, b, g, group_offset=e - el), (w(m, d), w(el, d, f), sizes), (0, 1))
    if op == "gmm_existing":
        return (lambda a, b, g, o: moe_ops.gmm(a, b, g, group_offset=e - el, existing_out=o),
                (w(m, d), w(el, d, f), sizes, w(m, f)), (0, 1, 3))
    if op == "tgmm":
        return lambda a, b, g: moe_ops.tgmm(a, b, g), (w(m, d), w(m, f), sizes), (0, 1)
    if op == "ragged_dot":
        return lambda a, b, g: moe_ops.ragged_dot(a, b, g), (w(m, d), w(e, d, f), sizes), (0, 1)
    if op == "permute_unpermute":
        def round_trip(x, wts, ids):
            xs, _, sort_idx = moe_ops.permute(x, ids, e)
            return moe_ops.unpermute(xs * 2, sort_idx, wts)
        return round_trip, (w(t, d), SDS((t, k), F32), SDS((t, k), I32)), (0, 1)
    if op == "gather_gmm":
        return lambda x, b, g, s: moe_ops.gather_gmm(x, b, g, s), (w(t, d), w(e, d, f), sizes, rows), (0, 1)
    if op == "scatter_gmm":
        return (lambda h, b, g, s, wt: moe_ops.scatter_gmm(h, b, g, s, wt),
                (w(m, f), w(e, f, d), sizes, rows, SDS((t, k), F32)), (0, 1, 4))
    if op == "swiglu_gmm":
        return (lambda x, a, b, g, s: moe_ops.swiglu_gmm(x, a, b, g, s, activation=act),
                (w(t, d), w(e, d, f), w(e, d, f), sizes, rows), (0, 1, 2))
    if op in ("swiglu_ffn", "swiglu_ffn_rc"):
        rc = op.endswith("_rc")
        return (lambda x, a, b, c, g, s, wt: moe_ops.swiglu_ffn(x, a, b, c, g, s, wt, recompute=rc, activation=act),
                (w(t, d), w(e, d, f), w(e, d, f), w(e, f, d), sizes, rows, SDS((t, k), F32)), (0, 1, 2, 3, 6))
    if op == "experts_ffn":
        return (lambda x, g, a, b, c: moe_ops.experts_ffn(x, g, a, b, c, activation=act),
                (w(m, d), sizes, w(e, d, f), w(e, d, f), w(e, f, d)), (0, 2, 3, 4))
    if op in ("fused_experts_ffn", "fused_experts_ffn_rc"):
        rc = op.endswith("_rc")
        return (lambda x, wt, ids, a, b, c: moe_ops.fused_experts_ffn(x, wt, ids, a, b, c, recompute=rc,
                                                                               activation=act),
                (w(t, d), SDS((t, k), F32), SDS((t, k), I32), w(e, d, f), w(e, d, f), w(e, f, d)), (0, 1, 3, 4, 5))
    if op == "moe_ffn_biases":   # the default (fused) layer with gpt-oss's three expert biases
        return (lambda x, lg, a, b, c, bg, bu, bd: moe_ops.moe_ffn(x, lg, a, b, c, top_k=k, activation=act,
                                                                   b_gate=bg, b_up=bu, b_down=bd),
                (w(t, d), SDS((t, e), F32), w(e, d, f), w(e, d, f), w(e, f, d), w(e, f), w(e, f), w(e, d)),
                tuple(range(8)))
    if op.startswith("moe_ffn-"):
        _, fused, mode = op.split("-")
        fused, rc = {"None": None, "True": True, "False": False}[fused], mode == "rc"
        return (lambda x, lg, a, b, c: moe_ops.moe_ffn(x, lg, a, b, c, top_k=k, fused=fused, recompute=rc,
                                                       activation=act),
                (w(t, d), SDS((t, e), F32), w(e, d, f), w(e, d, f), w(e, f, d)), (0, 1, 2, 3, 4))
    raise KeyError(op)


def program(op, shape, dtype, grad):
    """The op, or ``jax.grad`` of the f32 sum of its output w.r.t. every float input, and its abstract args."""
    fn, args, argnums = build(op, shape, dtype)
    if grad:
        fn = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(F32)), argnums=argnums)
    return jax.jit(fn), args


def tpu_text(op, shape, dtype, grad):
    fn, args = program(op, shape, dtype, grad)
    return jax.export.export(fn, platforms=["tpu"])(*args).mlir_module()


def gpu_launches(op, shape, dtype, grad, arch):
    """Decoded ``triton_kernel_call`` launches of the program lowered for ``arch``'s platform, after the checks every
    GPU program must pass (only Triton kernels, no callback, each launch within the target's limits)."""
    fn, args = program(op, shape, dtype, grad)
    with lowering.pinned_targets(compute_capability=90, rocm_arch=arch if arch.startswith("gfx") else "gfx950"):
        text = jax.export.export(fn, platforms=[lowering.PLATFORM_OF[arch]],
                                 disabled_checks=[TRITON_CALL])(*args).mlir_module()
    launches = lowering.kernel_calls(text)
    assert launches, f"{op}: no triton_kernel_call for {arch}"
    assert "callback" not in text and "tpu_custom_call" not in text
    problems = [f"{c.kernel} grid={c.grid} warps={c.num_warps} smem={c.shared_bytes}: {p}"
                for c in launches for p in c.problems(arch)]
    assert not problems, problems
    return launches


def check_tpu(op, shape, dtype, grad):
    text = tpu_text(op, shape, dtype, grad)
    assert "tpu_custom_call" in text, f"{op}: no Mosaic kernel"
    assert "callback" not in text and "triton_kernel_call" not in text
    return re.findall(r'kernel_name = "([^"]*)"', text)


# ---------------------------------------------------------------------------------------------------------------
# which kernels each op must launch on the GPU (the forward / backward kernel choice)

FUSED_FWD = {"_histogram_kernel", "_scatter_kernel", "_swiglu_kernel", "_gmm_kernel"}  # sort, gate/up, down-scatter
UNFUSED_ONLY = {"_gather_rows_kernel", "_combine_rows_kernel"}


def check_kernel_choice(op, grad, kernels):
    """The fused layer never builds the permuted copies and runs the one-kernel SwiGLU forward / fused backward; the
    unfused layer gathers and combines rows; the plain GMMs launch one GMM (forward) or a GMM + TGMM (backward)."""
    names = set(kernels)
    if op in ("gmm", "gmm_t", "gmm_offset", "gmm_existing", "ragged_dot"):
        assert sorted(kernels) == (["_gmm_kernel", "_tgmm_kernel"] if grad else ["_gmm_kernel"]), kernels
    elif op == "tgmm":
        assert kernels == (["_gmm_kernel"] * 2 if grad else ["_tgmm_kernel"]), kernels
    elif op == "swiglu_gmm" and not grad:
        assert kernels == ["_swiglu_kernel"], kernels
    elif op.startswith(("swiglu_ffn", "fused_experts_ffn", "moe_ffn-None", "moe_ffn-True")):
        assert not names & UNFUSED_ONLY, kernels
        if not grad:
            assert "_swiglu_kernel" in names and "_gmm_kernel" in names, kernels
        else:
            assert kernels.count("_swiglu_down_bwd_kernel") == 1 and kernels.count("_tgmm_kernel") == 3, kernels
            # saved mode runs the forward gate/up kernel that writes gate / up; recompute mode does not run it
            assert ("_swiglu_kernel" in names) == (not op.endswith("rc")), kernels
    elif op.startswith("moe_ffn-False") or op == "experts_ffn":
        assert "_swiglu_kernel" not in names and "_swiglu_down_bwd_kernel" not in names, kernels
        assert kernels.count("_gmm_kernel") >= 3, kernels
        if op != "experts_ffn":
            assert UNFUSED_ONLY <= names, kernels
