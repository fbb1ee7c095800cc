"""Kernel choice per *lowering* platform, not per ``jax.default_backend()`` at trace time.

``platform_call(rules, *args)`` binds one primitive whose lowering traces the rule of the platform being lowered
for (``mlir.lower_fun`` narrows the lowering context to that platform), so:

* ``jax.export(f, platforms=["tpu"])`` from a CPU host gets the Mosaic kernels, ``["cuda"]`` / ``["rocm"]`` get
  ``triton_kernel_call``, and ``["cpu", "cuda", "tpu"]`` gives one module with a platform ``case`` over all three
  (each branch lowered for its platform only);
* nothing is traced for platforms that are not lowered (the rules run at lowering time);
* ``lowering_platform()`` tells a rule which platform it is being lowered for (``kernels.triton.tuning`` picks the
  sm90 / gfx950 tables from it when exporting from a host without that GPU).

Invariants:

1. Every rule maps the same positional array arguments to outputs of the same shapes and dtypes (``default``, else
   the first rule, gives the abstract value; the output structure is checked when a rule is lowered).
2. Rules are ``Rule(fn, kwargs)`` values: hashable and equal for equal ``(fn, kwargs)``, so eager calls hit JAX's
   compile cache like any primitive.
3. The primitive has no differentiation rules: callers put it under a ``custom_vjp`` (every ``moe_ops`` op does).
   It batches by ``vmap``-ing every rule (each rule must batch).
4. Outputs carry no manual-axis variance (like ``triton_call`` / ``pure_callback``); ``moe_ops.vma.like`` re-types.
5. The effects of the abstract-value rule (e.g. the ordered callbacks of a strict Pallas interpreter) are the
   primitive's effects, so their tokens thread through its lowering.
6. Eager calls run compiled (``compiled_impl``), inside ``jax.disable_jit()`` too: a kernel call has no
   op-by-op form.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

__all__ = ["Rule", "platform_call", "dispatch", "lowering_platform", "tpu_or_interpret", "interpret_mode",
           "on_platforms", "varying_axes", "compiled_impl", "PLATFORMS", "FORCED_GMM_VARIANT"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_state = threading.local()
# The Triton GMM variant forced by ``kernels.triton.gmm_tma.use_variant`` (None: none forced), in jit's cache keys.
# Made here, when the package is imported, not when the Triton backend is first imported (lazily, maybe while other
# threads run JAX): ``jax.make_user_context`` must not run concurrently with other JAX calls.
FORCED_GMM_VARIANT = jax.make_user_context(None)


def varying_axes(x) -> frozenset:
    """Manual mesh axes the array ``x`` varies over inside ``shard_map`` with ``check_vma`` (invariant 4; empty
    outside it). jax 0.10+: ``aval.manual_axis_type.varying``; older: ``aval.vma``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


@dataclasses.dataclass(frozen=True)
class Rule:
    """``fn(*args, **dict(kwargs))``; ``kwargs`` is a tuple of (name, hashable value) pairs."""

    fn: Callable
    kwargs: tuple = ()

    @classmethod
    def of(cls, fn, **kwargs) -> "Rule":
        return cls(fn, tuple(sorted(kwargs.items())))

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **dict(self.kwargs), **kwargs)


def lowering_platform() -> str | None:
    """The platform a ``platform_call`` rule is being lowered for, or None outside such a lowering."""
    return getattr(_state, "platform", None)


@contextlib.contextmanager
def _lowering_for(platform):
    previous = lowering_platform()
    _state.platform = platform
    try:
        yield
    finally:
        _state.platform = previous


platform_call_p = jex_core.Primitive("moe_ops_platform_call")
platform_call_p.multiple_results = True


def _flat(rule, out_tree):
    def run(*args):
        leaves, tree = jax.tree.flatten(rule(*args))
        if tree != out_tree:
            raise TypeError(f"platform rules disagree on the output structure: {tree} vs {out_tree}")
        return leaves
    return run


def platform_call(rules: Mapping[str, Rule], *args, default: Rule | None = None):
    """Bind ``rules[platform](*args)`` for whichever platform the computation is lowered for (``default`` for any
    platform not named; without one, lowering for another platform raises). Returns the rule's output pytree."""
    if not rules and default is None:
        raise ValueError("platform_call needs at least one rule")
    unknown = set(rules) - set(PLATFORMS)
    if unknown:
        raise ValueError(f"unknown platforms {sorted(unknown)}; expected some of {PLATFORMS}")
    first = default if default is not None else next(iter(rules.values()))
    traced, out_shapes = jax.make_jaxpr(first, return_shape=True)(*args)
    leaves, out_tree = jax.tree.flatten(out_shapes)
    avals = tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in leaves)
    outs = platform_call_p.bind(*args, rules=tuple(sorted(rules.items())), default=default, out_tree=out_tree,
                                out_avals=avals, rule_effects=frozenset(traced.effects))
    return jax.tree.unflatten(out_tree, outs)


def _abstract_eval(*_args, out_avals, rule_effects, **_params):
    return list(out_avals), set(rule_effects)


def _lower_for(platform):
    def lower(ctx, *args, rules, default, out_tree, out_avals, rule_effects):
        rule = dict(rules).get(platform, default)
        if rule is None:
            raise NotImplementedError(f"no kernel for platform {platform!r}: this op has rules for "
                                      f"{[p for p, _ in rules]} only")
        with _lowering_for(platform):
            return mlir.lower_fun(_flat(rule, out_tree), multiple_results=True)(ctx, *args)
    return lower


def _batch(args, dims, *, rules, default, out_tree, out_avals, rule_effects):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if size == 0:  # a vmap over zero examples: no kernel (Pallas's and the Triton folds' rules assume one at least)
        return [jnp.zeros((0, *a.shape), a.dtype) for a in out_avals], [0] * len(out_avals)

    def batched(rule):
        return None if rule is None else Rule.of(jax.vmap(rule, in_axes=tuple(dims)))
    outs = platform_call({p: batched(r) for p, r in rules}, *args, default=batched(default))
    return jax.tree.leaves(outs), [0] * len(out_avals)


def compiled_impl(prim):
    """An eager (``def_impl``) rule for ``prim``: a jitted bind, one compile per distinct parameter set (params
    must be hashable). It runs compiled under ``jax.disable_jit()`` too, where the jitted bind would otherwise run
    this rule again, without end."""
    @functools.lru_cache(maxsize=512)
    def jitted(params):
        return jax.jit(lambda *args: prim.bind(*args, **dict(params)))

    def impl(*args, **params):
        with jax.disable_jit(False):
            return jitted(tuple(sorted(params.items())))(*args)
    return impl


def _no_derivative(primals, tangents, **params):
    """Kernel calls have no derivative rules: the ops built on them give custom VJPs made of other kernel calls."""
    raise NotImplementedError(
        "a kernel call (moe_ops_platform_call) was differentiated: it sits inside a backward pass that has no "
        "derivative of its own. In moe_ops these are the fused ops (gather_gmm, scatter_gmm, swiglu_gmm, swiglu_ffn, "
        "fused_experts_ffn, moe_ffn with fused=None / True), which are first order only: take higher derivatives "
        "with moe_ffn(..., fused=False), or permute -> gmm -> unpermute.")


platform_call_p.def_effectful_abstract_eval(_abstract_eval)
ad.primitive_jvps[platform_call_p] = _no_derivative
platform_call_p.def_impl(compiled_impl(platform_call_p))
batching.primitive_batchers[platform_call_p] = _batch
for _platform in PLATFORMS:
    mlir.register_lowering(platform_call_p, _lower_for(_platform), platform=_platform)


# ---------------------------------------------------------------------------------------------------------------
# Entry points with mixed arguments: arrays stay dynamic, everything else is folded into the rules.


def _split_call(*dynamic, rule, dynamic_keys, static_args, static_kwargs):
    """Rebuild the call ``rule(*args, **kwargs)`` from the dynamic (array) arguments and the static ones."""
    args, kwargs = dict(static_args), dict(static_kwargs)
    for key, value in zip(dynamic_keys, dynamic):
        (args if isinstance(key, int) else kwargs)[key] = value
    return rule(*(args[i] for i in range(len(args))), **kwargs)


def dispatch(rules: Mapping[str, Rule], default: Rule | None, args, kwargs):
    """``platform_call`` of ``rule(*args, **kwargs)``: ``jax.Array`` arguments (tracers included) and NumPy arrays
    (converted with ``jnp.asarray``) are operands, every other argument (ints, dtypes, configs, None) must be
    hashable and is folded into the rules."""
    items = [(key, jnp.asarray(v) if isinstance(v, np.ndarray) else v)
             for key, v in list(enumerate(args)) + sorted(kwargs.items())]
    dynamic = [(key, v) for key, v in items if isinstance(v, jax.Array)]
    static = [(key, v) for key, v in items if not isinstance(v, jax.Array)]
    common = dict(dynamic_keys=tuple(k for k, _ in dynamic),
                  static_args=tuple((k, v) for k, v in static if isinstance(k, int)),
                  static_kwargs=tuple((k, v) for k, v in static if not isinstance(k, int)))

    def split(rule):
        return None if rule is None else Rule.of(_split_call, rule=rule, **common)
    return platform_call({p: split(r) for p, r in rules.items()}, *(v for _, v in dynamic), default=split(default))


def current_interpret_mode():
    """The interpret mode Pallas calls traced now would use off TPU (``True`` unless inside ``interpret_mode``)."""
    return getattr(_state, "interpret", True)


@contextlib.contextmanager
def interpret_mode(params):
    """Pallas calls traced inside the block use ``params`` (``True`` or a hashable ``pltpu.InterpretParams``, e.g. a
    strict one in tests) as their interpret mode off TPU."""
    previous = getattr(_state, "interpret", True)
    _state.interpret = params
    try:
        yield
    finally:
        _state.interpret = previous


def tpu_or_interpret(fn):
    """Decorate a Pallas TPU entry point that takes ``interpret``: ``interpret=None`` becomes Mosaic when lowered
    for TPU and interpret mode (``interpret_mode``'s, default ``True``) when lowered for any other platform, so
    ``jax.export(..., platforms=["tpu"])`` from a CPU host emits the Mosaic kernel. An explicit ``interpret`` is
    passed through unchanged."""
    @functools.wraps(fn)
    def wrapper(*args, interpret=None, **kwargs):
        if interpret is not None:
            return fn(*args, interpret=interpret, **kwargs)
        default = Rule.of(fn, interpret=getattr(_state, "interpret", True))
        return dispatch({"tpu": Rule.of(fn, interpret=False)}, default, args, kwargs)
    return wrapper


def on_platforms(*platforms):
    """Decorate a kernel entry point that exists for ``platforms`` only (Triton: cpu through the interpreter bridge,
    cuda, rocm). It is traced when lowered, inside ``lowering_platform()``, so its tuning follows the target;
    lowering it for any other platform raises a clear error."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return dispatch({p: Rule(fn) for p in platforms}, None, args, kwargs)
        return wrapper
    return decorate
