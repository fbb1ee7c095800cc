"""The public ops inside a user's shard_map with check_vma on: tokens sharded, weights replicated. Gradients of the
replicated inputs must be the sum over shards (the op boundary casts inputs to a common vma; see moe_ops.vma)."""

import jax
import jax.numpy as jnp
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import assert_close, keys, randn, sharded_sum, unsharded_sum




@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "triton"])
def test_gmm_tgmm_grads_of_replicated_weights(impl):
    k = keys(11, 3)
    lhs, rhs, other = randn(k[0], (32, 8)), randn(k[1], (3, 8, 12)), randn(k[2], (3, 8, 8))
    sizes = jnp.array([3, 0, 4], jnp.int32)

    def per_shard(l, r, o, implementation):
        y = moe_ops.gmm(l, r, sizes, implementation=implementation)
        w = moe_ops.tgmm(l, l, sizes, implementation=implementation)
        return jnp.sum(y ** 2) + jnp.sum(w * o)

    ours = jax.jit(jax.grad(sharded_sum(lambda *a: per_shard(*a, impl)), argnums=(0, 1, 2)))(lhs, rhs, other)
    ref = jax.grad(unsharded_sum(lambda l, r, o: jnp.sum(R.gmm(l, r, sizes) ** 2) + jnp.sum(R.tgmm(l, l, sizes) * o)),
                   argnums=(0, 1, 2))(lhs, rhs, other)
    for name, g, e in zip(["lhs", "rhs", "other"], ours, ref):
        assert_close(g, e, 1e-5, name)


@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "triton"])
def test_permute_unpermute_grads_of_replicated_inputs(impl):
    k = keys(12, 3)
    x, y_scale, w = randn(k[0], (16, 6)), randn(k[1], (6,)), jax.random.uniform(k[2], (4, 2))
    ids = jax.random.randint(keys(13, 1)[0], (4, 2), 0, 3)

    def per_shard(tokens, y_scale, w, permute, unpermute):
        xs, _, sort_idx = permute(tokens[:4], ids, 3)
        return jnp.sum(unpermute(xs * y_scale, sort_idx, w) ** 2)

    permute = lambda *a: moe_ops.permute(*a, implementation=impl)
    unpermute = lambda *a: moe_ops.unpermute(*a, implementation=impl)
    ours = jax.jit(jax.grad(sharded_sum(lambda *a: per_shard(*a, permute, unpermute)),
                            argnums=(0, 1, 2)))(x, y_scale, w)
    ref = jax.grad(unsharded_sum(lambda *a: per_shard(*a, R.permute, R.unpermute)), argnums=(0, 1, 2))(x, y_scale, w)
    for name, g, e in zip(["x", "y_scale", "weights"], ours, ref):
        assert_close(g, e, 1e-5, name)


def test_eager_shard_map_around_gmm():
    """shard_map called eagerly (no jit) with check_vma: the ops inside run op by op. On jax 0.11.2 an eager
    associative_scan there (the group-size clamp) segfaulted the process; the clamp now runs compiled."""
    k = keys(41, 2)
    x, w = randn(k[0], (16, 4)), randn(k[1], (4, 4, 3))
    sizes = jnp.array([[1, 0, 2, 1], [0, 0, 4, 0], [2, 1, 0, 1], [0, 3, 0, 1]], jnp.int32)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    f = jax.shard_map(lambda a, b, g: moe_ops.gmm(a, b, g[0], implementation="xla"), mesh=mesh,
                      in_specs=(jax.P("data"), jax.P(), jax.P("data")), out_specs=jax.P("data"), check_vma=True)
    want = jnp.concatenate([R.gmm(x[4 * i:4 * i + 4], w, sizes[i]) for i in range(4)])
    assert_close(f(x, w, sizes), want, 1e-6, "eager shard_map")
    assert_close(jax.jit(f)(x, w, sizes), want, 1e-6, "jit(shard_map)")


@pytest.mark.parametrize("impl,layer", [("triton", "moe_ffn"), ("xla", "fused_experts_ffn"),
                                        pytest.param("triton", "fused_experts_ffn:unfused-swiglu",
                                                     marks=pytest.mark.slow),
                                        pytest.param("xla", "moe_ffn:unfused", marks=pytest.mark.slow)])
def test_biased_layer_with_per_shard_routing(impl, layer):
    """A user's data-parallel step: each shard routes its own tokens (ids, group sizes and row maps vary per shard)
    and runs the layer with replicated weights and all three expert biases. The replicated inputs' gradients are the
    sums over shards. (The fused path's b_down combine returned its cotangent typed varying for an invariant b_down,
    and JAX refused the custom VJP.)"""
    e, top_k = 4, 2
    k = keys(14, 8)
    tokens = jnp.concatenate([randn(k[0], (24, 8)), randn(k[1], (24, e))], axis=1)   # x | router logits
    ws = (randn(k[2], (e, 8, 6), scale=0.3), randn(k[3], (e, 8, 6), scale=0.3), randn(k[4], (e, 6, 8), scale=0.3))
    bs = (randn(k[5], (e, 6)), randn(k[6], (e, 6)), randn(k[7], (e, 8)))
    name, _, variant = layer.partition(":")

    def per_shard(t, *params):
        x, logits = t[:, :8], t[:, 8:]
        wg, wu, wd, bg, bu, bd = params
        biases = dict(b_gate=bg, b_up=bu, b_down=bd, implementation=impl)
        if name == "moe_ffn":
            y = moe_ops.moe_ffn(x, logits, wg, wu, wd, top_k=top_k, fused=variant != "unfused", **biases)
        else:
            weights, ids = moe_ops.route(logits, top_k)
            y = moe_ops.fused_experts_ffn(x, weights, ids, wg, wu, wd, swiglu=False if variant else None, **biases)
        return jnp.sum(y ** 2)

    argnums = tuple(range(7))
    ours = jax.jit(jax.grad(sharded_sum(per_shard), argnums=argnums))(tokens, *ws, *bs)
    ref = jax.jit(jax.grad(unsharded_sum(per_shard), argnums=argnums))(tokens, *ws, *bs)
    for name, g, want in zip(["tokens", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"], ours, ref):
        assert_close(g, want, 1e-5, name)
