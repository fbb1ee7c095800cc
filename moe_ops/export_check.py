"""Lower every public op (forward and gradient) for GPU and TPU platforms from any host, and report the kernels.

    python -m moe_ops.export_check [--platform cuda rocm tpu] [--dtype bf16 f32]

prints, as it goes, one row per op x platform x kernel launch: the kernel, and for Triton (decoded from the
``triton_kernel_call``, ``kernels.lowering``) grid, warps and shared memory against the target's limit; for TPU the
number of Mosaic kernels. Exits non-zero on any failure: a lowering error, a launch over the shared-memory limit,
a GPU export without Triton kernels, or a TPU export without Mosaic (or with an interpreter callback).
The CUDA / ROCm rows need ``moe-ops[lowering]`` (jaxlib's CUDA plugin); CUDA is lowered for sm_90, ROCm for gfx950.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

M, K, N, G, T, TOP_K = 512, 256, 384, 8, 128, 2
ARCH = {"cuda": "sm90", "rocm": "gfx950"}
DTYPES = {"bf16": "bfloat16", "f32": "float32"}


def example_inputs(dtype):
    """Named example operands: uneven groups with an empty one, ``sum = M``; MoE layer inputs with E = G."""
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.key(0), 6)
    return dict(lhs=jax.random.normal(keys[0], (M, K), dtype), rhs=jax.random.normal(keys[1], (G, K, N), dtype),
                rhs_t=jax.random.normal(keys[1], (G, N, K), dtype), out=jax.random.normal(keys[2], (M, N), dtype),
                sizes=jnp.array([100, 0, 37, 120, 1, 64, 90, 100], jnp.int32),
                x=jax.random.normal(keys[3], (T, K), dtype), logits=jax.random.normal(keys[4], (T, G), jnp.float32),
                w_gate=jax.random.normal(keys[5], (G, K, N), dtype) * 0.05,
                w_down=jax.random.normal(keys[5], (G, N, K), dtype) * 0.05)


def _grad(f, argnums):
    import jax
    import jax.numpy as jnp
    return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=argnums)


def _round_trip(x, logits):
    import moe_ops
    weights, ids = moe_ops.route(logits, TOP_K)
    x_sorted, _, sort_idx = moe_ops.permute(x, ids, G)
    return moe_ops.unpermute(x_sorted * 2, sort_idx, weights)


def _ffn(fused):
    import moe_ops
    return lambda x, l, wg, wd: moe_ops.moe_ffn(x, l, wg, wg, wd, top_k=TOP_K, fused=fused)


def ops():
    """name -> (function, names of its ``example_inputs``): every public op, forward and gradient, plain and fused,
    with ``group_offset`` and ``transpose_rhs``."""
    import moe_ops
    return {
        "gmm": (lambda a, b, g: moe_ops.gmm(a, b, g), ("lhs", "rhs", "sizes")),
        "gmm_grad": (_grad(lambda a, b, g: moe_ops.gmm(a, b, g), (0, 1)), ("lhs", "rhs", "sizes")),
        "gmm_shard_transposed_grad": (
            _grad(lambda a, b, g: moe_ops.gmm(a, b[2:6], g, group_offset=2, transpose_rhs=True), (0, 1)),
            ("lhs", "rhs_t", "sizes")),
        "tgmm_grad": (_grad(lambda a, b, g: moe_ops.tgmm(a, b, g), (0, 1)), ("lhs", "out", "sizes")),
        "permute_unpermute_grad": (_grad(_round_trip, (0, 1)), ("x", "logits")),
        "moe_ffn_fused": (_ffn(None), ("x", "logits", "w_gate", "w_down")),
        "moe_ffn_fused_grad": (_grad(_ffn(None), (0, 2, 3)), ("x", "logits", "w_gate", "w_down")),
        "moe_ffn_unfused": (_ffn(False), ("x", "logits", "w_gate", "w_down")),
        "moe_ffn_unfused_grad": (_grad(_ffn(False), (0, 2, 3)), ("x", "logits", "w_gate", "w_down")),
    }


def export_text(name, dtype, platforms) -> str:
    """The StableHLO text of ``jax.export`` of op ``name`` for ``platforms`` (GPU device queries must be pinned)."""
    import jax
    fn, argnames = ops()[name]
    data = example_inputs(dtype)
    exported = jax.export.export(jax.jit(fn), platforms=list(platforms), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")])(*(data[a] for a in argnames))
    return exported.mlir_module()


@dataclasses.dataclass(frozen=True)
class Row:
    op: str
    platform: str
    kernel: str
    grid: tuple = ()
    num_warps: int = 0
    shared_bytes: int = 0
    status: str = "ok"


def check_op(name, dtype, platform) -> list[Row]:
    """Rows for one op lowered for one platform (``cuda`` / ``rocm`` / ``tpu``)."""
    from kernels import lowering
    try:
        if platform == "tpu":
            text = export_text(name, dtype, [platform])
            mosaic = text.count("tpu_custom_call")
            bad = "callback" in text or "triton_kernel_call" in text or not mosaic
            return [Row(name, platform, f"{mosaic} Mosaic kernels", status="FAIL no Mosaic" if bad else "ok")]
        with lowering.pinned_targets(rocm_arch=ARCH["rocm"]):
            text = export_text(name, dtype, [platform])
        launches = lowering.kernel_calls(text)
        if not launches or "callback" in text:
            return [Row(name, platform, "-", status="FAIL no triton_kernel_call")]
        return [Row(name, platform, c.kernel, c.grid, c.num_warps, c.shared_bytes,
                    "; ".join(c.problems(ARCH[platform])) or "ok") for c in launches]
    except Exception as e:  # a failed lowering is a reported row
        message = str(e).strip().splitlines()
        return [Row(name, platform, "-", status=f"FAIL {(message[-1] if message else type(e).__name__)[:160]}")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platform", nargs="+", default=["cuda", "rocm", "tpu"], choices=["cuda", "rocm", "tpu"])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--op", nargs="+", help="ops to lower (default: all)")
    args = parser.parse_args(argv)
    import jax  # lowering only: never initialise an (absent) GPU
    jax.config.update("jax_platforms", jax.config.jax_platforms or "cpu")
    from kernels import lowering
    if {"cuda", "rocm"} & set(args.platform) and lowering.unavailable_reason():
        parser.error(lowering.unavailable_reason())
    names = args.op or list(ops())
    unknown = sorted(set(names) - set(ops()))
    if unknown:
        parser.error(f"unknown --op {', '.join(unknown)}; valid: {', '.join(ops())}")
    import jax.numpy as jnp
    print(f"{'op':28} {'dtype':5} {'platform':8} {'kernel':22} {'grid':>10} {'warps':>5} {'smem':>7}  status",
          flush=True)
    failures = total = 0
    for dtype_name in args.dtype:
        for name in names:
            for platform in args.platform:
                for r in check_op(name, jnp.dtype(DTYPES[dtype_name]), platform):
                    total += 1
                    failures += r.status != "ok"
                    grid = "x".join(map(str, r.grid[:1])) if r.grid else "-"
                    print(f"{r.op:28} {dtype_name:5} {r.platform:8} {r.kernel:22} {grid:>10} {r.num_warps:5d} "
                          f"{r.shared_bytes:7d}  {r.status}", flush=True)
    print(f"{total} rows, {failures} failures")
    return 1 if failures or not total else 0


if __name__ == "__main__":
    sys.exit(main())
