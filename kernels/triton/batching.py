"""``jax.vmap`` for the Triton backend: every kernel launch gets a ``jax.custom_batching.custom_vmap`` rule that folds
the batch into the kernel's own ragged dimension and launches once (``jax_triton.triton_call`` has no batching rule,
and a Python loop over the batch is never taken).

Rules (``B`` the vmapped axis size; unbatched operands are broadcast, except a shared ``rhs``):

* GMM launch (``gmm`` / ``gather_gmm`` / ``scatter_gmm``; ``fold_gmm``): the row-tile tables ``[B, 3, T]`` (JAX
  vmaps their ``jnp`` schedule) are concatenated into one ``[3, B*T]`` table with rows offset by ``b*M``: batch b's
  rows are rows ``b*M .. b*M+M-1`` of a ``[B*M, K]`` lhs, every tile stays inside one batch and one group, and the
  idle / zero-fill tiles of each batch keep their meaning. A batched ``rhs [B,G,K,N]`` is read as ``[B*G,K,N]``
  with group ids offset by ``b*G``; a shared ``rhs [G,K,N]`` keeps its group ids (no copy, no tiling). Fused row
  maps: ``sort_idx`` values are offset by ``b*M`` (token-major slots of batch b), so ``slot // k`` lands on batch
  b's tokens of the ``[B*T, K]`` lhs, and weights / scattered rows follow.
* TGMM launch (``fold_tgmm``): group bounds ``[B, 3, G]`` (local id + ``b*G``, start / end + ``b*M``) ->
  ``[3, B*G]`` groups over ``[B*M, K]`` /
  ``[B*M, N]`` -> ``[B*G, K, N]``.
* ``sort_by_expert`` (``fold_sort``): keys fold into ``B*(E+1)`` experts, ``b*(E+1) + id`` (``E`` for dropped ids,
  so each batch's dropped copies still sort after its routed ones and before the next batch); one counting sort,
  then sizes ``[B, E+1][:, :E]`` and ``sort_idx - b*T*k``. Its histogram is ``B*(E+1)`` bins wide per block: fine
  for small ``B*E``; a batch grid axis would be cheaper for large ones.
* Row kernels (``gather_rows``, ``combine_rows``, ``combine_weight_grad``): rows of batch b at ``b*T`` / ``b*N``,
  ``sort_idx + b*N``. ``n_valid`` is a per-batch prefix, which one folded launch cannot express: the folded call
  runs with every row valid and rows ``>= n_valid[b]`` are zeroed (``gather_rows``' output, the ``y`` input of the
  combines) with a ``jnp.where``, and so are the combine's weights and the weight gradient of the slots whose row is
  past it (a permutation write of the row mask into slot order); results are identical, only the "no read past
  n_valid" saving is lost under vmap.

Each rule calls the wrapped launch again on the folded operands, so nested vmaps fold one axis at a time. Gradients
come from the custom VJPs of ``moe_ops`` (built from these same functions), so ``grad(vmap(f))`` and
``vmap(grad(f))`` both batch through these rules.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

# sort's kernels load with every other Triton kernel module (gmm imports this one): a ``@triton.jit`` decorated
# while the CPU bridge interprets a kernel on a callback thread would become an InterpretedFunction
# (``kernels.triton.bridge``, ``_interpreter_mode``), so no kernel module is imported lazily.
from kernels.triton import schedule, sort

__all__ = ["folds_batch", "GmmRows", "fold_gmm", "fold_tgmm", "sort_by_expert", "gather_rows", "combine_rows",
           "combine_weight_grad"]


def folds_batch(fold):
    """Decorator: ``fn(*arrays, **static)`` gains a vmap rule ``fold(fn_again, B, in_batched, arrays, static) ->
    batched outputs`` (``fn_again`` is the decorated function, for the folded launch). Positional arguments are
    arrays or ``None``; keyword arguments are static."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(*arrays, **static):
            call = custom_vmap(lambda *xs: fn(*xs, **static))

            @call.def_vmap
            def rule(axis_size, in_batched, *xs):
                out = fold(wrapped, axis_size, list(in_batched), xs, static)
                return out, jax.tree.map(lambda _: True, out)

            return call(*arrays)
        return wrapped
    return decorate


def _bcast(x, batched, size):
    return x if batched else jnp.broadcast_to(x, (size,) + x.shape)


def _offsets(size, shape_tail=()):
    """int32 ``b`` for b in [0, size), shaped to broadcast against ``[size, *shape_tail]``."""
    return jnp.arange(size, dtype=jnp.int32).reshape((size,) + (1,) * len(shape_tail))


def _flat(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


@dataclasses.dataclass(frozen=True)
class GmmRows:
    """Static row layout of a GMM launch: ``num_rows`` sorted rows and the fused row maps (``gmm.RowMap``)."""

    num_rows: int
    gather: bool = False
    scatter: bool = False
    weighted: bool = False
    top_k: int = 1

    @property
    def fused(self) -> bool:
        return self.gather or self.scatter or self.weighted

    def constexprs(self) -> dict:
        # A symbolic row count (jax.export) clamps slots to its static upper bound instead.
        slots = schedule.static_upper_bound(self.num_rows, "sorted rows") if self.fused else 1
        return dict(GATHER=self.gather, SCATTER=self.scatter, WEIGHTED=self.weighted, TOP_K=self.top_k,
                    NUM_SLOTS=slots)


def fold_gmm(call, size, batched, arrays, static):
    """vmap rule of the GMM launch ``(lhs, rhs, tiles[3,T], sort_idx, weights)`` (module docstring)."""
    lhs, rhs, tiles, sort_idx, weights = arrays
    rows: GmmRows = static["rows"]
    m = rows.num_rows
    lhs = _flat(_bcast(lhs, batched[0], size))
    group_stride = rhs.shape[1] if batched[1] else 0
    if batched[1]:
        rhs = _flat(rhs)
    tiles = _bcast(tiles, batched[2], size)
    b = _offsets(size, tiles.shape[2:])
    group = jnp.where(tiles[:, 0] >= 0, tiles[:, 0] + b * group_stride, tiles[:, 0])
    tiles = jnp.stack([group, tiles[:, 1] + b * m, tiles[:, 2] + b * m], axis=1)
    tiles = jnp.swapaxes(tiles, 0, 1).reshape(3, -1)
    if rows.fused:
        sort_idx = (_bcast(sort_idx, batched[3], size) + b * m).reshape(-1)
    if rows.weighted:
        weights = _bcast(weights, batched[4], size).reshape(-1)
    static = dict(static, rows=dataclasses.replace(rows, num_rows=size * m))
    out = call(lhs, rhs, tiles, sort_idx, weights, **static)
    return out.reshape((size, m) + out.shape[1:])


def fold_tgmm(call, size, batched, arrays, static):
    """vmap rule of the TGMM launch ``(lhs[M,K], rhs[M,N], bounds[3,G])`` (module docstring)."""
    lhs, rhs, bounds = (_bcast(a, bat, size) for a, bat in zip(arrays, batched))
    m, num_groups = lhs.shape[1], bounds.shape[2]
    b = _offsets(size, (1,))                                  # bounds rows: local group id, start, end
    bounds = jnp.stack([bounds[:, 0] + b * num_groups, bounds[:, 1] + b * m, bounds[:, 2] + b * m], axis=1)
    bounds = jnp.swapaxes(bounds, 0, 1).reshape(3, -1)
    out = call(_flat(lhs), _flat(rhs), bounds, **static)
    return out.reshape((size, num_groups) + out.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# Sort and row kernels: whole backend functions of ``kernels.triton.sort`` get a rule (their launches are
# several kernels plus jnp glue, and the fold is simplest at the function level).


def _fold_sort(call, size, batched, arrays, static):
    (ids,) = arrays
    e = static["num_experts"]
    key = jnp.where((ids >= 0) & (ids < e), ids, e) + _offsets(size, ids.shape[1:]) * (e + 1)
    sizes, sort_idx = call(_flat(key), num_experts=size * (e + 1))
    n = sort_idx.shape[0] // size
    return sizes.reshape(size, e + 1)[:, :e], sort_idx.reshape(size, n) - _offsets(size, (n,)) * n


@folds_batch(_fold_sort)
def _sort_by_expert(expert_ids, *, num_experts):
    return sort.sort_by_expert(expert_ids, num_experts)


def sort_by_expert(expert_ids, num_experts):
    """``kernels.triton.sort.sort_by_expert`` with a vmap rule (expert ids fold into ``B*(E+1)`` keys)."""
    return _sort_by_expert(expert_ids.astype(jnp.int32), num_experts=num_experts)


def _valid_rows(n_valid, batched, size, n):
    """bool [B, n, 1]: row i of batch b is below that batch's ``n_valid`` (every row for ``None``)."""
    if n_valid is None:
        return None
    nv = n_valid.reshape(size, 1) if batched else jnp.broadcast_to(n_valid.reshape(1, 1), (size, 1))
    return (jnp.arange(n, dtype=jnp.int32)[None, :] < jnp.clip(nv, 0, n))[..., None]


def _sort_idx_folded(sort_idx, batched, size):
    sort_idx = _bcast(sort_idx, batched, size)
    n = sort_idx.shape[1]
    return (sort_idx + _offsets(size, (n,)) * n).reshape(-1), n


def _masked_rows(y, batched, n_valid, nv_batched, size):
    """y [B, N, D] with rows ``>= n_valid[b]`` zeroed (see module docstring)."""
    y = _bcast(y, batched, size)
    valid = _valid_rows(n_valid, nv_batched, size, y.shape[1])
    return y if valid is None else jnp.where(valid, y, jnp.zeros((), y.dtype))


def _fold_gather_rows(call, size, batched, arrays, static):
    x, sort_idx, row_weights, n_valid = arrays
    flat_idx, n = _sort_idx_folded(sort_idx, batched[1], size)
    if row_weights is not None:
        row_weights = _flat(_bcast(row_weights, batched[2], size))
    out = call(_flat(_bcast(x, batched[0], size)), flat_idx, row_weights, None, **static)
    out = out.reshape(size, n, -1)
    valid = _valid_rows(n_valid, batched[3], size, n)
    return out if valid is None else jnp.where(valid, out, jnp.zeros((), out.dtype))


@folds_batch(_fold_gather_rows)
def _gather_rows(x, sort_idx, row_weights, n_valid, *, k):
    return sort.gather_rows(x, sort_idx, k, row_weights=row_weights, n_valid=n_valid)


def gather_rows(x, sort_idx, k, row_weights=None, n_valid=None):
    """``kernels.triton.sort.gather_rows`` with a vmap rule."""
    n_valid = None if n_valid is None else jnp.asarray(n_valid, jnp.int32).reshape(1)
    return _gather_rows(x, sort_idx.astype(jnp.int32), row_weights, n_valid, k=k)


def _valid_slots(sort_idx, batched, valid):
    """bool [B, N] in slot (token-major) order: slot ``sort_idx[b, i]`` is valid iff its sorted row ``i`` is (``valid``
    [B, N, 1] from ``_valid_rows``); one permutation write."""
    sort_idx = _bcast(sort_idx, batched, valid.shape[0])
    rows = jnp.arange(valid.shape[0])[:, None]
    return jnp.zeros(valid.shape[:2], bool).at[rows, sort_idx].set(valid[..., 0], unique_indices=True, mode="drop")


def _fold_combine_rows(call, size, batched, arrays, static):
    y, sort_idx, weights, n_valid = arrays
    y = _masked_rows(y, batched[0], n_valid, batched[3], size)
    flat_idx, _ = _sort_idx_folded(sort_idx, batched[1], size)
    weights = _bcast(weights, batched[2], size)
    valid = _valid_rows(n_valid, batched[3], size, y.shape[1])
    if valid is not None:  # a slot past its batch's n_valid adds exactly zero: its weight is selected away too
        weights = jnp.where(_valid_slots(sort_idx, batched[1], valid).reshape(weights.shape), weights,
                            jnp.zeros((), weights.dtype))
    out = call(_flat(y), flat_idx, _flat(weights), None, **static)
    return out.reshape((size, weights.shape[1]) + out.shape[1:])


@folds_batch(_fold_combine_rows)
def _combine_rows(y, sort_idx, weights, n_valid):
    return sort.combine_rows(y, sort_idx, weights, n_valid=n_valid)


def combine_rows(y, sort_idx, weights, n_valid=None):
    """``kernels.triton.sort.combine_rows`` with a vmap rule."""
    n_valid = None if n_valid is None else jnp.asarray(n_valid, jnp.int32).reshape(1)
    return _combine_rows(y, sort_idx.astype(jnp.int32), weights, n_valid)


def _fold_weight_grad(call, size, batched, arrays, static):
    dout, y, sort_idx, n_valid = arrays
    y = _masked_rows(y, batched[1], n_valid, batched[3], size)
    flat_idx, _ = _sort_idx_folded(sort_idx, batched[2], size)
    dout = _bcast(dout, batched[0], size)
    out = call(_flat(dout), _flat(y), flat_idx, None, **static)
    out = out.reshape((size, dout.shape[1]) + out.shape[1:])
    valid = _valid_rows(n_valid, batched[3], size, y.shape[1])
    if valid is None:
        return out
    return jnp.where(_valid_slots(sort_idx, batched[2], valid).reshape(out.shape), out, 0.0)  # whatever dout holds


@folds_batch(_fold_weight_grad)
def _combine_weight_grad(dout, y, sort_idx, n_valid, *, k):
    return sort.combine_weight_grad(dout, y, sort_idx, k, n_valid=n_valid)


def combine_weight_grad(dout, y, sort_idx, k, n_valid=None):
    """``kernels.triton.sort.combine_weight_grad`` with a vmap rule."""
    n_valid = None if n_valid is None else jnp.asarray(n_valid, jnp.int32).reshape(1)
    return _combine_weight_grad(dout, y, sort_idx.astype(jnp.int32), n_valid, k=k)
