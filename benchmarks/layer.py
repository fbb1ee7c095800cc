"""The full MoE layer suite (and the CPU main job): ``moe_ops.moe_ffn`` forward and forward+backward, and in the
layer suite the same layer composed in JAX around ``lax.ragged_dot`` / ``tokamax.ragged_dot`` (``peers.layer_peers``).

Forward+backward is ``jax.value_and_grad`` of ``sum(moe_ffn(...) * ct)`` over x, router logits and all three weight
tensors. Parity: against ``moe_ops.reference.moe_ffn_dense`` (forward output and the five gradients). At large
shapes the dense reference runs on a token subset that is still exact: every token routed to one sampled expert plus
64 random tokens (outputs and dx/dlogits of those tokens, and the sampled expert's weight gradients, depend on nothing
else).

Every measured function is compiled once (``jax.jit(f).lower(*args).compile()``); that executable is what is timed,
and its ``memory_analysis()`` gives the row's ``memory`` (``compiled_memory``). A program whose compiled footprint
exceeds the device's memory limit is reported as status ``oom`` without being run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import moe_ops
from benchmarks import env, peers, routing
from benchmarks.records import record
from benchmarks.shapes import LayerShape
from benchmarks.timing import Parity, Progress, measure, random_normal, rel_err, rotations_for

DENSE_FULL_LIMIT = 1 << 26  # T*E*D*F below which the dense reference runs on every token
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
GRAD_NAMES = ("dx", "dlogits", "dw_gate", "dw_up", "dw_down")


def make_inputs(shape: LayerShape, dtype, pattern: routing.Pattern, seed: int):
    """(x, logits, w_gate, w_up, w_down, ct) with router logits that realise ``pattern``'s expert choice."""
    ids = routing.expert_ids(shape.t, shape.e, shape.topk, pattern, seed=seed)
    logits = jnp.asarray(routing.logits_for_ids(ids, shape.e, seed=seed))
    ks = jax.random.split(jax.random.key(seed), 6)
    x = random_normal(ks[1], (shape.t, shape.d), dtype)
    w_gate = random_normal(ks[2], (shape.e, shape.d, shape.f), dtype, shape.d ** -0.5)
    w_up = random_normal(ks[3], (shape.e, shape.d, shape.f), dtype, shape.d ** -0.5)
    w_down = random_normal(ks[4], (shape.e, shape.f, shape.d), dtype, shape.f ** -0.5)
    ct = random_normal(ks[5], (shape.t, shape.d), dtype)
    return (x, logits.astype(dtype), w_gate, w_up, w_down), ct


# The layer suite's moe_ffn variants on backends that fuse by default (op name -> path): the default (fused, gate/up
# and the activation in one op where the backend has that kernel), fused dispatch / combine with gate / up as two
# gather-GMMs and the activation in XLA, and the unfused permute -> gmm -> unpermute path.
VARIANTS = ("moe_ffn", "moe_ffn:fused-no-swiglu", "moe_ffn:unfused")
DENSE = "reference:moe_ffn_dense"  # the einsum ground truth, timed beside the XLA backend in the CPU main job
# gpt-oss's expert form, on the gpt-oss shapes of the layer suite: ``moe_ffn`` with its clamped SwiGLU
# (``moe_ops.GPT_OSS``) and three per-expert biases, by default (fused: the gate / up biases inside the SwiGLU
# kernels) and unfused; an op family of its own in the ratios (``records.op_family``). The biases are the weights'
# first rows, so the five gradients stay those of the layer's inputs and the dense oracle
# (``oracle(..., family="gpt-oss")``) computes the same function.
GPT_OSS_VARIANTS = ("gpt_oss_ffn", "gpt_oss_ffn:unfused")


def gpt_oss_form(layer_fn, **kw):
    """(x, logits, w_gate, w_up, w_down) -> ``layer_fn`` with gpt-oss's activation and the weights' first rows as
    b_gate / b_up [E,F] and b_down [E,D]."""
    def layer(x, logits, w_gate, w_up, w_down):
        return layer_fn(x, logits, w_gate, w_up, w_down, activation=moe_ops.GPT_OSS, b_gate=w_gate[:, 0, :],
                        b_up=w_up[:, 0, :], b_down=w_down[:, 0, :], **kw)
    return layer


def _family(variant: str) -> str:
    return "gpt-oss" if variant in GPT_OSS_VARIANTS else "plain"


def _layer(impl: str, top_k: int, variant: str = "moe_ffn"):
    if variant == DENSE:
        return functools.partial(moe_ops.reference.moe_ffn_dense, top_k=top_k)
    if variant in GPT_OSS_VARIANTS:
        return gpt_oss_form(moe_ops.moe_ffn, top_k=top_k, implementation=impl,
                            fused=False if variant.endswith(":unfused") else None)
    if variant == "moe_ffn:unfused":
        return functools.partial(moe_ops.moe_ffn, top_k=top_k, implementation=impl, fused=False)
    if variant == "moe_ffn:fused-no-swiglu":
        def layer(x, logits, w_gate, w_up, w_down):
            weights, ids = moe_ops.route(logits.reshape(-1, logits.shape[-1]), top_k)
            return moe_ops.fused_experts_ffn(x.reshape(-1, x.shape[-1]), weights, ids, w_gate, w_up, w_down,
                                             implementation=impl, swiglu=False).reshape(x.shape)
        return layer
    return functools.partial(moe_ops.moe_ffn, top_k=top_k, implementation=impl)


def variants_for(impl: str, suite: str, shape: LayerShape | None = None) -> tuple[str, ...]:
    """Variants measured for ``impl``: all of them in the layer suite where ``fused=None`` fuses (on gpt-oss shapes
    also ``GPT_OSS_VARIANTS``), else the default; the CPU main job also times the dense einsum reference on the XLA
    rows (the bar the XLA backend must beat)."""
    if suite == "main" and impl == "xla":
        return VARIANTS[:1] + (DENSE,)
    if suite != "layer" or not moe_ops.fused.use_fused(None, impl):
        return VARIANTS[:1]
    return VARIANTS + (GPT_OSS_VARIANTS if shape is not None and shape.name.startswith("gpt-oss") else ())


@functools.cache
def forward_fn(impl: str, top_k: int, variant: str = "moe_ffn"):
    return jax.jit(_layer(impl, top_k, variant))


def _loss(f, ct):
    return lambda *args: jnp.sum(f(*args).astype(jnp.float32) * ct.astype(jnp.float32))


def _value_and_grad(layer_fn):
    """(args..., ct) -> (loss, (dx, dlogits, dw_gate, dw_up, dw_down)), jitted."""
    def run(*args_ct):
        *args, ct = args_ct
        return jax.value_and_grad(_loss(layer_fn, ct), argnums=tuple(range(5)))(*args)
    return jax.jit(run)


@functools.cache
def fwd_bwd_fn(impl: str, top_k: int, variant: str = "moe_ffn"):
    """One jit per (impl, k, variant) so shapes share it."""
    return _value_and_grad(_layer(impl, top_k, variant))


@functools.cache
def peer_fns(peer, top_k: int):
    """(forward, forward+backward) jits of a layer composition (``peers.LayerPeer``)."""
    return jax.jit(peer.layer(top_k)), _value_and_grad(peer.layer(top_k))


MEMORY_SOURCE = "compiled memory_analysis: peak = argument + output + temp - alias bytes"


def compiled_memory(compiled) -> dict | None:
    """Bytes of one compiled program (``compiled.memory_analysis()``), or None where the backend gives none.

    ``argument_bytes`` (inputs), ``output_bytes``, ``alias_bytes`` (outputs sharing an input buffer: 0 here, nothing
    is donated), ``temp_bytes`` (XLA's temp allocation, into which buffer assignment packs every intermediate by
    liveness: the peak of the intermediates live at once, custom-call outputs and workspaces included) and
    ``peak_bytes = argument + output + temp - alias``: the device memory the call holds at its peak. Host memory of
    host callbacks (the Triton interpreter bridge) is not in it."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis: the row has no memory figure, still timed
        return None
    if stats is None:
        return None
    arg, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    temp, alias = int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes)
    return {"peak_bytes": arg + out + temp - alias, "argument_bytes": arg, "output_bytes": out, "temp_bytes": temp,
            "alias_bytes": alias, "source": MEMORY_SOURCE}


def device_bytes_limit() -> int | None:
    """The device's allocatable bytes (``memory_stats()["bytes_limit"]``; None on CPU)."""
    try:
        return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - no limit known: programs are run and an OOM is caught when it happens
        return None


def _subset(shape: LayerShape, ids: np.ndarray, seed: int):
    """(token indices, expert indices) for the exact dense check (all of them at small shapes)."""
    if shape.t * shape.e * shape.d * shape.f <= DENSE_FULL_LIMIT:
        return np.arange(shape.t), np.arange(shape.e)
    counts = np.bincount(ids.ravel(), minlength=shape.e)
    nonempty = np.flatnonzero(counts)
    expert = int(nonempty[np.argsort(counts[nonempty])[len(nonempty) // 2]])  # median-loaded expert
    rng = np.random.default_rng(seed)
    tokens = np.union1d(np.flatnonzero((ids == expert).any(axis=1)), rng.choice(shape.t, 64, replace=False))
    return tokens, np.array([expert])


@functools.cache
def _dense_fn(top_k: int, family: str = "plain"):
    """(x, logits, w_gate, w_up, w_down, ct) -> (out, (dx, dlogits, dw_gate, dw_up, dw_down)) of the dense twin
    (``family`` "gpt-oss": in ``gpt_oss_form``)."""
    dense = functools.partial(moe_ops.reference.moe_ffn_dense, top_k=top_k)
    if family == "gpt-oss":
        dense = gpt_oss_form(moe_ops.reference.moe_ffn_dense, top_k=top_k)

    def run(*args_ct):
        out, vjp = jax.vjp(dense, *args_ct[:-1])
        return out, vjp(args_ct[-1].astype(out.dtype))
    return jax.jit(run)


def oracle(shape: LayerShape, args, ct, seed: int = 0, family: str = "plain"):
    """Dense-reference outputs on the exact subset: dict of name -> (index fn over our output, expected)."""
    weights, ids = moe_ops.reference.route(args[1].astype(jnp.float32), shape.topk)
    tokens, experts = _subset(shape, np.asarray(ids), seed)
    sub = (args[0][tokens], args[1][tokens]) + tuple(args[2:])
    out, (dx, dl, dwg, dwu, dwd) = _dense_fn(shape.topk, family)(*sub, ct[tokens])
    label = "reference.moe_ffn_dense" + (" (gpt-oss form)" if family == "gpt-oss" else "")
    if len(tokens) != shape.t:
        label += f" on {len(tokens)} tokens incl. all of expert {int(experts[0])}"
    return {
        "label": label,
        "out": (lambda y: y[tokens], out),
        "dx": (lambda g: g[tokens], dx), "dlogits": (lambda g: g[tokens], dl),
        "dw_gate": (lambda g: g[experts], dwg[experts]), "dw_up": (lambda g: g[experts], dwu[experts]),
        "dw_down": (lambda g: g[experts], dwd[experts]),
    }


def _checker(ref: dict, names, tol: float):
    def check(result) -> Parity:
        values = {"out": result} if names == ("out",) else dict(zip(GRAD_NAMES, result[1]))
        errors = {n: rel_err(ref[n][0](values[n]), ref[n][1]) for n in names}
        return Parity(errors, ref["label"], tol)
    return check


def _prepare(shape: LayerShape, dtype, pattern: routing.Pattern, n_sets: int, seed: int):
    """(input sets, dense reference, routing description) of one case, or the exception that prevented them."""
    try:
        sets = [make_inputs(shape, dtype, pattern, seed + i) for i in range(n_sets)]
        ref = oracle(shape, *sets[0], seed=seed)
    except Exception as exc:  # noqa: BLE001 - without inputs and a reference there is no checked measurement
        return exc
    _, ids = moe_ops.reference.route(sets[0][0][1].astype(jnp.float32), shape.topk)
    return sets, ref, routing.describe(np.bincount(np.asarray(ids).ravel(), minlength=shape.e))


_COMPILED: dict = {}


def _compile(fn, args):
    """``fn.lower(*args).compile()``, once per (jitted function, argument shapes and dtypes): cases that differ only
    in their routing pattern share the executable, as ``jax.jit``'s own cache would."""
    key = (fn, tuple((a.shape, a.dtype) for a in args))
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(*args).compile()
    return _COMPILED[key]


def clear_caches() -> None:
    """Forget every jitted and compiled layer function (retrace after monkeypatching a backend)."""
    for fn in (forward_fn, fwd_bwd_fn, peer_fns):
        fn.cache_clear()
    _COMPILED.clear()


def _measure_row(fn, inputs, check, warmup, repeats, common, flops, limit):
    """Compile ``fn`` for the inputs, read its memory, run and check it: one record (an OOM or error included)."""
    pass_ = common.pop("pass_")
    try:
        compiled = _compile(fn, inputs[0])
        memory = compiled_memory(compiled)
        if memory and limit and memory["peak_bytes"] > limit:
            return record(pass_=pass_, status="oom", memory=memory, **common,
                          reason=f"compiled program needs {memory['peak_bytes'] / 2**30:.2f} GiB "
                                 f"> device limit {limit / 2**30:.2f} GiB (not run)")
        timing, parity = measure(compiled, inputs, warmup=warmup, repeats=repeats, check=check)
    except Exception as exc:  # noqa: BLE001 - reported as the row's status, never swallowed
        return record(pass_=pass_, status="oom" if env.is_oom(exc) else "error", reason=env.reason(exc), **common)
    return record(pass_=pass_, timing=timing, parity=parity, flops=flops, memory=memory, **common)


def run_case(contender, shape: LayerShape, dtype, pattern: routing.Pattern, *, warmup: int, repeats: int,
             seed: int = 0, suite: str = "layer", prepared: dict | None = None) -> list[dict]:
    """Forward and forward+backward records of one (contender, shape, pattern): ``contender`` is a moe_ops
    implementation (``env.Availability``: every variant of ``variants_for``) or a layer composition
    (``peers.LayerPeer``). ``prepared`` (a dict) keeps the last case's inputs and reference for the next contender."""
    dtype_name = jnp.dtype(dtype).name
    is_peer = isinstance(contender, peers.LayerPeer)
    impl = contender.name if is_peer else contender.implementation
    emulated = None if is_peer else contender.emulated
    common = dict(suite=suite, op="moe_ffn", implementation=impl, requested=contender.requested,
                  kind="peer" if is_peer else "moe_ops", shape=shape.as_dict(), dtype=dtype_name,
                  pattern=pattern.as_dict(), emulated=emulated,
                  extra={"ceiling_basis": "matmul", "note": contender.note if is_peer else ""})
    if not contender.available:
        return [record(pass_=p, status="unavailable", reason=contender.reason, **common) for p in ("fwd", "fwd+bwd")]
    itemsize = jnp.dtype(dtype).itemsize
    bytes_per_set = 2 * shape.t * shape.d * itemsize + 3 * shape.e * shape.d * shape.f * itemsize
    n_sets = 1 if emulated else rotations_for(bytes_per_set)
    prepared = {} if prepared is None else prepared
    key = (shape, dtype_name, pattern.label, n_sets, seed)
    if prepared.get("key") != key:
        prepared.clear()  # drop the previous case's device buffers before making this one's
        prepared.update(key=key, value=_prepare(shape, dtype, pattern, n_sets, seed))
    if isinstance(prepared["value"], Exception):
        exc = prepared["value"]
        return [record(pass_=p, status="oom" if env.is_oom(exc) else "error",
                       reason=f"inputs / dense reference failed: {env.reason(exc)}", **common)
                for p in ("fwd", "fwd+bwd")]
    sets, ref, common["routing"] = prepared["value"]
    if is_peer:
        fwd, fb = peer_fns(contender, shape.topk)
        fns = [("moe_ffn", fwd, fb)]
    else:
        common["config"] = env.kernel_config(impl, "gmm", m=shape.t * shape.topk, k=shape.d, n=shape.f,
                                             e=shape.e, dtype=dtype_name)
        fns = [(v, forward_fn(impl, shape.topk, v), fwd_bwd_fn(impl, shape.topk, v))
               for v in variants_for(impl, suite, shape)]
    refs = prepared.setdefault("refs", {"plain": ref})
    limit = device_bytes_limit()
    out = []
    for pass_, names, mult in (("fwd", ("out",), 1), ("fwd+bwd", GRAD_NAMES, 3)):
        inputs = [a for a, _ in sets] if pass_ == "fwd" else [a + (c,) for a, c in sets]
        for variant, fwd, fb in fns:
            row = {**common, "op": variant, "pass_": pass_}
            family_ref = _family_oracle(refs, _family(variant), shape, sets, seed)
            if isinstance(family_ref, Exception):
                out.append(record(status="error", reason=f"dense reference failed: {env.reason(family_ref)}", **row))
                continue
            out.append(_measure_row(fwd if pass_ == "fwd" else fb, inputs,
                                    _checker(family_ref, names, TOL[dtype_name]), warmup, repeats, row,
                                    mult * shape.flops(), limit))
    return out


def _family_oracle(refs: dict, family: str, shape: LayerShape, sets, seed: int):
    """The dense reference of a variant family, computed once per case (or the exception that prevented it)."""
    if family not in refs:
        try:
            refs[family] = oracle(shape, *sets[0], seed=seed, family=family)
        except Exception as exc:  # noqa: BLE001 - reported on the family's rows
            refs[family] = exc
    return refs[family]


def run_suite(cases, dtype, *, progress=True, suite="layer", records: list | None = None) -> list[dict]:
    """cases: (contender, LayerShape, Pattern, warmup, repeats) tuples, run in order under one progress bar;
    consecutive cases of the same shape and pattern share their inputs and dense reference. Each case's records
    are appended to ``records`` (returned; a new list by default) as it finishes."""
    bar = Progress(len(cases), suite, enabled=progress)
    records, prepared = ([] if records is None else records), {}
    for contender, shape, pattern, warmup, repeats in cases:
        records += run_case(contender, shape, dtype, pattern, warmup=warmup, repeats=repeats, suite=suite,
                            prepared=prepared)
        name = contender.name if isinstance(contender, peers.LayerPeer) else contender.implementation
        bar.step(f"{name} {shape.name} {pattern.label}")
    bar.close()
    return records
