"""Pallas TPU (Mosaic) kernels; on CPU they run with ``interpret=True``.

``gmm.py`` (GMM + TGMM, tiling heuristic in ``tiling.py``), ``sort.py`` (token permutation), ``fused.py`` (gather /
scatter inside the GMM), ``swiglu.py`` (gate/up + activation in one GMM) and ``swiglu_bwd.py`` (its backward through
the weighted down projection, one kernel); ``backend.py`` gathers them into a ``moe_ops`` backend.
"""
