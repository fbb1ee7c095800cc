"""The differentiable kernels as JAX primitives, so every transformation has a rule of its own: reverse mode,
forward mode (``jax.jvp``, ``jacfwd``, ``hessian``, ``linearize``), ``linear_transpose``, ``vmap``, and any nesting
of them, with no densified product anywhere.

Every op here is linear in its first operand, or bilinear in its first two (``Spec.n_linear``); the remaining
operands are integers (group sizes, offsets, ``sort_idx``, ``n_valid``), already validated by the public op, and
every operand has one manual-axis type (``vma.match_vma``). A ``Spec`` gives, for one example:

1. ``kernel(ops, *operands, **params)``: the backend call (``ops = backend.ops(impl)``). The primitive lowers to
   it through ``mlir.lower_fun``, so the program is exactly the backend's kernels (``impl=None`` keeps the
   per-platform choice).
2. ``shape(*avals, **params) -> (shape, dtype)`` of the output. Its abstract value is the first operand's (mesh
   and manual axes), replicated over that mesh but for the batch axes (4.): the kernels compute whole arrays.
3. ``transpose(ct, operands, wanted, **params)``: the cotangents of the wanted linear operands, each built from
   the primitives here (so derivatives of every order stay kernels).
4. ``ranks``: each operand's rank for one example. Batching: a vmapped axis becomes a leading axis (param ``nb``:
   how many) of the operands it maps; an operand unbatched at every level stays as it is (shared weights, group
   sizes: no copy, and no copy that could be sharded unlike the batched operands). An operand is batched iff its
   rank exceeds ``ranks`` (one batched at some levels only is broadcast over the others); the lowering vmaps the
   kernel ``nb`` times, so the Triton kernels fold the batch into one launch (``kernels.triton.batching``). An
   unbatched operand's cotangent comes out batched and is summed over the batch axes. The output's batch axes are
   sharded like the first batched operand's (explicit-sharding meshes), its other axes replicated.

Every bind records the Pallas interpret mode in effect (param ``interpret``): the lowering, which may run later,
interprets the same way, and a non-default mode's effects (the strict interpreter's ordered callbacks) are declared.

The JVP is the multilinear rule: ``d f(a, b) = f(da, b) + f(a, db)`` (``f(da)`` for a linear op), one bind per
non-zero tangent.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from kernels import platform
from moe_ops import backend

__all__ = ["Spec", "define", "bind", "aval_of"]


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    n_linear: int                       # 1: linear in operand 0; 2: bilinear in operands 0 and 1
    ranks: tuple[int, ...]              # per operand, for one example (trailing optional operands may be absent)
    kernel: Callable                    # (ops, *operands, **params) -> out, one example
    shape: Callable                     # (*avals, **params) -> (shape, dtype), one example
    transpose: Callable                 # (ct, operands, wanted: tuple[bool], **params) -> cotangents of linear ops


def define(spec: Spec) -> Primitive:
    """The primitive for ``spec``, with its impl, lowering, abstract eval, JVP, transpose and batching rules."""
    prim = Primitive(spec.name)

    def impl(*operands, nb, impl, interpret, **params):
        in_axes = tuple(0 if x.ndim > r else None for x, r in zip(operands, spec.ranks))

        def one(*xs):
            return spec.kernel(backend.ops(impl), *xs, **params)
        for _ in range(nb):
            one = jax.vmap(one, in_axes=in_axes)
        with platform.interpret_mode(interpret):
            return one(*operands)

    def effects(avals, params):
        """The kernels' effects: none, except under a non-default Pallas interpret mode (the strict interpreter's
        ordered callbacks), where the call is traced once to find them."""
        if params["interpret"] is True:
            return set()
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        return set(jax.make_jaxpr(functools.partial(impl, **params))(*shapes).effects)

    def abstract(*avals, nb, impl, interpret, **params):
        shape, dtype = spec.shape(*(_example(a, r) for a, r in zip(avals, spec.ranks)), **params)
        batched = next((a for a, r in zip(avals, spec.ranks) if a.ndim > r), avals[0])
        batch_spec = tuple(batched.sharding.spec)[:nb] if nb else ()
        sharding = jax.sharding.NamedSharding(batched.sharding.mesh,
                                              jax.sharding.PartitionSpec(*batch_spec, *(None,) * len(shape)))
        out = avals[0].update(shape=(*batched.shape[:nb], *shape), dtype=jnp.dtype(dtype), weak_type=False,
                              sharding=sharding)
        return out, effects(avals, dict(nb=nb, impl=impl, interpret=interpret, **params))

    prim.def_impl(platform.compiled_impl(prim))   # eager calls run compiled, as lax's primitives do
    prim.def_effectful_abstract_eval(abstract)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))
    ad.primitive_jvps[prim] = lambda primals, tangents, **params: _jvp(prim, spec, primals, tangents, params)
    ad.primitive_transposes[prim] = lambda ct, *operands, **params: _transpose(spec, ct, operands, params)
    batching.primitive_batchers[prim] = lambda args, axes, **params: _batch(prim, spec, args, axes, params)
    return prim


def bind(prim, *operands, impl, nb=0, **params):
    """``prim`` applied (static params as keywords; ``nb`` leading batch axes, 0 outside this module's rules). The
    Pallas interpret mode in effect now (``kernels.platform.interpret_mode``) is recorded, so the lowering, which
    may run later, interprets the same way."""
    return prim.bind(*operands, impl=impl, nb=nb, interpret=platform.current_interpret_mode(), **params)


def aval_of(x):
    """The abstract value of an operand inside a transpose rule (defined, or an undefined linear input)."""
    return x.aval if ad.is_undefined_primal(x) else jax.typeof(x)


def _example(aval, rank):
    """Shape and dtype of one example of an operand (without its batch axes)."""
    return jax.ShapeDtypeStruct(aval.shape[len(aval.shape) - rank:], aval.dtype)


def _jvp(prim, spec, primals, tangents, params):
    out = prim.bind(*primals, **params)
    terms = []
    for i, t in enumerate(tangents[:spec.n_linear]):
        if type(t) is not ad.Zero:
            args = list(primals)
            args[i] = t.astype(primals[i].dtype)
            terms.append(prim.bind(*args, **params))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _transpose(spec, ct, operands, params):
    wanted = tuple(ad.is_undefined_primal(x) for x in operands[:spec.n_linear])
    rest = [None] * (len(operands) - spec.n_linear)
    if type(ct) is ad.Zero:  # a symbolic-zero cotangent: symbolic zeros, no kernel launch
        return [ad.Zero(x.aval) if w else None for x, w in zip(operands, wanted)] + rest
    params = dict(params)
    with platform.interpret_mode(params.pop("interpret")):  # the rule's binds record the same mode
        cts = spec.transpose(ct, operands, wanted, **params)
    out = []
    for x, w, c in zip(operands, wanted, cts):
        if not w:
            out.append(None)
            continue
        aval = aval_of(x)
        if c.ndim > aval.ndim:  # an unbatched operand's batched cotangent: sum over the batch axes
            c = c.sum(tuple(range(c.ndim - aval.ndim)), dtype=jnp.float32)
        out.append(c.astype(aval.dtype))
    return out + rest


def _to_front(x, axis, size):
    """``x`` with the vmapped axis first (broadcast to ``size`` when ``x`` is not batched)."""
    return jnp.broadcast_to(x, (size, *x.shape)) if axis is None else jnp.moveaxis(x, axis, 0)


def _batch(prim, spec, args, axes, params):
    nb = params["nb"]
    size = next(a.shape[d] for a, d in zip(args, axes) if d is not None)
    inner = [x.ndim - (d is not None) > r for x, d, r in zip(args, axes, spec.ranks)]  # batched at the nb levels
    batch_shape = next(([n for j, n in enumerate(x.shape) if j != d][:nb]
                        for x, d, was in zip(args, axes, inner) if was), [])
    out = []
    for x, d, was in zip(args, axes, inner):
        if d is None and not was:
            out.append(x)  # unbatched at every level: stays as it is
            continue
        x = _to_front(x, d, size)
        if not was and nb:  # batched by this vmap only: spread over the nb inner batch axes as well
            x = jnp.broadcast_to(x[(slice(None),) + (None,) * nb], (size, *batch_shape, *x.shape[1:]))
        out.append(x)
    return prim.bind(*out, **{**params, "nb": nb + 1}), 0
