"""jax-triton's real CUDA / ROCm lowering on a machine without a GPU, and a decoder for what it emits.

jaxlib's CUDA plugin (``pip install "moe-ops[lowering]"``: ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` at the
installed jaxlib's version) provides the ``TritonKernelCall`` serializer that jax-triton's lowering needs; it loads
without CUDA libraries. With the device queries pinned (``pinned_targets``), ``jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))`` or ``jax.export(..., platforms=["cuda" | "rocm"])`` runs the real path: Triton
compiles the kernel to PTX / an hsaco, and the launch (grid, warps, shared memory, parameters) is serialized into the
``triton_kernel_call`` custom call's backend config, which ``kernel_calls`` decodes. The ROCm lowering uses the same
serializer (the ROCm plugin itself needs ROCm libraries to load).

Wire format decoded (jaxlib's ``TritonAnyKernelCall`` protobuf, zlib-compressed): 1 kernel_call {1 kernel {1 name,
2 num_warps, 3 shared_mem_bytes, 4 ptx | hsaco path, 5 ttir, 6 compute_capability, 7-9 cluster dims}, 2-4 grid,
5 parameters}, 2 autotuned call (not used by this package), 4 call name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib

# Per-block shared memory / LDS limits of the targets (bytes): sm_90 227 KiB opt-in, gfx950 160 KiB, gfx942 64 KiB.
SHARED_LIMIT = {"sm90": 227 * 1024, "gfx950": 160 * 1024, "gfx942": 64 * 1024}
PLATFORM_OF = {"sm90": "cuda", "gfx950": "rocm", "gfx942": "rocm"}
_CALL_RE = re.compile(r'stablehlo\.custom_call @triton_kernel_call\((?P<operands>[^)]*)\)(?P<attrs>.*?)'
                      r'backend_config = "(?P<config>(?:[^"\\]|\\.)*)"', re.S)


def unavailable_reason() -> str | None:
    """Why the real lowering cannot run here (None when it can)."""
    try:
        from jax._src.lib import gpu_triton
    except ImportError as err:  # pragma: no cover - jaxlib layout
        return f"jaxlib has no gpu_triton module ({err})"
    if not hasattr(gpu_triton, "TritonKernelCall"):
        return ("jaxlib's CUDA plugin is not installed (pip install 'moe-ops[lowering]': jax-cuda12-plugin and "
                "jax-cuda12-pjrt at the jaxlib version)")
    return None


@contextlib.contextmanager
def pinned_targets(compute_capability: int = 90, rocm_arch: str = "gfx950"):
    """Answer jax-triton's device queries (compute capability for CUDA, gfx name for ROCm) without a device."""
    from kernels.triton.bridge import load_jax_triton
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    triton_lib = load_jax_triton().triton_lib
    lib = triton_lib.triton_kernel_call_lib
    saved = lib.get_compute_capability, getattr(lib, "get_arch_details", None)
    lib.get_compute_capability = lambda *_: compute_capability
    lib.get_arch_details = lambda *_: rocm_arch
    try:
        yield
    finally:
        lib.get_compute_capability, lib.get_arch_details = saved


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One decoded ``triton_kernel_call``: the jax-triton call name, the compiled kernel and its launch."""

    name: str
    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    shared_bytes: int
    num_operands: int
    num_parameters: int
    binary: str  # "ptx" or "hsaco"

    def problems(self, arch: str, *, num_warps: int | None = None, grid: tuple | None = None) -> list[str]:
        """What is wrong with this launch for ``arch`` (empty when it is fine)."""
        out = []
        if self.shared_bytes > SHARED_LIMIT[arch]:
            out.append(f"shared memory {self.shared_bytes} B > {arch} limit {SHARED_LIMIT[arch]} B")
        if num_warps is not None and self.num_warps != num_warps:
            out.append(f"num_warps {self.num_warps} != config's {num_warps}")
        if grid is not None and self.grid != tuple(grid) + (1,) * (3 - len(grid)):
            out.append(f"grid {self.grid} != expected {tuple(grid)}")
        if any(g < 1 for g in self.grid):
            out.append(f"empty grid {self.grid}")
        expected = "hsaco" if PLATFORM_OF[arch] == "rocm" else "ptx"
        if self.binary != expected:
            out.append(f"binary is {self.binary}, expected {expected}")
        return out


def kernel_calls(module_text: str) -> list[KernelCall]:
    """Every ``triton_kernel_call`` in a lowered module's text, decoded, in order."""
    calls = []
    for m in _CALL_RE.finditer(module_text):
        fields = _fields(zlib.decompress(_unescape(m.group("config"))))
        if 1 not in fields:
            raise ValueError("only plain (not autotuned) triton kernel calls are decoded")
        call = _fields(fields[1][0])
        kernel = _fields(call[1][0])
        binary = kernel.get(4, [b""])[0]
        calls.append(KernelCall(
            name=fields.get(4, [b""])[0].decode(), kernel=kernel[1][0].decode(),
            grid=tuple(call.get(i, [0])[0] for i in (2, 3, 4)), num_warps=kernel.get(2, [0])[0],
            shared_bytes=kernel.get(3, [0])[0], num_operands=len([o for o in m.group("operands").split(",") if o]),
            num_parameters=len(call.get(5, [])), binary="ptx" if b".target sm_" in binary[:4096] else "hsaco"))
    return calls


def _unescape(text: str) -> bytes:
    """MLIR string-attribute escapes (``\\XX`` hex, ``\\\\``, ``\\"``) back to bytes."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] != "\\":
            j = text.find("\\", i)
            j = len(text) if j < 0 else j
            out += text[i:j].encode()
            i = j
        elif text[i + 1] in '\\"':
            out.append(ord(text[i + 1]))
            i += 2
        else:
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
    return bytes(out)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(buf: bytes) -> dict[int, list]:
    """Protobuf wire format -> {field number: [values]} (varints as ints, length-delimited as bytes)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out
