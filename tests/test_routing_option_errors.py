"""The routing options' errors (``route``, and ``moe_ffn`` on one device, partitioned and per shard): each names the
bad argument as the caller spelled it (``moe_ffn``: ``router_bias`` / ``routed_scale``) and what it accepts."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

import moe_ops
from moe_ops.sharding import MoEShardingConfig

LG = jnp.zeros((4, 8))
BAD = [  # (keywords, exception, message), route's names; moe_ffn says router_bias / routed_scale
    (dict(num_groups=3, top_groups=1), ValueError, r"num_groups must be an int >= 1 that divides E=8"),
    (dict(num_groups=0, top_groups=1), ValueError, r"num_groups must be an int >= 1"),
    (dict(num_groups=2.0, top_groups=1), ValueError, r"num_groups must be an int"),
    (dict(num_groups=True, top_groups=1), ValueError, r"num_groups must be an int"),
    (dict(num_groups=4, top_groups=0), ValueError, r"top_groups must be an int in \[1, num_groups=4\], got 0"),
    (dict(num_groups=4, top_groups=5), ValueError, r"top_groups must be an int in \[1, num_groups=4\], got 5"),
    (dict(num_groups=4), ValueError, r"num_groups and top_groups go together"),
    (dict(top_groups=2), ValueError, r"num_groups and top_groups go together"),
    (dict(num_groups=4, top_groups=1), ValueError, r"top_k=3 must be at most top_groups \* E / num_groups = 1 \* 2"),
    (dict(scale="2.5"), TypeError, r"scale must be a Python float"),
    (dict(scale=jnp.float32(2.5)), TypeError, r"scale must be a Python float"),
    (dict(scale=True), TypeError, r"scale must be a Python float"),
    (dict(scale=float("inf")), ValueError, r"scale must be finite"),
    (dict(bias=jnp.zeros(7)), ValueError, r"bias must have shape \[E\]=\(8,\), got \(7,\)"),
    (dict(bias=[0.0] * 8), TypeError, r"bias must be None or an array"),
    (dict(bias=jnp.zeros(8, jnp.complex64)), TypeError, r"bias must be a float"),
    (dict(renormalize="no"), TypeError, r"renormalize must be True or False"),
    (dict(num_groups=4, top_groups=2, group_score="sum"), ValueError,
     r"group_score must be one of \['max', 'top2_sum'\], got 'sum'"),
    (dict(group_score="max"), ValueError, r"group_score='max' needs group-limited routing \(num_groups and top_groups"),
]
MOE_NAMES = {"bias": "router_bias", "scale": "routed_scale"}


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_route_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        moe_ops.route(LG, 3, **kw)


@pytest.mark.parametrize("path", ["single", "partitioned", "shard"])
@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_moe_ffn_errors_name_its_arguments(kw, exc, msg, path):
    x, ws = jnp.zeros((4, 4)), (jnp.zeros((8, 4, 4)),) * 3
    kw = {MOE_NAMES.get(k, k): v for k, v in kw.items()}
    msg = msg.replace("bias must", "router_bias must").replace("scale must", "routed_scale must")
    fn = {"single": functools.partial(moe_ops.moe_ffn, implementation="xla"),
          "partitioned": functools.partial(moe_ops.moe_ffn, sharding=MoEShardingConfig()),
          "shard": moe_ops.moe_ffn_shard}[path]
    with pytest.raises(exc, match=rf"^{msg}"):
        fn(x, LG, *ws, top_k=3, **kw)
