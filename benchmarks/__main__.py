"""``python -m benchmarks [main|gmm|sort|layer|all] [options]`` (console script ``moe-bench``).

``main`` (the default) is the project's main job. On CPU: a small MoE layer forward+backward with every available
implementation (XLA at the small shape; Triton via the interpreter bridge and Pallas in interpret mode only at the
tiny shape, labelled emulated), with a parity column against ``moe_ops.reference.moe_ffn_dense`` and timings, in
well under two minutes. On GPU: the GMM/TGMM, sort/unsort and full-layer suites with peers and ceilings.
``gmm`` / ``sort`` / ``layer`` / ``all`` run suites; on CPU they always use the tiny presets.

Implementations that cannot run are listed as unavailable with the reason, never skipped silently; every row names
the implementation that ran (``moe_ops.resolve_implementation``). Every run writes ``bench_out/<UTC timestamp>.json``
and ``.png`` (``--json`` / ``--plot`` / ``--out-dir`` override) and prints where. Its last line is
``PASS: N/N implementations match <reference> (max rel err ..., tol ...)`` or ``FAIL: ...``; exit status 1 on FAIL
(a moe_ops implementation gives a wrong answer or fails with an error, or none ran), 0 otherwise (an unavailable
implementation is reported, not an error). Emulated rows (interpreter / interpret mode) get no speed ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import time

# JAX would otherwise reserve most of the GPU at start-up and leave the torch peer nothing (set before first use).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from kernels.host import prefer_cpu_without_accelerator  # noqa: E402

prefer_cpu_without_accelerator()  # no failed-GPU-plugin traceback on CPU-only hosts
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import env, gmm, layer, peers, report, routing, shapes, sort  # noqa: E402
from benchmarks.records import add_ratios  # noqa: E402
from benchmarks.timing import Stopped, stop_on_sigterm  # noqa: E402

SUITES = ("main", "gmm", "sort", "layer", "all")
DEFAULT_PATTERNS = {"main": "balanced,hot:1:4,zipf:1.2", "gmm": "balanced,hot:1:4", "sort": "balanced,zipf:1.2",
                    "layer": "balanced,hot:1:4,zipf:1.2"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default="main", choices=SUITES)
    p.add_argument("--tiny", action="store_true", help="tiny presets (always on CPU)")
    p.add_argument("--json", metavar="PATH", help="write the JSON document here (schema: benchmarks/README.md; "
                   "default OUT_DIR/<UTC timestamp>.json)")
    p.add_argument("--plot", metavar="PATH", help="write the PNG plot here (needs matplotlib; default "
                   "OUT_DIR/<UTC timestamp>.png)")
    p.add_argument("--out-dir", default="bench_out", help="folder of the default JSON / PNG (default bench_out)")
    p.add_argument("--shapes", help="comma list of preset names of the suite (default: all)")
    p.add_argument("--impl", help="comma list of moe_ops implementations (default: all of xla,triton,pallas)")
    p.add_argument("--peers", help="comma list of peers: GMM lax.ragged_dot,tokamax:mosaic,torch._grouped_mm,torch.bmm; "
                   "the layer suite composes the layer around lax.ragged_dot / tokamax (default: all)")
    p.add_argument("--patterns", help="routing patterns: balanced, hot:W:f, zipf:s (comma list)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--warmup", type=int, help="untimed calls after the checked first call")
    p.add_argument("--repeats", type=int, help="timed calls (median reported)")
    p.add_argument("--variants", help="gmm suite: comma list of Triton GMM variants to time side by side "
                   f"(default: all of {','.join(gmm.TRITON_VARIANTS)})")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one plain line per finished case (with its seconds) on stderr")
    return p


@dataclasses.dataclass(frozen=True)
class Plan:
    tiny: bool
    dtype: object
    warmup: int
    repeats: int
    emu_warmup: int
    emu_repeats: int
    progress: bool


def _plan(args) -> Plan:
    gpu = env.on_gpu()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    warmup = args.warmup if args.warmup is not None else 2
    repeats = args.repeats if args.repeats is not None else (20 if gpu else 10)
    return Plan(tiny=args.tiny or not gpu, dtype=dtype, warmup=warmup, repeats=repeats,
                emu_warmup=min(warmup, 1), emu_repeats=min(repeats, 3), progress=not args.no_progress)


def _availability(impls, needs: str, plan: Plan, suite: str, entries: list) -> list:
    """Probe each implementation; emulated ones at full (non-tiny) shapes are reported unavailable, with why."""
    out = []
    for impl in impls:
        a = env.probe(impl, env.NEEDS[needs])
        if a.available and a.emulated and not plan.tiny:
            a = dataclasses.replace(a, available=False,
                                    reason=f"emulated here ({a.emulated}): far too slow at full shapes; use --tiny")
        out.append(a)
        entries.append({"suite": suite, "kind": "moe_ops", **a.as_dict()})
    return out


def _patterns(args, suite):
    return routing.parse_list(args.patterns or DEFAULT_PATTERNS[suite])


def run_main_cpu(args, plan: Plan, entries: list, records: list) -> list[dict]:
    """The CPU main job: layer fwd+bwd, XLA at the small shape (every pattern), everything at the tiny shape."""
    avails = _availability(env.parse_impls(args.impl), "layer", plan, "main", entries)
    cases = []
    for a in avails:
        if a.available and not a.emulated:
            cases += [(a, shapes.MAIN_SMALL, p, plan.warmup, plan.repeats) for p in _patterns(args, "main")]
        w, r = (plan.emu_warmup, plan.emu_repeats) if a.emulated else (plan.warmup, plan.repeats)
        cases.append((a, shapes.MAIN_TINY, routing.BALANCED, w, r))
    return layer.run_suite(cases, plan.dtype, progress=plan.progress, suite="main", records=records)


def run_gmm(args, plan: Plan, entries: list, records: list) -> list[dict]:
    avails = _availability(env.parse_impls(args.impl), "gmm", plan, "gmm", entries)
    peer_list = peers.gmm_peers(_peer_names(args))
    entries += [{"suite": "gmm", "kind": "peer", "requested": p.name, "implementation": p.name,
                 "available": p.available, "reason": p.reason or p.note, "emulated": None} for p in peer_list]
    shape_list = shapes.select(shapes.GMM_TINY if plan.tiny else shapes.GMM_SHAPES, args.shapes)
    return gmm.run_suite(avails, peer_list, shape_list, _patterns(args, "gmm"), plan.dtype, warmup=plan.warmup,
                         repeats=plan.repeats, emulated_counts=(plan.emu_warmup, plan.emu_repeats),
                         progress=plan.progress, variants=_variants(args), records=records)


def run_sort(args, plan: Plan, entries: list, records: list) -> list[dict]:
    avails = _availability(env.parse_impls(args.impl), "sort", plan, "sort", entries)
    entries.append({"suite": "sort", "kind": "peer", "requested": "xla-composition",
                    "implementation": "xla:argsort+take / xla:scatter+einsum", "available": True, "reason": "",
                    "emulated": None})
    shape_list = shapes.select(shapes.SORT_TINY if plan.tiny else shapes.SORT_SHAPES, args.shapes)
    return sort.run_suite(avails, shape_list, _patterns(args, "sort"), plan.dtype, warmup=plan.warmup,
                          repeats=plan.repeats, emulated_counts=(plan.emu_warmup, plan.emu_repeats),
                          progress=plan.progress, records=records)


def run_layer(args, plan: Plan, entries: list, records: list) -> list[dict]:
    """Per (shape, pattern): every moe_ops implementation, then the layer compositions (``peers.layer_peers``) on the
    same inputs."""
    avails = _availability(env.parse_impls(args.impl), "layer", plan, "layer", entries)
    names = _peer_names(args)
    peer_list = peers.layer_peers(names)
    if names and not peer_list:
        print(f"note: suite layer: none of --peers {args.peers} has a layer composition "
              f"(known: {', '.join(peers.LAYER_GEMMS)})", file=sys.stderr)
    entries += [{"suite": "layer", "kind": "peer", "requested": p.requested, "implementation": p.name,
                 "available": p.available, "reason": p.reason or p.note, "emulated": None} for p in peer_list]
    shape_list = shapes.select(shapes.LAYER_TINY if plan.tiny else shapes.LAYER_SHAPES, args.shapes)
    cases = []
    for s in shape_list:
        for p in _patterns(args, "layer"):
            for a in avails:
                w, r = (plan.emu_warmup, plan.emu_repeats) if a.emulated else (plan.warmup, plan.repeats)
                cases.append((a, s, p, w, r))
            cases += [(peer, s, p, plan.warmup, plan.repeats) for peer in peer_list]
    return layer.run_suite(cases, plan.dtype, progress=plan.progress, records=records)


def _peer_names(args) -> list[str] | None:
    """``--peers`` as a list of names (None: every peer)."""
    return [s.strip() for s in args.peers.split(",") if s.strip()] if args.peers else None


def _variants(args) -> tuple[str, ...]:
    """``--variants`` as a tuple (default: every Triton GMM variant)."""
    if not args.variants:
        return gmm.TRITON_VARIANTS
    return tuple(s.strip() for s in args.variants.split(",") if s.strip())


def _checked_args(parser, argv):
    """The parsed arguments, with the values argparse cannot judge checked up front (before any ceiling runs)."""
    args = parser.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        peers.check_names(_peer_names(args) or ())
    except ValueError as err:
        parser.error(f"--peers: {err}")
    variants = _variants(args)
    if not variants or set(variants) - set(gmm.TRITON_VARIANTS):
        parser.error(f"--variants must name some of {', '.join(gmm.TRITON_VARIANTS)}, got {args.variants!r}")
    if args.patterns:
        try:
            routing.parse_list(args.patterns)
        except ValueError as err:
            parser.error(f"--patterns: {err}")
    return args


def main(argv=None) -> int:
    args = _checked_args(build_parser(), argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    started, stamp = now.isoformat(timespec="seconds"), now.strftime("%Y%m%dT%H%M%SZ")
    t0 = time.perf_counter()
    plan = _plan(args)
    gpu = env.on_gpu()
    suite = args.suite
    if not gpu and suite != "main" and not args.tiny:
        print(f"note: backend is {jax.default_backend()}: the {suite} suite runs its tiny presets "
              "(the full presets need a GPU)", file=sys.stderr)
    _validate_shapes(args, plan.tiny)
    entries: list = []
    ceilings, records = peers.ceilings(plan.tiny, repeats=max(3, min(plan.repeats, 10)))
    runners = {"gmm": run_gmm, "sort": run_sort, "layer": run_layer}
    interrupted = None
    try:
        with stop_on_sigterm():
            if suite == "main" and not gpu:
                run_main_cpu(args, plan, entries, records)
            else:
                for name in (runners if suite in ("main", "all") else (suite,)):
                    sub = _one_suite_args(args, name, plan.tiny)
                    if sub is None:
                        print(f"note: suite {name}: none of --shapes {args.shapes} is one of its presets; not run",
                              file=sys.stderr)
                        continue
                    runners[name](sub, plan, entries, records)  # appends each case's records as it finishes
    except (KeyboardInterrupt, Stopped) as stop:
        interrupted = f"{type(stop).__name__}: stopped after {len(records)} records; the report holds those alone"
        print(f"\nINTERRUPTED ({interrupted})", file=sys.stderr)
        cut = datetime.datetime.fromtimestamp(int(getattr(stop, "at", time.time())), datetime.timezone.utc)
        for r in records:  # errors from the signal's arrival on: the raise landed in that row's call
            if r["status"] == "error" and datetime.datetime.fromisoformat(r["timestamp"]) >= cut:
                r["status"] = "interrupted"
    add_ratios(records, ceilings)
    doc = report.document(records, command=shlex.join(["python", "-m", "benchmarks"] + list(argv or sys.argv[1:])),
                          started=started, finished=datetime.datetime.now(datetime.timezone.utc)
                          .isoformat(timespec="seconds"), ceilings=ceilings, implementations=entries,
                          routing_source=routing.source())
    if interrupted:
        doc["interrupted"] = interrupted
    print(report.header(doc))
    print(report.table(records))
    print(report.summary_table(doc["summary"]))
    print(report.targets_table(doc["targets"]))
    json_path = args.json or os.path.join(args.out_dir, f"{stamp}.json")
    plot_path = args.plot or os.path.join(args.out_dir, f"{stamp}.png")
    report.write_json(doc, json_path)
    print(f"\nJSON: {json_path}")
    why = report.write_plot(records, plot_path)
    print(f"plot: {plot_path}" if why is None else f"plot not written ({why})")
    print(f"total {time.perf_counter() - t0:.1f} s")
    bad = [r for r in records if r["kind"] == "moe_ops" and r["status"] in ("parity_fail", "error")]
    for r in bad:
        print(f"FAILED: {r['suite']} {r['op']} {r['pass']} {r['implementation']} {r['shape']['name']}: "
              f"{r['status']}: {r['reason']}", file=sys.stderr)
    passed, line = report.verdict(records)
    print(line if not interrupted else f"{line} (INTERRUPTED: partial run)")
    return 0 if passed and not bad and not interrupted else 1


def _presets(name, tiny):
    return ({"gmm": shapes.GMM_TINY, "sort": shapes.SORT_TINY, "layer": shapes.LAYER_TINY} if tiny else
            {"gmm": shapes.GMM_SHAPES, "sort": shapes.SORT_SHAPES, "layer": shapes.LAYER_SHAPES})[name]


def _validate_shapes(args, tiny):
    """Unknown ``--shapes`` names fail before anything runs (SystemExit listing the known ones)."""
    if not args.shapes:
        return
    if args.suite == "main" and not env.on_gpu():
        raise SystemExit("--shapes does not apply to the CPU main job (its shapes are fixed: small and tiny)")
    names = ("gmm", "sort", "layer") if args.suite in ("main", "all") else (args.suite,)
    known = set().union(*(_presets(n, tiny) for n in names))
    unknown = [s.strip() for s in args.shapes.split(",") if s.strip() and s.strip() not in known]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown} for {'/'.join(names)}"
                         f"{' (tiny presets)' if tiny else ''}; known: {sorted(known)}")


def _one_suite_args(args, name, tiny):
    """With several suites, ``--shapes`` keeps only the names each suite knows (so one list can serve all);
    None when it names none of this suite's presets."""
    if not args.shapes or args.suite not in ("main", "all"):
        return args
    presets = _presets(name, tiny)
    keep = ",".join(s for s in args.shapes.split(",") if s.strip() in presets)
    return argparse.Namespace(**{**vars(args), "shapes": keep}) if keep else None


if __name__ == "__main__":
    sys.exit(main())
