"""Hand-written MoE kernels: ``kernels.triton`` (NVIDIA Hopper, AMD gfx950/gfx942) and ``kernels.pallas`` (TPU).

Kernel modules take already-validated arguments; ``moe_ops`` is the public, checked, differentiable API.
``kernels.registry`` + ``kernels.aot`` compile every Triton kernel for real GPU targets without a GPU.
``kernels.activation`` names the gated activation (``GatedActivation``) that the SwiGLU kernels of both families take.
"""
