"""Token permutation (permute / unpermute) on every backend against ``moe_ops.reference``.

Triton kernels run through the interpreter bridge (outputs poisoned, so unwritten rows show as NaN / INT_MIN), Pallas
kernels in interpret mode (unwritten VMEM is NaN). Permute outputs, group sizes and sort indices must match the
reference exactly; the f32 combines within round-off. Shapes are small: the interpreters are slow.
"""

from __future__ import annotations

import functools
import importlib
import types

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import moe_ops
from kernels import lowering
from moe_ops import reference
from tests.helpers import TOL, assert_close, keys, randn

IMPLS = ("xla", "triton", "pallas")
DTYPES = (jnp.float32, jnp.bfloat16)


def backend_module(impl):
    """The backend's four kernel functions; Pallas with small tiles so that tests span several grid steps."""
    module = importlib.import_module({"xla": "moe_ops.xla", "triton": "kernels.triton.sort",
                                      "pallas": "kernels.pallas.sort"}[impl])
    if impl != "pallas":
        return module
    small = module.PallasSortConfig(block_n=128, block_rows=16)
    names = ("sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad")
    return types.SimpleNamespace(**{n: functools.partial(getattr(module, n), config=small) for n in names})


def expert_ids(case, t, k, e, seed=0):
    """[T,k] int32 routing of a named kind (numpy RNG; duplicates within a token are allowed)."""
    rng = np.random.default_rng(seed)
    if case == "uniform":
        ids = rng.integers(0, e, (t, k))
    elif case == "one_expert":                      # every copy on one expert, all others empty
        ids = np.full((t, k), e // 2)
    elif case == "empty_experts":                   # only every third expert gets tokens
        ids = rng.choice(np.arange(0, e, 3), (t, k))
    elif case == "out_of_range":                    # some ids dropped (negative or >= E)
        ids = rng.integers(-2, e + 2, (t, k))
    else:
        raise ValueError(case)
    return jnp.asarray(ids, jnp.int32)


CASES = ("uniform", "one_expert", "empty_experts", "out_of_range")


def assert_equal(actual, expected, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.shape}/{actual.dtype} != {expected.shape}/{expected.dtype}")
    a, e = np.asarray(actual), np.asarray(expected)
    assert np.array_equal(a, e), f"{what}: {np.sum(a != e)} of {a.size} entries differ"


def prefix(rows, n_valid):
    """Rows >= n_valid replaced by zeros: the valid-prefix convention, in plain jnp."""
    return jnp.where((jnp.arange(rows.shape[0]) < n_valid)[:, None], rows, 0)


# ---------------------------------------------------------------------------------------------------------------
# Permute: exact.


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, dtype", [(c, jnp.float32) for c in CASES] + [("out_of_range", jnp.bfloat16)],
                         ids=[f"{c}-f32" for c in CASES] + ["out_of_range-bf16"])
def test_permute_exact(impl, dtype, case):
    t, k, e, d = 37, 3, 9, 40
    x = randn(keys(1, 1)[0], (t, d), dtype)
    ids = expert_ids(case, t, k, e, seed=2)
    got = jax.jit(lambda x, ids: moe_ops.permute(x, ids, e, implementation=impl))(x, ids)
    want = reference.permute(x, ids, e)
    for name, a, b in zip(("x_sorted", "group_sizes", "sort_idx"), got, want):
        assert_equal(a, b, f"{impl}/{case}/{name}")


@pytest.mark.parametrize("e", [1, 7, 256])
@pytest.mark.parametrize("case", ["uniform", "one_expert", "out_of_range"])
def test_sort_by_expert_multi_block(e, case):
    """Several sort blocks (N = 600 > 2 x 256) with a partial last one; E + 1 a power of two (7) and not."""
    t, k = 150, 4
    ids = expert_ids(case, t, k, e, seed=e)
    _, want_sizes, want_idx = reference.permute(jnp.zeros((t, 1)), ids, e)
    for impl in ("triton", "pallas"):
        sizes, idx = backend_module(impl).sort_by_expert(ids, e)
        assert_equal(sizes, want_sizes, f"{impl} group_sizes")
        assert_equal(idx, want_idx, f"{impl} sort_idx")


@pytest.mark.parametrize("impl", ["triton", "pallas"])
@pytest.mark.parametrize("e", [2047, 2048, 4095, 4096, 40000, 2**20])
def test_sort_by_expert_many_experts(impl, e):
    """Either side of each backend's counting-sort limit (E + 1 > MAX_HISTOGRAM_KEYS: XLA's stable sort). Failed
    before past it: Triton's histogram asked for 8 bytes of shared memory a key (over an H100's at E = 32768,
    gfx942's at 16384) and, from 2**20, a tensor past Triton's numel limit (an error inside the kernel)."""
    ids = jnp.concatenate([expert_ids("out_of_range", 40, 3, e, seed=e), jnp.full((3, 3), e - 1, jnp.int32)])
    _, want_sizes, want_idx = reference.permute(jnp.zeros((43, 1)), ids, e)
    sizes, idx = moe_ops.sort_by_expert(ids, e, implementation=impl)
    assert_equal(sizes, want_sizes, f"{impl} group_sizes")
    assert_equal(idx, want_idx, f"{impl} sort_idx")


@pytest.mark.skipif(lowering.unavailable_reason() is not None, reason=str(lowering.unavailable_reason()))
def test_large_expert_counts_launch_within_shared_memory():
    """The real CUDA lowering (no GPU needed): at E = 4095 the histogram kernel fits an H100's shared memory; at
    E = 32768 (262,144 B of histogram before) no histogram kernel is launched."""
    def launches(e):
        with lowering.pinned_targets():
            text = jax.jit(lambda i: moe_ops.sort_by_expert(i, e, implementation="triton")).trace(
                jax.ShapeDtypeStruct((512, 8), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
        return lowering.kernel_calls(text)
    small = launches(4095)
    assert [c.kernel for c in small] == ["_histogram_kernel", "_scatter_kernel"]
    assert not [p for c in small for p in c.problems("sm90")]
    assert launches(32768) == []


def test_sort_by_expert_vmap_fold_past_the_histogram_limit():
    """Under vmap the Triton sort folds the batch into B*(E+1) keys: 3 * 2049 passes its limit."""
    ids = jnp.stack([expert_ids("out_of_range", 20, 2, 2048, seed=s) for s in range(3)])
    sizes, idx = jax.vmap(lambda i: moe_ops.sort_by_expert(i, 2048, implementation="triton"))(ids)
    for b in range(3):
        _, want_sizes, want_idx = reference.permute(jnp.zeros((20, 1)), ids[b], 2048)
        assert_equal(sizes[b], want_sizes, f"batch {b} group_sizes")
        assert_equal(idx[b], want_idx, f"batch {b} sort_idx")


@pytest.mark.slow
@hypothesis.given(t=st.integers(1, 48), k=st.integers(1, 8), e=st.integers(1, 256),
                  case=st.sampled_from(CASES), seed=st.integers(0, 2**16))
def test_sort_by_expert_sweep(t, k, e, case, seed):
    """Counting sort of every backend == the reference's stable argsort (E up to 256, k up to 8)."""
    ids = expert_ids(case, t, k, e, seed)
    _, want_sizes, want_idx = reference.permute(jnp.zeros((t, 1)), ids, e)
    for impl in ("triton", "pallas"):
        sizes, idx = backend_module(impl).sort_by_expert(ids, e)
        assert_equal(sizes, want_sizes, f"{impl} group_sizes")
        assert_equal(idx, want_idx, f"{impl} sort_idx")


@pytest.mark.slow
@hypothesis.given(t=st.integers(1, 20), k=st.integers(1, 8), d=st.sampled_from([1, 8, 33]),
                  seed=st.integers(0, 2**16))
@hypothesis.settings(max_examples=4)
def test_gather_combine_sweep(t, k, d, seed):
    """Row gather (exact) and combine (f32 round-off) over odd T, k, D, on the kernel backends."""
    ids = expert_ids("out_of_range", t, k, 5, seed)
    x, y, w = (randn(kk, s) for kk, s in zip(keys(seed, 3), [(t, d), (t * k, d), (t, k)]))
    want_x, _, sort_idx = reference.permute(x, ids, 5)
    want_y = reference.unpermute(y, sort_idx, w)
    for impl in ("triton", "pallas"):
        ops = backend_module(impl)
        assert_equal(ops.gather_rows(x, sort_idx, k), want_x, f"{impl} gather")
        assert_close(ops.combine_rows(y, sort_idx, w), want_y, 1e-6, f"{impl} combine")


# ---------------------------------------------------------------------------------------------------------------
# Unpermute and gradients.


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_unpermute_parity(impl, dtype):
    t, k, e, d = 29, 4, 7, 72
    ky, kw = keys(3, 2)
    _, _, sort_idx = reference.permute(jnp.zeros((t, 1)), expert_ids("out_of_range", t, k, e, 4), e)
    y, w = randn(ky, (t * k, d), dtype), jax.random.uniform(kw, (t, k), jnp.float32)
    got = jax.jit(lambda y, s, w: moe_ops.unpermute(y, s, w, implementation=impl))(y, sort_idx, w)
    want = reference.unpermute(y, sort_idx, w)
    assert got.dtype == dtype
    assert_close(got, want, 1e-6 if dtype == jnp.float32 else TOL[dtype], f"{impl} unpermute")


def _round_trip_loss(ops_permute, ops_unpermute, e, ct_sorted, ct_out):
    """Scalar loss touching every differentiable input: x through permute, y and w through unpermute."""
    def loss(x, y, w, ids):
        x_sorted, _, sort_idx = ops_permute(x, ids, e)
        out = ops_unpermute(y + x_sorted, sort_idx, w)
        return jnp.sum(x_sorted.astype(jnp.float32) * ct_sorted) + jnp.sum(out.astype(jnp.float32) * ct_out)
    return loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["uniform", "out_of_range"])
def test_gradients(impl, case):
    t, k, e, d = 23, 3, 6, 48
    kx, ky, kw, k1, k2 = keys(5, 5)
    x, y = randn(kx, (t, d)), randn(ky, (t * k, d))
    w = jax.random.uniform(kw, (t, k), jnp.float32)
    ids = expert_ids(case, t, k, e, 6)
    ct_sorted, ct_out = randn(k1, (t * k, d)), randn(k2, (t, d))
    ours = _round_trip_loss(lambda *a: moe_ops.permute(*a, implementation=impl),
                            lambda *a: moe_ops.unpermute(*a, implementation=impl), e, ct_sorted, ct_out)
    ref = _round_trip_loss(reference.permute, reference.unpermute, e, ct_sorted, ct_out)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, y, w, ids)
    want = jax.grad(ref, argnums=(0, 1, 2))(x, y, w, ids)
    for name, a, b in zip(("dx", "dy", "dw"), got, want):
        assert_close(a, b, 1e-5, f"{impl}/{case} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_second_order(impl):
    """grad of grad of the permute / unpermute round trip in every float input: the combine's VJP is made of its two
    adjoint ops (weighted gather, weight gradient), and theirs of each other, all custom VJPs over the kernels."""
    t, k, e, d = 9, 2, 4, 16
    kx, ky, kw, k1, k2 = keys(6, 5)
    x, y = randn(kx, (t, d)), randn(ky, (t * k, d))
    w = jax.random.uniform(kw, (t, k), jnp.float32)
    ids = expert_ids("out_of_range", t, k, e, 3)
    ct_sorted, ct_out = randn(k1, (t * k, d)), randn(k2, (t, d))

    def second(fn):
        inner = jax.grad(lambda *a: fn(*a) ** 2, argnums=(0, 1, 2))
        return jax.grad(lambda *a: sum(jnp.sum(jnp.sin(g)) for g in inner(*a, ids)), argnums=(0, 1, 2))(x, y, w)
    ours = _round_trip_loss(lambda *a: moe_ops.permute(*a, implementation=impl),
                            lambda *a: moe_ops.unpermute(*a, implementation=impl), e, ct_sorted, ct_out)
    ref = _round_trip_loss(reference.permute, reference.unpermute, e, ct_sorted, ct_out)
    for name, a, b in zip(("x", "y", "w"), second(ours), second(ref)):
        assert_close(a, b, 1e-4, f"{impl} second order d{name}")  # f32 sums of squares: 1e-5 is too tight


@pytest.mark.parametrize("impl", ["triton", pytest.param("pallas", marks=pytest.mark.slow)])
def test_deterministic(impl):
    """Bitwise-identical results on reruns (no atomics, fixed reduction order)."""
    t, k, e, d = 31, 4, 8, 64
    ids = expert_ids("uniform", t, k, e, 7)
    kx, ky, kw = keys(8, 3)
    x, y, w = randn(kx, (t, d)), randn(ky, (t * k, d)), jax.random.uniform(kw, (t, k))
    ops = backend_module(impl)

    def run():
        sizes, sort_idx = ops.sort_by_expert(ids, e)
        return (sizes, sort_idx, ops.gather_rows(x, sort_idx, k, row_weights=w), ops.combine_rows(y, sort_idx, w),
                ops.combine_weight_grad(x, y, sort_idx, k))

    for a, b in zip(run(), run()):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------------------------
# Valid-prefix form (expert parallelism): only rows < n_valid exist.


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_valid", [0, 17, 60])
def test_valid_prefix_kernels(impl, n_valid):
    """gather_rows zeroes rows >= n_valid; the combines never read y rows >= n_valid (NaN there must not leak)."""
    t, k, e, d = 20, 3, 5, 24
    kx, ky, kw, kg = keys(9, 4)
    x, w, dout = randn(kx, (t, d)), jax.random.uniform(kw, (t, k)), randn(kg, (t, d))
    _, _, sort_idx = reference.permute(x, expert_ids("uniform", t, k, e, 10), e)
    y = randn(ky, (t * k, d))
    y_poisoned = jnp.where((jnp.arange(t * k) < n_valid)[:, None], y, jnp.nan)
    nv = jnp.int32(n_valid)
    ops = backend_module(impl)
    inv = jnp.zeros_like(sort_idx).at[sort_idx].set(jnp.arange(t * k, dtype=jnp.int32))
    live = (inv < n_valid).reshape(t, k)

    want_gather = prefix(x[sort_idx // k] * w.reshape(-1)[sort_idx][:, None], n_valid)
    assert_equal(ops.gather_rows(x, sort_idx, k, row_weights=w, n_valid=nv), want_gather, f"{impl} gather")
    want_combine = reference.unpermute(prefix(y, n_valid), sort_idx, w)
    assert_close(ops.combine_rows(y_poisoned, sort_idx, w, n_valid=nv), want_combine, 1e-6, f"{impl} combine")
    want_dw = jnp.where(live, jnp.einsum("td,tkd->tk", dout, y[inv].reshape(t, k, d)), 0)
    assert_close(ops.combine_weight_grad(dout, y_poisoned, sort_idx, k, n_valid=nv), want_dw, 1e-6, f"{impl} dw")


@pytest.mark.parametrize("impl", IMPLS)
def test_valid_prefix_public_ops(impl):
    """EP-style buffer: unreceived rows carry id -1 (sorted last); n_valid = routed copies. Forward + grads."""
    t, k, e, d, received = 24, 2, 4, 16, 15
    ids = jnp.where(jnp.arange(t)[:, None] < received, expert_ids("uniform", t, k, e, 11), -1)
    n_valid = jnp.int32(received * k)
    kx, ky, kw, kc = keys(12, 4)
    x, y, w, ct = randn(kx, (t, d)), randn(ky, (t * k, d)), jax.random.uniform(kw, (t, k)), randn(kc, (t, d))

    def ours(x, y, w):
        xs, sizes, sort_idx = moe_ops.permute(x, ids, e, n_valid=n_valid, implementation=impl)
        return jnp.sum(moe_ops.unpermute(xs + y, sort_idx, w, n_valid=n_valid, implementation=impl) * ct), xs

    def ref(x, y, w):
        xs, _, sort_idx = reference.permute(x, ids, e)
        xs = prefix(xs, n_valid)
        return jnp.sum(reference.unpermute(prefix(xs + y, n_valid), sort_idx, w) * ct), xs

    (loss, xs), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(x, y, w)
    (want_loss, want_xs), want_grads = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(x, y, w)
    assert_equal(xs, want_xs, f"{impl} x_sorted")
    assert not np.any(np.asarray(xs[received * k:])), "tail of the buffer must be zero"
    assert_close(loss, want_loss, 1e-6, f"{impl} loss")
    for name, a, b in zip(("dx", "dy", "dw"), grads, want_grads):
        assert_close(a, b, 1e-5, f"{impl} {name}")
    assert not np.any(np.asarray(grads[1][received * k:])), "rows past n_valid get zero gradient"


# ---------------------------------------------------------------------------------------------------------------
# Pallas: strict interpreter and TPU lowering.


@pytest.mark.slow
def test_pallas_strict_interpret():
    """Out-of-bounds reads raise, races are detected, uninitialised VMEM is NaN (single device)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    from jax.experimental.pallas import tpu as pltpu
    from kernels.pallas import sort as ps

    params = pltpu.InterpretParams(out_of_bounds_reads="raise", detect_races=True, uninitialized_memory="nan")
    cfg = ps.PallasSortConfig(block_n=128, block_rows=8)   # several grid steps, a partial last block
    t, k, e, d, n_valid = 19, 3, 6, 128, 40
    kx, ky, kw = keys(13, 3)
    x, y, w = randn(kx, (t, d)), randn(ky, (t * k, d)), jax.random.uniform(kw, (t, k))
    ids = expert_ids("out_of_range", t, k, e, 14)
    _, want_sizes, sort_idx = reference.permute(x, ids, e)
    try:
        sizes, idx = ps.sort_by_expert(ids, e, config=cfg, interpret=params)
        assert_equal(sizes, want_sizes, "group_sizes")
        assert_equal(idx, sort_idx, "sort_idx")
        for nv in (None, n_valid):
            n = t * k if nv is None else nv
            got = ps.gather_rows(x, sort_idx, k, row_weights=w, n_valid=nv, config=cfg, interpret=params)
            assert_equal(got, prefix(x[sort_idx // k] * w.reshape(-1)[sort_idx][:, None], n), "gather")
            got = ps.combine_rows(y, sort_idx, w, n_valid=nv, config=cfg, interpret=params)
            assert_close(got, reference.unpermute(prefix(y, n), sort_idx, w), 1e-6, "combine")
            got = ps.combine_weight_grad(x, y, sort_idx, k, n_valid=nv, config=cfg, interpret=params)
            assert np.isfinite(np.asarray(got)).all()
        assert ipc.races is None or not ipc.races.races_found, "data race detected"
    finally:
        pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_pallas_lowers_for_tpu(dtype):
    """Every Pallas sort kernel lowers to Mosaic (jax.export for platform tpu on this CPU machine)."""
    from kernels.pallas import sort as ps

    t, k, e, d = 512, 4, 256, 256      # several grid steps in every kernel
    spec = jax.ShapeDtypeStruct
    rows, ids, idx = spec((t * k, d), dtype), spec((t, k), jnp.int32), spec((t * k,), jnp.int32)
    tok, w, nv = spec((t, d), dtype), spec((t, k), jnp.float32), spec((), jnp.int32)
    cases = {
        "sort_by_expert": (lambda a: ps.sort_by_expert(a, e, interpret=False), (ids,)),
        "gather_rows": (lambda a, b, c, n: ps.gather_rows(a, b, k, c, n, interpret=False), (tok, idx, w, nv)),
        "combine_rows": (lambda a, b, c, n: ps.combine_rows(a, b, c, n, interpret=False), (rows, idx, w, nv)),
        "combine_weight_grad": (lambda a, b, c, n: ps.combine_weight_grad(a, b, c, k, n, interpret=False),
                                (tok, rows, idx, nv)),
    }
    for name, (fn, args) in cases.items():
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
        assert "tpu_custom_call" in exported.mlir_module(), name
