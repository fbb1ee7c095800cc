"""Expert-parallel token exchange: all-to-all offsets/sizes from a count matrix, and the ragged all-to-all itself.

Count-matrix convention (``EP`` devices on the expert axis, ``counts[i, j]`` = token copies device ``i`` sends to
device ``j``, i.e. routed to one of ``j``'s experts; the sender's copies are sorted by global expert, so its chunk
for ``j`` is contiguous):

1. ``in_off[i, j]  = sum_{j' < j} counts[i, j']``          where ``i``'s chunk for ``j`` starts in ``i``'s buffer.
2. ``out_off[i, j] = sum_{i' < i} counts[i', j]``          where ``i``'s chunk lands in ``j``'s receive buffer.
3. ``sent[i, j] = clip(capacity - out_off[i, j], 0, counts[i, j])``: rows past the receive buffer are dropped,
   deterministically the tail of the last senders (dropless: ``capacity`` = worst case, nothing is dropped).

Replicated batch (every device on the axis holds the same tokens): each device keeps only its own chunk, nothing
crosses devices: ``sent = diag(min(counts[i, i], capacity))``, ``out_off = 0``.

Device ``me`` calls ``ragged_all_to_all`` forward with ``(in_off[me], sent[me], out_off[me], sent[:, me])`` and the
reverse exchange with ``(out_off[:, me], sent[:, me], in_off[:, me], sent[me])``.

Platforms without a ``ragged-all-to-all`` HLO (XLA:CPU) use ``_dense_ragged_all_to_all``: each chunk padded to a
fixed size, one dense ``all_to_all`` (plus one for the output offsets), scatter into ``output``. The choice is made
per lowering platform (``jax.lax.platform_dependent`` in ``ragged_all_to_all``), so an export for TPU or GPU from
a CPU host gets the real ``ragged-all-to-all``; ``platform_has_ragged_all_to_all`` answers for the default device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ExchangePlan", "exchange_plan", "all_to_all_params", "reverse_params", "dropless_buffer_rows",
           "buffer_rows", "ragged_all_to_all", "platform_has_ragged_all_to_all"]

_EMULATED_PLATFORMS = ("cpu",)  # lowering platforms without a ragged-all-to-all HLO


def platform_has_ragged_all_to_all() -> bool:
    """Whether the default device's platform runs ``lax.ragged_all_to_all`` (else the dense emulation)."""
    return jax.default_backend() not in _EMULATED_PLATFORMS


class ExchangePlan(NamedTuple):
    """Full ``[EP, EP]`` int32 matrices of the exchange (see module docstring, items 1-3)."""
    in_off: jax.Array
    sent: jax.Array
    out_off: jax.Array


def _exclusive_cumsum(a, axis):
    return jnp.cumsum(a, axis=axis) - a


def exchange_plan(counts, capacity: int | None = None, batch_sharded: bool = True) -> ExchangePlan:
    """counts [EP, EP] int -> ``ExchangePlan``; ``capacity`` = receive-buffer rows (None: unbounded)."""
    counts = jnp.asarray(counts, jnp.int32)
    in_off = _exclusive_cumsum(counts, 1)
    if batch_sharded:
        out_off = _exclusive_cumsum(counts, 0)
        cap = jnp.iinfo(jnp.int32).max if capacity is None else capacity
        sent = jnp.clip(cap - out_off, 0, counts)
    else:
        out_off = jnp.zeros_like(counts)
        diag = jnp.diagonal(counts) if capacity is None else jnp.minimum(jnp.diagonal(counts), capacity)
        sent = jnp.diag(diag).astype(jnp.int32)
    return ExchangePlan(in_off, sent, out_off)


def all_to_all_params(plan: ExchangePlan, me):
    """Forward ``(input_offsets, send_sizes, output_offsets, recv_sizes)`` of device ``me``, each [EP] int32."""
    return plan.in_off[me], plan.sent[me], plan.out_off[me], plan.sent[:, me]


def reverse_params(plan: ExchangePlan, me):
    """Parameters that send every received chunk back to where it came from."""
    return plan.out_off[:, me], plan.sent[:, me], plan.in_off[:, me], plan.sent[me]


def dropless_buffer_rows(t_local: int, top_k: int, ep: int, num_experts: int, batch_sharded: bool = True) -> int:
    """Worst-case receive rows: each of the senders sends at most ``t_local * min(top_k, E/EP)`` copies to one
    device (a token picks k distinct experts), so ``t_local * min(EP * top_k, E)`` = ``T_local*k * min(EP, E/k)``
    (one sender when the batch is replicated)."""
    per_sender = t_local * min(top_k, num_experts // ep)
    return per_sender * (ep if batch_sharded else 1)


def buffer_rows(t_local: int, top_k: int, ep: int, num_experts: int, batch_sharded: bool = True,
                capacity_factor: float | None = None) -> int:
    """Receive-buffer rows: dropless worst case, or ``ceil(cf * mean received)`` capped by it."""
    worst = dropless_buffer_rows(t_local, top_k, ep, num_experts, batch_sharded)
    if capacity_factor is None:
        return worst
    mean = t_local * top_k * (ep if batch_sharded else 1) / ep
    return max(1, min(worst, math.ceil(capacity_factor * mean)))


def _chunk_rows(offsets, sizes, chunk, limit):
    """[n, chunk] row indices ``offsets[c] + s`` and validity ``s < sizes[c]`` (indices clipped to ``limit``)."""
    s = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    idx = offsets[:, None] + s
    valid = (s < sizes[:, None]) & (idx < limit)
    return jnp.where(valid, idx, 0), valid


def _scatter_chunks(output, chunks, offsets, sizes):
    """output with ``chunks[c, :sizes[c]]`` written at rows ``offsets[c]...``; other rows untouched."""
    n, chunk = chunks.shape[:2]
    idx, valid = _chunk_rows(offsets, sizes, chunk, output.shape[0])
    idx = jnp.where(valid, idx, output.shape[0])  # out of bounds -> dropped
    return output.at[idx.reshape(-1)].set(chunks.reshape(n * chunk, chunks.shape[-1]).astype(output.dtype), mode="drop")


def _gather_chunks(operand, offsets, sizes, chunk):
    idx, valid = _chunk_rows(offsets, sizes, chunk, operand.shape[0])
    return jnp.where(valid[..., None], operand[idx], 0)


def _dense_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    """``ragged_all_to_all`` from a padded dense ``all_to_all`` (chunks padded to ``min(rows in, rows out)``)."""
    chunk = min(operand.shape[0], output.shape[0])
    send = _gather_chunks(operand, input_offsets, send_sizes, chunk)                 # [EP, chunk, D]
    recv = jax.lax.all_to_all(send, axis_name, 0, 0)                                 # recv[i] = chunk from i
    where = jax.lax.all_to_all(output_offsets.reshape(-1, 1), axis_name, 0, 0)[:, 0]  # where[i]: i's offset here
    return _scatter_chunks(output, recv, where, recv_sizes)


def _local_ragged_copy(operand, output, input_offsets, send_sizes, output_offsets, me):
    """Replicated batch: only the chunk a device sends to itself moves (no collective)."""
    chunk = min(operand.shape[0], output.shape[0])
    pick = lambda a: jax.lax.dynamic_slice(a, (me,), (1,))
    rows = _gather_chunks(operand, pick(input_offsets), pick(send_sizes), chunk)
    return _scatter_chunks(output, rows, pick(output_offsets), pick(send_sizes))


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name,
                      local_only=False):
    """``lax.ragged_all_to_all`` semantics over ``axis_name`` (sizes/offsets [EP] int32, sender-side
    ``output_offsets``); ``local_only``: replicated batch, only the self chunk is copied."""
    if local_only:
        return _local_ragged_copy(operand, output, input_offsets, send_sizes, output_offsets,
                                  jax.lax.axis_index(axis_name))
    def emulated(*args):
        return _dense_ragged_all_to_all(*args, axis_name)

    def native(*args):
        return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)
    return jax.lax.platform_dependent(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                      **{p: emulated for p in _EMULATED_PLATFORMS}, default=native)
