"""Argument checks for the public ops, and the opt-in runtime ("checked") mode.

Static problems (ranks, dims, dtypes) raise ``ValueError`` / ``TypeError`` at trace time, naming the argument and the
expected shape or dtype. Value problems that live on device (group sizes summing past ``M``, negative sizes, expert
ids out of range) cannot be seen at trace time without a host sync, so the fast path *defines* them instead:

* ``sum(group_sizes) > M``: groups are truncated at row ``M`` (``clamp_group_sizes``, saturating: no overflow for
  any integer input, e.g. ``[5, 2**31-1, 0]``); no kernel reads or writes out of bounds. Negative sizes count as zero.
* ``group_offset`` outside ``[0, G)``: no group is local, so ``gmm`` / ``gather_gmm`` rows are zero, ``tgmm`` blocks
  are zero and every gradient is zero (``group_offset_array``), the same on every backend.
* expert ids outside ``[0, E)``: the token copy is dropped (sorted after every valid row, counted in no group, so it
  contributes zero to the output and gets zero gradient), whatever the ids' integer width (``expert_ids_int32``).
* a ``sort_idx`` that is not a permutation of ``[0, T*k)`` (``unpermute``, ``gather_gmm``, ``scatter_gmm``,
  ``swiglu_*``): unspecified rows, never an out-of-bounds access (``sort_idx_array``; checked mode only).

Inside ``with moe_ops.checked():`` (or with ``MOE_OPS_CHECKED=1``, also ``true`` / ``yes`` / ``on``) the ops add a
device-to-host callback that raises ``ValueError`` with the offending values instead; under ``jit`` it surfaces as a
runtime error carrying that message. The block is part of ``jit``'s cache key (a ``jax.make_user_context``), so a
function that ``jit`` traced outside it is traced again, with checks, when called inside it (and the reverse). Any
other ``MOE_OPS_CHECKED`` value raises ``ValueError``.

Degenerate shapes (a zero M, T, K, N, D, top_k, G or G_local) are not errors: every op returns correctly shaped zeros
(``zeros_if_empty``) and every gradient is zero.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from moe_ops import reference, vma

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# None outside every ``checked`` block (then MOE_OPS_CHECKED decides). A user context, not a thread-local, so that the
# setting is in jit's tracing / lowering / compilation cache keys: a cached unchecked trace is never reused inside
# the block. Thread-local all the same (each thread's block sets its own value).
_CHECKED = jax.make_user_context(None)


@contextlib.contextmanager
def checked(enabled: bool = True):
    """Run ops with runtime value checks (see module docstring); jit re-traces a function called inside the block."""
    flag("checked's enabled", enabled)
    with _CHECKED(bool(enabled)):
        yield


_ENV_FLAG = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False,
             "": False}


def checks_enabled() -> bool:
    flag = _CHECKED.value
    if flag is not None:
        return bool(flag)
    value = os.environ.get("MOE_OPS_CHECKED", "0")
    if value.strip().lower() not in _ENV_FLAG:
        raise ValueError(f"MOE_OPS_CHECKED={value!r}: expected 1 / true / yes / on or 0 / false / no / off")
    return _ENV_FLAG[value.strip().lower()]


def _runtime_check(predicate_fn, message_fn, *values):
    """Raise ``ValueError(message_fn(*values))`` on the host when ``predicate_fn(*values)`` is false. NumPy values
    are judged now, at full width (the callback would get JAX's int32 copy of an int64 / uint64 array)."""
    if all(isinstance(v, (np.ndarray, np.generic)) for v in values):
        if not predicate_fn(*values):
            raise ValueError(message_fn(*values))
        return

    def callback(*host_values):
        host_values = [np.asarray(v) for v in host_values]
        if not predicate_fn(*host_values):
            raise ValueError(message_fn(*host_values))
    jax.debug.callback(callback, *values)


def is_kernel_float(dtype) -> bool:
    """Whether the kernels take ``dtype``: float32, bfloat16 or float16 (``FLOAT_DTYPES``)."""
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in FLOAT_DTYPES]


def named_op(op):
    """Decorator for a public op: its ops (and their transposes in the backward) carry ``moe_ops.<name>`` in their
    HLO names (``jax.named_scope``), so profiles and dumps show which MoE op a kernel or fusion belongs to."""
    scope = f"moe_ops.{op.__name__}"

    @functools.wraps(op)
    def run(*args, **kwargs):
        with jax.named_scope(scope):
            return op(*args, **kwargs)
    return run


def numpy_floats_as_jax(op):
    """Decorator for a public op: a NumPy float operand whose dtype JAX would canonicalise (float64 with x64 off)
    enters as the ``jnp.asarray`` of it (float32), as it would in ``jnp.dot`` / ``lax.ragged_dot`` / megablox.
    Only ``np.ndarray`` leaves of a floating dtype change: NumPy integers keep their full-width host reading, NumPy
    scalars (static options such as ``routed_scale``) stay static, and float64 under x64 still gets the dtype error."""
    def canonical(a):
        if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) \
                and jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
            return jnp.asarray(a)
        return a

    @functools.wraps(op)
    def run(*args, **kwargs):
        args, kwargs = jax.tree.map(canonical, (args, kwargs))
        return op(*args, **kwargs)
    return run


def float_array(name, x, ndim=None):
    """``x`` (named ``name`` in errors) is a float array of rank ``ndim`` (any rank >= 1 when None)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if (x.ndim < 1) if ndim is None else (x.ndim != ndim):
        raise ValueError(f"{name} must have rank {'>= 1' if ndim is None else ndim}, got shape {tuple(x.shape)}")
    if not is_kernel_float(x.dtype):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def flag(name, value, optional=False) -> None:
    """A static switch: a Python / NumPy bool (or None when ``optional``). Strings such as ``"no"`` are truthy and
    would silently pick the other path, so they are refused."""
    if not (isinstance(value, (bool, np.bool_)) or (optional and value is None)):
        raise TypeError(f"{name} must be {'None, ' if optional else ''}True or False, got {value!r}")


def is_static_int(value) -> bool:
    """A Python or NumPy integer (not a bool, not a traced value): what static sizes such as ``top_k`` take."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def routing_options(num_experts, top_k, *, bias=None, renormalize=True, num_groups=None, top_groups=None, scale=1.0,
                    group_score="top2_sum", names=("bias", "scale")):
    """The routing options of ``route`` / ``moe_ffn`` for E=``num_experts`` experts and a valid ``top_k`` ->
    ``(num_groups, top_groups, scale, group_score)`` as Python int, int, float, str (None, None when not grouped).
    Errors name the caller's arguments: ``names`` is what it calls the bias and the scale (``moe_ffn``: router_bias,
    routed_scale)."""
    bias_name, scale_name = names
    flag("renormalize", renormalize)
    if bias is not None:
        if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
            raise TypeError(f"{bias_name} must be None or an array of shape [E]=({num_experts},), got "
                            f"{type(bias).__name__}")
        if tuple(bias.shape) != (num_experts,):
            raise ValueError(f"{bias_name} must have shape [E]=({num_experts},), got {tuple(bias.shape)}")
        if not (jnp.issubdtype(bias.dtype, jnp.floating) or jnp.issubdtype(bias.dtype, jnp.integer)):
            raise TypeError(f"{bias_name} must be a float (or integer) array, got {bias.dtype}")
    if (num_groups is None) != (top_groups is None):
        raise ValueError(f"num_groups and top_groups go together (group-limited routing needs both, or neither), "
                         f"got num_groups={num_groups!r}, top_groups={top_groups!r}")
    if num_groups is not None:
        if not is_static_int(num_groups) or num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups must be an int >= 1 that divides E={num_experts} (the experts split into "
                             f"num_groups contiguous groups), got {num_groups!r}")
        num_groups = int(num_groups)
        if not is_static_int(top_groups) or not 1 <= top_groups <= num_groups:
            raise ValueError(f"top_groups must be an int in [1, num_groups={num_groups}], got {top_groups!r}")
        top_groups = int(top_groups)
        if top_k > top_groups * (num_experts // num_groups):
            raise ValueError(f"top_k={top_k} must be at most top_groups * E / num_groups = {top_groups} * "
                             f"{num_experts // num_groups} (the experts of the kept groups)")
    if not isinstance(scale, numbers.Real) or isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"{scale_name} must be a Python float (static, not an array), got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{scale_name} must be finite, got {scale!r}")
    return num_groups, top_groups, float(scale), reference.check_group_score(group_score, num_groups)


def int_array(name, x, ndim):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")


def compute_dtype(lhs, rhs):
    """The dtype a grouped matmul multiplies ``lhs`` and ``rhs`` in: their promoted float dtype (bf16 x f32 -> f32,
    bf16 x f16 -> f32), as ``jax.lax.dot`` and megablox do, so a mixed call never silently rounds the wider operand.
    Like lax's, it holds under ``jax_numpy_dtype_promotion="strict"`` too."""
    return standard_promotion(lhs.dtype, rhs.dtype)


def standard_promotion(a, b):
    """``jnp.promote_types(a, b)`` under JAX's standard rules whatever ``jax_numpy_dtype_promotion`` says: for a
    dtype this package picks itself (a wider accumulator), which a caller's ``"strict"`` mode must not refuse."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(a, b)


def out_dtype(preferred_element_type, default):
    if preferred_element_type is None:
        return jnp.dtype(default)
    try:
        dtype = jnp.dtype(preferred_element_type)
    except TypeError as e:
        raise TypeError(f"preferred_element_type must be None or a dtype (float32, bfloat16 or float16), got "
                        f"{preferred_element_type!r}") from e
    if not is_kernel_float(dtype):
        raise TypeError(f"preferred_element_type must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def group_offset_array(group_offset, num_groups=None):
    """``group_offset`` (None, int, or int array of shape () or (1,)) -> int32 array of shape (1,).

    With ``num_groups`` (G = ``len(group_sizes)``): an offset outside ``[0, G)`` selects *no* local groups on every
    backend (it becomes G: ``gmm`` returns zeros, ``tgmm`` zero blocks, all gradients zero); inside ``checked()`` it
    raises ``ValueError`` instead."""
    if group_offset is None:
        return jnp.zeros((1,), jnp.int32)
    host = isinstance(group_offset, (int, np.integer, np.ndarray)) and not isinstance(group_offset, bool)
    offset = np.asarray(group_offset) if host else jnp.asarray(group_offset)
    if not jnp.issubdtype(offset.dtype, jnp.integer) or offset.size != 1 or offset.ndim > 1:
        raise TypeError(f"group_offset must be an integer scalar or shape-(1,) array, got {offset.dtype}{offset.shape}")
    if host:
        return _host_group_offset(int(offset.reshape(())), num_groups)
    offset = offset.reshape(1)
    if offset.dtype.itemsize < 4:
        offset = offset.astype(jnp.int32)
    if num_groups is None:
        return offset.astype(jnp.int32)
    if checks_enabled():
        _runtime_check(lambda o: 0 <= int(o[0]) < num_groups, lambda o: _offset_range_error(num_groups, o[0]), offset)
    in_range = (offset >= 0) & (offset < num_groups)  # compared in the input dtype: no wrap on the cast
    return jnp.where(in_range, offset.astype(jnp.int32), jnp.int32(num_groups)).astype(jnp.int32)


def _offset_range_error(num_groups, value):
    return f"group_offset must lie in [0, G={num_groups}) (G = len(group_sizes)); got {value}"


def _host_group_offset(value: int, num_groups):
    """``group_offset_array`` of a host (Python / NumPy) value, judged at full width before the int32 cast, so that
    ``2**40`` or ``np.int64(2**32 + 1)`` (which an int32 cast wraps to 1) is out of range, not a wrapped offset."""
    if num_groups is None:
        if not -2 ** 31 <= value < 2 ** 31:
            raise ValueError(f"group_offset must fit in int32, got {value}")
    elif not 0 <= value < num_groups:
        if checks_enabled():
            raise ValueError(_offset_range_error(num_groups, value))
        value = num_groups
    return jnp.full((1,), value, jnp.int32)


def _saturating_add(cap):
    """``(a, b) -> min(a + b, cap)`` for ``a, b`` in ``[0, cap]``, computed as ``a + min(b, cap - a)``: associative
    and never past ``cap``, so no intermediate can overflow."""
    return lambda a, b: a + jnp.minimum(b, cap - a)


def clamp_group_sizes(group_sizes, num_rows):
    """Sizes with negatives as zero and groups truncated at ``num_rows`` (so ``sum <= num_rows``), int32.

    Saturating for every integer input: each size is first clipped to ``[0, num_rows]`` in its own dtype (no wrap
    on the cast to int32), and the running end of the groups is a saturating prefix sum that never passes
    ``num_rows`` (``[5, 2**31-1, 0]`` with M=16 -> ``[5, 11, 0]``; ``[MAX, MIN, MAX]`` -> ``[16, 0, 0]``)."""
    dtype = jnp.dtype(group_sizes.dtype)
    if isinstance(group_sizes, np.ndarray):  # host sizes at full width (NumPy int64 would wrap on the device copy)
        sizes = jnp.asarray(np.clip(group_sizes, 0, num_rows).astype(np.int32))
    elif dtype.itemsize < 4 or dtype == jnp.int32:
        sizes = jnp.clip(group_sizes.astype(jnp.int32), 0, num_rows)
    else:  # int64 / uint32 / uint64: num_rows fits the dtype; clip before narrowing
        sizes = jnp.clip(group_sizes, 0, num_rows).astype(jnp.int32)
    if checks_enabled():
        _runtime_check(lambda s: (s >= 0).all() and _exact_sum(s) <= num_rows,
                       lambda s: f"group_sizes must be >= 0 and sum to at most M={num_rows}; got sum "
                                 f"{_exact_sum(s)}, min {s.min() if s.size else 0}", group_sizes)
    if sizes.shape[0] == 0:
        return sizes
    return _saturated_sizes(sizes, num_rows)


def _exact_sum(sizes) -> int:
    """The sum of host sizes as a Python int (an int64 sum would wrap for uint64 ``2**64 - 1``)."""
    return sum(int(v) for v in np.asarray(sizes).reshape(-1))


@functools.partial(jax.jit, static_argnums=1)  # compiled even when called eagerly: jax 0.11.2 segfaults on an
def _saturated_sizes(sizes, num_rows):         # eager associative_scan inside an eager shard_map
    ends = jax.lax.associative_scan(_saturating_add(jnp.int32(num_rows)), sizes)
    return jnp.diff(ends, prepend=jnp.zeros((1,), jnp.int32)).astype(jnp.int32)


def zeros_if_empty(shape, dtype, dims, *like):
    """Degenerate shapes: ``zeros(shape, dtype)`` (varying over the manual axes of ``like``) when any of ``dims`` is
    0, else ``None``. Every public op returns this early, so no kernel ever sees a zero-size dimension; gradients of
    the inputs are then zeros of their own (possibly empty) shapes."""
    if all(not isinstance(d, (int, np.integer)) or d > 0 for d in dims):  # symbolic dims (jax.export) are >= 1
        return None
    out = jnp.zeros(shape, dtype)
    return vma.like(out, vma.match_vma(*like)[0]) if like else out


def sort_idx_array(sort_idx):
    """``sort_idx`` [N] int (as ``sort_by_expert`` returns): must be a permutation of ``[0, N)``. That cannot be seen
    at trace time; other values give unspecified rows (never an out-of-bounds access). Inside ``checked()`` a
    non-permutation raises ``ValueError`` at run time."""
    int_array("sort_idx", sort_idx, 1)
    if checks_enabled():
        _runtime_check(lambda s: np.array_equal(np.sort(s.astype(np.int64)), np.arange(s.shape[0])),
                       lambda s: f"sort_idx must be a permutation of [0, {s.shape[0]}) (as sort_by_expert returns); "
                                 f"got min {s.min() if s.size else 0}, max {s.max() if s.size else 0}, "
                                 f"{s.shape[0] - np.unique(s).size} duplicates", sort_idx)


def check_expert_ids(expert_ids, num_experts):
    if checks_enabled():
        _runtime_check(lambda e: ((e >= 0) & (e < num_experts)).all(),
                       lambda e: f"expert_ids must lie in [0, {num_experts}); got min {e.min()}, max {e.max()}",
                       expert_ids)


def check_group_sizes(group_sizes, num_local, rhs_name="rhs"):
    """group_sizes [G] int with G >= the G_local=``num_local`` groups that ``rhs_name`` holds."""
    int_array("group_sizes", group_sizes, 1)
    if num_local > group_sizes.shape[0]:
        raise ValueError(f"{rhs_name} has {num_local} groups but group_sizes has only {group_sizes.shape[0]}: "
                         f"{rhs_name}.shape[0] (G_local) must be <= len(group_sizes) (G)")


def expert_ids_int32(expert_ids, num_experts):
    """Integer expert ids -> int32 with every id outside ``[0, E)`` kept out of range (-1): the range test runs in
    the input dtype, so no wide id (int64 ``2**32 + 1`` under x64, uint64) wraps onto a valid expert."""
    dtype = jnp.dtype(expert_ids.dtype)
    if dtype == jnp.int32 or (dtype.itemsize < 4):
        return expert_ids.astype(jnp.int32)
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    return jnp.where(valid, expert_ids.astype(jnp.int32), jnp.int32(-1))


def check_gmm(lhs, rhs, group_sizes, transpose_rhs, names=("lhs", "rhs")):
    """A grouped matmul's operands; ``names``: what the caller calls lhs and rhs (errors name those)."""
    a, b = names
    flag("transpose_rhs", transpose_rhs)
    float_array(a, lhs, 2)
    float_array(b, rhs, 3)
    int_array("group_sizes", group_sizes, 1)
    k_axis = 2 if transpose_rhs else 1
    if rhs.shape[k_axis] != lhs.shape[1]:
        layout = "[G_local, N, K]" if transpose_rhs else "[G_local, K, N]"
        raise ValueError(f"{b} must be {layout} with K={lhs.shape[1]} ({a} is {tuple(lhs.shape)}), "
                         f"got {b} {tuple(rhs.shape)}")
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"{b} has {rhs.shape[0]} groups but group_sizes has only {group_sizes.shape[0]}: "
                         f"{b}.shape[0] (G_local) must be <= len(group_sizes) (G)")


def check_existing_out(existing_out, shape, dtype):
    """``existing_out`` (None or the [M,N] array gmm's local rows overwrite) must have gmm's output shape and dtype."""
    if existing_out is None:
        return
    if not hasattr(existing_out, "shape") or not hasattr(existing_out, "dtype"):
        raise TypeError(f"existing_out must be None or an array, got {type(existing_out).__name__}")
    if tuple(existing_out.shape) != tuple(shape) or jnp.dtype(existing_out.dtype) != jnp.dtype(dtype):
        raise ValueError(f"existing_out must be the output's shape {tuple(shape)} and dtype {jnp.dtype(dtype)} "
                         f"(preferred_element_type, else lhs's dtype), got "
                         f"{existing_out.dtype}{tuple(existing_out.shape)}")


def check_tgmm(lhs, rhs, group_sizes, num_groups):
    float_array("lhs", lhs, 2)
    float_array("rhs", rhs, 2)
    int_array("group_sizes", group_sizes, 1)
    if lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"lhs [M,K] and rhs [M,N] must share M, got lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)}")
    if num_groups is not None and not (is_static_int(num_groups) and 0 <= num_groups
                                       <= group_sizes.shape[0]):
        raise ValueError(f"num_groups must be a static int in [0, len(group_sizes)={group_sizes.shape[0]}], "
                         f"got {num_groups!r}")


def check_expert_weights(x, w_gate, w_up, w_down, x_name="x"):
    """x [..., D] and the SwiGLU weights w_gate / w_up [E,D,F], w_down [E,F,D]: floats of matching shapes (errors
    name the user's argument)."""
    float_array(x_name, x)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        float_array(name, w, 3)
    e, d, f = w_gate.shape
    if x.shape[-1] != d:
        raise ValueError(f"{x_name} [..., D] must have D={d} to match w_gate [E,D,F] {tuple(w_gate.shape)}, got "
                         f"{tuple(x.shape)}")
    if tuple(w_up.shape) != (e, d, f):
        raise ValueError(f"w_up must be [E,D,F]={(e, d, f)} like w_gate, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (e, f, d):
        raise ValueError(f"w_down must be [E,F,D]={(e, f, d)} (w_gate is [E,D,F]={(e, d, f)}), got "
                         f"{tuple(w_down.shape)}")
