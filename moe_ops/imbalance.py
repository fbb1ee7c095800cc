"""Load-imbalance tools: synthetic routings and a model of the busiest device under expert parallelism.

Host-side (numpy) analysis helpers for tests and benchmarks, not ops. Conventions: ``T`` tokens, ``E`` experts,
top-``k`` distinct experts per token, ``EP`` devices on the expert axis, device ``j`` owns experts
``[j*E/EP, (j+1)*E/EP)``, and with a sharded batch device ``i`` holds tokens ``[i*T/EP, (i+1)*T/EP)``.

Generators return expert ids ``[T, k]`` int32 (``logits_for_ids`` turns them into router logits whose top-k is
exactly those ids):

* ``balanced_ids``: every expert gets ``T*k/E`` copies (round robin).
* ``hot_ids``: ``W`` hot experts each get ``f`` times the mean load ``T*k/E`` (capped at ``T``, the most one expert
  can get since a token picks it at most once); ``f = -1`` means the worst case ``f = E/k`` (every token on each hot
  expert). The other experts share the rest evenly.
* ``zipf_ids``: k distinct experts per token drawn with popularity ``1/rank^s`` (Gumbel top-k).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moe_ops.ep_exchange import dropless_buffer_rows

__all__ = ["balanced_ids", "hot_ids", "zipf_ids", "ids_from_loads", "logits_for_ids", "expert_loads",
           "DeviceModel", "device_model"]


def ids_from_loads(loads, top_k: int) -> np.ndarray:
    """Expert ids [T, k] realising per-expert ``loads`` [E] (each <= T, summing to T*k), k distinct experts per token.

    Invariant: expert e fills a contiguous run of length ``loads[e] <= T`` of the column-major [T, k] slot order, so
    it occupies rows ``a..T-1`` of one column and ``0..b`` (``b < a``) of the next: never the same token twice."""
    loads = np.asarray(loads, np.int64)
    total = int(loads.sum())
    if total % top_k or (loads < 0).any():
        raise ValueError(f"loads must be >= 0 and sum to T*k (k={top_k}), got sum {total}")
    t = total // top_k
    if (loads > t).any():
        raise ValueError(f"an expert load exceeds T={t}: {loads.tolist()}")
    sequence = np.repeat(np.arange(len(loads)), loads)
    return sequence.reshape(top_k, t).T.astype(np.int32).copy()


def _check_sizes(num_tokens, num_experts, top_k):
    if not (num_tokens >= 0 and num_experts >= 1 and 1 <= top_k <= num_experts):
        raise ValueError(f"need T >= 0, E >= 1 and 1 <= top_k <= E (k distinct experts per token), got T={num_tokens}, "
                         f"E={num_experts}, top_k={top_k}")


def balanced_ids(num_tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Round robin: token t picks experts ``(t*k + j) % E``."""
    _check_sizes(num_tokens, num_experts, top_k)
    return ((np.arange(num_tokens)[:, None] * top_k + np.arange(top_k)[None, :]) % num_experts).astype(np.int32)


def _spread(total: int, n: int) -> np.ndarray:
    return np.full(n, total // n, np.int64) + (np.arange(n) < total % n)


def hot_ids(num_tokens: int, num_experts: int, top_k: int, num_hot: int = 1, factor: float = -1,
            hot_experts=None) -> np.ndarray:
    """``num_hot`` hot experts (default the first ones, or ``hot_experts``: ``num_hot`` distinct ids in ``[0, E)``)
    with ``factor`` x the mean load (``factor > 0``, or -1)."""
    _check_sizes(num_tokens, num_experts, top_k)
    if not 1 <= num_hot < num_experts:
        raise ValueError(f"num_hot must be in [1, E={num_experts}), got {num_hot}")
    if not (factor == -1 or factor > 0):
        raise ValueError(f"factor must be > 0 (x the mean load) or -1 (the worst case), got {factor}")
    hot = np.arange(num_hot) if hot_experts is None else np.asarray(hot_experts).reshape(-1)
    if len(hot) != num_hot or len(np.unique(hot)) != num_hot or hot.min() < 0 or hot.max() >= num_experts:
        raise ValueError(f"hot_experts must be num_hot={num_hot} distinct ids in [0, E={num_experts}), got "
                         f"{hot.tolist()}")
    mean = num_tokens * top_k / num_experts
    factor = num_experts / top_k if factor == -1 else factor
    hot_load = min(num_tokens, int(round(factor * mean)), num_tokens * top_k // num_hot)
    cold = np.setdiff1d(np.arange(num_experts), hot)
    loads = np.zeros(num_experts, np.int64)
    loads[hot] = hot_load
    loads[cold] = _spread(num_tokens * top_k - num_hot * hot_load, len(cold))
    order = np.concatenate([hot, cold])  # hot experts fill the first runs (the ids stay exactly these loads)
    return _relabel(ids_from_loads(loads[order], top_k), order)


def _relabel(ids, order):
    return np.asarray(order, np.int32)[ids]


def zipf_ids(num_tokens: int, num_experts: int, top_k: int, s: float = 1.0, seed: int = 0) -> np.ndarray:
    """k distinct experts per token, expert of rank r (r = 1..E, expert r-1: expert 0 is the most popular for
    every seed, which only draws the tokens' choices) chosen with weight ``r^-s``."""
    _check_sizes(num_tokens, num_experts, top_k)
    rng = np.random.default_rng(seed)
    logp = -s * np.log(np.arange(1, num_experts + 1))
    keys = logp[None, :] + rng.gumbel(size=(num_tokens, num_experts))
    return np.argsort(-keys, axis=1)[:, :top_k].astype(np.int32)


def logits_for_ids(ids, num_experts: int, seed: int = 0) -> np.ndarray:
    """Router logits [T, E] f32 whose top-k are exactly ``ids`` (chosen in (3, 4), others in (-1, 0), no ties),
    so softmax weights and their gradients are non-trivial."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-1.0, 0.0, (ids.shape[0], num_experts))
    np.put_along_axis(logits, np.asarray(ids), rng.uniform(3.0, 4.0, ids.shape), axis=1)
    return logits.astype(np.float32)


def expert_loads(ids, num_experts: int) -> np.ndarray:
    """Copies routed to each expert [E]."""
    return np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts).astype(np.int64)


class DeviceModel(NamedTuple):
    """EP cost model of one routing. ``counts[i, j]``: copies device i sends to device j (sharded batch)."""
    counts: np.ndarray          # [EP, EP]
    received: np.ndarray        # [EP] rows each device's experts process (tokens per device under EP)
    receiver_skew: float        # max(received) / mean(received); 1.0 = perfectly balanced
    busiest_device: int
    dropless_buffer_rows: int   # receive buffer sized for the worst case (ep_exchange.dropless_buffer_rows)
    buffer_utilisation: float   # max(received) / dropless_buffer_rows


def device_model(ids, num_experts: int, ep: int) -> DeviceModel:
    """Busiest-device model for expert ids [T, k] with the batch split evenly over ``ep`` devices."""
    ids = np.asarray(ids)
    t, k = ids.shape
    if t % ep or num_experts % ep:
        raise ValueError(f"T={t} and E={num_experts} must split over EP={ep}")
    dst = ids // (num_experts // ep)                                  # device owning each copy's expert
    src = np.repeat(np.arange(ep), t // ep)[:, None] * np.ones((1, k), np.int64)
    counts = np.zeros((ep, ep), np.int64)
    np.add.at(counts, (src.reshape(-1), dst.reshape(-1)), 1)
    received = counts.sum(axis=0)
    buffer = dropless_buffer_rows(t // ep, k, ep, num_experts)
    return DeviceModel(counts, received, float(received.max() / received.mean()), int(received.argmax()), buffer,
                       float(received.max() / buffer))
