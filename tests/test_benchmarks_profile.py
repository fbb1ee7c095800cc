"""``benchmarks.profile`` without a GPU: the raw-page parser on an ncu-shaped CSV, and the whole parent / child
plumbing through a stand-in ``ncu`` that runs the child (the real target, tiny, on the CPU) and then serves a canned
report: the metrics run, the fallback to sections, an unavailable peer, no ncu at all."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import pytest

from benchmarks import profile

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum",'
          '"lts__t_sector_hit_rate.pct","launch__registers_per_thread",'
          '"sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",'
          '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"')
UNITS = '"","","","","","","","","","","","byte","byte","nsecond","%","register/thread","%","ratio","ratio","ratio"'
ROWS = ['"0","11","python3","h","row_tiles_fusion","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","4,096","512",'
        '"2,016","12.5","32","0","0.10","1.50","0.25"',
        '"1","11","python3","h","_gmm_kernel","1","7","(256, 1, 1)","(1536, 1, 1)","0","9.0","1,234,567,890",'
        '"100,663,296","404,321","61.5","168","72.25","0.75","3.20","1.10"']
RAW = "\n".join(["==PROF== Disconnected from process 11", HEADER, UNITS, *ROWS])


def test_raw_page_is_parsed_per_kernel():
    kernels = [profile.summarise(k) for k in profile.parse_raw(RAW)]
    assert [k["kernel"] for k in kernels] == ["row_tiles_fusion", "_gmm_kernel"]
    gmm = kernels[1]
    assert gmm["time_us"] == pytest.approx(404.321)
    assert gmm["dram_read_mb"] == pytest.approx(1234.56789)
    assert gmm["dram_write_mb"] == pytest.approx(100.663296)
    assert gmm["l2_hit_pct"] == 61.5 and gmm["registers"] == 168 and gmm["tensor_pct"] == 72.25
    assert gmm["stalls"] == [["long_scoreboard", 3.2], ["wait", 1.1], ["barrier", 0.75]]
    assert gmm["sm_pct"] is None and gmm["smem_kb"] is None  # not in this report: None, never a made-up figure
    assert profile.parse_raw("==PROF== nothing profiled") == []


def test_compulsory_bytes_count_each_operand_once():
    shape = profile.shapes.GMM_SHAPES["qwen3-30b-w1"]
    need = profile.compulsory_mb(shape, 2)
    assert need["read"] == pytest.approx((65536 * 2048 + 128 * 2048 * 768) * 2 / 1e6)
    assert need["write"] == pytest.approx(65536 * 768 * 2 / 1e6)


def _fake_ncu(tmp_path, *, reject_metrics: bool):
    """An executable standing in for ncu: runs the application (from ``sys.executable`` on), writes the report
    file, and prints ``RAW`` on ``--import``; rejects ``--metrics`` when asked (as an ncu without one would)."""
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "fake_ncu.py"
    script.write_text(textwrap.dedent(f"""
        import json, subprocess, sys
        argv = sys.argv[1:]
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(argv) + "\\n")
        if "--import" in argv:
            print({RAW!r})
            sys.exit(0)
        if {reject_metrics!r} and "--metrics" in argv:
            print("==ERROR== Failed to find metric regex:sm__pipe_tensor_op_", file=sys.stderr)
            sys.exit(1)
        app = argv[argv.index({sys.executable!r}):]
        rc = subprocess.run(app).returncode
        open(argv[argv.index("--export") + 1] + ".ncu-rep", "w").close()
        sys.exit(rc)
    """))
    wrapper = tmp_path / "ncu"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper, log


@pytest.mark.parametrize("reject_metrics", [False, True])
def test_parent_runs_each_target_under_ncu(tmp_path, monkeypatch, capsys, reject_metrics):
    ncu, log = _fake_ncu(tmp_path, reject_metrics=reject_metrics)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "profile.json"
    rc = profile.main(["--tiny", "--targets", "gmm,torch._grouped_mm", "--ncu", str(ncu), "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    ours, peer = doc["results"]
    assert ours["status"] == "ok" and ours["counters"] == ("sections" if reject_metrics else "metrics")
    assert [k["kernel"] for k in ours["kernels"]] == ["row_tiles_fusion", "_gmm_kernel"]
    assert peer["status"] == "unavailable" and "CUDA" in peer["reason"]  # this CPU torch has none
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    profiled = [c for c in calls if "--import" not in c]
    assert all(c[c.index("--profile-from-start") + 1] == "off" and "--clock-control" in c for c in profiled)
    assert any("--section" in c for c in profiled) == reject_metrics
    assert "_gmm_kernel" in capsys.readouterr().out


def test_without_ncu_every_target_is_unavailable(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile.main(["--tiny", "--targets", "gmm,tgmm", "--ncu", "no-such-ncu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["status"] for r in results] == ["unavailable"] * 2
    assert "not on the PATH" in results[0]["reason"]
    with pytest.raises(SystemExit):
        profile.main(["--tiny", "--targets", "gmm,nope"])
