"""MaxText's routing for ``moe_ops.integrations.maxtext.permute`` / ``unpermute``: ``RoutedMoE.get_topk`` and the
load-balance loss / routed-bias update that ``permute`` derives from it (MaxText's ``layers/moe.py``), in plain jnp.

The settings are MaxText's config fields, under the same names and defaults (``decoder_block`` and ``model_name``
pick the branch, as ``get_topk`` does):

* selection: ``model_name`` starting with ``deepseek3`` / ``deepseek4``: top-k of ``gate_logits`` (the scores plus
  the routed bias, from ``GateLogit``), restricted to the ``topk_routing_group`` best of ``n_routing_groups``
  contiguous expert groups when ``n_routing_groups != -1`` (a group's score: the f32 sum of its two largest
  ``gate_logits``); weights = ``pre_bias_logits`` there. ``decoder_block="gemma4"``: top-k of the logits, weights =
  softmax over all E there. Otherwise ``lax.top_k`` of ``gate_logits`` (weights = the top-k values).
* weights: ``decoder_block`` ``deepseek`` / ``deepseek4``: divided by their sum (+1e-20) when ``routed_score_func``
  is ``sigmoid`` / ``sqrtsoftplus``, then times ``routed_scaling_factor``. Otherwise softmax over the k (except
  ``llama4`` / ``gemma4``), ``/ sum`` with ``norm_topk_prob``, times ``per_expert_scale[id]`` when given (Gemma4's
  learned [E] parameter, refused for other blocks as MaxText has none there; leave it ``None`` where MaxText fuses
  it into ``wo``).

Random routing (``use_random_routing``) and hash routing (``is_hash_routing``, a ``RoutedMoE`` argument) raise
``NotImplementedError``. ``dtype`` stands for MaxText's ``config.dtype``: the casts happen where MaxText makes them.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from moe_ops import reference, validation

# MaxText's DecoderBlockType values (maxtext/common/common_types.py); an enum member is read by its ``.value``.
DECODER_BLOCKS = ("default", "llama2", "mistral", "mixtral", "deepseek", "gemma", "gemma2", "gemma3", "gemma4",
                  "gemma4_small", "qwen2", "qwen3", "qwen3_moe", "qwen3_custom_moe", "qwen3_next", "qwen3_5", "gpt3",
                  "gpt_oss", "simple", "simple_mlp", "llama4", "olmo3", "deepseek4", "envy")
DEEPSEEK_BLOCKS = ("deepseek", "deepseek4")
DEEPSEEK_MODELS = ("deepseek3", "deepseek4")  # model_name prefixes of DeepSeek's grouped / pre-bias selection


def decoder_block_name(decoder_block) -> str:
    """``decoder_block`` (a MaxText ``DecoderBlockType`` or its string value) -> the string; unknown names raise."""
    name = getattr(decoder_block, "value", decoder_block)
    if name not in DECODER_BLOCKS:
        raise ValueError(f"decoder_block must be one of MaxText's DecoderBlockType values {DECODER_BLOCKS} (or the "
                         f"enum member), got {decoder_block!r}")
    return name


def _real(name, value, minimum=None):
    if isinstance(value, (bool, jax.Array)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a Python / NumPy real number (a static config value), got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_settings(gate_logits, pre_bias_logits, num_experts_per_tok, *, decoder_block, model_name, norm_topk_prob,
                   routed_score_func, routed_scaling_factor, routed_bias, routed_bias_update_rate, n_routing_groups,
                   topk_routing_group, load_balance_loss_weight, per_expert_scale, use_random_routing,
                   is_hash_routing) -> dict:
    """Validates ``permute``'s routing keywords (errors name them) -> the settings ``get_topk`` takes, normalised.
    Group settings are checked only where they are used (``model_name`` deepseek3 / deepseek4), as in MaxText."""
    validation.float_array("gate_logits", gate_logits, 3)
    num_experts = gate_logits.shape[-1]
    k = num_experts_per_tok
    if not validation.is_static_int(k) or not 1 <= k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be an int in [1, E={num_experts}], got {k!r}")
    for name, value in (("norm_topk_prob", norm_topk_prob), ("routed_bias", routed_bias),
                        ("use_random_routing", use_random_routing), ("is_hash_routing", is_hash_routing)):
        validation.flag(name, value)
    if use_random_routing:
        raise NotImplementedError("use_random_routing (MaxText's debug routing) is not supported by this adapter")
    if is_hash_routing:
        raise NotImplementedError("is_hash_routing (DeepSeek-V4's tid2eid hash layers) is not supported by this "
                                  "adapter")
    block = decoder_block_name(decoder_block)
    if block == "llama4" and k != 1:
        raise ValueError(f"decoder_block='llama4' needs num_experts_per_tok=1 (MaxText scales the [B*S, D] inputs by "
                         f"the [B*S, k] sigmoid scores, a broadcast only k=1 makes), got {k}")
    for name, value in (("model_name", model_name), ("routed_score_func", routed_score_func)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str (MaxText's config value), got {value!r}")
    scale = _real("routed_scaling_factor", routed_scaling_factor)
    lb_weight = _real("load_balance_loss_weight", load_balance_loss_weight, 0.0)
    rate = _real("routed_bias_update_rate", routed_bias_update_rate, 0.0)
    if routed_bias and rate > 0.0 and block not in DEEPSEEK_BLOCKS:
        raise ValueError(f"routed_bias_update_rate > 0 with routed_bias (loss-free load balancing) needs "
                         f"decoder_block in {DEEPSEEK_BLOCKS}, as MaxText's config requires; got {block!r}")
    deepseek_select = model_name.startswith(DEEPSEEK_MODELS)
    groups = None
    if deepseek_select:
        if pre_bias_logits is None or tuple(pre_bias_logits.shape) != tuple(gate_logits.shape):
            raise ValueError(f"pre_bias_logits (the scores before the routed bias, gate_logits' shape "
                             f"{tuple(gate_logits.shape)}) is required when model_name starts with deepseek3 / "
                             f"deepseek4, got {None if pre_bias_logits is None else tuple(pre_bias_logits.shape)}")
        if n_routing_groups != -1:
            g = n_routing_groups
            if not validation.is_static_int(g) or g < 1 or num_experts % g or num_experts // g < 2:
                raise ValueError(f"n_routing_groups must be -1 or an int dividing E={num_experts} into groups of at "
                                 f"least 2 experts (a group scores its top 2), got {g!r}")
            t = topk_routing_group
            if not validation.is_static_int(t) or not 1 <= t <= g:
                raise ValueError(f"topk_routing_group must be an int in [1, n_routing_groups={g}], got {t!r}")
            groups = (int(g), int(t))
    if per_expert_scale is not None and block != "gemma4":
        raise ValueError(f"per_expert_scale is Gemma4's parameter (MaxText has it for decoder_block='gemma4' only; "
                         f"the DeepSeek blocks never apply it), got decoder_block={block!r}")
    if per_expert_scale is not None and (getattr(per_expert_scale, "shape", None) != (num_experts,)
                                         or not jnp.issubdtype(per_expert_scale.dtype, jnp.floating)):
        raise ValueError(f"per_expert_scale must be None or a float [E={num_experts}] array, got "
                         f"{getattr(per_expert_scale, 'shape', per_expert_scale)!r}")
    return dict(block=block, deepseek_select=deepseek_select, groups=groups, norm_topk_prob=bool(norm_topk_prob),
                score_func=routed_score_func, scale=scale, lb_weight=lb_weight,
                bias_rate=rate if routed_bias else 0.0, per_expert_scale=per_expert_scale)


def _top_groups_only(gate_logits, n_groups, top_groups):
    """gate_logits [B,S,E] in f32 with the experts outside each token's ``top_groups`` best groups at -inf (a group
    scores the f32 sum of its top 2: ``reference.top_groups_only``; the f32 cast is exact, so the order is kept)."""
    flat = reference.flatten_tokens(gate_logits.astype(jnp.float32))
    return reference.top_groups_only(flat, n_groups, top_groups, None).reshape(gate_logits.shape)


def get_topk(gate_logits, pre_bias_logits, k, settings, dtype):
    """``RoutedMoE.get_topk``: gate_logits / pre_bias_logits [B,S,E] -> (weights [B,S,k], ids [B,S,k] int32)."""
    s = settings
    if s["deepseek_select"]:
        masked = gate_logits if s["groups"] is None else _top_groups_only(gate_logits, *s["groups"])
        ids = jax.lax.top_k(masked, k)[1]
        weights = jnp.take_along_axis(pre_bias_logits, ids, axis=-1)
    elif s["block"] == "gemma4":
        ids = jax.lax.top_k(gate_logits, k)[1]
        probs = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)
        weights = jnp.take_along_axis(probs, ids, axis=-1).astype(dtype)
    else:
        weights, ids = jax.lax.top_k(gate_logits, k)
    if s["block"] in DEEPSEEK_BLOCKS:
        if s["score_func"] in ("sigmoid", "sqrtsoftplus"):
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        weights = weights * s["scale"]
    else:
        if s["block"] not in ("llama4", "gemma4"):
            weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(dtype)
        if s["norm_topk_prob"]:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        if s["per_expert_scale"] is not None:
            weights = weights * s["per_expert_scale"][ids].astype(weights.dtype)
    return weights, ids.astype(jnp.int32)


def load_balance_loss(ids, gate_logits, num_experts, weight, dtype):
    """MaxText's sequence-wise loss: ``mean_b,e(density[b,e] * mean_s probs[b,s,e]) * E^2 * weight`` with
    ``density[b,e]`` = mean over s of the times token (b,s) picked e, probs = softmax of ``gate_logits`` in
    ``dtype``."""
    probs = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1).astype(dtype)
    experts = jnp.arange(num_experts, dtype=ids.dtype).reshape((1,) * ids.ndim + (num_experts,))
    picks = jnp.sum((ids[..., None] == experts).astype(jnp.int32), axis=-2)  # [B,S,E]
    wide = validation.standard_promotion(jnp.float32, dtype)  # MaxText's float32 density times the probs
    density = jnp.mean(picks, axis=1, dtype=wide)
    return jnp.mean(density * jnp.mean(probs, axis=1).astype(wide)) * (num_experts ** 2) * weight


def bias_updates(ids, num_experts, rate):
    """MaxText's ``calculate_load_balance_updates``: ``rate * sign(mean load - load[e])`` [E] (f32)."""
    load = jnp.bincount(ids.reshape(-1), length=num_experts).astype(jnp.float32)
    return jnp.sign(ids.size / num_experts - load) * jnp.float32(rate)
