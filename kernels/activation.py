"""The gated activations of the SwiGLU family as one frozen, hashable spec (a static argument of every kernel).

``h = act(g) * (u + up_offset)`` in f32, from the f32 projections ``gate`` / ``up``, where

1. ``g = min(gate, limit)`` and ``u = clip(up, -limit, limit)`` when ``limit`` is set (GPT-OSS, DeepSeek-V4's
   clamped SwiGLU); otherwise ``g = gate``, ``u = up``.
2. ``act`` is ``silu``: ``g * sigmoid(alpha * g)`` (``alpha = 1``: ``jax.nn.silu``; GPT-OSS: 1.702), ``gelu``:
   ``jax.nn.gelu``'s tanh form, or ``relu``. ``alpha`` other than 1 is for ``silu`` only.
3. Gradients: a clamped input gets zero gradient at and beyond its bound (``jnp.clip``'s autodiff gives half at
   the bound itself, ``torch.clamp`` all of it: a measure-zero difference); NaN passes through the clamps. The
   clamps are idempotent, so a backward reads the same masks from raw or clamped projections (Triton's saved-mode
   forward stores the clamped ones).

The math lives with each kernel family (Triton, Pallas) and, written independently, in ``moe_ops.reference``;
this module only names and checks the spec.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["GatedActivation", "GPT_OSS", "NAMES", "resolve"]

NAMES = ("gelu", "relu", "silu")


def _finite(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            positive and value <= 0):
        kind = "a finite float > 0" if positive else "a finite float"
        raise ValueError(f"GatedActivation.{name} must be {kind}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class GatedActivation:
    """``act(min(gate, limit)) * (clip(up, -limit, limit) + up_offset)`` (module doc); ``limit`` None: no clamp."""
    name: str = "silu"
    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in NAMES:
            raise ValueError(f"GatedActivation.name must be one of {list(NAMES)}, got {self.name!r}")
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "alpha", _finite("alpha", self.alpha, positive=True))
        if self.alpha != 1.0 and self.name != "silu":
            raise ValueError(f"GatedActivation.alpha scales silu's sigmoid only; {self.name} needs alpha=1.0, "
                             f"got {self.alpha!r}")
        if self.limit is not None:
            object.__setattr__(self, "limit", _finite("limit", self.limit, positive=True))
        object.__setattr__(self, "up_offset", _finite("up_offset", self.up_offset))

    @property
    def plain(self) -> bool:
        """Whether this is just ``act(gate) * up`` (no alpha, clamp or offset)."""
        return self.alpha == 1.0 and self.limit is None and self.up_offset == 0.0


GPT_OSS = GatedActivation("silu", alpha=1.702, limit=7.0, up_offset=1.0)   # gpt-oss's experts (and MaxText's)


def resolve(activation) -> GatedActivation:
    """``activation`` as a spec: a name in ``NAMES`` (a plain activation) or a ``GatedActivation``."""
    if isinstance(activation, GatedActivation):
        return activation
    if isinstance(activation, str) and activation in NAMES:
        return GatedActivation(str(activation))
    raise ValueError(f"activation must be one of {list(NAMES)} or a moe_ops.GatedActivation, got {activation!r}")
