"""Pallas TPU GMM / TGMM (``kernels.pallas.gmm``) in TPU interpret mode against ``moe_ops.reference``, and their
Mosaic lowering via ``jax.export(..., platforms=["tpu"])``.

Kernel-level calls run under ``InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")``: outputs
start as NaN, so a block the kernel fails to write fails ``rel_err``, and an out-of-range block index raises. Shapes
are small and M=70 is not a multiple of the row tiles (16 / 32); K=256, N=256 against 128 tiles give two K steps
(accumulator) and two N tiles; one test uses K, N that are not multiples of 128 (masked / clipped edge blocks).
"""

import importlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import PartitionSpec as P

import moe_ops
from benchmarks.shapes import GMM_SHAPES
from kernels.pallas import tiling
from moe_ops import reference
from tests.helpers import POISON, GROUP_CASES, TOL, assert_close, group_sizes, group_sizes_strategy, keys, randn

pg = importlib.import_module("kernels.pallas.gmm")  # the module (``kernels.pallas.gmm`` may resolve to the function)

M, K, N, G = 70, 256, 256, 6
T16, T32 = tiling.Tiling(16, 128, 128), tiling.Tiling(32, 128, 128)
# (group_offset, G_local): every group local, then the first, a middle and the last shard.
SHARDS = {"all": (0, G), "first": (0, 2), "middle": (2, 2), "last": (4, 2)}


def _seed(*parts):
    return zlib.crc32(repr(parts).encode()) % 10_000


def _tol(dtype):
    return next(v for k, v in TOL.items() if jnp.dtype(k) == jnp.dtype(dtype))


def _off(o):
    return jnp.array([o], jnp.int32)


def _gmm(lhs, rhs, sizes, off, *, transpose=False, out_dtype=None, t=T16, existing=None, interpret=POISON):
    return pg.gmm(lhs, rhs, sizes, _off(off), transpose_rhs=transpose, out_dtype=out_dtype or lhs.dtype, tiling=t,
                  existing_out=existing, interpret=interpret)


def _tgmm(lhs, rhs, sizes, off, g_local, *, out_dtype=None, t=T16, existing=None, interpret=POISON):
    return pg.tgmm(lhs, rhs, sizes, _off(off), num_groups=g_local, out_dtype=out_dtype or lhs.dtype, tiling=t,
                   existing_out=existing, interpret=interpret)


def _check_gmm(lhs, rhs, sizes, off, transpose=False, what="", **kw):
    out = _gmm(lhs, rhs, sizes, off, transpose=transpose, **kw)
    ref = reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=transpose,
                        preferred_element_type=kw.get("out_dtype"))
    assert out.dtype == ref.dtype
    assert_close(out, ref, _tol(lhs.dtype), f"gmm {what}")


def _check_tgmm(lhs, rhs, sizes, off, g_local, what="", **kw):
    out = _tgmm(lhs, rhs, sizes, off, g_local, **kw)
    ref = reference.tgmm(lhs, rhs, sizes, group_offset=off, num_groups=g_local,
                         preferred_element_type=kw.get("out_dtype"))
    assert out.dtype == ref.dtype and out.shape == (g_local, lhs.shape[1], rhs.shape[1])
    assert_close(out, ref, _tol(lhs.dtype), f"tgmm {what}")


# --------------------------------------------------------------------------------------------------- schedules
_gmm_schedule = jax.jit(pg.gmm_schedule, static_argnums=(2, 3, 4, 5))
_tgmm_schedule = jax.jit(pg.tgmm_schedule, static_argnums=(2, 3, 4))


def _replay_gmm(sizes, off, g_local, m, tm, tiles_k):
    """Check invariants G1-G5 of ``gmm_schedule`` in numpy; return the (tile, group) pairs of COMPUTE steps."""
    sched, steps = _gmm_schedule(jnp.asarray(sizes, jnp.int32), _off(off), g_local, m, tm, tiles_k)
    s = {k: np.asarray(v) for k, v in sched._asdict().items()}
    steps, tiles_m = int(steps), -(-m // tm)
    assert steps <= tiles_m + g_local - 1                                            # G5
    mt = s["m_tiles"][:steps]
    assert (np.diff(mt) >= 0).all() and set(mt) == set(range(tiles_m))              # G1
    ends = np.cumsum(sizes)
    starts = ends - sizes
    pairs = []
    for i in range(steps):
        f, g = s["flags"][i], s["groups"][i]
        assert f & pg.STORE and bool(f & pg.FIRST) == (i == 0 or mt[i] != mt[i - 1])
        if f & pg.COMPUTE:                                                           # G3
            assert s["data_tiles"][i] == mt[i] and s["k_pins"][i] == -1
            pairs.append((mt[i], g))
        elif i > 0:                                                                  # G4: same blocks as a neighbour
            assert (s["data_tiles"][i], s["groups"][i]) in {(s["data_tiles"][j], s["groups"][j]) for j in (i - 1, i + 1)
                                                           if j < len(mt)}
    expected = [(t, g) for t in range(tiles_m) for g in range(g_local) if off + g < len(sizes)
                and max(starts[off + g], t * tm) < min(ends[off + g], (t + 1) * tm)]  # G2
    assert pairs == expected
    assert (s["flags"][steps:] == 0).all()                                           # G5: padding is NOOP
    return pairs


def _replay_tgmm(sizes, off, g_local, m, tm):
    """Check invariants T1-T3 of ``tgmm_schedule`` in numpy."""
    sched, steps = _tgmm_schedule(jnp.asarray(sizes, jnp.int32), _off(off), g_local, m, tm)
    s = {k: np.asarray(v) for k, v in sched._asdict().items()}
    steps = int(steps)
    assert steps <= -(-m // tm) + g_local - 1                                        # T3
    g, f = s["groups"][:steps], s["flags"][:steps]
    assert (np.diff(g) >= 0).all() and set(g) == set(range(g_local))                # T1
    assert ((f & pg.FIRST) != 0).sum() == g_local == ((f & pg.STORE) != 0).sum()
    assert (s["flags"][steps:] == 0).all() and (s["groups"][steps:] == g_local - 1).all()


@pytest.mark.slow
@given(sizes=group_sizes_strategy(8, 70))
def test_schedule_invariants(sizes):
    sizes = np.asarray(sizes)
    for off, g_local, tm in [(0, 8, 16), (0, 3, 8), (3, 2, 32), (6, 2, 16), (7, 1, 128)]:
        _replay_gmm(sizes, off, g_local, 70, tm, tiles_k=3)
        _replay_tgmm(sizes, off, g_local, 70, tm)


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", GROUP_CASES)
def test_parity_group_cases(case, dtype):
    k1, k2, k3 = keys(_seed(case), 3)
    lhs, rhs, rhs2 = randn(k1, (M, K), dtype), randn(k2, (G, K, N), dtype), randn(k3, (M, N), dtype)
    sizes = group_sizes(case, G, M, seed=3)
    _check_gmm(lhs, rhs, sizes, 0, what=case)
    _check_tgmm(lhs, rhs2, sizes, 0, G, what=case)


@pytest.mark.parametrize("shard", [pytest.param(s, marks=pytest.mark.slow) if s == "first" else s for s in SHARDS])
def test_group_offset_shards(shard):
    off, g_local = SHARDS[shard]
    k1, k2, k3 = keys(_seed(shard), 3)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (g_local, K, N)), randn(k3, (M, N))
    sizes = group_sizes("uneven", G, M, seed=5)
    _check_gmm(lhs, rhs, sizes, off, what=shard)
    _check_gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, off, transpose=True, t=T32, what=f"{shard} transposed")
    _check_tgmm(lhs, rhs2, sizes, off, g_local, t=T32, what=shard)


@pytest.mark.slow
def test_bf16_inputs_f32_output_and_transpose():
    k1, k2 = keys(11, 2)
    lhs, rhs = randn(k1, (M, K), jnp.bfloat16), randn(k2, (3, N, K), jnp.bfloat16)
    sizes = group_sizes("sum_below_m", G, M, seed=6)
    _check_gmm(lhs, rhs, sizes, 1, transpose=True, out_dtype=jnp.float32, what="bf16->f32 transposed")
    _check_tgmm(lhs, randn(k2, (M, N), jnp.bfloat16), sizes, 1, 3, out_dtype=jnp.float32, what="bf16->f32")


@pytest.mark.slow
def test_partial_k_and_n_blocks():
    """K=200, N=136 against 128-wide tiles: the K remainder is masked in gmm, edge columns are clipped on store."""
    m, k, n = 45, 200, 136
    k1, k2, k3 = keys(12, 3)
    lhs, rhs, rhs2 = randn(k1, (m, k)), randn(k2, (3, k, n)), randn(k3, (m, n))
    sizes = group_sizes("uneven", 4, m, seed=7)
    _check_gmm(lhs, rhs, sizes, 1, what="partial k/n")
    _check_gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, 1, transpose=True, what="partial k/n transposed")
    _check_tgmm(lhs, rhs2, sizes, 1, 3, what="partial k/n")


@pytest.mark.slow
@given(sizes=group_sizes_strategy(G, M), shard=st.sampled_from(list(SHARDS.values())))
def test_hypothesis_sweep(sizes, shard):
    off, g_local = shard
    k1, k2, k3 = keys(int(np.asarray(sizes).sum()), 3)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (g_local, K, N)), randn(k3, (M, N))
    _check_gmm(lhs, rhs, sizes, off, what=f"{np.asarray(sizes)} {shard}")
    _check_tgmm(lhs, rhs2, sizes, off, g_local, what=f"{np.asarray(sizes)} {shard}")


# ----------------------------------------------------------------------------------------------- existing_out
@pytest.mark.slow
def test_existing_out_accumulates_over_expert_shards():
    """Looping over 3 shards of 2 experts with ``existing_out`` gives the unsharded result; a random start value is
    added to the local rows / groups and kept elsewhere."""
    k1, k2, k3, k4 = keys(13, 4)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (G, K, N)), randn(k3, (M, N))
    sizes = group_sizes("sum_below_m", G, M, seed=8)
    out = jnp.zeros((M, N), jnp.float32)
    for off in range(0, G, 2):
        out = _gmm(lhs, rhs[off:off + 2], sizes, off, existing=out, t=T32)
    assert_close(out, reference.gmm(lhs, rhs, sizes), TOL[jnp.float32], "gmm shard loop")

    start = randn(k4, (M, N))
    out = _gmm(lhs, rhs[2:4], sizes, 2, existing=start)
    assert_close(out, start + reference.gmm(lhs, rhs[2:4], sizes, group_offset=2), TOL[jnp.float32], "gmm += ")
    start3 = randn(k4, (2, K, N))
    out = _tgmm(lhs, rhs2, sizes, 4, 2, existing=start3)
    ref = start3 + reference.tgmm(lhs, rhs2, sizes, group_offset=4, num_groups=2)
    assert_close(out, ref, TOL[jnp.float32], "tgmm += ")


# -------------------------------------------------------------------------------------------------- gradients
def _grads(f, args, cot):
    out, vjp = jax.vjp(f, *args)
    return vjp(cot)


@pytest.mark.parametrize("transpose", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("shard", ["all", pytest.param("middle", marks=pytest.mark.slow),
                                   pytest.param("last", marks=pytest.mark.slow)])
def test_gmm_gradients(shard, transpose):
    """d lhs (gmm with the other rhs layout) and d rhs (tgmm) through ``moe_ops.gmm(implementation="pallas")``."""
    off, g_local = SHARDS[shard]
    k1, k2, k3 = keys(_seed(shard, transpose), 3)
    rhs_shape = (g_local, N, K) if transpose else (g_local, K, N)
    lhs, rhs, cot = randn(k1, (M, K)), randn(k2, rhs_shape), randn(k3, (M, N))
    sizes = group_sizes("empty_groups", G, M, seed=9)
    kw = dict(group_offset=off, transpose_rhs=transpose)
    got = _grads(lambda a, b: moe_ops.gmm(a, b, sizes, implementation="pallas", **kw), (lhs, rhs), cot)
    want = _grads(lambda a, b: reference.gmm(a, b, sizes, **kw), (lhs, rhs), cot)
    for name, g, w in zip(("dlhs", "drhs"), got, want):
        assert_close(g, w, 1e-5, f"gmm {name} {shard}")


@pytest.mark.parametrize("shard", ["all", "first"])
def test_tgmm_gradients(shard):
    off, g_local = SHARDS[shard]
    k1, k2, k3 = keys(_seed("tgmm-grad", shard), 3)
    lhs, rhs, cot = randn(k1, (M, K)), randn(k2, (M, N)), randn(k3, (g_local, K, N))
    sizes = group_sizes("uneven", G, M, seed=10)
    kw = dict(group_offset=off, num_groups=g_local)
    got = _grads(lambda a, b: moe_ops.tgmm(a, b, sizes, implementation="pallas", **kw), (lhs, rhs), cot)
    want = _grads(lambda a, b: reference.tgmm(a, b, sizes, **kw), (lhs, rhs), cot)
    for name, g, w in zip(("dlhs", "drhs"), got, want):
        assert_close(g, w, 1e-5, f"tgmm {name} {shard}")


# ---------------------------------------------------------------------------------------------------- sharding
@pytest.mark.slow
def test_shard_map_expert_shards_match_unsharded():
    """8 devices, 2 experts each (``group_offset = axis_index * 2``): psum of the gmm shards and the concatenated
    tgmm shards equal the unsharded results."""
    ndev, g_local = 8, 2
    g = ndev * g_local
    mesh = jax.make_mesh((ndev,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    k1, k2, k3 = keys(14, 3)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (g, K, 128)), randn(k3, (M, 128))
    sizes = group_sizes("empty_groups", g, M, seed=11)

    def local(lhs, w, rhs2, sizes):
        off = jax.lax.axis_index("x") * g_local
        y = moe_ops.gmm(lhs, w, sizes, group_offset=off, implementation="pallas")
        dw = moe_ops.tgmm(lhs, rhs2, sizes, group_offset=off, num_groups=g_local, implementation="pallas")
        return jax.lax.psum(y, "x"), dw

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x"), P(), P()), out_specs=(P(), P("x")),
                              check_vma=False))
    y, dw = f(lhs, rhs, rhs2, sizes)
    assert_close(y, reference.gmm(lhs, rhs, sizes), TOL[jnp.float32], "sharded gmm")
    assert_close(dw, reference.tgmm(lhs, rhs2, sizes), TOL[jnp.float32], "sharded tgmm")


@pytest.mark.slow
def test_strict_interpreter_no_oob_no_races(strict_interpreter):
    """Out-of-bounds block reads raise, races are detected, uninitialised memory is NaN: gmm (both rhs layouts,
    with existing_out) and tgmm (with existing_out) on a middle shard with a partial last row tile."""
    k1, k2, k3, k4 = keys(15, 4)
    lhs, rhs, rhs2 = randn(k1, (M, K)), randn(k2, (2, K, N)), randn(k3, (M, N))
    sizes = group_sizes("empty_groups", G, M, seed=12)
    run = dict(interpret=strict_interpreter)
    _check_gmm(lhs, rhs, sizes, 2, what="strict", **run)
    _check_gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, 4, transpose=True, t=T32, what="strict transposed", **run)
    _check_tgmm(lhs, rhs2, sizes, 2, 2, what="strict", **run)
    start, start3 = randn(k4, (M, N)), randn(k4, (2, K, N))
    out = _gmm(lhs, rhs, sizes, 2, existing=start, **run)
    assert_close(out, start + reference.gmm(lhs, rhs, sizes, group_offset=2), 1e-5, "strict gmm existing_out")
    out = _tgmm(lhs, rhs2, sizes, 2, 2, existing=start3, **run)
    ref = start3 + reference.tgmm(lhs, rhs2, sizes, group_offset=2, num_groups=2)
    assert_close(out, ref, 1e-5, "strict tgmm existing_out")


# -------------------------------------------------------------------------------------------- tiling + lowering
def _shipped_tilings():
    """(m, k, n, g, tiling) of every tiling this backend ships: the test tilings and the heuristic's choices for the
    benchmark shapes on every chip."""
    cases = {(M, K, N, G, T16), (M, K, N, G, T32)}
    for s in GMM_SHAPES.values():
        for chip in tiling.CHIPS:
            for kernel in ("gmm", "tgmm"):
                cases.add((s.m, s.k, s.n, s.e, tiling.choose(kernel, s.m, s.k, s.n, s.e, jnp.bfloat16,
                                                               jnp.bfloat16, chip=chip)))
    return sorted(cases, key=repr)


@pytest.mark.parametrize("existing", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["new", "existing"])
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", ["gmm", "gmm_t", "tgmm"])
def test_lowers_to_mosaic(kernel, dtype, existing):
    """``jax.export(..., platforms=["tpu"])`` lowers every shipped configuration to a Mosaic custom call."""
    sds = jax.ShapeDtypeStruct
    for m, k, n, g, t in _shipped_tilings():
        ints = (sds((g,), jnp.int32), sds((1,), jnp.int32))
        if kernel == "tgmm":
            args = (sds((m, k), dtype), sds((m, n), dtype)) + ints + ((sds((g, k, n), dtype),) if existing else ())
            f = lambda a, b, s, o, e=None: pg.tgmm(a, b, s, o, num_groups=g, out_dtype=dtype, tiling=t,
                                                   existing_out=e, interpret=False)
        else:
            rhs = (g, n, k) if kernel == "gmm_t" else (g, k, n)
            args = (sds((m, k), dtype), sds(rhs, dtype)) + ints + ((sds((m, n), dtype),) if existing else ())
            f = lambda a, b, s, o, e=None: pg.gmm(a, b, s, o, transpose_rhs=kernel == "gmm_t", out_dtype=dtype,
                                                  tiling=t, existing_out=e, interpret=False)
        text = jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
        assert "tpu_custom_call" in text, (kernel, m, k, n, t)


@pytest.mark.parametrize("chip", sorted(tiling.CHIPS))
def test_heuristic_fits_vmem_and_is_legal(chip):
    budget = tiling.CHIPS[chip].budget_bytes
    for s in GMM_SHAPES.values():
        for kernel in ("gmm", "tgmm"):
            for in_dt, out_dt in [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32),
                                  (jnp.bfloat16, jnp.float32)]:
                for existing in (False, True):
                    t = tiling.choose(kernel, s.m, s.k, s.n, s.e, in_dt, out_dt, existing_out=existing, chip=chip)
                    assert tiling.vmem_bytes(kernel, t, in_dt, out_dt, existing) <= budget, (s.name, kernel, t)
                    tiling.check(t, s.m, s.k, s.n, in_dt, out_dt)
                    assert t.tm >= min(128, s.m) and t.tm % tiling.sublane(in_dt, out_dt) == 0
    # tiny shapes take whole dims
    assert tiling.choose("gmm", 64, 32, 48, 4, jnp.float32, jnp.float32, chip=chip) == tiling.Tiling(64, 32, 48)


def test_illegal_tilings_raise():
    lhs, rhs = jnp.ones((M, K)), jnp.ones((2, K, N))
    for bad in [(12, 128, 128), (16, 100, 128), (16, 128, 96), (0, 128, 128)]:
        with pytest.raises(ValueError):
            _gmm(lhs, rhs, jnp.full((G,), 5, jnp.int32), 0, t=tiling.Tiling(*bad))
