"""Routing generators and the busiest-device model: exact numbers for small hand-computed cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moe_ops import imbalance, reference


def _distinct_per_token(ids):
    s = np.sort(ids, axis=1)
    return bool((s[:, 1:] != s[:, :-1]).all())


def test_balanced_model_has_skew_one():
    ids = imbalance.balanced_ids(32, 8, 2)
    assert imbalance.expert_loads(ids, 8).tolist() == [8] * 8
    model = imbalance.device_model(ids, 8, 4)
    assert model.counts.tolist() == [[4, 4, 4, 4]] * 4
    assert model.received.tolist() == [16, 16, 16, 16]
    assert model.receiver_skew == 1.0
    assert model.dropless_buffer_rows == 64            # T_local=8 * min(EP*k=8, E=8)
    assert model.buffer_utilisation == 0.25


def test_one_hot_expert_at_worst_case_factor():
    """E=8, k=2, T=28: f = E/k = 4 puts every token on the hot expert (28 = 4 x mean 7); the other 28 copies spread
    over 7 experts (4 each). Device 0 (experts 0, 1) receives 32, the others 8: skew 32 / 14 = 16/7."""
    for factor in (-1, 4.0):
        ids = imbalance.hot_ids(28, 8, 2, num_hot=1, factor=factor)
        assert imbalance.expert_loads(ids, 8).tolist() == [28, 4, 4, 4, 4, 4, 4, 4]
        assert _distinct_per_token(ids)
        model = imbalance.device_model(ids, 8, 4)
        assert model.received.tolist() == [32, 8, 8, 8]
        assert model.counts.sum(axis=1).tolist() == [14] * 4   # every device sends T_local * k
        assert model.receiver_skew == pytest.approx(16 / 7, abs=0)
        assert model.busiest_device == 0
        assert model.dropless_buffer_rows == 7 * 8


def test_all_to_one_device_fills_the_dropless_buffer():
    """k hot experts on one device with f = -1: that device receives every copy, exactly the dropless buffer."""
    ids = imbalance.hot_ids(32, 8, 2, num_hot=2, factor=-1, hot_experts=[2, 3])
    model = imbalance.device_model(ids, 8, 4)
    assert model.received.tolist() == [0, 64, 0, 0]
    assert model.counts.tolist() == [[0, 16, 0, 0]] * 4
    assert model.receiver_skew == 4.0 and model.busiest_device == 1
    assert model.buffer_utilisation == 1.0


def test_hot_factor_two_loads():
    ids = imbalance.hot_ids(64, 8, 2, num_hot=1, factor=2.0, hot_experts=[5])
    loads = imbalance.expert_loads(ids, 8)
    assert loads[5] == 32 and loads.sum() == 128                 # 2 x mean 16
    assert sorted(np.delete(loads, 5).tolist()) == [13, 13, 14, 14, 14, 14, 14]
    assert _distinct_per_token(ids)


def test_ids_from_loads_rejects_infeasible():
    with pytest.raises(ValueError, match="exceeds"):
        imbalance.ids_from_loads([5, 1], 2)    # T = 3 < 5
    with pytest.raises(ValueError, match="sum"):
        imbalance.ids_from_loads([2, 1], 2)


def test_zipf_is_skewed_and_distinct():
    ids = imbalance.zipf_ids(512, 8, 2, s=1.2, seed=0)
    loads = imbalance.expert_loads(ids, 8)
    assert _distinct_per_token(ids) and loads.sum() == 1024
    assert loads[0] > loads[3] > loads[7]
    flat = imbalance.zipf_ids(512, 8, 2, s=0.0, seed=0)
    assert imbalance.device_model(flat, 8, 4).receiver_skew < imbalance.device_model(ids, 8, 4).receiver_skew


@pytest.mark.parametrize("kind", ["balanced", "hot", "zipf"])
def test_logits_route_to_the_given_ids(kind):
    ids = {"balanced": imbalance.balanced_ids(16, 8, 2), "hot": imbalance.hot_ids(16, 8, 2, 1, -1),
           "zipf": imbalance.zipf_ids(16, 8, 2, 1.0)}[kind]
    logits = imbalance.logits_for_ids(ids, 8, seed=1)
    _, routed = reference.route(jnp.asarray(logits), 2)
    assert np.array_equal(np.sort(np.asarray(routed), 1), np.sort(ids, 1))


def test_generators_refuse_what_breaks_their_contract():
    """[T, k] ids with k distinct experts per token, or a clear error naming the argument."""
    with pytest.raises(ValueError, match="hot_experts must be num_hot=1 distinct ids"):
        imbalance.hot_ids(64, 8, 2, num_hot=1, hot_experts=[5, 6])
    with pytest.raises(ValueError, match="hot_experts must be num_hot=2 distinct ids"):
        imbalance.hot_ids(64, 8, 2, num_hot=2, hot_experts=[5, 5])
    with pytest.raises(ValueError, match=r"in \[0, E=8\)"):
        imbalance.hot_ids(64, 8, 2, num_hot=1, hot_experts=[8])
    with pytest.raises(ValueError, match="factor must be > 0"):
        imbalance.hot_ids(64, 8, 2, factor=-2)
    for gen in (imbalance.balanced_ids, imbalance.zipf_ids):
        with pytest.raises(ValueError, match="1 <= top_k <= E"):
            gen(16, 4, 5)
    ids = imbalance.hot_ids(64, 8, 2, num_hot=2, hot_experts=[6, 3], factor=2)
    assert ids.shape == (64, 2) and all(len(set(row)) == 2 for row in ids)
