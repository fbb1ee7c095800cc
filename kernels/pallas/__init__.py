"""Pallas TPU (Mosaic) kernels; on CPU they run with ``interpret=True``.

``gmm.py`` (GMM + TGMM, tiling heuristic in ``tiling.py``), ``sort.py`` (token permutation), ``fused.py`` (gather /
scatter inside the GMM) and ``swiglu.py`` (gate/up + activation in one GMM); ``backend.py`` gathers them into a
``moe_ops`` backend.
"""
