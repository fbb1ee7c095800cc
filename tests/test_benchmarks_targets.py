"""The issues' targets judged from one run's records (``benchmarks.targets``), and a run stopped by SIGTERM still
reporting its finished cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from benchmarks import records, report, targets, timing
from tests.test_benchmarks import QUICK, STATUSES


def test_peak_vs_unfused_and_targets():
    """Fused rows get peak / temp ratios to their unfused twin, variant and peer rows are in each other's
    ``ratio_to``, and the issue-12 targets are judged from them."""
    def rec(op, impl, ms, peak, temp, kind="moe_ops", emulated=None):
        return records.record(suite="layer", op=op, pass_="fwd+bwd", implementation=impl, kind=kind,
                              shape={"name": "s"}, dtype="bfloat16", pattern={"name": "balanced", "label": "balanced"},
                              timing=timing.Timing(ms / 1e3, (ms / 1e3,), 0, 1, 1), flops=1e9, emulated=emulated,
                              memory={"peak_bytes": peak, "temp_bytes": temp}, extra={"ceiling_basis": "matmul"})
    recs = [rec("moe_ffn", "triton", 1.0, 60, 20), rec("moe_ffn:fused-no-swiglu", "triton", 1.1, 80, 40),
            rec("moe_ffn:unfused", "triton", 1.25, 100, 50),
            rec("moe_ffn", "lax.ragged_dot+argsort", 3.0, 300, 200, "peer"),
            rec("moe_ffn", "tokamax:mosaic+argsort", 1.8, 120, 60, "peer")]
    emu = [rec("moe_ffn", "pallas", 50.0, 90, 30, emulated="interpret"),
           rec("moe_ffn:unfused", "pallas", 40.0, 100, 60, emulated="interpret")]
    records.add_ratios(recs + emu, {"matmul_tflops": 1.0})
    assert emu[0]["ratio_to"] == {} and emu[0]["peak_vs_unfused"] == pytest.approx(0.9)  # memory, not speed
    assert emu[0]["temp_vs_unfused"] == pytest.approx(0.5) and "pallas" not in recs[0]["ratio_to"]
    fused = recs[0]
    assert fused["ratio_to"] == pytest.approx({"triton:fused-no-swiglu": 1.1, "triton:unfused": 1.25,
                                               "lax.ragged_dot+argsort": 3.0, "tokamax:mosaic+argsort": 1.8})
    assert fused["peak_vs_unfused"] == pytest.approx(0.6) and fused["temp_vs_unfused"] == pytest.approx(0.4)
    assert recs[1]["peak_vs_unfused"] == pytest.approx(0.8)
    assert all(r["peak_vs_unfused"] is None for r in recs[2:])
    assert recs[3]["ratio_to"]["triton"] == pytest.approx(1 / 3)
    fused["memory"].update(argument_bytes=30, output_bytes=12, alias_bytes=0)  # the unfused peak is 100
    (t,) = targets.layer_targets(recs)
    assert t["peak_floor_vs_unfused"] == pytest.approx(0.42) and "arguments + outputs alone 0.42" in \
        report.targets_table([t])
    assert t["best_composition"] == "tokamax:mosaic+argsort" and t["vs_best_composition"] == pytest.approx(1.8)
    assert t["met"] == {"vs_best_composition": False, "vs_unfused": True, "peak_vs_unfused": True}
    assert "vs best composition (tokamax:mosaic+argsort) 1.80x [NOT met]" in report.targets_table([t])


def test_gmm_targets_judge_sync_and_pipelined_figures():
    """Issue 11's targets from one run's records: geomeans over the training shapes vs torch._grouped_mm, Mixtral's
    % of the dense ceiling, Qwen3's TFLOP/s, the skew slowdown and decode's % of the copy rate, each judged on the
    synchronised and the back-to-back times (the ceilings' back-to-back times included)."""
    def rec(name, pass_, impl, ms, piped, pattern="balanced", kind="moe_ops", basis="matmul", flops=1e12,
            nbytes=None, suite="gmm", op="gmm"):
        label = {"name": "balanced", "label": "balanced"} if pattern == "balanced" else \
            {"name": "hot", "label": pattern, "W": 1, "f": 4.0}
        return records.record(suite=suite, op=op, pass_=pass_, implementation=impl, kind=kind,
                              shape={"name": name}, dtype="bfloat16", pattern=label if suite == "gmm" else None,
                              timing=timing.Timing(ms / 1e3, (ms / 1e3,), 0, 1, 1, piped / 1e3), flops=flops,
                              bytes_moved=nbytes, extra={"ceiling_basis": basis})
    ceil = [rec("8192^3", "fwd", "torch.mm", 1.0, 0.8, suite="ceiling", op="dense_matmul", kind="ceiling"),
            rec("1GiB", "fwd", "xla:elementwise", 1.0, 0.5, suite="ceiling", op="copy", kind="ceiling",
                basis="copy", flops=None, nbytes=2e9)]
    recs = ceil + [
        rec("mixtral-w1", "fwd", "triton", 1.1, 1.0),
        rec("mixtral-w1", "fwd", "torch._grouped_mm", 1.0, 1.0, kind="peer"),
        rec("qwen3-30b-w1", "fwd+bwd", "triton", 2.0, 1.6, flops=3e12),
        rec("qwen3-30b-w1", "fwd+bwd", "torch._grouped_mm", 1.8, 1.6, flops=3e12, kind="peer"),
        rec("qwen3-30b-w1", "fwd+bwd", "triton", 2.4, 1.7, pattern="hot:1:4", flops=3e12),
        rec("decode", "fwd", "triton", 1.0, 0.5, basis="copy", nbytes=1.8e9),
    ]
    records.add_ratios(recs, {"matmul_tflops": 1000.0, "copy_gbps": 2000.0})
    got = {t["target"]: t for t in targets.gmm_targets(recs)}
    fwd = got["fwd vs torch._grouped_mm (geomean)"]
    assert fwd["value"] == pytest.approx(1 / 1.1) and fwd["met"] is False and fwd["pipelined_met"] is True
    assert got["fwd+bwd vs torch._grouped_mm (geomean)"]["value"] == pytest.approx(0.9)
    mix = got["Mixtral fwd % of dense ceiling (worst)"]  # 909 of 1000 TFLOP/s; back-to-back 1000 of 1250
    assert mix["value"] == pytest.approx(100 / 1.1) and mix["met"] and mix["pipelined"] == pytest.approx(80.0)
    qwen = got["Qwen3-30B fwd+bwd TFLOP/s"]
    assert qwen["value"] == pytest.approx(1500) and qwen["pipelined"] == pytest.approx(1875)
    skew = got["4x skew (hot:1:4) slowdown vs balanced (worst)"]
    assert skew["value"] == pytest.approx(1.2) and skew["met"] is False
    assert skew["pipelined"] == pytest.approx(1.7 / 1.6) and skew["pipelined_met"] is True
    dec = got["decode fwd % of copy rate"]  # 1800 of 2000 GB/s; back-to-back 3600 of 4000
    assert dec["value"] == pytest.approx(90.0) and dec["met"] and dec["pipelined"] == pytest.approx(90.0)
    text = report.targets_table(targets.judge(recs))
    assert "triton fwd vs torch._grouped_mm (geomean) >= 1: 0.909 [NOT met] / pipelined 1 [met]" in text
    assert "== layer targets" not in text


def test_sigterm_keeps_the_finished_cases(tmp_path):
    """``timeout`` (or a lease ending) sends SIGTERM: the run stops at the end of the case under way and still writes
    the table and the JSON of every finished case, marked interrupted, with exit status 1."""
    out = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "gmm", "--impl", "xla", "--json", str(out),
                             "--plot", str(tmp_path / "run.png"), *QUICK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    err = []
    for line in proc.stderr:  # the plain per-case lines of --no-progress
        err.append(line)
        if line.startswith("[gmm 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest_out, rest_err = proc.communicate(timeout=300)
    assert proc.returncode == 1, "".join(err) + rest_err
    assert "INTERRUPTED" in rest_err and "(INTERRUPTED: partial run)" in rest_out
    doc = json.loads(out.read_text())
    assert doc["interrupted"].startswith("Stopped")
    cases = {(r["shape"]["name"], r["pattern"]["label"]) for r in doc["records"] if r["suite"] == "gmm"}
    assert 1 <= len(cases) < 6  # the first case at least, not all six
    assert all(r["status"] in STATUSES | {"interrupted"} for r in doc["records"])
