"""What a first run of ``python -m benchmarks`` shows: the JSON and PNG written by default (and where), the closing
``PASS: N/N implementations match <reference> ...`` / ``FAIL: ...`` line with its exit status, a parity column that
names the reference and tolerance, ``n/a (emulated)`` instead of ratios for emulated rows, and a plot whose legend
holds only bars that exist and whose skew points carry their pattern names.

The end-to-end runs use the ``layer`` suite at one tiny shape on XLA (the same ``moe_ffn`` vs ``moe_ffn_dense``
check as the main job, without its small shape); table / plot details are checked on synthetic records.
"""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import __main__ as bench
from benchmarks import layer, records, report, timing

ONE_LAYER = ["layer", "--tiny", "--impl", "xla", "--shapes", "mixtral", "--patterns", "balanced",
             "--repeats", "1", "--warmup", "0", "--no-progress"]
PASS_LINE = re.compile(r"^PASS: 1/1 implementations match moe_ffn_dense \(max rel err \d\.\d\de-\d\d, tol 0\.0001\)$")


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_default_outputs_and_pass_line(tmp_path, capsys):
    rc = bench.main(ONE_LAYER)
    out = capsys.readouterr().out
    assert rc == 0, out
    written = sorted(p.name for p in (tmp_path / "bench_out").iterdir())
    assert len(written) == 2 and re.fullmatch(r"\d{8}T\d{6}Z\.json", written[0]), written
    assert written[1] == written[0].replace(".json", ".png")
    assert f"JSON: bench_out/{written[0]}" in out and f"plot: bench_out/{written[1]}" in out
    assert json.loads((tmp_path / "bench_out" / written[0]).read_text())["records"]
    assert PASS_LINE.match(out.strip().splitlines()[-1]), out.strip().splitlines()[-1]
    assert "parity: max rel err vs reference (tol)" in out and "ok (tol 0.0001, moe_ffn_dense)" in out


def test_json_and_plot_overrides(tmp_path, capsys):
    rc = bench.main(ONE_LAYER + ["--json", "a/x.json", "--plot", "b/y.png"])
    assert rc == 0
    assert (tmp_path / "a" / "x.json").exists() and (tmp_path / "b" / "y.png").exists()
    assert not (tmp_path / "bench_out").exists()


def test_tolerance_failure_prints_fail_and_exits_1(monkeypatch, capsys):
    """The same run against an impossible tolerance: every row fails parity -> FAIL line, exit status 1."""
    monkeypatch.setitem(layer.TOL, "float32", 1e-30)
    rc = bench.main(ONE_LAYER)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 1
    assert re.match(r"^FAIL: 0/1 implementations match moe_ffn_dense; xla: max rel err \S+ > tol 1e-30 on layer "
                    r"moe_ffn fwd mixtral-tiny and 1 more rows$", last), last


@pytest.fixture()
def fresh_layer_jits():
    """The layer suite caches its jitted and compiled functions: retrace around a monkeypatched backend."""
    layer.clear_caches()
    yield
    layer.clear_caches()


def test_wrong_implementation_is_named_in_fail_line(monkeypatch, capsys, fresh_layer_jits):
    from moe_ops import xla
    right = xla.gmm
    monkeypatch.setattr(xla, "gmm", lambda *a, **kw: right(*a, **kw) * 1.01)
    rc = bench.main(ONE_LAYER)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("FAIL: 0/1 implementations match moe_ffn_dense; xla: max rel err"), last


def _rec(impl, pattern="balanced", skew=1.0, ms=1.0, emulated=None, ok=True):
    par = timing.Parity({"out": 1e-7 if ok else 1.0}, "reference.moe_ffn_dense", 1e-4)
    r = records.record(suite="main", op="moe_ffn", pass_="fwd", implementation=impl, kind="moe_ops",
                       shape={"name": "tiny"}, dtype="float32", pattern={"name": pattern.split(":")[0],
                                                                         "label": pattern},
                       emulated=emulated, timing=timing.Timing(ms / 1e3, (ms / 1e3,), 0, 1, 1), parity=par,
                       flops=1e6, routing={"max_over_mean": skew}, extra={"ceiling_basis": "matmul"})
    return r


def _synthetic():
    recs = [_rec("xla", ms=1.0), _rec("xla", "hot:1:4", 4.0, 1.5), _rec("xla", "zipf:1.2", 2.5, 1.2),
            _rec("pallas", ms=0.5, emulated="interpret mode"), _rec("triton", ms=300.0, emulated="interpreter")]
    records.add_ratios(recs, {"matmul_tflops": 0.1, "copy_gbps": 5.0})
    return recs


def test_emulated_rows_show_na_not_ratios():
    recs = _synthetic()
    lines = report.table(recs).splitlines()
    emulated = [ln for ln in lines if "(emulated)" in ln]
    assert len(emulated) == 2 and all(ln.count("n/a (emulated)") == 2 for ln in emulated)  # % ceil and ratios
    assert not any("0.00x" in ln or " 0.0 " in ln for ln in lines), lines
    xla = [r for r in recs if r["implementation"] == "xla"]
    assert all(r["ratio_to"] == {} and r["pct_of_ceiling"] > 0 for r in xla)  # never compared to an emulator
    assert all(r["pct_of_ceiling"] is None and r["ratio_to"] == {} for r in recs if r["emulated"])


def test_verdict_counts_implementations():
    ok, line = report.verdict(_synthetic())
    assert ok and line.startswith("PASS: 3/3 implementations match moe_ffn_dense (max rel err 1.00e-07, tol 0.0001)")
    recs = _synthetic() + [_rec("pallas", ok=False, emulated="interpret mode")]
    ok, line = report.verdict(recs)
    assert not ok and line.startswith("FAIL: 2/3 implementations match moe_ffn_dense; pallas (emulated): max rel err")
    assert report.verdict([])[0] is False


def test_plot_legend_and_skew_labels():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = _synthetic() + [records.record(suite="main", op="moe_ffn", pass_="fwd", implementation="triton",
                                          kind="moe_ops", shape={"name": "small"}, dtype="float32",
                                          status="unavailable", reason="no GPU")]
    fig, (ax1, ax2) = plt.subplots(1, 2)
    ok = [r for r in recs if r["status"] == "ok"]
    report._bars(ax1, ok)
    report._skew_lines(ax2, ok)
    assert [t.get_text() for t in ax1.get_legend().get_texts()] == ["xla"]  # no entry for bars that do not exist
    assert len(ax1.patches) == 1
    assert "emulated" in ax1.get_title() and "pallas" in ax1.get_title()
    assert sorted(t.get_text() for t in ax2.texts) == ["balanced", "hot:1:4", "zipf:1.2"]
    plt.close(fig)
