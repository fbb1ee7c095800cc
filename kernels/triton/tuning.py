"""Tuning for the Triton grouped matmuls: frozen configs, per-architecture tables, a shape heuristic, autotune cache.

Kept apart from the kernels (``kernels.triton.gmm``): nothing here imports Triton.

* ``TABLES[arch][kind][name] -> GmmConfig`` for ``arch`` in sm90 / gfx950 / gfx942 and ``kind`` in gmm / tgmm.
  A name ending in ``"_f32"`` is the f32 entry (ieee f32 dots run on FMA units and need small tiles); every other
  entry is for 16-bit inputs (bf16 / f16). ``shipped(arch, kind, dtype)`` lists the entries for a dtype; the AOT
  check (``kernels.aot``) compiles every one of them.
* ``pick_config(kind, M, K, N, G, dtype, arch=None)``: the heuristic (arch detected from the JAX device when None;
  on CPU the sm90 choice with tiles capped at ``CPU_MAX_TILE`` so the interpreter stays fast; a symbolic M from
  ``jax.export`` gets the fixed ``symbolic_m`` entry). An autotuned winner
  from the cache (see ``autotune``) takes precedence when present.
* Resource notes: sm90 has 227 KiB of shared memory per block and 64K 32-bit registers per SM; gfx942 has 64 KiB
  LDS and gfx950 160 KiB, both with 64-wide wavefronts (``num_warps`` counts wavefronts there). AMD entries use
  ``num_stages=2`` (in the AOT check gfx942 then kept one LDS buffer per operand tile, gfx950 two). The AMD-only
  options reach the compiler in the AOT check; ``jax_triton.triton_call`` 0.3.1 forwards only num_warps /
  num_stages / num_ctas, so at run time on ROCm they take the compiler defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings

import jax
import jax.numpy as jnp

from kernels.platform import lowering_platform

KINDS = ("gmm", "tgmm")
CPU_MAX_TILE = 32


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tile shape and compiler options. For ``gmm`` the output tile is ``block_m x block_n`` with a ``block_k``
    reduction step; for ``tgmm`` the output tile is ``block_k x block_n`` and ``block_m`` rows are reduced per step.
    ``group_m`` is the tile-swizzle band height (L2 reuse). AMD-only options are 0 / 1 when unused."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    waves_per_eu: int = 0
    matrix_instr_nonkdim: int = 0
    kpack: int = 1

    def __post_init__(self):
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{field} must be a power of two >= 16, got {value}")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"group_m, num_warps and num_stages must be >= 1, got {self}")

    @property
    def name(self) -> str:
        amd = f"_w{self.waves_per_eu}_i{self.matrix_instr_nonkdim}_k{self.kpack}" if self.matrix_instr_nonkdim else ""
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}_g{self.group_m}"
                f"_nw{self.num_warps}_ns{self.num_stages}{amd}")

    def compile_options(self, backend: str) -> dict:
        """Options for ``triton.compile`` on ``backend`` ("cuda" or "hip"); the AMD ones only for hip."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if backend == "hip":
            options.update(waves_per_eu=self.waves_per_eu, matrix_instr_nonkdim=self.matrix_instr_nonkdim,
                           kpack=self.kpack)
        return options


C = GmmConfig
# Hopper: wgmma tiles (block_m a multiple of 64 per warpgroup); at most 144 KiB of shared memory per entry
# (128x256x64 x 3 stages), so the table also fits an A100's 163 KiB. "decode" (few rows per group) is bound by
# reading the weights once: 2 tiles of 48 KiB in flight per SM are plenty; "thin" (<= 16 rows per group) reads them
# with 16-row mma.sync tiles. Swept on an H200 (benchmarks/RESULTS.md, 2026-11-26): thin 1.18x / 1.45x decode on
# the decode shape's forward / dlhs (8 rows per group). A 128x128 "narrow" entry for N <= 1024 (two 96 KiB CTAs
# per SM) was dropped again: on Qwen3-30B w1 (N = 768) large beat it in the clock-settled sweeps on an H100 (0.485
# vs 0.515 ms) and an H200 (0.439 vs 0.463 ms), and in the H200 suites (0.537 vs 0.604 ms synchronised).
_SM90 = {
    "gmm": {
        "large": C(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
        "medium": C(128, 128, 64, group_m=8, num_warps=4, num_stages=4),
        "decode": C(64, 128, 128, group_m=1, num_warps=4, num_stages=3),
        "thin": C(16, 128, 128, group_m=1, num_warps=4, num_stages=4),
        "small_f32": C(64, 64, 32, group_m=8, num_warps=4, num_stages=2),
    },
    "tgmm": {
        "large": C(64, 256, 128, group_m=8, num_warps=8, num_stages=3),
        "medium": C(64, 128, 128, group_m=8, num_warps=4, num_stages=3),
        "small_f32": C(32, 64, 64, group_m=8, num_warps=4, num_stages=2),
    },
}
# MI355 (gfx950, 160 KiB LDS) and MI300 (gfx942, 64 KiB LDS): 16x16 MFMA, 2 stages, 8 waves of 64 lanes.
# On gfx950 a 256x256x64 gmm tile (and a 64x256x256 tgmm tile) spilled VGPRs in the AOT check: 256x128 instead.
# On gfx942 a 256x256x32 gmm tile spilled too (the fused scatter 1 VGPR, the persistent descriptor kernel up to 28):
# 256x128x64 there as well (48 KiB of LDS of 64, no spills in any family).
_GFX950 = {
    "gmm": {
        "large": C(256, 128, 64, group_m=4, num_warps=8, num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16),
        "medium": C(128, 128, 64, group_m=8, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16),
        "decode": C(32, 128, 128, group_m=1, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16),
        "small_f32": C(64, 64, 32, group_m=8, num_warps=4, num_stages=2, matrix_instr_nonkdim=16),
    },
    "tgmm": {
        "large": C(64, 256, 128, group_m=4, num_warps=8, num_stages=2, matrix_instr_nonkdim=16),
        "medium": C(64, 128, 128, group_m=8, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16),
        "small_f32": C(32, 64, 64, group_m=8, num_warps=4, num_stages=2, matrix_instr_nonkdim=16),
    },
}
_GFX942 = {
    "gmm": {
        "large": C(256, 128, 64, group_m=4, num_warps=8, num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16),
        "medium": C(128, 128, 64, group_m=8, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16),
        "decode": C(32, 128, 64, group_m=1, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16),
        "small_f32": C(64, 64, 32, group_m=8, num_warps=4, num_stages=2, matrix_instr_nonkdim=16),
    },
    "tgmm": {
        "large": C(64, 256, 128, group_m=4, num_warps=8, num_stages=2, matrix_instr_nonkdim=16),
        "medium": C(64, 128, 64, group_m=8, num_warps=4, num_stages=2, waves_per_eu=2, matrix_instr_nonkdim=16),
        "small_f32": C(32, 64, 64, group_m=8, num_warps=4, num_stages=2, matrix_instr_nonkdim=16),
    },
}
del C
TABLES = {"sm90": _SM90, "gfx950": _GFX950, "gfx942": _GFX942}
NUM_SMS = {"sm90": 132, "gfx950": 256, "gfx942": 304}


def is_f32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32


def shipped(arch: str, kind: str, dtype) -> dict[str, GmmConfig]:
    """The table entries of ``arch`` / ``kind`` meant for inputs of ``dtype``."""
    table = TABLES[arch][kind]
    return {name: cfg for name, cfg in table.items() if name.endswith("_f32") == is_f32(dtype)}


# The arch a GPU platform is exported for from a host without that GPU (``MOE_OPS_CUDA_ARCH`` /
# ``MOE_OPS_ROCM_ARCH`` override it): jax-triton compiles for the compute capability / gfx name it is given.
EXPORT_ARCH = {"cuda": "sm90", "rocm": "gfx950"}


def _device_arch(device) -> str:
    text = f"{getattr(device, 'compute_capability', '')} {device.device_kind}".lower()
    if device.platform == "rocm" or "gfx" in text or "instinct" in text or "mi3" in text:
        return "gfx950" if ("gfx95" in text or "mi35" in text) else "gfx942"
    return "sm90"


def detect_arch() -> str:
    """Tuning-table key: ``"cpu"``, ``"sm90"``, ``"gfx950"`` or ``"gfx942"``, for the platform being lowered
    (``kernels.platform.lowering_platform``: "cpu" runs the interpreter bridge; a GPU platform uses the default
    device's arch when that device is of the platform, else ``EXPORT_ARCH``), or for the default JAX device
    outside a per-platform lowering. Other NVIDIA GPUs use the sm90 table (every entry fits an A100)."""
    platform = lowering_platform()
    device = jax.devices()[0]
    if platform is None:
        return "cpu" if device.platform == "cpu" else _device_arch(device)
    if platform not in EXPORT_ARCH:  # cpu runs the interpreter bridge; no Triton elsewhere
        return "cpu"
    if device.platform in (platform, "gpu") and _device_arch(device).startswith("gfx") == (platform == "rocm"):
        return _device_arch(device)
    variable = f"MOE_OPS_{platform.upper()}_ARCH"
    arch = os.environ.get(variable, EXPORT_ARCH[platform])
    if arch not in TABLES or arch.startswith("gfx") != (platform == "rocm"):
        valid = sorted(a for a in TABLES if a != "cpu" and a.startswith("gfx") == (platform == "rocm"))
        raise ValueError(f"{variable}={arch!r}: the {platform} tuning tables are {valid}")
    return arch


def _bucket(kind, m, k, n, g, dtype) -> str:
    """Autotune cache key: rows per group rounded up to a power of two, exact K and N, dtype."""
    rows = max(1, -(-m // max(g, 1)))
    return f"{kind}|rows{1 << (rows - 1).bit_length()}|g{1 << (max(g, 1) - 1).bit_length()}|k{k}|n{n}|" \
           f"{jnp.dtype(dtype).name}"


def heuristic(kind: str, m: int, k: int, n: int, g: int, dtype, arch: str) -> str:
    """Name of the table entry for a shape: f32 -> small_f32; gmm groups of <= 16 / <= 64 rows -> thin / decode
    (where the table has them); too few output tiles of the large config to fill the machine twice -> medium;
    else large. TGMM over groups of <= 64 rows (writing the weight gradient dominates) -> medium."""
    if is_f32(dtype):
        return "small_f32"
    table = TABLES[arch][kind]
    rows = m / max(g, 1)
    big = table["large"]
    if kind == "gmm":
        for name, limit in (("thin", 16), ("decode", 64)):
            if name in table and rows <= limit:
                return name
        tiles = (-(-m // big.block_m) + g) * -(-n // big.block_n)
    else:
        if rows <= 64:
            return "medium"
        tiles = g * -(-k // big.block_k) * -(-n // big.block_n)
    if tiles < 2 * NUM_SMS[arch]:
        return "medium"
    return "large"


def pick_config(kind: str, m: int, k: int, n: int, g: int, dtype, arch: str | None = None) -> GmmConfig:
    """The config for a problem (static shapes). ``arch=None`` detects it; ``"cpu"`` gives the interpreter config.
    With ``MOE_OPS_AUTOTUNE=1`` on a GPU, an uncached shape bucket is autotuned first (once per process)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    arch = detect_arch() if arch is None else arch
    if not isinstance(m, int):  # symbolic M (jax.export shape polymorphism): no cache, no autotune, see symbolic_m
        return symbolic_m(kind, dtype, arch)
    if arch == "cpu":
        return _interpreter_config(TABLES["sm90"][kind][heuristic(kind, m, k, n, g, dtype, "sm90")])
    cached = _cache_lookup(arch, _bucket(kind, m, k, n, g, dtype))
    if cached is not None:
        return cached
    if os.environ.get("MOE_OPS_AUTOTUNE", "0") == "1" and _on_gpu():  # never from interpreter timings (export)
        return autotune(kind, m, k, n, g, dtype)
    return TABLES[arch][kind][heuristic(kind, m, k, n, g, dtype, arch)]


def symbolic_m(kind: str, dtype, arch: str) -> GmmConfig:
    """The config when M is symbolic (exported with ``jax.export.symbolic_shape``): M-independent, the "medium"
    entry for 16-bit inputs (never "decode", whose 64-row tiles waste most of a tile per group at large M; "medium"
    fills the machine at smaller M than "large") and "small_f32" for f32. The CPU interpreter caps apply as usual."""
    name = "small_f32" if is_f32(dtype) else "medium"
    return _interpreter_config(TABLES["sm90"][kind][name]) if arch == "cpu" else TABLES[arch][kind][name]


def _interpreter_config(cfg: GmmConfig) -> GmmConfig:
    """The sm90 entry with tiles capped at ``CPU_MAX_TILE`` (the interpreter stays fast)."""
    return dataclasses.replace(cfg, block_m=min(cfg.block_m, CPU_MAX_TILE), block_n=min(cfg.block_n, CPU_MAX_TILE),
                               block_k=min(cfg.block_k, CPU_MAX_TILE), num_stages=1)


# ---------------------------------------------------------------------------------------------------------------
# Autotune-and-cache: only on a real GPU, only when asked (MOE_OPS_AUTOTUNE=1 or a direct call).

_cache_lock = threading.Lock()
_cache: dict | None = None


def cache_path() -> str:
    return os.environ.get("MOE_OPS_TUNING_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "moe_ops", "triton_gmm_tuning.json"))


def _on_gpu() -> bool:
    """Whether this process has a GPU to time kernels on (a cuda / rocm lowering on a CPU host has none)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _load_cache() -> dict:
    """The autotune cache: ``{arch: {bucket: GmmConfig fields}}``; a missing file is empty, a broken one is
    ignored with a warning (its path named), never half-used."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = {}
            try:
                with open(cache_path()) as f:
                    loaded = json.load(f)
                fields = {f.name for f in dataclasses.fields(GmmConfig)}
                if not (isinstance(loaded, dict) and all(
                        isinstance(t, dict) and all(isinstance(e, dict) and set(e) <= fields for e in t.values())
                        for t in loaded.values())):
                    raise ValueError("not {arch: {bucket: config fields}}")
                _cache = loaded
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as err:
                warnings.warn(f"ignoring the Triton tuning cache {cache_path()} ({err}); shipped tables are used",
                              stacklevel=2)
        return _cache


def _cache_lookup(arch: str, bucket: str) -> GmmConfig | None:
    entry = _load_cache().get(arch, {}).get(bucket)
    return None if entry is None else GmmConfig(**entry)


def _cache_store(arch: str, bucket: str, cfg: GmmConfig) -> None:
    cache = _load_cache()
    with _cache_lock:
        cache.setdefault(arch, {})[bucket] = dataclasses.asdict(cfg)
        path = cache_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


def store(arch: str, kind: str, m: int, k: int, n: int, g: int, dtype, cfg: GmmConfig) -> None:
    """Cache ``cfg`` for the shape bucket of (kind, m, k, n, g, dtype) on ``arch`` (``pick_config`` prefers it)."""
    _cache_store(arch, _bucket(kind, m, k, n, g, dtype), cfg)


def autotune(kind: str, m: int, k: int, n: int, g: int, dtype, candidates=None, reps: int = 10) -> GmmConfig:
    """Time every candidate (default: the arch's shipped entries for ``dtype``) on random data with balanced groups,
    cache the fastest under (arch, shape bucket, dtype) and return it. Real GPUs only; never called by tests.
    Safe to call while an outer ``jit`` traces (it runs eagerly under ``ensure_compile_time_eval``)."""
    arch = detect_arch()
    if arch == "cpu" or not _on_gpu():
        raise RuntimeError("autotune needs a GPU to time kernels on; on CPU the interpreter config is fixed and a "
                           "cuda / rocm lowering uses the shipped tables")
    candidates = list(shipped(arch, kind, dtype).values()) if candidates is None else list(candidates)
    with jax.ensure_compile_time_eval():
        best = _fastest(kind, m, k, n, g, dtype, candidates, reps)
    store(arch, kind, m, k, n, g, dtype, best)
    return best


def _fastest(kind, m, k, n, g, dtype, candidates, reps):
    import time

    import numpy as np

    from kernels.triton import gmm as gmm_module  # lazy: the kernels import this module

    key_a, key_b = jax.random.split(jax.random.key(0))
    sizes = jnp.asarray(np.full(g, m // g) + (np.arange(g) < m % g), jnp.int32)
    offset = jnp.zeros((1,), jnp.int32)
    lhs = jax.random.normal(key_a, (m, k), jnp.float32).astype(dtype)
    if kind == "gmm":
        rhs = jax.random.normal(key_b, (g, k, n), jnp.float32).astype(dtype)
        run = lambda cfg: gmm_module.gmm(lhs, rhs, sizes, offset, transpose_rhs=False, out_dtype=dtype, config=cfg)
    else:
        rhs = jax.random.normal(key_b, (m, n), jnp.float32).astype(dtype)
        run = lambda cfg: gmm_module.tgmm(lhs, rhs, sizes, offset, num_groups=g, out_dtype=dtype, config=cfg)
    best, best_time = None, float("inf")
    for cfg in candidates:
        fn = jax.jit(lambda cfg=cfg: run(cfg))
        try:
            jax.block_until_ready(fn())
        except Exception:  # a config that fails to compile or launch on this device is skipped
            continue
        start = time.perf_counter()
        for _ in range(reps):
            out = fn()
        jax.block_until_ready(out)
        if time.perf_counter() - start < best_time:
            best, best_time = cfg, time.perf_counter() - start
    if best is None:
        raise RuntimeError(f"no candidate config ran for {kind} {m}x{k}x{n} G={g} {jnp.dtype(dtype).name}")
    return best
