#!/usr/bin/env python3
"""Benchmark: requested vs measured end-to-end speed-up, MAC budget vs latency budget, on onnxruntime and MNN.

For each net (``tools/latency_nets.py``: VGG-16, ResNet-50, GoogLeNet, MobileNet v1 at 224x224 with
seeded weights of power-law spectra; ``tiny`` for a quick check) and each ``--speedup`` S (default
1.5, 2, 3), the net is compressed by ``lrprune_caffe.api.compress_files`` (channel scheme) under

- ``macs``: ``cost="macs"``, the MAC budget;
- ``latency`` (one per onnxruntime thread count T in ``--threads``): ``cost="latency", threads=T``, what
  ``compress --cost latency`` does: per-layer latency tables on onnxruntime with T intra-op threads,
  timed hot and calibrated against the profiled net, the millisecond budget, one refinement;
- ``lat-cold`` / ``lat-hot`` (with ``--timing cold,hot``): tables timed cold / hot, uncalibrated, the
  millisecond budget (``lrprune_caffe.lowrank.latency_budget.allocate``), applied by the same
  ``compress_files`` with explicit per-layer ranks.

Then, per engine (``--engines``: onnxruntime, mnn where ``import MNN`` works) and thread count, the
original net and **all** its compressed variants run interleaved in one run (rounds alternate forward
and reverse order, batch 1, after warm-up), and each variant's speed-up is the median of its per-round
ratios original / variant, with the 10th-90th percentiles; with 1 thread also in CPU time, which other
jobs on a shared machine do not inflate. A ``latency`` variant allocated for T threads is measured with
T threads only. MNN runs the dense ONNX export (MNN refuses sparse initializers) converted by MNN's own
converter (``_tools.mnnconvert``); its latency variants are the ones allocated for onnxruntime.

It also reports how long the latency tables took to measure the first time (a fresh cache unless
``--cache DIR``), with the load average, since the budget must be measurable within 60 s on VGG-16.

Outputs in ``-o DIR`` (default ``tools/out/bench_latency``): ``RESULTS.md`` (the table, versions,
threads, load), ``results.json``, ``speedup_vs_macs.png`` (measured speed-up against whole-net MAC cut,
one panel per engine and thread count; matplotlib, the ``plot`` extra).

Numbers from a machine shared with other work are noisy: run it on a quiet machine for the record.

Usage::

    python tools/bench_latency.py [--nets vgg16,resnet50,googlenet,mobilenet] [--speedups 1.5,2,3]
        [--threads 1,2] [--engines onnxruntime,mnn] [--rounds 20] [--input 224] [--timing profile]
        [--workdir DIR] [--cache DIR] [-o DIR]
    python tools/bench_latency.py --nets tiny --speedups 2 --threads 1 --rounds 5   # quick: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_latency_measure as M  # noqa: E402

ENGINES = ("onnxruntime", "mnn")


def _csv(text, cast):
    return [cast(x) for x in str(text).split(",") if x.strip()]


def load_or_build(name, size, seed, workdir):
    import latency_nets
    from lrprune_caffe.io.caffe import load_net
    proto, model = os.path.join(workdir, f"{name}-{size}.prototxt"), os.path.join(workdir, f"{name}-{size}.caffemodel")
    if os.path.exists(proto) and os.path.exists(model):
        return load_net(proto, model), proto, model
    net, p, m = latency_nets.build(name, size, seed, workdir)
    os.replace(p, proto)
    os.replace(m, model)
    return load_net(proto, model), proto, model


def layer_spectra(net, infos, scheme):
    from lrprune_caffe.lowrank import decompose as dec
    out = {}
    for name, info in infos.items():
        W = net.layer(name).blobs[0]
        if info.kind == "ip" and info.transpose:
            W = W.T
        out[name] = dec.scheme_spectra(W, info.scheme_for(scheme), group=info.group)
    return out


def latency_allocation(tables, spectra, speedup, criterion="log-energy"):
    """(Allocation, rank spec for compress) from measured tables and weight spectra."""
    from lrprune_caffe.lowrank import latency_budget as lb
    options, dropped = [], {}
    for name, table in tables.tables.items():
        ranks, err = lb.rank_candidates(spectra[name], table, criterion)
        opts, slower, _ = lb.latency_options(table, ranks, err)
        options.append(opts)
        dropped[name] = slower
    alloc = lb.allocate(options, tables.total_ms, speedup, dropped_slower=dropped)
    spec = ",".join(f"{n}={'x'.join(str(r) for r in rk)}" for n, rk in alloc.choice.items() if rk is not None)
    return alloc, spec


def compressed(proto, model, scheme, **kw):
    from lrprune_caffe.api import compress_files
    if "speedup" in kw:
        kw["measure_rounds"] = 0  # measured here, interleaved with the other variants' nets
    t0 = time.perf_counter()
    report, new = compress_files(proto, model, None, scheme=scheme, verify=False, **kw)
    ranks = {r["name"]: tuple(int(x) for x in (r["rank"] if isinstance(r["rank"], list) else [r["rank"]]))
             for r in report["layers"] if r["action"] == "factorized"}
    out = {"macs_cut": report["totals"]["macs_reduction"], "factorized": len(ranks), "ranks": ranks,
           "compress_s": time.perf_counter() - t0}
    b = report.get("budget") or {}
    if b.get("cost") == "latency":
        out.update(predicted=b["predicted_speedup"], refined=b.get("refined"))
    return new, out


def predicted_speedup(tables, ranks) -> float:
    """What ``tables`` predict for the net factorized at ``ranks`` ({layer: ranks}; NaN outside the grid)."""
    from lrprune_caffe.lowrank.latency_budget import fixed_part
    ms = fixed_part(tables.total_ms, [t.left_alone_ms for t in tables.tables.values()])
    for name, t in tables.tables.items():
        v = float(t.predict([ranks[name]])[0]) if name in ranks else t.left_alone_ms
        ms += v if np.isfinite(v) else t.left_alone_ms  # a rank past the row's early stop: no faster than alone
    return tables.total_ms / ms


def build_tables(name, net, infos, args, cache):
    """The latency tables of ``net`` for each thread count and timing (the first time: timed)."""
    from lrprune_caffe.engines import latency as L
    tables, times = {}, []
    for threads in args.threads:
        target = L.Target("onnxruntime", threads, 1)
        for timing in args.timing:
            before = M.loadavg()
            tb = L.layer_tables(infos, args.scheme, target, net=net, directory=cache, progress=True, timing=timing)
            tables[threads, timing] = tb
            times.append({"net": name, "threads": threads, "timing": timing, "seconds": tb.seconds,
                          "cpu_seconds": tb.cpu_seconds, "graphs": tb.measured, "layers": len(tb.tables),
                          "total_ms": tb.total_ms, "load_before": before, "load_after": M.loadavg()})
            print(f"[{name}] tables ({timing}), {threads} thread(s): {tb.seconds:.1f} s ({tb.cpu_seconds:.1f} s CPU), "
                  f"{tb.measured} graphs timed, net {tb.total_ms:.1f} ms, load {before}", file=sys.stderr)
    return tables, times


def variants_of(name, proto, model, net, infos, tables, args):
    """[(cost, allocated for threads or None, net, info)] and [error rows] for each requested speed-up."""
    from lrprune_caffe.lowrank.latency_budget import Unreachable
    spectra = layer_spectra(net, infos, args.scheme) if any(t != "profile" for t in args.timing) else None
    out, errors = [], []
    for s in args.speedups:
        def attempt(label, for_threads, **kw):
            try:
                new, info = compressed(proto, model, args.scheme, **kw)
            except Exception as e:  # a target the budget cannot reach: say so in the table
                errors.append({"net": name, "requested": s, "cost": label, "threads": for_threads, "error": str(e)})
                return
            info["requested"] = s
            out.append((label, for_threads, new, info))
            print(f"[{name}] S={s} {label} t={for_threads}: MAC cut {info['macs_cut']:.2f}x"
                  + (f", predicted {info['predicted']:.2f}x" if "predicted" in info else "")
                  + f" ({info['compress_s']:.0f} s)", file=sys.stderr)

        attempt("macs", None, speedup=s, cost="macs")
        for threads in args.threads:
            for timing in args.timing:
                if timing == "profile":
                    attempt("latency", threads, speedup=s, cost="latency", threads=threads)
                    continue
                cost = f"lat-{timing}"
                try:
                    alloc, spec = latency_allocation(tables[threads, timing], spectra, s)
                except Unreachable as e:
                    errors.append({"net": name, "requested": s, "cost": cost, "threads": threads,
                                   "error": f"unreachable: at best {e.best_speedup:.2f}x predicted"})
                    continue
                if not spec:
                    errors.append({"net": name, "requested": s, "cost": cost, "threads": threads,
                                   "error": "nothing to factorize"})
                    continue
                attempt(cost, threads, rank=spec)
                if out and out[-1][0] == cost:
                    out[-1][3]["predicted"] = alloc.predicted_speedup
    return out, errors


def run(args, write=None) -> dict:
    """The benchmark; ``write(result)``, when given, is called after each net with what is done so far."""
    from lrprune_caffe.engines import latency as L

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_latency_")
    os.makedirs(workdir, exist_ok=True)
    cache = args.cache or tempfile.mkdtemp(prefix="bench_latency_cache_")
    os.environ["LRPRUNE_CACHE"] = cache  # compress's latency cost reads the same tables
    cache = os.path.join(cache, "latency")
    engines = [e for e in args.engines if e != "mnn" or M.mnn_available()]
    notes = [] if engines == args.engines else ["MNN is not installed (import MNN failed): its rows are missing"]
    rows, tables_time = [], []
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "uptime_start": M.uptime()}
    for name in args.nets:
        t0 = time.perf_counter()
        size = args.input if args.input else (32 if name == "tiny" else 224)
        net, proto, model = load_or_build(name, size, args.seed, workdir)
        print(f"[{name}] built/loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        infos, _ = L.net_infos(net)
        tables, times = build_tables(name, net, infos, args, cache)
        tables_time += times
        variants, errors = variants_of(name, proto, model, net, infos, tables, args)
        rows += errors
        mnn_dir = tempfile.TemporaryDirectory(prefix=f"bench_latency_mnn_{name}_")  # converted nets, per net
        for engine in engines:
            for threads in args.threads:
                chosen = [v for v in variants if v[1] in (None, threads)]
                if not chosen:
                    continue
                before = M.loadavg()
                m = M.interleaved(engine, [net] + [v[2] for v in chosen], threads, args.rounds, mnn_dir.name)
                load = [before, M.loadavg()]
                for (cost, alloc_threads, _, info), res in zip(chosen, m["variants"]):
                    by = {t: predicted_speedup(tables[threads, t], info["ranks"]) for t in args.timing
                          if (threads, t) in tables}
                    row = {"net": name, "input": size, "engine": engine, "threads": threads, "cost": cost,
                           **{k: v for k, v in info.items() if k != "ranks"}, "ranks": info["ranks"],
                           **res, "orig_ms": m["orig_ms"], "predicted_by": by, "load": load}
                    rows.append(row)
                    print(f"[{name}] S={info['requested']} {cost:7s} {engine} t={threads}: MAC cut "
                          f"{info['macs_cut']:.2f}x, measured {res['measured']:.2f}x "
                          f"({res['p10']:.2f}-{res['p90']:.2f})"
                          + (f", CPU time {res['cpu_measured']:.2f}x" if res.get("cpu_measured") else ""),
                          file=sys.stderr)
        del variants
        mnn_dir.cleanup()
        result.update({"versions": M.versions(engines), "engines": engines, "input": args.input,
                       "scheme": args.scheme, "rounds": args.rounds, "batch": 1, "threads": args.threads,
                       "tables": tables_time, "rows": rows, "notes": notes, "uptime_end": M.uptime()})
        if write is not None:
            write(result)
    return result


def write_outputs(result, out, plot=True) -> list:
    """RESULTS.md, results.json (and speedup_vs_macs.png) into ``out``, each replaced atomically."""
    os.makedirs(out, exist_ok=True)
    files = {"RESULTS.md": M.markdown(result, plot="speedup_vs_macs.png" if plot else None).encode(),
             "results.json": json.dumps(result, indent=1, default=str).encode()}
    if plot:
        files["speedup_vs_macs.png"] = M.plot_png(result)
    for fname, data in files.items():
        tmp = os.path.join(out, f".{fname}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(out, fname))
    return [os.path.join(out, f) for f in files]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", type=lambda t: _csv(t, str), default=["vgg16", "resnet50", "googlenet", "mobilenet"])
    ap.add_argument("--speedups", type=lambda t: _csv(t, float), default=[1.5, 2.0, 3.0])
    ap.add_argument("--threads", type=lambda t: _csv(t, int), default=[1, 2])
    ap.add_argument("--engines", type=lambda t: _csv(t, str), default=list(ENGINES),
                    help="onnxruntime and/or mnn (skipped with a note when MNN is not installed)")
    ap.add_argument("--input", type=int, default=None, help="input height and width (default 224; tiny: 32)")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds per engine and thread count")
    ap.add_argument("--scheme", default="channel", choices=["channel", "spatial", "tucker2"])
    ap.add_argument("--timing", type=lambda t: _csv(t, str), default=["profile"],
                    help="how the latency tables are timed, one or more of profile (hot, calibrated against the "
                         "profiled net; what compress does), cold (caches flushed before each run), hot: several "
                         "compare their predictions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the nets' files (kept; reused when present)")
    ap.add_argument("--cache", help="latency cache folder (default: a fresh one, so the table time is a first time)")
    ap.add_argument("-o", "--out", default=str(ROOT / "tools" / "out" / "bench_latency"),
                    help="folder for RESULTS.md, results.json and speedup_vs_macs.png")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = ap.parse_args(argv)
    import latency_nets
    from lrprune_caffe.engines.latency import TIMINGS
    if any(t not in TIMINGS for t in args.timing):
        ap.error(f"--timing: choose from {', '.join(TIMINGS)}")
    bad = [n for n in args.nets if n not in latency_nets.NETS]
    if bad:
        ap.error(f"unknown net(s) {', '.join(bad)} (choose from {', '.join(latency_nets.NETS)})")
    bad = [e for e in args.engines if e not in ENGINES]
    if bad or not args.engines:
        ap.error(f"--engines: choose from {', '.join(ENGINES)}")
    if args.rounds < 1 or not args.speedups or not args.threads or min(args.threads) < 1:
        ap.error("--rounds, --speedups and --threads need at least one positive value")
    if not args.no_plot:
        import lrprune_caffe.core.plots as plots
        plots._plt()  # matplotlib missing: say so before the work
    result = run(args, write=lambda res: write_outputs(res, args.out, plot=not args.no_plot))
    print(M.markdown(result))
    print(f"written into {args.out}: RESULTS.md, results.json" + ("" if args.no_plot else ", speedup_vs_macs.png"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
