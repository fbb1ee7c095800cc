"""Keep a long test worker under Linux's limit on memory mappings (imported into ``tests/conftest.py``).

Why: every XLA:CPU executable JAX keeps in its compilation caches holds its own memory mappings (about 70 per test
here), and a process may own at most ``vm.max_map_count`` of them (65530 by default). A pytest-xdist worker that runs
about 900 tests reaches the limit late in the suite; the next compile's ``mmap`` then fails inside XLA / LLVM, which
segfaults or aborts in ``backend_compile_and_load``. (Shown on this machine: with ``vm.max_map_count`` lowered to
7000, ``test_partitioned.py`` followed by ``test_pallas_swiglu_bwd.py`` in one process segfaults there, exactly as
the suite's crashes did; ``jax.clear_caches()`` brought 6567 mappings back to 681.)

After each test, when the process holds more than ``FRACTION`` of the limit, JAX's caches are cleared (their
executables are then freed, and later tests compile again). Off Linux (no ``/proc``) nothing happens.
"""

from __future__ import annotations

import gc

FRACTION = 0.5
_LIMIT = "/proc/sys/vm/max_map_count"


def map_count() -> int | None:
    """Memory mappings this process holds, or None where ``/proc`` does not say."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return None


def map_limit() -> int | None:
    try:
        with open(_LIMIT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def release_if_needed(count=map_count, limit=map_limit) -> bool:
    """Clear JAX's caches when the mappings exceed ``FRACTION`` of the limit; whether it did."""
    held, most = count(), limit()
    if held is None or most is None or held <= FRACTION * most:
        return False
    import jax  # noqa: PLC0415
    jax.clear_caches()
    gc.collect()
    return True


def pytest_runtest_teardown(item, nextitem):
    del item, nextitem
    release_if_needed()
