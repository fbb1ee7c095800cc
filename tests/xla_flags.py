"""XLA:CPU flags that cut the suite's compile time, for the jaxlib versions known to accept them.

Most of the suite's CPU time is XLA:CPU compiling tiny programs: every eager ``jnp`` call of a reference twin or a
test helper is one compile. jaxlib 0.10's new fusion emitters spend about twice the CPU of the older emitters on
such a program (``tests/test_routing_options.py``: 82 s of CPU with them, 49 s without, same results). jaxlib 0.11
removed the flag, and XLA aborts the process on an unknown flag in ``XLA_FLAGS``, so it is only set where it is
known to exist. Imports no JAX: ``XLA_FLAGS`` must be set before the backend starts.
"""

from importlib import metadata

# (first jaxlib (major, minor) without the flag, the flag): checked on jaxlib 0.10.2 (has it) and 0.11.2 (aborts)
_UNTIL = ((0, 11), "--xla_cpu_use_fusion_emitters=false")


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def xla_cpu_compile_time_flags(version: tuple[int, int] | None = None) -> str:
    """`` --flag`` (leading space) for ``version`` (default: the installed jaxlib), or ``""``."""
    version = _jaxlib_version() if version is None else version
    first_without, flag = _UNTIL
    return f" {flag}" if version is not None and version < first_without else ""
