"""Pallas TPU (Mosaic) kernels; on CPU they run with ``interpret=True``.

``gmm.py`` (GMM + TGMM, tiling heuristic in ``tiling.py``) and ``sort.py`` (token permutation); ``backend.py``
gathers them into a ``moe_ops`` backend.
"""
