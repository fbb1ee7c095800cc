"""The GPU config sweep (``benchmarks.tune``): its candidate grid, and one sweep step run through the Triton
interpreter on CPU (timings there mean nothing; the plumbing — parity against the shipped config, rows, errors — is
what is checked)."""

import dataclasses

import jax.numpy as jnp
import pytest

from benchmarks import shapes, tune
from kernels.triton import tuning


@pytest.mark.parametrize("name", ["qwen3-30b-w1", "decode", "mixtral-w1"])
@pytest.mark.parametrize("arch", ["sm90", "gfx950", "gfx942"])
def test_candidates_fit_and_start_with_shipped(name, arch):
    for problem in tune.problems(shapes.GMM_SHAPES[name], tune.KINDS):
        grid = tune.candidates(problem, arch)
        shipped = ([tune.picked(problem, jnp.bfloat16, arch)] if problem.kind.startswith("swiglu") else
                   list(tuning.shipped(arch, problem.table, jnp.bfloat16).values()))
        assert grid[:len(shipped)] == shipped and len(set(grid)) == len(grid)
        extra = grid[len(shipped):]
        assert (4 if arch == "sm90" else 0) <= len(extra) <= 60, (problem, len(extra))
        assert all(tune._smem_bytes(problem, c, 2) <= tune.SHARED_LIMIT[arch] for c in extra)
        assert all(c.num_stages == 2 for c in extra) or arch == "sm90"


def test_decode_candidates_keep_tiles_short():
    (gmm,) = tune.problems(shapes.GMM_SHAPES["decode"], ["gmm"])  # 8 rows per group
    extra = tune.candidates(gmm)[len(tuning.shipped("sm90", "gmm", jnp.bfloat16)):]
    assert {c.block_m for c in extra} == {16, 32, 64}
    thin = [c.block_m < 64 for c in extra]
    assert thin == sorted(thin, reverse=True) and all(c.group_m == 1 for c in extra)  # the thin tiles first
    (mixtral,) = tune.problems(shapes.GMM_SHAPES["mixtral-w1"], ["gmm"])
    assert min(c.block_m for c in tune.candidates(mixtral)[len(tuning.shipped("sm90", "gmm", jnp.bfloat16)):]) == 64


def test_problems_swap_dims_for_dlhs():
    fwd, dlhs, tg, gtg, sw, sw_bwd = tune.problems(shapes.GmmShape("s", 64, 32, 48, 4), tune.KINDS)
    assert (fwd.k, fwd.n, dlhs.k, dlhs.n, tg.k, tg.n, gtg.k, gtg.n, sw.k, sw.n, sw_bwd.k, sw_bwd.n) == (
        32, 48, 48, 32, 32, 48, 32, 48, 32, 48, 32, 48)
    assert (fwd.table, dlhs.table, tg.table, gtg.table, sw.table, sw_bwd.table) == (
        "gmm", "gmm", "tgmm", "tgmm", "gmm", "gmm")
    assert sw.flops == 2 * fwd.flops


@pytest.mark.parametrize("kind", tune.KINDS)
def test_sweep_step_through_interpreter(kind):
    problem = tune.Problem("tiny", kind, m=64, k=32, n=48, g=4)
    result = tune.sweep(problem, jnp.float32, arch="cpu", budget_s=0.0, repeats=1)
    timed = [r for r in result["rows"] if "ms" in r]
    assert len(timed) == 1 and timed[0]["tflops"] > 0 and timed[0]["fields"]["block_m"] >= 16
    assert all(r["error"] == "time budget spent" for r in result["rows"] if "ms" not in r)


def test_cli_list_runs_on_cpu_and_timing_refuses(capsys):
    assert tune.main(["--list", "--shapes", "decode", "--kinds", "gmm"]) == 0
    assert "decode gmm:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tune.main(["--shapes", "decode"])
    with pytest.raises(SystemExit):
        tune.main(["--list", "--kinds", "nope"])


def test_group_m_variants_of_the_picked_config_come_right_after_the_shipped():
    (gmm,) = tune.problems(shapes.GMM_SHAPES["qwen3-30b-w1"], ["gmm"])  # 512 rows per group
    shipped = len(tuning.shipped("sm90", "gmm", jnp.bfloat16))
    base = tune.picked(gmm, jnp.bfloat16, "sm90")
    others = [g for g in tune.GROUP_MS if g != base.group_m]
    variants = tune.candidates(gmm)[shipped:shipped + len(others)]
    assert [c.group_m for c in variants] == others
    assert all(dataclasses.replace(c, group_m=base.group_m) == base for c in variants)


def test_autotune_env_never_times_the_interpreter_for_an_export(monkeypatch, tmp_path):
    """MOE_OPS_AUTOTUNE=1 while lowering for cuda on a CPU host: the shipped sm90 table is used and nothing is
    cached (it used to autotune on interpreter timings and store the pick under "sm90" for real GPUs to read)."""
    from kernels.platform import _lowering_for
    cache = tmp_path / "cache.json"
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    monkeypatch.setenv("MOE_OPS_TUNING_CACHE", str(cache))
    monkeypatch.setattr(tuning, "_cache", None)
    with _lowering_for("cuda"):
        cfg = tuning.pick_config("gmm", 4096, 1024, 512, 8, jnp.bfloat16)
        with pytest.raises(RuntimeError, match="needs a GPU"):
            tuning.autotune("gmm", 4096, 1024, 512, 8, jnp.bfloat16)
    assert cfg == tuning.TABLES["sm90"]["gmm"][tuning.heuristic("gmm", 4096, 1024, 512, 8, jnp.bfloat16, "sm90")]
    assert not cache.exists()


def test_bad_arch_variable_and_bad_cache_file_are_named(monkeypatch, tmp_path):
    from kernels.platform import _lowering_for
    monkeypatch.setenv("MOE_OPS_CUDA_ARCH", "sm80")
    with _lowering_for("cuda"), pytest.raises(ValueError, match=r"MOE_OPS_CUDA_ARCH='sm80'.*\['sm90'\]"):
        tuning.detect_arch()
    monkeypatch.delenv("MOE_OPS_CUDA_ARCH")
    for text in ("[1, 2]", '{"sm90": {"b": {"no_such_field": 1}}}', "not json"):
        path = tmp_path / "cache.json"
        path.write_text(text)
        monkeypatch.setenv("MOE_OPS_TUNING_CACHE", str(path))
        monkeypatch.setattr(tuning, "_cache", None)
        with pytest.warns(UserWarning, match="ignoring the Triton tuning cache"):
            assert tuning._cache_lookup("sm90", "b") is None
