"""``pallas_call`` inside a user's ``jax.shard_map`` with ``check_vma=True`` (manual-axis variance, "vma").

Every Pallas call of this package goes through ``pallas_call`` here, a drop-in for ``pl.pallas_call`` that types its
outputs from its operands:

* Under ``check_vma`` Pallas refuses an ``out_shape`` whose ``manual_axis_type`` is None: it must say over which
  manual mesh axes each output varies. A kernel output derives from all its operands, so every output is typed as
  varying over the union of their varying axes (a token shard's kernel output varies like the tokens; with every
  operand replicated the output is replicated: the empty ``ManualAxisType``). Outside shard_map, or with
  ``check_vma=False``, Pallas ignores ``manual_axis_type``: the outputs' abstract values are unchanged.
* The Pallas interpreters (``interpret=True``, the HLO interpreter used off TPU, and ``pltpu.InterpretParams``)
  cannot run a kernel whose operands vary under ``check_vma``: when the call is lowered they evaluate the kernel and
  index-map jaxprs primitive by primitive, mixing the varying operands with invariant loop indices / constants, and
  the vma checks raise ("Primitive ... requires varying manual axes to match", jax 0.10 and 0.11). An interpreted
  call with varying operands is therefore bound through ``_invariant_call_p``, which runs the ``pallas_call`` on
  invariant-typed copies of its operands (at trace time its abstract value, at lowering time the same kernel on the
  same buffers), and its outputs are cast to vary over the union (``pcast(to="varying")``, a type-only cast).
  Mosaic (``interpret=False``: no evaluation, the kernel jaxpr is lowered) and calls with no varying operand take
  ``pl.pallas_call`` directly.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

from kernels.platform import varying_axes

__all__ = ["pallas_call", "out_struct"]


def out_struct(shape, dtype, varying=frozenset()) -> jax.ShapeDtypeStruct:
    """``jax.ShapeDtypeStruct(shape, dtype)`` of a Pallas output varying over the manual axes ``varying``."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=frozenset(varying)))


def pallas_call(kernel, *, out_shape, interpret, **kwargs):
    """``pl.pallas_call(kernel, out_shape=..., interpret=..., **kwargs)`` whose outputs (``out_shape``: a pytree of
    ``ShapeDtypeStruct``) vary over the union of the varying axes of the operands it is called with (module doc)."""
    def call(*operands):
        union = frozenset().union(*(varying_axes(a) for a in jax.tree.leaves(operands)))

        def run(varying, *ops):
            shapes = jax.tree.map(lambda s: out_struct(s.shape, s.dtype, varying), out_shape)
            return pl.pallas_call(kernel, out_shape=shapes, interpret=interpret, **kwargs)(*ops)

        if not (union and interpret):
            return run(union, *operands)
        outs = _invariant_call(lambda *ops: run(frozenset(), *ops), operands)
        axes = tuple(sorted(union))
        return jax.tree.map(lambda o: jax.lax.pcast(o, axes, to="varying"), outs)
    return call


def _invariant_call(fn, operands):
    """``fn(*operands)`` traced and lowered on invariant-typed operands; its outputs are typed invariant too. Values
    ``fn`` closes over (a dynamic grid bound computed from the group sizes) become operands as well."""
    flat, tree = jax.tree.flatten(operands)
    specs = lambda xs: [jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)) for x in xs]
    closed, shapes = jax.make_jaxpr(lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True)(*specs(flat))
    consts, n = list(closed.consts), len(closed.consts)
    jaxpr = jax.make_jaxpr(lambda *a: jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(closed.jaxpr, a[:n]))(*a[n:]))(
        *specs(consts), *specs(flat))
    outs = _invariant_call_p.bind(*consts, *flat, jaxpr=jaxpr)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)


_invariant_call_p = jex_core.Primitive("moe_pallas_invariant_call")
_invariant_call_p.multiple_results = True


def _abstract_eval(*_args, jaxpr):
    return list(jaxpr.out_avals), set(jaxpr.effects)


def _lowering(ctx, *args, jaxpr):
    invariant = ctx.replace(avals_in=list(jaxpr.in_avals))
    outs = mlir.lower_fun(jex_core.jaxpr_as_fun(jaxpr), multiple_results=True)(invariant, *args)
    if invariant.tokens_out is not None:  # the ordered effects of a TPU interpreter (InterpretParams) thread through
        ctx.set_tokens_out(invariant.tokens_out)
    return outs


def _batch(args, dims, *, jaxpr):
    fn = jax.vmap(jex_core.jaxpr_as_fun(jaxpr), in_axes=tuple(dims))
    outs = _invariant_call(fn, tuple(args))
    return outs, [0] * len(outs)


_invariant_call_p.def_effectful_abstract_eval(_abstract_eval)
_invariant_call_p.def_impl(lambda *args, jaxpr: jex_core.jaxpr_as_fun(jaxpr)(*args))
mlir.register_lowering(_invariant_call_p, _lowering)
batching.primitive_batchers[_invariant_call_p] = _batch
