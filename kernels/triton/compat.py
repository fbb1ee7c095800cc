"""Two fixes to jax-triton's real (GPU) lowering, applied by ``bridge.load_jax_triton``; each is a no-op where the
installed versions do not need it.

1. **Kernel cache per platform.** jax-triton 0.3.1 caches compiled kernels under a key without the platform or the
   AMD arch, so in one process a kernel lowered for ``cuda`` is reused, as PTX, for ``rocm`` when the config and
   compute capability agree (an export for both, or tests of both), and a gfx950 hsaco for gfx942. We give each
   (platform, AMD arch) its own cache.
2. **ROCm metadata on triton >= 3.7.** jax-triton 0.3.1 compiles HIP kernels stage by stage with an empty metadata
   dict; triton's AMD ``make_llir`` then reads ``metadata["num_ctas"]``, which triton's own driver puts there from
   the options. We set it the same way before ``make_llir`` runs (only when absent).
"""

from __future__ import annotations

import functools

_PATCHED = "_moe_ops_patched"


def patch_jax_triton(triton_lib) -> None:
    """Apply both fixes once (idempotent)."""
    if getattr(triton_lib, _PATCHED, False):
        return
    _per_platform_cache(triton_lib)
    _hip_num_ctas()
    setattr(triton_lib, _PATCHED, True)


def _per_platform_cache(triton_lib):
    original = triton_lib.get_or_create_triton_kernel
    caches: dict[str, dict] = {}

    @functools.wraps(original)
    def get_or_create(backend_init_func, platform, *args, **kwargs):
        saved = triton_lib._COMPILED_KERNEL_CACHE
        key = (platform, triton_lib.triton_kernel_call_lib.get_arch_details(0) if platform == "rocm" else None)
        triton_lib._COMPILED_KERNEL_CACHE = caches.setdefault(key, {})
        try:
            return original(backend_init_func, platform, *args, **kwargs)
        finally:
            triton_lib._COMPILED_KERNEL_CACHE = saved

    triton_lib.get_or_create_triton_kernel = get_or_create


def _hip_num_ctas():
    try:
        from triton.backends.amd.compiler import HIPBackend
    except ImportError:  # a triton build without the AMD backend
        return
    original = HIPBackend.make_llir

    @functools.wraps(original)
    def make_llir(src, metadata, options, *args, **kwargs):
        metadata.setdefault("num_ctas", getattr(options, "num_ctas", 1))
        return original(src, metadata, options, *args, **kwargs)

    HIPBackend.make_llir = staticmethod(make_llir) if isinstance(
        HIPBackend.__dict__.get("make_llir"), staticmethod) else make_llir
