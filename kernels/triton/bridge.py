"""CPU bridge for ``jax_triton.triton_call``: the same ``@triton.jit`` kernel, run by the Triton interpreter.

On a GPU jaxlib nothing here changes behaviour: ``triton_call`` lowers to jax-triton's CUDA / ROCm custom call.
On a CPU-only jaxlib two things are missing, and ``load_jax_triton()`` supplies both:

1. ``import jax_triton`` fails, because it looks up ``jaxlib.gpu_triton.get_compute_capability`` and
   ``get_serialized_metadata``. We provide stand-ins that raise if a GPU code path ever calls them.
2. ``triton_kernel_call_p`` has no CPU lowering. We register one that wraps the kernel launch in
   ``jax.pure_callback``; the callback runs the kernel's Python source under Triton's interpreter on CPU torch
   tensors. It therefore works eagerly, under ``jit`` and inside ``shard_map`` (``vmap``:
   ``kernels.triton.batching`` folds the batch before the call, as on GPU). ``jax.export`` (symbolic shapes or
   not) raises a clear error (``_cpu_lowering``).

Interpreter limits handled here, explicitly:

* The interpreter wants torch tensors, not numpy arrays: arrays cross as torch CPU tensors.
* ``tl.dot`` on bf16 operands is wrong in the interpreter (it multiplies bit patterns), so bf16 buffers are handed to
  the kernel as f32 and rounded back to bf16 on the way out. Kernels see f32 data in interpret mode; the AOT compile
  check (``kernels.aot``) is what covers their bf16 code generation.
* Outputs are not initialised by the interpreter. Outputs listed in ``zeroed_outputs`` start as zeros, aliased
  outputs start as their input, and every other output is *poisoned* (NaN for floats, the minimum integer for ints)
  so that a row the kernel failed to write shows up in tests instead of reading as a plausible zero.
* The interpreter loads and stores through raw pointers, so an out-of-bounds store would silently corrupt the
  process heap. ``kernels.triton.bounds`` checks every access against the kernel's buffers, canaries around them,
  and that unaliased inputs come back unchanged (``OutOfBoundsAccess`` names the kernel and the argument).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core, sharding_impls
from jax._src.lib import xla_client as jax_xc
from jax._src.interpreters import mlir as jax_mlir
from jax._src.named_sharding import SdyArray, SdyDim
from jax._src.export import shape_poly
from jax.interpreters import mlir

from kernels.triton import bounds
from kernels.triton.compat import patch_jax_triton

_lock = threading.Lock()
_installed = False


def _provide_gpu_triton_stubs():
    from jax._src.lib import gpu_triton

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("jaxlib has no GPU support: this Triton call must run through the CPU bridge")

    for name in ("get_compute_capability", "get_serialized_metadata"):
        if not hasattr(gpu_triton, name):
            setattr(gpu_triton, name, unavailable)


@functools.cache
def load_jax_triton():
    """Import jax_triton (and, on a CPU-only jaxlib, install the interpreter bridge). Returns the module."""
    global _installed
    _provide_gpu_triton_stubs()
    import jax_triton
    from jax_triton import triton_lib

    patch_jax_triton(triton_lib)
    with _lock:
        if not _installed:
            mlir.register_lowering(triton_lib.triton_kernel_call_p, _cpu_lowering, platform="cpu")
            _installed = True
    # Every kernel module of the package, before the first kernel is interpreted: the interpreter mode is
    # process-wide (``_interpreter_mode``), so a module imported on another thread meanwhile would get its
    # ``@triton.jit`` functions as InterpretedFunctions.
    importlib.import_module("kernels.triton.backend")
    return jax_triton


def triton_call(*args, kernel, grid, **kwargs):
    """``jax_triton.triton_call`` that refuses, with a clear error, a launch grid or constexpr that depends on a
    symbolic dimension (``jax.export`` shape polymorphism): the kernel is compiled for concrete constexprs and a
    concrete grid, which a symbolic M cannot give (jax-triton would fail deep in compilation)."""
    name = kwargs.get("name") or kernel.__name__
    grid_values = grid if isinstance(grid, (tuple, list)) else (grid,)
    symbolic = {f"grid[{i}]": g for i, g in enumerate(grid_values) if not _is_static(g)}
    symbolic.update({key: v for key, v in kwargs.items() if key.isupper() and not _is_static(v)})
    if symbolic:
        details = ", ".join(f"{key}={value}" for key, value in symbolic.items())
        raise NotImplementedError(
            f"Triton kernel {name!r}: {details} depend on a symbolic dimension; this kernel is specialised on them "
            "(constexpr / launch grid), so jax.export with a symbolic row count is not supported for it. Export with "
            "concrete shapes, or use implementation='xla' or 'pallas' (see README, 'Shape-polymorphic export').")
    return load_jax_triton().triton_call(*args, kernel=kernel, grid=grid, **kwargs)


def _is_static(value) -> bool:
    """False for a symbolic dimension expression (``jax.export.symbolic_shape``), True for anything else."""
    return jax_core.is_constant_dim(value) if isinstance(value, shape_poly._DimExpr) else True


def _cpu_lowering(ctx, *args, **params):
    """The bridge's lowering, after checking that it is not being exported. ``jax.export`` cannot serialise the
    host callback (``jax.pure_callback``) that runs the interpreter, and for symbolic shapes XLA would fail first
    (``std::bad_cast``); both get this message instead of JAX's generic one."""
    symbolic = [str(a.shape) for a in (*ctx.avals_in, *ctx.avals_out)
                if hasattr(a, "shape") and not jax_core.is_constant_shape(a.shape)]
    exporting = getattr(ctx.module_context.lowering_parameters, "for_export", False)
    if symbolic or exporting:
        shapes = f" for symbolic shapes {', '.join(symbolic)}" if symbolic else ""
        name = params.get("name") or getattr(params["fn"], "__name__", "?")
        raise NotImplementedError(
            f"the CPU interpreter bridge cannot export Triton kernel {name!r}{shapes}: it runs the "
            "kernel in jax.pure_callback, and jax.export cannot serialise host callbacks (nor give them symbolic "
            "shapes). Export the Triton backend for platforms=['cuda'] or ['rocm'] (shape-polymorphic export works "
            "there), or use implementation='xla' / 'pallas' on CPU.")
    results = mlir.lower_fun(_interpret_call, multiple_results=True)(ctx, *args, **params)
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, sharding_impls.ShardingContext) and axis_context.num_devices > 1:
        results = [jax_mlir.wrap_with_sharding_op(ctx, r, aval, _replicated(aval.ndim))
                   for r, aval in zip(results, ctx.avals_out)]
    return results


def _replicated(ndim):
    """A replicated sharding annotation (Shardy or GSPMD). Under automatic partitioning across several devices the
    host callback runs once with a one-device ("maximal") sharding, which XLA's partitioner may leave on the jit's
    outputs, and JAX cannot convert it back into a sharding ("Cannot convert GSPMDSharding {maximal device=0} into
    SdyArray"); replicating the callback's results right away keeps it inside the program."""
    if jax.config.jax_use_shardy_partitioner:
        return SdyArray(mesh_shape=None, dim_shardings=(SdyDim(axes=(), is_open=False),) * ndim)
    return jax_xc.HloSharding.replicate().to_proto()


# ---------------------------------------------------------------------------------------------------------------
# Running a JITFunction under the interpreter.


@functools.cache
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(fn)


def _call_helper_interpreted(jit_fn, *args, **kwargs):
    """A ``@triton.jit`` helper called from an interpreted kernel. Triton's own nested call patches
    ``triton.language`` for the interpreter and never restores it, which breaks later real compiles (AOT) of any
    kernel in that module; patch and restore around the call instead."""
    from triton.runtime import interpreter

    scope = interpreter._patch_lang(jit_fn.fn)
    try:
        return _interpreted(jit_fn.fn).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


def _scalar_index(self):
    """``int(tensor)`` for a one-element interpreter tensor (a loop bound loaded from memory)."""
    return int(self.handle.data.reshape(-1)[0])


def _with_scalar_index(patch_lang_tensor):
    """Triton < 3.9's interpreter converts loop bounds with ``int(array)``, which NumPy 2 refuses for the shape-(1,)
    arrays that scalars are there (``range(0, tl.cdiv(end - start, BM))`` fails). Re-patch ``__index__`` the way
    newer interpreters do, inside the same restorable scope."""
    def patch(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)
    return patch


@contextlib.contextmanager
def _interpreter_mode():
    """Let JITFunctions (kernels and the helpers they call) run as interpreted Python for the duration. Triton's
    switch for it (``knobs.runtime.interpret``) is process-wide, and ``@triton.jit`` reads it when it decorates: a
    module imported on another thread meanwhile (JAX runs callbacks on its own threads, asynchronously) gets
    InterpretedFunctions, which ``run_interpreted`` accepts too."""
    from triton import knobs
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    with _lock:
        saved = JITFunction.__call__, knobs.runtime.interpret, interpreter._patch_lang_tensor
        JITFunction.__call__ = _call_helper_interpreted
        knobs.runtime.interpret = True
        interpreter._patch_lang_tensor = _with_scalar_index(saved[2])
        try:
            yield
        finally:
            JITFunction.__call__, knobs.runtime.interpret, interpreter._patch_lang_tensor = saved


def _to_torch(array):
    import torch
    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(np.array(array, copy=True))


def _poisoned(shape, dtype):
    import torch
    dtype = np.dtype(dtype)
    if dtype == jnp.bfloat16:
        return torch.full(shape, float("nan"), dtype=torch.float32)
    if np.issubdtype(dtype, np.floating):
        return torch.from_numpy(np.full(shape, np.nan, dtype))
    if dtype == np.bool_:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.from_numpy(np.full(shape, np.iinfo(dtype).min, dtype))


def _from_torch(tensor, dtype):
    return np.asarray(tensor.numpy()).astype(np.dtype(dtype))


def run_interpreted(fn, arrays, *, scalar_args, out_shapes, grid, input_output_aliases=(), zeroed_outputs=(),
                    metaparams=None):
    """Launch ``fn`` (a ``triton.JITFunction``) on numpy ``arrays`` under the interpreter; return numpy outputs.

    Arguments follow jax-triton's convention: array inputs in order with ``scalar_args`` ``(index, type, value)``
    inserted at their positions, then one pointer per output."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, (JITFunction, InterpretedFunction)):  # the latter: see ``_interpreter_mode``
        raise TypeError(f"the CPU bridge runs plain @triton.jit kernels, got {type(fn).__name__}; resolve "
                        "autotuned / heuristic configs before calling triton_call")
    metaparams = dict(metaparams or {})
    inputs = [_to_torch(a) for a in arrays]
    zeroed = zeroed_outputs(metaparams) if callable(zeroed_outputs) else zeroed_outputs
    aliases = {out: inp for inp, out in input_output_aliases}
    outputs = []
    for i, shape in enumerate(out_shapes):
        if i in aliases:
            outputs.append(inputs[aliases[i]].clone())
        elif i in zeroed:
            outputs.append(torch.zeros_like(_poisoned(shape.shape, shape.dtype)))
        else:
            outputs.append(_poisoned(shape.shape, shape.dtype))
    buffers = [bounds.guarded(t) for t in inputs + outputs]
    views = [view for view, _ in buffers]
    args = list(views)
    for index, _, value in scalar_args:
        args.insert(index, value)
    launch_grid = grid(metaparams) if callable(grid) else grid
    launch_grid = tuple(launch_grid) if isinstance(launch_grid, (tuple, list)) else (launch_grid,)
    if all(g > 0 for g in launch_grid):
        name = getattr(fn, "__name__", fn)
        with _interpreter_mode(), bounds.checked_accesses(name, views), bounds.unwrapped():
            _interpreted(fn.fn)[launch_grid](*args, **metaparams)
        bounds.check_guards(name, buffers, inputs, [i for i in range(len(inputs)) if i not in aliases.values()])
    return tuple(_from_torch(view, s.dtype) for view, s in zip(views[len(inputs):], out_shapes))


def _interpret_call(*array_args, fn, scalar_args, out_shapes, grid, input_output_aliases, zeroed_outputs,
                    name, custom_call_target_name, num_warps, num_stages, num_ctas, compute_capability,
                    enable_fp_fusion, debug, serialized_metadata, **metaparams):
    """CPU lowering body of ``triton_kernel_call_p``: a ``pure_callback`` into ``run_interpreted``."""
    del name, custom_call_target_name, num_warps, num_stages, num_ctas, compute_capability, enable_fp_fusion
    del debug, serialized_metadata
    result_shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shapes)

    def host(*arrays):
        return run_interpreted(fn, arrays, scalar_args=scalar_args, out_shapes=out_shapes, grid=grid,
                               input_output_aliases=input_output_aliases, zeroed_outputs=zeroed_outputs,
                               metaparams=metaparams)

    return list(jax.pure_callback(host, result_shapes, *array_args, vmap_method="sequential"))
