"""XLA:CPU flags that cut the suite's compile time, for the jaxlib versions known to accept them.

Most of the suite's CPU time is XLA:CPU compiling tiny programs: every eager ``jnp`` call of a reference twin or a
test helper is one compile. jaxlib 0.10's new fusion emitters spend about twice the CPU of the older emitters on
such a program (``tests/test_routing_options.py``: 82 s of CPU with them, 49 s without, same results). jaxlib 0.11
removed the flag, and XLA aborts the process on an unknown flag in ``XLA_FLAGS``, so it is only set where it is
known to exist. Imports no JAX: ``XLA_FLAGS`` must be set before the backend starts.
"""

from importlib import metadata

_FLAG = "--xla_cpu_use_fusion_emitters=false"
_FIRST_JAXLIB_WITHOUT = (0, 11)  # checked: jaxlib 0.10.2 accepts the flag, 0.11.2 aborts on it


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def xla_cpu_compile_time_flags(version: tuple[int, int] | None = None) -> str:
    """`` --flag`` (leading space) for ``version`` (default: the installed jaxlib), or ``""``."""
    version = _jaxlib_version() if version is None else version
    return f" {_FLAG}" if version is not None and version < _FIRST_JAXLIB_WITHOUT else ""
