"""End to end: moe_ops.moe_ffn (route -> permute -> 3 GMMs -> unpermute) equals the dense einsum MoE layer,
forward and gradients of x, router logits and all three weights, for every implementation."""

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
    x, logits, ws = layer_inputs(SHAPES[impl], routing, seed=hash(routing) % 100)
    top_k = 2
    ours = jax.jit(lambda *a, top_k: moe_ops.moe_ffn(*a, top_k=top_k, implementation=impl), static_argnames="top_k")
    assert_close(ours(x, logits, *ws, top_k=top_k), R.moe_ffn_dense(x, logits, *ws, top_k=top_k), 1e-5, "forward")
    cot = randn(keys(9, 1)[0], x.shape)
    grads = jax.jit(jax.grad(loss(ours, top_k, cot), argnums=range(5)))(x, logits, *ws)
    expected = jax.grad(loss(R.moe_ffn_dense, top_k, cot), argnums=range(5))(x, logits, *ws)
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
