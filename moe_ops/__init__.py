"""moe_ops: drop-in Mixture-of-Experts ops for JAX (grouped matmuls, token permutation, the routed FFN, and its
expert-parallel partitioned form).

Layers: ``kernels`` (Triton GPU / Pallas TPU kernels) -> ``moe_ops`` (validation, autodiff, backend choice) ->
``benchmarks``. ``moe_ops.reference`` holds the pure-jnp twins every kernel is tested against.
"""

from kernels.activation import GPT_OSS, GatedActivation
from moe_ops import expert_bias, fused, imbalance, integrations, reference, sharding, swiglu
from moe_ops.backend import IMPLEMENTATIONS, resolve as resolve_implementation
from moe_ops.fused import gather_gmm, scatter_gmm
from moe_ops.gmm import gmm, tgmm
from moe_ops.layer import experts_ffn, fused_experts_ffn, moe_ffn, route
from moe_ops.partitioned import moe_ffn_partitioned, moe_ffn_shard
from moe_ops.ragged import RaggedDotDimensionNumbers, ragged_dot, ragged_dot_general
from moe_ops.sharding import MoEShardingConfig
from moe_ops.sort import permute, sort_by_expert, unpermute
from moe_ops.swiglu import swiglu_ffn, swiglu_gmm
from moe_ops.validation import checked

__version__ = "0.1.0"
__all__ = [
    # single-device ops
    "gmm", "tgmm", "route", "sort_by_expert", "permute", "unpermute", "moe_ffn", "experts_ffn", "checked",
    # jax.lax.ragged_dot(_general) signatures on these kernels
    "ragged_dot", "ragged_dot_general", "RaggedDotDimensionNumbers",
    # fused dispatch / combine (gather / scatter inside the GMMs)
    "gather_gmm", "scatter_gmm", "fused_experts_ffn", "fused", "swiglu_gmm", "swiglu_ffn", "swiglu",
    # the gated activation's spec (clamped / offset SwiGLU, e.g. gpt-oss's)
    "GatedActivation", "GPT_OSS", "expert_bias",
    # expert parallelism
    "MoEShardingConfig", "moe_ffn_partitioned", "moe_ffn_shard", "sharding", "imbalance",
    # ground truth and backend choice
    "reference", "IMPLEMENTATIONS", "resolve_implementation",
    # adapters for lax.ragged_dot / megablox / MaxText / tokamax call sites (moe_ops.integrations.maxtext, .tokamax)
    "integrations",
]
