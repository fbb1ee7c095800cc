"""``precision`` as ``jax.lax.dot`` takes it, mapped to what each backend's kernels run (``kernel_precision``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PRECISION_NOTE = {
    "triton": "the triton backend runs f32 inputs as ieee f32 dots and 16-bit inputs natively with f32 accumulation, "
              "which meets every lax.Precision level and every f32- / 16-bit dot algorithm, not f64 / f8 ones",
    "pallas": "the pallas backend runs one 16-bit pass (DEFAULT) or Mosaic's fp32 contraction (HIGH / HIGHEST, and "
              "the f32 / tf32 / multi-pass bf16 dot algorithms); it has no f64 / f8 dot algorithm",
}
# dot algorithms the kernels meet, by the lax.Precision level they run at: one pass of 16-bit inputs, or fp32
_ONE_PASS = ("DEFAULT", "F16_F16_F16", "F16_F16_F32", "BF16_BF16_BF16", "BF16_BF16_F32")
_FP32 = ("BF16_BF16_F32_X3", "BF16_BF16_F32_X6", "BF16_BF16_F32_X9", "TF32_TF32_F32", "TF32_TF32_F32_X3", "F32_F32_F32")


def _algorithm_level(algorithm):
    """A ``DotAlgorithmPreset`` / ``DotAlgorithm`` -> the ``lax.Precision`` the kernels run it at (DEFAULT: one
    16-bit pass, HIGHEST: fp32), or None when no kernel meets it (f64 or f8 types)."""
    if isinstance(algorithm, jax.lax.DotAlgorithmPreset):
        name = algorithm.name
        return jax.lax.Precision.DEFAULT if name in _ONE_PASS else jax.lax.Precision.HIGHEST if name in _FP32 else None
    types = [jnp.dtype(t) for t in (algorithm.lhs_precision_type, algorithm.rhs_precision_type,
                                    algorithm.accumulation_type)]
    if any(t.itemsize > 4 or t.itemsize < 2 or not jnp.issubdtype(t, jnp.floating) for t in types):
        return None
    wide = any(t.itemsize == 4 for t in types[:2]) or max(algorithm.lhs_component_count,
                                                             algorithm.rhs_component_count) > 1
    return jax.lax.Precision.HIGHEST if wide else jax.lax.Precision.DEFAULT


def kernel_precision(precision, impl):
    """``precision`` as ``jax.lax.dot`` takes it -> the value the backend's kernels get (``None`` = their default).

    xla: passed through to ``lax.ragged_dot``. triton: always ``None`` (f32 is ieee and 16-bit inputs accumulate in
    f32, which meets every level and every f32 / tf32 / bf16 / f16 dot algorithm). pallas: ``None`` for DEFAULT and
    the one-pass 16-bit algorithms (``BF16_BF16_F32``, ...), ``HIGHEST`` for HIGH / HIGHEST and the f32 / tf32 /
    multi-pass algorithms (Mosaic has no bf16x3 contraction). f64 / f8 algorithms raise ``ValueError`` on triton and
    pallas. ``impl=None`` passes the canonical value on: ``backend`` maps it per lowering platform."""
    from jax._src.lax.lax import canonicalize_precision  # the one parser lax.dot itself uses
    try:
        canonical = canonicalize_precision(precision)
    except (TypeError, ValueError) as err:
        raise ValueError(f"precision: {err}") from None
    if canonical is None or impl in ("xla", None):
        return canonical
    levels = canonical if isinstance(canonical, tuple) else (canonical,)
    if isinstance(canonical, (jax.lax.DotAlgorithm, jax.lax.DotAlgorithmPreset)):
        levels = (_algorithm_level(canonical),)
    if not all(isinstance(p, jax.lax.Precision) for p in levels):
        raise ValueError(f"precision={precision!r} is not supported by implementation={impl!r}: "
                         f"{_PRECISION_NOTE[impl]}")
    if impl == "triton" or all(p == jax.lax.Precision.DEFAULT for p in levels):
        return None
    return jax.lax.Precision.HIGHEST
