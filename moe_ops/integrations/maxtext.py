"""MaxText-compatible entry points: megablox's ``gmm`` signature and the sort / all-to-all helpers that MaxText's
``layers/moe.py`` (``RoutedMoE``) calls, with the same argument orders and return tuples, run by ``moe_ops``.

* ``gmm``: ``megablox.gmm``'s signature, plus the keywords of MaxText's fork of it (quantization raises).
  ``tiling`` (a 3-tuple or LUT function) and ``interpret`` are accepted and
  ignored: tiles come from this package's per-backend tuning (the Pallas one is VMEM-aware), and the backend (and
  Pallas interpret mode off TPU) is chosen by ``implementation`` as for ``moe_ops.gmm``. ``existing_out`` keeps
  megablox's forward semantics; its gradient is ``dout`` on the kept rows only (megablox passes all of ``dout``).
* ``tgmm``: ``megablox.tgmm``'s signature: lhs is ``[k, m]`` (megablox's layout, transposed here), rhs ``[m, n]``
  -> ``[num_actual_groups or num_groups, k, n]``; ``existing_out`` is *added* to the result (megablox accumulates
  into it); ``tiling`` / ``interpret`` ignored as for ``gmm``.
* ``permute`` / ``unpermute``: ``RoutedMoE.permute`` / ``unpermute`` without ``self`` (its non-ring, argsort
  path): the model settings become keyword-only arguments named as MaxText's config fields (``decoder_block``,
  ``model_name``, ``norm_topk_prob``, ``routed_score_func``, ``routed_scaling_factor``, ``n_routing_groups``,
  ``topk_routing_group``, ``load_balance_loss_weight``, ``routed_bias``, ``routed_bias_update_rate``), with
  MaxText's defaults (``decoder_block="default"`` for its ``llama2``, which routes alike): MaxText's default routing
  (``top_k`` of the logits, softmax over the k). DeepSeek V2/V3/V4, Gemma4, Llama4 and Qwen3 routing, the
  load-balance loss and the routed-bias update follow ``get_topk`` / ``permute`` (``maxtext_routing``).
  ``sorted_selected_experts`` is the stable argsort of the flat expert ids (the ``sort_idx`` of
  ``moe_ops.permute``). Random and hash routing raise ``NotImplementedError``.
* ``local_permute`` / ``get_all_to_all_params`` / ``get_ragged_buffer_size``: the static methods, same arguments
  and results.
* ``ffn_activation``: the ``activation`` argument (a ``moe_ops.GatedActivation``) that computes what
  ``RoutedMoE.apply_ffn_activation`` does for the config fields ``decoder_block``, ``mlp_activations`` and
  ``mlp_activations_limit`` (gpt-oss's clamped ``g * sigmoid(1.702 g) * (u + 1)``, DeepSeek's clamped SwiGLU);
  MaxText's ``mlp_bias`` weights go to ``moe_ffn``'s ``b_gate`` / ``b_up`` / ``b_down``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import moe_ops
from moe_ops import reference, validation
from moe_ops.integrations import maxtext_routing as routing

__all__ = ["gmm", "tgmm", "permute", "unpermute", "local_permute", "get_all_to_all_params", "get_ragged_buffer_size",
           "ffn_activation"]


@validation.numpy_floats_as_jax
def gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=(128, 128, 128), group_offset=None,
        existing_out=None, transpose_rhs=False, interpret=False, lhs_quantize_dtype=None, rhs_quantize_dtype=None,
        use_qwix_quantization=False, use_tokamax_backend=False, weight_gather_axes=None, lhs_vma_axes=(),
        rhs_vma_axes=(), qwix_rule=None, use_manual_quantization=False, use_gmm_v2=False, partial_sum=None, *,
        implementation=None):
    """``megablox.gmm``: lhs [m,k] x rhs [num_groups,k,n] ([.., n, k] with ``transpose_rhs``) -> [m,n]
    (``preferred_element_type``, f32 by default as in megablox). ``tiling`` / ``interpret``: ignored (module doc).
    The keywords after ``interpret`` are MaxText's fork (``maxtext.kernels.megablox.ops.gmm``): kernel choices
    (``use_tokamax_backend``, ``use_gmm_v2``) and vma hints are ignored, ``weight_gather_axes`` and
    ``use_manual_quantization`` only act with quantization there; quantization and ``partial_sum`` raise."""
    del tiling, interpret, use_tokamax_backend, use_gmm_v2, lhs_vma_axes, rhs_vma_axes, weight_gather_axes
    del use_manual_quantization
    if lhs_quantize_dtype is not None or rhs_quantize_dtype is not None or use_qwix_quantization or qwix_rule:
        raise NotImplementedError("quantized gmm (lhs_quantize_dtype / rhs_quantize_dtype / use_qwix_quantization / "
                                  "qwix_rule) is not supported by moe_ops; pass unquantized operands")
    if partial_sum is not None:
        raise NotImplementedError("partial_sum (MaxText's gmm_v2 accumulator) is not supported by moe_ops; add it "
                                  "to the result instead")
    return moe_ops.gmm(lhs, rhs, group_sizes, group_offset=group_offset, transpose_rhs=transpose_rhs,
                       preferred_element_type=preferred_element_type, existing_out=existing_out,
                       implementation=implementation)


@validation.numpy_floats_as_jax
def tgmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=(128, 128, 128), group_offset=None,
         num_actual_groups=None, existing_out=None, interpret=False, *, implementation=None):
    """``megablox.tgmm``: lhs [k,m] x rhs [m,n] -> [num_actual_groups, k, n] (``num_actual_groups`` defaults to
    ``len(group_sizes)``), ``out[g] = lhs[:, rows of group_offset + g] @ rhs[rows of group_offset + g]``, plus
    ``existing_out`` when given (megablox accumulates into it). ``tiling`` / ``interpret``: ignored (module doc)."""
    del tiling, interpret
    if getattr(lhs, "ndim", None) != 2 or getattr(rhs, "ndim", None) != 2 or lhs.shape[1] != rhs.shape[0]:
        raise ValueError(f"lhs must be megablox.tgmm's [k, m] and rhs [m, n] with the same m, got lhs "
                         f"{tuple(getattr(lhs, 'shape', ()))}, rhs {tuple(getattr(rhs, 'shape', ()))}")
    num_groups = getattr(group_sizes, "shape", (None,))[0]
    if num_actual_groups is not None and not (validation.is_static_int(num_actual_groups)
                                              and 0 <= num_actual_groups <= (num_groups or 0)):
        raise ValueError(f"num_actual_groups must be None or a static int in [0, len(group_sizes)={num_groups}], "
                         f"got {num_actual_groups!r}")
    out = moe_ops.tgmm(jnp.swapaxes(lhs, 0, 1), rhs, group_sizes, group_offset=group_offset,
                       num_groups=num_actual_groups,
                       preferred_element_type=jnp.float32 if existing_out is not None else preferred_element_type,
                       implementation=implementation)
    if existing_out is None:
        return out
    out_dtype = validation.out_dtype(preferred_element_type, lhs.dtype)
    validation.check_existing_out(existing_out, out.shape, out_dtype)
    return (out + existing_out.astype(jnp.float32)).astype(out_dtype)


def _float_dtype(dtype, default):
    """MaxText's ``config.dtype`` keyword: a float dtype, ``default`` when None."""
    if dtype is None:
        return jnp.dtype(default)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a float dtype (MaxText's config.dtype), got {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a float dtype (MaxText's config.dtype), got {dtype}")
    return dtype


@validation.numpy_floats_as_jax
def permute(inputs, gate_logits, pre_bias_logits=None, use_custom_sort_vjp=True, rngs=None, roll_to_expert_id=None,
            input_ids=None, *, num_experts_per_tok, dtype=None, decoder_block="default", model_name="default",
            norm_topk_prob=False, routed_score_func="", routed_scaling_factor=1.0, routed_bias=False,
            routed_bias_update_rate=0.0, n_routing_groups=-1, topk_routing_group=-1, load_balance_loss_weight=0.0,
            per_expert_scale=None, use_random_routing=False, is_hash_routing=False, implementation=None):
    """inputs [B,S,D], gate_logits [B,S,E] (pre_bias_logits [B,S,E] for DeepSeek-V3/V4) -> ``(sorted_inputs
    [B*S*k,D], sorted_selected_experts [B*S*k], weights [B,S,k], group_size [E], sorted_experts [B*S*k], lb_loss,
    bias_updates, local_group_size=None)`` with k = ``num_experts_per_tok``.

    The keywords after ``dtype`` are MaxText's config fields (``maxtext_routing`` describes the routing each picks).
    ``decoder_block="llama4"`` multiplies each token's inputs by the sigmoid of its (k=1) weight before the sort.
    ``lb_loss`` (a scalar) when ``load_balance_loss_weight > 0``; ``bias_updates`` [E] when ``routed_bias`` and
    ``routed_bias_update_rate > 0``; else ``None``. ``sorted_experts[i]`` is the expert of sorted row i
    (``roll_to_expert_id`` rotates ids first: ``(id - roll) % E``). ``dtype`` (MaxText's ``config.dtype``, inputs'
    by default): sorted_inputs' dtype and the routing's casts (weights are in ``dtype``, except the DeepSeek blocks'
    and Llama4's: the logits' dtype, as in MaxText). ``use_custom_sort_vjp``, ``rngs``, ``input_ids``: accepted,
    unused (random / hash routing raise)."""
    del use_custom_sort_vjp, rngs, input_ids
    if inputs.ndim != 3 or gate_logits.ndim != 3 or gate_logits.shape[:2] != inputs.shape[:2]:
        raise ValueError(f"inputs must be [B,S,D] and gate_logits [B,S,E] with the same B,S; got inputs "
                         f"{tuple(inputs.shape)}, gate_logits {tuple(gate_logits.shape)}")
    validation.float_array("inputs", inputs, 3)
    k = num_experts_per_tok
    settings = routing.check_settings(
        gate_logits, pre_bias_logits, k, decoder_block=decoder_block, model_name=model_name,
        norm_topk_prob=norm_topk_prob, routed_score_func=routed_score_func,
        routed_scaling_factor=routed_scaling_factor, routed_bias=routed_bias,
        routed_bias_update_rate=routed_bias_update_rate, n_routing_groups=n_routing_groups,
        topk_routing_group=topk_routing_group, load_balance_loss_weight=load_balance_loss_weight,
        per_expert_scale=per_expert_scale, use_random_routing=use_random_routing, is_hash_routing=is_hash_routing)
    num_experts = gate_logits.shape[-1]
    dtype = _float_dtype(dtype, inputs.dtype)
    weights, ids = routing.get_topk(gate_logits, pre_bias_logits, k, settings, dtype)
    lb_loss = None if settings["lb_weight"] <= 0.0 else routing.load_balance_loss(
        ids, gate_logits, num_experts, settings["lb_weight"], dtype)
    bias_updates = None if settings["bias_rate"] <= 0.0 else routing.bias_updates(ids, num_experts,
                                                                                  settings["bias_rate"])
    x2 = reference.flatten_tokens(inputs)
    if settings["block"] == "llama4":
        wide = validation.standard_promotion(x2.dtype, jnp.float32)   # MaxText's product (strict mode too)
        x2 = x2.astype(wide) * jax.nn.sigmoid(weights.astype(jnp.float32)).reshape(-1, 1).astype(wide)
    flat_ids = ids.reshape(-1, k)
    if roll_to_expert_id is not None:
        flat_ids = (flat_ids - roll_to_expert_id) % num_experts
    sorted_inputs, group_size, sort_idx = moe_ops.permute(x2, flat_ids, num_experts, implementation=implementation)
    sorted_experts = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), group_size,
                                total_repeat_length=sort_idx.shape[0])
    return (sorted_inputs.astype(dtype), sort_idx, weights, group_size, sorted_experts, lb_loss, bias_updates, None)


@validation.numpy_floats_as_jax
def unpermute(intermediate, sorted_selected_experts, weights, batch_size, sequence_length, use_custom_sort_vjp=True,
              group_sizes=None, *, dtype=None, decoder_block="default", implementation=None):
    """intermediate [B*S*k, D] (expert order) -> [B,S,D]: ``sum_j weights[b,s,j] * row of (b,s,j)`` (weights
    [B,S,k]), f32 accumulation, in ``dtype`` (MaxText's ``config.dtype``; intermediate's by default).
    ``decoder_block="llama4"`` combines with weights of 1, as MaxText does (its ``permute`` already scaled the
    inputs). ``use_custom_sort_vjp`` / ``group_sizes``: accepted, unused."""
    del use_custom_sort_vjp, group_sizes
    k = weights.shape[-1]
    if weights.size // k != batch_size * sequence_length:
        raise ValueError(f"weights [B,S,k] must hold batch_size * sequence_length = {batch_size} * {sequence_length} "
                         f"tokens, got weights {tuple(weights.shape)}")
    if routing.decoder_block_name(decoder_block) == "llama4":
        weights = jnp.ones_like(weights)
    dtype = _float_dtype(dtype, intermediate.dtype)
    if validation.standard_promotion(intermediate.dtype, dtype) != intermediate.dtype:  # wider: no rounding on the way
        intermediate = intermediate.astype(dtype)
    out = moe_ops.unpermute(intermediate, sorted_selected_experts, weights.reshape(-1, k),
                            implementation=implementation)
    return out.reshape(batch_size, sequence_length, out.shape[-1]).astype(dtype)


def _truncate_per_receiver(sizes, buffer_size):
    """Prefix-sum truncation over axis 0 (senders / shards) so each column fits ``buffer_size`` rows."""
    ends = jnp.minimum(jnp.cumsum(sizes, axis=0), buffer_size)
    return jnp.diff(ends, axis=0, prepend=jnp.zeros_like(ends[:1]))


@validation.numpy_floats_as_jax
def local_permute(inputs, global_group_sizes, local_expert_size, shard_index, is_offset=False,
                  global_sorted_experts=None, use_custom_sort_vjp=True, use_ragged_sort=False,
                  ragged_buffer_factor=-1.0, use_single_sparsecore=False, *, implementation=None):
    """Sort the rows an expert shard holds by local expert: inputs [T,D], global_group_sizes [shards, E] ->
    ``(sorted_inputs [T,D], sorted_indices [T], local_group_size [local_expert_size], sorted_experts_ids [T])``.

    ``is_offset``: rows are globally expert-sorted (``global_sorted_experts`` [T] gives each row's global expert) and
    rows of other shards' experts sort last; otherwise rows arrive as received from the all-to-all (per source
    shard, per local expert). ``ragged_buffer_factor > 0`` truncates the counts to ``T`` rows; ``use_ragged_sort``
    zeroes rows past ``sum(local_group_size)`` instead of copying them. ``inputs`` of any dtype: float32 / bfloat16
    / float16 rows are copied by the permute kernel, others (int32 in MaxText's tests, float64) by a plain gather."""
    del use_custom_sort_vjp, use_single_sparsecore
    if not hasattr(inputs, "ndim") or inputs.ndim != 2:
        raise ValueError(f"inputs must be a [T,D] array, got {getattr(inputs, 'shape', type(inputs).__name__)}")
    validation.int_array("global_group_sizes", global_group_sizes, 2)   # [shards, E]
    per_shard = jax.lax.dynamic_slice_in_dim(global_group_sizes, shard_index * local_expert_size, local_expert_size,
                                             axis=1)
    kept = _truncate_per_receiver(per_shard.reshape(-1, 1), inputs.shape[0]).reshape(per_shard.shape) \
        if ragged_buffer_factor > 0.0 else per_shard
    local_group_size = jnp.sum(kept, axis=0)
    if is_offset:
        mine = global_sorted_experts // local_expert_size == shard_index
        expert_ids = jnp.where(mine, global_sorted_experts % local_expert_size, local_expert_size)
    else:  # received chunks: shard 0's local experts 0..L-1, then shard 1's, ...; padding takes the last id
        chunk_ids = jnp.arange(per_shard.size) % local_expert_size
        expert_ids = jnp.repeat(chunk_ids, per_shard.reshape(-1), total_repeat_length=inputs.shape[0])
    n_valid = jnp.sum(local_group_size).astype(jnp.int32) if use_ragged_sort else None
    ids = expert_ids[:, None].astype(jnp.int32)
    with validation.checked(False):  # ids built here (other shards' rows: id L on purpose), not the caller's
        if validation.is_kernel_float(inputs.dtype):
            sorted_inputs, _, sorted_indices = moe_ops.permute(inputs, ids, local_expert_size, n_valid=n_valid,
                                                               implementation=implementation)
        else:  # MaxText's is a row gather of any dtype (its tests sort int32 rows); the kernels copy float rows
            _, sorted_indices = moe_ops.sort_by_expert(ids, local_expert_size, implementation=implementation)
            sorted_inputs = inputs[sorted_indices]
            if n_valid is not None:
                kept_rows = jnp.arange(inputs.shape[0], dtype=jnp.int32)[:, None] < n_valid
                sorted_inputs = jnp.where(kept_rows, sorted_inputs, jnp.zeros_like(sorted_inputs))
    return sorted_inputs, sorted_indices, local_group_size, expert_ids[sorted_indices]


def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


def get_all_to_all_params(all_shards_group_sizes, shard_id, num_expert_parallelism, is_batch_sharded=True,
                          ragged_buffer_factor=-1.0, buffer_size=None, is_dispatch=True):
    """``(input_offsets, send_sizes, output_offsets, recv_sizes)`` for ``lax.ragged_all_to_all`` on shard
    ``shard_id``. Batch-sharded: ``all_shards_group_sizes[i, j]`` rows go from shard i to shard j (transposed for
    the combine, ``is_dispatch=False``). Replicated batch: a 1-D [num_expert_parallelism] count per shard; every
    shard sends its own chunk from offset 0. ``ragged_buffer_factor > 0`` truncates what each receiver gets to
    ``buffer_size`` rows (offsets in the unpacked buffer stay untruncated)."""
    counts = all_shards_group_sizes
    truncate = ragged_buffer_factor > 0.0
    if truncate and (buffer_size is None or counts.ndim != 2):
        raise ValueError("ragged_buffer_factor > 0 needs buffer_size and a batch-sharded [shards, shards] "
                         f"all_shards_group_sizes; got buffer_size={buffer_size}, shape {tuple(counts.shape)}")
    kept = _truncate_per_receiver(counts, buffer_size) if truncate else counts
    flip = (lambda a: a) if is_dispatch else (lambda a: a.T if a.ndim == 2 else a)
    packed, unpacked = flip(kept), flip(counts)
    # the unpacked side (sender's buffer on dispatch, receiver's on combine) keeps its untruncated offsets
    in_src, out_src = (unpacked, packed) if is_dispatch else (packed, unpacked)
    if is_batch_sharded:
        return (_exclusive_cumsum(in_src[shard_id]), packed[shard_id], _exclusive_cumsum(out_src)[shard_id],
                packed[:, shard_id])
    ep = num_expert_parallelism
    return (jnp.zeros(ep, counts.dtype), jnp.repeat(packed[shard_id], ep),
            jnp.repeat(_exclusive_cumsum(out_src)[shard_id], ep), packed)


def get_ragged_buffer_size(local_batch, ep_degree, global_experts, top_k, ragged_buffer_factor):
    """Rows of the receive buffer of the ragged all-to-all (a Python int, computed on the host from static sizes).

    ``ragged_buffer_factor > 0``: ``int(local_batch * ragged_buffer_factor)``, which drops rows past it under
    imbalance (``local_permute`` / ``get_all_to_all_params`` truncate the counts to it). Otherwise the worst case,
    ``int(local_batch * min(ep_degree, global_experts / top_k))``: every copy of an EP group's tokens lands on one
    shard, which holds at most ``global_experts / ep_degree`` of each token's ``top_k`` experts."""
    for name, value, least in (("local_batch", local_batch, 0), ("ep_degree", ep_degree, 1),
                               ("global_experts", global_experts, 1), ("top_k", top_k, 1)):
        if not validation.is_static_int(value) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if ragged_buffer_factor > 0.0:
        return int(local_batch * ragged_buffer_factor)
    return int(local_batch * min(ep_degree, global_experts / top_k))


_GATED = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}   # flax.linen names -> GatedActivation


def ffn_activation(decoder_block="default", mlp_activations=("silu", "linear"), mlp_activations_limit=-1.0):
    """``RoutedMoE.apply_ffn_activation`` of these config fields as a ``moe_ops.GatedActivation``.

    ``gpt_oss``: ``min(g, L) * sigmoid(1.702 * min(g, L)) * (clip(u, -L, L) + 1)`` with ``mlp_activations[0] ==
    "sigmoid"``; ``deepseek`` / ``deepseek4`` with a limit > 0: the clamped ``act(min(g, L)) * clip(u, -L, L)``;
    otherwise ``act(g) * u``. Activations the kernels do not have raise ``NotImplementedError``."""
    block = getattr(decoder_block, "value", decoder_block)   # MaxText's DecoderBlockType enum or its string
    block = str(block).lower()
    name = mlp_activations[0]
    limit = float(mlp_activations_limit)
    if block == "gpt_oss":
        if name != "sigmoid" or limit <= 0:
            raise NotImplementedError(f"decoder_block gpt_oss runs g * {name}(1.702 g) * (u + 1) clipped at "
                                      f"mlp_activations_limit={limit}: only 'sigmoid' with a limit > 0 (gpt-oss's) "
                                      "is a moe_ops.GatedActivation")
        return moe_ops.GatedActivation("silu", alpha=1.702, limit=limit, up_offset=1.0)
    if name not in _GATED:
        raise NotImplementedError(f"mlp_activations[0]={name!r}: the gated kernels run {sorted(_GATED)}")
    clamped = block in ("deepseek", "deepseek4") and limit > 0
    return moe_ops.GatedActivation(_GATED[name], limit=limit if clamped else None)
