"""Registry of Triton kernels for the ahead-of-time (AOT) compile check.

Each kernel module registers a function ``cases(target) -> Iterable[AotCase]`` that lists one entry per kernel x
shipped tuning config x dtype for that target. ``kernels.aot`` compiles them all for real GPU targets on a machine
without a GPU; that is how NVIDIA Hopper and AMD gfx950 support is proven in CI.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

# Target names accepted everywhere (CLI, tests, tuning tables) -> (backend, arch, warp size).
TARGETS = {
    "sm90": ("cuda", 90, 32),
    "gfx950": ("hip", "gfx950", 64),
    "gfx942": ("hip", "gfx942", 64),
}


@dataclasses.dataclass(frozen=True)
class AotCase:
    """One compile: ``kernel`` with a full ``signature`` (arg name -> Triton type, e.g. ``"*bf16"``, ``"i32"``,
    ``"constexpr"``), the ``constexprs`` values and compiler ``options`` (num_warps, num_stages, waves_per_eu...)."""

    kernel_name: str
    config_name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any]


_REGISTRY: dict[str, Callable[[str], Iterable[AotCase]]] = {}


def register_aot(family: str):
    """Decorator: register ``cases(target)`` under ``family`` (e.g. ``"gmm"``)."""
    def wrap(cases_fn):
        _REGISTRY[family] = cases_fn
        return cases_fn
    return wrap


def registered_families() -> list[str]:
    import kernels.triton.gmm, kernels.triton.gmm_tma, kernels.triton.sort, kernels.triton.swiglu  # noqa: F401
    return sorted(_REGISTRY)


def cases_for(target: str, families: Iterable[str] | None = None) -> list[AotCase]:
    registered = registered_families()  # imports every family module, so a named family is registered too
    names = registered if families is None else list(families)
    return [case for name in names for case in _REGISTRY[name](target)]
