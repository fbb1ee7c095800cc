"""Pallas TPU (Mosaic) kernels; on CPU they run with ``interpret=True``.

This package is a ``moe_ops`` backend (interface in ``moe_ops.backend``); ``gmm``/``tgmm`` live in
``kernels.pallas.gmm`` and the token-permutation ops in ``kernels.pallas.sort``.
"""

from kernels._lazy import BACKEND_FUNCTIONS, exporter

__getattr__ = exporter(__name__)
__all__ = sorted(BACKEND_FUNCTIONS)
