"""Contract checks of the fused dispatch / combine and SwiGLU ops (``gather_gmm``, ``scatter_gmm``, ``swiglu_gmm``,
``swiglu_ffn``, ``fused_experts_ffn``) and the unfused layer's activation check, that an audit found broken; each
test failed before its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_ops
from moe_ops import reference as R
from tests.helpers import keys, randn

T, D, F, E, TOPK = 6, 8, 16, 4, 2
_k = keys(71, 6)
X = randn(_k[0], (T, D))
WG, WU = randn(_k[1], (E, D, F), scale=0.3), randn(_k[2], (E, D, F), scale=0.3)
WD = randn(_k[3], (E, F, D), scale=0.3)
W, IDS = R.route(randn(_k[4], (T, E)), TOPK)
SIZES, SIDX = R.sort_by_expert(IDS, E)

CALLS = {
    "swiglu_gmm": lambda act: moe_ops.swiglu_gmm(X, WG, WU, SIZES, SIDX, activation=act, implementation="xla"),
    "swiglu_gmm_sorted": lambda act: moe_ops.swiglu_gmm(X[SIDX // TOPK], WG, WU, SIZES, activation=act,
                                                        implementation="xla"),
    "swiglu_ffn": lambda act: moe_ops.swiglu_ffn(X, WG, WU, WD, SIZES, SIDX, W, activation=act, implementation="xla"),
    "fused_experts_ffn": lambda act: moe_ops.fused_experts_ffn(X, W, IDS, WG, WU, WD, activation=act,
                                                               implementation="xla"),
    "fused_experts_ffn_no_swiglu": lambda act: moe_ops.fused_experts_ffn(X, W, IDS, WG, WU, WD, activation=act,
                                                                         swiglu=False, implementation="xla"),
    # the unfused layer: its activation check is reference.activate's
    "moe_ffn_unfused": lambda act: moe_ops.moe_ffn(X, randn(_k[5], (T, E)), WG, WU, WD, top_k=TOPK, activation=act,
                                                   fused=False, implementation="xla"),
}


@pytest.mark.parametrize("activation", [["silu"], {"act": "silu"}, b"silu", 1], ids=["list", "dict", "bytes", "int"])
@pytest.mark.parametrize("op", sorted(CALLS))
def test_activation_that_is_not_a_name_raises_a_named_value_error(op, activation):
    """Failed before the fix: an unhashable activation (a list, a dict) escaped from the activation lookup as a bare
    ``TypeError: unhashable type`` that names no argument; now every fused op raises the same ``ValueError`` naming
    ``activation`` and the accepted names as for an unknown string, at trace time."""
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'silu'\]"):
        jax.eval_shape(lambda: CALLS[op](activation))


@pytest.mark.parametrize("op", sorted(CALLS))
def test_valid_activation_names_still_run(op):
    """The check accepts every documented name (and a NumPy str, which is a str)."""
    for act in ("silu", "gelu", "relu", np.str_("gelu")):
        out = jax.eval_shape(lambda: CALLS[op](act))
        assert out.dtype == jnp.float32
