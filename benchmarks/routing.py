"""Routing patterns for the sweeps, behind one function that prefers ``moe_ops.imbalance`` when it is importable.

Patterns (spec strings on the command line):

* ``balanced``   every expert gets the same number of rows (T*k/E, remainder spread over the first experts).
* ``hot:W:f``    W hot experts each get f times their fair share (T*k/E); ``f = -1`` means the E/k worst case (a hot
                 expert receives every token); the other experts split the rest evenly.
* ``zipf:s``     expert popularity ~ 1/rank^s over a random ranking of the experts.

``expert_ids(...)`` gives [T, k] int32 ids with k *distinct* experts per token (what a top-k router produces), in
random token order; ``group_sizes(...)`` gives [E] int32 sizes summing to M (for the grouped-matmul suite, which has
no tokens: one expert per row); ``logits_for_ids`` gives router logits whose top-k are exactly those ids.
``source()`` says which generator ran: ``"moe_ops.imbalance"`` or ``"benchmarks.routing (local)"`` with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pattern:
    name: str          # "balanced" | "hot" | "zipf"
    hot: int = 0       # W
    factor: float = 0  # f
    s: float = 0.0     # Zipf exponent

    @property
    def label(self) -> str:
        if self.name == "hot":
            return f"hot:{self.hot}:{self.factor:g}"
        if self.name == "zipf":
            return f"zipf:{self.s:g}"
        return "balanced"

    def as_dict(self) -> dict:
        out = {"name": self.name, "label": self.label}
        if self.name == "hot":
            out.update(W=self.hot, f=self.factor)
        if self.name == "zipf":
            out.update(s=self.s)
        return out


BALANCED = Pattern("balanced")


def parse(spec: str) -> Pattern:
    """``balanced`` | ``hot:W:f`` | ``zipf:s`` -> Pattern (ValueError on anything else)."""
    parts = spec.strip().split(":")
    try:
        if parts == ["balanced"]:
            return BALANCED
        if parts[0] == "hot" and len(parts) == 3:
            return Pattern("hot", hot=int(parts[1]), factor=float(parts[2]))
        if parts[0] == "zipf" and len(parts) == 2:
            return Pattern("zipf", s=float(parts[1]))
    except ValueError:
        pass
    raise ValueError(f"routing pattern must be 'balanced', 'hot:W:f' or 'zipf:s', got {spec!r}")


def parse_list(specs: str) -> list[Pattern]:
    return [parse(s) for s in specs.split(",") if s.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Which generator: moe_ops.imbalance when it offers its generators, else the local one (and say why).

_IMBALANCE_API = ("balanced_ids", "hot_ids", "zipf_ids", "logits_for_ids")


def _imbalance_module():
    """(module or None, reason)."""
    try:
        mod = importlib.import_module("moe_ops.imbalance")
    except ImportError as exc:
        return None, f"moe_ops.imbalance not importable ({exc})"
    missing = [f for f in _IMBALANCE_API if not callable(getattr(mod, f, None))]
    if missing:
        return None, f"moe_ops.imbalance lacks {missing}"
    return mod, ""


def source() -> str:
    mod, reason = _imbalance_module()
    return "moe_ops.imbalance" if mod is not None else f"benchmarks.routing (local): {reason}"


def _imbalance_ids(mod, t: int, e: int, k: int, p: Pattern, rng) -> np.ndarray:
    if p.name == "balanced":
        ids = mod.balanced_ids(t, e, k)
    elif p.name == "hot":
        hot = np.sort(rng.choice(e, size=p.hot, replace=False))
        ids = mod.hot_ids(t, e, k, num_hot=p.hot, factor=p.factor, hot_experts=hot)
    elif p.name == "zipf":
        ids = mod.zipf_ids(t, e, k, s=p.s, seed=int(rng.integers(1 << 31)))
    else:
        raise ValueError(f"unknown pattern {p.name!r}")
    return np.asarray(ids, np.int32)[rng.permutation(t)]  # random token order; the loads are unchanged


def expert_ids(num_tokens: int, num_experts: int, top_k: int, pattern: Pattern, seed: int = 0) -> np.ndarray:
    """[T, k] int32 expert ids, k distinct experts per token, whose counts follow ``pattern``."""
    mod, _ = _imbalance_module()
    if mod is not None:
        return _imbalance_ids(mod, num_tokens, num_experts, top_k, pattern, np.random.default_rng(seed))
    return _local_expert_ids(num_tokens, num_experts, top_k, pattern, seed)


def group_sizes(num_rows: int, num_experts: int, pattern: Pattern, seed: int = 0) -> np.ndarray:
    """[E] int32 group sizes summing to ``num_rows`` that follow ``pattern`` (one expert per row: k = 1)."""
    mod, _ = _imbalance_module()
    if mod is not None:
        ids = _imbalance_ids(mod, num_rows, num_experts, 1, pattern, np.random.default_rng(seed))
        return np.bincount(ids.ravel(), minlength=num_experts).astype(np.int32)
    return _target_counts(num_rows, num_experts, pattern, cap=num_rows, rng=np.random.default_rng(seed))


def logits_for_ids(ids: np.ndarray, num_experts: int, seed: int = 0) -> np.ndarray:
    """Router logits [T, E] f32 whose top-k are exactly ``ids`` (chosen in (3, 4), others in (-1, 0))."""
    mod, _ = _imbalance_module()
    if mod is not None:
        return np.asarray(mod.logits_for_ids(ids, num_experts, seed=seed), np.float32)
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-1.0, 0.0, (ids.shape[0], num_experts))
    np.put_along_axis(logits, np.asarray(ids), rng.uniform(3.0, 4.0, ids.shape), axis=1)
    return logits.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Local generator.


def _even(total: int, n: int) -> np.ndarray:
    out = np.full(n, total // n, np.int64)
    out[: total % n] += 1
    return out


def _target_counts(total: int, num_experts: int, p: Pattern, cap: int, rng) -> np.ndarray:
    """Per-expert row counts summing to ``total``, each <= ``cap`` (a token picks an expert at most once)."""
    e = num_experts
    if p.name == "balanced":
        counts = _even(total, e)
    elif p.name == "hot":
        w = max(0, min(p.hot, e))
        fair = total / e
        per_hot = cap if p.factor == -1 else min(cap, int(round(p.factor * fair)))
        per_hot = min(per_hot, total // max(w, 1))
        rest = total - per_hot * w
        counts = np.concatenate([np.full(w, per_hot, np.int64), _even(rest, e - w) if e > w else np.zeros(0)])
        if e == w:
            counts = _even(total, e)
        counts = counts[rng.permutation(e)]  # hot experts at random positions
    elif p.name == "zipf":
        probs = 1.0 / np.arange(1, e + 1, dtype=np.float64) ** p.s
        probs = probs[rng.permutation(e)]
        counts = np.floor(probs / probs.sum() * total).astype(np.int64)
        for i in np.argsort(-probs)[: total - counts.sum()]:
            counts[i] += 1
    else:
        raise ValueError(f"unknown pattern {p.name!r}")
    return _respect_cap(counts, cap).astype(np.int32)


def _respect_cap(counts: np.ndarray, cap: int) -> np.ndarray:
    """Move the excess above ``cap`` to the experts with the most room (keeps the sum)."""
    counts = counts.copy()
    excess = int(np.sum(np.maximum(counts - cap, 0)))
    counts = np.minimum(counts, cap)
    while excess > 0:
        i = int(np.argmin(counts))
        step = min(excess, cap - counts[i])
        if step <= 0:
            raise ValueError("routing pattern infeasible: more rows than experts x cap")
        counts[i] += step
        excess -= step
    return counts


def _local_expert_ids(t: int, e: int, k: int, p: Pattern, seed: int) -> np.ndarray:
    """Each token takes the k experts with the most remaining quota (random tie-break): meets the counts exactly."""
    if not 1 <= k <= e:
        raise ValueError(f"top_k must be in [1, E={e}], got {k}")
    rng = np.random.default_rng(seed)
    remaining = _target_counts(t * k, e, p, cap=t, rng=rng).astype(np.float64)
    ids = np.empty((t, k), np.int32)
    for tok in range(t):
        # remaining quota, jittered in [0, 1) so equal quotas break ties at random; quota itself dominates
        pick = np.argpartition(-(remaining + rng.random(e)), k - 1)[:k]
        ids[tok] = pick
        remaining[pick] -= 1
    if np.any(remaining != 0):  # greedy by largest quota meets any feasible count vector; guard anyway
        raise AssertionError(f"local routing generator missed its counts by {remaining}")
    return ids[rng.permutation(t)]


def describe(sizes: np.ndarray) -> dict:
    """Summary of a routing's group sizes: max/mean (the skew), empty groups, total."""
    sizes = np.asarray(sizes)
    mean = float(sizes.mean()) if sizes.size else 0.0
    return {"max_over_mean": float(sizes.max() / mean) if mean > 0 else 0.0, "empty_groups": int(np.sum(sizes == 0)),
            "total_rows": int(sizes.sum())}
