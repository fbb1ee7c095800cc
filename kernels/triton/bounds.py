"""Memory checks for kernels run by the Triton interpreter (``kernels.triton.bridge``).

The interpreter loads and stores through raw host pointers: an out-of-bounds store silently corrupts the process
heap (and on a GPU, another buffer or a fault), an out-of-bounds load reads whatever lies there. Three checks, each
raising ``OutOfBoundsAccess`` that names the kernel and the argument:

1. every load and store (``InterpreterBuilder.create_masked_load`` / ``create_masked_store``, which the plain,
   block-pointer and tensor-descriptor forms all reach) touches, in its unmasked lanes, only bytes of the kernel's
   own buffers;
2. ``GUARD_BYTES`` of canary bytes on each side of every buffer are unchanged after the launch (a store that
   bypassed the builder);
3. inputs that no output aliases come back unchanged (XLA's buffers are immutable).
"""

from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["OutOfBoundsAccess", "GUARD_BYTES", "guarded", "check_guards", "checked_accesses", "unwrapped"]

GUARD_BYTES = 4096  # a multiple of every alignment a kernel may assume
_CANARY = 0xA5


class OutOfBoundsAccess(RuntimeError):
    """An interpreted kernel loaded or stored outside its buffers, or stored into an input no output aliases."""


def guarded(tensor):
    """``(view, storage)``: a copy of the torch ``tensor`` inside uint8 ``storage``, between two canary regions."""
    import torch
    nbytes = tensor.numel() * tensor.element_size()
    storage = torch.full((nbytes + 2 * GUARD_BYTES,), _CANARY, dtype=torch.uint8)
    view = storage[GUARD_BYTES:GUARD_BYTES + nbytes].view(tensor.dtype).view(tensor.shape)
    view.copy_(tensor)
    return view, storage


def check_guards(kernel, buffers, inputs, unchanged):
    """Checks 2 and 3 after a launch: ``buffers`` are ``guarded``'s pairs (inputs first), ``inputs`` the original
    input tensors, ``unchanged`` the indices of the inputs no output aliases."""
    import torch
    for i, (view, storage) in enumerate(buffers):
        for side, region in (("before", storage[:GUARD_BYTES]), ("after", storage[-GUARD_BYTES:])):
            if not bool((region == _CANARY).all()):
                raise OutOfBoundsAccess(f"Triton kernel {kernel} stored out of bounds {side} pointer argument {i} "
                                        f"(shape {tuple(view.shape)}, {view.dtype})")
    for i in unchanged:
        if not torch.equal(buffers[i][0].view(torch.uint8), inputs[i].view(torch.uint8)):
            raise OutOfBoundsAccess(f"Triton kernel {kernel} wrote into input pointer argument {i} (shape "
                                    f"{tuple(inputs[i].shape)}), which no output aliases")


def _describe(address, views):
    """``address`` relative to the nearest of ``views``: 'byte offset -4 of pointer argument 1 (64 bytes, ...)'."""
    spans = [(v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views]
    _, i = min((max(s - address, address - e + 1, 0), i) for i, (s, e) in enumerate(spans))
    return (f"byte offset {address - spans[i][0]} of pointer argument {i} ({spans[i][1] - spans[i][0]} bytes, shape "
            f"{tuple(views[i].shape)}, {views[i].dtype})")


@contextlib.contextmanager
def checked_accesses(kernel, views):
    """Check 1 while the block runs: each unmasked lane of a load / store must lie inside one of ``views`` (the
    torch tensors the kernel's pointer arguments point to). Patches the interpreter's builder; callers hold the
    bridge's interpreter lock, so no other kernel runs meanwhile."""
    from triton.runtime.interpreter import InterpreterBuilder

    order = sorted(views, key=lambda v: v.data_ptr())
    starts = np.array([v.data_ptr() for v in order], np.uint64)
    ends = starts + np.array([v.numel() * v.element_size() for v in order], np.uint64)

    def check(what, ptrs, mask):
        addresses = np.asarray(ptrs.data).astype(np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, bool), addresses.shape)]
        addresses = addresses.reshape(-1)
        if addresses.size == 0:
            return
        width = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
        slot = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
        ok = (slot >= 0) & (addresses + width <= ends[np.maximum(slot, 0)])
        if not ok.all():
            where = _describe(int(addresses[~ok][0]), views)
            raise OutOfBoundsAccess(f"Triton kernel {kernel} {what} {int((~ok).sum())} element(s) out of bounds, "
                                    f"the first at {where}")

    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, *rest, **kwargs):
        check("loads", ptrs, mask)
        return load(self, ptrs, mask, *rest, **kwargs)

    def checked_store(self, ptrs, value, mask, *rest, **kwargs):
        check("stores", ptrs, mask)
        return store(self, ptrs, value, mask, *rest, **kwargs)

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = checked_load, checked_store
    try:
        yield
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store


@contextlib.contextmanager
def unwrapped():
    """Re-raise an ``OutOfBoundsAccess`` that the interpreter wrapped in its ``InterpreterError``."""
    try:
        yield
    except Exception as error:  # noqa: BLE001  (only ours is unwrapped; anything else re-raises as it was)
        cause = error.__cause__
        if isinstance(cause, OutOfBoundsAccess) and not isinstance(error, OutOfBoundsAccess):
            raise cause from None
        raise
