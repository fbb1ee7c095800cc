"""The ops the way model code (MaxText / Flax training loops) drives them: ``lax.scan`` over stacked layers with
``jax.checkpoint`` policies, train steps (``value_and_grad(has_aux)``, subsets of params, donated SGD updates,
static arguments), mixed precision, ``vmap`` / ``lax.map`` of a step, ``eval_shape`` / ``make_jaxpr`` / AOT
compiles, and x64 (data parallelism: ``test_model_data_parallel``). Every value and gradient (dtype too) is compared
with the pure-jnp reference on fresh random data."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from moe_ops.integrations import maxtext
from tests.helpers import assert_close, keys, randn
from tests.op_cases import public_op_cases, value_and_grads
from tests.model_steps import (CP, D, E, K, L, T, TOL16, TOL32, block, close_tree, dense, moe, params, stack_loss,
                               tokens)

POLICIES = {
    "nothing_saveable": (CP.nothing_saveable, False),
    "dots_saveable": (CP.dots_saveable, False),
    "dots_with_no_batch_dims_saveable": (CP.dots_with_no_batch_dims_saveable, False),
    "save_only_these_names": (CP.save_only_these_names("block_in"), True),
}


def offload_policy():
    if not hasattr(CP, "offload_dot_with_no_batch_dims"):
        pytest.skip("jax.checkpoint_policies.offload_dot_with_no_batch_dims does not exist in this jax")
    return CP.offload_dot_with_no_batch_dims("device", "pinned_host"), False


# ------------------------------------------------------------------------------------------------ scan + remat


# On XLA, fused=None is the unfused path (fused=False); True takes the XLA twins of the fused ops.
@pytest.mark.parametrize("policy,fused,recompute", [
    (None, False, False), ("nothing_saveable", True, True), ("dots_saveable", False, True),
    ("dots_with_no_batch_dims_saveable", True, False), ("save_only_these_names", False, False),
    ("offload_dot_with_no_batch_dims", True, True)])
def test_scan_over_layers_with_remat_xla(policy, fused, recompute):
    pol, names = (None, False) if policy is None else offload_policy() if policy.startswith("offload") \
        else POLICIES[policy]
    p, x = params(1, layers=L), tokens(2)
    loss = stack_loss(moe("xla", fused, recompute), pol, names)
    try:
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, x)
    except Exception as e:  # noqa: BLE001  (only the host-offload policy may be unsupported on this platform)
        if policy and policy.startswith("offload") and "host" in str(e).lower():
            pytest.skip(f"host offload unsupported on {jax.default_backend()}: {str(e)[:200]}")
        raise
    want_value, want = jax.value_and_grad(stack_loss(dense), argnums=(0, 1))(p, x)
    assert_close(value, want_value, TOL32, "loss")
    close_tree(grads[0], want[0], TOL32, "params")
    assert_close(grads[1], want[1], TOL32, "x")


@pytest.mark.slow
@pytest.mark.parametrize("impl,fused,recompute,policy", [("triton", None, False, "dots_saveable"),
                                                         ("triton", False, True, "nothing_saveable"),
                                                         ("pallas", None, True, "save_only_these_names")])
def test_scan_over_layers_with_remat_kernels(impl, fused, recompute, policy):
    pol, names = POLICIES[policy]
    p, x = params(3, layers=L), tokens(4)
    grads = jax.jit(jax.grad(stack_loss(moe(impl, fused, recompute), pol, names), argnums=(0, 1)))(p, x)
    want = jax.grad(stack_loss(dense), argnums=(0, 1))(p, x)
    close_tree(grads[0], want[0], TOL32, impl)
    assert_close(grads[1], want[1], TOL32, f"{impl} x")


def test_gmm_ragged_dot_and_maxtext_adapter_in_a_remat_scan():
    """The lower-level ops MaxText calls (megablox-signature gmm, permute / unpermute, ragged_dot) in a scan of
    checkpointed blocks, grads of the stacked weights and the input."""
    p, x = params(5, layers=L), tokens(6, (2, T // 2, D))

    def body_for(gmm, permute, unpermute, ragged_dot):
        def body(h, p):
            def f(h, p):
                xs, sort_idx, w, sizes, *_ = permute(h, h @ p["wr"], num_experts_per_tok=K)
                a = jax.nn.silu(gmm(xs, p["wg"], sizes, preferred_element_type=h.dtype))
                y = ragged_dot(a, p["wd"], sizes)
                return h + unpermute(y, sort_idx, w, h.shape[0], h.shape[1])
            return jax.checkpoint(f, policy=CP.dots_with_no_batch_dims_saveable)(h, p), None
        return lambda p, x: jnp.sum(jax.lax.scan(body, x, p)[0] ** 2)

    ours = body_for(functools.partial(maxtext.gmm, implementation="xla"),
                    functools.partial(maxtext.permute, implementation="xla"),
                    functools.partial(maxtext.unpermute, implementation="xla"),
                    functools.partial(moe_ops.ragged_dot, implementation="xla"))

    def ref_permute(h, logits, num_experts_per_tok):
        w, ids = R.route(logits.reshape(-1, E), num_experts_per_tok)
        xs, sizes, sort_idx = R.permute(h.reshape(-1, D), ids, E)
        return xs, sort_idx, w, sizes

    ref = body_for(lambda a, b, s, preferred_element_type: R.gmm(a, b, s, preferred_element_type=preferred_element_type),
                   ref_permute, lambda y, si, w, b, s: R.unpermute(y, si, w).reshape(b, s, D), jax.lax.ragged_dot)
    grads = jax.jit(jax.grad(ours, argnums=(0, 1)))(p, x)
    want = jax.grad(ref, argnums=(0, 1))(p, x)
    close_tree({k: grads[0][k] for k in ("wr", "wg", "wd")}, {k: want[0][k] for k in ("wr", "wg", "wd")}, TOL32)
    assert_close(grads[1], want[1], TOL32, "x")


# ------------------------------------------------------------------------------------------------ train steps


@pytest.mark.parametrize("fused", [True, False])
def test_train_step_aux_subsets_donation_static_args(fused):
    p, x = params(7), tokens(8)

    def loss_aux(p, x, top_k):
        y = moe_ops.moe_ffn(x, x @ p["wr"], p["wg"], p["wu"], p["wd"], top_k=top_k, implementation="xla",
                            fused=fused)
        return jnp.sum(y ** 2), {"y": y, "norm": jnp.linalg.norm(y)}

    def ref_loss(p, x):
        return jnp.sum(dense(x, x @ p["wr"], p["wg"], p["wu"], p["wd"]) ** 2)

    want = jax.jit(jax.grad(ref_loss))(p, x)
    (value, aux), grads = jax.jit(jax.value_and_grad(loss_aux, has_aux=True), static_argnames="top_k")(
        p, x, top_k=np.int64(K))
    assert_close(value, ref_loss(p, x), TOL32, "loss")
    assert_close(aux["y"], dense(x, x @ p["wr"], p["wg"], p["wu"], p["wd"]), TOL32, "aux y")
    close_tree(grads, want, TOL32, "value_and_grad")
    # only the router, only w_down, an argnums tuple
    only_router = jax.jit(jax.grad(lambda wr: loss_aux(dict(p, wr=wr), x, K)[0]))(p["wr"])
    assert_close(only_router, want["wr"], TOL32, "router only")
    wd_x = jax.jit(jax.grad(lambda wd, x: loss_aux(dict(p, wd=wd), x, K)[0], argnums=(0, 1)))(p["wd"], x)
    assert_close(wd_x[0], want["wd"], TOL32, "w_down only")
    assert_close(wd_x[1], jax.jit(jax.grad(ref_loss, argnums=1))(p, x), TOL32, "x")

    @functools.partial(jax.jit, donate_argnums=(0,), static_argnames="lr")
    def sgd(p, x, lr):
        g = jax.grad(lambda p: loss_aux(p, x, K)[0])(p)
        return jax.tree.map(lambda a, b: a - lr * b, p, g)

    new = sgd(jax.tree.map(jnp.copy, p), x, lr=0.05)
    new = sgd(new, x, lr=0.05)   # a second step on the donated, updated buffers
    ref1 = jax.tree.map(lambda a, b: a - 0.05 * b, p, want)
    ref2 = jax.tree.map(lambda a, b: a - 0.05 * b, ref1, jax.jit(jax.grad(ref_loss))(ref1, x))
    close_tree(new, ref2, TOL32, "two SGD steps")


def test_integer_inputs_are_not_differentiable():
    """Group sizes and expert ids flow through grad closures; ``allow_int`` gives float0 for them."""
    p, x = params(9), tokens(10)
    w, ids = R.route(x @ p["wr"], K)
    xs, sizes, _ = R.permute(x, ids, E)

    def experts(xs, sizes, wg, wu, wd):
        return jnp.sum(moe_ops.experts_ffn(xs, sizes, wg, wu, wd, implementation="xla") ** 2)

    def experts_ref(xs, sizes, wg, wu, wd):
        return jnp.sum(R.gmm(R.activate(R.gmm(xs, wg, sizes), R.gmm(xs, wu, sizes)), wd, sizes) ** 2)

    args = (xs, sizes, p["wg"], p["wu"], p["wd"])
    got = jax.jit(jax.grad(experts, argnums=(0, 2, 3, 4)))(*args)
    for g, e in zip(got, jax.jit(jax.grad(experts_ref, argnums=(0, 2, 3, 4)))(*args)):
        assert_close(g, e, TOL32)
    assert jax.jit(jax.grad(experts, argnums=1, allow_int=True))(*args).dtype == jax.dtypes.float0

    def fused(x, w, ids):
        return jnp.sum(moe_ops.fused_experts_ffn(x, w, ids, p["wg"], p["wu"], p["wd"], implementation="xla") ** 2)

    def fused_ref(x, w, ids):
        xs, sizes, sort_idx = R.permute(x, ids, E)
        y = R.gmm(R.activate(R.gmm(xs, p["wg"], sizes), R.gmm(xs, p["wu"], sizes)), p["wd"], sizes)
        return jnp.sum(R.unpermute(y, sort_idx, w) ** 2)

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(x, w, ids)
    for g, e in zip(got, jax.jit(jax.grad(fused_ref, argnums=(0, 1)))(x, w, ids)):
        assert_close(g, e, TOL32)
    assert jax.jit(jax.grad(fused, argnums=2, allow_int=True))(x, w, ids).dtype == jax.dtypes.float0


# ------------------------------------------------------------------------------------------------ mixed precision


@pytest.mark.parametrize("x_dtype,w_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32)])
@pytest.mark.parametrize("impl,fused", [("xla", True), ("xla", False),
                                        pytest.param("triton", None, marks=pytest.mark.slow)])
def test_mixed_precision_grads_in_each_inputs_dtype(x_dtype, w_dtype, impl, fused):
    p, x = params(11, w_dtype), tokens(12, dtype=x_dtype)
    logits = randn(keys(13, 1)[0], (T, E), jnp.bfloat16 if x_dtype == jnp.float32 else jnp.float32)
    args = (x, logits, p["wg"], p["wu"], p["wd"])
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
    got = jax.jit(jax.grad(loss(moe(impl, fused)), argnums=range(5)))(*args)
    want = jax.jit(jax.grad(loss(dense), argnums=range(5)))(*args)
    tol = TOL32 if x_dtype == w_dtype == jnp.float32 else TOL16
    for name, g, e, a in zip(["x", "logits", "w_gate", "w_up", "w_down"], got, want, args):
        assert g.dtype == e.dtype == a.dtype, f"{name}: grad {g.dtype}, reference {e.dtype}, input {a.dtype}"
        assert_close(g, e, tol, name)


def test_f32_master_weights_cast_to_bf16_in_the_step():
    p, x = params(14), tokens(15)

    def loss(layer):
        def f(p, x):
            pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
            h = block(layer, x.astype(jnp.bfloat16), pb)
            return jnp.sum(h.astype(jnp.float32) ** 2)
        return f

    for fused in (True, False):
        got = jax.jit(jax.grad(loss(moe("xla", fused))))(p, x)
        close_tree(got, jax.jit(jax.grad(loss(dense)))(p, x), TOL16, f"fused={fused}")


# ------------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("fused", [True, False])
def test_vmap_and_lax_map_of_a_train_step(fused):
    p, xb = params(16), tokens(17, (3, T, D))
    step = lambda layer: jax.grad(lambda p, x: jnp.sum(block(layer, x, p) ** 2))
    want = jax.jit(jax.vmap(step(dense), in_axes=(None, 0)))(p, xb)
    close_tree(jax.jit(jax.vmap(step(moe("xla", fused)), in_axes=(None, 0)))(p, xb), want, TOL32, "vmap")
    mapped = jax.jit(lambda p, xb: jax.lax.map(lambda x: step(moe("xla", fused))(p, x), xb))(p, xb)
    close_tree(mapped, want, TOL32, "lax.map")


@pytest.mark.parametrize("fused", [True, False])
def test_eval_shape_make_jaxpr_and_aot_compile(fused):
    p, x = params(18, layers=L), tokens(19)
    step = jax.value_and_grad(stack_loss(moe("xla", fused, recompute=fused is True), CP.nothing_saveable),
                              argnums=(0, 1))
    sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (p, x))
    shapes = jax.eval_shape(step, *sds)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes[1]) == jax.tree.map(lambda s: (s.shape, s.dtype), sds)
    assert jax.make_jaxpr(step)(*sds).eqns
    value, grads = jax.jit(step).lower(*sds).compile()(p, x)
    want_value, want = jax.value_and_grad(stack_loss(dense), argnums=(0, 1))(p, x)
    assert_close(value, want_value, TOL32, "loss")
    close_tree(grads[0], want[0], TOL32)
    assert_close(grads[1], want[1], TOL32, "x")


@pytest.mark.parametrize("impl", ["xla", "triton", "pallas"])
def test_public_ops_name_their_hlo(impl):
    """Profiles can tell the MoE ops apart: each public op's forward and backward ops carry ``moe_ops.<op>`` in
    their HLO names (a ``jax.named_scope``)."""
    for name, (op, args) in public_op_cases(impl).items():
        hlo = jax.jit(lambda *a, op=op: value_and_grads(op, a)).lower(*args).as_text(debug_info=True)
        op_name = name.removesuffix("_unfused")
        assert f"moe_ops.{op_name}" in hlo, name
        if name in ("gmm", "moe_ffn"):  # the backward's ops are named too
            assert f"transpose(jvp(moe_ops.{op_name}))" in hlo, name


def test_strict_promotion_f16_and_matmul_precision_context():
    p, x = params(20), tokens(21)
    loss = lambda layer: lambda p, x: jnp.sum(block(layer, x, p).astype(jnp.float32) ** 2)
    want = jax.jit(jax.grad(loss(dense)))(p, x)
    for fused in (True, False):
        with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
            close_tree(jax.jit(jax.grad(loss(moe("xla", fused))))(p, x), want, TOL32, "strict")
    with jax.default_matmul_precision("float32"):
        close_tree(jax.jit(jax.grad(loss(moe("xla", True))))(p, x), want, TOL32, "precision")
    p16, x16 = jax.tree.map(lambda a: a.astype(jnp.float16), p), x.astype(jnp.float16)
    close_tree(jax.jit(jax.grad(loss(moe("xla"))))(p16, x16), jax.grad(loss(dense))(p16, x16), TOL16, "f16")


# ------------------------------------------------------------------------------------------------ x64

X64_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import moe_ops
    from moe_ops import reference as R
    from moe_ops.integrations import maxtext
    impl = {impl!r}
    assert jax.config.jax_enable_x64
    jax.config.update("jax_numpy_dtype_promotion", "strict")  # what jax's own test harness (and ports of it) run
    kx, kw, ki, kg = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (8, 8), jnp.float32)
    w_gate, w_up = jax.random.normal(kw, (2, 4, 8, 8), jnp.float32) * 0.3
    w_down = jnp.swapaxes(w_up, 1, 2)
    ids = jax.random.randint(ki, (8, 2), 0, 4, dtype=jnp.int64)
    weights = jax.random.uniform(kg, (8, 2), jnp.float32)
    sizes = jnp.bincount(ids.reshape(-1), length=4)
    assert ids.dtype == sizes.dtype == jnp.int64
    xs, _, sort_idx = R.permute(x, ids, 4)
    def experts(x_sorted, w):
        return R.gmm(R.activate(R.gmm(x_sorted, w_gate, sizes), R.gmm(x_sorted, w_up, sizes)), w_down, sizes)
    def rel(a, b):
        return float(jnp.linalg.norm((a - b).astype(jnp.float64)) / jnp.linalg.norm(b.astype(jnp.float64)))
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)
    ours = lambda x, w: moe_ops.fused_experts_ffn(x, w, ids, w_gate, w_up, w_down, implementation=impl)
    ref = lambda x, w: R.unpermute(experts(R.permute(x, ids, 4)[0], w), sort_idx, w)
    for g, e in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, weights), jax.grad(loss(ref), argnums=(0, 1))(x, weights)):
        assert g.dtype == e.dtype == jnp.float32 and rel(g, e) < 1e-5, (g.dtype, rel(g, e))
    y = moe_ops.experts_ffn(moe_ops.permute(x, ids, 4, implementation=impl)[0], sizes, w_gate, w_up, w_down,
                            implementation=impl)
    assert rel(y, experts(xs, weights)) < 1e-5
    assert rel(moe_ops.ragged_dot(xs, w_gate, sizes, implementation=impl), jax.lax.ragged_dot(xs, w_gate, sizes)) < 1e-5
    logits = x[:, :4] @ jnp.eye(4, dtype=jnp.float32)
    got = moe_ops.moe_ffn(x, logits, w_gate, w_up, w_down, top_k=np.int64(2), implementation=impl)
    assert rel(got, R.moe_ffn_dense(x, logits, w_gate, w_up, w_down, top_k=2)) < 1e-5
    bf = lambda a: a.astype(jnp.bfloat16)
    out = maxtext.permute(bf(x).reshape(2, 4, 8), bf(logits).reshape(2, 4, 4), bf(logits).reshape(2, 4, 4),
                          num_experts_per_tok=2, decoder_block="deepseek", model_name="deepseek3-x",
                          routed_score_func="sigmoid", routed_bias=True, routed_bias_update_rate=0.01,
                          load_balance_loss_weight=0.01, implementation=impl)
    assert out[5].dtype == out[6].dtype == jnp.float32, (out[5].dtype, out[6].dtype)
    assert maxtext.unpermute(out[0], out[1], out[2], 2, 4, dtype=jnp.float32, implementation=impl).dtype == jnp.float32
    local = maxtext.local_permute(xs, sizes.reshape(1, 4), 2, 1, use_ragged_sort=True, ragged_buffer_factor=1.0,
                                  implementation=impl)
    assert int(local[2].sum()) == int(sizes[2:].sum())
    rows = maxtext.local_permute(jnp.arange(16, dtype=jnp.int32)[:, None], sizes.reshape(1, 4), 2, 1,
                                 use_ragged_sort=True, ragged_buffer_factor=1.0, implementation=impl)  # a gather
    assert rows[0].dtype == jnp.int32 and (rows[1] == local[1]).all()
    print("X64-OK")
""")


@pytest.mark.parametrize("impl", ["xla", pytest.param("triton", marks=pytest.mark.slow)])
def test_x64_int64_expert_ids_and_group_sizes(impl):
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", X64_SCRIPT.format(impl=impl)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "X64-OK" in run.stdout, run.stderr[-3000:]
