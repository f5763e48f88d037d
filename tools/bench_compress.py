#!/usr/bin/env python3
"""Benchmark: ``compress --speedup 2`` on a VGG-16-sized model, end to end.

What it does

1. builds VGG-16 (``tools/bench_io.py: build_vgg16``, seeded He-normal
   weights, 138M params, ~553 MB caffemodel) and writes it once (not measured);
2. in a fresh subprocess per run, after imports, times
   ``lrprune_caffe.api.compress_files(prototxt, caffemodel, outdir, speedup=S,
   scheme=..., verify=False, cost="macs", measure_rounds=0)`` (the MAC budget; the latency cost's
   tables and measurement are ``tools/bench_latency.py``'s): read + validate, singular values of every
   eligible layer, rank budget, factorization, write of model.prototxt /
   model.caffemodel / report.json / report.md (the CLI's ``compress ...
   --no-verify``); with ``--verify`` the onnxruntime check is included;
3. repeats ``--repeat`` times (default 3); prints the median (min/max) time,
   the per-step times of the median run, and peak memory: the process's
   high-water mark (``VmHWM``; includes the Python imports) and its rise over
   the resident size just before ``compress`` started.

Thread count: BLAS/LAPACK (OpenBLAS via numpy/scipy) use their default pool
(all cores) unless ``--threads N`` (sets OPENBLAS/OMP/MKL_NUM_THREADS for the
child); eigensolvers on Gram matrices up to 1024 wide run single-threaded
(threadpoolctl). Random weights have flat spectra, so the ranks (and the
accuracy) mean nothing here: this measures time and memory only.

Usage::

    python tools/bench_compress.py [--speedup 2] [--scheme channel] [--repeat 3] [--threads N]
                                   [--verify] [--calib N] [--json] [--workdir DIR] [--keep]
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


def child(prototxt, caffemodel, outdir, speedup, scheme, verify, calib="") -> dict:
    import numpy  # noqa: F401  (imports are not part of the measurement)
    import scipy.linalg  # noqa: F401
    import tqdm  # noqa: F401

    from lrprune_caffe import api
    from lrprune_caffe.core import calib as cb, compress as core

    # the steps of compress_files / core.compress, timed where they are looked up
    steps = {}
    for mod, attr, name in ((api, "load_net", "load"), (core, "plan_ranks", "rank"),
                            (core, "factorize_net", "factorize"), (core, "prune_new", "prune"),
                            (core, "check_compressed", "verify"), (core, "export_onnx", "onnx"),
                            (core, "build_report", "report"), (api, "write_net", "write"),
                            (cb, "layer_statistics", "calib_budget"), (cb, "fit_factorized", "calib_fit"),
                            (cb, "fit_pruned", "calib_prune")):
        def wrap(*a, fn=getattr(mod, attr), name=name, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - t
        setattr(mod, attr, wrap)
    base = _status_kb("VmRSS") or 0
    t0 = time.perf_counter()
    report, _ = api.compress_files(prototxt, caffemodel, outdir, speedup=float(speedup), scheme=scheme,
                                   verify=verify == "1", calib=calib or None, cost="macs",
                                   measure_rounds=0)  # MAC budget, as before
    seconds = time.perf_counter() - t0
    peak = _peak_kb()
    fact = [r for r in report["layers"] if r["action"] == "factorized"]
    try:
        from threadpoolctl import threadpool_info
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    except Exception:
        blas = None
    return {"seconds": seconds, "steps": steps, "peak_bytes": peak * 1024, "peak_extra_bytes": (peak - base) * 1024,
            "factorized": len(fact), "eligible": sum(1 for r in report["layers"] if r.get("scheme")),
            "macs_reduction": report["selected_totals"]["macs_reduction"], "blas": blas,
            "written_bytes": sum(os.path.getsize(os.path.join(outdir, f)) for f in os.listdir(outdir))}


def run_child(prototxt, caffemodel, outdir, speedup, scheme, verify, threads=None, calib="") -> dict:
    from bench_io import run_json_child
    shutil.rmtree(outdir, ignore_errors=True)
    return run_json_child(os.path.abspath(__file__), [prototxt, caffemodel, outdir, speedup, scheme,
                                                      "1" if verify else "0", calib], threads, what="compress")


def versions() -> dict:
    import platform

    import numpy
    import scipy

    import lrprune_caffe
    return {"python": platform.python_version(), "numpy": numpy.__version__, "scipy": scipy.__version__,
            "lrprune_caffe": lrprune_caffe.__version__, "cpus": os.cpu_count(), "platform": platform.platform()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--scheme", default="channel", choices=["channel", "spatial", "tucker2"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads in the child (default: all cores)")
    ap.add_argument("--verify", action="store_true",
                    help="include the check (onnxruntime; batch 1, or the held-out calibration images)")
    ap.add_argument("--calib", type=int, default=0, metavar="N",
                    help="compress --calib with N seeded random 224x224 images (x.npz; fits the factors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the model files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
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
            calib = str(work / f"calib{args.calib}.npz")
            rng = np.random.default_rng(args.seed)
            np.savez(calib, x=rng.standard_normal((args.calib, 3, 224, 224), dtype=np.float32))
        runs = [run_child(proto, model, str(work / "out"), args.speedup, args.scheme, args.verify, args.threads,
                          calib) for _ in range(args.repeat)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    times = [r["seconds"] for r in runs]
    med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    result = {"versions": versions(), "threads": args.threads or f"default ({os.cpu_count()} cores)",
              "model": {"name": "VGG-16 (224x224, seeded He-normal weights)", "params": VGG16_PARAMS,
                        "caffemodel_bytes": os.path.getsize(model) if args.keep else None},
              "speedup": args.speedup, "scheme": args.scheme, "verify": args.verify, "calib": args.calib,
              "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
              "peak_bytes_max": max(r["peak_bytes"] for r in runs),
              "peak_extra_bytes_max": max(r["peak_extra_bytes"] for r in runs),
              "median_run": med, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    v = result["versions"]
    print("  ".join(f"{k} {v[k]}" for k in v if k != "platform") + f"  ({v['platform']})")
    if med.get("blas"):
        print("BLAS: " + ", ".join(f"{b['internal_api']} {b['version']} x{b['num_threads']} threads"
                                   for b in med["blas"]))
    print(f"VGG-16 ({VGG16_PARAMS:,} params), compress --scheme {args.scheme} --speedup {args.speedup}"
          f"{'' if args.verify else ' --no-verify'}{f' --calib ({args.calib} images)' if args.calib else ''}: "
          f"{med['factorized']} of {med['eligible']} layers factorized, "
          f"selected MACs / {med['macs_reduction']:.2f}")
    print(f"end to end (read, spectra, budget, factorize, write): median {result['median_s']:.2f} s "
          f"(min {result['min_s']:.2f}, max {result['max_s']:.2f}) over {args.repeat} fresh subprocesses")
    print("median run steps: " + ", ".join(f"{k} {s:.2f}s" for k, s in med["steps"].items() if s >= 0.005))
    print(f"peak memory: {result['peak_bytes_max'] / 1e9:.2f} GB process high-water mark "
          f"({result['peak_extra_bytes_max'] / 1e9:.2f} GB above the resident size before compress)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
