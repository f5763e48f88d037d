#!/usr/bin/env python3
"""Benchmark, mobile-like: 1 thread, batch 1; fp32 vs fp16 vs int8; original vs compressed, side by side.

What it does, per golden case (default: lenet_mnist and alexnet_mini):

1. exports the original net to ONNX (fp32) and compresses it
   (``compress --speedup S --onnx --no-verify``, default S = 2; factorization only, a dense net);
2. makes fp16 and int8 versions of both with ``lrprune_caffe.export.precision.reduce_precision``
   (int8 calibrated on the MNIST training digits for LeNet, on the case's inputs otherwise);
3. times all six files in ONE run, interleaved (``engines.bench.bench_nets``: each round runs every
   model once, the order reversed every other round, so drift hits all alike), at 1 intra-op
   thread and batch 1; reports the median (and p90) per file, the ratio to the original fp32, the
   file size, and the accuracy on LeNet's 1,000 held-out digits (real Caffe: 0.973) or, for the
   other nets, the relative L2 distance of the output to the original fp32 on the case's inputs;
4. with ``--mnn`` also times MNN (1 thread) on the files it takes: fp32 and fp16 (as MNN stores
   them: ``mnnconvert --fp16`` of the fp32 file) and its own int8 (``--weightQuantBits 8`` of the
   fp32 file; MNN does not take onnxruntime's QDQ files, see tests/test_mobile_matrix.py).

The golden nets other than LeNet have seeded random weights (flat spectra): their compressed
versions' distance to the original says nothing about a trained net's accuracy; time and size do.
Numbers from a shared, noisy machine are preliminary: rerun on a quiet one. This measures; it asserts
nothing. Versions, threads and the CPU are printed with the numbers.

Usage::

    python tools/bench_mobile.py [--cases lenet_mnist,alexnet_mini] [--speedup 2] [--runs 200]
                                 [--warmup 20] [--mnn] [--json] [--golden DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOLDEN = ROOT.parent / "shared" / "golden"
SPLIT = ROOT.parent / "shared" / "data" / "mnist5k_split.npz"
KINDS = ("fp32", "fp16", "int8")


def _npz(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def build(case, golden, workdir, speedup):
    """[(label, OnnxModel)] for original/compressed x fp32/fp16/int8, plus the evaluation data."""
    import onnx
    from lrprune_caffe.api import compress_files as compress
    from lrprune_caffe.engines.model import OnnxModel
    from lrprune_caffe.export.onnx import export_model
    from lrprune_caffe.export.precision import reduce_precision
    from lrprune_caffe.io.caffe import load_net
    d = Path(golden) / case
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    name = net.inputs()[0]
    inputs = _npz(d / "inputs.npz")
    if case.startswith("lenet") and SPLIT.exists():
        calib = {name: _npz(SPLIT)["x_train"][:1000, None].astype(np.float32) / np.float32(256)}
        labels = _npz(d / "labels.npz")["labels"]
    else:
        calib, labels = {name: inputs[name]}, None
    out = Path(workdir) / case
    compress(d / "model.prototxt", d / "model.caffemodel", out, speedup=speedup, onnx=True, verify=False)
    sources = {"original": export_model(net), "compressed": onnx.load(str(out / "model.onnx"))}
    models = []
    for src, fp32 in sources.items():
        for kind in KINDS:
            if kind == "fp32":
                m = fp32
            elif kind == "fp16":
                m = reduce_precision(fp32, precision="fp16")[0]
            else:
                m = reduce_precision(fp32, quantize="int8", calib=calib)[0]
            path = out / f"{src}_{kind}.onnx"
            onnx.save(m, str(path))
            models.append((f"{src} {kind}", OnnxModel.load(str(path))))
    return models, {name: inputs[name]}, labels


def quality(models, inputs, labels, case, golden):
    """LeNet: top-1 on the held-out digits; others: relative L2 of the output to the original fp32."""
    res = {}
    if labels is not None:
        x = _npz(Path(golden) / case / "inputs.npz")
        for label, m in models:
            out = m.run({m.inputs()[0]: x[m.inputs()[0]]}, threads=1)[m.outputs()[0]]
            res[label] = {"top1": float(np.mean(out.reshape(len(out), -1).argmax(1) == labels))}
        return res
    ref = None
    for label, m in models:
        out = m.run(inputs, threads=1)[m.outputs()[0]].astype(np.float64)
        ref = out if ref is None else ref
        res[label] = {"rel_l2_vs_original_fp32": float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))}
    return res


def bench_mnn(models, runs, warmup, workdir):
    """MNN, 1 thread, batch 1, interleaved: fp32, fp16 storage and MNN's own int8 weights of each fp32 file."""
    import _tools
    import MNN
    import MNN.expr as F
    runners = []
    for label, m in models:
        if not label.endswith("fp32"):
            continue
        src = label.split()[0]
        for kind, flags in (("fp32", []), ("fp16 (mnnconvert --fp16)", ["--fp16"]),
                            ("int8 weights (mnnconvert --weightQuantBits 8)", ["--weightQuantBits", "8"])):
            target = os.path.join(workdir, f"{src}_{kind.split()[0]}.mnn")
            if not _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", m.source, "--MNNModel", target,
                                      "--bizCode", "lrprune-caffe", *flags]):
                continue
            config = {"numThread": 1, "backend": "CPU"}
            rt = MNN.nn.create_runtime_manager((config,))
            name = m.inputs()[0]
            mod = MNN.nn.load_module_from_file(target, [name], m.outputs(), runtime_manager=rt)
            shape = [1, *[d or 1 for d in m.shapes[name][1:]]]
            x = F.const(np.random.default_rng(0).standard_normal(shape).astype(np.float32), shape, F.NCHW)
            runners.append((f"{src} {kind}", os.path.getsize(target), lambda mod=mod, x=x: mod.forward([x])))
    for _, _, r in runners:
        for _ in range(warmup):
            r()
    times = [[] for _ in runners]
    for rnd in range(runs):
        order = range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            t0 = time.perf_counter()
            out = runners[i][2]()
            np.asarray(F.convert(out[0], F.NCHW).read())  # MNN may compute lazily: read the output
            times[i].append(time.perf_counter() - t0)
    return [{"label": lab, "bytes": size, "median_ms": 1e3 * statistics.median(t),
             "p90_ms": 1e3 * sorted(t)[int(0.9 * (len(t) - 1))]} for (lab, size, _), t in zip(runners, times)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="lenet_mnist,alexnet_mini")
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--mnn", action="store_true", help="also time MNN on the files it takes")
    ap.add_argument("--golden", default=str(GOLDEN))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from lrprune_caffe.engines.bench import bench_nets
    results = []
    with tempfile.TemporaryDirectory() as work:
        for case in args.cases.split(","):
            models, inputs, labels = build(case, args.golden, work, args.speedup)
            qual = quality(models, inputs, labels, case, args.golden)
            res = bench_nets([m for _, m in models], runtime="onnxruntime", threads=1, runs=args.runs,
                             warmup=args.warmup, labels=[lab for lab, _ in models], progress=False)
            base = res["nets"][0]["median_ms"]
            rows = []
            for (label, m), n in zip(models, res["nets"]):
                rows.append({"label": label, "bytes": len(m.data), "median_ms": n["median_ms"],
                             "p90_ms": n["p90_ms"], "vs_original_fp32": n["median_ms"] / base, **qual[label]})
            entry = {"case": case, "onnxruntime": rows, "versions": res["versions"], "threads": 1, "batch": 1,
                     "runs": args.runs, "warmup": args.warmup}
            if args.mnn:
                import MNN
                entry["mnn"] = bench_mnn(models, args.runs, args.warmup, work)
                entry["versions"]["mnn"] = MNN.version()
            results.append(entry)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for e in results:
        v = e["versions"]
        print(f"\n{e['case']}: onnxruntime {v['onnxruntime']}, 1 thread, batch 1, median of {e['runs']} interleaved "
              f"rounds after {e['warmup']} warmup; {v['machine']}, {v['cpu_count']} cpus, python {v['python']}")
        print(f"{'model':<22}{'bytes':>12}{'median ms':>11}{'p90 ms':>9}{'vs orig fp32':>14}  quality")
        for r in e["onnxruntime"]:
            q = (f"top-1 {r['top1']:.3f}" if "top1" in r else f"rel L2 {r['rel_l2_vs_original_fp32']:.2e}")
            print(f"{r['label']:<22}{r['bytes']:>12,}{r['median_ms']:>11.3f}{r['p90_ms']:>9.3f}"
                  f"{r['vs_original_fp32']:>13.2f}x  {q}")
        if "mnn" in e:
            print(f"MNN {v['mnn']}, 1 thread:")
            for r in e["mnn"]:
                print(f"  {r['label']:<52}{r['bytes']:>10,} bytes  median {r['median_ms']:.3f} ms "
                      f"(p90 {r['p90_ms']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
