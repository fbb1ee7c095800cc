"""``tests/map_budget.py``: JAX's caches are cleared when the process nears ``vm.max_map_count``, and only then."""

import jax
import jax.numpy as jnp
import pytest

from tests import map_budget


def test_caches_cleared_only_past_the_budget(monkeypatch):
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(True))
    assert not map_budget.release_if_needed(count=lambda: 30000, limit=lambda: 65530)
    assert not map_budget.release_if_needed(count=lambda: None, limit=lambda: 65530)  # no /proc
    assert not map_budget.release_if_needed(count=lambda: 40000, limit=lambda: None)
    assert not cleared
    assert map_budget.release_if_needed(count=lambda: 40000, limit=lambda: 65530)
    assert cleared == [True]


def test_clearing_releases_the_mappings_of_compiled_programs():
    """The mechanism the budget relies on: compiled executables hold mappings, and clearing JAX's caches frees them."""
    before = map_budget.map_count()
    if before is None:
        pytest.skip("no /proc/self/maps (not Linux): the budget is off there")
    for n in range(1, 41):  # 40 distinct programs, each compiled and cached
        jax.jit(lambda x, n=n: x * n + 1)(jnp.ones((n,))).block_until_ready()
    grown = map_budget.map_count()
    jax.clear_caches()
    map_budget.gc.collect()
    assert grown > before and map_budget.map_count() < grown, (before, grown, map_budget.map_count())
