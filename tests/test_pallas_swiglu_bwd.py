"""The Pallas SwiGLU + down-projection backward kernel (``kernels.pallas.swiglu_bwd``) in TPU interpret mode against
its twin ``moe_ops.reference.swiglu_down_bwd``, every output compared everywhere (rows of non-local groups and rows
beyond ``sum(group_sizes)`` must be exactly zero), and its Mosaic lowering.

Kernel calls run with ``uninitialized_memory="nan"``: a row the kernel fails to write is NaN and fails ``rel_err``.
The quick cases share one compiled kernel (T*k = 26 rows against 8-row tiles: four row tiles, the last partial, tiles
shared by two groups; D = F = 200 against 128: two K blocks and two F blocks, both partial); the routing, group sizes
and group offset are runtime values. Slow sweeps: top_k in {1, 2, 8} x E in {8, 64} x the three activations, bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import fused as pf, swiglu_bwd as pb, tiling
from kernels.platform import interpret_mode
from moe_ops import reference as R
from tests.helpers import POISON, TOL, fused_layer_grad, assert_close, keys, randn

T, TOP_K, E, D, F = 13, 2, 8, 200, 200
T8 = tiling.Tiling(8, 128, 128)
NAMES = ("dgate", "dup", "hw", "dweights_sorted")


def expert_ids(routing, t, k, e, seed):
    """[t, k] expert ids; ids outside [0, e) are dropped copies (so ``sum(group_sizes) < M``)."""
    rng = np.random.default_rng(seed)
    if routing == "uneven_dropped":    # skewed, some experts empty, ~10% dropped
        p = rng.dirichlet(np.full(e, 0.5))
        ids = np.where(rng.random((t, k)) < 0.1, -1, rng.choice(e, size=(t, k), p=p))
    elif routing == "empty_groups":    # every other expert empty, nothing dropped
        ids = rng.choice(np.arange(0, e, 2), size=(t, k))
    elif routing == "one_expert":      # one expert takes every token copy
        ids = np.full((t, k), e // 2 + 1)
    else:                              # "all_dropped"
        ids = np.where(rng.random((t, k)) < 0.5, -3, e)
    return jnp.asarray(ids, jnp.int32)


def make_case(routing, t=T, k=TOP_K, e=E, d=D, f=F, g_local=None, dtype=jnp.float32, seed=0):
    """Fresh random operands (never zeros) and the reference routing (group sizes, sort_idx)."""
    g_local = e if g_local is None else g_local
    _, sizes, sort_idx = R.permute(jnp.zeros((t, 1)), expert_ids(routing, t, k, e, seed), e)
    k1, k2, k3, k4, k5, k6 = keys(seed + 1000 * k + e, 6)
    ops = dict(x=randn(k1, (t, d), dtype), dout=randn(k2, (t, d), dtype), w_gate=randn(k3, (g_local, d, f), dtype,
               d ** -0.5), w_up=randn(k4, (g_local, d, f), dtype, d ** -0.5), w_down=randn(k5, (g_local, f, d), dtype,
               max(f, 1) ** -0.5), w_sorted=jax.random.uniform(k6, (t * k,), jnp.float32, 0.1, 1.0))
    return ops, sizes, sort_idx


def run_and_check(ops, sizes, sort_idx, k, off=0, activation="silu", t=T8, interpret=POISON, tol=None):
    got = jax.block_until_ready(pb.swiglu_down_bwd(
        ops["x"], ops["dout"], ops["w_gate"], ops["w_up"], ops["w_down"], sizes, jnp.array([off], jnp.int32),
        sort_idx, ops["w_sorted"], k, activation=activation, tiling=t, interpret=interpret))
    ref = R.swiglu_down_bwd(ops["x"], ops["dout"], ops["w_gate"], ops["w_up"], ops["w_down"], sizes, sort_idx,
                            ops["w_sorted"], k, group_offset=off, activation=activation)
    dtype, m, f = ops["x"].dtype, sort_idx.shape[0], ops["w_gate"].shape[2]
    outside = np.asarray(R.local_row_ids(sizes, m, off, ops["w_gate"].shape[0])) < 0
    for name, g, e in zip(NAMES, got, ref):
        assert g.shape == e.shape and g.dtype == e.dtype, (name, g.shape, g.dtype, e.shape, e.dtype)
        assert_close(g, e, tol or TOL[jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32], f"{name} ({activation})")
        assert np.all(np.asarray(g.astype(jnp.float32))[outside] == 0), f"{name}: rows outside local groups"
    assert got[0].shape == (m, f) and got[0].dtype == dtype
    return got


# ---------------------------------------------------------------------------------------------------------------
# One compiled kernel per test function (shapes, tiling, activation fixed), routings and offsets as runtime values;
# the first case of each is the quick representative (interpret mode: a few seconds, mostly the compile).


@pytest.mark.parametrize("routing", ["uneven_dropped"] + [pytest.param(r, marks=pytest.mark.slow) for r in
                                                            ("empty_groups", "one_expert", "all_dropped")])
def test_parity_routings(routing):
    """Uneven / empty groups, sum(group_sizes) < M, one expert with every token, no local row at all."""
    ops, sizes, sort_idx = make_case(routing, seed=1)
    run_and_check(ops, sizes, sort_idx, TOP_K)
    if routing == "uneven_dropped":
        assert int(jnp.sum(sizes)) < T * TOP_K


@pytest.mark.parametrize("off", [3] + [pytest.param(o, marks=pytest.mark.slow) for o in (0, 6)])
def test_parity_group_offset(off):
    """A shard of experts (G_local = 3 of 8): the first, a middle and the last shard; other groups' rows are zero."""
    ops, sizes, sort_idx = make_case("uneven_dropped", g_local=3, seed=2)
    run_and_check(ops, sizes, sort_idx, TOP_K, off=off, activation="gelu")


def test_strict_interpreter(strict_interpreter):
    """No out-of-bounds reads, no races (the prefetch DMAs into the other buffer while a tile computes), every row
    written: a middle shard, relu, partial K and F blocks, shared tiles."""
    ops, sizes, sort_idx = make_case("uneven_dropped", g_local=4, seed=3)
    run_and_check(ops, sizes, sort_idx, TOP_K, off=2, activation="relu", interpret=strict_interpreter)


def test_empty_dims_give_zeros():
    ops, sizes, sort_idx = make_case("uneven_dropped", f=0, seed=4)
    outs = pb.swiglu_down_bwd(ops["x"], ops["dout"], ops["w_gate"], ops["w_up"], ops["w_down"], sizes,
                              jnp.array([0], jnp.int32), sort_idx, ops["w_sorted"], TOP_K, activation="silu")
    assert [o.shape for o in outs] == [(T * TOP_K, 0)] * 3 + [(T * TOP_K,)]
    assert not np.any(np.asarray(outs[3]))
    with pytest.raises(ValueError, match="activation"):
        pb.swiglu_down_bwd(*[ops[n] for n in ("x", "dout", "w_gate", "w_up", "w_down")], sizes,
                           jnp.array([0], jnp.int32), sort_idx, ops["w_sorted"], TOP_K, activation="tanh")


def test_lowers_to_mosaic():
    """jax.export for TPU from this CPU host: the kernel is one Mosaic custom call, no interpreter callback (f32 and
    bf16, heuristic tiling at a layer-like shape)."""
    sds = jax.ShapeDtypeStruct
    t, k, e, d, f = 256, 2, 8, 512, 768
    for dtype in (jnp.float32, jnp.bfloat16):
        args = (sds((t, d), dtype), sds((t, d), dtype), sds((e, d, f), dtype), sds((e, d, f), dtype),
                sds((e, f, d), dtype), sds((e,), jnp.int32), sds((1,), jnp.int32), sds((t * k,), jnp.int32),
                sds((t * k,), jnp.float32))
        fn = lambda *a: pb.swiglu_down_bwd(*a, k, activation="silu")
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert text.count("tpu_custom_call") == 1, text.count("tpu_custom_call")
        assert "callback" not in text


@pytest.mark.parametrize("chip", sorted(tiling.CHIPS))
def test_heuristic_fits_vmem(chip):
    """The backward's heuristic tilings of the benchmark layer shapes fit the chip's VMEM budget (two gathered
    sources, double-buffered, three rhs blocks, three accumulators)."""
    from benchmarks.shapes import LAYER_SHAPES  # noqa: PLC0415
    budget = tiling.CHIPS[chip].budget_bytes
    for s in LAYER_SHAPES.values():
        t = pf.fused_tiling(None, s.t * s.topk, s.d, s.f, s.e, jnp.bfloat16, jnp.bfloat16, gather=True, chip=chip,
                            footprint=pb.FOOTPRINT)
        assert pf.fused_vmem_bytes(t, s.d, jnp.bfloat16, jnp.bfloat16, gather=True, footprint=pb.FOOTPRINT) <= budget


# ---------------------------------------------------------------------------------------------------------------
# Slow sweeps.

# Every (E, top_k) pair once, the activations spread over them: an activation's derivative is elementwise, so it
# does not interact with the routing (each is also checked above at other shapes).
SWEEP = [(8, 1, "silu"), (8, 8, "gelu"), (64, 2, "relu"), (64, 8, "silu")]


@pytest.mark.slow
@pytest.mark.parametrize("num_experts,top_k,activation", SWEEP)
def test_sweep_top_k_experts_activations(num_experts, top_k, activation):
    ops, sizes, sort_idx = make_case("uneven_dropped", t=11, k=top_k, e=num_experts, seed=5)
    run_and_check(ops, sizes, sort_idx, top_k, activation=activation)


@pytest.mark.slow
@pytest.mark.parametrize("routing,off,g_local", [("uneven_dropped", 0, E), ("one_expert", 4, 2),
                                                 ("empty_groups", 2, 5)])
def test_bf16(routing, off, g_local):
    ops, sizes, sort_idx = make_case(routing, g_local=g_local, dtype=jnp.bfloat16, seed=6)
    run_and_check(ops, sizes, sort_idx, TOP_K, off=off, t=tiling.Tiling(16, 128, 128))


@pytest.mark.slow
def test_heuristic_tiling_and_symbolic_rows_composition():
    """The heuristic tiling (whole-dim blocks) through the platform dispatch (``interpret=None`` on CPU: interpret
    mode, here the poisoned one), and the composition a symbolic M runs (called directly here)."""
    ops, sizes, sort_idx = make_case("empty_groups", seed=7)
    with interpret_mode(POISON):
        run_and_check(ops, sizes, sort_idx, TOP_K, t=None, interpret=None)
    args = [ops[n] for n in ("x", "dout", "w_gate", "w_up", "w_down")]
    got = pb._composed(*args, sizes, jnp.array([1], jnp.int32), sort_idx, ops["w_sorted"], TOP_K,
                       activation="gelu", tiling=None, interpret=POISON)
    ref = R.swiglu_down_bwd(*args, sizes, sort_idx, ops["w_sorted"], TOP_K, group_offset=1, activation="gelu")
    for name, g, e in zip(NAMES, got, ref):
        assert_close(g, e, TOL[jnp.float32], f"composed {name}")
    g_local, f = ops["w_gate"].shape[0], ops["w_gate"].shape[2]
    bias = dict(b_gate=randn(keys(8, 1)[0], (g_local, f)), b_up=randn(keys(9, 1)[0], (g_local, f)))
    got = pb._composed(*args, sizes, jnp.array([1], jnp.int32), sort_idx, ops["w_sorted"], TOP_K, **bias,
                       activation="gelu", tiling=None, interpret=POISON)
    ref = R.swiglu_down_bwd(*args, sizes, sort_idx, ops["w_sorted"], TOP_K, group_offset=1, activation="gelu",
                            **bias)
    for name, g, e in zip(NAMES, got, ref):
        assert_close(g, e, TOL[jnp.float32], f"composed with biases {name}")


@pytest.mark.slow
def test_symbolic_rows_export_lowers_to_mosaic():
    """A symbolic token count exports for TPU through the composition (its kernels at the static bound)."""
    t, = jax.export.symbolic_shape("t", constraints=["t <= 256"])
    sds = jax.ShapeDtypeStruct
    k, e, d, f = 2, 8, 256, 256
    args = (sds((t, d), jnp.bfloat16), sds((t, d), jnp.bfloat16), sds((e, d, f), jnp.bfloat16),
            sds((e, d, f), jnp.bfloat16), sds((e, f, d), jnp.bfloat16), sds((e,), jnp.int32), sds((1,), jnp.int32),
            sds((t * k,), jnp.int32), sds((t * k,), jnp.float32))
    fn = lambda *a: pb.swiglu_down_bwd(*a, k, activation="silu")
    text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in text and "callback" not in text


# ---------------------------------------------------------------------------------------------------------------
# Saved mode (``swiglu_ffn``'s default): the forward kernel also writes gate / up, the backward kernel reads them.

def _saved_mode(ops, sizes, sort_idx, off, activation, interpret):
    from kernels.pallas import swiglu as ps  # noqa: PLC0415
    offset = jnp.array([off], jnp.int32)
    h, gate, up = ps.swiglu_gmm_saved(ops["x"], ops["w_gate"], ops["w_up"], sizes, offset, sort_idx, TOP_K,
                                      activation=activation, out_dtype=ops["x"].dtype, tiling=T8,
                                      interpret=interpret)
    kw = dict(group_offset=off, preferred_element_type=jnp.float32)
    rows = ops["x"][sort_idx // TOP_K]
    projections = [R.gmm(rows, w, sizes, **kw) for w in (ops["w_gate"], ops["w_up"])]
    for name, got, want in zip(("gate", "up"), (gate, up), projections):
        assert_close(got, want, TOL[jnp.float32], f"saved {name}")
    outs = pb.swiglu_down_bwd_saved(ops["dout"], ops["w_down"], gate, up, sizes, offset, sort_idx, ops["w_sorted"],
                                    TOP_K, activation=activation, tiling=T8, interpret=interpret)
    ref = R.swiglu_down_bwd(ops["x"], ops["dout"], ops["w_gate"], ops["w_up"], ops["w_down"], sizes, sort_idx,
                            ops["w_sorted"], TOP_K, group_offset=off, activation=activation)
    assert_close(h, R.activate(*projections, activation), TOL[jnp.float32], "forward h")
    outside = np.asarray(R.local_row_ids(sizes, sort_idx.shape[0], off, ops["w_gate"].shape[0])) < 0
    for name, g, e in zip(NAMES, jax.block_until_ready(outs), ref):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert_close(g, e, TOL[jnp.float32], f"saved {name}")
        assert np.all(np.asarray(g)[outside] == 0), f"saved {name}: rows outside local groups"


@pytest.mark.parametrize("routing,off,g_local", [("uneven_dropped", 3, 3),
                                                 pytest.param("one_expert", 0, E, marks=pytest.mark.slow)])
def test_saved_mode_parity(routing, off, g_local):
    """gate / up written by the forward kernel, then the one-accumulator backward kernel reading them: the same
    outputs as the recomputing kernel's twin (partial K / F blocks, shared tiles, a shard of experts)."""
    ops, sizes, sort_idx = make_case(routing, g_local=g_local, seed=5)
    _saved_mode(ops, sizes, sort_idx, off, "gelu", POISON)


def test_saved_mode_strict_interpreter(strict_interpreter):
    ops, sizes, sort_idx = make_case("uneven_dropped", g_local=4, seed=6)
    _saved_mode(ops, sizes, sort_idx, 2, "silu", strict_interpreter)


def test_saved_mode_lowers_to_mosaic():
    from kernels.pallas import swiglu as ps  # noqa: PLC0415
    sds = jax.ShapeDtypeStruct
    t, k, e, d, f = 256, 2, 8, 512, 768
    dtype = jnp.bfloat16
    sizes, offset, idx = sds((e,), jnp.int32), sds((1,), jnp.int32), sds((t * k,), jnp.int32)
    fwd = lambda x, wg, wu, s, o, i: ps.swiglu_gmm_saved(x, wg, wu, s, o, i, k, activation="silu", out_dtype=dtype)
    bwd = lambda *a: pb.swiglu_down_bwd_saved(*a, k, activation="silu")
    for fn, args in ((fwd, (sds((t, d), dtype), sds((e, d, f), dtype), sds((e, d, f), dtype), sizes, offset, idx)),
                     (bwd, (sds((t, d), dtype), sds((e, f, d), dtype), sds((t * k, f), dtype), sds((t * k, f), dtype),
                            sizes, offset, idx, sds((t * k,), jnp.float32)))):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        assert text.count("tpu_custom_call") == 1 and "callback" not in text


@pytest.mark.parametrize("recompute", [False, True])
def test_layer_grad_lowers_to_the_fused_kernels(recompute):
    """jax.export(platforms=["tpu"]) of jax.grad through the public fused layer: Mosaic only (no interpreter
    callback), with the saved-mode pair (forward gate/up kernel + ``_saved_kernel``) or the recomputing backward
    kernel (``_bwd_kernel``, and no forward gate/up kernel at all)."""
    import re  # noqa: PLC0415
    grad, args = fused_layer_grad("pallas", recompute)
    text = jax.export.export(jax.jit(grad), platforms=["tpu"])(*args).mlir_module()
    names = set(re.findall(r'kernel_name = "([^"]+)"', text))
    assert "callback" not in text
    if recompute:
        assert "_bwd_kernel" in names and "_swiglu_kernel" not in names, names
    else:
        assert {"_saved_kernel", "_swiglu_kernel"} <= names, names
