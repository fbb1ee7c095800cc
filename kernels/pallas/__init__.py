"""Pallas TPU (Mosaic) kernels; on CPU they run with ``interpret=True``.

This package is a ``moe_ops`` backend (see ``moe_ops.backend`` for the interface).
"""

from kernels.pallas.gmm import gmm, tgmm
from kernels.pallas.sort import combine_rows, combine_weight_grad, gather_rows, sort_by_expert

__all__ = ["gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad"]
