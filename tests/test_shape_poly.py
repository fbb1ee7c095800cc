"""Shape-polymorphic export (``jax.export`` with a symbolic row count M) of gmm, tgmm, permute, unpermute and moe_ffn
(plain, and in gpt-oss's form with its activation and three expert biases).

* XLA and Pallas (interpret mode): exported for ``platforms=["cpu"]`` with a symbolic M, then called at two
  concrete Ms and compared with the reference twins; Pallas also lowers for ``["tpu"]``. The Pallas row kernels
  (permute / unpermute) run at M's upper bound on padded operands (their HBM operands are full-array blocks).
* Triton: the kernels launch a static grid sized by M's upper bound (``jax.export.symbolic_shape("m",
  constraints=("m <= ...",))``; ``kernels.triton.schedule.static_upper_bound``), the extra row tiles are idle. The
  CPU interpreter bridge cannot be exported (``jax.pure_callback``), with symbolic or concrete shapes: it raises a
  clear error, tested here. The real CUDA lowering is exported when the jax-cuda12 plugin is installed (the
  ``test`` extra installs it on Linux x86-64; elsewhere skipped with that reason). The idle-tile path is checked numerically on CPU with a static, larger tile table.
"""

import contextlib
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax import export

import moe_ops
from kernels import lowering
from kernels.triton import gmm as triton_gmm, schedule, tuning
from moe_ops import reference as R
from tests.helpers import TOL, assert_close, keys, randn

K, N, G, E, TOP_K, D, F = 16, 12, 3, 4, 2, 16, 8
BOUND = 64
M_VALUES = (11, 40)
S = jax.ShapeDtypeStruct
f32, i32 = jnp.float32, jnp.int32


def _m(bounded=True):
    return export.symbolic_shape("m", constraints=(f"m <= {BOUND}",) if bounded else ())[0]


def _sizes(m):
    """[G] int32: uneven, an empty group, summing below m."""
    return jnp.array([m // 3, 0, m // 2], i32)


def _ids(t, seed):
    """[T, k] ids with dropped copies (-1 and E)."""
    return jax.random.randint(jax.random.key(seed), (t, TOP_K), -1, E + 1, i32)


# name -> (op(impl), reference, symbolic arg specs(m), concrete args(m))
CASES = {
    "gmm": (lambda impl: lambda l, r, s: moe_ops.gmm(l, r, s, implementation=impl), R.gmm,
            lambda m: [S((m, K), f32), S((G, K, N), f32), S((G,), i32)],
            lambda m: [randn(keys(m, 1)[0], (m, K)), randn(keys(1, 1)[0], (G, K, N)), _sizes(m)]),
    "tgmm": (lambda impl: lambda l, r, s: moe_ops.tgmm(l, r, s, implementation=impl), R.tgmm,
             lambda m: [S((m, K), f32), S((m, N), f32), S((G,), i32)],
             lambda m: [randn(keys(m, 1)[0], (m, K)), randn(keys(m + 1, 1)[0], (m, N)), _sizes(m)]),
    "permute": (lambda impl: lambda x, i: moe_ops.permute(x, i, E, implementation=impl)[0],
                lambda x, i: R.permute(x, i, E)[0],
                lambda m: [S((m, D), f32), S((m, TOP_K), i32)],
                lambda m: [randn(keys(m, 1)[0], (m, D)), _ids(m, m)]),
    "unpermute": (lambda impl: lambda y, i, w: moe_ops.unpermute(y, i, w, implementation=impl), R.unpermute,
                  lambda m: [S((TOP_K * m, D), f32), S((TOP_K * m,), i32), S((m, TOP_K), f32)],
                  lambda m: [randn(keys(m, 1)[0], (TOP_K * m, D)), R.sort_by_expert(_ids(m, m), E)[1],
                             randn(keys(m + 1, 1)[0], (m, TOP_K))]),
    "moe_ffn": (lambda impl: lambda x, lg, a, b, c: moe_ops.moe_ffn(x, lg, a, b, c, top_k=TOP_K, implementation=impl),
                lambda x, lg, a, b, c: R.moe_ffn(x, lg, a, b, c, top_k=TOP_K),
                lambda m: [S((m, D), f32), S((m, E), f32), S((E, D, F), f32), S((E, D, F), f32), S((E, F, D), f32)],
                lambda m: [randn(k, s) for k, s in zip(keys(m, 5), [(m, D), (m, E), (E, D, F), (E, D, F), (E, F, D)])]),
    # gpt-oss's form: the clamped activation and the three expert biases (b_gate / b_up inside the SwiGLU kernels)
    "moe_ffn_biases": (
        lambda impl: lambda x, lg, a, b, c, bg, bu, bd: moe_ops.moe_ffn(
            x, lg, a, b, c, top_k=TOP_K, activation=moe_ops.GPT_OSS, b_gate=bg, b_up=bu, b_down=bd,
            implementation=impl),
        lambda x, lg, a, b, c, bg, bu, bd: R.moe_ffn(x, lg, a, b, c, top_k=TOP_K, activation=moe_ops.GPT_OSS,
                                                     b_gate=bg, b_up=bu, b_down=bd),
        lambda m: [S((m, D), f32), S((m, E), f32), S((E, D, F), f32), S((E, D, F), f32), S((E, F, D), f32),
                   S((E, F), f32), S((E, F), f32), S((E, D), f32)],
        lambda m: [randn(k, s) for k, s in zip(keys(m, 8), [(m, D), (m, E), (E, D, F), (E, D, F), (E, F, D), (E, F),
                                                            (E, F), (E, D)])]),
}


def _export(name, impl, platforms, bounded=True):
    op, _, specs, _ = CASES[name]
    return export.export(jax.jit(op(impl)), platforms=platforms)(*specs(_m(bounded)))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_symbolic_m_runs_at_two_sizes(impl, name):
    exported = _export(name, impl, ["cpu"])
    _, ref, _, concrete = CASES[name]
    for m in M_VALUES:
        args = concrete(m)
        assert_close(exported.call(*args), ref(*args), TOL[f32], f"{impl} {name} exported, M={m}")


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_exports_for_tpu(name):
    """A symbolic M exports to Mosaic (the kernels run at M's static bound on zero-padded rows), not interpret mode."""
    exported = _export(name, "pallas", ["tpu"])
    assert "m" in str(exported.in_avals[0].shape)
    text = exported.mlir_module()
    assert "tpu_custom_call" in text and "callback" not in text


@pytest.mark.parametrize("name", ["gmm", "permute"])
def test_triton_bridge_refuses_symbolic_export_clearly(name):
    with pytest.raises(NotImplementedError, match=r"CPU interpreter bridge cannot export Triton kernel '\w+'"):
        _export(name, "triton", ["cpu"])


def test_triton_bridge_refuses_concrete_export_clearly():
    """Failed before: a concrete-shape export reached JAX's generic "serialization of host_callbacks is not yet
    implemented"; jit of the same function still runs the bridge."""
    k1, k2 = keys(31, 2)
    x, w, sizes = randn(k1, (16, 8)), randn(k2, (2, 8, 4)), jnp.array([9, 5], jnp.int32)
    f = jax.jit(lambda a, b, s: moe_ops.gmm(a, b, s, implementation="triton"))
    with pytest.raises(NotImplementedError, match="bridge cannot export Triton kernel 'moe_gmm': .*platforms=.'cuda'"):
        jax.export.export(f, platforms=["cpu"])(x, w, sizes)
    assert_close(f(x, w, sizes), R.gmm(x, w, sizes), TOL[jnp.float32], "bridge under jit")


def test_triton_unbounded_symbolic_m_names_the_fix():
    with pytest.raises(ValueError, match="symbolic and unbounded.*constraints"):
        _export("gmm", "triton", ["cpu"], bounded=False)


def test_triton_gmm_idle_tiles_past_the_bound():
    """A row-tile table sized by a bound larger than ``max_row_tiles`` (what a symbolic M launches): the extra tiles
    are IDLE and exit; every row is still written exactly once (the bridge poisons unwritten rows)."""
    m = 21
    lhs, rhs, sizes = CASES["gmm"][3](m)
    cfg = tuning.pick_config("gmm", m, K, N, G, f32)
    bound = schedule.max_row_tiles(BOUND, cfg.block_m, G)
    tiles = schedule.gmm_row_tiles(sizes, jnp.zeros((1,), i32), m, G, cfg.block_m, bound)
    assert tiles.shape == (3, bound) and int((tiles[0] == schedule.IDLE).sum()) > 0
    rows = triton_gmm.batching.GmmRows(num_rows=m)
    out = triton_gmm._gmm_call(lhs, rhs, tiles, jnp.zeros((1,), i32), jnp.zeros((1,), f32), rows=rows, n=N,
                               transpose_rhs=False, out_dtype=f32, cfg=cfg)
    assert_close(out, R.gmm(lhs, rhs, sizes), TOL[f32], "gmm with idle tiles")


needs_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
                                  reason="needs jax-cuda12-plugin/pjrt (real jax-triton CUDA lowering on a CPU host)")


@needs_plugin
@pytest.mark.parametrize("name", list(CASES))
def test_triton_cuda_export_symbolic_m(name, monkeypatch):
    """The real jax-triton CUDA lowering (no GPU needed to lower) of every op, and of moe_ffn's gradient."""
    from kernels.triton.bridge import load_jax_triton
    load_jax_triton()
    from jax_triton import triton_lib
    monkeypatch.setattr(triton_lib.triton_kernel_call_lib, "get_compute_capability", lambda *a, **k: 90)
    op, _, specs, _ = CASES[name]
    fn = op("triton")
    if name.startswith("moe_ffn"):
        argnums = (0, 2, 3, 4) + ((5, 6, 7) if name == "moe_ffn_biases" else ())
        fn = jax.grad(lambda *a: op("triton")(*a).sum(), argnums=argnums)
    checks = [export.DisabledSafetyCheck.custom_call("triton_kernel_call")]
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*specs(_m()))
    assert "triton_kernel_call" in exported.mlir_module()


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_pallas_symbolic_k_is_refused_by_name(platform):
    """Only the row count may be symbolic on Pallas: a symbolic K (JAX's own ragged_dot shape-poly harness exports
    one) raised an inconclusive-comparison error from inside the tiling; it now names K / N and the fix."""
    m, k = jax.export.symbolic_shape("m, k", constraints=("m <= 64", "k <= 64"))
    specs = (jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((3, k, 8), jnp.float32),
             jax.ShapeDtypeStruct((3,), jnp.int32))
    with pytest.raises(ValueError, match="K / N of the Pallas grouped matmul = k is symbolic.*static K and N"):
        export.export(jax.jit(lambda a, b, c: moe_ops.gmm(a, b, c, implementation="pallas")),
                      platforms=[platform])(*specs)


_W = 8  # a static row count below the width's bound
# name -> (op(impl), specs(d)) with a symbolic row width D (or K of the gathered x)
WIDTH_CASES = {
    "permute": (lambda impl: lambda x, i: moe_ops.permute(x, i, E, implementation=impl)[0],
                lambda d: [S((_W, d), f32), S((_W, TOP_K), i32)]),
    "unpermute": (lambda impl: lambda y, i, w: moe_ops.unpermute(y, i, w, implementation=impl),
                  lambda d: [S((TOP_K * _W, d), f32), S((TOP_K * _W,), i32), S((_W, TOP_K), f32)]),
    "gather_gmm": (lambda impl: lambda x, r, s, i: moe_ops.gather_gmm(x, r, s, i, implementation=impl),
                   lambda d: [S((_W, d), f32), S((E, d, 8), f32), S((E,), i32), S((TOP_K * _W,), i32)]),
    "swiglu_gmm": (lambda impl: lambda x, a, b, s, i: moe_ops.swiglu_gmm(x, a, b, s, i, implementation=impl),
                   lambda d: [S((_W, d), f32), S((E, d, 8), f32), S((E, d, 8), f32), S((E,), i32),
                              S((TOP_K * _W,), i32)]),
}


@pytest.mark.parametrize("name, impl, platform, err", [
    *[(name, "pallas", "tpu", ValueError) for name in WIDTH_CASES],
    *[pytest.param(name, "triton", "cuda", NotImplementedError, marks=needs_plugin)
      for name in ("permute", "unpermute")]])
def test_symbolic_row_width_is_refused_by_name(name, impl, platform, err):
    """Only the row count may be symbolic on the kernel backends. A symbolic D of the row kernels (permute /
    unpermute) raised a TypeError from ``triton.next_power_of_2`` (Triton), and a symbolic D / K of the Pallas row
    kernels and fused gathers Pallas's own "dynamically-shaped blocks" error; both now name the width and the fix
    (the Triton GMMs already refused a symbolic K / N by name). Triton is exported for CUDA: on CPU the bridge
    refuses any export first (``test_triton_bridge_refuses_concrete_export_clearly``)."""
    d, = export.symbolic_shape("d", constraints=("d <= 64",))
    op, specs = WIDTH_CASES[name]
    with lowering.pinned_targets() if platform == "cuda" else contextlib.nullcontext():
        with pytest.raises(err, match=r"(D|K / N).* = d is symbolic.*static"):
            export.export(jax.jit(op(impl)), platforms=[platform])(*specs(d))
