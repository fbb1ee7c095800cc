"""Values that must not influence results, on every backend: rows past ``sum(group_sizes)`` / ``n_valid``, rows of
non-local groups (``group_offset``), experts no row uses, routing weights of copies whose row does not contribute
(another shard's expert, an out-of-range id: sorted past the sum), and ``existing_out`` rows that ``gmm`` overwrites.
NaN, Inf or a huge finite value (3e38, which overflows when multiplied) placed there must reach no output and, under
``jax.grad`` with respect to every float input, no gradient: the op on poisoned inputs equals the pure-jnp reference
on the same inputs with those values zeroed, and the gradients of the poisoned entries are exactly zero.

The contract: a value that the op documents as not contributing is *selected away* (``jnp.where``, a masked load),
never multiplied by zero (``inf * 0`` is NaN). Each test names the fault it caught. Data are fresh random draws (the
seed is in every assertion message); the routing is fixed so every kind of non-contributing copy occurs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import assert_close

T, TOPK, E = 8, 2, 4
M = T * TOPK
OFFSET, NUM_LOCAL = 1, 2          # local experts 1, 2; experts 0 and 3 belong to other shards
# expert 7 is out of range (dropped: sorted past the sum); every token has at least one other kind of copy
IDS = jnp.array([[0, 1], [1, 2], [2, 3], [3, 0], [1, 7], [2, 1], [0, 3], [1, 2]], jnp.int32)
SIZES, SIDX = R.sort_by_expert(IDS, E)
INV = R.inverse_permutation(SIDX)
N_VALID = int(SIZES.sum())                                       # the dropped copy's row is past it
ROW_GROUP = R.row_group_ids(SIZES, M)                            # E for the dropped row
ROW_LOCAL = (ROW_GROUP >= OFFSET) & (ROW_GROUP < OFFSET + NUM_LOCAL)
SLOT_LOCAL = ROW_LOCAL[INV].reshape(T, TOPK)
SLOT_PAST = (INV >= N_VALID).reshape(T, TOPK)
TOKEN_NONLOCAL = ~SLOT_LOCAL.any(axis=1)                         # tokens with no local copy (token 3: experts 3, 0)
POISONS = {"nan": np.nan, "inf": np.inf, "huge": 3e38}
# Triton (interpreter) and Pallas (interpret mode) are slow: inf there (inf * 0 and NaN * 0 are both NaN; a huge
# finite value only fails where it is multiplied by something nonzero, which the xla sweep covers)
KERNEL_POISONS = ["inf"]


def _dims(impl):
    return (128, 128) if impl == "pallas" else (8, 16)   # Pallas tiles want 128-lane dims


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed={value}")
    return value


def _data(seed, impl):
    d, f = _dims(impl)
    k = jax.random.split(jax.random.key(seed), 8)
    n = lambda i, s, sc=1.0: jax.random.normal(k[i], s, jnp.float32) * sc
    return dict(x=n(0, (T, d)), wg=n(1, (E, d, f), d ** -0.5), wu=n(2, (E, d, f), d ** -0.5),
                wd=n(3, (E, f, d), f ** -0.5), w=jax.nn.softmax(n(4, (T, TOPK)), axis=-1), h=n(5, (M, f)),
                y=n(6, (M, d)), cot_key=k[7])


def _rows(a, mask, value):
    return jnp.where(jnp.reshape(mask, mask.shape + (1,) * (a.ndim - mask.ndim)), jnp.asarray(value, a.dtype), a)


def _check(fn, ref, poisoned, clean, seed, what, tol=1e-5):
    """fn(*poisoned) == ref(*clean) and so are the gradients of <out, random cotangent> w.r.t. every argument (all
    under ``jax.jit``: one compile per function instead of one per eager op)."""
    out = jax.jit(fn)(*poisoned)
    cot = jax.random.normal(jax.random.key(seed ^ 0x5A5A), out.shape, jnp.float32)
    loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot))
    argnums = tuple(range(len(poisoned)))
    got = jax.jit(jax.grad(loss(fn), argnums))(*poisoned)
    want = jax.jit(jax.grad(loss(ref), argnums))(*clean)
    assert_close(out, jax.jit(ref)(*clean), tol, f"{what} forward (seed {seed})")
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, tol, f"{what} gradient of argument {i} (seed {seed})")
    return out, got


def _impls(slow=()):
    return ["xla"] + [pytest.param(i, marks=pytest.mark.slow) if i in slow else i for i in ("triton", "pallas")]


def _poison_cases(kernel_poisons=KERNEL_POISONS):
    return ([("xla", p) for p in POISONS] + [(i, p) for i in ("triton", "pallas") for p in kernel_poisons])


# ---------------------------------------------------------------------------------------------------------------
# unpermute(n_valid=...): rows past n_valid and the weights of their slots.


@pytest.mark.parametrize("impl,poison", _poison_cases())
def test_unpermute_ignores_rows_and_weights_past_n_valid(impl, poison, seed):
    """Failed before the fix on xla and triton: the weight of a slot whose row is past ``n_valid`` multiplied that
    row's zero (``inf * 0``: NaN in the token's output). Pallas selected it away already."""
    v, data = POISONS[poison], _data(seed, impl)
    y_p, w_p = _rows(data["y"], jnp.arange(M) >= N_VALID, v), jnp.where(SLOT_PAST, v, data["w"])
    y_c, w_c = _rows(data["y"], jnp.arange(M) >= N_VALID, 0.0), jnp.where(SLOT_PAST, 0.0, data["w"])
    fn = lambda y, w: moe_ops.unpermute(y, SIDX, w, n_valid=N_VALID, implementation=impl)
    _, (dy, dw) = _check(fn, lambda y, w: R.unpermute(y, SIDX, w), (y_p, w_p), (y_c, w_c), seed, "unpermute")
    assert not np.asarray(dy)[N_VALID:].any() and not np.asarray(dw)[np.asarray(SLOT_PAST)].any()


@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
def test_unpermute_weight_gradient_of_a_slot_past_n_valid_is_zero_for_any_cotangent(impl, seed):
    """Failed before the fix on xla: ``combine_weight_grad`` computed ``<dout[t], 0>`` for a slot past ``n_valid``,
    NaN when token t's cotangent is NaN (its output is NaN through a valid copy); Triton and Pallas gave 0. The
    weighted gather (the gradient w.r.t. y) must also leave the rows past n_valid at exactly zero."""
    data = _data(seed, impl)
    token = int(np.argmax(np.asarray(SLOT_PAST).any(axis=1)))    # the token with the dropped copy
    _, vjp = jax.vjp(lambda y, w: moe_ops.unpermute(y, SIDX, w, n_valid=N_VALID, implementation=impl),
                     data["y"], data["w"])
    dout = jax.random.normal(data["cot_key"], (T, data["y"].shape[1])).at[token].set(jnp.nan)
    dy, dw = (np.asarray(g) for g in vjp(dout))
    assert not dy[N_VALID:].any(), f"rows past n_valid got a gradient (seed {seed})"
    assert not dw[np.asarray(SLOT_PAST)].any(), f"{dw[token]}: the dropped slot's weight gradient (seed {seed})"
    keep = np.ones(T, bool)
    keep[token] = False
    assert np.isfinite(dw[keep]).all() and np.isfinite(dy[:N_VALID][np.asarray(SIDX[:N_VALID] // TOPK != token)]).all()


@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
def test_unpermute_under_vmap_ignores_weights_past_each_n_valid(impl, seed):
    """Failed before the fix on triton: under ``jax.vmap`` a per-batch ``n_valid`` zeroed the y rows past it
    (``kernels.triton.batching``) but not the weights of their slots, so ``inf * 0`` reached the output; the weight
    gradient of those slots was ``<NaN cotangent, 0>``. (xla and pallas: the same check through their own vmap
    paths.)"""
    data = _data(seed, impl)
    n_valid = jnp.array([N_VALID, N_VALID - 3], jnp.int32)
    inv = np.asarray(INV).reshape(T, TOPK)
    past = np.stack([inv >= n for n in np.asarray(n_valid)])                  # [2, T, k]
    rows_past = np.stack([np.arange(M) >= n for n in np.asarray(n_valid)])    # [2, M]
    y = jnp.stack([data["y"], -data["y"]])
    w = jnp.stack([data["w"], data["w"][::-1]])
    fn = jax.vmap(lambda y, w, n: moe_ops.unpermute(y, SIDX, w, n_valid=n, implementation=impl))
    ref = jax.vmap(lambda y, w: R.unpermute(y, SIDX, w))
    y_p, w_p = jnp.where(rows_past[..., None], jnp.inf, y), jnp.where(past, jnp.nan, w)
    y_c, w_c = jnp.where(rows_past[..., None], 0.0, y), jnp.where(past, 0.0, w)
    _check(lambda y, w: fn(y, w, n_valid), ref, (y_p, w_p), (y_c, w_c), seed, "vmap(unpermute)")
    _, vjp = jax.vjp(lambda w: fn(y_c, w, n_valid), w_c)
    dw = np.asarray(vjp(jnp.full((2, T, y.shape[-1]), jnp.nan))[0])
    assert not dw[past].any(), f"weight gradient of slots past n_valid under vmap (seed {seed})"


# ---------------------------------------------------------------------------------------------------------------
# scatter_gmm / swiglu_ffn: copies of non-local experts (group_offset) and dropped copies.


def _scatter_inputs(data, value):
    """(h, weights) with the rows / weights of every non-contributing copy set to ``value``."""
    return _rows(data["h"], ~ROW_LOCAL, value), jnp.where(SLOT_LOCAL, data["w"], value)


@pytest.mark.parametrize("impl,poison", _poison_cases())
def test_scatter_gmm_ignores_non_local_copies(impl, poison, seed):
    """Failed before the fix: on xla the forward multiplied the zero row of a non-local / dropped copy by its
    weight (``inf * 0``: NaN output); on every backend the backward's ``dh = a * w`` and ``dweights = <h_i, a_i>``
    (``moe_ops.fused``) did the same on those rows (NaN dh rows, NaN weight gradients)."""
    v, data = POISONS[poison], _data(seed, impl)
    rhs = data["wd"][OFFSET:OFFSET + NUM_LOCAL]
    fn = lambda h, r, w: moe_ops.scatter_gmm(h, r, SIZES, SIDX, w, group_offset=OFFSET, implementation=impl)
    ref = lambda h, r, w: R.unpermute(R.gmm(h, r, SIZES, group_offset=OFFSET), SIDX, w)
    (h_p, w_p), (h_c, w_c) = _scatter_inputs(data, v), _scatter_inputs(data, 0.0)
    _, (dh, _, dw) = _check(fn, ref, (h_p, rhs, w_p), (h_c, rhs, w_c), seed, "scatter_gmm")
    assert not np.asarray(dh)[~np.asarray(ROW_LOCAL)].any() and not np.asarray(dw)[~np.asarray(SLOT_LOCAL)].any()


@pytest.mark.parametrize("impl,recompute,x_poison,w_poison", [
    ("xla", False, "nan", "inf"), ("xla", True, "inf", "nan"), ("xla", False, "huge", "huge"),
    ("triton", False, "inf", "inf"), ("triton", True, "nan", "inf"),
    pytest.param("pallas", False, "inf", "inf", marks=pytest.mark.slow)])
def test_swiglu_ffn_ignores_non_local_copies(impl, recompute, x_poison, w_poison, seed):
    """Failed before the fix on xla (its ``scatter_gmm``): an Inf / NaN routing weight of a non-local or dropped copy
    made the token's output NaN. x rows of tokens with no local copy are poisoned too."""
    vx, vw, data = POISONS[x_poison], POISONS[w_poison], _data(seed, impl)
    local = lambda a: a[OFFSET:OFFSET + NUM_LOCAL]
    ws = (local(data["wg"]), local(data["wu"]), local(data["wd"]))
    fn = lambda x, wg, wu, wd, w: moe_ops.swiglu_ffn(x, wg, wu, wd, SIZES, SIDX, w, group_offset=OFFSET,
                                                     recompute=recompute, implementation=impl)

    def ref(x, wg, wu, wd, w):
        xs = x[SIDX // TOPK]
        h = R.activate(R.gmm(xs, wg, SIZES, group_offset=OFFSET), R.gmm(xs, wu, SIZES, group_offset=OFFSET))
        return R.unpermute(R.gmm(h, wd, SIZES, group_offset=OFFSET), SIDX, w)

    poisoned = (_rows(data["x"], TOKEN_NONLOCAL, vx), *ws, jnp.where(SLOT_LOCAL, data["w"], vw))
    clean = (_rows(data["x"], TOKEN_NONLOCAL, 0.0), *ws, jnp.where(SLOT_LOCAL, data["w"], 0.0))
    _check(fn, ref, poisoned, clean, seed, f"swiglu_ffn(recompute={recompute})", tol=2e-5)


@pytest.mark.parametrize("impl", ["triton", "pallas"])
def test_swiglu_down_bwd_kernels_zero_non_local_rows_like_the_reference(impl, seed):
    """The kernel-level fused backward (``backend.swiglu_down_bwd``, Triton / Pallas) against its twin
    ``reference.swiglu_down_bwd`` with Inf routing weights on every non-local row: those rows are exact zeros in
    all four outputs. Failed before the fix in the reference (``dh = a * w`` gave ``0 * inf`` = NaN rows there)."""
    from moe_ops import backend  # noqa: PLC0415
    data = _data(seed, impl)
    local = lambda a: a[OFFSET:OFFSET + NUM_LOCAL]
    dout = jax.random.normal(data["cot_key"], data["x"].shape)
    w_sorted = jnp.where(ROW_LOCAL, data["w"].reshape(-1)[SIDX], jnp.inf)
    args = (data["x"], dout, local(data["wg"]), local(data["wu"]), local(data["wd"]))
    want = R.swiglu_down_bwd(*args, SIZES, SIDX, w_sorted, TOPK, group_offset=OFFSET)
    got = backend.ops(impl).swiglu_down_bwd(*args, SIZES, jnp.array([OFFSET], jnp.int32), SIDX, w_sorted, TOPK,
                                            activation="silu")
    for name, g, r in zip(("dgate", "dup", "hw", "dweights_sorted"), got, want):
        assert not np.asarray(r)[~np.asarray(ROW_LOCAL)].any(), f"reference {name} (seed {seed})"
        assert_close(g, r, 2e-5, f"{name} (seed {seed})")


@pytest.mark.parametrize("saved", [False, True])
def test_swiglu_down_bwd_compositions_zero_non_local_rows_like_the_reference(saved, seed):
    """The XLA backend's fused backward is a composition (``backend.compose_swiglu_down_bwd(_saved)``: gather-GMMs
    and ``reference.swiglu_down_epilogue``); with Inf routing weights on every non-local row it must give the
    kernels' exact zero rows too. Failed before the epilogue got the local-row mask there (NaN dgate / dup / hw)."""
    from moe_ops import backend  # noqa: PLC0415
    data, xla = _data(seed, "xla"), backend.ops("xla")
    local = lambda a: a[OFFSET:OFFSET + NUM_LOCAL]
    dout = jax.random.normal(data["cot_key"], data["x"].shape)
    w_sorted = jnp.where(ROW_LOCAL, data["w"].reshape(-1)[SIDX], jnp.inf)
    offset = jnp.array([OFFSET], jnp.int32)
    args = (data["x"], dout, local(data["wg"]), local(data["wu"]), local(data["wd"]))
    want = R.swiglu_down_bwd(*args, SIZES, SIDX, w_sorted, TOPK, group_offset=OFFSET)
    if saved:
        _, gate, up = backend.compose_swiglu_gmm_saved(data["x"], *args[2:4], SIZES, offset, SIDX, TOPK, ops=xla,
                                                       activation="silu", out_dtype=jnp.float32)
        got = backend.compose_swiglu_down_bwd_saved(dout, args[4], gate, up, SIZES, offset, SIDX, w_sorted, TOPK,
                                                    ops=xla, activation="silu")
    else:
        got = backend.compose_swiglu_down_bwd(*args, SIZES, offset, SIDX, w_sorted, TOPK, ops=xla, activation="silu")
    for name, g, r in zip(("dgate", "dup", "hw", "dweights_sorted"), got, want):
        assert not np.asarray(g)[~np.asarray(ROW_LOCAL)].any(), f"xla {name} outside local rows (seed {seed})"
        assert_close(g, r, 2e-5, f"{name} (seed {seed})")


# ---------------------------------------------------------------------------------------------------------------
# Guards of the parts that held already (same harness): gmm / tgmm / gather_gmm / the layers.


@pytest.mark.parametrize("impl", ["xla", pytest.param("triton", marks=pytest.mark.slow),
                                  pytest.param("pallas", marks=pytest.mark.slow)])
def test_gmm_tgmm_gather_gmm_ignore_non_contributing_rows(impl, seed):
    """gmm (rows past the sum, an unused expert, non-local rows, overwritten ``existing_out`` rows), tgmm (rows past
    the sum and of non-local groups) and gather_gmm (x rows of tokens with no local copy), forward and gradients;
    NaN, Inf and 3e38 each in some of those places."""
    _gmm_family(seed, impl)


def _gmm_family(seed, impl):
    data = _data(seed, impl)
    nan, inf, huge = POISONS["nan"], POISONS["inf"], POISONS["huge"]
    kw = dict(implementation=impl)
    xs, h = data["x"][SIDX // TOPK], data["h"]
    sizes = jnp.array([3, 0, 5, 4], jnp.int32)          # expert 1 unused, rows 12.. past the sum
    past = jnp.arange(M) >= 12
    wg = data["wg"]
    _check(lambda a, w: moe_ops.gmm(a, w, sizes, **kw), lambda a, w: R.gmm(a, w, sizes),
           (_rows(xs, past, nan), wg.at[1].set(inf)), (_rows(xs, past, 0.0), wg.at[1].set(0.0)), seed, "gmm")
    _check(lambda a, b: moe_ops.tgmm(a, b, sizes, **kw), lambda a, b: R.tgmm(a, b, sizes),
           (_rows(xs, past, huge), _rows(h, past, inf)), (_rows(xs, past, 0.0), _rows(h, past, 0.0)), seed, "tgmm")
    local = wg[OFFSET:OFFSET + NUM_LOCAL]
    existing = jax.random.normal(data["cot_key"], (M, h.shape[1]))
    fn = lambda a, w, e: moe_ops.gmm(a, w, SIZES, group_offset=OFFSET, existing_out=e, **kw)
    ref = lambda a, w, e: R.gmm(a, w, SIZES, group_offset=OFFSET, existing_out=e)
    _, (_, _, de) = _check(fn, ref, (_rows(xs, ~ROW_LOCAL, huge), local, _rows(existing, ROW_LOCAL, nan)),
                           (_rows(xs, ~ROW_LOCAL, 0.0), local, _rows(existing, ROW_LOCAL, 0.0)), seed,
                           "gmm(group_offset, existing_out)")
    assert not np.asarray(de)[np.asarray(ROW_LOCAL)].any()
    _check(lambda a, b: moe_ops.tgmm(a, b, SIZES, group_offset=OFFSET, num_groups=NUM_LOCAL, **kw),
           lambda a, b: R.tgmm(a, b, SIZES, group_offset=OFFSET, num_groups=NUM_LOCAL),
           (_rows(xs, ~ROW_LOCAL, nan), _rows(h, ~ROW_LOCAL, huge)), (_rows(xs, ~ROW_LOCAL, 0.0), _rows(h, ~ROW_LOCAL, 0.0)),
           seed, "tgmm(group_offset)")
    _check(lambda x, w: moe_ops.gather_gmm(x, w, SIZES, SIDX, group_offset=OFFSET, **kw),
           lambda x, w: R.gmm(x[SIDX // TOPK], w, SIZES, group_offset=OFFSET),
           (_rows(data["x"], TOKEN_NONLOCAL, inf), local), (_rows(data["x"], TOKEN_NONLOCAL, 0.0), local), seed,
           "gather_gmm(group_offset)")


@pytest.mark.parametrize("impl", _impls(slow=("triton", "pallas")))
@pytest.mark.parametrize("fused", [False, True])
def test_moe_ffn_ignores_an_unused_expert(impl, fused, seed):
    """No token routes to expert 3, whose three weight matrices are NaN / Inf: forward and every gradient equal the
    dense reference with that expert zeroed."""
    data = _data(seed, impl)
    logits = jax.random.normal(data["cot_key"], (T, E)).at[:, 3].set(-1e9)
    fn = lambda x, lg, wg, wu, wd: moe_ops.moe_ffn(x, lg, wg, wu, wd, top_k=TOPK, fused=fused, implementation=impl)
    ref = lambda x, lg, wg, wu, wd: R.moe_ffn_dense(x, lg, wg, wu, wd, top_k=TOPK)
    ws_p = (data["wg"].at[3].set(jnp.nan), data["wu"].at[3].set(jnp.inf), data["wd"].at[3].set(jnp.nan))
    ws_c = tuple(w.at[3].set(0.0) for w in (data["wg"], data["wu"], data["wd"]))
    _check(fn, ref, (data["x"], logits, *ws_p), (data["x"], logits, *ws_c), seed, f"moe_ffn(fused={fused})", 2e-5)


# ---------------------------------------------------------------------------------------------------------------
# The reference itself (the ground truth the kernels are held to).


def test_reference_tgmm_and_gmm_gradients_ignore_non_contributing_rows(seed):
    """Failed before the fix: ``reference.tgmm`` summed a one-hot product (``0 * NaN``: a NaN row past the sum, or
    of one group, reached every group's block), and ``jax.grad(reference.gmm)`` multiplied every row's cotangent by
    every expert (a NaN row past the sum reached ``drhs``, an unused Inf expert ``dlhs``)."""
    data = _data(seed, "xla")
    xs, h = data["x"][SIDX // TOPK], data["h"]
    sizes = jnp.array([3, 0, 5, 4], jnp.int32)
    past = jnp.arange(M) >= 12
    out = np.asarray(R.tgmm(_rows(xs, past, np.nan), h, sizes))
    assert_close(out, R.tgmm(_rows(xs, past, 0.0), h, sizes), 1e-6, f"tgmm (seed {seed})")
    one = np.asarray(R.tgmm(xs.at[0, 0].set(jnp.nan), h, sizes))             # row 0 belongs to group 0
    assert np.isnan(one[0]).any() and np.isfinite(one[1:]).all(), f"a NaN row of group 0 left its group (seed {seed})"
    grads = jax.grad(lambda a, w: jnp.sum(R.gmm(a, w, sizes) ** 2), (0, 1))
    got = grads(_rows(xs, past, np.nan), data["wg"].at[1].set(np.inf))
    want = grads(_rows(xs, past, 0.0), data["wg"].at[1].set(0.0))
    for g, r in zip(got, want):
        assert_close(g, r, 1e-6, f"grad(reference.gmm) (seed {seed})")


# ---------------------------------------------------------------------------------------------------------------
# Pallas with a symbolic row count (jax.export shape polymorphism): the compositions that replace the kernels.


@pytest.mark.slow   # two shape-polymorphic exports in interpret mode, about 15 s
def test_pallas_symbolic_rows_ignore_non_local_copies(seed):
    """Failed before the fix: with a symbolic T (``jax.export``), Pallas ``scatter_gmm`` and ``swiglu_down_bwd(_saved)``
    run their compositions, which multiplied the zero rows of non-local copies by their weights: an Inf weight of
    another shard's copy made every gradient of the exported ``swiglu_ffn`` NaN, and the kernel-level backward's
    non-local rows NaN (the kernels store zeros there)."""
    from jax import export  # noqa: PLC0415
    from kernels.pallas import swiglu_bwd  # noqa: PLC0415
    data = _data(seed, "pallas")
    local = lambda a: a[OFFSET:OFFSET + NUM_LOCAL]
    ws = (local(data["wg"]), local(data["wu"]), local(data["wd"]))
    t = export.symbolic_shape("t", constraints=(f"t <= {2 * T}",))[0]
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    sds = [spec(t, ws[0].shape[1]), *(spec(*w.shape) for w in ws), spec(t, TOPK),
           jax.ShapeDtypeStruct((E,), jnp.int32), jax.ShapeDtypeStruct((TOPK * t,), jnp.int32)]

    def loss(x, wg, wu, wd, w, sizes, sidx):
        out = moe_ops.swiglu_ffn(x, wg, wu, wd, sizes, sidx, w, group_offset=OFFSET, implementation="pallas")
        return jnp.sum(out ** 2)
    grad = jax.jit(jax.grad(loss, argnums=range(5)))
    exported = export.export(grad, platforms=["cpu"])(*sds)
    got = exported.call(data["x"], *ws, jnp.where(SLOT_LOCAL, data["w"], jnp.inf), SIZES, SIDX)
    want = grad(data["x"], *ws, jnp.where(SLOT_LOCAL, data["w"], 0.0), SIZES, SIDX)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, 2e-5, f"exported grad of swiglu_ffn, argument {i} (seed {seed})")

    dout = jax.random.normal(data["cot_key"], data["x"].shape)
    w_sorted = jnp.where(ROW_LOCAL, data["w"].reshape(-1)[SIDX], jnp.inf)
    offset = jnp.array([OFFSET], jnp.int32)

    def bwd(x, dout, wg, wu, wd, sizes, sidx, w_sorted):
        return swiglu_bwd.swiglu_down_bwd(x, dout, wg, wu, wd, sizes, offset, sidx, w_sorted, TOPK, activation="silu")
    exported = export.export(jax.jit(bwd), platforms=["cpu"])(sds[0], sds[0], *sds[1:4], *sds[5:],
                                                              spec(TOPK * t))
    got = exported.call(data["x"], dout, *ws, SIZES, SIDX, w_sorted)
    want = R.swiglu_down_bwd(data["x"], dout, *ws, SIZES, SIDX, w_sorted, TOPK, group_offset=OFFSET)
    for name, g, r in zip(("dgate", "dup", "hw", "dweights_sorted"), got, want):
        assert not np.asarray(g)[~np.asarray(ROW_LOCAL)].any(), f"exported {name}: non-local rows (seed {seed})"
        assert_close(g, r, 2e-5, f"exported {name} (seed {seed})")


@pytest.mark.parametrize("strategy", [pytest.param("all_to_all", marks=pytest.mark.slow), "ring"])  # a2a: ~20 s
def test_moe_ffn_shard_ignores_an_unused_expert_and_padding_rows(strategy, seed):
    """Inside ``shard_map`` over 4 expert shards (tokens split over them; xla backend): ``all_to_all`` pads its
    receive buffer (rows past ``n_valid``), ``ring`` runs every token against the local experts with
    ``group_offset``. No token routes to expert 5, whose weights are NaN / Inf on its shard: forward and every
    gradient equal the dense reference with it zeroed."""
    from jax.sharding import AxisType, PartitionSpec as P  # noqa: PLC0415
    ep, e, t = 4, 8, 16
    mesh = jax.make_mesh((ep,), ("expert",), axis_types=(AxisType.Auto,), devices=jax.devices()[:ep])
    k = jax.random.split(jax.random.key(seed), 5)
    d, f = 8, 16
    x = jax.random.normal(k[0], (t, d))
    logits = jax.random.normal(k[1], (t, e)).at[:, 5].set(-1e9)
    ws = [jax.random.normal(k[2], (e, d, f)) * 0.3, jax.random.normal(k[3], (e, d, f)) * 0.3,
          jax.random.normal(k[4], (e, f, d)) * 0.3]
    cfg = moe_ops.MoEShardingConfig(strategy=strategy)
    body = jax.shard_map(lambda *a: moe_ops.moe_ffn_shard(*a, top_k=TOPK, config=cfg, implementation="xla"),
                         mesh=mesh, in_specs=(P("expert"),) * 5, out_specs=P("expert"))
    ref = lambda x, lg, wg, wu, wd: R.moe_ffn_dense(x, lg, wg, wu, wd, top_k=TOPK)
    poisoned = (x, logits, ws[0].at[5].set(jnp.nan), ws[1].at[5].set(jnp.inf), ws[2].at[5].set(jnp.nan))
    clean = (x, logits, *(w.at[5].set(0.0) for w in ws))
    _check(jax.jit(body), ref, poisoned, clean, seed, f"moe_ffn_shard({strategy})", 2e-5)


def test_reference_dense_layer_ignores_an_unused_expert(seed):
    """Failed before the fix: ``reference.moe_ffn_dense`` ran every token through every expert and combined by
    multiplying with the one-hot weights, so an expert no token picks, with NaN / Inf weights, made every output NaN
    (``0 * NaN``). The routed twin ``reference.moe_ffn`` and the dense one must both ignore it, gradients included."""
    data = _data(seed, "xla")
    logits = jax.random.normal(data["cot_key"], (T, E)).at[:, 2].set(-1e9)
    ws_p = (data["wg"].at[2].set(jnp.nan), data["wu"].at[2].set(jnp.inf), data["wd"].at[2].set(-jnp.inf))
    ws_c = tuple(w.at[2].set(0.0) for w in (data["wg"], data["wu"], data["wd"]))
    for ref in (R.moe_ffn_dense, R.moe_ffn):
        fn = lambda x, lg, wg, wu, wd, ref=ref: ref(x, lg, wg, wu, wd, top_k=TOPK)
        _, grads = _check(fn, fn, (data["x"], logits, *ws_p), (data["x"], logits, *ws_c), seed, ref.__name__, 1e-6)
        assert all(not np.asarray(g)[2].any() for g in grads[2:]), f"{ref.__name__}: unused expert's gradient"
