"""``moe_ops.integrations.maxtext``: megablox-signature ``gmm``, MaxText's permute / unpermute / local_permute /
get_all_to_all_params (checked against direct argsort / numpy formulations of what MaxText computes), and a small
MaxText-style routed MoE block built only from the module, against ``reference.moe_ffn_dense``."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference
from moe_ops.integrations import maxtext
from tests.helpers import TOL, assert_close, group_sizes, keys, randn

IMPLS = ["xla", "triton", "pallas"]
B, S, D, F, E, K = 2, 7, 16, 24, 4, 2


def test_signatures_match_megablox_and_maxtext():
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
    ours = list(inspect.signature(maxtext.gmm).parameters)[:9]
    assert ours == list(inspect.signature(megablox_gmm).parameters)
    assert list(inspect.signature(maxtext.local_permute).parameters)[:10] == [
        "inputs", "global_group_sizes", "local_expert_size", "shard_index", "is_offset", "global_sorted_experts",
        "use_custom_sort_vjp", "use_ragged_sort", "ragged_buffer_factor", "use_single_sparsecore"]
    assert list(inspect.signature(maxtext.get_all_to_all_params).parameters) == [
        "all_shards_group_sizes", "shard_id", "num_expert_parallelism", "is_batch_sharded", "ragged_buffer_factor",
        "buffer_size", "is_dispatch"]
    assert list(inspect.signature(maxtext.get_ragged_buffer_size).parameters) == [
        "local_batch", "ep_degree", "global_experts", "top_k", "ragged_buffer_factor"]


@pytest.mark.parametrize("impl", IMPLS)
def test_gmm_megablox_call(impl):
    m, k, n, g = 29, 16, 12, 4
    k1, k2, k3 = keys(21, 3)
    lhs, rhs, ex = randn(k1, (m, k), jnp.bfloat16), randn(k2, (2, n, k), jnp.bfloat16), randn(k3, (m, n))
    sizes, off = group_sizes("sum_below_m", g, m), jnp.array([1], jnp.int32)
    out = maxtext.gmm(lhs, rhs, sizes, jnp.float32, (8, 128, 128), off, ex, True, True, implementation=impl)
    ref = reference.gmm(lhs, rhs, sizes, group_offset=off, transpose_rhs=True, preferred_element_type=jnp.float32,
                        existing_out=ex)
    assert out.dtype == jnp.float32
    assert_close(out, ref, TOL[jnp.bfloat16], impl)


def test_gmm_takes_the_maxtext_fork_keywords():
    """RoutedMoE calls MaxText's fork of megablox (maxtext.kernels.megablox.ops.gmm) by keyword, with extra
    quantization / kernel-choice arguments; their unquantized defaults run, quantization raises."""
    m, k, n, g = 16, 8, 4, 2
    k1, k2 = keys(22, 2)
    lhs, rhs, sizes = randn(k1, (m, k)), randn(k2, (g, k, n)), jnp.array([9, 5], jnp.int32)
    fork = dict(lhs_quantize_dtype=None, rhs_quantize_dtype=None, use_qwix_quantization=False,
                use_tokamax_backend=False, weight_gather_axes=None, lhs_vma_axes=(), rhs_vma_axes=(), use_gmm_v2=False,
                partial_sum=None)
    out = maxtext.gmm(lhs=lhs, rhs=rhs, group_sizes=sizes, preferred_element_type=jnp.float32, tiling=(128,) * 9,
                      group_offset=None, interpret=True, implementation="xla", **fork)
    assert_close(out, reference.gmm(lhs, rhs, sizes), TOL[jnp.float32], "fork keywords")
    with pytest.raises(NotImplementedError, match="quantized"):
        maxtext.gmm(lhs, rhs, sizes, **{**fork, "rhs_quantize_dtype": jnp.int8}, implementation="xla")
    with pytest.raises(NotImplementedError, match="partial_sum"):
        maxtext.gmm(lhs, rhs, sizes, **{**fork, "partial_sum": jnp.zeros((m, n))}, implementation="xla")


def test_numpy_float64_operands_run_as_float32():
    """As megablox and MaxText take them with x64 off (failed before the fix: 'lhs must be float32')."""
    k1, k2, k3 = keys(23, 3)
    lhs, rhs, x = randn(k1, (16, 8)), randn(k2, (2, 8, 4)), randn(k3, (B, S, D))
    sizes, f64 = jnp.array([9, 5], jnp.int32), (lambda a: np.asarray(a, np.float64))
    np.testing.assert_array_equal(maxtext.gmm(f64(lhs), f64(rhs), sizes, implementation="xla"),
                                  maxtext.gmm(lhs, rhs, sizes, implementation="xla"))
    np.testing.assert_array_equal(maxtext.tgmm(f64(lhs.T), f64(lhs), sizes, implementation="xla"),
                                  maxtext.tgmm(lhs.T, lhs, sizes, implementation="xla"))
    logits = x[..., :E]
    got = maxtext.permute(f64(x), f64(logits), None, num_experts_per_tok=K, implementation="xla")
    want = maxtext.permute(x, logits, None, num_experts_per_tok=K, implementation="xla")
    for a, b in zip(got[:5], want[:5]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _maxtext_permute_reference(x, logits, k):
    """What RoutedMoE.permute computes on its default path, written directly (argsort of the flat ids)."""
    top, ids = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(x.dtype)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    x2 = jnp.repeat(x.reshape(-1, x.shape[-1]), k, axis=0)[order]
    sizes = jnp.bincount(flat, length=logits.shape[-1])
    return x2, order, weights, sizes, jnp.sort(flat)


@pytest.mark.parametrize("impl", IMPLS)
def test_permute_unpermute_match_maxtext(impl):
    k1, k2 = keys(22, 2)
    x, logits = randn(k1, (B, S, D)), randn(k2, (B, S, E))
    got = maxtext.permute(x, logits, logits, num_experts_per_tok=K, implementation=impl)
    assert len(got) == 8 and got[5:] == (None, None, None)
    for a, b, what in zip(got, _maxtext_permute_reference(x, logits, K), ["inputs", "order", "w", "sizes", "ids"]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, err_msg=what)
    y = randn(k1, (B * S * K, D))
    out = maxtext.unpermute(y, got[1], got[2], B, S, implementation=impl)
    unsorted = y[jnp.argsort(got[1])].reshape(B * S, K, D)
    want = jnp.einsum("tkd,tk->td", unsorted, got[2].reshape(-1, K), precision="highest").reshape(B, S, D)
    assert_close(out, want, TOL[jnp.float32], "unpermute")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq,dim", [(0, D), (S, 0)], ids=["no_tokens", "D0"])
def test_permute_unpermute_with_empty_dims(impl, seq, dim):
    """A zero-length sequence (B*S = 0) or D = 0: permute and unpermute give arrays of the right shapes, forward
    and gradient (reshapes to [-1, D] / [B, S, -1] once could not infer a dimension from an empty array)."""
    x, logits = jnp.zeros((B, seq, dim)), randn(keys(24, 1)[0], (B, seq, E))
    sorted_x, order, weights, sizes, _ = maxtext.permute(x, logits, num_experts_per_tok=K, implementation=impl)[:5]
    t = B * seq
    assert sorted_x.shape == (t * K, dim) and order.shape == (t * K,) and weights.shape == (B, seq, K)
    assert sizes.shape == (E,) and int(jnp.sum(sizes)) == t * K
    fn = lambda y, w: maxtext.unpermute(y, order, w, B, seq, implementation=impl)
    assert jax.jit(fn)(sorted_x, weights).shape == (B, seq, dim)
    grads = jax.grad(lambda y, w: jnp.sum(fn(y, w)), argnums=(0, 1))(sorted_x, weights)
    assert [g.shape for g in grads] == [(t * K, dim), (B, seq, K)]
    assert reference.unpermute(sorted_x, order, weights.reshape(t, K)).shape == (t, dim)


def test_unpermute_returns_config_dtype():
    """MaxText's unpermute returns ``config.dtype``: ``dtype=`` casts the f32-accumulated combine (intermediate's
    dtype by default); a dtype that is not a float is refused by name, in permute too."""
    k1, k2 = keys(23, 2)
    x, logits = randn(k1, (B, S, D), jnp.bfloat16), randn(k2, (B, S, E))
    _, order, weights, *_ = maxtext.permute(x, logits, num_experts_per_tok=K, implementation="xla")
    y = randn(k1, (B * S * K, D), jnp.bfloat16)
    default = maxtext.unpermute(y, order, weights, B, S, implementation="xla")
    wide = maxtext.unpermute(y, order, weights, B, S, dtype=jnp.float32, implementation="xla")
    assert default.dtype == jnp.bfloat16 and wide.dtype == jnp.float32
    unsorted = y.astype(jnp.float32)[jnp.argsort(order)].reshape(B * S, K, D)
    want = jnp.einsum("tkd,tk->td", unsorted, weights.reshape(-1, K).astype(jnp.float32),
                      precision="highest").reshape(B, S, D)
    assert_close(wide, want, TOL[jnp.float32], "unpermute f32")
    assert_close(default, want, TOL[jnp.bfloat16], "unpermute bf16")
    for bad in (jnp.int32, "not-a-dtype"):
        with pytest.raises(TypeError, match="dtype must be a float dtype"):
            maxtext.unpermute(y, order, weights, B, S, dtype=bad, implementation="xla")
        with pytest.raises(TypeError, match="dtype must be a float dtype"):
            maxtext.permute(x, logits, num_experts_per_tok=K, dtype=bad, implementation="xla")


@pytest.mark.parametrize("is_offset", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_local_permute_matches_argsort(is_offset, ragged):
    shards, local, t = 3, 2, 24
    rng = np.random.default_rng(3)
    global_sizes = jnp.asarray(rng.integers(0, 4, (shards, shards * local)), jnp.int32)
    x = randn(keys(23, 1)[0], (t, D))
    sorted_experts = jnp.asarray(np.sort(rng.integers(0, shards * local, t)), jnp.int32)
    for shard in range(shards):
        got = maxtext.local_permute(x, global_sizes, local, shard, is_offset=is_offset,
                                    global_sorted_experts=sorted_experts, use_ragged_sort=ragged,
                                    ragged_buffer_factor=1.0 if ragged else -1.0, implementation="xla")
        mine = global_sizes[:, shard * local:(shard + 1) * local]
        if is_offset:
            ids = jnp.where(sorted_experts // local == shard, sorted_experts % local, local)
        else:
            ids = jnp.repeat(jnp.tile(jnp.arange(local), shards), mine.reshape(-1), total_repeat_length=t)
        order = jnp.argsort(ids, stable=True)
        flat = np.asarray(mine).reshape(-1)
        sizes = np.diff(np.minimum(np.cumsum(flat), t), prepend=0).reshape(mine.shape).sum(0) if ragged \
            else np.asarray(mine).sum(0)
        want_x = x[order]
        if ragged:
            want_x = jnp.where((jnp.arange(t) < sizes.sum())[:, None], want_x, 0)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(order))
        np.testing.assert_array_equal(np.asarray(got[2]), sizes)
        np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(ids[order]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want_x))
        with moe_ops.checked():  # the out-of-range id of other shards' rows is the shim's own, not a caller's error
            checked = maxtext.local_permute(x, global_sizes, local, shard, is_offset=is_offset,
                                            global_sorted_experts=sorted_experts, use_ragged_sort=ragged,
                                            ragged_buffer_factor=1.0 if ragged else -1.0, implementation="xla")
            np.testing.assert_array_equal(np.asarray(checked[1]), np.asarray(order))


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_local_permute_sorts_rows_of_any_dtype(impl):
    """MaxText's tests sort int32 rows with ``local_permute`` (a row gather there): rows the kernels do not copy
    (int32, bool) take a gather, with the same order, sizes, ids and ragged zero-fill as float rows."""
    shards, local, t = 2, 2, 11
    rng = np.random.default_rng(5)
    global_sizes = jnp.asarray(rng.integers(0, 4, (shards, shards * local)), jnp.int32)
    rows = jnp.asarray(rng.integers(-1000, 1000, (t, 3)), jnp.int32)
    for ragged in (False, True):
        kw = dict(use_ragged_sort=ragged, ragged_buffer_factor=1.0 if ragged else -1.0, implementation=impl)
        want = maxtext.local_permute(rows.astype(jnp.float32), global_sizes, local, 1, **kw)
        for x, cast in ((rows, np.int32), (rows > 0, lambda r: r > 0)):
            got = maxtext.local_permute(x, global_sizes, local, 1, **kw)
            assert got[0].dtype == x.dtype
            np.testing.assert_array_equal(np.asarray(got[0]), cast(np.asarray(want[0])))
            for g, w in zip(got[1:], want[1:]):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match=r"inputs must be a \[T,D\] array"):
        maxtext.local_permute(rows[0], global_sizes, local, 1, implementation=impl)
    with pytest.raises(ValueError, match=r"global_group_sizes must have rank 2, got shape \(\d+,\)"):  # [shards, E]
        maxtext.local_permute(rows, global_sizes[0], local, 1, implementation=impl)   # was an IndexError in lax
    with pytest.raises(TypeError, match="inputs must be float32, bfloat16 or float16, got int32"):
        maxtext.permute(rows[None], jnp.zeros((1, t, 4)), num_experts_per_tok=2, implementation=impl)


@pytest.mark.parametrize("dispatch", [True, False])
@pytest.mark.parametrize("buffer", [None, 7])
def test_all_to_all_params(dispatch, buffer):
    ep = 3
    counts = np.random.default_rng(4).integers(0, 6, (ep, ep)).astype(np.int32)
    kept = counts.copy()
    if buffer is not None:  # receiver j keeps rows of senders in order until its buffer is full
        for j in range(ep):
            room = buffer
            for i in range(ep):
                kept[i, j] = min(counts[i, j], room)
                room -= kept[i, j]
    send_m, recv_m = (kept, kept) if dispatch else (kept.T, kept.T)
    in_m = counts if dispatch else kept.T
    out_m = kept if dispatch else counts.T
    for me in range(ep):
        got = maxtext.get_all_to_all_params(jnp.asarray(counts), me, ep, True, -1.0 if buffer is None else 1.0,
                                            buffer, dispatch)
        want = (np.concatenate([[0], np.cumsum(in_m[me])[:-1]]), send_m[me], out_m[:me].sum(0), recv_m[:, me])
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), b)
    sizes = jnp.array([3, 0, 5], jnp.int32)   # replicated batch: 1-D counts
    got = maxtext.get_all_to_all_params(sizes, 2, ep, is_batch_sharded=False)
    for a, b in zip(got, ([0, 0, 0], [5, 5, 5], [3, 3, 3], [3, 0, 5])):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("batch, ep, experts, k, factor, want", [
    (1024, 4, 256, 8, -1.0, 4096),     # DeepSeek-V3, EP 4: every copy may land on one shard
    (1024, 128, 256, 8, -1.0, 32768),  # EP 128: 2 local experts of each token's 8 -> at most E/k = 32x balanced
    (1000, 8, 60, 8, 0.0, 7500),       # non-integral E/k = 7.5, truncated to an int
    (1024, 4, 256, 8, 1.5, 1536),      # a set factor: balanced size times it (drops past it)
    (0, 4, 8, 2, -1.0, 0),
])
def test_ragged_buffer_size(batch, ep, experts, k, factor, want):
    got = maxtext.get_ragged_buffer_size(batch, ep, experts, k, factor)
    assert got == want and type(got) is int


def test_ragged_buffer_size_names_a_bad_size():
    with pytest.raises(ValueError, match="top_k must be an int >= 1, got 0"):
        maxtext.get_ragged_buffer_size(64, 4, 8, 0, -1.0)
    with pytest.raises(ValueError, match="local_batch must be an int >= 0, got 6.5"):
        maxtext.get_ragged_buffer_size(6.5, 4, 8, 2, -1.0)


def _maxtext_moe_block(x, logits, w0, w1, wo, impl):
    """The shape of RoutedMoE's sparse path: permute -> gmm (w0, w1) -> silu gate -> gmm (wo) -> unpermute."""
    sorted_x, order, weights, sizes, *_ = maxtext.permute(x, logits, None, num_experts_per_tok=K,
                                                          implementation=impl)
    mm = lambda a, w: maxtext.gmm(a, w, sizes, x.dtype, (128, 128, 128), implementation=impl)
    h = (jax.nn.silu(mm(sorted_x, w0).astype(jnp.float32)) * mm(sorted_x, w1).astype(jnp.float32)).astype(x.dtype)
    return maxtext.unpermute(mm(h, wo), order, weights, x.shape[0], x.shape[1], implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_maxtext_style_moe_block(impl):
    k = keys(24, 6)
    x, logits = randn(k[0], (B, S, D)), randn(k[1], (B, S, E))
    w0, w1 = randn(k[2], (E, D, F), scale=0.3), randn(k[3], (E, D, F), scale=0.3)
    wo = randn(k[4], (E, F, D), scale=0.3)
    got = jax.jit(lambda *a: _maxtext_moe_block(*a, impl))(x, logits, w0, w1, wo)
    want = reference.moe_ffn_dense(x, logits, w0, w1, wo, top_k=K)
    assert_close(got, want, TOL[jnp.float32], impl)
    cot = randn(k[5], x.shape)
    loss = lambda *a: jnp.sum(cot * _maxtext_moe_block(*a, impl))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, logits, w0, w1, wo)
    ref = jax.jit(jax.grad(lambda *a: jnp.sum(cot * reference.moe_ffn_dense(*a, top_k=K)), argnums=(0, 1, 2, 3, 4)))(
        x, logits, w0, w1, wo)
    for name, a, b in zip(["x", "logits", "w0", "w1", "wo"], grads, ref):
        assert_close(a, b, 1e-4, f"{impl} d{name}")


def _apply_ffn_activation(decoder_block, act, limit, w0, w1):
    """MaxText's ``RoutedMoE.apply_ffn_activation`` transcribed (flax.linen activations are jax.nn's)."""
    activation_fn = getattr(jax.nn, act)
    if decoder_block == "gpt_oss":
        w0 = jnp.clip(w0, None, limit)
        w1 = jnp.clip(w1, -limit, limit)
        return w0 * activation_fn(w0 * 1.702) * (w1 + 1)
    if decoder_block in ("deepseek", "deepseek4") and limit > 0.0:
        w0 = jnp.clip(w0, None, limit)
        w1 = jnp.clip(w1, -limit, limit)
    return activation_fn(w0) * w1


@pytest.mark.parametrize("decoder_block,act,limit", [
    ("gpt_oss", "sigmoid", 7.0), ("gpt_oss", "sigmoid", 0.8), ("deepseek", "silu", 0.8), ("deepseek4", "silu", -1.0),
    ("default", "silu", 0.8), ("llama2", "gelu", -1.0), ("mixtral", "relu", -1.0)])
def test_ffn_activation_is_maxtexts(decoder_block, act, limit):
    """``ffn_activation(...)`` through ``reference.activate`` equals MaxText's own activation on data that crosses
    the limits."""
    g, u = (randn(k, (4096,), scale=3.0) for k in keys(61, 2))
    spec = maxtext.ffn_activation(decoder_block, (act, "linear"), limit)
    assert_close(reference.activate(g, u, spec), _apply_ffn_activation(decoder_block, act, limit, g, u), 1e-6, decoder_block)


def test_ffn_activation_refuses_what_the_kernels_lack():
    with pytest.raises(NotImplementedError, match="sigmoid"):
        maxtext.ffn_activation("gpt_oss", ("silu", "linear"), 7.0)
    with pytest.raises(NotImplementedError, match="mlp_activations"):
        maxtext.ffn_activation("default", ("tanh", "linear"))
