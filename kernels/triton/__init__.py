"""Triton GPU kernels (NVIDIA sm_90, AMD gfx950 / gfx942), called from JAX through ``jax_triton.triton_call``.

``gmm.py`` (GMM + TGMM, tile schedule in ``schedule.py``, per-arch configs in ``tuning.py``) and ``sort.py``
(counting sort, permute, combine), ``swiglu.py`` (gate/up + gated activation, its fused backward; the activation's
epilogue math in ``activation.py``); ``backend.py`` gathers them into a ``moe_ops`` backend. On a CPU-only jaxlib the
same kernels run through the interpreter bridge (``bridge.py``), installed when this package is imported.
"""

from kernels.triton.bridge import load_jax_triton

load_jax_triton()
