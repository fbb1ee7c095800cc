"""Routing at the edges of f32 and the operand types model code passes: near-tied and underflowing logits select
what ``lax.top_k`` of the logits selects, sigmoid weights stay finite for very negative logits, switches refuse
strings, and NumPy routing weights / rows differentiate under ``jit``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from tests.helpers import assert_close, keys, randn


@pytest.mark.parametrize("logits", [
    [[0.82177013, 0.8217702, 3.5395734, -4.0]],   # experts 0 / 1 one f32 step apart: equal softmax scores
    [[0.0, -201.0, -200.0, -300.0]],              # experts 1 / 2 both underflow to a zero softmax score
    [[5.0, 5.0, 1.0, 5.0]],                       # exact ties: the lowest index, as lax.top_k
])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_selection_is_the_top_k_of_the_logits(logits, score_fn):
    logits = jnp.asarray(logits, jnp.float32)
    _, ids = moe_ops.route(logits, 2, score_fn=score_fn)
    np.testing.assert_array_equal(ids, jax.lax.top_k(logits, 2)[1])


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_weights_match_f64(score_fn, renormalize):
    logits = np.array([[-100.0, -101.0, -300.0, -400.0], [2.0, -1.0, 0.5, 3.0], [-95.0, 40.0, -95.5, 0.0]])
    weights, ids = moe_ops.route(jnp.asarray(logits, jnp.float32), 2, score_fn=score_fn, renormalize=renormalize)
    if score_fn == "softmax":
        scores = np.exp(logits - logits.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    want = np.take_along_axis(scores, np.asarray(ids), 1)
    if renormalize:
        want = want / want.sum(1, keepdims=True)
    np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-30)


def test_sigmoid_layer_and_its_gradient_stay_finite_for_very_negative_logits():
    """sigmoid(-100) underflows in f32; renormalising those scores was 0 / 0. Weights are now a softmax of the
    selected logits' log-sigmoids: the same value, no underflow."""
    t, d, f, e = 4, 8, 8, 4
    k = keys(3, 5)
    x, wg, wu, wd = randn(k[0], (t, d)), randn(k[1], (e, d, f)), randn(k[2], (e, d, f)), randn(k[3], (e, f, d))
    logits = randn(k[4], (t, e)) - 100.0

    def loss(lg):
        return jnp.sum(moe_ops.moe_ffn(x, lg, wg, wu, wd, top_k=2, score_fn="sigmoid", implementation="xla"))
    value, grad = jax.value_and_grad(loss)(logits)
    assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()


def test_renormalize_must_be_a_bool():
    with pytest.raises(TypeError, match="renormalize must be True or False"):
        moe_ops.route(jnp.zeros((2, 4)), 2, renormalize="no")


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_numpy_weights_differentiate_under_jit(impl):
    """Closed-over NumPy weights reach the custom VJPs as NumPy arrays; the backward indexes them with traced rows
    (``sort_idx``), which only works on JAX arrays. Gradients w.r.t. the float operand, the rows traced."""
    t, d, f, e, top_k = 6, 8, 8, 4, 2
    k = keys(5, 6)
    x = randn(k[0], (t, d))
    wg, wu, wd = (np.asarray(randn(k[i], s, scale=0.3)) for i, s in ((1, (e, d, f)), (2, (e, d, f)), (3, (e, f, d))))
    weights, ids = (np.asarray(a) for a in moe_ops.route(randn(k[4], (t, e)), top_k))
    h = randn(k[5], (t * top_k, f))
    sizes, sort_idx = moe_ops.sort_by_expert(ids, e)
    kw = dict(implementation=impl)
    jw = jnp.asarray(weights)
    cases = {  # name: (loss of (float operand, traced rows), the same with JAX weights, operand, rows)
        "unpermute": (lambda a, s, w: moe_ops.unpermute(a, s, w, **kw), h, sort_idx),
        "scatter_gmm": (lambda a, s, w: moe_ops.scatter_gmm(a, wd, sizes, s, w, **kw), h, sort_idx),
        "fused_experts_ffn": (lambda a, i, w: moe_ops.fused_experts_ffn(a, w, i, wg, wu, wd, **kw), x, ids),
    }
    for name, (fn, operand, rows) in cases.items():
        def grad(w, fn=fn):
            return jax.jit(jax.grad(lambda a, r: jnp.sum(fn(a, r, w) ** 2)))(operand, rows)
        assert_close(grad(weights), grad(jw), 1e-6, name)


@pytest.mark.parametrize("impl", ["xla", pytest.param("triton", marks=pytest.mark.slow),
                                  pytest.param("pallas", marks=pytest.mark.slow)])
def test_dropped_copies_add_zero_whatever_their_weight(impl):
    """An id outside [0, E) drops its copy; its weight (inf, nan) must not reach the output or the gradients, on the
    SwiGLU and the two-GMM fused paths alike."""
    t, d, f, e = 4, 8, 8, 4
    k = keys(6, 4)
    x = randn(k[0], (t, d))
    wg, wu, wd = (randn(k[i], s, scale=0.3) for i, s in ((1, (e, d, f)), (2, (e, d, f)), (3, (e, f, d))))
    ids = jnp.array([[0, 5], [1, 2], [3, -1], [2, 0]], jnp.int32)
    finite = jnp.abs(randn(keys(7, 1)[0], (t, 2)))
    poisoned = finite.at[0, 1].set(jnp.inf).at[2, 1].set(jnp.nan)
    clean = finite.at[0, 1].set(0.0).at[2, 1].set(0.0)
    for swiglu in (True, False):
        fn = jax.jit(lambda w: moe_ops.fused_experts_ffn(x, w, ids, wg, wu, wd, implementation=impl, swiglu=swiglu))
        assert_close(fn(poisoned), fn(clean), 1e-6, f"forward, swiglu={swiglu}")
        loss = lambda a, w: jnp.sum(moe_ops.fused_experts_ffn(a, w, ids, wg, wu, wd, implementation=impl,
                                                              swiglu=swiglu) ** 2)
        grad = lambda w, g=jax.jit(jax.grad(loss, argnums=(0, 1))): g(x, w)
        for got, want in zip(grad(poisoned), grad(clean)):
            assert_close(got, want, 1e-6, f"gradient, swiglu={swiglu}")
