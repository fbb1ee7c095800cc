"""moe_ops: drop-in Mixture-of-Experts ops for JAX (grouped matmuls, token permutation, the routed FFN).

Layers: ``kernels`` (Triton GPU / Pallas TPU kernels) -> ``moe_ops`` (validation, autodiff, backend choice) ->
``benchmarks``. ``moe_ops.reference`` holds the pure-jnp twins every kernel is tested against.
"""

from moe_ops import reference
from moe_ops.backend import IMPLEMENTATIONS, resolve as resolve_implementation
from moe_ops.gmm import gmm, tgmm
from moe_ops.layer import experts_ffn, moe_ffn, route
from moe_ops.sort import permute, unpermute
from moe_ops.validation import checked

__version__ = "0.1.0"
__all__ = ["gmm", "tgmm", "route", "permute", "unpermute", "moe_ffn", "experts_ffn", "reference", "checked",
           "IMPLEMENTATIONS", "resolve_implementation"]
from moe_ops import imbalance, sharding  # noqa: E402  (partitioned op: sharding rules, load-imbalance tools)
from moe_ops.partitioned import moe_ffn_partitioned, moe_ffn_shard  # noqa: E402
from moe_ops.sharding import MoEShardingConfig  # noqa: E402
__all__ += ["MoEShardingConfig", "moe_ffn_partitioned", "moe_ffn_shard", "sharding", "imbalance"]
from moe_ops import fused  # noqa: E402  (fused dispatch / combine: gather / scatter inside the GMMs)
from moe_ops.fused import gather_gmm, scatter_gmm  # noqa: E402
from moe_ops.layer import fused_experts_ffn  # noqa: E402
__all__ += ["fused", "gather_gmm", "scatter_gmm", "fused_experts_ffn"]
