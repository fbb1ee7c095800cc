"""The one place that picks a backend.

``implementation=None`` means: Triton on GPU, Pallas on TPU, XLA elsewhere, chosen **per lowering platform**
(``kernels.platform``): ``jax.export(..., platforms=["tpu"])`` from a CPU host gets the Mosaic kernels,
``["cuda"]`` / ``["rocm"]`` the Triton kernels, and a multi-platform export carries each platform's kernels. A forced
``"triton"`` or ``"pallas"`` also runs on CPU: Triton through the interpreter bridge (``kernels.triton.bridge``),
Pallas in interpret mode (Mosaic when lowered for TPU). ``resolve`` names what runs on the default device.

Every backend module exposes the same kernel-level functions (no validation, no autodiff; ``moe_ops`` adds both):

* ``gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype) -> [M, N]``
* ``tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, out_dtype) -> [G_local, K, N]``
* ``sort_by_expert(expert_ids[T,k], num_experts) -> (group_sizes[E] int32, sort_idx[T*k] int32)``
* ``gather_rows(x[T,D], sort_idx, k, row_weights=None, n_valid=None) -> [T*k, D]``
* ``combine_rows(y[T*k,D], sort_idx, weights[T,k], n_valid=None) -> [T, D]``
* ``combine_weight_grad(dout[T,D], y[T*k,D], sort_idx, k, n_valid=None) -> [T, k] f32``

(the xla and pallas ``gmm`` / ``tgmm`` also take ``precision=``, a ``lax.Precision`` the caller already mapped with
``moe_ops.precision.kernel_precision``; it is passed only when not ``None``), where ``group_sizes`` are already clamped
(non-negative, ``sum <= M``) and ``group_offset`` is int32 of shape (1,) in ``[0, G]`` (``G``: no group is
local); no op is called with a zero-size dimension (``validation.zeros_if_empty``).

``n_valid`` (the valid-prefix form for expert parallelism; ``None`` means all ``N = T*k`` rows) is an int scalar or
shape-(1,) int array on device, clamped to ``[0, N]``: ``gather_rows`` writes zeros to rows ``>= n_valid`` without
reading ``x`` for them, and ``combine_rows`` / ``combine_weight_grad`` never read ``y`` rows ``>= n_valid`` (they
contribute zero). ``sort_idx`` is always a full permutation of ``[0, N)``; slots that must not be routed carry an
out-of-range expert id, sort last, and ``n_valid = sum(group_sizes)`` covers exactly the routed rows.

Optional fused dispatch / combine (``moe_ops.fused``; Triton, Pallas and XLA provide them; a backend without them
makes ``moe_ffn`` run the unfused path; under ``implementation=None`` a backend without them runs the composition of
its own ``gather_rows`` / ``gmm`` / ``combine_rows``, see ``compose_gather_gmm``). ``M = T*k`` expert-sorted rows,
``slot = sort_idx[i]``:

* ``gather_gmm(x[T,K], rhs, group_sizes, group_offset, sort_idx[M], k, *, transpose_rhs, out_dtype,
  row_weights=None) -> [M, N]``: ``x[slot // k] @ rhs[group(i)]`` (times ``row_weights.flat[slot]`` when given),
  zero rows outside local groups; x is read in token order (no permuted copy).
* ``scatter_gmm(h[M,K], rhs, group_sizes, group_offset, sort_idx[M], weights[T,k], *, transpose_rhs, out_dtype)
  -> [T, N]``: ``sum_j weights[t,j] * (h @ rhs[g])[inverse[t*k+j]]`` (f32 sum); rows outside local groups
  contribute zero.
* ``scatter_gmm_sum(h, rhs, h2[M,K2], rhs2, group_sizes, group_offset, sort_idx, weights, *, transpose_rhs,
  out_dtype) -> [T, N]``: ``scatter_gmm`` of ``h @ rhs[g] + h2 @ rhs2[g]`` (Triton: one launch, one slot buffer;
  others: two ``scatter_gmm`` summed in f32).
* ``gather_tgmm(lhs, rhs, group_sizes, group_offset, sort_idx[M], k, *, num_groups, out_dtype, gather_lhs,
  gather_rhs) -> [G_local, K, N]``: ``tgmm`` with lhs [T,K] / rhs [T,N] read in token order through
  ``sort_idx // k`` where flagged (Triton; others compose with ``gather_rows``).
* ``swiglu_gmm(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, activation, out_dtype,
  b_gate=None, b_up=None) -> [M, F]``: ``act(x_i @ w_gate[g] + b_gate[g]) * (x_i @ w_up[g] + b_up[g])`` in f32,
  one kernel (``moe_ops.swiglu``; Triton and Pallas; XLA composes its GMMs). The biases [G_local, F] are both given
  or both None; they are added to the f32 accumulators.
* ``swiglu_gmm_saved(...same...) -> (h, gate, up)``: also writes gate / up [M, F] in ``out_dtype``, biases added,
  raw or clamped to the activation's limit (the backward's masks read the same from either).
* ``swiglu_down_bwd(x[T,D], dout[T,D], w_gate, w_up, w_down, group_sizes, group_offset, sort_idx[M], w_sorted[M],
  k, *, activation, b_gate=None, b_up=None) -> (dgate, dup, hw [M,F] in x's dtype, dweights_sorted [M] f32)``: the
  backward of swiglu_gmm followed by the weighted down projection, gate / up recomputed (biases added) and the
  activation derivative applied in the epilogue of the down projection's dlhs GMM (``reference.swiglu_down_bwd``;
  Triton and Pallas; XLA composes).
* ``swiglu_down_bwd_saved(dout, w_down, gate[M,F], up[M,F], group_sizes, group_offset, sort_idx, w_sorted, k, *,
  activation)``: the same outputs from saved gate / up (Triton; others compose).
"""

from __future__ import annotations

import functools
import importlib
import types
import warnings

import jax
import jax.numpy as jnp

from kernels import groups, platform
from moe_ops import precision as precision_lib, reference

IMPLEMENTATIONS = ("xla", "triton", "pallas")
_MODULES = {"xla": "moe_ops.xla", "triton": "kernels.triton.backend", "pallas": "kernels.pallas.backend"}
_DEFAULT_FOR_PLATFORM = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "pallas"}
INTERFACE = ("gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad", "gather_gmm",
             "scatter_gmm", "scatter_gmm_sum", "gather_tgmm", "swiglu_gmm", "swiglu_gmm_saved", "swiglu_down_bwd",
             "swiglu_down_bwd_saved")


def choose(implementation: str | None) -> str | None:
    """``implementation`` checked: None (per lowering platform) or one of ``IMPLEMENTATIONS``."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def resolve(implementation: str | None) -> str:
    """Name of the backend that runs on the default device: its platform's default for ``None``, else the forced
    one. (What an export for another platform runs is that platform's default.)"""
    if choose(implementation) is None:
        name = _DEFAULT_FOR_PLATFORM.get(jax.default_backend(), "xla")
        return name if name != "triton" or _triton_available() else "xla"
    return implementation


def ops(implementation: str | None):
    """The backend for ``implementation``: its module, or for ``None`` the per-platform dispatcher (imported on
    first use)."""
    if choose(implementation) is None:
        return _auto()
    return importlib.import_module(_MODULES[implementation])


@functools.cache
def _triton_available() -> bool:
    try:
        importlib.import_module(_MODULES["triton"])
        return True
    except ImportError as err:  # no jax-triton / triton installed: GPUs run the XLA backend
        warnings.warn(f"Triton kernels unavailable ({err}); implementation=None runs XLA on GPUs", stacklevel=3)
        return False


@functools.cache
def _auto():
    """``implementation=None``: every interface function binds one ``platform.platform_call`` whose rule per
    lowering platform is XLA (cpu and any other), Triton (cuda, rocm) or Pallas Mosaic (tpu)."""
    xla = importlib.import_module(_MODULES["xla"])
    pallas = importlib.import_module(_MODULES["pallas"])
    gpu = importlib.import_module(_MODULES["triton"]) if _triton_available() else xla
    per_platform = {"cuda": gpu, "rocm": gpu, "tpu": pallas}

    names = {xla: "xla", pallas: "pallas", gpu: "triton" if gpu is not xla else "xla"}

    def dispatcher(name):
        def call(*args, precision=None, **kwargs):
            rules = {p: _rule(module, name, names[module], precision) for p, module in per_platform.items()}
            return platform.dispatch(rules, _rule(xla, name, "xla", precision), args, kwargs)
        return call
    return types.SimpleNamespace(**{name: dispatcher(name) for name in INTERFACE})


def _rule(module, name, impl, precision=None):
    """``module.name`` (with ``precision`` as that backend runs it, ``moe_ops.precision.kernel_precision``), or for the
    optional fused ops the composition of the module's own row ops and gmm."""
    if not hasattr(module, name):
        return platform.Rule.of(_COMPOSED[name], ops=module)
    if precision is None:  # the caller asked for none: the backend's default
        return platform.Rule(getattr(module, name))
    try:
        precision = precision_lib.kernel_precision(precision, impl)
    except ValueError as err:  # raised only if this backend's platform is lowered
        return platform.Rule.of(_unsupported, message=str(err))
    return platform.Rule(getattr(module, name)) if precision is None else platform.Rule.of(getattr(module, name),
                                                                                            precision=precision)


def _unsupported(*_args, message, **_kwargs):
    raise ValueError(message)


def compose_gather_gmm(x, rhs, group_sizes, group_offset, sort_idx, k, *, ops, transpose_rhs, out_dtype,
                       row_weights=None):
    """``gather_gmm`` from a backend's ``gather_rows`` + ``gmm`` (materialises the gathered rows)."""
    rows = ops.gather_rows(x, sort_idx, k, row_weights=row_weights)
    return ops.gmm(rows, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype)


def compose_scatter_gmm(h, rhs, group_sizes, group_offset, sort_idx, weights, *, ops, transpose_rhs, out_dtype):
    """``scatter_gmm`` from a backend's ``gmm`` + ``combine_rows`` (materialises the expert output)."""
    y = ops.gmm(h, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs, out_dtype=out_dtype)
    return ops.combine_rows(y, sort_idx, weights)


def compose_scatter_gmm_sum(h, rhs, h2, rhs2, group_sizes, group_offset, sort_idx, weights, *, ops, transpose_rhs,
                            out_dtype):
    """``scatter_gmm_sum`` as two of the backend's ``scatter_gmm`` (or their composition), summed in f32."""
    scatter = getattr(ops, "scatter_gmm", None) or functools.partial(compose_scatter_gmm, ops=ops)
    parts = (scatter(a, w, group_sizes, group_offset, sort_idx, weights, transpose_rhs=transpose_rhs,
                     out_dtype=out_dtype).astype(jnp.float32) for a, w in ((h, rhs), (h2, rhs2)))
    return sum(parts).astype(out_dtype)


def compose_swiglu_gmm(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, ops, activation,
                       out_dtype, b_gate=None, b_up=None):
    """``swiglu_gmm`` from a backend's (gather-)GMMs and the activation in XLA (materialises gate and up)."""
    h, _, _ = compose_swiglu_gmm_saved(x, w_gate, w_up, group_sizes, group_offset, sort_idx, k, ops=ops,
                                       activation=activation, out_dtype=out_dtype, b_gate=b_gate, b_up=b_up)
    return h   # (XLA drops the unused gate / up casts)


def _add_bias(products, biases, group_sizes, group_offset):
    """f32 [M, F] projections plus their groups' bias rows (``kernels.groups.group_rows``; none when None)."""
    return [p if b is None else p + groups.group_rows(b, group_sizes, group_offset, p.shape[0], jnp.float32)
            for p, b in zip(products, biases)]


def compose_swiglu_down_bwd(x, dout, w_gate, w_up, w_down, group_sizes, group_offset, sort_idx, w_sorted, k, *, ops,
                            activation, b_gate=None, b_up=None):
    """``swiglu_down_bwd`` from a backend's gather-GMMs and XLA elementwise math (materialises gate, up and the
    down projection's dlhs in f32)."""
    gather = gather_gmm_of(ops)

    def project(rows, w, transpose):
        return gather(rows, w, group_sizes, group_offset, sort_idx, k, transpose_rhs=transpose, out_dtype=jnp.float32)
    gate, up = _add_bias([project(x, w_gate, False), project(x, w_up, False)], (b_gate, b_up), group_sizes,
                         group_offset)
    a = project(dout, w_down, True)
    return reference.swiglu_down_epilogue(a, gate, up, w_sorted, activation, x.dtype,
                                          rows=_local_rows(group_sizes, group_offset, w_down, sort_idx))


def compose_swiglu_gmm_saved(x, w_gate, w_up, group_sizes, group_offset, sort_idx=None, k=1, *, ops, activation,
                             out_dtype, b_gate=None, b_up=None):
    """``swiglu_gmm_saved`` from a backend's (gather-)GMMs: gate / up in ``out_dtype``, h from the f32 products."""
    gather = gather_gmm_of(ops)
    gate, up = _add_bias([gather(x, w, group_sizes, group_offset, sort_idx, k, transpose_rhs=False,
                                 out_dtype=jnp.float32)
                          if sort_idx is not None else
                          ops.gmm(x, w, group_sizes, group_offset, transpose_rhs=False, out_dtype=jnp.float32)
                          for w in (w_gate, w_up)], (b_gate, b_up), group_sizes, group_offset)
    return (reference.activate(gate, up, activation).astype(out_dtype), gate.astype(out_dtype), up.astype(out_dtype))


def compose_swiglu_down_bwd_saved(dout, w_down, gate, up, group_sizes, group_offset, sort_idx, w_sorted, k, *, ops,
                                  activation):
    """``swiglu_down_bwd_saved`` from a backend's gather-GMM and XLA elementwise math."""
    a = gather_gmm_of(ops)(dout, w_down, group_sizes, group_offset, sort_idx, k, transpose_rhs=True,
                           out_dtype=jnp.float32)
    return reference.swiglu_down_epilogue(a, gate.astype(jnp.float32), up.astype(jnp.float32), w_sorted, activation,
                                          dout.dtype, rows=_local_rows(group_sizes, group_offset, w_down, sort_idx))


def _local_rows(group_sizes, group_offset, w_down, sort_idx):
    """[M] bool: the sorted rows of the local groups, where the backward epilogue's routing weight may act (the
    kernels store exact zeros elsewhere, whatever the weight holds; so must the compositions)."""
    return groups.local_row_mask(group_sizes, group_offset, w_down.shape[0], sort_idx.shape[0])


def compose_gather_tgmm(lhs, rhs, group_sizes, group_offset, sort_idx, k, *, ops, num_groups, out_dtype, gather_lhs,
                       gather_rhs):
    """``gather_tgmm`` from a backend's ``gather_rows`` + ``tgmm`` (materialises the gathered operands)."""
    if gather_lhs:
        lhs = ops.gather_rows(lhs, sort_idx, k)
    if gather_rhs:
        rhs = ops.gather_rows(rhs, sort_idx, k)
    return ops.tgmm(lhs, rhs, group_sizes, group_offset, num_groups=num_groups, out_dtype=out_dtype)


def gather_gmm_of(ops):
    """A backend's ``gather_gmm``, or the composition of its ``gather_rows`` + ``gmm``."""
    return getattr(ops, "gather_gmm", None) or functools.partial(compose_gather_gmm, ops=ops)


_COMPOSED = {"gather_gmm": compose_gather_gmm, "scatter_gmm": compose_scatter_gmm,
             "scatter_gmm_sum": compose_scatter_gmm_sum, "gather_tgmm": compose_gather_tgmm,
             "swiglu_gmm": compose_swiglu_gmm, "swiglu_gmm_saved": compose_swiglu_gmm_saved,
             "swiglu_down_bwd": compose_swiglu_down_bwd, "swiglu_down_bwd_saved": compose_swiglu_down_bwd_saved}
