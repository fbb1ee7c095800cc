"""The caller's JAX settings: every op runs under them and gives what it gives under the defaults.

* ``jax.numpy_dtype_promotion("strict")`` (refuses implicit promotion in jnp; lax's ops ignore it): mixed input
  dtypes and the package's own wider accumulators, forward and the gradients of every float input, bit-equal to the
  standard rules.
* ``jax.numpy_rank_promotion("raise")`` (refuses implicit rank broadcasting in jnp; jax's own test harness sets it):
  the routing options and MaxText's routing, bit-equal to the default.
* ``jax.disable_jit()`` (op-by-op debugging): every public op on every backend, forward and gradient, equal to its
  jitted run.

Each case names the fault it caught."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops.integrations import maxtext
from tests.helpers import keys, randn
from tests.op_cases import public_op_cases, value_and_grads

T, K, E, D, F = 6, 2, 4, 8, 6
SIZES = jnp.array([3, 3, 0, 5], jnp.int32)     # sums below M = 12


def _r(i, shape, dtype=jnp.bfloat16):
    return randn(keys(60 + i, 1)[0], shape).astype(dtype)


def _strict_cases(impl):
    ids = jax.random.randint(keys(59, 1)[0], (T, K), 0, E)
    kw = dict(implementation=impl)
    ws = (_r(1, (E, D, F)), _r(2, (E, D, F)), _r(3, (E, F, D)))
    return {
        # compute_dtype used jnp.promote_types, which honours the strict mode: every backend refused
        "gmm_bf16_x_f32": (lambda a, b: moe_ops.gmm(a, b, SIZES, **kw),
                           (_r(4, (12, D)), _r(5, (E, D, F), jnp.float32))),
        "ragged_dot_f16_x_bf16": (lambda a, b: moe_ops.ragged_dot(a, b, SIZES, **kw),
                                  (_r(4, (12, D), jnp.float16), _r(5, (E, D, F)))),
        "tgmm_f32_x_f16": (lambda a, b: moe_ops.tgmm(a, b, SIZES, **kw), (_r(4, (12, D), jnp.float32),
                                                                          _r(6, (12, F), jnp.float16))),
        # the XLA gather_rows multiplied f32 rows by bf16 routing weights (scatter_gmm's backward)
        "fused_experts_ffn_bf16_weights": (
            lambda x, w, *p: moe_ops.fused_experts_ffn(x, w, ids, *p, **kw),
            (_r(7, (T, D)), jax.nn.softmax(_r(8, (T, K), jnp.float32)).astype(jnp.bfloat16), *ws)),
        "moe_ffn_with_biases": (
            lambda x, lg, *p: moe_ops.moe_ffn(x, lg, *p[:3], top_k=K, b_gate=p[3], b_up=p[4], b_down=p[5], **kw),
            (_r(7, (T, D)), _r(8, (T, E), jnp.float32), *ws, _r(9, (E, F), jnp.float32), _r(10, (E, F), jnp.float32),
             _r(11, (E, D), jnp.float32))),
        # bf16 inputs times the f32 sigmoid of the routing weight (MaxText's f32 product)
        "maxtext_llama4_permute": (
            lambda x, lg: maxtext.permute(x, lg, num_experts_per_tok=1, decoder_block="llama4", **kw)[0],
            (_r(12, (1, T, D)), _r(13, (1, T, E), jnp.float32))),
    }


def _rank_cases(impl):
    kw = dict(implementation=impl)
    ws = (_r(1, (E, D, F)), _r(2, (E, D, F)), _r(3, (E, F, D)))
    x3, logits3 = _r(7, (2, 3, D)), _r(8, (2, 3, E), jnp.float32)
    return {
        # reference.route added the [E] selection bias to [T, E] scores and compared [T, g, 1] group ids with a [g]
        # range: rank promotion
        "moe_ffn_biased_group_limited_routing": (
            lambda x, lg, b, *p: moe_ops.moe_ffn(x, lg, *p, top_k=K, router_bias=b, num_groups=2, top_groups=1,
                                                 score_fn="sigmoid", **kw),
            (_r(7, (T, D)), _r(8, (T, E), jnp.float32), _r(9, (E,), jnp.float32), *ws)),
        # MaxText's load-balancing loss compared [B, S, k, 1] ids with an [E] range
        "maxtext_deepseek_permute_with_loss": (
            lambda x, lg: maxtext.permute(x, lg, lg, num_experts_per_tok=K, decoder_block="deepseek",
                                          routed_score_func="sigmoid", routed_bias=True, n_routing_groups=2,
                                          topk_routing_group=1, load_balance_loss_weight=0.01, **kw)[:6],
            (x3, logits3)),
    }


def _assert_same(got, want, what, tol=0.0):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype, what
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol,
                                   err_msg=what)


def _same_under(cases, setting, value, default):
    """Every case run under ``setting(value)`` equals its run under ``setting(default)``, bit for bit."""
    for name, (op, args) in cases.items():
        run = jax.jit(functools.partial(value_and_grads, op))
        with setting(default):
            want = run(args)
        with setting(value):
            got = run(args)
        _assert_same(got, want, name)


@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
def test_ops_run_in_strict_mode_as_in_standard(impl):
    _same_under(_strict_cases(impl), jax.numpy_dtype_promotion, "strict", "standard")


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_ops_run_with_rank_promotion_raise(impl):
    _same_under(_rank_cases(impl), jax.numpy_rank_promotion, "raise", "allow")


@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
def test_ops_run_with_jit_disabled(impl):
    """Inside ``jax.disable_jit()`` a kernel call runs compiled all the same. It recursed without end before (the
    primitives' eager rule is a jitted bind, which disabled jit turned back into the rule): RecursionError from
    nearly every op on every backend."""
    for name, (op, args) in public_op_cases(impl).items():
        want = jax.jit(functools.partial(value_and_grads, op))(args)
        with jax.disable_jit():
            got = value_and_grads(op, args)
        _assert_same(got, want, f"{impl} {name}", tol=1e-5)
