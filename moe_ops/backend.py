"""The one place that picks a backend.

``implementation=None`` means: Triton on GPU, Pallas on TPU, XLA elsewhere. A forced ``"triton"`` or ``"pallas"``
also runs on CPU: Triton through the interpreter bridge (``kernels.triton.bridge``), Pallas with ``interpret=True``.

Every backend module exposes the same kernel-level functions (no validation, no autodiff; ``moe_ops`` adds both):

* ``gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype) -> [M, N]``
* ``tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype) -> [G_local, K, N]``
* ``sort_by_expert(expert_ids[T,k], num_experts) -> (group_sizes[E] int32, sort_idx[T*k] int32)``
* ``gather_rows(x[T,D], sort_idx, k, row_weights=None, n_valid=None) -> [T*k, D]``
* ``combine_rows(y[T*k,D], sort_idx, weights[T,k], n_valid=None) -> [T, D]``
* ``combine_weight_grad(dout[T,D], y[T*k,D], sort_idx, k, n_valid=None) -> [T, k] f32``

where ``group_sizes`` are already clamped (non-negative, ``sum <= M``) and ``group_offset`` is int32 of shape (1,).

``n_valid`` (the valid-prefix form for expert parallelism; ``None`` means all ``N = T*k`` rows) is an int scalar or
shape-(1,) int array on device, clamped to ``[0, N]``: ``gather_rows`` writes zeros to rows ``>= n_valid`` without
reading ``x`` for them, and ``combine_rows`` / ``combine_weight_grad`` never read ``y`` rows ``>= n_valid`` (they
contribute zero). ``sort_idx`` is always a full permutation of ``[0, N)``; slots that must not be routed carry an
out-of-range expert id, sort last, and ``n_valid = sum(group_sizes)`` covers exactly the routed rows.

Optional fused dispatch / combine (``moe_ops.fused``; Triton, Pallas and XLA provide them; a backend without
them makes ``moe_ffn`` run the unfused path). ``M = T*k`` expert-sorted rows, ``slot = sort_idx[i]``:

* ``gather_gmm(x[T,K], rhs, group_sizes, group_offset, sort_idx[M], k, *, transpose_rhs, out_dtype,
  row_weights=None) -> [M, N]``: ``x[slot // k] @ rhs[group(i)]`` (times ``row_weights.flat[slot]`` when given),
  zero rows outside local groups; x is read in token order (no permuted copy).
* ``scatter_gmm(h[M,K], rhs, group_sizes, group_offset, sort_idx[M], weights[T,k], *, transpose_rhs, out_dtype)
  -> [T, N]``: ``sum_j weights[t,j] * (h @ rhs[g])[inverse[t*k+j]]`` (f32 sum); rows outside local groups
  contribute zero.
* ``swiglu_gmm(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, activation, out_dtype)
  -> [M, F]``: ``act(x_i @ w_gate[g]) * (x_i @ w_up[g])`` in f32, one kernel (``moe_ops.swiglu``; Triton and
  Pallas; XLA composes its GMMs).
"""

from __future__ import annotations

import importlib

import jax

IMPLEMENTATIONS = ("xla", "triton", "pallas")
_MODULES = {"xla": "moe_ops.xla", "triton": "kernels.triton.backend", "pallas": "kernels.pallas.backend"}
_DEFAULT_FOR_PLATFORM = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "pallas"}


def resolve(implementation: str | None) -> str:
    """Name of the backend that will run: the platform default for ``None``, else the forced one."""
    if implementation is None:
        return _DEFAULT_FOR_PLATFORM.get(jax.default_backend(), "xla")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def ops(implementation: str | None):
    """The backend module for ``implementation`` (imported on first use)."""
    return importlib.import_module(_MODULES[resolve(implementation)])


def pallas_interpret() -> bool:
    """Pallas TPU kernels compile for TPUs only; everywhere else they run in interpret mode (for testing)."""
    return jax.default_backend() != "tpu"
