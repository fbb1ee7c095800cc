"""Global scratch memory for Triton kernels launched through jax-triton (device-side TMA descriptors need it).

A compiled Triton kernel takes two hidden pointers after its own arguments: global scratch (where
``tl.make_tensor_descriptor`` writes each program's descriptors) and profile scratch. jaxlib's launcher appends
``nullptr`` for both after the parameters of the serialized call, so a TMA kernel launched by ``triton_call`` would
write its descriptors near address 0. ``triton_call_with_scratch`` serializes one more array parameter than the
kernel's signature has, bound to an extra uint8 output of ``grid x scratch_bytes`` that XLA allocates: jaxlib then
passes ``[arguments..., scratch, null, null]``, and the kernel's hidden global-scratch pointer receives the buffer.

Assumptions, checked by ``check_versions`` (and the lowering tests decode the extra parameter and output):
1. jax-triton's ``get_or_create_triton_kernel(backend_init, platform, fn, arg_dtypes, scalar_args, *, num_warps,
   num_stages, num_ctas, compute_capability, enable_fp_fusion, metaparams, dump)`` (0.3.x);
2. jaxlib's ``TritonKernelCall(kernel, grid_0, grid_1, grid_2, parameters)`` and ``create_array_parameter`` with
   array parameters taken from the custom call's operands then results, in order, followed by the hidden pointers.
Only array arguments (every scalar a constexpr) are supported. On CPU the kernel runs under the interpreter bridge,
which needs no scratch (the buffer comes back zero).
"""

from __future__ import annotations

import inspect
import zlib

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

from kernels.platform import compiled_impl
from kernels.triton.bridge import load_jax_triton

__all__ = ["triton_call_with_scratch", "check_versions"]

_EXPECTED_KW = ("num_warps", "num_stages", "num_ctas", "compute_capability", "enable_fp_fusion", "metaparams", "dump")

scratch_call_p = jex_core.Primitive("moe_triton_scratch_call")
scratch_call_p.multiple_results = True


def check_versions(triton_lib) -> None:
    """Raise a clear error when jax-triton's lowering internals differ from what ``scratch`` relies on."""
    params = inspect.signature(triton_lib.get_or_create_triton_kernel).parameters
    missing = [k for k in _EXPECTED_KW if k not in params]
    lib = triton_lib.triton_kernel_call_lib
    if missing or not all(hasattr(lib, n) for n in ("TritonKernelCall", "create_array_parameter")):
        raise NotImplementedError(f"triton_call_with_scratch needs jax-triton 0.3.x lowering internals (missing "
                                  f"{missing or 'jaxlib TritonKernelCall'}); use MOE_OPS_GMM_VARIANT=pointer")


def triton_call_with_scratch(*args, kernel, out_shape, grid: int, scratch_bytes: int, name: str, num_warps: int,
                             num_stages: int, **metaparams):
    """``triton_call`` of ``kernel(*args, *outputs)`` on a 1-D ``grid`` with ``scratch_bytes`` of global scratch per
    program. ``out_shape`` is one ``ShapeDtypeStruct``; returns the output."""
    outs = scratch_call_p.bind(*args, kernel=kernel, out_shape=out_shape, grid=int(grid),
                               scratch_bytes=int(scratch_bytes), name=name, num_warps=num_warps,
                               num_stages=num_stages, metaparams=tuple(sorted(metaparams.items())))
    return outs[0]


def _abstract_eval(*_args, out_shape, grid, scratch_bytes, **_params):
    return [jax.core.ShapedArray(out_shape.shape, out_shape.dtype),
            jax.core.ShapedArray((grid * scratch_bytes,), jnp.uint8)]


def _cpu_impl(*args, kernel, out_shape, grid, scratch_bytes, name, num_warps, num_stages, metaparams):
    """The interpreter bridge (no scratch needed there); the scratch output is zeros."""
    out = load_jax_triton().triton_call(*args, kernel=kernel, out_shape=out_shape, grid=(grid,), name=name,
                                        num_warps=num_warps, num_stages=num_stages, **dict(metaparams))
    return [out, jnp.zeros((grid * scratch_bytes,), jnp.uint8)]


def _gpu_lowering(backend_name):
    def lower(ctx, *args, kernel, out_shape, grid, scratch_bytes, name, num_warps, num_stages, metaparams):
        triton_lib = load_jax_triton().triton_lib
        check_versions(triton_lib)
        lib = triton_lib.triton_kernel_call_lib
        backend_init = getattr(triton_lib, f"get_{backend_name}_backend")
        avals = list(ctx.avals_in) + [ctx.avals_out[0]]  # the kernel's own arguments; not the scratch buffer
        arg_dtypes = [triton_lib.get_triton_type(a) for a in avals]
        compiled, attrs = triton_lib.get_or_create_triton_kernel(
            backend_init, ctx.module_context.platforms[0], kernel, arg_dtypes, [], num_warps=num_warps,
            num_stages=num_stages, num_ctas=1, compute_capability=None, enable_fp_fusion=True,
            metaparams=dict(metaparams), dump=False)
        params = [lib.create_array_parameter(0, 16 if ["tt.divisibility", 16] in attrs[(i,)] else 0)
                  for i in range(len(avals))]
        params.append(lib.create_array_parameter(0, 16))  # lands in the hidden global-scratch slot
        call = lib.TritonKernelCall(compiled, grid, 1, 1, params)
        proto = call.to_proto(name, b"")
        return jax.ffi.ffi_lowering("triton_kernel_call", api_version=2,
                                    backend_config=zlib.compress(proto))(ctx, *args)
    return lower


scratch_call_p.def_abstract_eval(_abstract_eval)
scratch_call_p.def_impl(compiled_impl(scratch_call_p))
mlir.register_lowering(scratch_call_p, mlir.lower_fun(_cpu_impl, multiple_results=True), platform="cpu")
mlir.register_lowering(scratch_call_p, _gpu_lowering("cuda"), platform="cuda")
mlir.register_lowering(scratch_call_p, _gpu_lowering("hip"), platform="rocm")
