"""DeepSeek / Qwen / Mixtral routing options: ``route(bias=, renormalize=, num_groups=, top_groups=, group_score=,
scale=)`` against an independent float64 NumPy routing, and ``moe_ffn(router_bias=, renormalize=, num_groups=,
top_groups=, group_score=, routed_scale=)`` against the dense reference on every backend (fused and unfused), in the
partitioned op (all_to_all / ring / ep_tp, Shardy and GSPMD, vmap) and in ``moe_ffn_shard``; and default calls
computing what they computed before the options existed. Errors naming each bad option:
``tests/test_routing_option_errors.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import moe_ops
from moe_ops import reference as R
from moe_ops.sharding import MoEShardingConfig
from tests.helpers import SHAPES, TOL, assert_close, case_seed, keys, layer_inputs, partitioner, randn

GRAD_NAMES = ("x", "router_logits", "w_gate", "w_up", "w_down")


# ---- route against NumPy ---------------------------------------------------------------------------------------
def np_route(logits, k, score_fn, bias, renormalize, groups, scale):
    """DeepSeek-V3 / MaxText routing in float64, written from their definition -> (weights, ids, margin): margin is
    the smallest gap at a decision (k-th vs next expert, kept vs next group), so near-ties can be avoided. ``groups``:
    (num_groups, top_groups), a group scored by its top-2 sum, or (num_groups, top_groups, "max"), by its maximum
    (DeepSeek-V2's group_limited_greedy)."""
    lg = np.asarray(logits, np.float64)
    if score_fn == "softmax":
        scores = np.exp(lg - lg.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-lg))
    sel = scores + (0.0 if bias is None else np.asarray(bias, np.float64))
    margin = np.inf
    if groups is not None:
        num_groups, top_groups, *how = groups
        grouped = sel.reshape(len(sel), num_groups, -1)
        top2 = -np.sort(-grouped, axis=2)[:, :, :2]
        group_scores = grouped.max(2) if how == ["max"] else top2.sum(2)
        order = np.argsort(-group_scores, axis=1, kind="stable")
        ranked = np.take_along_axis(group_scores, order, 1)
        if top_groups < num_groups:
            margin = min(margin, (ranked[:, top_groups - 1] - ranked[:, top_groups]).min())
        keep = np.zeros(grouped.shape[:2], bool)
        np.put_along_axis(keep, order[:, :top_groups], True, 1)
        sel = np.where(keep[:, :, None], grouped, -np.inf).reshape(sel.shape)
    ids = np.argsort(-sel, axis=1, kind="stable")
    ranked = np.take_along_axis(sel, ids, 1)
    gaps = ranked[:, :k] - ranked[:, 1:k + 1]  # every decision in the ordered top-k, and the k-th vs the next
    margin = min(margin, gaps.min())
    ids = ids[:, :k]
    weights = np.take_along_axis(scores, ids, 1)
    if renormalize:
        weights = weights / weights.sum(1, keepdims=True)
    return weights * scale, ids, margin


def untied_logits(seed, shape, check, min_margin=1e-4):
    """Random logits whose routing decisions (``check(logits) -> margin``) are at least ``min_margin`` apart."""
    for attempt in range(100):
        logits = np.asarray(randn(keys(seed + attempt, 1)[0], shape, scale=2.0))
        if check(logits) > min_margin:
            return logits
    raise AssertionError("no untied logits found")


GROUPS = {"none": None, "4x2": (4, 2), "8x3": (8, 3), "4x1_all_of_one": (4, 1), "16x5_one_expert": (16, 5),
          "4x2_max": (4, 2, "max"), "8x3_max": (8, 3, "max")}


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("biased", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_route_matches_numpy(score_fn, biased, groups):
    t, e, k = 16, 16, 4
    bias = np.asarray(randn(keys(7, 1)[0], (e,), scale=0.3)) if biased else None
    logits = untied_logits(case_seed(score_fn, biased, groups), (t, e),
                           lambda lg: np_route(lg, k, score_fn, bias, True, GROUPS[groups], 1.0)[2])
    for renormalize, scale in ((True, 1.0), (False, 1.0), (True, 2.5), (False, 16.0)):
        args = (k, score_fn, bias, renormalize, GROUPS[groups], scale)
        want_w, want_ids, _ = np_route(logits, *args)
        kw = dict(score_fn=score_fn, renormalize=renormalize, scale=scale, bias=None if bias is None else
                  jnp.asarray(bias, jnp.float32))
        if GROUPS[groups] is not None:
            kw.update(zip(("num_groups", "top_groups", "group_score"), GROUPS[groups]))
        weights, ids = moe_ops.route(jnp.asarray(logits, jnp.float32), k, **kw)
        np.testing.assert_array_equal(ids, want_ids, err_msg=str(kw))
        np.testing.assert_allclose(weights, want_w, rtol=2e-6, err_msg=str(kw))
    if groups.endswith("_max"):  # these logits tell the group scores apart: "top2_sum" picks other experts
        assert (np_route(logits, k, score_fn, bias, True, GROUPS[groups][:2], 1.0)[1] != want_ids).any()


@pytest.mark.parametrize("score_fn,logits,top_groups,want", [
    # group 0 has the larger top-2 sum, group 1 the larger maximum
    ("softmax", [[0.0, -0.1, 0.5, -10.0]], 1, {"top2_sum": [0], "max": [2]}),
    ("sigmoid", [[0.0, -0.1, 0.5, -10.0]], 1, {"top2_sum": [0], "max": [2]}),
    # maxima whose f32 scores underflow to 0 (a tie that would keep the lowest group) still rank by their logits
    ("sigmoid", [[-300.0, -301.0, -200.0, -250.0]], 1, {"max": [2]}),
    ("softmax", [[0.0, -500.0, -300.0, -301.0, -200.0, -201.0]], 2, {"max": [0, 4]}),
])
def test_max_group_score(score_fn, logits, top_groups, want):
    logits = jnp.asarray(logits, jnp.float32)
    for group_score, ids in want.items():
        got = moe_ops.route(logits, len(ids), score_fn=score_fn, num_groups=logits.shape[1] // 2,
                            top_groups=top_groups, group_score=group_score)[1]
        np.testing.assert_array_equal(got[0], ids, err_msg=group_score)


@pytest.mark.parametrize("score_fn,logits,want", [
    # sigmoid: both groups' scores underflow to 0 in f32; the second group's logits are larger
    ("sigmoid", [[-300.0, -301.0, -200.0, -201.0]], [2]),
    # softmax: groups 1 and 2 both sum to 0 in f32 after the max-subtraction; group 2 is the better one
    ("softmax", [[0.0, -500.0, -300.0, -301.0, -200.0, -201.0]], [0, 4]),
    # the sum of the scores decides, not their product: sigmoid 0.9 + 0.9 < 0.999 + 0.805; softmax e^-1 + e^-1 <
    # e^0 + e^-10
    ("sigmoid", [[2.1972246, 2.1972246, 6.9067547, 1.4178]], [2]),
    ("softmax", [[-1.0, -1.0, 0.0, -10.0]], [2]),
    # exactly equal group scores: the lowest group index, then the lowest expert index (as lax.top_k)
    ("softmax", [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], [0, 1]),
])
def test_group_scores_are_the_sums_without_underflow_ties(score_fn, logits, want):
    """Without a bias the group scores are compared in log space; the order must be that of the score sums."""
    logits = jnp.asarray(logits, jnp.float32)
    e, k = logits.shape[1], len(want)
    _, ids = moe_ops.route(logits, k, score_fn=score_fn, num_groups=e // 2, top_groups=len(want))
    np.testing.assert_array_equal(ids[0], want)


def test_bias_and_groups_only_select_and_get_zero_gradients():
    """The weights' gradient reaches the logits only (through the selected scores); the bias gets zeros."""
    logits, bias = randn(keys(3, 1)[0], (8, 8)), randn(keys(4, 1)[0], (8,), scale=0.3)
    kw = dict(score_fn="sigmoid", num_groups=4, top_groups=2, scale=2.5)
    dl, db = jax.grad(lambda lg, b: jnp.sum(moe_ops.route(lg, 3, bias=b, **kw)[0] ** 2), argnums=(0, 1))(logits, bias)
    assert not np.any(np.asarray(db)) and np.any(np.asarray(dl))


# ---- moe_ffn against the dense reference -------------------------------------------------------------------------
# E=6 (xla) / 4 (triton, pallas): groups that really restrict the selection
OPTIONS = {
    "deepseek_v3": lambda e: dict(score_fn="sigmoid", bias=True, num_groups=e // 2, top_groups=1, routed_scale=2.5),
    "v2_no_renorm": lambda e: dict(score_fn="softmax", renormalize=False, num_groups=2, top_groups=1,
                                   routed_scale=16.0),
    "v2_group_max": lambda e: dict(score_fn="softmax", renormalize=False, num_groups=e // 2, top_groups=1,
                                   group_score="max", routed_scale=16.0),  # DeepSeek-V2's group_limited_greedy
}


def layer_case(impl, option, dtype=jnp.float32, seed=0):
    """Inputs and moe_ffn keywords (router_bias an operand: the last argument) of one case."""
    x, logits, ws = layer_inputs(SHAPES[impl], "balanced", seed=seed, dtype=dtype)
    e = logits.shape[-1]
    opts = OPTIONS[option](e)
    bias = randn(keys(seed + 1, 1)[0], (e,), scale=0.3) if opts.pop("bias", False) else None
    return (x, logits, *ws), bias, opts, randn(keys(seed + 2, 1)[0], x.shape)


def assert_max_differs(logits, top_k, bias, opts):
    """On these logits group_score="max" routes other experts than "top2_sum" (so a dropped option shows)."""
    ids = [R.layer_route(logits, top_k, router_bias=bias, **dict(opts, group_score=g))[1] for g in ("max", "top2_sum")]
    assert np.any(np.asarray(ids[0]) != np.asarray(ids[1])), "group_score='max' must change the routing"


def value_and_grads(fn, args, bias, cot):
    """fn's output and the gradients of <fn, cot> w.r.t. the five layer operands and router_bias."""
    def total(*a):
        return jnp.sum(fn(*a[:5], a[5]).astype(jnp.float32) * cot)
    grads = jax.grad(total, argnums=tuple(range(6 if bias is not None else 5)))(*args, bias)
    return fn(*args, bias), grads


def dense(opts, top_k=2):
    return lambda *a: R.moe_ffn_dense(*a[:5], top_k=top_k, router_bias=a[5], **opts)


def check_layer(fn, args, bias, opts, cot, tol, what, top_k=2):
    """fn's value and six gradients vs the dense reference; the options really change the routing."""
    out, grads = value_and_grads(fn, args, bias, cot)
    ref_out, ref_grads = value_and_grads(dense(opts, top_k), args, bias, cot)
    _, default_ids = R.layer_route(args[1], top_k, opts["score_fn"])
    _, ids = R.layer_route(args[1], top_k, router_bias=bias, **opts)
    assert np.mean(np.asarray(ids) != np.asarray(default_ids)) > 0.2, "the options must change the routing"
    if opts.get("group_score") == "max":
        assert_max_differs(args[1], top_k, bias, opts)
    assert_close(out, ref_out, tol, f"{what} forward")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, tol, f"{what} d{name}")
    if bias is not None:
        assert grads[5].shape == bias.shape and not np.any(np.asarray(grads[5])), f"{what} drouter_bias"


# (impl, fused, option): the routing runs before any backend, so the interpreted backends take one routing on their
# default (fused) path; every backend's fused / unfused paths are checked against the dense layer elsewhere
LAYER_CASES = [(impl, fused, option) for impl, fused in (("xla", False), ("xla", True))
               for option in ("deepseek_v3", "v2_no_renorm")] + [
    ("triton", None, "deepseek_v3"), ("pallas", None, "deepseek_v3"), ("xla", False, "v2_group_max")]


@pytest.mark.parametrize("impl,fused,option", LAYER_CASES)
def test_moe_ffn_matches_dense_f32(impl, fused, option):
    args, bias, opts, cot = layer_case(impl, option)
    fn = jax.jit(lambda *a: moe_ops.moe_ffn(*a[:5], top_k=2, router_bias=a[5], implementation=impl, fused=fused,
                                            **opts))
    check_layer(fn, args, bias, opts, cot, TOL[jnp.float32], f"{impl} fused={fused} {option}")


def test_unfused_layer_forward_mode_with_the_options():
    """jax.jvp of ``moe_ffn(fused=False)`` (README: forward mode on the unfused layer) through the grouped routing."""
    args, bias, opts, cot = layer_case("xla", "deepseek_v3", seed=9)
    fn = lambda lg: moe_ops.moe_ffn(args[0], lg, *args[2:], top_k=2, router_bias=bias, fused=False,  # noqa: E731
                                    implementation="xla", **opts)
    got, want = (jax.jvp(f, (args[1],), (cot[..., :args[1].shape[-1]],)) for f in
                 (fn, lambda lg: dense(opts)(args[0], lg, *args[2:], bias)))
    for g, w, what in zip(got, want, ("value", "tangent")):
        assert_close(g, w, TOL[jnp.float32], what)


@pytest.mark.parametrize("impl", ["xla"])  # bf16 activations; the routing itself runs in f32 on every backend
def test_moe_ffn_matches_dense_bf16(impl):
    args, bias, opts, cot = layer_case(impl, "deepseek_v3", dtype=jnp.bfloat16, seed=5)
    fn = jax.jit(lambda *a: moe_ops.moe_ffn(*a[:5], top_k=2, router_bias=a[5], implementation=impl, **opts))
    check_layer(fn, args, bias, opts, cot, TOL[jnp.bfloat16], f"{impl} bf16")


# ---- the partitioned op and moe_ffn_shard -----------------------------------------------------------------------
T, D, F, E, K = 32, 16, 16, 8, 3
EP_OPTS = dict(score_fn="sigmoid", num_groups=4, top_groups=2, routed_scale=2.5)  # DeepSeek-V3's recipe at E=8
EP_MAX = dict(EP_OPTS, group_score="max")


def ep_case(seed=0):
    ks = keys(seed, 6)
    args = (randn(ks[0], (T, D)), randn(ks[1], (T, E)), randn(ks[2], (E, D, F), scale=0.3),
            randn(ks[3], (E, D, F), scale=0.3), randn(ks[4], (E, F, D), scale=0.3))
    return args, randn(ks[5], (E,), scale=0.3), randn(keys(seed + 1, 1)[0], (T, D))


def mesh_and_specs(strategy, shape=(2, 4), names=("data", "expert"), tokens=P(("data", "expert"))):
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    weights = ((P(None, None, "expert"),) * 2 + (P(None, "expert", None),) if strategy == "ep_tp"
               else (P("expert"),) * 3)
    return mesh, (tokens, tokens) + weights + (P(),)


@pytest.mark.parametrize("strategy,shardy", [("all_to_all", True), ("ep_tp", True),
                                             pytest.param("ring", True, marks=pytest.mark.slow),
                                             pytest.param("all_to_all", False, marks=pytest.mark.slow)])
def test_partitioned_op_matches_dense(strategy, shardy):
    check_partitioned(strategy, shardy, EP_OPTS, seed=0)


def check_partitioned(strategy, shardy, opts, seed):
    args, bias, cot = ep_case(seed)
    mesh, specs = mesh_and_specs(strategy)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args + (bias,), specs)]
    cfg = MoEShardingConfig(strategy=strategy)
    fn = jax.jit(lambda *a: moe_ops.moe_ffn(*a[:5], top_k=K, router_bias=a[5], sharding=cfg, implementation="xla",
                                            **opts))
    with partitioner(shardy):
        out, grads = value_and_grads(fn, placed[:5], placed[5], jax.device_put(cot, NamedSharding(mesh, specs[0])))
    ref_out, ref_grads = value_and_grads(dense(opts, K), args, bias, cot)
    assert_close(out, ref_out, TOL[jnp.float32], f"{strategy} forward")
    for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, r, TOL[jnp.float32], f"{strategy} d{name}")
    assert not np.any(np.asarray(grads[5])), "drouter_bias"


@pytest.mark.parametrize("strategy", ["all_to_all", "ring", "ep_tp"])
def test_moe_ffn_shard_in_shard_map(strategy):
    """Every per-shard strategy with the options, inside the user's shard_map (check_vma on), bias replicated."""
    check_shard(strategy, EP_OPTS, seed=3)


def check_shard(strategy, opts, seed):
    args, bias, cot = ep_case(seed)
    mesh, specs = mesh_and_specs(strategy, tokens=P("data") if strategy == "ep_tp" else P(("data", "expert")))
    cfg = MoEShardingConfig(strategy=strategy)
    fn = jax.shard_map(lambda *a: moe_ops.moe_ffn_shard(*a[:5], top_k=K, config=cfg, router_bias=a[5], **opts),
                       mesh=mesh, in_specs=specs, out_specs=specs[0])
    out, grads = value_and_grads(jax.jit(fn), args, bias, cot)
    ref_out, ref_grads = value_and_grads(dense(opts, K), args, bias, cot)
    assert_close(out, ref_out, TOL[jnp.float32], f"{strategy} forward")
    for name, g, r in zip(GRAD_NAMES + ("router_bias",), grads, ref_grads):
        assert_close(g, r, TOL[jnp.float32], f"{strategy} d{name}")


@pytest.mark.parametrize("path", ["partitioned", "shard_map"])
def test_max_group_score_partitioned_and_per_shard(path):
    """group_score="max" (with a bias) through the partitioned op's static options and ``moe_ffn_shard``."""
    args, bias, _ = ep_case(seed=21)
    assert_max_differs(args[1], K, bias, EP_MAX)
    if path == "partitioned":
        check_partitioned("all_to_all", True, EP_MAX, seed=21)
    else:
        check_shard("all_to_all", EP_MAX, seed=21)


@pytest.mark.slow
def test_partitioned_op_under_vmap_with_shared_and_batched_bias():
    """vmap folds a batch over a shared bias into tokens; a batched bias runs one call per element."""
    args, bias, _ = ep_case(seed=5)
    mesh, specs = mesh_and_specs("all_to_all")
    xb, lb = args[0].reshape(2, T // 2, D), args[1].reshape(2, T // 2, E)
    biases = jnp.stack([bias, -bias])
    cfg = MoEShardingConfig(strategy="all_to_all")
    ws = [jax.device_put(w, NamedSharding(mesh, s)) for w, s in zip(args[2:], specs[2:5])]

    def layer(x, lg, b):
        return moe_ops.moe_ffn(x, lg, *ws, top_k=K, router_bias=b, sharding=cfg, implementation="xla", **EP_OPTS)
    shared = jax.jit(jax.vmap(layer, in_axes=(0, 0, None)))(xb, lb, bias)
    per_element = jax.jit(jax.vmap(layer))(xb, lb, biases)
    for i in range(2):
        assert_close(shared[i], dense(EP_OPTS, K)(xb[i], lb[i], *args[2:], bias), TOL[jnp.float32], "shared bias")
        assert_close(per_element[i], dense(EP_OPTS, K)(xb[i], lb[i], *args[2:], biases[i]), TOL[jnp.float32],
                     "batched bias")


@pytest.mark.slow
def test_explicit_axes_with_a_router_bias():
    """jax.make_mesh's Explicit axes, single-device layer and partitioned op, the bias an Explicit operand too."""
    args, bias, _ = ep_case(seed=6)
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    specs = (P(("data", "expert")),) * 2 + (P("expert"),) * 3 + (P(),)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args + (bias,), specs)]
    want = dense(EP_OPTS, K)(*args, bias)
    for sharding in (None, MoEShardingConfig(strategy="all_to_all")):
        out = jax.jit(lambda *a: moe_ops.moe_ffn(*a[:5], top_k=K, router_bias=a[5], sharding=sharding,
                                                 implementation="xla", **EP_OPTS))(*placed)
        assert out.sharding.spec == P(("data", "expert"), None)
        assert_close(out, want, TOL[jnp.float32], f"explicit sharding={sharding}")


# ---- defaults unchanged ----------------------------------------------------------------------------------------
def route_before(logits, top_k, score_fn):
    """route as it was before the options (default arguments): the k largest logits, renormalised weights."""
    logits = logits.astype(jnp.float32)
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(logits), top_k)
    picked = jnp.take_along_axis(logits, ids, axis=-1)
    return jax.nn.softmax(picked if score_fn == "softmax" else jax.nn.log_sigmoid(picked), axis=-1), ids


def near_tie_logits(t=T, e=E, seed=0):
    """Rows whose 2nd and 3rd largest logits are one f32 step apart, the larger at the higher index: their softmax
    scores round to equal values, so only a selection by logits (the default) picks the higher index."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-5.0, -2.0, (t, e)).astype(np.float32)
    logits[:, 0] = rng.uniform(3.0, 5.0, t)
    logits[:, 5] = np.float32(0.82177013)
    logits[:, 6] = np.nextafter(logits[:, 5], np.float32(1.0))
    scores = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    assert (scores[:, 5] == scores[:, 6]).all()
    return jnp.asarray(logits)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_default_route_and_layer_are_bitwise_unchanged(score_fn):
    logits = randn(keys(11, 1)[0], (48, 6)).at[:, 2].set(0.82177013).at[:, 3].set(0.8217702)
    for got, want in zip(moe_ops.route(logits, 2, score_fn=score_fn), route_before(logits, 2, score_fn)):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    x, _, ws = layer_inputs(SHAPES["xla"], "balanced", seed=2)
    x = x.reshape(-1, x.shape[-1])
    weights, ids = route_before(logits, 2, score_fn)
    xs, sizes, sort_idx = moe_ops.permute(x, ids, 6, implementation="xla")
    want = moe_ops.unpermute(moe_ops.experts_ffn(xs, sizes, *ws, implementation="xla"), sort_idx, weights,
                             implementation="xla")
    got = moe_ops.moe_ffn(x, logits, *ws, top_k=2, score_fn=score_fn, implementation="xla")
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


@pytest.mark.parametrize("strategy", ["all_to_all", "ep_tp"])
def test_default_partitioned_op_selects_by_logits(strategy):
    """Without router_bias the partitioned op carries a zeros operand in its place: it must stay unused (selecting
    by scores + 0 would pick the lower index of each near tie)."""
    args, _, _ = ep_case(seed=8)
    args = (args[0], near_tie_logits()) + args[2:]
    mesh, specs = mesh_and_specs(strategy)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    out = jax.jit(lambda *a: moe_ops.moe_ffn(*a, top_k=2, sharding=MoEShardingConfig(strategy=strategy),
                                             implementation="xla"))(*placed)
    assert (np.asarray(R.route(args[1], 2)[1])[:, 1] == 6).all()
    assert_close(out, R.moe_ffn_dense(*args, top_k=2), TOL[jnp.float32], strategy)
