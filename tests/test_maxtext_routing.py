"""MaxText's per-model routing in ``moe_ops.integrations.maxtext.permute`` / ``unpermute`` (DeepSeek V2/V3/V4,
Gemma4, Llama4, Qwen3's ``norm_topk_prob``, the load-balance loss and the routed-bias update), each against a
float64 NumPy formulation written here from MaxText's ``RoutedMoE.get_topk`` / ``permute`` / ``load_balance_loss``
/ ``calculate_load_balance_updates`` (layers/moe.py), token by token.

Every test fails on the code before these keywords: its ``permute`` took none of them (TypeError), always routed by
softmax over the top-k logits and returned ``lb_loss = bias_updates = None``; its ``unpermute`` had no
``decoder_block``."""

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_ops.integrations import maxtext
from tests.helpers import keys, randn

B, S, D, E = 2, 7, 16, 8


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top_ids(v, k):
    """lax.top_k's order: largest first, equal values (the masked -inf ones) by lowest index."""
    return np.argsort(-v, kind="stable")[:k]


def _np_get_topk(gate, pre, k, block="default", model="default", norm=False, score_func="", factor=1.0,
                 groups=None, per_expert_scale=None):
    """MaxText's get_topk for one config, token by token in float64 -> (weights [B,S,k], ids [B,S,k])."""
    gate = _f64(gate)
    pre = None if pre is None else _f64(pre)
    ids, weights = np.zeros(gate.shape[:2] + (k,), np.int64), np.zeros(gate.shape[:2] + (k,))
    for b, s in np.ndindex(*gate.shape[:2]):
        g = gate[b, s]
        if model.startswith(("deepseek3", "deepseek4")):
            sel = g.copy()
            if groups is not None:
                n, top = groups
                size = E // n
                group_score = np.array([np.sort(g[i * size:(i + 1) * size])[-2:].sum() for i in range(n)])
                for i in set(range(n)) - set(_top_ids(group_score, top)):
                    sel[i * size:(i + 1) * size] = -np.inf
            idx = _top_ids(sel, k)
            w = pre[b, s, idx]
        elif block == "gemma4":
            idx = _top_ids(g, k)
            w = _softmax(g)[idx]
        else:
            idx = _top_ids(g, k)
            w = g[idx]
        if block in ("deepseek", "deepseek4"):
            if score_func in ("sigmoid", "sqrtsoftplus"):
                w = w / (w.sum() + 1e-20)
            w = w * factor
        else:
            if block not in ("llama4", "gemma4"):
                w = _softmax(w)
            if norm:
                w = w / w.sum()
            if per_expert_scale is not None:
                w = w * _f64(per_expert_scale)[idx]
        ids[b, s], weights[b, s] = idx, w
    return weights, ids


def _np_lb_loss(ids, gate, weight):
    picks = np.zeros(gate.shape)                               # [B,S,E]: times token (b,s) picked e
    for b, s, j in np.ndindex(*ids.shape):
        picks[b, s, ids[b, s, j]] += 1
    density, prob = picks.mean(axis=1), _softmax(_f64(gate)).mean(axis=1)
    return (density * prob).mean() * E ** 2 * weight


def _np_bias_updates(ids, rate):
    load = np.bincount(ids.ravel(), minlength=E)
    return np.sign(ids.size / E - load) * rate


def _check_permute(got, x, ids, weights, x_scale=None, lb=None, bias=None):
    """permute's outputs against the argsort path of MaxText's permute for these ids / weights."""
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    rows = _f64(x).reshape(-1, D) * (1.0 if x_scale is None else x_scale.reshape(-1, 1))
    sorted_x, sort_idx, w, sizes, sorted_experts, lb_loss, bias_updates, local = got
    np.testing.assert_array_equal(np.asarray(sort_idx), order)
    np.testing.assert_array_equal(np.asarray(sorted_experts), flat[order])
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat, minlength=E))
    np.testing.assert_allclose(_f64(w), weights, rtol=2e-6, atol=1e-7, err_msg="weights")
    np.testing.assert_allclose(_f64(sorted_x), np.repeat(rows, k, axis=0)[order], rtol=2e-6, atol=1e-7)
    assert local is None
    if lb is None:
        assert lb_loss is None
    else:
        assert lb_loss.shape == ()
        np.testing.assert_allclose(float(lb_loss), lb, rtol=1e-5)
    if bias is None:
        assert bias_updates is None
    else:
        np.testing.assert_array_equal(np.asarray(bias_updates, np.float64), np.float32(bias))


@pytest.mark.parametrize("k", [2, E])
def test_qwen3_norm_topk_prob(k):
    """Default routing with norm_topk_prob (Qwen3-MoE): softmax over the top-k logits, then / their sum."""
    k1, k2 = keys(31, 2)
    x, logits = randn(k1, (B, S, D)), randn(k2, (B, S, E))
    got = maxtext.permute(x, logits, None, num_experts_per_tok=k, decoder_block="qwen3_moe", norm_topk_prob=True,
                          implementation="xla")
    _check_permute(got, x, *_np_get_topk(logits, None, k, norm=True)[::-1])


@pytest.mark.parametrize("k", [2, E])
@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_deepseek3_grouped_pre_bias_routing(k, groups):
    """DeepSeek-V3: sigmoid scores + routed bias select (within the top groups, by the sum of each group's top 2),
    the pre-bias scores weigh, normalised, times routed_scaling_factor; lb_loss and bias_updates as MaxText's. The
    old code routed by softmax of the top-k gate_logits and ignored pre_bias_logits (and k=E with groups picks the
    masked experts last, by index)."""
    k1, k2, k3 = keys(32, 3)
    x = randn(k1, (B, S, D))
    pre = jax.nn.sigmoid(randn(k2, (B, S, E), scale=2.0))
    gate = pre + randn(k3, (E,), scale=0.3)
    n, top = groups or (-1, -1)
    got = maxtext.permute(x, gate, pre, num_experts_per_tok=k, decoder_block="deepseek", model_name="deepseek3-671b",
                          routed_score_func="sigmoid", routed_scaling_factor=2.5, n_routing_groups=n,
                          topk_routing_group=top, routed_bias=True, routed_bias_update_rate=1e-3,
                          load_balance_loss_weight=0.01, implementation="xla")
    weights, ids = _np_get_topk(gate, pre, k, "deepseek", "deepseek3-671b", score_func="sigmoid", factor=2.5,
                                groups=groups)
    _check_permute(got, x, ids, weights, lb=_np_lb_loss(ids, gate, 0.01), bias=_np_bias_updates(ids, 1e-3))
    assert got[2].dtype == pre.dtype


@pytest.mark.parametrize("k", [2, E])
def test_deepseek4_sqrtsoftplus(k):
    """DeepSeek-V4 (deepseek4-284b's settings): sqrt(softplus) scores, weights normalised and scaled; its
    norm_topk_prob does not apply on the DeepSeek block (MaxText's deepseek_scale_weights branch)."""
    k1, k2, k3 = keys(33, 3)
    x = randn(k1, (B, S, D))
    pre = jnp.sqrt(jax.nn.softplus(randn(k2, (B, S, E), scale=2.0)))
    gate = pre + randn(k3, (E,), scale=0.3)
    kw = dict(decoder_block="deepseek4", model_name="deepseek4-284b", routed_score_func="sqrtsoftplus",
              norm_topk_prob=True, routed_bias=True, routed_bias_update_rate=1e-3, load_balance_loss_weight=1e-4,
              routed_scaling_factor=1.5)
    got = maxtext.permute(x, gate, pre, num_experts_per_tok=k, implementation="xla", **kw)
    weights, ids = _np_get_topk(gate, pre, k, "deepseek4", "deepseek4-284b", norm=True,
                                score_func="sqrtsoftplus", factor=1.5)
    _check_permute(got, x, ids, weights, lb=_np_lb_loss(ids, gate, 1e-4), bias=_np_bias_updates(ids, 1e-3))
    jitted = jax.jit(functools.partial(maxtext.permute, num_experts_per_tok=k, implementation="xla", **kw))
    for a, b in zip(jitted(x, gate, pre)[:7], got[:7]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("k", [2, E])
def test_deepseek2_selects_on_gate_logits(k):
    """DeepSeek-V2 (decoder_block deepseek, a deepseek2 model_name): top-k of the softmax scores themselves, no
    renormalisation (score func softmax), times routed_scaling_factor. routed_bias without an update rate: no
    bias_updates."""
    k1, k2 = keys(34, 2)
    x, scores = randn(k1, (B, S, D)), jax.nn.softmax(randn(k2, (B, S, E)), axis=-1)
    got = maxtext.permute(x, scores, None, num_experts_per_tok=k, decoder_block="deepseek", model_name="deepseek2-16b",
                          routed_score_func="softmax", routed_scaling_factor=16.0, routed_bias=True,
                          implementation="xla")
    _check_permute(got, x, *_np_get_topk(scores, None, k, "deepseek", "deepseek2-16b", score_func="softmax",
                                         factor=16.0)[::-1])


@pytest.mark.parametrize("k,impl", [(2, "xla"), (E, "xla"), (2, "pallas")])
def test_gemma4_softmax_over_all_experts(k, impl):
    """Gemma4: weights = softmax over all E at the top-k logits, / their sum (norm_topk_prob), times the
    per-expert scale; lb_loss from the softmax of the logits."""
    k1, k2, k3 = keys(35, 3)
    x, logits = randn(k1, (B, S, D)), randn(k2, (B, S, E), scale=2.0)
    scale = 1.0 + jax.random.uniform(k3, (E,))
    got = maxtext.permute(x, logits, None, num_experts_per_tok=k, decoder_block="gemma4", norm_topk_prob=True,
                          per_expert_scale=scale, load_balance_loss_weight=0.001, implementation=impl)
    weights, ids = _np_get_topk(logits, None, k, "gemma4", norm=True, per_expert_scale=scale)
    _check_permute(got, x, ids, weights, lb=_np_lb_loss(ids, logits, 0.001))


def test_llama4_scales_inputs_and_unpermutes_with_ones():
    """Llama4 (k=1): the weight is the raw top logit, the inputs are scaled by its sigmoid before the sort, and
    unpermute(decoder_block='llama4') combines with weights of 1 (the default combine would scale twice). A
    DecoderBlockType-like enum member is read by its value."""
    k1, k2, k3 = keys(36, 3)
    x, logits = randn(k1, (B, S, D)), randn(k2, (B, S, E), scale=2.0)
    block = enum.Enum("DecoderBlockType", {"LLAMA4": "llama4"}).LLAMA4
    got = maxtext.permute(x, logits, None, num_experts_per_tok=1, decoder_block=block, implementation="xla")
    weights, ids = _np_get_topk(logits, None, 1, "llama4")
    _check_permute(got, x, ids, weights, x_scale=1.0 / (1.0 + np.exp(-weights)))
    y = randn(k3, (B * S, D))
    out = maxtext.unpermute(y, got[1], got[2], B, S, decoder_block=block, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y)[np.argsort(np.asarray(got[1]))].reshape(B, S, D))
    default = maxtext.unpermute(y, got[1], got[2], B, S, implementation="xla")
    assert not np.allclose(np.asarray(default), np.asarray(out))


def test_routing_errors_name_the_argument():
    """Bad settings raise naming the keyword; random / hash routing raise NotImplementedError (the old permute
    took none of these keywords)."""
    k1, k2 = keys(37, 2)
    x, logits = randn(k1, (B, S, D)), randn(k2, (B, S, E))
    ds = dict(decoder_block="deepseek", model_name="deepseek3-test")
    bad = [
        (dict(decoder_block="deepseek3"), "decoder_block"),
        (dict(num_experts_per_tok=E + 1), "num_experts_per_tok"),
        (dict(decoder_block="llama4", num_experts_per_tok=2), "num_experts_per_tok"),
        (dict(**ds, n_routing_groups=3, topk_routing_group=1), "n_routing_groups"),
        (dict(**ds, n_routing_groups=E, topk_routing_group=1), "n_routing_groups"),
        (dict(**ds, n_routing_groups=4, topk_routing_group=0), "topk_routing_group"),
        (dict(**ds, n_routing_groups=4, topk_routing_group=5), "topk_routing_group"),
        (dict(**ds, n_routing_groups=4, topk_routing_group=-1), "topk_routing_group"),
        (dict(**ds, pre_bias=None), "pre_bias_logits"),
        (dict(**ds, pre_bias=logits[..., :4]), "pre_bias_logits"),
        (dict(load_balance_loss_weight=-1.0), "load_balance_loss_weight"),
        (dict(routed_bias=True, routed_bias_update_rate=1e-3), "routed_bias_update_rate"),
        (dict(routed_scaling_factor="2.5"), "routed_scaling_factor"),
        (dict(routed_score_func=None), "routed_score_func"),
        (dict(decoder_block="gemma4", per_expert_scale=jnp.ones(E - 1)), "per_expert_scale"),
        # Gemma4's parameter only: MaxText has none for other blocks (the DeepSeek branch would drop it silently)
        (dict(per_expert_scale=jnp.ones(E)), "per_expert_scale"),
        (dict(**ds, per_expert_scale=jnp.ones(E)), "per_expert_scale"),
    ]
    for kw, name in bad:
        kw = {"num_experts_per_tok": 2, **kw}
        pre = kw.pop("pre_bias", logits)
        with pytest.raises(ValueError, match=name):
            maxtext.permute(x, logits, pre, implementation="xla", **kw)
    with pytest.raises(TypeError, match="norm_topk_prob"):
        maxtext.permute(x, logits, None, num_experts_per_tok=2, norm_topk_prob="yes", implementation="xla")
    for kw in (dict(use_random_routing=True), dict(is_hash_routing=True)):
        with pytest.raises(NotImplementedError, match=next(iter(kw))):
            maxtext.permute(x, logits, None, num_experts_per_tok=2, implementation="xla", **kw)
    with pytest.raises(ValueError, match="decoder_block"):
        maxtext.unpermute(randn(k1, (B * S * 2, D)), jnp.arange(B * S * 2), jnp.ones((B, S, 2)), B, S,
                          decoder_block="llama5", implementation="xla")
