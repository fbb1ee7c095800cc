"""End to end: moe_ops.moe_ffn (route -> permute -> 3 GMMs -> unpermute) equals the dense einsum MoE layer,
forward and gradients of x, router logits and all three weights, for every implementation."""

import math

import jax
import jax.numpy as jnp
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import SHAPES, assert_close, keys, layer_inputs, loss, randn

IMPLS = ["xla", "triton", "pallas"]


@pytest.mark.parametrize("routing", ["balanced", pytest.param("hot", marks=pytest.mark.slow),
                                     pytest.param("one_expert", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_ffn_matches_dense_forward_and_grads(impl, routing):
    _check_against_dense(dict(implementation=impl), SHAPES[impl], routing, seed=hash(routing) % 100, cot_seed=9)


def _check_against_dense(options, shape, routing, seed, cot_seed, top_k=2):
    """``moe_ffn(**options)`` under jit: forward and the five gradients equal the dense reference's (f32)."""
    x, logits, ws = layer_inputs(shape, routing, seed=seed)
    ours = jax.jit(lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, **options), static_argnames="top_k")
    assert_close(ours(x, logits, *ws, top_k=top_k), R.moe_ffn_dense(x, logits, *ws, top_k=top_k), 1e-5, "forward")
    cot = randn(keys(cot_seed, 1)[0], x.shape)
    grads = jax.jit(jax.grad(loss(ours, top_k, cot), argnums=range(5)))(x, logits, *ws)
    expected = jax.jit(jax.grad(loss(R.moe_ffn_dense, top_k, cot), argnums=range(5)))(x, logits, *ws)
    for name, g, e in zip(["x", "router_logits", "w_gate", "w_up", "w_down"], grads, expected):
        assert_close(g, e, 1e-5, f"d{name}")


def test_moe_ffn_bf16_close_to_dense():
    x, logits, ws = layer_inputs(SHAPES["xla"], "balanced", dtype=jnp.bfloat16)
    got = moe_ops.moe_ffn(x, logits, *ws, top_k=2)
    assert got.dtype == jnp.bfloat16 and got.shape == x.shape
    assert_close(got, R.moe_ffn_dense(x, logits, *ws, top_k=2), 2e-2, "bf16 forward")


def test_backend_choice_follows_the_platform():
    expected = {"cpu": "xla", "gpu": "triton", "tpu": "pallas"}[jax.default_backend()]
    assert moe_ops.resolve_implementation(None) == expected
    assert moe_ops.resolve_implementation("pallas") == "pallas"


@pytest.mark.parametrize("impl,fused", [("xla", False), ("xla", True), ("triton", False), ("triton", True)])
def test_recompute_matches_dense(impl, fused):
    """``recompute=True`` (gate / up recomputed in the backward): the same forward and five gradients as the dense
    reference, on the unfused path (``jax.checkpoint`` of the projections), XLA's fused twins (the same around the
    gather-GMMs) and Triton's fused SwiGLU op (its inputs-only residuals)."""
    _check_against_dense(dict(implementation=impl, fused=fused, recompute=True), SHAPES[impl], "hot", seed=17,
                         cot_seed=10)


@pytest.mark.parametrize("impl,fused", [("xla", False), ("xla", True), ("triton", True)])
def test_recompute_keeps_less_for_the_backward(impl, fused):
    """What the forward leaves for the backward (the leaves of ``jax.vjp``'s closure, shapes only): without gate /
    up [T*k, F] under ``recompute=True``. (A single layer's compiled ``jax.grad`` peaks inside its backward, where
    the recomputed gate / up live anyway: the saving shows across layers, as these residuals.) Measured: unfused and
    XLA's fused twins keep 5 [T*k, F] f32 buffers fewer (gate, up and the activation's), Triton's SwiGLU op 2."""
    t, d, f, e, top_k = 512, 64, 256, 8, 2
    sds = jax.ShapeDtypeStruct
    args = (sds((t, d), jnp.float32), sds((t, e), jnp.float32), sds((e, d, f), jnp.float32),
            sds((e, d, f), jnp.float32), sds((e, f, d), jnp.float32))
    kept = {}
    for recompute in (False, True):
        def layer(*a, recompute=recompute):
            return moe_ops.moe_ffn(*a, top_k=top_k, implementation=impl, fused=fused, recompute=recompute)
        closure = jax.eval_shape(lambda *a: jax.vjp(layer, *a)[1], *args)
        kept[recompute] = sum(math.prod(r.shape) * r.dtype.itemsize for r in jax.tree.leaves(closure))
    assert kept[False] - kept[True] >= 2 * t * top_k * f * 4, kept


def test_recompute_must_be_a_bool():
    x, logits, ws = layer_inputs(SHAPES["xla"], "balanced")
    with pytest.raises(TypeError, match="recompute"):
        moe_ops.moe_ffn(x, logits, *ws, top_k=2, recompute="no")


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_unfused_layer_second_order_matches_dense(impl):
    """grad of grad of ``moe_ffn(fused=False)`` (README: higher derivatives of the unfused layer on every backend)."""
    x, logits, ws = layer_inputs(SHAPES["triton"], "balanced", seed=4)

    def second(fn):
        inner = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a, top_k=2))), argnums=range(5))
        return jax.jit(jax.grad(lambda *a: sum(jnp.sum(g ** 2) for g in inner(*a)), argnums=(0, 2, 4)))(
            x, logits, *ws)
    got = second(lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, fused=False, implementation=impl))
    for name, g, e in zip(["x", "w_gate", "w_down"], got, second(R.moe_ffn_dense)):
        assert_close(g, e, 1e-4, f"second order d{name}")
