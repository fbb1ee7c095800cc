"""Routing patterns for the sweeps: command-line specs parsed into the generators of ``moe_ops.imbalance``.

Patterns (spec strings on the command line):

* ``balanced``   every expert gets the same number of rows (T*k/E, remainder spread over the first experts).
* ``hot:W:f``    W hot experts each get f times their fair share (T*k/E); ``f = -1`` means the E/k worst case (a hot
                 expert receives every token); the other experts split the rest evenly.
* ``zipf:s``     expert popularity ~ 1/rank^s over a random ranking of the experts.

``expert_ids(...)`` gives [T, k] int32 ids with k *distinct* experts per token (what a top-k router produces), in
random token order; ``group_sizes(...)`` gives [E] int32 sizes summing to M (for the grouped-matmul suite, which has
no tokens: one expert per row); ``logits_for_ids`` gives router logits whose top-k are exactly those ids.
``source()`` names the generator (recorded in the JSON).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_ops import imbalance


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


def source() -> str:
    return "moe_ops.imbalance"


def _ids(t: int, e: int, k: int, p: Pattern, rng) -> np.ndarray:
    if p.name == "balanced":
        ids = imbalance.balanced_ids(t, e, k)
    elif p.name == "hot":
        if not 1 <= p.hot < e:
            raise ValueError(f"routing pattern {p.label} needs 1 <= W < E={e} hot experts")
        hot = np.sort(rng.choice(e, size=p.hot, replace=False))
        ids = imbalance.hot_ids(t, e, k, num_hot=p.hot, factor=p.factor, hot_experts=hot)
    elif p.name == "zipf":
        ids = imbalance.zipf_ids(t, e, k, s=p.s, seed=int(rng.integers(1 << 31)))
        ids = rng.permutation(e).astype(np.int32)[ids]  # a random ranking of the experts (zipf_ids ranks by id)
    else:
        raise ValueError(f"unknown pattern {p.name!r}")
    return np.asarray(ids, np.int32)[rng.permutation(t)]  # random token order; the loads are unchanged


def expert_ids(num_tokens: int, num_experts: int, top_k: int, pattern: Pattern, seed: int = 0) -> np.ndarray:
    """[T, k] int32 expert ids, k distinct experts per token, whose counts follow ``pattern``."""
    return _ids(num_tokens, num_experts, top_k, pattern, np.random.default_rng(seed))


def group_sizes(num_rows: int, num_experts: int, pattern: Pattern, seed: int = 0) -> np.ndarray:
    """[E] int32 group sizes summing to ``num_rows`` that follow ``pattern`` (one expert per row: k = 1)."""
    ids = _ids(num_rows, num_experts, 1, pattern, np.random.default_rng(seed))
    return np.bincount(ids.ravel(), minlength=num_experts).astype(np.int32)


def logits_for_ids(ids: np.ndarray, num_experts: int, seed: int = 0) -> np.ndarray:
    """Router logits [T, E] f32 whose top-k are exactly ``ids``."""
    return np.asarray(imbalance.logits_for_ids(ids, num_experts, seed=seed), np.float32)


def describe(sizes: np.ndarray) -> dict:
    """Summary of a routing's group sizes: max/mean (the skew), empty groups, total."""
    sizes = np.asarray(sizes)
    mean = float(sizes.mean()) if sizes.size else 0.0
    return {"max_over_mean": float(sizes.max() / mean) if mean > 0 else 0.0, "empty_groups": int(np.sum(sizes == 0)),
            "total_rows": int(sizes.sum())}
