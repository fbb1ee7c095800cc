"""The partitioned MoE op vs ``reference.moe_ffn_dense`` on the unsharded arrays: forward and the gradients of x,
router logits and all three weights, every strategy, Shardy and GSPMD, balanced / hot / all-to-one-device routing,
weights sharded on (expert, fsdp), capacity truncation, direct use inside shard_map, and the compiled collectives."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moe_ops import imbalance, moe_ffn, reference
from moe_ops.partitioned import moe_ffn_shard, plan
from moe_ops.sharding import MoEShardingConfig
from tests.helpers import TOL, assert_close, keys, partitioner, randn

T, D, F, E, K = 32, 16, 16, 8, 2
STRATEGIES = ("all_to_all", "ring", "ep_tp")


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def routing_ids(kind, num_tokens=T):
    if kind == "balanced":
        return imbalance.balanced_ids(num_tokens, E, K)
    if kind == "hot":  # expert 5 with twice the mean load
        return imbalance.hot_ids(num_tokens, E, K, num_hot=1, factor=2.0, hot_experts=[5])
    if kind == "all_to_one":  # every token on experts 2 and 3: one device (EP=4) receives every copy
        return imbalance.hot_ids(num_tokens, E, K, num_hot=K, factor=-1, hot_experts=[2, 3])
    raise ValueError(kind)


def make_inputs(kind, seed=0, num_tokens=T):
    ks = keys(seed, 5)
    ids = routing_ids(kind, num_tokens)
    logits = jnp.asarray(imbalance.logits_for_ids(ids, E, seed=seed))
    x = randn(ks[0], (num_tokens, D))
    ws = (randn(ks[1], (E, D, F), scale=0.3), randn(ks[2], (E, D, F), scale=0.3), randn(ks[3], (E, F, D), scale=0.3))
    dy = randn(ks[4], (num_tokens, D))
    return (x, logits) + ws, dy


def value_and_grads(fn, args, dy):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(dy)


@functools.lru_cache(maxsize=None)
def expected(kind, seed=0):
    args, dy = make_inputs(kind, seed)
    return value_and_grads(functools.partial(reference.moe_ffn_dense, top_k=K), args, dy)


def weight_specs(strategy, e_axes):
    if strategy == "ep_tp":
        return P(None, None, "expert"), P(None, None, "expert"), P(None, "expert", None)
    return (P(e_axes),) * 3


@functools.lru_cache(maxsize=None)
def jitted(config, shardy):
    """One jitted forward+VJP per (config, partitioner): routing cases with equal shapes share its compilation."""
    del shardy  # part of the cache key only: a GSPMD run never reuses a Shardy executable
    return jax.jit(functools.partial(value_and_grads, functools.partial(moe_ffn, top_k=K, sharding=config)))


def check_against_reference(mesh, config, kind, token_spec, w_specs, seed=0):
    args, dy = make_inputs(kind, seed)
    specs = (token_spec, token_spec) + tuple(w_specs)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    dy = jax.device_put(dy, NamedSharding(mesh, token_spec))
    out, grads = jitted(config, jax.config.jax_use_shardy_partitioner)(placed, dy)
    ref_out, ref_grads = expected(kind, seed)
    assert_close(out, ref_out, TOL[jnp.float32], f"{config.strategy} {kind} out")
    for name, g, r in zip(("x", "logits", "w_gate", "w_up", "w_down"), grads, ref_grads):
        assert_close(g, r, TOL[jnp.float32], f"{config.strategy} {kind} d{name}")


@pytest.mark.parametrize("kind", ["balanced", "hot", "all_to_one"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_data_expert_mesh_shardy(strategy, kind):
    mesh = make_mesh((2, 4), ("data", "expert"))
    check_against_reference(mesh, MoEShardingConfig(strategy=strategy), kind, P(("data", "expert")),
                            weight_specs(strategy, "expert"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_data_expert_mesh_gspmd(strategy):
    mesh = make_mesh((2, 4), ("data", "expert"))
    with partitioner(shardy=False):
        check_against_reference(mesh, MoEShardingConfig(strategy=strategy), "hot", P(("data", "expert")),
                                weight_specs(strategy, "expert"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert8_mesh(strategy):
    mesh = make_mesh((8,), ("expert",))
    check_against_reference(mesh, MoEShardingConfig(strategy=strategy), "all_to_one", P("expert"),
                            weight_specs(strategy, "expert"), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,shardy", [("all_to_all", True), ("all_to_all", False), ("ring", True)])
def test_weights_sharded_expert_fsdp(strategy, shardy):
    """Weights E over (expert, fsdp), tokens over (fsdp, expert): the op gathers the weights over fsdp."""
    mesh = make_mesh((4, 2), ("expert", "fsdp"))
    with partitioner(shardy):
        check_against_reference(mesh, MoEShardingConfig(strategy=strategy), "hot", P(("fsdp", "expert")),
                                (P(("expert", "fsdp")),) * 3, seed=2)


def test_ep_tp_weights_arriving_expert_fsdp_sharded():
    """ep_tp given weights stored E-sharded over (expert, fsdp): the partitioner reshards them to F over expert."""
    mesh = make_mesh((4, 2), ("expert", "fsdp"))
    check_against_reference(mesh, MoEShardingConfig(strategy="ep_tp"), "balanced", P("fsdp"),
                            (P(("expert", "fsdp")),) * 3, seed=3)


def test_tokens_not_on_expert_axis():
    """x sharded on data only: ring keeps the batch replicated over expert (the psum path)."""
    mesh = make_mesh((2, 4), ("data", "expert"))
    check_against_reference(mesh, MoEShardingConfig(strategy="ring"), "hot", P("data"),
                            weight_specs("ring", "expert"), seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_forward(strategy):
    mesh = make_mesh((2, 4), ("data", "expert"))
    args, _ = make_inputs("hot", seed=9)
    args = [a.astype(jnp.bfloat16) if i != 1 else a for i, a in enumerate(args)]
    specs = (P(("data", "expert")),) * 2 + weight_specs(strategy, "expert")
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    out = jax.jit(functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy=strategy)))(*placed)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference.moe_ffn_dense(*args, top_k=K), TOL[jnp.bfloat16], f"{strategy} bf16")


def test_auto_and_leading_dims():
    """auto on a [B, S, D] batch of 32 tokens (<= ep_tp_max_tokens -> ep_tp, see test_plan_reads_operand_sharding
    for the other choices); the 3-D input is reshaped through the op."""
    mesh = make_mesh((2, 4), ("data", "expert"))
    args, dy = make_inputs("hot", seed=5)
    x3, logits3 = args[0].reshape(8, 4, D), args[1].reshape(8, 4, E)
    config = MoEShardingConfig(strategy="auto", ep_tp_max_tokens=32)
    spec = NamedSharding(mesh, P(("data", "expert")))
    x3, logits3 = jax.device_put(x3, spec), jax.device_put(logits3, spec)
    out = jax.jit(functools.partial(moe_ffn, top_k=K, sharding=config))(x3, logits3, *args[2:])
    ref = reference.moe_ffn_dense(x3, logits3, *args[2:], top_k=K)
    assert_close(out, ref, TOL[jnp.float32], "auto")


def test_plan_reads_operand_sharding():
    mesh = make_mesh((2, 4), ("data", "expert"))
    sh = lambda spec: NamedSharding(mesh, spec)
    a2a, ring, tp = (MoEShardingConfig(strategy=s) for s in STRATEGIES)
    assert plan(a2a, mesh, sh(P("data")), T, E, F).token_axes == ("data", "expert")
    assert plan(ring, mesh, sh(P("data")), T, E, F).token_axes == ("data",)
    assert plan(ring, mesh, sh(P(("expert", "data"))), T, E, F).token_axes == ("expert", "data")
    assert plan(tp, mesh, sh(P(("data", "expert"))), T, E, F).token_axes == ("data",)
    assert plan(ring, mesh, None, T, E, F).token_axes == ("data", "expert")  # config.batch_axes fallback
    assert plan(a2a, mesh, sh(P(("data", "expert"))), 6, E, F).token_axes == ("data",)  # 4 does not divide 6
    assert plan(MoEShardingConfig(ep_tp_max_tokens=16), mesh, None, 16, E, F).strategy == "ep_tp"
    assert plan(MoEShardingConfig(ep_tp_max_tokens=16), mesh, None, 32, E, F).strategy == "all_to_all"
    assert plan(tp, mesh, None, T, E, F).weight_specs()[2] == P(None, "expert", None)
    fsdp_mesh = make_mesh((4, 2), ("expert", "fsdp"))
    p = plan(a2a, fsdp_mesh, None, T, E, F)
    assert p.fsdp_axis == "fsdp" and p.weight_specs()[2] == P(("expert", "fsdp"), None, None)
    assert plan(tp, fsdp_mesh, None, T, E, F).weight_specs()[0] == P("fsdp", None, "expert")
    assert plan(a2a, fsdp_mesh, None, T, 4, F).fsdp_axis is None  # 4 experts do not split 8 ways: no fsdp
    with pytest.raises(ValueError, match="expert axis"):
        plan(a2a, make_mesh((8,), ("data",)), None, T, E, F)
    with pytest.raises(ValueError, match="do not split"):
        plan(a2a, mesh, None, T, 6, F)
    assert plan(MoEShardingConfig(), mesh, None, T, 6, F).strategy == "ep_tp"  # auto: F splits, E does not
    assert plan(tp, mesh, None, T, 6, F).strategy == "ep_tp"
    with pytest.raises(ValueError, match="F must be a multiple of 4"):
        plan(MoEShardingConfig(), mesh, None, T, 6, 18)


@pytest.mark.parametrize("strategy", ["ep_tp", "auto"])
def test_ep_tp_with_experts_that_do_not_split(strategy):
    """E=6 experts on an expert axis of 4: ep_tp (F split, every device keeps all experts) runs, and ``auto`` picks
    it; forward and all five gradients against the reference."""
    e = 6
    mesh = make_mesh((2, 4), ("data", "expert"))
    ks = keys(41, 6)
    ids = imbalance.hot_ids(T, e, K, num_hot=1, factor=2.0, hot_experts=[4])
    args = (randn(ks[0], (T, D)), jnp.asarray(imbalance.logits_for_ids(ids, e, seed=3)),
            randn(ks[1], (e, D, F), scale=0.3), randn(ks[2], (e, D, F), scale=0.3), randn(ks[3], (e, F, D), scale=0.3))
    dy = randn(ks[4], (T, D))
    specs = (P("data"), P("data")) + weight_specs("ep_tp", None)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    fn = functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy=strategy))
    dy_placed = jax.device_put(dy, NamedSharding(mesh, P("data")))
    out, grads = jax.jit(functools.partial(value_and_grads, fn))(placed, dy_placed)
    ref_out, ref_grads = value_and_grads(functools.partial(reference.moe_ffn_dense, top_k=K), args, dy)
    assert_close(out, ref_out, TOL[jnp.float32], f"{strategy} out")
    for name, g, r in zip(("x", "logits", "w_gate", "w_up", "w_down"), grads, ref_grads):
        assert_close(g, r, TOL[jnp.float32], f"{strategy} d{name}")


def _kept_copies(ids, ep, rows):
    """numpy model of deterministic capacity truncation (batch on expert=ep, sender i holds a contiguous block):
    receiver j takes senders in order, each sender's copies sorted by (expert, flat index), first ``rows`` kept."""
    t, k = ids.shape
    e_local, t_local = E // ep, t // ep
    kept = np.zeros((t, k), bool)
    for j in range(ep):
        room = rows
        for i in range(ep):
            block = ids[i * t_local:(i + 1) * t_local]
            flat = [(block[a, b], a * k + b) for a in range(t_local) for b in range(k) if block[a, b] // e_local == j]
            for _, f in sorted(flat)[:max(room, 0)]:
                kept[i * t_local + f // k, f % k] = True
            room -= len(flat)
    return kept


def _dense_with_mask(x, logits, w_gate, w_up, w_down, kept):
    weights, ids = reference.route(logits, K)
    gate = jnp.einsum("td,edf->tef", x, w_gate)
    up = jnp.einsum("td,edf->tef", x, w_up)
    y = jnp.einsum("tef,efd->ted", reference.activate(gate, up), w_down)
    combine = jnp.einsum("tk,tke->te", weights * kept, jax.nn.one_hot(ids, E))
    return jnp.einsum("ted,te->td", y, combine)


def test_capacity_factor_truncates_deterministically(capacity_factor=1.5):
    mesh = make_mesh((8,), ("expert",))
    args, _ = make_inputs("all_to_one", seed=6)
    ids = np.asarray(reference.route(args[1], K)[1])
    rows = int(np.ceil(capacity_factor * (T // 8) * K))
    kept = _kept_copies(ids, 8, rows)
    assert 0 < kept.sum() < kept.size  # the case really drops copies
    config = MoEShardingConfig(strategy="all_to_all", capacity_factor=capacity_factor)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, (P("expert"),) * 5)]
    out = jax.jit(functools.partial(moe_ffn, top_k=K, sharding=config))(*placed)
    assert_close(out, _dense_with_mask(*args, jnp.asarray(kept, jnp.float32)), TOL[jnp.float32], "capacity")


@pytest.mark.parametrize("strategy,layout,tokens_on_expert", [("all_to_all", "all_to_all", True),
                                                              ("all_to_all", "all_to_all", False),
                                                              ("auto", "ep_tp", False)])
def test_inside_user_shard_map(strategy, layout, tokens_on_expert):
    """The per-shard function called in the user's own shard_map (check_vma on), forward and gradients; ``auto``
    reads the weight layout (F split over expert -> ep_tp; all_to_all would reject these weights)."""
    mesh = make_mesh((2, 4), ("data", "expert"))
    tokens = P(("data", "expert")) if tokens_on_expert else P("data")
    config = MoEShardingConfig(strategy=strategy)
    fn = jax.shard_map(functools.partial(moe_ffn_shard, top_k=K, config=config, tokens_on_expert=tokens_on_expert),
                       mesh=mesh, in_specs=(tokens, tokens) + weight_specs(layout, "expert"), out_specs=tokens)
    args, dy = make_inputs("hot", seed=7)
    out, grads = jax.jit(functools.partial(value_and_grads, fn))(args, dy)
    ref_out, ref_grads = value_and_grads(functools.partial(reference.moe_ffn_dense, top_k=K), args, dy)
    assert_close(out, ref_out, TOL[jnp.float32], "shard_map out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, TOL[jnp.float32], "shard_map grad")


def _collectives(hlo_text, op):
    """Element types of the result of every ``op`` instruction (async starts included) in compiled HLO text, e.g.
    ``[["f32", "f32"], ["s32"]]`` (results may be tuples)."""
    pattern = re.compile(rf"=\s*(.*?)\s{op}(?:-start)?\(")
    return [re.findall(r"\b([a-z]+[0-9]*)\[", m.group(1)) for line in hlo_text.splitlines()
            if (m := pattern.search(line))]


def _f32_collectives(hlo_text):
    """Collective kinds (all-gather, all-to-all, ...) of compiled HLO that carry f32 data."""
    kinds = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
    return {kind for kind in kinds if any("f32" in types for types in _collectives(hlo_text, kind))}


# strategy -> (token spec, weight specs in its native layout, the f32 collectives its compiled forward must have)
NATIVE = {
    "all_to_all": (P("expert"), weight_specs("all_to_all", "expert"), {"all-to-all"}),
    "ring": (P("expert"), weight_specs("ring", "expert"), {"all-gather", "reduce-scatter"}),
    "ep_tp": (P(), weight_specs("ep_tp", "expert"), {"all-reduce"}),
}


@pytest.mark.parametrize("shardy", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["shardy", "gspmd"])
def test_compiled_collectives(shardy):
    """all_to_all with tokens on `expert`: an all-to-all of activations and no all-gather of them (only the s32
    count matrix is gathered); ring / ep_tp show their own collectives (so the check can fail)."""
    mesh = make_mesh((8,), ("expert",))
    args, _ = make_inputs("balanced")
    for strategy, (tokens, w_specs, expected_f32) in NATIVE.items():
        placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, (tokens, tokens) + w_specs)]
        fn = functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy=strategy))
        with partitioner(shardy):
            text = jax.jit(fn).lower(*placed).compile().as_text()
        assert _f32_collectives(text) == expected_f32, strategy
        if strategy == "all_to_all":
            gathers = _collectives(text, "all-gather")
            assert gathers and all(set(types) == {"s32"} for types in gathers), gathers


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_native_ragged_all_to_all_path_lowers(platform, monkeypatch):
    """Where the platform has ragged-all-to-all the exchange uses it (forward and its transpose in the backward):
    lowered here for GPU / TPU from the CPU machine (it cannot run on XLA:CPU)."""
    from moe_ops import ep_exchange
    monkeypatch.setattr(ep_exchange, "platform_has_ragged_all_to_all", lambda: True)
    mesh = make_mesh((8,), ("expert",))
    fn = jax.shard_map(functools.partial(moe_ffn_shard, top_k=K, config=MoEShardingConfig(strategy="all_to_all"),
                                         implementation="xla"),
                       mesh=mesh, in_specs=(P("expert"),) * 5, out_specs=P("expert"))
    args, dy = make_inputs("hot")
    text = jax.jit(functools.partial(value_and_grads, fn)).trace(args, dy).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count("@ragged_all_to_all") == 4  # dispatch + return, and their transposes
    dense = [line for line in text.splitlines() if "stablehlo.all_to_all" in line]
    assert not any("xf32>" in line for line in dense), "activations went through the dense emulation"


def test_unsharded_call_runs_single_device_body():
    """On one device the custom-partitioned op lowers its body (layer.moe_ffn); gradients go through the same
    custom_vjp."""
    args, dy = make_inputs("hot", seed=8)
    fn = functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy="all_to_all"))
    out, grads = jax.jit(functools.partial(value_and_grads, fn))(args, dy)
    ref_out, ref_grads = value_and_grads(functools.partial(reference.moe_ffn_dense, top_k=K), args, dy)
    for a, r in zip((out, *grads), (ref_out, *ref_grads)):
        assert_close(a, r, TOL[jnp.float32], "single device")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tdf", [(0, D, F), (T, D, 0)], ids=["no_tokens", "f0"])
def test_empty_problem_gives_zeros_and_zero_grads(strategy, tdf):
    """Zero tokens or F = 0 on an expert mesh: correctly shaped zeros and zero gradients (the backward once failed
    at partition time with zero-sized collectives)."""
    t, d, f = tdf
    mesh = make_mesh((2, 4), ("data", "expert"))
    ks = keys(41, 5)
    args = (randn(ks[0], (t, d)), randn(ks[1], (t, E)), randn(ks[2], (E, d, f)), randn(ks[3], (E, d, f)),
            randn(ks[4], (E, f, d)))
    specs = (P(("data", "expert")),) * 2 + weight_specs(strategy, "expert")
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    fn = functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy=strategy))
    out, grads = jax.jit(functools.partial(value_and_grads, fn))(placed, jnp.ones((t, d)))
    assert out.shape == (t, d) and not np.any(np.asarray(out))
    for g, a in zip(grads, args):
        assert g.shape == a.shape and not np.any(np.asarray(g))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tokens_on_expert", [True, False])
def test_shard_with_no_local_tokens(strategy, tokens_on_expert):
    """``moe_ffn_shard`` in a user's shard_map on zero tokens per shard: [0, D] out, zero gradients (the
    all-to-all exchange once reshaped a zero-size chunk and raised ZeroDivisionError)."""
    mesh = make_mesh((2, 4), ("data", "expert"))
    ks = keys(42, 5)
    args = (randn(ks[0], (0, D)), randn(ks[1], (0, E)), randn(ks[2], (E, D, F)), randn(ks[3], (E, D, F)),
            randn(ks[4], (E, F, D)))
    tokens = P(("data", "expert")) if tokens_on_expert else P("data")
    fn = jax.shard_map(functools.partial(moe_ffn_shard, top_k=K, config=MoEShardingConfig(strategy=strategy),
                                         tokens_on_expert=tokens_on_expert),
                       mesh=mesh, in_specs=(tokens, tokens) + weight_specs(strategy, "expert"), out_specs=tokens)
    out, grads = jax.jit(functools.partial(value_and_grads, fn))(args, jnp.ones((0, D)))
    assert out.shape == (0, D)
    for g, a in zip(grads, args):
        assert g.shape == a.shape and not np.any(np.asarray(g))
