"""The benchmark harness in tiny mode: JSON schema, parity column, unavailable implementations reported, PNG written.

Runs ``benchmarks.__main__.main`` in-process on tiny shapes with the XLA backend (plus Pallas in interpret mode for
the emulated label) and one implementation made unavailable on purpose; a few unit checks of timing / routing.
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import __main__ as bench
from benchmarks import layer, records, report, routing, timing
from moe_ops import backend

RECORD_KEYS = {
    "schema_version", "suite", "op", "pass", "implementation", "requested", "kind", "emulated", "emulation",
    "status", "reason", "shape", "dtype", "pattern", "routing", "config", "time_ms", "samples_ms", "warmup",
    "repeats", "rotations", "flops", "tflops", "bytes", "gbps", "ceiling_basis", "pct_of_ceiling", "ceiling",
    "ratio_to", "slowdown_vs_balanced", "pipelined_slowdown_vs_balanced", "parity", "note", "device", "versions",
    "timestamp",
    "memory", "peak_vs_unfused", "temp_vs_unfused", "pipelined_ms", "pipelined_ratio_to",
}
MEMORY_KEYS = {"peak_bytes", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "source"}
DOC_KEYS = {"schema_version", "command", "started", "finished", "device", "versions", "routing_source", "ceilings",
            "implementations", "summary", "targets", "records"}
STATUSES = {"ok", "unavailable", "error", "oom", "parity_fail"}
QUICK = ["--repeats", "2", "--warmup", "1", "--no-progress"]


def _check_schema(doc):
    assert set(doc) == DOC_KEYS
    for key in ("jax", "jaxlib", "triton", "jax-triton", "torch"):
        assert key in doc["versions"]
    assert doc["device"]["backend"] == "cpu"
    assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_gbps"] > 0
    for rec in doc["records"]:
        assert set(rec) == RECORD_KEYS, set(rec) ^ RECORD_KEYS
        assert rec["status"] in STATUSES
        assert rec["pass"] in ("fwd", "fwd+bwd")
        if rec["status"] == "ok":
            assert rec["time_ms"] > 0 and len(rec["samples_ms"]) == rec["repeats"]
            assert rec["time_ms"] == pytest.approx(float(np.median(rec["samples_ms"])))
            assert rec["pipelined_ms"] > 0 and set(rec["pipelined_ratio_to"]) <= set(rec["ratio_to"])
            assert rec["tflops"] or rec["gbps"]
            if rec["suite"] in ("main", "layer"):  # every measured layer row carries its compiled memory
                mem = rec["memory"]
                assert set(mem) == MEMORY_KEYS and mem["peak_bytes"] > 0
                assert mem["peak_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
                                             - mem["alias_bytes"])
        else:
            assert rec["reason"], rec
            assert rec["time_ms"] is None and rec["pipelined_ms"] is None


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Runs without --json / --plot write their default bench_out/ here, not in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def triton_unavailable(monkeypatch):
    """Make the Triton backend fail to load, as a missing kernel module would."""
    monkeypatch.setitem(backend._MODULES, "triton", "kernels.no_such_backend_for_this_test")


def test_main_job_tiny(tmp_path, triton_unavailable, capsys):
    out_json, out_png = tmp_path / "main.json", tmp_path / "main.png"
    rc = bench.main(["main", "--impl", "xla,triton,pallas", "--patterns", "balanced,hot:1:4", *QUICK,
                     "--json", str(out_json), "--plot", str(out_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out_json.read_text())
    _check_schema(doc)
    main = [r for r in doc["records"] if r["suite"] == "main"]

    # the unavailable implementation is reported (rows + availability entry + printed reason), not skipped
    tri = [r for r in main if r["requested"] == "triton"]
    assert {r["pass"] for r in tri} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "unavailable" and "no_such_backend" in r["reason"] for r in tri)
    entry = [e for e in doc["implementations"] if e["requested"] == "triton"]
    assert entry and not entry[0]["available"]
    assert "UNAVAILABLE" in printed and "no_such_backend" in printed

    # XLA ran (named as such) at both shapes and every pattern, with a passing parity column on forward and grads
    xla = [r for r in main if r["implementation"] == "xla" and r["status"] == "ok"]
    assert {(r["shape"]["name"], r["pattern"]["label"], r["pass"]) for r in xla} == {
        (s, p, q) for s, p in (("small", "balanced"), ("small", "hot:1:4"), ("tiny", "balanced"))
        for q in ("fwd", "fwd+bwd")}
    for r in xla:
        par = r["parity"]
        assert par["ok"] and 0 <= par["max_rel_err"] <= par["tol"] and "moe_ffn_dense" in par["against"]
        names = set(par["errors"])
        assert names == ({"out"} if r["pass"] == "fwd" else {"dx", "dlogits", "dw_gate", "dw_up", "dw_down"})
    hot = [r for r in xla if r["pattern"]["label"] == "hot:1:4"]
    assert all(r["slowdown_vs_balanced"] > 0 and r["routing"]["max_over_mean"] == pytest.approx(4.0) for r in hot)
    assert all(r["pipelined_slowdown_vs_balanced"] > 0 for r in hot)

    # Pallas runs in interpret mode here: labelled emulated, tiny shape only
    pal = [r for r in main if r["requested"] == "pallas"]
    assert pal and all(r["emulated"] and "interpret" in r["emulation"] for r in pal)
    assert {r["shape"]["name"] for r in pal} == {"tiny"}
    assert "(emulated)" in printed and "parity" in printed

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not out_png.exists() and "plot not written" in printed
    else:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_gmm_and_sort_suites_tiny(tmp_path, capsys):
    out_json = tmp_path / "suites.json"
    rc = bench.main(["all", "--tiny", "--impl", "xla", "--shapes", "decode,dsv3", "--patterns", "balanced",
                     *QUICK, "--json", str(out_json)])
    assert rc == 0
    assert "suite layer: none of --shapes" in capsys.readouterr().err
    doc = json.loads(out_json.read_text())
    _check_schema(doc)
    gmm = [r for r in doc["records"] if r["suite"] == "gmm"]
    # peers that cannot run on CPU are reported with their reason; lax.ragged_dot runs and is compared
    by_impl = {r["implementation"]: r for r in gmm if r["pass"] == "fwd" and r["shape"]["name"] == "decode-tiny"}
    assert by_impl["torch._grouped_mm"]["status"] == "unavailable" and by_impl["torch._grouped_mm"]["reason"]
    assert by_impl["tokamax:mosaic"]["status"] == "unavailable"
    assert by_impl["lax.ragged_dot"]["status"] == "ok" and by_impl["lax.ragged_dot"]["parity"]["ok"]
    ours = by_impl["xla"]
    assert ours["parity"]["ok"] and "lax.ragged_dot" in ours["ratio_to"]
    assert ours["ceiling_basis"] == "copy" and ours["pct_of_ceiling"] > 0  # decode: judged against the copy rate
    summ = [s for s in doc["summary"] if (s["suite"], s["pass"], s["implementation"]) == ("gmm", "fwd", "xla")]
    assert summ and summ[0]["geomean_ratio_to"]["lax.ragged_dot"] == pytest.approx(ours["ratio_to"]["lax.ragged_dot"])
    sort = [r for r in doc["records"] if r["suite"] == "sort" and r["status"] == "ok"]
    assert {r["implementation"] for r in sort} == {"xla", "xla:argsort+take", "xla:scatter+einsum"}
    exact = [r for r in sort if r["op"] == "permute" and r["pass"] == "fwd"]
    assert exact and all(r["parity"]["tol"] == 0.0 and r["parity"]["max_rel_err"] == 0.0 for r in exact)
    assert not [r for r in doc["records"] if r["suite"] == "layer"]


LAYER_ONE = ["layer", "--tiny", "--impl", "xla", "--shapes", "qwen3-30b", "--patterns", "balanced", *QUICK]
COMPOSITIONS = {"lax.ragged_dot+argsort", "tokamax:xla+argsort"}


def _layer_run(tmp_path, argv):
    out_json = tmp_path / "layer.json"
    rc = bench.main(argv + ["--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    _check_schema(doc)
    return rc, doc, [r for r in doc["records"] if r["suite"] == "layer"]


@pytest.mark.slow
def test_layer_suite_compositions_tiny(tmp_path, monkeypatch, capsys):
    """The layer compositions run beside moe_ops on the same inputs, pass the same dense parity check (forward and
    the five gradients), take part in the ratios; a missing tokamax is an unavailable row with its reason."""
    from benchmarks import peers

    def no_tokamax():
        raise ModuleNotFoundError("No module named 'tokamax'", name="tokamax")
    monkeypatch.setattr(peers, "_import_tokamax", no_tokamax)
    rc, doc, recs = _layer_run(tmp_path, LAYER_ONE)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lax = [r for r in recs if r["implementation"] == "lax.ragged_dot+argsort"]
    assert {r["pass"] for r in lax} == {"fwd", "fwd+bwd"}
    for r in lax:
        assert r["kind"] == "peer" and r["requested"] == "lax.ragged_dot" and r["op"] == "moe_ffn"
        assert r["status"] == "ok" and r["parity"]["ok"] and "moe_ffn_dense" in r["parity"]["against"]
        assert set(r["parity"]["errors"]) == ({"out"} if r["pass"] == "fwd" else set(layer.GRAD_NAMES))
        assert "xla" in r["ratio_to"]
    tok = [r for r in recs if r["requested"] == "tokamax"]
    assert len(tok) == 2 and all(r["status"] == "unavailable" and "No module named 'tokamax'" in r["reason"]
                                 for r in tok)
    assert any("tokamax" in ln and "UNAVAILABLE" in ln and "No module named 'tokamax'" in ln
               for ln in printed.splitlines())
    entries = {e["requested"]: e for e in doc["implementations"] if e["suite"] == "layer"}
    assert entries["lax.ragged_dot"]["available"] and not entries["tokamax"]["available"]
    ours = [r for r in recs if r["implementation"] == "xla"]
    assert len(ours) == 2 and all(r["ratio_to"].keys() == {"lax.ragged_dot+argsort"} for r in ours)
    summ = {s["pass"]: s for s in doc["summary"] if s["suite"] == "layer"}
    assert set(summ["fwd+bwd"]["geomean_ratio_to"]) == {"lax.ragged_dot+argsort"}
    assert "peak MB" in printed and not doc["targets"]  # XLA's moe_ffn does not fuse: no fused-path targets


@pytest.mark.slow
def test_layer_tokamax_composition_and_memory_limit(tmp_path, monkeypatch):
    """With tokamax importable its composition runs (``tokamax:xla`` off a GPU) and passes parity; a program whose
    compiled peak exceeds the device limit is an ``oom`` row, not run (lax.ragged_dot's backward is a masked dense
    dot on XLA:CPU, G times the memory: about 0.9 MB, over the 512 KiB limit set here, while our rows fit)."""
    pytest.importorskip("tokamax")
    limit = 1 << 19
    monkeypatch.setattr(layer, "device_bytes_limit", lambda: limit)
    rc, _, recs = _layer_run(tmp_path, LAYER_ONE)
    assert rc == 0
    tok = [r for r in recs if r["implementation"] == "tokamax:xla+argsort" and r["pass"] == "fwd"]
    assert tok and tok[0]["status"] == "ok" and tok[0]["parity"]["ok"]
    for r in recs:
        assert r["memory"], r
        over = r["memory"]["peak_bytes"] > limit
        assert r["status"] == ("oom" if over else "ok"), r
        assert not over or ("not run" in r["reason"] and r["time_ms"] is None)
    assert any(r["status"] == "oom" and r["implementation"] in COMPOSITIONS and r["pass"] == "fwd+bwd"
               for r in recs)
    assert all(r["status"] == "ok" for r in recs if r["implementation"] == "xla")


def test_layer_pieces_agree_with_their_alternatives(tmp_path, monkeypatch, capsys):
    """``python -m benchmarks.pieces`` (tiny on CPU): every kernel of the fused layer runs, and each one-launch piece
    matches the composition it replaced (gather_tgmm vs gather + tgmm, scatter_gmm_sum vs two scatters); a
    disagreement is an error row and exit 1."""
    from benchmarks import pieces
    out = tmp_path / "pieces.json"
    assert pieces.main(["--dtype", "float32", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all("error" not in r and r["ms"] > 0 for r in rows)
    assert [r["tflops"] is None for r in rows] == [False] * 6 + [True] * 2  # the row-tile table rows: no flops
    pairs = [r for r in rows if r["alternative"]]
    assert len(pairs) == 3 and all(r["rel_err"] <= 1e-4 for r in pairs)
    assert "scatter_gmm_sum" in capsys.readouterr().out
    monkeypatch.setitem(pieces.TOL, "float32", -1.0)  # nothing can agree now
    assert pieces.main(["--dtype", "float32", "--repeats", "1", "--shapes", "mixtral"]) == 1
    assert capsys.readouterr().out.count("ERROR disagrees") == 3


def test_wrong_implementation_fails_the_run(tmp_path, monkeypatch, capsys):
    """A backend that gives a wrong answer is caught by the first-call check: parity_fail rows and exit status 1."""
    from moe_ops import xla
    right = xla.gmm
    monkeypatch.setattr(xla, "gmm", lambda *a, **kw: right(*a, **kw) * 1.01)
    out_json = tmp_path / "bad.json"
    rc = bench.main(["gmm", "--tiny", "--impl", "xla", "--shapes", "decode", "--peers", "lax.ragged_dot",
                     "--patterns", "balanced", *QUICK, "--json", str(out_json)])
    assert rc == 1
    assert "FAILED: gmm gmm fwd xla" in capsys.readouterr().err
    recs = json.loads(out_json.read_text())["records"]
    ours = [r for r in recs if r["implementation"] == "xla"]
    assert {r["status"] for r in ours} == {"parity_fail"}
    assert all(r["parity"]["max_rel_err"] > r["parity"]["tol"] for r in ours)
    assert all(r["status"] == "ok" for r in recs if r["implementation"] == "lax.ragged_dot")


def test_parity_failure_is_a_failed_row():
    bad = timing.Parity({"out": 0.5}, "reference", 1e-4)
    rec = records.record(suite="gmm", op="gmm", pass_="fwd", implementation="xla", kind="moe_ops",
                         shape={"name": "s"}, dtype="float32", timing=timing.Timing(1e-3, (1e-3,), 0, 1, 1),
                         parity=bad)
    assert rec["status"] == "parity_fail" and "0.5" in rec["reason"]
    assert timing.rel_err(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == np.inf


def test_measure_checks_first_call_and_rotates():
    calls = []

    def fn(x):
        calls.append(float(x[0]))
        return x * 2

    sets = [(jnp.full((4,), float(i + 1)),) for i in range(3)]
    seen = []
    t, parity = timing.measure(fn, sets, warmup=1, repeats=5,
                               check=lambda out: seen.append(out) or timing.Parity({"o": 0.0}, "x", 0.0))
    assert calls[0] == 1.0 and len(seen) == 1 and float(seen[0][0]) == 2.0   # first call checked
    assert sorted(set(calls[2:])) == [1.0, 2.0, 3.0]                       # timed calls cycle through the sets
    assert t.repeats == 5 and len(t.samples_s) == 5 and t.median_s == float(np.median(t.samples_s))
    assert parity.ok
    assert len(calls) == 1 + 1 + 5 + 5 and sorted(set(calls[-5:])) == [1.0, 2.0, 3.0]  # + 5 pipelined calls
    assert t.pipelined_s > 0 and timing.measure(fn, sets, repeats=2, pipelined=False)[0].pipelined_s is None


def test_pipelined_calls_sync_once_after_the_last():
    """The pipelined figure issues its calls back-to-back: only the last output is waited for."""
    waited = []

    class Out:
        def __init__(self, i):
            self.i = i

        def block_until_ready(self):
            waited.append(self.i)
            return self
    count = iter(range(100))
    t, _ = timing.measure(lambda: Out(next(count)), [()], warmup=0, repeats=4)
    assert waited == [0, 1, 2, 3, 4, 8] and t.as_dict()["pipelined_ms"] == pytest.approx(t.pipelined_s * 1e3)


@pytest.mark.parametrize("spec", ["balanced", "hot:1:4", "hot:2:-1", "zipf:1.2"])
def test_routing_patterns(spec):
    t, e, k = 64, 8, 2
    pattern = routing.parse(spec)
    ids = routing.expert_ids(t, e, k, pattern, seed=3)
    assert ids.shape == (t, k) and all(len(set(row)) == k for row in ids)
    loads = np.bincount(ids.ravel(), minlength=e)
    assert loads.sum() == t * k and loads.max() <= t
    if spec == "balanced":
        assert loads.min() == loads.max()
    if spec == "hot:1:4":
        assert loads.max() == 4 * t * k // e
    if spec == "hot:2:-1":
        assert np.sort(loads)[-2:].tolist() == [t, t]
    sizes = routing.group_sizes(100, e, pattern, seed=3)
    assert sizes.sum() == 100 and (sizes >= 0).all()
    logits = routing.logits_for_ids(ids, e, seed=0)
    top = np.argsort(-logits, axis=1)[:, :k]
    assert (np.sort(top, axis=1) == np.sort(ids, axis=1)).all()


def test_bad_pattern_and_shape_names():
    with pytest.raises(ValueError, match="hot:W:f"):
        routing.parse("hot:4")
    with pytest.raises(SystemExit):
        bench.main(["gmm", "--tiny", "--shapes", "no-such-shape", "--no-progress"])


def test_gmm_suite_fwd_bwd_runs_the_forward():
    """The GMM suite's forward+backward pass returns the forward's output, so the compiled program keeps the forward
    GMM next to dlhs and drhs (torch's autograd peer runs all three). Returning only the gradients let XLA drop the
    forward: the real CUDA lowering then held two launches, and the suite timed the backward alone."""
    import jax  # noqa: PLC0415

    from benchmarks import gmm as gmm_suite, peers  # noqa: PLC0415
    from kernels import lowering  # noqa: PLC0415
    sds = jax.ShapeDtypeStruct
    args = (sds((256, 64), jnp.bfloat16), sds((4, 64, 128), jnp.bfloat16), sds((4,), jnp.int32),
            sds((256, 128), jnp.bfloat16))
    (lax_peer,) = peers.gmm_peers(["lax.ragged_dot"])
    for fwd_bwd in (gmm_suite._ours("xla")[1], lax_peer.fwd_bwd):
        dlhs, drhs, out = jax.eval_shape(fwd_bwd, *args)
        assert (dlhs.shape, drhs.shape, out.shape) == ((256, 64), (4, 64, 128), (256, 128))
    if lowering.unavailable_reason() is not None:
        pytest.skip(str(lowering.unavailable_reason()))
    with lowering.pinned_targets(compute_capability=90, rocm_arch="gfx950"):
        text = gmm_suite._ours("triton")[1].trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    names = sorted(call.name for call in lowering.kernel_calls(text))
    assert names == ["moe_gmm", "moe_gmm", "moe_tgmm"], names


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--peers", "torch._grouped_mm,foo"], r"--peers: unknown \['foo'\]"),
    (["--patterns", "balanced,bogus"], "--patterns: routing pattern must be"),
])
def test_bad_arguments_stop_before_any_measurement(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["gmm", "--tiny", "--no-progress", *argv])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_gmm_peers_take_the_layer_suite_names():
    from benchmarks import peers
    assert [p.name for p in peers.gmm_peers(["tokamax", "tokamax:mosaic"])] == ["tokamax:mosaic"]


def test_emulated_counts_apply_to_the_emulated_rows_only(monkeypatch):
    """The user's --warmup / --repeats hold for the compiled implementations even when an emulated one (the Triton
    interpreter, Pallas interpret mode) runs beside them with its own smaller counts."""
    from benchmarks import gmm, shapes
    seen = {}

    def fake_measure(fn, inputs, *, warmup, repeats, check):
        seen[fn] = (warmup, repeats)
        raise RuntimeError("not timed in this test")
    monkeypatch.setattr(gmm, "measure", fake_measure)
    prepare = lambda lhs, rhs, sizes, ct: (lhs, rhs, sizes, ct)
    base = [dict(name=name, requested=name, kind="moe_ops", emulated=emulated, available=True, reason="",
                 config=None, prepare=prepare, fwd=name + ":fwd", fwd_bwd=name + ":fwd_bwd", note="")
            for name, emulated in (("xla", False), ("pallas", True))]
    gmm.run_case(next(iter(shapes.GMM_TINY.values())), jnp.float32, routing.BALANCED, base, warmup=2, repeats=7,
                 emulated_counts=(1, 3))
    assert seen == {"xla:fwd": (2, 7), "xla:fwd_bwd": (2, 7), "pallas:fwd": (1, 3), "pallas:fwd_bwd": (1, 3)}


def test_torch_bmm_peer_times_equal_groups_only():
    """``torch.bmm`` (the dense batched matmul that balanced routing with equal groups is) matches the f32 oracle in
    both passes where every group has M / E rows, and reports itself unavailable, with the sizes, elsewhere."""
    pytest.importorskip("torch")
    from benchmarks import gmm, peers, shapes
    (bmm,) = peers.gmm_peers(["torch.bmm"])
    assert bmm.available, bmm.reason
    contender = gmm.contenders([], [bmm])
    shape = shapes.GMM_TINY["mixtral-w1"]                         # M 64, E 4: 16 rows per group
    rows = gmm.run_case(shape, jnp.float32, routing.BALANCED, contender, warmup=1, repeats=2)
    assert [(r["pass"], r["status"]) for r in rows] == [("fwd", "ok"), ("fwd+bwd", "ok")]
    assert all(r["parity"]["ok"] for r in rows), [r["parity"] for r in rows]
    skewed = gmm.run_case(shape, jnp.float32, routing.parse("hot:1:4"), contender, warmup=1, repeats=2)
    assert {r["status"] for r in skewed} == {"unavailable"}
    assert "equal groups" in skewed[0]["reason"] and "range" in skewed[0]["reason"]


@pytest.mark.slow
def test_gpt_oss_variants_form_their_own_family(tmp_path, monkeypatch):
    """On gpt-oss shapes the layer suite also times gpt-oss's expert form (``layer.GPT_OSS_VARIANTS``: its
    activation and three biases, fused and unfused), checked against the dense layer in the same form, and compared
    (speed, peak vs unfused) only within that family. XLA made a fusing backend here, so the suite runs fast."""
    from moe_ops import fused
    monkeypatch.setattr(fused, "FUSED_BY_DEFAULT", fused.FUSED_BY_DEFAULT + ("xla",))
    from benchmarks import shapes
    assert layer.variants_for("xla", "layer", shapes.LAYER_TINY["gpt-oss"]) == layer.VARIANTS + layer.GPT_OSS_VARIANTS
    assert layer.variants_for("xla", "layer", shapes.LAYER_TINY["mixtral"]) == layer.VARIANTS
    rc, _, recs = _layer_run(tmp_path, ["layer", "--tiny", "--impl", "xla", "--shapes", "gpt-oss", "--patterns",
                                        "balanced", "--peers", "lax.ragged_dot", *QUICK])
    assert rc == 0
    ours = {(r["op"], r["pass"]): r for r in recs if r["kind"] == "moe_ops"}
    for p in ("fwd", "fwd+bwd"):
        fused_row, unfused_row = ours[("gpt_oss_ffn", p)], ours[("gpt_oss_ffn:unfused", p)]
        for r in (fused_row, unfused_row):
            assert r["status"] == "ok" and r["parity"]["ok"] and "gpt-oss form" in r["parity"]["against"], r
        assert set(fused_row["ratio_to"]) == {"xla:unfused"}          # its own family only
        assert fused_row["peak_vs_unfused"] == pytest.approx(
            fused_row["memory"]["peak_bytes"] / unfused_row["memory"]["peak_bytes"])
        plain = ours[("moe_ffn", p)]
        assert "gpt-oss form" not in plain["parity"]["against"]
        assert not any(k.startswith("xla:gpt") for k in plain["ratio_to"])
    assert records.op_family("gpt_oss_ffn:unfused") == "gpt_oss_ffn"
    assert records.op_family("reference:moe_ffn_dense") == "reference:moe_ffn_dense"
