"""Peers (other libraries' grouped matmuls) and the same run's ceilings (dense matmul, HBM copy).

A peer that cannot run here is returned as ``Peer(available=False, reason=...)`` and reported, never dropped:

* ``lax.ragged_dot``      always importable; its backward densifies (out of memory at DeepSeek-like shapes: caught
                          per measurement and reported as status ``oom``).
* ``tokamax:mosaic``      when ``import tokamax`` works (its Mosaic GPU kernel; GPU only). tokamax 0.0.17 imports
                          ``xprof`` at import time: when that is the only failure, a stub ``xprof.cli.tools`` module
                          is put on ``sys.modules`` and the peer's label says so.
* ``torch._grouped_mm``   when torch with CUDA is present (CUTLASS grouped GEMM; autograd for forward+backward).

Each peer exposes ``fwd(lhs, rhs, group_sizes_np)`` and ``fwd_bwd(...)`` builders returning a callable on prepared
inputs, so the GMM suite times them exactly like ``moe_ops``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import env
from benchmarks.timing import measure, random_normal


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    available: bool
    reason: str = ""
    # prepare(lhs, rhs, sizes_np, ct) -> args; fwd(*args) -> out; fwd_bwd(*args) -> (dlhs, drhs)
    prepare: Callable | None = None
    fwd: Callable | None = None
    fwd_bwd: Callable | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# lax.ragged_dot


def _lax_peer() -> Peer:
    def prepare(lhs, rhs, sizes, ct):
        return lhs, rhs, jnp.asarray(sizes, jnp.int32), ct

    def f(lhs, rhs, gs):
        return jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32).astype(lhs.dtype)

    def fb(lhs, rhs, gs, ct):
        _, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
        return vjp(ct)

    return Peer("lax.ragged_dot", True, prepare=prepare, fwd=jax.jit(lambda a, b, g, _ct: f(a, b, g)),
                fwd_bwd=jax.jit(fb))


# ---------------------------------------------------------------------------------------------------------------
# tokamax


def _import_tokamax():
    """(module, note). Retries once with an ``xprof`` stub when that is the only missing piece."""
    try:
        import tokamax
        return tokamax, ""
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("xprof"):
            raise
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
    import tokamax
    return tokamax, "xprof stubbed"


def _tokamax_peer() -> Peer:
    name = "tokamax:mosaic"
    if not env.on_gpu():
        return Peer(name, False, f"tokamax's Mosaic GPU kernel needs a GPU (backend is {jax.default_backend()})")
    try:
        tokamax, note = _import_tokamax()
    except Exception as exc:  # noqa: BLE001 - reported as the peer's reason
        return Peer(name, False, env.reason(exc))

    def f(lhs, rhs, gs):
        return tokamax.ragged_dot(lhs, rhs, gs, implementation="mosaic")

    def fb(lhs, rhs, gs, ct):
        _, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
        return vjp(ct)

    return Peer(name, True, prepare=_lax_peer().prepare, fwd=jax.jit(lambda a, b, g, _ct: f(a, b, g)),
                fwd_bwd=jax.jit(fb), note=note)


# ---------------------------------------------------------------------------------------------------------------
# torch._grouped_mm


def _to_torch(x):
    import torch
    try:
        return torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 - a host copy is always possible (slower set-up, same data)
        t = torch.from_numpy(np.asarray(x, np.float32))
        return t.to("cuda", dtype=torch.bfloat16 if x.dtype == jnp.bfloat16 else t.dtype)


def _torch_peer() -> Peer:
    name = "torch._grouped_mm"
    try:
        import torch
    except ImportError as exc:
        return Peer(name, False, env.reason(exc))
    if not torch.cuda.is_available():
        return Peer(name, False, f"torch {torch.__version__} has no CUDA device")
    if not hasattr(torch, "_grouped_mm"):
        return Peer(name, False, f"torch {torch.__version__} has no _grouped_mm")

    def prepare(lhs, rhs, sizes, ct):
        a = _to_torch(lhs).contiguous()
        # CUTLASS wants b K-major: build [E, N, K] and view it as [E, K, N]
        b = _to_torch(jnp.swapaxes(rhs, 1, 2)).contiguous().transpose(-2, -1)
        offs = torch.from_numpy(np.cumsum(sizes).astype(np.int32)).to("cuda")
        return a, b, offs, _to_torch(ct).contiguous()

    def fwd(a, b, offs, _ct):
        return torch._grouped_mm(a, b, offs=offs, out_dtype=a.dtype)

    def fwd_bwd(a, b, offs, ct):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        torch._grouped_mm(a, b, offs=offs, out_dtype=a.dtype).backward(ct)
        return a.grad, b.grad

    return Peer(name, True, prepare=prepare, fwd=fwd, fwd_bwd=fwd_bwd)


def gmm_peers(names=None) -> list[Peer]:
    builders = {"lax.ragged_dot": _lax_peer, "tokamax:mosaic": _tokamax_peer, "torch._grouped_mm": _torch_peer}
    return [builders[n]() for n in (names or builders)]


# ---------------------------------------------------------------------------------------------------------------
# Ceilings of this run.


def ceilings(tiny: bool, *, repeats: int = 10) -> tuple[dict, list[dict]]:
    """(``{"matmul_tflops", "copy_gbps"}``, their records): dense matmul n^3 and an elementwise copy (read+write).

    GPU: bf16 8192^3 and a 1 GiB buffer. CPU / ``tiny``: f32 512^3 and 16 MiB (figures only for ratios here)."""
    from benchmarks.records import record
    gpu = env.on_gpu() and not tiny
    n, dtype = (8192, jnp.bfloat16) if gpu else (512, jnp.float32)
    copy_elems = (1 << 30) // 2 if gpu else (16 << 20) // 4
    ka, kb, kc = jax.random.split(jax.random.key(7), 3)
    a, b = random_normal(ka, (n, n), dtype), random_normal(kb, (n, n), dtype)
    src = [random_normal(k, (copy_elems,), dtype) for k in jax.random.split(kc, 2)]
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
    copy = jax.jit(lambda x: x + jnp.ones((), x.dtype))  # one read + one write per element
    out, recs = {}, []
    t_mm, _ = measure(matmul, [(a, b), (b, a)], warmup=2, repeats=repeats)
    t_cp, _ = measure(copy, [(s,) for s in src], warmup=2, repeats=repeats)
    dname = jnp.dtype(dtype).name
    mm_rec = record(suite="ceiling", op="dense_matmul", pass_="fwd", implementation="xla:dot", kind="ceiling",
                    shape={"name": f"{n}^3", "M": n, "K": n, "N": n}, dtype=dname, timing=t_mm,
                    flops=2.0 * n ** 3, extra={"ceiling_basis": "matmul"})
    cp_rec = record(suite="ceiling", op="copy", pass_="fwd", implementation="xla:elementwise", kind="ceiling",
                    shape={"name": f"{copy_elems * jnp.dtype(dtype).itemsize >> 20}MiB", "elements": copy_elems},
                    dtype=dname, timing=t_cp, bytes_moved=2.0 * copy_elems * jnp.dtype(dtype).itemsize,
                    extra={"ceiling_basis": "copy"})
    out["matmul_tflops"], out["copy_gbps"] = mm_rec["tflops"], cp_rec["gbps"]
    recs += [mm_rec, cp_rec]
    return out, recs
