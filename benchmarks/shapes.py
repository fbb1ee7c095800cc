"""Shape presets of the benchmark suites (frozen dataclasses) and their tiny CPU twins.

GMM shapes (issue 3): M rows = tokens x top_k on one device, E local experts, lhs [M,K] @ rhs [E,K,N].
Sort shapes (issue 5): T tokens, D hidden, E experts, k = top_k.
Layer shapes: the routed SwiGLU layer ``moe_ffn`` (x [T,D], w_gate/w_up [E,D,F], w_down [E,F,D], top_k k).
Every preset has a ``tiny`` twin of the same family (same E/k ratio where it fits) for ``--tiny`` runs on CPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GmmShape:
    name: str
    m: int
    k: int
    n: int
    e: int
    decode: bool = False  # memory-bound: judged in % of copy rate over the weight bytes of non-empty groups

    def flops(self, rows: int | None = None) -> float:
        """Useful forward flops: 2 * rows * K * N (rows = routed rows, M by default)."""
        return 2.0 * (self.m if rows is None else rows) * self.k * self.n

    def as_dict(self) -> dict:
        return {"name": self.name, "M": self.m, "K": self.k, "N": self.n, "E": self.e}


@dataclasses.dataclass(frozen=True)
class SortShape:
    name: str
    t: int
    d: int
    e: int
    topk: int

    def as_dict(self) -> dict:
        return {"name": self.name, "T": self.t, "D": self.d, "E": self.e, "k": self.topk}


@dataclasses.dataclass(frozen=True)
class LayerShape:
    name: str
    t: int
    d: int
    f: int
    e: int
    topk: int

    def flops(self) -> float:
        """Useful forward flops of the three grouped matmuls: 3 * 2 * (T*k) * D * F."""
        return 6.0 * self.t * self.topk * self.d * self.f

    def as_dict(self) -> dict:
        return {"name": self.name, "T": self.t, "D": self.d, "F": self.f, "E": self.e, "k": self.topk}


GMM_SHAPES = {
    "mixtral-w1": GmmShape("mixtral-w1", 16384, 4096, 14336, 8),
    "mixtral-w2": GmmShape("mixtral-w2", 16384, 14336, 4096, 8),
    "dsv3-ep8-w1": GmmShape("dsv3-ep8-w1", 32768, 7168, 2048, 32),
    "dsv3-ep8-w2": GmmShape("dsv3-ep8-w2", 32768, 2048, 7168, 32),
    "qwen3-30b-w1": GmmShape("qwen3-30b-w1", 65536, 2048, 768, 128),
    "gpt-oss-w1": GmmShape("gpt-oss-w1", 32768, 2880, 5760, 32),
    "decode": GmmShape("decode", 256, 7168, 2048, 32, decode=True),
}
GMM_TINY = {
    "mixtral-w1": GmmShape("mixtral-w1-tiny", 64, 32, 48, 4),
    "qwen3-30b-w1": GmmShape("qwen3-30b-w1-tiny", 96, 16, 24, 16),
    "decode": GmmShape("decode-tiny", 8, 48, 32, 8, decode=True),
}

SORT_SHAPES = {
    "mixtral": SortShape("mixtral", 8192, 4096, 8, 2),
    "dsv3": SortShape("dsv3", 4096, 7168, 256, 8),
    "qwen3-30b": SortShape("qwen3-30b", 16384, 2048, 128, 8),
}
SORT_TINY = {
    "mixtral": SortShape("mixtral-tiny", 64, 32, 8, 2),
    "dsv3": SortShape("dsv3-tiny", 32, 16, 64, 8),
}

LAYER_SHAPES = {
    "mixtral": LayerShape("mixtral", 8192, 4096, 14336, 8, 2),
    "dsv3-ep8": LayerShape("dsv3-ep8", 4096, 7168, 2048, 32, 8),
    "qwen3-30b": LayerShape("qwen3-30b", 8192, 2048, 768, 128, 8),
    "gpt-oss": LayerShape("gpt-oss", 8192, 2880, 2880, 32, 4),
}
LAYER_TINY = {
    "mixtral": LayerShape("mixtral-tiny", 32, 32, 64, 4, 2),
    "qwen3-30b": LayerShape("qwen3-30b-tiny", 16, 16, 32, 16, 4),
    "gpt-oss": LayerShape("gpt-oss-tiny", 16, 32, 32, 4, 2),
}

# The CPU main job: a "small" layer for the XLA backend and a "tiny" one that the emulated kernels can afford.
MAIN_SMALL = LayerShape("small", 256, 64, 128, 8, 2)
MAIN_TINY = LayerShape("tiny", 32, 32, 64, 4, 2)


def select(presets: dict, names: str | None) -> list:
    """Presets named in a comma list (``None`` = all); unknown names raise with the known ones listed."""
    if not names:
        return list(presets.values())
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in presets]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {sorted(presets)}")
    return [presets[n] for n in wanted]
