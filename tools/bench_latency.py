#!/usr/bin/env python3
"""Benchmark: requested vs measured end-to-end speed-up, MAC budget vs latency budget.

For each net (``tools/latency_nets.py``: VGG-16, ResNet-50, GoogLeNet, MobileNet v1 at 224x224 with
seeded weights of power-law spectra), each ``--speedup`` S (default 1.5, 2, 3) and each onnxruntime
intra-op thread count (default 1 and 2):

- ``macs``: ``lrprune_caffe.api.compress_files(..., speedup=S, cost="macs")``, the MAC budget;
- ``latency``: ``compress_files(..., speedup=S, cost="latency", threads=T)``, what the CLI does: per-layer
  latency tables timed hot and calibrated against the profiled net, the millisecond budget, one
  refinement from the profiled factorized net;
- ``lat-cold`` / ``lat-hot`` (with ``--timing``): tables timed cold / hot, uncalibrated
  (``lrprune_caffe.engines.latency``, measured on the same runtime, threads and batch, cached), the
  millisecond budget
  (``lrprune_caffe.lowrank.latency_budget.allocate``: fixed + sum of layer ms <= total / S, errors from
  the weights' log-energy), applied by the same ``compress_files`` with explicit per-layer ranks
  (``rank="conv1_1=16,..."``);

then the original and the compressed net run interleaved (ABBA rounds, batch 1) on onnxruntime and we
report the median speed-up and the 10th-90th percentile of the per-round ratios, next to the
requested one and the whole-net MAC cut. ``--plot FILE`` draws measured speed-up against MAC cut
(matplotlib, the ``plot`` extra). It also reports how long the latency tables took to measure the
first time (a fresh cache unless ``--cache DIR``).

Numbers from a machine shared with other work are noisy: run it on a quiet machine for the record.

Usage::

    python tools/bench_latency.py [--nets vgg16,resnet50,googlenet,mobilenet] [--speedups 1.5,2,3]
        [--threads 1,2] [--input 224] [--rounds 20] [--scheme channel] [--timing profile,cold]
        [--workdir DIR] [--cache DIR] [--json OUT.json] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    report, new = compress_files(proto, model, None, scheme=scheme, verify=False, **kw)
    ranks = {r["name"]: tuple(int(x) for x in (r["rank"] if isinstance(r["rank"], list) else [r["rank"]]))
             for r in report["layers"] if r["action"] == "factorized"}
    out = {"macs_cut": report["totals"]["macs_reduction"], "factorized": len(ranks), "ranks": ranks}
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


def run(args) -> dict:
    from lrprune_caffe.engines import latency as L
    from lrprune_caffe.lowrank.latency_budget import Unreachable

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_latency_")
    os.makedirs(workdir, exist_ok=True)
    cache = args.cache or tempfile.mkdtemp(prefix="bench_latency_cache_")
    os.environ["LRPRUNE_CACHE"] = cache  # compress's latency cost reads the same tables
    cache = os.path.join(cache, "latency")
    rows, tables_time = [], []
    for name in args.nets:
        t0 = time.perf_counter()
        net, proto, model = load_or_build(name, args.input, args.seed, workdir)
        print(f"[{name}] built/loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        infos, skipped = L.net_infos(net)
        spectra = layer_spectra(net, infos, args.scheme)
        runners, tables = {}, {}
        for threads in args.threads:
            target = L.Target("onnxruntime", threads, 1)
            for timing in args.timing:
                tables[threads, timing] = tb = L.layer_tables(infos, args.scheme, target, net=net, directory=cache,
                                                              progress=True, timing=timing)
                alone = sum(t.left_alone_ms / t.scale for t in tb.tables.values())
                tables_time.append({"net": name, "threads": threads, "timing": timing, "seconds": tb.seconds,
                                    "cpu_seconds": tb.cpu_seconds, "graphs": tb.measured,
                                    "layers": len(tb.tables), "total_ms": tb.total_ms, "tabled_alone_ms": alone,
                                    "tabled_left_alone_ms": sum(t.left_alone_ms for t in tb.tables.values())})
                print(f"[{name}] tables ({timing}), {threads} thread(s): {tb.seconds:.1f} s, {tb.measured} graphs "
                      f"timed, net {tb.total_ms:.1f} ms, tabled layers alone {alone:.1f} ms, as used "
                      f"{tables_time[-1]['tabled_left_alone_ms']:.1f} ms", file=sys.stderr)
            runners[threads] = L.net_runner(net, target)
        for s in args.speedups:
            variants = []
            try:
                variants.append(("macs", None, *compressed(proto, model, args.scheme, speedup=s, cost="macs")))
            except Exception as e:  # a target the MAC budget cannot reach: say so in the table
                rows.append({"net": name, "requested": s, "cost": "macs", "error": str(e)})
            for threads in args.threads:
                for timing in args.timing:
                    if timing == "profile":  # what compress --cost latency does (tables, allocation, refinement)
                        try:
                            new, info = compressed(proto, model, args.scheme, speedup=s, cost="latency",
                                                   threads=threads)
                        except Exception as e:
                            rows.append({"net": name, "requested": s, "cost": "latency", "threads": threads,
                                         "error": str(e)})
                            continue
                        variants.append(("latency", threads, new, info))
                        continue
                    cost = f"lat-{timing}"
                    try:
                        alloc, spec = latency_allocation(tables[threads, timing], spectra, s)
                    except Unreachable as e:
                        rows.append({"net": name, "requested": s, "cost": cost, "threads": threads,
                                     "error": f"unreachable: at best {e.best_speedup:.2f}x predicted"})
                        continue
                    if not spec:
                        rows.append({"net": name, "requested": s, "cost": cost, "threads": threads,
                                     "error": "nothing to factorize"})
                        continue
                    new, info = compressed(proto, model, args.scheme, rank=spec)
                    info["predicted"] = alloc.predicted_speedup
                    variants.append((cost, threads, new, info))
            for cost, alloc_threads, new, info in variants:
                for threads in ([alloc_threads] if alloc_threads else args.threads):
                    target = L.Target("onnxruntime", threads, 1)
                    m = L.measured_speedup(runners[threads], new, target, rounds=args.rounds)
                    info = {**info, "predicted_by": {t: predicted_speedup(tables[threads, t], info["ranks"])
                                                     for t in args.timing}}
                    row = {"net": name, "requested": s, "cost": cost, "threads": threads, **info,
                           "measured": m["speedup"], "p10": m["paired_p10"], "p90": m["paired_p90"],
                           "cpu_measured": m.get("cpu_paired_median"),
                           "orig_ms": m["a_ms"], "new_ms": m["b_ms"]}
                    rows.append(row)
                    print(f"[{name}] S={s} {cost:7s} t={threads}: MAC cut {info['macs_cut']:.2f}x, measured "
                          f"{m['speedup']:.2f}x ({m['paired_p10']:.2f}-{m['paired_p90']:.2f})"
                          + (f", CPU time {m['cpu_paired_median']:.2f}x" if m.get("cpu_paired_median") else "")
                          + (f", predicted {info['predicted']:.2f}x" if "predicted" in info else "")
                          + "; tables predict " + ", ".join(f"{t} {v:.2f}x" for t, v in info["predicted_by"].items()),
                          file=sys.stderr)
        del runners
    import onnxruntime
    return {"versions": {"onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                         "cpu": L.cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
            "input": args.input, "scheme": args.scheme, "rounds": args.rounds, "batch": 1,
            "tables": tables_time, "rows": rows}


def print_table(result):
    v = result["versions"]
    print(f"onnxruntime {v['onnxruntime']}, {v['cpu']} ({v['cores']} cores), batch 1, input "
          f"{result['input']}x{result['input']}, scheme {result['scheme']}, {result['rounds']} ABBA rounds")
    print("\nlatency tables (first time, fresh cache unless --cache):")
    for t in result["tables"]:
        print(f"  {t['net']:10s} {t.get('timing', ''):7s} {t['threads']} thread(s): {t['seconds']:6.1f} s wall, "
              f"{t['cpu_seconds']:.1f} s CPU ({t['graphs']} graphs, {t['layers']} layers; net {t['total_ms']:.1f} ms, "
              f"tabled layers alone {t.get('tabled_alone_ms', 0):.1f} ms, as used {t['tabled_left_alone_ms']:.1f} ms)")
    print(f"\n{'net':10s} {'S':>4s} {'cost':11s} {'thr':>3s} {'MAC cut':>8s} {'predicted':>9s} {'measured':>9s} "
          f"{'p10-p90':>11s} {'CPU':>6s}  met?  tables predict")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['net']:10s} {r['requested']:4.1f} {r['cost']:11s} {r.get('threads', ''):>3} {r['error']}")
            continue
        pred = f"{r['predicted']:.2f}x" if "predicted" in r else "-"
        met = "yes" if r["measured"] >= r["requested"] else f"no ({r['measured'] / r['requested']:.0%} of it)"
        by = ", ".join(f"{t} {v:.2f}x" for t, v in r.get("predicted_by", {}).items())
        print(f"{r['net']:10s} {r['requested']:4.1f} {r['cost']:11s} {r['threads']:3d} {r['macs_cut']:7.2f}x "
              f"{pred:>9s} {r['measured']:8.2f}x {r['p10']:5.2f}-{r['p90']:<5.2f} "
              f"{(format(r['cpu_measured'], '5.2f') + 'x') if r.get('cpu_measured') else '-':>6s}  {met}  {by}")


def plot(result, path):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install 'lrprune-caffe[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "error" not in r]
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.5), squeeze=False)
    nets = sorted({r["net"] for r in rows})
    colors = dict(zip(nets, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, t in zip(axes[0], threads):
        top = 1.0
        for r in (r for r in rows if r["threads"] == t):
            mk = "o" if r["cost"] == "macs" else "^"
            ax.errorbar(r["macs_cut"], r["measured"], yerr=[[r["measured"] - r["p10"]], [r["p90"] - r["measured"]]],
                        fmt=mk, color=colors[r["net"]], mfc="none" if r["cost"] == "macs" else colors[r["net"]],
                        capsize=2)
            top = max(top, r["macs_cut"], r["measured"])
        ax.plot([1, top], [1, top], "k:", lw=1, label="measured = MAC cut")
        for n in nets:
            ax.plot([], [], "s", color=colors[n], label=n)
        ax.plot([], [], "ko", mfc="none", label="macs budget")
        ax.plot([], [], "k^", label="latency budget")
        ax.set_xlabel("whole-net MAC cut (x)")
        ax.set_ylabel("measured speed-up (x)")
        ax.set_title(f"onnxruntime {result['versions']['onnxruntime']}, {t} thread(s), batch 1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", type=lambda t: _csv(t, str), default=["vgg16", "resnet50", "googlenet", "mobilenet"])
    ap.add_argument("--speedups", type=lambda t: _csv(t, float), default=[1.5, 2.0, 3.0])
    ap.add_argument("--threads", type=lambda t: _csv(t, int), default=[1, 2])
    ap.add_argument("--input", type=int, default=224, help="input height and width (224: the real nets)")
    ap.add_argument("--rounds", type=int, default=20, help="ABBA rounds per measured pair")
    ap.add_argument("--scheme", default="channel", choices=["channel", "spatial", "tucker2"])
    ap.add_argument("--timing", type=lambda t: _csv(t, str), default=["profile"],
                    help="how the latency tables are timed, one or more of profile (hot, calibrated against the "
                         "profiled net; the default), cold (caches flushed before each run), hot: several compare "
                         "their predictions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the nets' files (kept; reused when present)")
    ap.add_argument("--cache", help="latency cache folder (default: a fresh one, so the table time is a first time)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the measured-vs-MAC-cut plot here (PNG)")
    args = ap.parse_args(argv)
    import latency_nets
    from lrprune_caffe.engines.latency import TIMINGS
    if any(t not in TIMINGS for t in args.timing):
        ap.error(f"--timing: choose from {', '.join(TIMINGS)}")
    bad = [n for n in args.nets if n not in latency_nets.NETS]
    if bad:
        ap.error(f"unknown net(s) {', '.join(bad)} (choose from {', '.join(latency_nets.NETS)})")
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
