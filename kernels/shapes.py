"""Static sizes for kernels whose grids and constexprs must be concrete when a dimension is symbolic
(``jax.export`` shape polymorphism): the upper bound that the symbolic shape's constraints give."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core

__all__ = ["static_upper_bound", "pad_rows", "dim_value", "require_static"]


def dim_value(n):
    """A (possibly symbolic) dimension as a value usable in jnp ops."""
    return jax_core.dimension_as_value(n)


def pad_rows(a, size: int, base=None):
    """a [n, ...] -> [size, ...] (``size`` the static bound of a symbolic ``n``), rows ``>= n`` from ``base``
    (default zeros); ``a`` itself when ``n`` is static."""
    if isinstance(a.shape[0], int):
        return a
    base = jnp.zeros((size,) + a.shape[1:], a.dtype) if base is None else base.astype(a.dtype)
    return jax.lax.dynamic_update_slice(base, a, (0,) * a.ndim)


def static_upper_bound(value, what: str) -> int:
    """``value`` itself when static; for a symbolic dimension expression (``jax.export``) its upper bound from the
    symbolic shape's constraints. Raises ``ValueError`` naming ``what`` when it is unbounded."""
    if isinstance(value, int):
        return value
    from jax._src.export import shape_poly  # the bound of a symbolic expression has no public API in jax 0.10
    _, upper = shape_poly._bounds_decision(value, shape_poly.BoundsPrecision.BEST)
    if upper == float("inf"):
        raise ValueError(f"{what} = {value} is symbolic and unbounded; the kernels launch a static grid sized "
                         "by its upper bound: export with a bounded row count, e.g. "
                         "jax.export.symbolic_shape('m', constraints=('m <= 65536',))")
    return int(upper)


def require_static(what: str, *dims, error=ValueError, kernels="the Pallas kernels") -> None:
    """Raise ``error`` naming ``what`` when any of ``dims`` is symbolic: ``kernels`` tile these dimensions
    statically (only a row count may be symbolic, run at its bound)."""
    symbolic = [d for d in dims if not isinstance(d, int)]
    if symbolic:
        raise error(f"{what} = {symbolic[0]} is symbolic; {kernels} tile it statically, so only the row count may "
                    "be symbolic (with a bound): export with static K and N (and D, every feature width)")
