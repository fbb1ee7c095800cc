"""Pure-``jnp`` twins of every public op: the numerical ground truth.

Nothing here is fast; everything here is obviously right. Kernels are tested against these functions, and these
functions are tested against an independent numpy formulation (``tests/test_reference.py``).

Row/group conventions shared by all ops (``G`` groups, ``M`` rows, ``group_sizes[G]`` int32):

1. Group ``g`` owns rows ``[start[g], start[g] + group_sizes[g])`` with ``start = cumsum(group_sizes) - group_sizes``.
2. Rows at or beyond ``sum(group_sizes)`` belong to no group: ``gmm`` writes zeros there, ``tgmm`` ignores them.
3. With ``group_offset`` (expert sharding), only groups ``[group_offset, group_offset + G_local)`` are local; rows of
   other groups behave like rows beyond the sum (zero output, zero contribution, zero gradient). An offset outside
   ``[0, G)`` makes no group local.
4. Values that do not contribute never meet a zero factor: rows outside local groups (and experts no row uses) are
   selected away with ``jnp.where`` before any product, so a NaN / Inf / overflowing value there reaches no output
   and, under ``jax.grad``, no gradient (the contract of every backend, ``tests/test_nonfinite.py``). ``unpermute``
   has no such rows (every slot contributes ``weights * row``, so there ``inf * 0`` is NaN, as in the dense math).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels.activation import resolve as resolve_activation
from moe_ops import vma

__all__ = [
    "row_group_ids", "gmm", "tgmm", "route", "sort_by_expert", "inverse_permutation", "permute", "unpermute",
    "moe_ffn", "moe_ffn_dense", "layer_route", "activate", "activation_grad", "activation_parts", "swiglu_down_bwd",
    "swiglu_down_epilogue", "flatten_tokens", "local_row_ids",
]


def row_group_ids(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """Group id of each of ``num_rows`` rows; rows at or beyond ``sum(group_sizes)`` get ``G``."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right").astype(jnp.int32)


def local_row_ids(group_sizes, num_rows, group_offset, num_local):
    """Local group id per row in ``[0, num_local)``, or ``-1`` for rows of non-local groups / beyond the sum."""
    offset = jnp.int32(0) if group_offset is None else jnp.asarray(group_offset).reshape(())
    num_groups = group_sizes.shape[0]
    offset = jnp.where((offset >= 0) & (offset < num_groups), offset, num_groups).astype(jnp.int32)  # else no local
    group = row_group_ids(group_sizes, num_rows)
    local = group - offset
    return jnp.where((local >= 0) & (local < num_local) & (group < group_sizes.shape[0]), local, -1)


def gmm(lhs, rhs, group_sizes, *, group_offset=None, transpose_rhs=False, preferred_element_type=None,
        existing_out=None):
    """``out[rows of g] = lhs[rows of g] @ rhs[g - group_offset]``: lhs [M,K], rhs [G_local,K,N] (or [G_local,N,K]
    with ``transpose_rhs``) -> [M,N]; rows outside local groups are zero (or ``existing_out``'s rows). f32
    accumulation."""
    out_dtype = preferred_element_type or lhs.dtype
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    local = local_row_ids(group_sizes, lhs.shape[0], group_offset, rhs.shape[0])

    def one_group(acc, g):
        rows = (local == g)[:, None]  # other rows are selected away before the dot: no NaN of theirs reaches a gradient
        prod = jnp.dot(jnp.where(rows, lhs, 0), rhs[g], preferred_element_type=jnp.float32, precision="highest")
        return jnp.where(rows, prod, acc), None

    # the carry starts typed like the operands: inside a shard_map (check_vma) a varying lhs makes every step varying
    acc = vma.like_all(jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32), (lhs, rhs, local))
    acc, _ = jax.lax.scan(one_group, acc, jnp.arange(rhs.shape[0], dtype=jnp.int32))
    if existing_out is not None:
        acc = jnp.where((local >= 0)[:, None], acc, existing_out.astype(jnp.float32))
    return acc.astype(out_dtype)


def tgmm(lhs, rhs, group_sizes, *, group_offset=None, num_groups=None, preferred_element_type=None):
    """``out[g] = lhs[rows of g].T @ rhs[rows of g]``: lhs [M,K], rhs [M,N] -> [G_local,K,N]; empty groups are zero.

    ``num_groups`` (static) is ``G_local``; it defaults to ``len(group_sizes)``."""
    out_dtype = preferred_element_type or lhs.dtype
    num_local = group_sizes.shape[0] if num_groups is None else num_groups
    local = local_row_ids(group_sizes, lhs.shape[0], group_offset, num_local)

    def one_group(_, g):  # rows of other groups are selected away (a one-hot product would give 0 * NaN = NaN)
        rows = (local == g)[:, None]
        a, b = (jnp.where(rows, v, 0).astype(jnp.float32) for v in (lhs, rhs))
        return None, jnp.dot(a.T, b, precision="highest")

    _, out = jax.lax.scan(one_group, None, jnp.arange(num_local))
    return out.reshape(num_local, lhs.shape[1], rhs.shape[1]).astype(out_dtype)


GROUP_SCORES = ("max", "top2_sum")


def check_group_score(group_score, num_groups):
    """``group_score`` (a name of ``GROUP_SCORES``) as a str; other than the default it needs ``num_groups``."""
    if not isinstance(group_score, str) or group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {list(GROUP_SCORES)}, got {group_score!r}")
    if group_score != "top2_sum" and num_groups is None:
        raise ValueError(f"group_score={group_score!r} needs group-limited routing (num_groups and top_groups), "
                         f"got num_groups=None")
    return str(group_score)


def route(logits, top_k, *, score_fn="softmax", bias=None, renormalize=True, num_groups=None, top_groups=None,
          group_score="top2_sum", scale=1.0):
    """Top-k routing: logits [T,E] -> (weights [T,k] f32, expert_ids [T,k] int32).

    Without ``bias`` the k largest *logits* are selected (both score functions are monotone, so this is the top-k of
    the scores, without the ties that rounding them makes; equal logits: the lowest index, as ``lax.top_k``).
    ``bias`` [E] (DeepSeek-style load balancing) is added to the scores to select and does not enter the weights.
    With ``renormalize`` the k weights of a token sum to one: computed as a softmax over the k selected logits
    (``softmax``) or their log-sigmoids (``sigmoid``), which equals scores / their sum without its underflow (0 / 0
    for very negative sigmoid logits); without it they are the selected scores.

    Group-limited routing (DeepSeek-V3's ``n_group`` / ``topk_group``, MaxText's ``n_routing_groups`` /
    ``topk_routing_group``): ``num_groups`` splits the experts into contiguous groups of ``E / num_groups``; a
    group's score (``group_score="top2_sum"``) is the sum of its two largest selection scores (scores + ``bias``), or
    its one score for groups of one expert; the ``top_groups`` best groups are kept (equal group scores: the lowest
    group index) and the k experts are selected among theirs. Without ``bias`` the group scores are compared in log
    space, ``logaddexp`` of the two largest log-scores (the logits themselves for ``softmax``, whose normaliser is
    common to every group; log-sigmoids for ``sigmoid``): the same order as the sums, without the ties of scores that
    underflow. ``group_score="max"`` (DeepSeek-V2's ``group_limited_greedy``; DeepSeek-V3's own code without a bias)
    scores a group by its largest selection score (without ``bias``: its largest logit, the same order). ``scale``
    (DeepSeek's ``routed_scaling_factor``) multiplies the final weights, after renormalising. The selection has no
    gradient; the weights' gradient reaches the logits only."""
    logits = logits.astype(jnp.float32)
    if score_fn == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    elif score_fn == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
    group_score = check_group_score(group_score, num_groups)
    selection = jax.lax.stop_gradient(logits if bias is None else scores + bias.astype(jnp.float32)[None, :])
    if num_groups is not None:
        log_space = None if bias is not None else (lambda s: s) if score_fn == "softmax" else jax.nn.log_sigmoid
        selection = top_groups_only(selection, num_groups, top_groups, log_space, group_score)
    _, expert_ids = jax.lax.top_k(selection, top_k)
    if renormalize:
        picked = jnp.take_along_axis(logits, expert_ids, axis=-1)
        weights = jax.nn.softmax(picked if score_fn == "softmax" else jax.nn.log_sigmoid(picked), axis=-1)
    else:
        weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if scale != 1.0:
        weights = weights * jnp.float32(scale)
    return weights, expert_ids.astype(jnp.int32)


def top_groups_only(selection, num_groups, top_groups, log_space, group_score="top2_sum"):
    """``selection`` [T,E] with the experts outside each token's ``top_groups`` best groups set to -inf. Group score
    ``top2_sum``: sum of the group's two largest values (its one value for one-expert groups); with ``log_space`` (a
    monotone map of the values to log-scores) ``logaddexp`` of the two largest mapped values instead. ``max``: the
    group's largest value."""
    t, e = selection.shape
    grouped = selection.reshape(t, num_groups, e // num_groups)
    if group_score == "max":  # max commutes with the increasing log_space: the values rank as their log-scores (and
        best = jax.lax.top_k(grouped, 1)[0]  # scores) do, without the ties of rounded / underflowed scores
    else:
        best = jax.lax.top_k(grouped if log_space is None else log_space(grouped), min(2, e // num_groups))[0]
    if best.shape[-1] == 1:
        group_scores = best[..., 0]
    elif log_space is None:
        group_scores = best[..., 0] + best[..., 1]
    else:
        group_scores = jnp.logaddexp(best[..., 0], best[..., 1])
    _, kept = jax.lax.top_k(group_scores, top_groups)                                       # [T, top_groups]
    keep = jnp.any(kept[:, :, None] == jnp.arange(num_groups, dtype=kept.dtype)[None, None, :], axis=1)  # [T, groups]
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)


def sort_by_expert(expert_ids, num_experts):
    """expert_ids [T,k] -> (group_sizes [E] int32, sort_idx [T*k] int32): a stable sort of the flat ids. Ids
    outside ``[0, E)`` sort after every valid row and are counted in no group (so a following ``gmm`` gives them
    zeros)."""
    flat = expert_ids.reshape(-1)  # range test in the ids' own dtype: a wide id must not wrap onto a valid one
    key = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts).astype(jnp.int32)
    sort_idx = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts]
    return group_sizes, sort_idx


def inverse_permutation(sort_idx):
    """``inverse[sort_idx[i]] = i`` (a permutation write: unique indices, no scatter-add)."""
    return jnp.zeros_like(sort_idx).at[sort_idx].set(jnp.arange(sort_idx.shape[0], dtype=sort_idx.dtype),
                                                     unique_indices=True)


def permute(x, expert_ids, num_experts):
    """Sort token copies into expert order: x [T,D], expert_ids [T,k] ->
    (x_sorted [T*k,D], group_sizes [E] int32, sort_idx [T*k] int32) with ``x_sorted[i] = x[sort_idx[i] // k]``,
    stable in flat index ``t*k + j`` within an expert (dropped ids as in ``sort_by_expert``)."""
    group_sizes, sort_idx = sort_by_expert(expert_ids, num_experts)
    return x[sort_idx // expert_ids.shape[1]], group_sizes, sort_idx


def unpermute(y_sorted, sort_idx, weights):
    """Weighted top-k combine: y_sorted [T*k,D], sort_idx [T*k], weights [T,k] -> [T,D],
    ``out[t] = sum_j weights[t,j] * y_sorted[inverse[t*k+j]]`` accumulated in f32, returned in y's dtype."""
    t, k = weights.shape
    gathered = y_sorted[inverse_permutation(sort_idx)].astype(jnp.float32).reshape(t, k, y_sorted.shape[-1])
    out = jnp.einsum("tkd,tk->td", gathered, weights.astype(jnp.float32), precision="highest")
    return out.astype(y_sorted.dtype)


def flatten_tokens(a):
    """[..., D] -> [T, D] with ``T = prod(leading dims)`` (also for T = 0 or D = 0, where ``reshape(-1, D)`` fails)."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def _clamped(gate, up, spec):
    """f32 (g, u) after ``spec``'s clamps: ``jnp.where`` on ``>=`` / ``<=``, so the gradient is zero at and beyond a
    bound, and NaN passes through."""
    g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
    if spec.limit is not None:
        lim = spec.limit
        g = jnp.where(g >= lim, lim, g)
        u = jnp.where(u >= lim, lim, jnp.where(u <= -lim, -lim, u))
    return g, u


def activate(gate, up, activation="silu"):
    """Gated activation of the SwiGLU family, in f32: ``act(gate) * up`` for a name (silu / gelu / relu), and
    ``act(min(gate, limit)) * (clip(up, -limit, limit) + up_offset)`` with silu's ``g * sigmoid(alpha * g)`` for a
    ``GatedActivation`` (``kernels.activation``)."""
    spec = resolve_activation(activation)
    g, u = _clamped(gate, up, spec)
    if spec.name == "silu":
        act = jax.nn.silu(g) if spec.alpha == 1.0 else g * jax.nn.sigmoid(spec.alpha * g)
    else:
        act = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}[spec.name](g)
    return act * (u + spec.up_offset if spec.up_offset else u)


def activation_grad(gate, activation="silu"):
    """``(act(g), d act(g) / d gate)`` in f32 for the clamped ``g`` (``activate``'s gate half), the derivative
    written out (what kernel epilogues compute); gelu is ``jax.nn.gelu``'s tanh form."""
    spec = resolve_activation(activation)
    g, _ = _clamped(gate, jnp.zeros((), jnp.float32), spec)
    if spec.name == "silu":
        s = jax.nn.sigmoid(spec.alpha * g)
        act, dact = g * s, s * (1.0 + spec.alpha * g * (1.0 - s))
    elif spec.name == "gelu":
        c, a = math.sqrt(2.0 / math.pi), 0.044715
        th = jnp.tanh(c * (g + a * g ** 3))
        act, dact = 0.5 * g * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * c * (1.0 + 3.0 * a * g * g)
    else:
        act, dact = jnp.maximum(g, 0.0), (g > 0).astype(jnp.float32)
    if spec.limit is not None:
        dact = jnp.where(g >= spec.limit, 0.0, dact)
    return act, dact


def activation_parts(gate, up, activation="silu"):
    """``(a, da, u, du)`` f32 with ``h = a * u``, ``dh/dgate = da * u`` and ``dh/dup = a * du`` (``activate``
    written out: ``u`` is the clamped, offset up and ``du`` its clamp's 0 / 1 mask). The clamps are idempotent:
    clamped projections give the same parts as raw ones."""
    spec = resolve_activation(activation)
    a, da = activation_grad(gate, spec)
    _, u = _clamped(jnp.zeros((), jnp.float32), up, spec)
    lim = spec.limit
    du = jnp.ones_like(u) if lim is None else jnp.where((u >= lim) | (u <= -lim), 0.0, 1.0)
    return a, da, u + spec.up_offset if spec.up_offset else u, du


def swiglu_down_bwd(x, dout, w_gate, w_up, w_down, group_sizes, sort_idx, w_sorted, top_k, *, group_offset=None,
                    activation="silu", b_gate=None, b_up=None):
    """Backward of ``h = act(x_i @ w_gate[g]) * (x_i @ w_up[g])`` followed by the weighted down projection
    ``out[t] += w_sorted[i] * (h_i @ w_down[g])`` (``x_i = x[sort_idx[i] // top_k]``, the row's token ``t``), up to
    the row level: x / dout [T,D] in token order, w_gate / w_up [G_local,D,F], w_down [G_local,F,D], sort_idx [M],
    w_sorted [M] (routing weight of sorted row i) -> (dgate, dup, hw [M,F] in x's dtype, dweights_sorted [M] f32):

    ``a_i = dout[t] @ w_down[g]^T`` (f32), ``dh_i = w_sorted[i] * a_i``, ``dgate_i = dh_i * up_i * act'(gate_i)``,
    ``dup_i = dh_i * act(gate_i)``, ``h_i = act(gate_i) * up_i``, ``hw_i = w_sorted[i] * h_i`` (the lhs of
    ``dw_down = tgmm(hw, dout[token])``: the routing weight applied once here, not to every dout row in the TGMM),
    ``dweights_sorted[i] = <h_i, a_i>`` (all f32 from f32 ``gate`` / ``up`` / ``a``; a clamped / offset
    ``GatedActivation`` uses ``activation_parts``). Rows of non-local groups and rows beyond ``sum(group_sizes)`` are
    zero. ``b_gate`` / ``b_up`` [G_local,F] (optional): per-group biases added to ``gate`` / ``up``."""
    rows = x[sort_idx // top_k]
    kw = dict(group_offset=group_offset, preferred_element_type=jnp.float32)
    gate, up = gmm(rows, w_gate, group_sizes, **kw), gmm(rows, w_up, group_sizes, **kw)
    a = gmm(dout[sort_idx // top_k], w_down, group_sizes, transpose_rhs=True, **kw)
    ids = local_row_ids(group_sizes, sort_idx.shape[0], group_offset, w_gate.shape[0])
    rows = ids >= 0

    def biased(p, b):
        return p if b is None else p + jnp.where(rows[:, None], b.astype(jnp.float32)[jnp.maximum(ids, 0)], 0.0)
    gate, up = biased(gate, b_gate), biased(up, b_up)
    return swiglu_down_epilogue(a, gate, up, w_sorted, activation, x.dtype, rows=rows)


def swiglu_down_epilogue(a, gate, up, w_sorted, activation, dtype, rows=None):
    """The row-wise end of ``swiglu_down_bwd`` from f32 ``a`` / ``gate`` / ``up`` [M,F] and ``w_sorted`` [M] ->
    (dgate, dup, hw = w_sorted * h in ``dtype``, ``<h_i, a_i>`` f32). ``rows`` [M] bool (None: all) marks the rows
    of local groups; elsewhere ``a`` / ``gate`` / ``up`` are zero and the weight is selected away, so those rows
    come out as exact zeros even for an Inf / NaN weight (never ``0 * inf``)."""
    act, dact, u, du = activation_parts(gate, up, activation)
    w = w_sorted.astype(jnp.float32)[:, None]
    if rows is not None:
        w = jnp.where(rows[:, None], w, 0.0)
    dh, h = a * w, act * u
    return (dh * u * dact).astype(dtype), (dh * act * du).astype(dtype), (h * w).astype(dtype), jnp.sum(h * a, axis=1)


def layer_route(router_logits, top_k, score_fn="softmax", router_bias=None, renormalize=True, num_groups=None,
                top_groups=None, routed_scale=1.0, group_score="top2_sum"):
    """``route`` of router_logits [..., E] flattened to [T, E], with ``moe_ffn``'s names for the routing options."""
    return route(flatten_tokens(router_logits), top_k, score_fn=score_fn, bias=router_bias, renormalize=renormalize,
                 num_groups=num_groups, top_groups=top_groups, group_score=group_score, scale=routed_scale)


def moe_ffn(x, router_logits, w_gate, w_up, w_down, *, top_k, activation="silu", score_fn="softmax", b_gate=None,
            b_up=None, b_down=None, **routing):
    """Routed SwiGLU experts through route -> permute -> gmm -> unpermute, all reference twins. ``routing``: the
    routing options of ``moe_ffn_dense``; ``b_gate`` / ``b_up`` [E,F], ``b_down`` [E,D]: per-expert biases of the
    three projections (``moe_ops.expert_bias``)."""
    shape = x.shape
    x2 = flatten_tokens(x)
    weights, ids = layer_route(router_logits, top_k, score_fn, **routing)
    xs, sizes, sort_idx = permute(x2, ids, w_gate.shape[0])
    group = row_group_ids(sizes, xs.shape[0])     # every row has a group here (sum(sizes) = T*k)

    def biased(y, b):
        return y if b is None else y + b.astype(y.dtype)[group]
    h = activate(biased(gmm(xs, w_gate, sizes), b_gate), biased(gmm(xs, w_up, sizes), b_up), activation)
    y = biased(gmm(h.astype(x.dtype), w_down, sizes), b_down)
    return unpermute(y, sort_idx, weights).reshape(shape)


def moe_ffn_dense(x, router_logits, w_gate, w_up, w_down, *, top_k, activation="silu", score_fn="softmax",
                  router_bias=None, renormalize=True, num_groups=None, top_groups=None, group_score="top2_sum",
                  routed_scale=1.0, b_gate=None, b_up=None, b_down=None):
    """The einsum formulation: every token through every expert, combined by a one-hot [T,E] mask.

    O(T·E·D·F) work: the ground truth for small shapes, never a fast path. The (token, expert) pairs that routing
    did not pick are selected away (``jnp.where`` on the inputs and outputs of each product, not a multiply by the
    zero combine weight), so an expert no token picks contributes nothing even when its weights are NaN / Inf, in
    the forward and under ``jax.grad`` (its weights get zero gradient). Routing options as ``route``'s:
    ``router_bias`` is its ``bias``, ``routed_scale`` its ``scale``. ``b_gate`` / ``b_up`` [E,F], ``b_down`` [E,D]:
    per-expert biases added to the three projections (``moe_ops.expert_bias``)."""
    shape = x.shape
    x2 = flatten_tokens(x).astype(jnp.float32)
    weights, ids = layer_route(router_logits, top_k, score_fn, router_bias, renormalize, num_groups, top_groups,
                               routed_scale, group_score)
    onehot = jax.nn.one_hot(ids, w_gate.shape[0], dtype=jnp.float32)                  # [T, k, E]
    combine = jnp.einsum("tk,tke->te", weights, onehot)
    picked = (jnp.sum(onehot, axis=1) > 0)[..., None]                                   # [T, E, 1]
    f32 = lambda w: w.astype(jnp.float32)
    xe = jnp.where(picked, x2[:, None, :], 0.0)                                         # [T, E, D]
    bias = lambda b: 0.0 if b is None else f32(b)[None]                                # [1, E, N]
    gate = jnp.where(picked, jnp.einsum("ted,edf->tef", xe, f32(w_gate), precision="highest") + bias(b_gate), 0.0)
    up = jnp.where(picked, jnp.einsum("ted,edf->tef", xe, f32(w_up), precision="highest") + bias(b_up), 0.0)
    y = jnp.where(picked, jnp.einsum("tef,efd->ted", activate(gate, up, activation), f32(w_down),
                                     precision="highest") + bias(b_down), 0.0)
    return jnp.einsum("ted,te->td", y, combine, precision="highest").astype(x.dtype).reshape(shape)
