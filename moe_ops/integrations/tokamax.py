"""An implementation for ``tokamax.ragged_dot`` / ``ragged_dot_general``'s ``implementation=`` argument.

``tokamax.ragged_dot(lhs, rhs, group_sizes, implementation=[moe_ops.integrations.tokamax.ragged_dot, "xla"])`` runs
this package's grouped matmuls (and their custom VJPs) for the ragged dot. tokamax calls each entry of the sequence
as ``impl(lhs, rhs, *, group_sizes, ragged_dot_dimension_numbers, precision, preferred_element_type, activation)``
(``ragged_dot_dimension_numbers=None``: ``lax.ragged_dot``'s, as a tokamax ``RaggedDot`` op takes it) and moves on
to the next entry when one raises ``NotImplementedError``; this one raises it for quantized operands (qwix
``QArray``), so a tokamax implementation that handles them can follow it in the list.

``group_sizes`` may be a tokamax ``GroupSizes`` (its ``value`` is used). ``activation`` is applied to the output
after the cast to the output dtype, as tokamax's own ``"xla"`` implementation does. Every ragged mode of
``moe_ops.ragged_dot_general`` is available. Tested with tokamax 0.0.12 on jax 0.10.2 (the ``tokamax`` extra).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe_ops.ragged import BASIC_DIMENSION_NUMBERS, ragged_dot_general

__all__ = ["MoeOpsRaggedDot", "ragged_dot"]


@dataclasses.dataclass(frozen=True)
class MoeOpsRaggedDot:
    """A tokamax ragged-dot implementation backed by ``moe_ops``; ``implementation`` picks the backend as for
    ``moe_ops.gmm`` (None: Triton on GPU, Pallas on TPU, XLA elsewhere)."""

    implementation: str | None = None

    def __call__(self, lhs, rhs, *, group_sizes, ragged_dot_dimension_numbers=None, precision=None,
                 preferred_element_type=None, activation=None, **unsupported):
        if unsupported:
            raise NotImplementedError(f"moe_ops ragged_dot does not take {sorted(unsupported)}")
        for name, x in (("lhs", lhs), ("rhs", rhs)):
            if not isinstance(x, (jax.Array, np.ndarray)):
                raise NotImplementedError(f"moe_ops ragged_dot takes plain arrays, got {name} of type "
                                          f"{type(x).__name__} (quantized operands: list a tokamax implementation "
                                          "after this one)")
        sizes = getattr(group_sizes, "value", group_sizes)
        if not isinstance(sizes, (jax.Array, np.ndarray)):
            sizes = jnp.asarray(sizes)  # NumPy sizes stay NumPy: int64 ones are clipped on the host, never wrapped
        dims = BASIC_DIMENSION_NUMBERS if ragged_dot_dimension_numbers is None else ragged_dot_dimension_numbers
        out = ragged_dot_general(jnp.asarray(lhs), jnp.asarray(rhs), sizes, dims,
                                 precision=precision, preferred_element_type=preferred_element_type,
                                 implementation=self.implementation)
        return out if activation is None else activation(out)


ragged_dot = MoeOpsRaggedDot()
