"""Sharding rules as data (specs, axis removal, the batch-off-expert switch) and the exact all-to-all bookkeeping:
offsets / sizes from a known count matrix, buffer sizes, the dense ragged all-to-all emulation, received expert ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from moe_ops import ep_exchange
from moe_ops.ep_strategies import received_expert_ids
from moe_ops.sharding import (MoEShardingConfig, check_no_duplicate_axes, choose_strategy, dispatched_spec,
                              logical_to_spec, remove_axes, token_spec, weight_spec)


# ---- specs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_axes", [("data", "fsdp", "expert"), ("expert",), ("expert", "data"), ("data",)])
@pytest.mark.parametrize("mesh_axes", [None, ("data", "expert"), ("expert",), ("data", "fsdp", "expert")])
def test_dispatched_spec_never_maps_expert_twice(batch_axes, mesh_axes):
    config = MoEShardingConfig(batch_axes=batch_axes)
    spec = dispatched_spec(config, mesh_axes)
    check_no_duplicate_axes(spec)
    assert spec[0] == "expert"
    flat = [a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
    assert flat.count("expert") == 1
    expected_batch = tuple(a for a in batch_axes if a != "expert" and (mesh_axes is None or a in mesh_axes))
    assert spec[1] == (None if not expected_batch else expected_batch[0] if len(expected_batch) == 1
                       else expected_batch)


def test_without_switch_batch_lands_on_expert_twice():
    """The failure the switch prevents: the naive mapping puts `expert` on the expert and the batch dims."""
    naive = dispatched_spec(MoEShardingConfig(batch_axes=("data", "expert")), keep_batch_off_expert=False)
    assert naive == P("expert", ("data", "expert"), None)
    with pytest.raises(ValueError, match="'expert' maps dims 0 and 1"):
        check_no_duplicate_axes(naive)


def test_remove_axes():
    assert remove_axes(P(("expert", "fsdp"), None, None), "fsdp") == P("expert", None, None)
    assert remove_axes(P(("data", "expert"), None), ["expert"]) == P("data", None)
    assert remove_axes(P("fsdp", "expert"), ("fsdp", "expert")) == P(None, None)
    assert remove_axes(P(("a", "b", "c")), "b") == P(("a", "c"))
    assert remove_axes(P(), "x") == P()


def test_token_and_weight_specs():
    config = MoEShardingConfig()
    assert token_spec(config) == P(("data", "fsdp", "expert"), None)
    assert token_spec(config, ("data", "expert")) == P(("data", "expert"), None)
    assert weight_spec(config) == P(("expert", "fsdp"), None, None)
    assert weight_spec(config, ("expert",), down=True) == P("expert", None, None)
    assert weight_spec(config, tensor_parallel=True) == P("fsdp", None, "expert")
    assert weight_spec(config, ("data", "expert"), down=True, tensor_parallel=True) == P(None, "expert", None)
    assert weight_spec(MoEShardingConfig(fsdp_axis=None)) == P("expert", None, None)
    rules = (("batch", ("expert",)), ("expert", ("expert",)))
    assert logical_to_spec(("expert", "batch"), rules) == P("expert", None)
    assert logical_to_spec(("batch", "expert"), rules) == P(None, "expert")  # expert dims win wherever they are


def test_config_and_strategy_choice():
    with pytest.raises(ValueError, match="strategy"):
        MoEShardingConfig(strategy="dense")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEShardingConfig(capacity_factor=0.0)
    assert MoEShardingConfig(batch_axes=["expert"]).batch_axes == ("expert",)
    assert MoEShardingConfig(batch_axes="data").batch_axes == ("data",)  # one name, not its letters
    with pytest.raises(TypeError, match="batch_axes"):
        MoEShardingConfig(batch_axes=("data", 1))
    with pytest.raises(TypeError, match="expert_axis"):
        MoEShardingConfig(expert_axis=("expert",))
    auto = MoEShardingConfig(ep_tp_max_tokens=64)
    assert choose_strategy(auto, 64, 4) == "ep_tp"
    assert choose_strategy(auto, 128, 4) == "all_to_all"
    assert choose_strategy(auto, 130, 4) == "ring"
    assert choose_strategy(MoEShardingConfig(strategy="ring"), 8, 4) == "ring"


# ---- exchange bookkeeping ------------------------------------------------------------------------------------------
COUNTS = np.array([[2, 0, 3],
                   [1, 4, 0],
                   [0, 2, 5]])


def _params(plan, me, reverse=False):
    fn = ep_exchange.reverse_params if reverse else ep_exchange.all_to_all_params
    return [np.asarray(a).tolist() for a in fn(plan, me)]


def test_all_to_all_params_sharded_batch():
    plan = ep_exchange.exchange_plan(COUNTS)
    # device 1: input offsets, send sizes, output offsets (in each receiver), receive sizes
    assert _params(plan, 1) == [[0, 1, 5], [1, 4, 0], [2, 0, 3], [0, 4, 2]]
    assert _params(plan, 0) == [[0, 2, 2], [2, 0, 3], [0, 0, 0], [2, 1, 0]]
    assert _params(plan, 2) == [[0, 0, 2], [0, 2, 5], [3, 4, 3], [3, 0, 5]]
    # reverse exchange of device 1: send back what it received, to where it came from
    assert _params(plan, 1, reverse=True) == [[0, 0, 4], [0, 4, 2], [2, 1, 0], [1, 4, 0]]


def test_all_to_all_params_with_capacity():
    plan = ep_exchange.exchange_plan(COUNTS, capacity=5)
    assert np.asarray(plan.sent).tolist() == [[2, 0, 3], [1, 4, 0], [0, 1, 2]]  # tails of the last senders drop
    assert _params(plan, 2) == [[0, 0, 2], [0, 1, 2], [3, 4, 3], [3, 0, 2]]
    assert np.asarray(plan.sent).sum(axis=0).max() <= 5


def test_all_to_all_params_replicated_batch():
    counts = np.array([[2, 1, 3]] * 3)  # every device holds the same tokens
    plan = ep_exchange.exchange_plan(counts, batch_sharded=False)
    assert _params(plan, 1) == [[0, 2, 3], [0, 1, 0], [0, 0, 0], [0, 1, 0]]
    assert _params(plan, 2) == [[0, 2, 3], [0, 0, 3], [0, 0, 0], [0, 0, 3]]
    assert _params(plan, 2, reverse=True) == [[0, 0, 0], [0, 0, 3], [3, 3, 3], [0, 0, 3]]
    assert _params(ep_exchange.exchange_plan(counts, capacity=2, batch_sharded=False), 2)[1] == [0, 0, 2]


def test_buffer_rows():
    # T_local * min(EP * k, E) = T_local*k * min(EP, E/k)
    assert ep_exchange.dropless_buffer_rows(8, 2, 4, 8) == 64
    assert ep_exchange.dropless_buffer_rows(8, 2, 4, 64) == 64       # E/k > EP: EP * T_local * k
    assert ep_exchange.dropless_buffer_rows(8, 4, 8, 8) == 64        # E_l = 1 < k: one copy per token per device
    assert ep_exchange.dropless_buffer_rows(8, 2, 4, 8, batch_sharded=False) == 16
    assert ep_exchange.buffer_rows(8, 2, 4, 8, capacity_factor=1.25) == 20
    assert ep_exchange.buffer_rows(8, 2, 4, 8, capacity_factor=100.0) == 64
    assert ep_exchange.buffer_rows(8, 2, 4, 8, batch_sharded=False, capacity_factor=1.0) == 4


def test_received_expert_ids():
    recv_counts = jnp.array([[1, 2], [0, 0], [3, 1]])      # senders 0..2, two local experts
    offsets, sizes = jnp.array([0, 3, 3]), jnp.array([3, 0, 3])  # sender 2's last copy was dropped
    ids = received_expert_ids(recv_counts, offsets, sizes, 8)
    assert np.asarray(ids).tolist() == [0, 1, 1, 0, 0, 0, 2, 2]


def _numpy_ragged_all_to_all(operands, outputs, params):
    """Reference semantics of lax.ragged_all_to_all over a list of devices."""
    outputs = [o.copy() for o in outputs]
    for i, (in_off, send, out_off, _) in enumerate(params):
        for j in range(len(operands)):
            outputs[j][out_off[j]:out_off[j] + send[j]] = operands[i][in_off[j]:in_off[j] + send[j]]
    return outputs


@pytest.mark.parametrize("capacity", [None, 4])
def test_dense_ragged_all_to_all_matches_semantics(capacity):
    """Emulation on 4 CPU devices vs the numpy semantics, forward exchange and the reverse round trip."""
    ep, rows_in, d = 4, 6, 3
    rng = np.random.default_rng(0)
    counts = np.stack([rng.multinomial(rows_in - i, np.ones(ep) / ep) for i in range(ep)])  # sums below rows_in
    rows_out = int(capacity or counts.sum(axis=0).max())
    plan = ep_exchange.exchange_plan(counts, capacity)
    operands = rng.normal(size=(ep, rows_in, d)).astype(np.float32)
    params = [[np.asarray(a) for a in ep_exchange.all_to_all_params(plan, i)] for i in range(ep)]
    poison = np.full((ep, rows_out, d), -7.0, np.float32)  # unwritten rows keep the output's values
    mesh = jax.make_mesh((ep,), ("expert",), axis_types=(AxisType.Auto,))

    def body(x, out):
        me = jax.lax.axis_index("expert")
        fwd = ep_exchange._dense_ragged_all_to_all(x[0], out[0], *ep_exchange.all_to_all_params(plan, me), "expert")
        back = ep_exchange._dense_ragged_all_to_all(fwd, jnp.zeros_like(x[0]), *ep_exchange.reverse_params(plan, me),
                                                    "expert")
        return fwd[None], back[None]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P("expert")), out_specs=(P("expert"),) * 2))
    fwd, back = fn(operands, poison)
    expected = _numpy_ragged_all_to_all(list(operands), list(poison), params)
    np.testing.assert_array_equal(np.asarray(fwd), np.stack(expected))
    sent = np.asarray(plan.sent)
    for i in range(ep):  # round trip: every sent row is back in place, dropped / never-sent rows are zero
        mask = np.zeros(rows_in, bool)
        for j in range(ep):
            mask[params[i][0][j]:params[i][0][j] + sent[i, j]] = True
        np.testing.assert_array_equal(np.asarray(back[i]), np.where(mask[:, None], operands[i], 0))
    if capacity is not None:
        assert sent.sum() < counts.sum()  # the capacity case really drops rows


def test_local_only_copy_moves_only_the_self_chunk():
    ep, d = 4, 2
    counts = np.array([[1, 2, 0, 3]] * ep)
    plan = ep_exchange.exchange_plan(counts, batch_sharded=False)
    x = np.arange(6 * d, dtype=np.float32).reshape(6, d)
    mesh = jax.make_mesh((ep,), ("expert",), axis_types=(AxisType.Auto,))

    def body(x):
        me = jax.lax.axis_index("expert")
        out = ep_exchange.ragged_all_to_all(x, jnp.full((3, d), -1.0), *ep_exchange.all_to_all_params(plan, me),
                                            axis_name="expert", local_only=True)
        return out[None]

    out = np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P("expert")))(x))
    starts, sizes = [0, 1, 3, 3], [1, 2, 0, 3]
    for j in range(ep):
        expected = np.full((3, d), -1.0, np.float32)
        expected[:sizes[j]] = x[starts[j]:starts[j] + sizes[j]]
        np.testing.assert_array_equal(out[j], expected)


def test_platform_switch_is_one_place():
    assert ep_exchange.platform_has_ragged_all_to_all() == (jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"))
