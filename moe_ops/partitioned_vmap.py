"""``jax.vmap`` of the custom-partitioned MoE ops (``jax.custom_partitioning`` has no batching rule).

``batched(op, fold)`` gives ``op(*arrays, static)`` a ``custom_vmap`` rule: ``fold`` takes the batch in one call
when it can, otherwise the op runs once per batch element (``lax.map``), the unbatched operands shared. The rule
calls the batched op again, never ``op`` itself, so an enclosing ``vmap`` (nested ``vmap``, or a ``vmap`` around
the per-element ``lax.map``) finds a batching rule too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from moe_ops.reference import flatten_tokens

__all__ = ["batched", "fold_tokens", "no_fold"]


def batched(op, fold):
    """``op(*arrays, static)`` with a vmap rule: ``fold(call, static, B, in_batched, arrays)`` when it can take the
    batch in one call of ``call`` (the batched op; else it returns None), otherwise one call per batch element."""
    def call(*args):
        *arrays, static = args
        fn = custom_vmap(lambda *xs: op(*xs, static))

        @fn.def_vmap
        def rule(axis_size, in_batched, *xs):
            out = fold(call, static, axis_size, in_batched, xs)
            if out is None:
                def one(sliced):
                    it = iter(sliced)
                    return call(*[next(it) if b else a for a, b in zip(xs, in_batched)], static)
                out = jax.lax.map(one, [a for a, b in zip(xs, in_batched) if b])
            return out, jax.tree.map(lambda _: True, out)
        return fn(*arrays)
    return call


def fold_tokens(call, static, batch, in_batched, arrays):
    """The forward maps tokens independently: a batch of x / router_logits over shared weights is more tokens
    (not with a capacity, whose drops depend on the tokens exchanged together)."""
    x, logits, *shared = arrays  # the weights and router_bias: shared by the batch, or no fold
    if any(in_batched[2:]) or static.config.capacity_factor is not None:
        return None
    x, logits = (a if b else jnp.broadcast_to(a, (batch,) + a.shape) for a, b in zip((x, logits), in_batched[:2]))
    out = call(flatten_tokens(x), flatten_tokens(logits), *shared, static)
    return out.reshape(x.shape)


def no_fold(*_):
    """Per-element calls always (the backward: each element's weight gradient is its own)."""
    return None
