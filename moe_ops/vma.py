"""Manual-axis variance ("vma") alignment for the custom-VJP ops inside ``shard_map`` (``check_vma=True``).

A custom VJP must return cotangents typed like its inputs. When one input varies over a manual mesh axis (a token
shard) and another does not (replicated weights), the weight cotangent computed from varying data varies too and
JAX rejects it. Casting every float input to the union of their varying axes first fixes this at the op boundary:
the transpose of that cast is the ``psum`` that the gradient of a replicated input needs. No-op outside shard_map.
"""

from __future__ import annotations

import jax

from kernels.platform import varying_axes

__all__ = ["varying_axes", "match_vma", "like", "like_all"]


def match_vma(*arrays):
    """Cast every array to vary over the union of the arrays' varying manual axes."""
    union = frozenset().union(*(varying_axes(a) for a in arrays))
    return tuple(jax.lax.pcast(a, tuple(sorted(union - varying_axes(a))), to="varying")
                 if union - varying_axes(a) else a for a in arrays)


def like(out, ref):
    """``out`` cast to vary over ``ref``'s varying axes too. Kernel calls (``triton_call``, ``pure_callback``) drop
    the vma of their operands; re-attach it so results and cotangents are typed like the values they derive from."""
    return like_all(out, (ref,))


def like_all(outs, refs):
    """Every array of the pytree ``outs`` cast to vary over the union of the varying axes of ``refs`` (a sequence;
    ``None`` entries skipped): ``like`` for a kernel call's results typed like all its operands."""
    union = frozenset().union(*(varying_axes(r) for r in refs if r is not None))

    def cast(out):
        missing = union - varying_axes(out)
        return jax.lax.pcast(out, tuple(sorted(missing)), to="varying") if missing else out
    return jax.tree.map(cast, outs) if union else outs
