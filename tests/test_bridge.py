"""The CPU bridge runs real @triton.jit kernels through jax_triton.triton_call (interpreter inside pure_callback)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from kernels.triton.bridge import load_jax_triton
from tests.helpers import keys, randn

jt = load_jax_triton()


@triton.jit
def _scale(x):
    return x * 2


@triton.jit
def _half_writer(x_ptr, n, o_ptr, BLOCK: tl.constexpr):
    """Writes 2*x to the first half of o only (calls a jit helper): the rest must come back poisoned."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n // 2
    tl.store(o_ptr + offs, _scale(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@triton.jit
def _dot(a_ptr, b_ptr, o_ptr, S: tl.constexpr):
    idx = tl.arange(0, S)
    a = tl.load(a_ptr + idx[:, None] * S + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * S + idx[None, :])
    tl.store(o_ptr + idx[:, None] * S + idx[None, :], tl.dot(a, b).to(o_ptr.dtype.element_ty))


@triton.jit
def _overrun(x_ptr, n, o_ptr, SHIFT: tl.constexpr, INTO_INPUT: tl.constexpr, BLOCK: tl.constexpr):
    """o = x, stored ``SHIFT`` elements off (a wrong mask: ``offs + SHIFT`` may leave o); or into x itself."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    target = x_ptr if INTO_INPUT else o_ptr
    tl.store(target + offs + SHIFT, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def overrun(x, shift, into_input=False):
    return jt.triton_call(x, x.shape[0], kernel=_overrun, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(1,), zeroed_outputs=(0,), SHIFT=shift, INTO_INPUT=into_input, BLOCK=16)


def half_writer(x, zeroed=()):
    return jt.triton_call(x, x.shape[0], kernel=_half_writer, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=lambda meta: (triton.cdiv(x.shape[0], meta["BLOCK"]),), zeroed_outputs=zeroed,
                          BLOCK=8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_unwritten_outputs_are_poisoned(dtype):
    x = (jnp.arange(20) + 1).astype(dtype)
    out = np.asarray(jax.jit(half_writer)(x))
    np.testing.assert_array_equal(out[:10], 2 * np.asarray(x[:10]))
    poison = np.nan if dtype == jnp.float32 else np.iinfo(np.int32).min
    np.testing.assert_array_equal(out[10:], np.full(10, poison, out.dtype))


def test_zeroed_outputs_start_at_zero():
    x = jnp.arange(1.0, 21.0)
    out = np.asarray(half_writer(x, zeroed=(0,)))
    np.testing.assert_array_equal(out[10:], 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dot_matches_numpy_including_bf16(dtype):
    """bf16 tl.dot is wrong in the raw interpreter; the bridge runs it in f32 and rounds the output."""
    k = keys(0, 2)
    a, b = randn(k[0], (16, 16), dtype), randn(k[1], (16, 16), dtype)
    out = jax.jit(lambda a, b: jt.triton_call(a, b, kernel=_dot, out_shape=jax.ShapeDtypeStruct((16, 16), dtype),
                                              grid=(1,), S=16))(a, b)
    expected = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2e-2, atol=2e-2)


def test_runs_inside_shard_map():
    x = jnp.arange(1.0, 33.0).reshape(2, 16)
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.shard_map(lambda v: half_writer(v[0])[None], mesh=mesh, in_specs=jax.P("d"), out_specs=jax.P("d"), check_vma=False)
    np.testing.assert_array_equal(jax.jit(sharded)(x)[:, :8], 2 * x[:, :8])


def test_rejects_non_jit_kernels():
    from kernels.triton.bridge import run_interpreted
    with pytest.raises(TypeError, match="plain @triton.jit"):
        run_interpreted(lambda: None, [], scalar_args=(), out_shapes=(), grid=(1,))


def test_interpreting_leaves_real_compilation_intact():
    """Interpreting a kernel whose jit helpers patch triton.language must not leave it patched: the GMM kernel still
    compiles for sm90 afterwards (AOT checks and interpreter tests share one pytest process)."""
    import moe_ops
    from kernels.aot import compile_case
    from kernels.registry import cases_for
    k = keys(3, 2)
    moe_ops.gmm(randn(k[0], (8, 16)), randn(k[1], (2, 16, 16)), jnp.array([3, 5], jnp.int32), implementation="triton")
    report = compile_case(cases_for("sm90", ["gmm"])[0], "sm90")
    assert report.ok, report.error


def test_kernel_decorated_during_an_interpretation_still_runs():
    """``@triton.jit`` reads Triton's process-wide interpreter switch when it decorates, and JAX runs the bridge's
    callbacks on their own threads: a kernel module imported while another thread interprets gets an
    InterpretedFunction. The bridge runs those too (it refused them with a TypeError, which failed every later
    call of a lazily imported kernel in that process)."""
    from kernels.triton import bridge
    from triton.runtime.interpreter import InterpretedFunction
    with bridge._interpreter_mode():   # what a callback thread holds while it interprets
        @triton.jit
        def late(x_ptr, o_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(o_ptr + offs, tl.load(x_ptr + offs) * 3)
    assert isinstance(late, InterpretedFunction)
    x = jnp.arange(1.0, 9.0)
    out = jax.jit(lambda v: jt.triton_call(v, kernel=late, out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
                                           grid=(1,), BLOCK=8))(x)
    np.testing.assert_array_equal(out, 3 * np.asarray(x))


def test_bridge_loads_every_kernel_module_before_interpreting():
    """The other half of the fix: the package's own kernel modules are all imported when the bridge loads, so none is
    imported (and decorated) later, while a callback thread interprets. Checked in a fresh process."""
    import subprocess
    import sys
    code = ("import sys; from kernels.triton.bridge import load_jax_triton; load_jax_triton(); "
            "print(all(m in sys.modules for m in ('kernels.triton.gmm', 'kernels.triton.gmm_tma', "
            "'kernels.triton.sort', 'kernels.triton.swiglu')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1:] == ["True"], proc.stdout[-500:] + proc.stderr[-1500:]


@pytest.mark.parametrize("shift,offset", [(1, 64), (-1, -4), (40, 160)])
def test_out_of_bounds_store_raises(shift, offset):
    """The interpreter stores through raw pointers: a store past either end of a buffer (one element, or further)
    raises, naming the kernel, the argument and the first offending byte, instead of corrupting the heap."""
    from kernels.triton.bounds import OutOfBoundsAccess  # noqa: PLC0415
    from kernels.triton.bridge import run_interpreted  # noqa: PLC0415
    x = np.asarray(randn(keys(3, 1)[0], (16,)))
    match = f"_overrun stores .* out of bounds, the first at byte offset {offset} of pointer argument 1 .64 bytes"
    with pytest.raises(OutOfBoundsAccess, match=match):
        run_interpreted(_overrun, [x], scalar_args=[(1, "i32", 16)], out_shapes=[jax.ShapeDtypeStruct((16,), x.dtype)],
                        grid=(1,), zeroed_outputs=(0,), metaparams=dict(SHIFT=shift, INTO_INPUT=False, BLOCK=16))
    np.testing.assert_array_equal(np.asarray(overrun(jnp.asarray(x), 0)), x + 1)  # in bounds: fine
    with pytest.raises(Exception, match="out of bounds"):  # through triton_call (the callback's error)
        jax.block_until_ready(overrun(jnp.asarray(x), shift))


@triton.jit
def _over_read(x_ptr, n, o_ptr, BLOCK: tl.constexpr):
    """Loads BLOCK elements of an n-element x without a mask (n < BLOCK): a read past the end."""
    offs = tl.arange(0, BLOCK)
    tl.store(o_ptr + offs, tl.load(x_ptr + offs), mask=offs < n)


def test_out_of_bounds_load_raises():
    """An unmasked load past the end of an input: on a GPU it reads another buffer's bytes (or faults)."""
    x = randn(keys(5, 1)[0], (12,))
    call = lambda block: jt.triton_call(x, 12, kernel=_over_read, out_shape=jax.ShapeDtypeStruct((12,), x.dtype),
                                        grid=(1,), BLOCK=block)
    with pytest.raises(Exception, match="_over_read loads 4 element.* byte offset 48 of pointer argument 0"):
        jax.block_until_ready(call(16))


def test_store_into_an_input_raises():
    """Kernels must not write inputs they do not alias to an output (XLA's buffers are immutable)."""
    x = randn(keys(4, 1)[0], (16,))
    with pytest.raises(Exception, match="wrote into input pointer argument 0"):
        jax.block_until_ready(overrun(x, 0, into_input=True))


def test_canaries_catch_a_store_that_bypassed_the_checks():
    import torch  # noqa: PLC0415
    from kernels.triton import bounds  # noqa: PLC0415
    t = torch.arange(6, dtype=torch.float32)
    buffers = [bounds.guarded(t)]
    bounds.check_guards("k", buffers, [t], [0])  # untouched: passes
    buffers[0][1][bounds.GUARD_BYTES + 24] = 0  # the first byte past the 24-byte tensor
    with pytest.raises(bounds.OutOfBoundsAccess, match="k stored out of bounds after pointer argument 0"):
        bounds.check_guards("k", buffers, [t], [0])
