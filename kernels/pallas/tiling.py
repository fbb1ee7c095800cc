"""Tile sizes ``(tm, tk, tn)`` for the Pallas grouped matmuls, chosen per shape under a VMEM budget.

VMEM assumed per TensorCore (physical capacity from ``jax._src.pallas.mosaic.tpu_info``; the *scoped* limit is what a
kernel gets without ``vmem_limit_bytes`` / ``--xla_tpu_scoped_vmem_limit_kib``; the kernels here never raise it):

=====  ==============  ===================  ============  ===========
chip   physical VMEM   default scoped VMEM  budget (75%)  MXU columns
=====  ==============  ===================  ============  ===========
v5e    128 MiB         16 MiB               12 MiB        128
v5p     64 MiB         16 MiB               12 MiB        128
v6e    128 MiB         32 MiB               24 MiB        256
=====  ==============  ===================  ============  ===========

The 25% headroom is left for Mosaic's internal scratch (matmul staging, masks, relayouts). The VMEM a tiling needs
(every pipelined block is double-buffered; the f32 accumulator is single):

* gmm:  ``2*(tm*tk + tk*tn)*in_bytes + 2*tm*tn*out_bytes*(1 + existing_out) + 4*tm*tn``
* tgmm: ``2*(tm*tk + tm*tn)*in_bytes + 2*tk*tn*out_bytes*(1 + existing_out) + 4*tk*tn``

Heuristic (``choose``):

1. ``tk``, ``tn`` (lane dims): the whole dim if it is at most the cap (a full-dim block is always legal), else the
   largest multiple of 128 that divides the dim and is at most the cap, else the cap itself (a partial last block:
   the gmm kernel masks the K remainder, the N remainder is clipped on store). Caps start at 1024 (``tk``) and 1024
   (``tn``; 2048 on v6e with its 256-wide MXU).
2. ``tm`` (rows): every row tile shared by two groups is computed once per group, so the work is about
   ``M + (G_local - 1) * tm`` rows; ``tm`` is the largest power of two with ``(G_local - 1) * tm <= M / 4`` (at most
   ~25% extra), clamped to ``[128, 512]`` (MXU-sized) and to ``M`` rounded up to the sublane multiple (8 for 4-byte,
   16 for 2-byte dtypes: the packed-row tile).
3. While the tiling exceeds the budget, halve the cap of ``tk`` (down to 128), then of ``tn`` (down to 128), then
   of ``tm`` (down to the sublane multiple), and redo 1-2.

An explicit ``Tiling`` bypasses all of this (it is only checked for legal block shapes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MiB = 1024 * 1024
LANE = 128


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Row, contraction and column tile sizes of one kernel call."""
    tm: int
    tk: int
    tn: int


@dataclasses.dataclass(frozen=True)
class ChipVmem:
    """What the heuristic assumes about one TPU generation (per TensorCore)."""
    name: str
    physical_bytes: int
    scoped_bytes: int
    mxu: int
    headroom: float = 0.75

    @property
    def budget_bytes(self) -> int:
        return int(self.scoped_bytes * self.headroom)


CHIPS = {
    "v5e": ChipVmem("v5e", 128 * MiB, 16 * MiB, 128),
    "v5p": ChipVmem("v5p", 64 * MiB, 16 * MiB, 128),
    "v6e": ChipVmem("v6e", 128 * MiB, 32 * MiB, 256),
}
DEFAULT_CHIP = "v5e"  # smallest budget: what we assume off-TPU (CPU interpret mode, export for TPU)


def detect_chip() -> str:
    """The chip of the default device when it is a TPU we know, else ``DEFAULT_CHIP``."""
    kind = jax.devices()[0].device_kind.lower() if jax.default_backend() == "tpu" else ""
    if "v6" in kind:
        return "v6e"
    if "v5" in kind and ("lite" in kind or "v5e" in kind):
        return "v5e"
    if "v5" in kind:
        return "v5p"
    return DEFAULT_CHIP


def sublane(*dtypes) -> int:
    """Row multiple of a legal block: 8 rows of 4-byte, 16 of 2-byte, 32 of 1-byte elements (packed tiles)."""
    return 32 // min(jnp.dtype(d).itemsize for d in dtypes)


def vmem_bytes(kernel: str, t: Tiling, in_dtype, out_dtype, existing_out: bool = False) -> int:
    """VMEM the pipelined blocks + accumulator of ``kernel`` ("gmm" or "tgmm") need (formula in module doc)."""
    ib, ob = jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize
    if kernel == "gmm":
        ins, out = t.tm * t.tk + t.tk * t.tn, t.tm * t.tn
    elif kernel == "tgmm":
        ins, out = t.tm * t.tk + t.tm * t.tn, t.tk * t.tn
    else:
        raise ValueError(f"kernel must be 'gmm' or 'tgmm', got {kernel!r}")
    return 2 * ins * ib + 2 * out * ob * (1 + int(existing_out)) + 4 * out


def lane_tile(dim: int, cap: int) -> int:
    """Tile of a lane-mapped dim (step 1 of the heuristic)."""
    if dim <= cap:
        return dim
    for t in range(cap - cap % LANE, 0, -LANE):
        if dim % t == 0:
            return t
    return max(LANE, cap - cap % LANE)


def row_tile(m: int, num_groups: int, sub: int, cap: int = 512) -> int:
    """Row tile (step 2 of the heuristic). A symbolic M (``jax.export`` shape polymorphism) gets the smallest
    MXU-sized tile, 128 rows (or the cap): no concrete M is needed, at most 127 padded rows per group boundary, and
    the last partial row tile is masked as for any M."""
    if not isinstance(m, int):
        return min(LANE, cap)
    tm = LANE
    while tm * 2 <= cap and max(num_groups - 1, 1) * tm * 2 * 4 <= m:
        tm *= 2
    return min(tm, -(-m // sub) * sub)


def choose(kernel: str, m: int, k: int, n: int, num_groups: int, in_dtype, out_dtype, *,
           existing_out: bool = False, chip: str | None = None) -> Tiling:
    """The heuristic tiling for ``kernel`` on ``chip`` (default: ``detect_chip()``); see the module doc."""
    spec = CHIPS[chip or detect_chip()]
    sub = sublane(in_dtype, out_dtype)
    caps = {"tk": 1024, "tn": 2048 if spec.mxu >= 256 else 1024, "tm": 512}
    while True:
        t = Tiling(row_tile(m, num_groups, sub, caps["tm"]), lane_tile(k, caps["tk"]), lane_tile(n, caps["tn"]))
        if vmem_bytes(kernel, t, in_dtype, out_dtype, existing_out) <= spec.budget_bytes:
            return t
        for name, floor in (("tk", LANE), ("tn", LANE), ("tm", sub)):
            if caps[name] // 2 >= floor:
                caps[name] //= 2
                break
        else:
            return t  # already minimal: tiny tiles always fit; only absurd dims get here


def check(t: Tiling, m: int, k: int, n: int, *dtypes) -> Tiling:
    """Raise ``ValueError`` unless ``t`` gives legal Mosaic blocks: tm a multiple of the sublane count (or M),
    tk / tn multiples of 128 or the whole dim."""
    sub = sublane(*dtypes)
    if min(t.tm, t.tk, t.tn) <= 0:
        raise ValueError(f"tile sizes must be positive, got {t}")
    if t.tm % sub and t.tm != m:
        raise ValueError(f"tm={t.tm} must be a multiple of {sub} (or equal M={m})")
    for name, tile, dim in (("tk", t.tk, k), ("tn", t.tn, n)):
        if tile % LANE and tile != dim:
            raise ValueError(f"{name}={tile} must be a multiple of {LANE} or equal the dim ({dim})")
    return t
