"""Peers (other libraries' grouped matmuls) and the same run's ceilings (dense matmul, HBM copy).

A peer that cannot run here is returned as ``Peer(available=False, reason=...)`` and reported, never dropped:

* ``lax.ragged_dot``      always importable; its backward densifies (out of memory at DeepSeek-like shapes: caught
                          per measurement and reported as status ``oom``).
* ``tokamax:mosaic``      when ``import tokamax`` works (its Mosaic GPU kernel; GPU only; the layer composition uses
                          ``tokamax:xla`` off a GPU). tokamax 0.0.17 imports ``xprof`` at import time: when that is
                          the only failure, a stub ``xprof.cli.tools`` module is put on ``sys.modules`` and the
                          peer's label says so.
* ``torch._grouped_mm``   when torch with CUDA is present (CUTLASS grouped GEMM; autograd for forward+backward).
* ``torch.bmm``           when torch is present: the dense batched matmul (cuBLAS on a GPU) that balanced routing
                          with equal groups is. Not a grouped matmul: the ceiling of the grouped ones at the same
                          per-expert problem. Cases with unequal groups raise ``NotApplicable`` (row: unavailable).

Each GMM peer exposes ``prepare(lhs, rhs, group_sizes_np, ct)``, ``fwd`` and ``fwd_bwd`` callables on the prepared
inputs, so the GMM suite times them exactly like ``moe_ops``. The layer suite's peers (``layer_peers``) are the whole
routed SwiGLU layer composed in JAX around ``lax.ragged_dot`` / ``tokamax.ragged_dot`` (``composed_layer``).
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


class NotApplicable(Exception):
    """Raised by a peer's ``prepare`` for a case it cannot time (reported as ``unavailable``, not as an error)."""


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    available: bool
    reason: str = ""
    # prepare(lhs, rhs, sizes_np, ct) -> args; fwd(*args) -> out; fwd_bwd(*args) -> (dlhs, drhs[, out]): a JAX
    # fwd_bwd returns the forward's output as well, or XLA drops the forward (its output feeds nothing) and the pass
    # times the backward alone, while torch's autograd runs both
    prepare: Callable | None = None
    fwd: Callable | None = None
    fwd_bwd: Callable | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Other libraries' grouped matmuls: lax.ragged_dot and tokamax.ragged_dot (the GMM peers and the GEMMs of the layer
# compositions).


@dataclasses.dataclass(frozen=True)
class RaggedDot:
    """A peer's grouped matmul ``fn(lhs [M,K], rhs [G,K,N], group_sizes [G]) -> [M,N]`` in lhs's dtype."""
    name: str
    available: bool
    reason: str = ""
    fn: Callable | None = None
    note: str = ""


def lax_ragged_dot() -> RaggedDot:
    def fn(lhs, rhs, gs):
        return jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32).astype(lhs.dtype)
    return RaggedDot("lax.ragged_dot", True, fn=fn)


def _import_tokamax():
    """(module, note). Retries once with an ``xprof`` stub when that is the only missing piece. tokamax parses its
    absl flags from ``sys.argv`` on first use (which rejects this harness's own options): they are marked parsed."""
    note = ""
    try:
        import tokamax
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("xprof"):
            raise
        for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
        import tokamax
        note = "xprof stubbed"
    try:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    except ImportError:
        pass
    return tokamax, note


def tokamax_ragged_dot(*, gpu_only: bool = True) -> RaggedDot:
    """``tokamax.ragged_dot`` with its Mosaic GPU kernel (``tokamax:mosaic``); off a GPU, unavailable when
    ``gpu_only``, else its ``"xla"`` implementation, named ``tokamax:xla`` (so a CPU run exercises the peer)."""
    impl = "mosaic" if env.on_gpu() or gpu_only else "xla"
    name = f"tokamax:{impl}"
    if impl == "mosaic" and not env.on_gpu():
        return RaggedDot(name, False, f"tokamax's Mosaic GPU kernel needs a GPU (backend is {jax.default_backend()})")
    try:
        tokamax, note = _import_tokamax()
    except Exception as exc:  # noqa: BLE001 - reported as the peer's reason
        return RaggedDot(name, False, env.reason(exc))

    def fn(lhs, rhs, gs):
        return tokamax.ragged_dot(lhs, rhs, gs, implementation=impl).astype(lhs.dtype)
    return RaggedDot(name, True, fn=fn, note=note)


def _gmm_peer(rd: RaggedDot) -> Peer:
    """The GMM suite's peer around a grouped matmul: forward, and forward+backward as (dlhs, drhs) by ``jax.vjp``."""
    if not rd.available:
        return Peer(rd.name, False, rd.reason, note=rd.note)

    def prepare(lhs, rhs, sizes, ct):
        return lhs, rhs, jnp.asarray(sizes, jnp.int32), ct

    def fb(lhs, rhs, gs, ct):
        out, vjp = jax.vjp(lambda a, b: rd.fn(a, b, gs), lhs, rhs)
        return vjp(ct) + (out,)

    return Peer(rd.name, True, prepare=prepare, fwd=jax.jit(lambda a, b, g, _ct: rd.fn(a, b, g)),
                fwd_bwd=jax.jit(fb), note=rd.note)


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


def _torch_bmm_peer() -> Peer:
    name = "torch.bmm"
    try:
        import torch
    except ImportError as exc:
        return Peer(name, False, env.reason(exc))

    def prepare(lhs, rhs, sizes, ct):
        rows, e = int(sizes[0]), len(sizes)
        if any(int(s) != rows for s in sizes) or rows * e != lhs.shape[0]:
            raise NotApplicable(f"{name} times equal groups covering every row only (balanced routing with M % E "
                                f"== 0); group sizes here range {int(min(sizes))}..{int(max(sizes))}")
        return (_to_torch(lhs).contiguous().view(e, rows, -1), _to_torch(rhs).contiguous(),
                _to_torch(ct).contiguous().view(e, rows, -1))

    def fwd(a, b, _ct):
        return torch.bmm(a, b).view(-1, b.shape[-1])

    def fwd_bwd(a, b, ct):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        torch.bmm(a, b).backward(ct)
        return a.grad.view(-1, a.shape[-1]), b.grad

    return Peer(name, True, prepare=prepare, fwd=fwd, fwd_bwd=fwd_bwd, note="dense batched matmul (equal groups)")


PEER_NAMES = ("lax.ragged_dot", "tokamax", "tokamax:mosaic", "torch._grouped_mm", "torch.bmm")  # what --peers takes


def check_names(names) -> None:
    """``ValueError`` naming every name that is not one of ``PEER_NAMES``."""
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ValueError(f"unknown {unknown}; known: {', '.join(PEER_NAMES)}")


def gmm_peers(names=None) -> list[Peer]:
    """The GMM peers (all by default); ``names`` from ``PEER_NAMES`` (``tokamax`` is ``tokamax:mosaic`` here)."""
    builders = {"lax.ragged_dot": lambda: _gmm_peer(lax_ragged_dot()),
                "tokamax:mosaic": lambda: _gmm_peer(tokamax_ragged_dot(gpu_only=True)),
                "torch._grouped_mm": _torch_peer, "torch.bmm": _torch_bmm_peer}
    check_names(names or ())
    wanted = dict.fromkeys("tokamax:mosaic" if n == "tokamax" else n for n in (names or builders))
    return [builders[n]() for n in wanted]


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
    copy = jax.jit(lambda x: x + jnp.ones((), x.dtype))  # one read + one write per element
    out, recs = {}, []
    dname = jnp.dtype(dtype).name
    mm_recs = [record(suite="ceiling", op="dense_matmul", pass_="fwd", implementation=impl, kind="ceiling",
                      shape={"name": f"{n}^3", "M": n, "K": n, "N": n}, dtype=dname, timing=t, flops=2.0 * n ** 3,
                      extra={"ceiling_basis": "matmul"}) for impl, t in _dense_matmuls(a, b, gpu, repeats)]
    mm_rec = max(mm_recs, key=lambda r: r["tflops"])  # the fastest dense matmul of the run is the ceiling
    t_cp, _ = measure(copy, [(s,) for s in src], warmup=2, repeats=repeats)
    cp_rec = record(suite="ceiling", op="copy", pass_="fwd", implementation="xla:elementwise", kind="ceiling",
                    shape={"name": f"{copy_elems * jnp.dtype(dtype).itemsize >> 20}MiB", "elements": copy_elems},
                    dtype=dname, timing=t_cp, bytes_moved=2.0 * copy_elems * jnp.dtype(dtype).itemsize,
                    extra={"ceiling_basis": "copy"})
    out["matmul_tflops"], out["copy_gbps"] = mm_rec["tflops"], cp_rec["gbps"]
    recs += mm_recs + [cp_rec]
    return out, recs


def _dense_matmuls(a, b, gpu, repeats):
    """[(implementation, timing)] of ``a @ b`` (output in the inputs' dtype): XLA's dot, and on a GPU with torch's
    CUDA also ``torch.mm`` (cuBLAS directly; XLA's dot ran 555 TFLOP/s on an H200 where grouped GEMMs reached 686,
    benchmarks/RESULTS.md, so it alone is no ceiling)."""
    out = [("xla:dot", measure(jax.jit(jnp.dot), [(a, b), (b, a)], warmup=2, repeats=repeats)[0])]
    if gpu:
        try:
            import torch  # noqa: PLC0415 (optional)
            if torch.cuda.is_available():
                ta, tb = _to_torch(a).contiguous(), _to_torch(b).contiguous()
                out.append(("torch.mm", measure(torch.mm, [(ta, tb), (tb, ta)], warmup=2, repeats=repeats)[0]))
        except Exception:  # noqa: BLE001 - an optional second probe; XLA's stands alone without it
            pass
    return out


# ---------------------------------------------------------------------------------------------------------------
# The layer built from other libraries' pieces: the best pure-JAX composition of moe_ffn.


@dataclasses.dataclass(frozen=True)
class LayerPeer:
    """``moe_ffn`` composed in JAX around a peer's grouped matmul (``composed_layer``); rows are named
    ``<gemm>+argsort`` (e.g. ``lax.ragged_dot+argsort``)."""
    name: str
    requested: str
    available: bool
    reason: str = ""
    gemm: Callable | None = None
    note: str = ""

    def layer(self, top_k: int) -> Callable:
        return lambda x, logits, w_gate, w_up, w_down: composed_layer(self.gemm, x, logits, w_gate, w_up, w_down,
                                                                      top_k=top_k)


def composed_layer(gemm, x, logits, w_gate, w_up, w_down, *, top_k: int):
    """route (softmax top-k, renormalised) -> stable argsort of the expert ids -> take of the token rows -> ``gemm``
    for gate / up -> SwiGLU in f32 -> ``gemm`` for down -> weighted combine (inverse permutation, take, f32 einsum
    over k): ``moe_ops.reference.moe_ffn`` with its grouped matmuls replaced by ``gemm``; jax autodiff for the
    backward. x [T,D], logits [T,E]."""
    from moe_ops import reference  # noqa: PLC0415 (keeps this module importable without moe_ops' backends)
    weights, ids = reference.route(logits, top_k)
    xs, sizes, sort_idx = reference.permute(x, ids, w_gate.shape[0])
    h = reference.activate(gemm(xs, w_gate, sizes), gemm(xs, w_up, sizes)).astype(x.dtype)
    return reference.unpermute(gemm(h, w_down, sizes), sort_idx, weights)


LAYER_GEMMS = {"lax.ragged_dot": lax_ragged_dot, "tokamax": lambda: tokamax_ragged_dot(gpu_only=False)}


def layer_peers(names=None) -> list[LayerPeer]:
    """The layer compositions (all by default); ``names`` as for ``--peers`` (``tokamax:mosaic`` selects the tokamax
    composition; GMM-only peers such as ``torch._grouped_mm`` have no composition here and select nothing)."""
    wanted = None if names is None else {n.split(":")[0] for n in names}
    out = []
    for key, build in LAYER_GEMMS.items():
        if wanted is None or key in wanted:
            rd = build()
            out.append(LayerPeer(f"{rd.name}+argsort", key, rd.available, rd.reason, rd.fn, rd.note))
    return out
