#!/usr/bin/env python3
"""Benchmark: ``compress --speedup 2`` on a VGG-16-sized model, end to end, as users run it.

What it does

1. builds VGG-16 (``tools/bench_io.py: build_vgg16``, seeded He-normal
   weights, 138M params, ~553 MB caffemodel) and writes it once (not measured);
   with ``--calib N`` also N seeded standard-normal images at the net's input
   size (``calib.npz``, not measured);
2. in a fresh subprocess per run, after imports, times
   ``lrprune_caffe.api.compress_files(prototxt, caffemodel, outdir, speedup=S,
   scheme=..., verify=True, calib=..., cost="macs", measure_rounds=0)`` (the MAC budget; the latency cost's
   tables and measurement are ``tools/bench_latency.py``'s): read + validate, singular values of every
   eligible layer, rank budget, factorization (with ``--calib``: the response statistics, the
   calibration fits), the default check (both nets on onnxruntime: batch 1 of seeded inputs, or the
   held-out calibration images), write of model.prototxt / model.caffemodel / report.json /
   report.md; ``--no-verify`` leaves the check out (the CLI's ``compress ... --no-verify``);
3. repeats ``--repeat`` times (default 3); prints the median (min/max) wall time and the CPU time
   (user + system, every thread of the child) of the same runs, the per-step times of the median
   run, peak memory (the process's high-water mark ``VmHWM``, which includes the Python
   imports, and its rise over the resident size just before ``compress`` started), the BLAS
   threads, and the machine's load average (``/proc/loadavg``) before and after each run: on a
   shared machine wall time is inflated by the load, CPU time much less.

Thread count: BLAS/LAPACK (OpenBLAS via numpy/scipy) use their default pool
(all cores) unless ``--threads N`` (sets OPENBLAS/OMP/MKL_NUM_THREADS for the
child and compress's ``threads`` for onnxruntime). Random weights have flat spectra, so the ranks
(and the accuracy) mean nothing here: this measures time and memory only.

Usage::

    python tools/bench_compress.py [--speedup 2] [--scheme channel] [--repeat 3] [--threads N]
                                   [--no-verify] [--calib [N]] [--json] [--workdir DIR] [--keep]

The two numbers of issue 10 (item 8)::

    python tools/bench_compress.py --threads 2                    # default check: <= 15 s, 2.0 GB
    python tools/bench_compress.py --threads 2 --calib 64 --repeat 1   # <= 90 s, 3 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))


def _status_kb(key: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_kb():
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _loadavg():
    try:
        with open("/proc/loadavg") as fh:
            return [float(v) for v in fh.read().split()[:3]]
    except OSError:
        return None


def _cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(prototxt, caffemodel, outdir, speedup, scheme, verify, calib="", threads="") -> dict:
    import numpy  # noqa: F401  (imports are not part of the measurement)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import scipy.linalg  # noqa: F401
    import tqdm  # noqa: F401

    from lrprune_caffe import api
    from lrprune_caffe.core import calib as cb, compress as core

    # the steps of compress_files / core.compress, timed where they are looked up; a thread samples the
    # resident size every 50 ms to say which step holds the peak
    steps, step_peak, current = {}, {}, ["-"]
    for mod, attr, name in ((api, "load_net", "load"), (core, "plan_ranks", "rank"),
                            (core, "factorize_net", "factorize"), (core, "prune_new", "prune"),
                            (core, "check_compressed", "check"), (core, "export_onnx", "onnx"),
                            (core, "build_report", "report"), (api, "write_net", "write"),
                            (cb, "layer_statistics", "calib_stats"), (cb, "fit_factorized", "calib_fit"),
                            (cb, "fit_pruned", "calib_prune")):
        def wrap(*a, fn=getattr(mod, attr), name=name, **k):
            t, outer = time.perf_counter(), current[0]
            current[0] = name
            try:
                return fn(*a, **k)
            finally:
                current[0] = outer
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - t
        setattr(mod, attr, wrap)
    import threading
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            kb = _status_kb("VmRSS") or 0
            step_peak[current[0]] = max(step_peak.get(current[0], 0), kb * 1024)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    base = _status_kb("VmRSS") or 0
    load0 = _loadavg()
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    report, _ = api.compress_files(prototxt, caffemodel, outdir, speedup=float(speedup), scheme=scheme,
                                   verify=verify == "1", calib=calib or None, cost="macs",
                                   measure_rounds=0, threads=int(threads) if threads else None)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    stop.set()
    sampler.join()
    peak = _peak_kb()
    fact = [r for r in report["layers"] if r["action"] == "factorized"]
    try:
        from threadpoolctl import threadpool_info
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    except Exception:
        blas = None
    ver = report.get("verification") or {}
    return {"seconds": seconds, "cpu_seconds": cpu, "steps": steps, "rss_peak_by_step": step_peak,
            "peak_bytes": peak * 1024,
            "peak_extra_bytes": (peak - base) * 1024, "load_before": load0, "load_after": _loadavg(),
            "factorized": len(fact), "eligible": sum(1 for r in report["layers"] if r.get("scheme")),
            "macs_reduction": report["selected_totals"]["macs_reduction"], "blas": blas,
            "check": None if ver.get("skipped") else {"inputs": ver.get("inputs"), "batch": ver.get("batch")},
            "calibration": {k: (report.get("calibration") or {}).get(k) for k in ("samples", "held_out", "forward")}
            if report.get("calibration") else None,
            "written_bytes": sum(os.path.getsize(os.path.join(outdir, f)) for f in os.listdir(outdir))}


def run_child(prototxt, caffemodel, outdir, speedup, scheme, verify, threads=None, calib="") -> dict:
    from bench_io import run_json_child
    shutil.rmtree(outdir, ignore_errors=True)
    return run_json_child(os.path.abspath(__file__), [prototxt, caffemodel, outdir, speedup, scheme,
                                                      "1" if verify else "0", calib, threads or ""], threads,
                          what="compress")


def versions() -> dict:
    import platform

    import numpy
    import scipy

    import lrprune_caffe
    return {"python": platform.python_version(), "numpy": numpy.__version__, "scipy": scipy.__version__,
            "lrprune_caffe": lrprune_caffe.__version__, "cpus": os.cpu_count(), "platform": platform.platform()}


def _load(v) -> str:
    return "?" if not v else "/".join(f"{x:.1f}" for x in v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--scheme", default="channel", choices=["channel", "spatial", "tucker2"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS and onnxruntime threads in the child (default: all cores)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="leave out compress's default check (onnxruntime; batch 1, or the held-out calibration "
                         "images)")
    ap.add_argument("--verify", action="store_true", default=True, help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--calib", type=int, nargs="?", const=64, default=0, metavar="N",
                    help="compress --calib with N (default 64) seeded standard-normal images of the net's input "
                         "size (calib.npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the model files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from bench_io import VGG16_PARAMS, build_vgg16  # the shared VGG-16 builder
    from lrprune_caffe.io import caffe as caffe_io

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_compress_"))
    work.mkdir(parents=True, exist_ok=True)
    proto, model = str(work / "vgg16.prototxt"), str(work / "vgg16.caffemodel")
    try:
        if not (os.path.exists(model) and os.path.exists(proto)):
            net = build_vgg16(args.seed)
            assert net.params() == VGG16_PARAMS
            caffe_io.save_net(net, proto, model)
            del net
        calib = ""
        if args.calib:
            import numpy as np
            shape = caffe_io.load_net(proto).input_shapes()
            (name, dims), = shape.items()
            calib = str(work / f"calib{args.calib}_seed{args.seed}.npz")
            if not os.path.exists(calib):
                rng = np.random.default_rng(args.seed)
                np.savez(calib, **{name: rng.standard_normal((args.calib, *dims[1:]), dtype=np.float32)})
        runs = []
        for _ in range(args.repeat):
            runs.append(run_child(proto, model, str(work / "out"), args.speedup, args.scheme, args.verify,
                                  args.threads, calib))
            if not args.json:
                r = runs[-1]
                print(f"  run {len(runs)}: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, peak "
                      f"{r['peak_bytes'] / 1e9:.2f} GB, load {_load(r['load_before'])} -> {_load(r['load_after'])}",
                      file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    times = [r["seconds"] for r in runs]
    cpus = [r["cpu_seconds"] for r in runs]
    med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    result = {"versions": versions(), "threads": args.threads or f"default ({os.cpu_count()} cores)",
              "model": {"name": "VGG-16 (224x224, seeded He-normal weights)", "params": VGG16_PARAMS,
                        "caffemodel_bytes": os.path.getsize(model) if args.keep else None},
              "speedup": args.speedup, "scheme": args.scheme, "verify": args.verify, "calib": args.calib,
              "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
              "median_cpu_s": statistics.median(cpus), "min_cpu_s": min(cpus), "max_cpu_s": max(cpus),
              "peak_bytes_max": max(r["peak_bytes"] for r in runs),
              "peak_extra_bytes_max": max(r["peak_extra_bytes"] for r in runs),
              "load": [[r["load_before"], r["load_after"]] for r in runs],
              "median_run": med, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    v = result["versions"]
    print("  ".join(f"{k} {v[k]}" for k in v if k != "platform") + f"  ({v['platform']})")
    if med.get("blas"):
        print("BLAS: " + ", ".join(f"{b['internal_api']} {b['version']} x{b['num_threads']} threads"
                                   for b in med["blas"]) + f"; onnxruntime threads: {args.threads or 'default'}")
    cal = f" --calib ({args.calib} seeded random images)" if args.calib else ""
    print(f"VGG-16 ({VGG16_PARAMS:,} params), compress --scheme {args.scheme} --speedup {args.speedup}"
          f"{'' if args.verify else ' --no-verify'}{cal}: {med['factorized']} of {med['eligible']} layers "
          f"factorized, selected MACs / {med['macs_reduction']:.2f}")
    if med.get("calibration"):
        c = med["calibration"]
        print(f"calibration: {c['samples']} fit, {c['held_out']} held out, forward {c['forward']}")
    if med.get("check"):
        print(f"check: {med['check']['inputs']} (batch {med['check']['batch']})")
    print(f"end to end: median {result['median_s']:.2f} s wall (min {result['min_s']:.2f}, max "
          f"{result['max_s']:.2f}), CPU {result['median_cpu_s']:.2f} s (min {result['min_cpu_s']:.2f}, max "
          f"{result['max_cpu_s']:.2f}) over {args.repeat} fresh subprocesses")
    print("median run steps (wall): " + ", ".join(f"{k} {s:.2f}s" for k, s in med["steps"].items() if s >= 0.005))
    print(f"peak memory: {result['peak_bytes_max'] / 1e9:.2f} GB process high-water mark "
          f"({result['peak_extra_bytes_max'] / 1e9:.2f} GB above the resident size before compress)")
    print("median run, resident size sampled every 50 ms, highest per step: " +
          ", ".join(f"{k} {b / 1e9:.2f} GB" for k, b in med["rss_peak_by_step"].items()))
    print("load average (1/5/15 min) before -> after each run: " +
          "; ".join(f"{_load(a)} -> {_load(b)}" for a, b in result["load"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
