"""``moe_ops.integrations.tokamax`` through tokamax's public ``ragged_dot`` / ``ragged_dot_general``, forward and
gradients, against tokamax's own ``"xla"`` implementation, on every moe_ops backend."""

import jax
import jax.numpy as jnp
import pytest

from moe_ops.integrations.tokamax import MoeOpsRaggedDot
from tests.helpers import TOL, assert_close, group_sizes, keys, randn

tokamax = pytest.importorskip("tokamax", reason="tokamax is not installed (pip install -e '.[tokamax]')")
from absl import flags  # noqa: E402  (tokamax depends on absl)

# tokamax reads its config flags by parsing sys.argv with absl on first use, which rejects pytest's own options
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

IMPLS = ["xla", "triton", "pallas"]
M, K, N, G = 29, 16, 12, 4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["uneven", "sum_below_m"])
def test_tokamax_ragged_dot_forward_and_grad(impl, case):
    k1, k2, k3 = keys(31, 3)
    lhs, rhs, cot = randn(k1, (M, K)), randn(k2, (G, K, N)), randn(k3, (M, N))
    sizes = group_sizes(case, G, M, seed=6)

    def loss(implementation):
        return lambda a, b: jnp.sum(cot * tokamax.ragged_dot(a, b, sizes, implementation=implementation))

    ours = [MoeOpsRaggedDot(impl)]
    assert_close(tokamax.ragged_dot(lhs, rhs, sizes, implementation=ours),
                 tokamax.ragged_dot(lhs, rhs, sizes, implementation="xla"), TOL[jnp.float32], "forward")
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(lhs, rhs)
    want = jax.grad(loss("xla"), argnums=(0, 1))(lhs, rhs)
    for name, a, b in zip(["dlhs", "drhs"], got, want):
        assert_close(a, b, TOL[jnp.float32], f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_tokamax_group_sizes_object_activation_and_bf16(impl):
    k1, k2 = keys(32, 2)
    lhs, rhs = randn(k1, (M, K), jnp.bfloat16), randn(k2, (G, K, N), jnp.bfloat16)
    sizes = tokamax.RaggedDotGroupSizes(group_sizes("empty_groups", G, M), (8, 8, 8, 5))
    kw = dict(preferred_element_type=jnp.float32, activation=jax.nn.gelu)
    got = tokamax.ragged_dot(lhs, rhs, sizes, implementation=[MoeOpsRaggedDot(impl)], **kw)
    want = tokamax.ragged_dot(lhs, rhs, sizes, implementation="xla", **kw)
    assert got.dtype == want.dtype == jnp.float32
    assert_close(got, want, TOL[jnp.bfloat16], impl)


def test_tokamax_ragged_dot_general_contracting_mode():
    k1, k2 = keys(33, 2)
    lhs, rhs, sizes = randn(k1, (M, K)), randn(k2, (M, N)), group_sizes("uneven", G, M)
    dims = jax.lax.RaggedDotDimensionNumbers((([0], [0]), ([], [])), [0], [])
    got = tokamax.ragged_dot_general(lhs, rhs, sizes, dims, implementation=[MoeOpsRaggedDot("xla")])
    assert_close(got, tokamax.ragged_dot_general(lhs, rhs, sizes, dims, implementation="xla"), TOL[jnp.float32], "")


def test_non_array_operands_fall_through_to_the_next_implementation():
    class Wrapped:  # stands in for a qwix QArray: not a plain array
        shape, dtype = (M, K), jnp.float32
    with pytest.raises(NotImplementedError, match="plain arrays"):
        MoeOpsRaggedDot("xla")(Wrapped(), jnp.ones((G, K, N)), group_sizes=jnp.ones((G,), jnp.int32),
                               ragged_dot_dimension_numbers=None)


def test_numpy_int64_sizes_are_clipped_not_wrapped():
    """NumPy sizes reach moe_ops as NumPy (clipped on the host in int64), as ``moe_ops.ragged_dot`` takes them: a
    size of 2**32 + 2 is the rest of the rows, never 2 after an int32 narrowing."""
    import numpy as np
    lhs, rhs = randn(keys(34, 1)[0], (8, K)), randn(keys(35, 1)[0], (3, K, N))
    sizes = np.array([3, 2 ** 32 + 2, 1], np.int64)
    dims = jax.lax.RaggedDotDimensionNumbers((([1], [1]), ([], [])), [0], [0])
    got = MoeOpsRaggedDot("xla")(lhs, rhs, group_sizes=sizes, ragged_dot_dimension_numbers=dims)
    want = jnp.concatenate([lhs[:3] @ rhs[0], lhs[3:] @ rhs[1]])
    assert_close(got, want, TOL[jnp.float32], "int64 sizes")


@pytest.mark.parametrize("impl", IMPLS)
def test_op_called_as_tokamax_suite_calls_it(impl):
    """tokamax's own ragged-dot suite (``RaggedDotTestBase.test_vjp``) calls an implementation directly, without
    ``ragged_dot_dimension_numbers``, with ``precision=BF16_BF16_F32`` and an activation. Failed before the fix: the
    keyword was required, then the triton / pallas kernels refused every dot algorithm."""
    from moe_ops import reference
    k1, k2, k3 = keys(34, 3)
    lhs, rhs = randn(k1, (M, K), jnp.bfloat16), randn(k2, (G, K, N), jnp.bfloat16)
    sizes, dout = group_sizes("uneven", G, M), randn(k3, (M, N))
    op = MoeOpsRaggedDot(impl)
    f = lambda a, b: op(a, b, group_sizes=sizes, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                        preferred_element_type=jnp.float32, activation=jnp.tanh)
    f_ref = lambda a, b: jnp.tanh(reference.gmm(a.astype(jnp.float32), b.astype(jnp.float32), sizes))
    got, vjp = jax.vjp(f, lhs, rhs)
    want, vjp_ref = jax.vjp(f_ref, lhs, rhs)
    assert_close(got, want, TOL[jnp.float32], f"{impl} forward")
    for name, a, b in zip(["dlhs", "drhs"], vjp(dout), vjp_ref(dout)):
        assert_close(a, b, TOL[jnp.bfloat16], f"{impl} {name}")
