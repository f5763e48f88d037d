#!/usr/bin/env python3
"""Sweep: LeNet (trained by real Caffe) at whole-net MAC reductions of 1.5x, 2x, 3x, 4x.

For each method (the three low-rank schemes; pruning rows can be added to
:data:`METHODS`) and each target, compress ``../shared/golden/lenet_mnist``
(no fine-tuning), then measure

* top-1 accuracy on its 1,000 held-out digits (``inputs.npz`` / ``labels.npz``;
  real Caffe: 97.3%), batch 1000;
* latency at batch 1 on one thread: onnxruntime (our ONNX export) if it can
  run the net, else OpenCV's Caffe reader. The original and the compressed
  net are timed side by side: ``--rounds`` rounds, each timing ``--iters``
  back-to-back inferences of one then the other (order alternating between
  rounds); the table shows the median per-inference time over the rounds.

Pruning rows (issue 5): magnitude pruning (per layer) at ``--sparsities``
(default 50/70/80/90/95% of each conv/FC layer's weights), alone and after
factorizing (``--prune-after``, default ``channel@2,spatial@2``: that scheme at
a 2x MAC reduction, then pruning of the factorized net). Their accuracy (no
fine-tuning), nonzero params and CSR bytes; latency is not re-measured there,
since zeros in dense tensors cost a dense runtime the same time.

Data-aware rows (issue 10; ``--calib N``, default 512, ``0`` for none): the
same settings, then fit to the original net's outputs on N of the split's
training digits (``../shared/data/mnist5k_split.npz``, pixels / 256, labels
unused) by :mod:`lrprune_caffe.transforms.calibrate`: each factorization by
``calibrate_factorized``, each pruned net by ``calibrate_pruned`` (the same
magnitude masks, kept weights re-solved; after factorizing, the masks are
chosen on the calibrated factors, as ``tools/calib_lenet.py`` does). Their
method names end in ``(calib)``; the plot draws them dashed.

Usage::

    python tools/sweep_lenet.py [--targets 1.5,2,3,4] [--methods channel,spatial,tucker2]
                                [--sparsities 0.5,0.7,0.8,0.9,0.95] [--prune-after channel@2,spatial@2]
                                [--calib 512] [--rounds 15] [--iters 200] [--engine auto|onnxruntime|opencv]
                                [--plot sweep.png] [--json]

A method is ``fn(prototxt, weights, target) -> (net, info)``; ``info`` holds at
least ``macs`` and ``params`` of the result. Add rows (e.g. pruning) by adding
entries to ``METHODS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT.parent / "shared" / "golden" / "lenet_mnist"
SPLIT = ROOT.parent / "shared" / "data" / "mnist5k_split.npz"
CALIB = " (calib)"  # the suffix of data-aware method names


def _lowrank(scheme, criterion="log-energy"):
    def run(prototxt, weights, target):
        from lrprune_caffe.api import compress_files as compress
        report, net = compress(prototxt, weights, None, scheme=scheme, speedup=target, verify=False,
                               criterion=criterion, cost="macs", measure_rounds=0)  # the MAC budget, timed below
        ranks = {r["name"]: r["rank"] for r in report["layers"] if r["action"] == "factorized"}
        return net, {"macs": report["totals"]["macs_after"], "params": report["totals"]["params_after"],
                     "ranks": ranks}
    return run


def _plan(report):
    return {r["name"]: r["scheme"] for r in report["layers"] if r.get("action") == "factorized"}


def _calibrated(scheme, calib):
    """The low-rank method of ``scheme``, then ``calibrate_factorized`` on ``calib`` ({input: x})."""
    def run(prototxt, weights, target):
        from lrprune_caffe.api import compress_files as compress
        from lrprune_caffe.io.caffe import load_net
        from lrprune_caffe.transforms.calibrate import calibrate_factorized
        report, net = compress(prototxt, weights, None, scheme=scheme, speedup=target, verify=False)
        net = net.copy()
        calibrate_factorized(net, original=load_net(prototxt, weights), plan=_plan(report), calib_inputs=calib)
        ranks = {r["name"]: r["rank"] for r in report["layers"] if r["action"] == "factorized"}
        return net, {"macs": report["totals"]["macs_after"], "params": report["totals"]["params_after"],
                     "ranks": ranks}
    return run


def calib_prune_rows(prototxt, weights, sparsities, after, x, labels, engine, calib):
    """Data-aware :func:`prune_rows`: factorize (+ calibrate_factorized), the same per-layer magnitude
    masks on the result, then calibrate_pruned toward the original outputs."""
    from lrprune_caffe.export.sparse import storage_report
    from lrprune_caffe.ir.analysis import layer_stats, totals
    from lrprune_caffe.ir.masks import apply_masks
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.transforms.calibrate import calibrate_pruned
    from lrprune_caffe.transforms.prune import PruneSpec, compute_masks
    orig = load_net(prototxt, weights)
    rows = []
    bases = [("prune", None)]
    for item in [a.strip() for a in (after or "").split(",") if a.strip()]:
        scheme, _, sp = item.partition("@")
        bases.append((f"{scheme} {float(sp):g}x + prune", (scheme, float(sp))))
    for label, fact in bases:
        dense = _calibrated(fact[0], calib)(prototxt, weights, fact[1])[0] if fact else orig
        for f in sparsities:
            net = dense.copy()
            masks = compute_masks(net, PruneSpec(fraction=f))
            apply_masks(net, masks)
            calibrate_pruned(net, original=orig, masks=masks, calib_inputs=calib, dense=dense)
            st = storage_report(net)["totals"]
            t = totals(layer_stats(net))
            rows.append({"method": label + CALIB, "sparsity_target": f, "macs": int(t["macs"]),
                         "params": st["params"], "nonzero_params": st["nonzero_params"],
                         "csr_bytes": st["csr_bytes"], "dense_bytes": st["dense_bytes"],
                         "top1": accuracy(net, x, labels, engine)})
    return rows


#: method name -> fn(prototxt, weights, target MAC reduction) -> (net, info)
METHODS = {"channel": _lowrank("channel"), "spatial": _lowrank("spatial"), "tucker2": _lowrank("tucker2"),
           # the same schemes with the plain discarded-energy budget criterion, for comparison
           "channel/e": _lowrank("channel", "energy"), "spatial/e": _lowrank("spatial", "energy"),
           "tucker2/e": _lowrank("tucker2", "energy")}
DEFAULT_METHODS = "channel,spatial,tucker2"


def prune_rows(prototxt, weights, sparsities, after, x, labels, engine):
    """Accuracy of magnitude pruning (per layer) at each sparsity: alone, and after factorizing
    with ``after`` = "SCHEME@SPEEDUP" (or None)."""
    from lrprune_caffe.api import compress_files as compress
    rows = []
    bases = [("prune", None)]
    for item in [a.strip() for a in (after or "").split(",") if a.strip()]:
        scheme, _, sp = item.partition("@")
        bases.append((f"{scheme} {float(sp):g}x + prune", (scheme, float(sp))))
    for label, fact in bases:
        for f in sparsities:
            kw = dict(scheme=fact[0], speedup=fact[1], cost="macs", measure_rounds=0) if fact else {}
            report, net = compress(prototxt, weights, None, prune=f, prune_scope="layer", verify=False, **kw)
            t = report["totals"]
            rows.append({"method": label, "sparsity_target": f, "macs": t["macs_after"], "params": t["params_after"],
                         "nonzero_params": t["nonzero_params"], "csr_bytes": t["csr_bytes"],
                         "dense_bytes": t["dense_bytes"], "top1": accuracy(net, x, labels, engine)})
    return rows


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def accuracy(net, x, labels, engine):
    from lrprune_caffe.engines.runtime import run_net
    out = run_net(net, {"data": x}, ["prob"], engine=engine, threads=1)["prob"]
    return float(np.mean(np.argmax(out.reshape(len(x), -1), axis=1) == labels))


class Runner:
    """One net, batch 1, one thread, ready to call."""

    def __init__(self, net, engine):
        self.engine = engine
        if engine == "onnxruntime":
            from lrprune_caffe.export.onnx import export_model
            from lrprune_caffe.engines.runtime import ort_session
            self.sess = ort_session(export_model(net).SerializeToString(), threads=1)
            self.call = lambda x: self.sess.run(["prob"], {"data": x})
        else:
            import tempfile

            import cv2
            from lrprune_caffe.io.caffe import save_net
            cv2.setNumThreads(1)
            with tempfile.TemporaryDirectory() as d:
                save_net(net, os.path.join(d, "m.prototxt"), os.path.join(d, "m.caffemodel"))
                self.cv = cv2.dnn.readNetFromCaffe(os.path.join(d, "m.prototxt"), os.path.join(d, "m.caffemodel"))

            def call(x):
                self.cv.setInput(x, "data")
                return self.cv.forward("prob")
            self.call = call

    def time(self, x, iters):
        t0 = time.perf_counter()
        for _ in range(iters):
            self.call(x)
        return (time.perf_counter() - t0) / iters


def side_by_side(a: Runner, b: Runner, x, rounds, iters):
    for r in (a, b):  # warm-up
        r.time(x, max(10, iters // 10))
    ta, tb = [], []
    for i in range(rounds):
        pair = [(a, ta), (b, tb)] if i % 2 == 0 else [(b, tb), (a, ta)]
        for runner, out in pair:
            out.append(runner.time(x, iters))
    return statistics.median(ta), statistics.median(tb)


def pick_engine(net, requested):
    if requested in ("onnxruntime", "auto"):
        try:
            Runner(net, "onnxruntime")
            return "onnxruntime"
        except Exception as e:  # no exporter / no lowering: fall back
            if requested == "onnxruntime":
                raise
            print(f"note: onnxruntime cannot run the net ({type(e).__name__}: {e}); using OpenCV", file=sys.stderr)
    return "opencv"


def versions(engine):
    import numpy
    import scipy
    v = {"python": platform.python_version(), "numpy": numpy.__version__, "scipy": scipy.__version__,
         "cpus": os.cpu_count(), "platform": platform.platform()}
    if engine == "onnxruntime":
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    else:
        import cv2
        v["opencv"] = cv2.__version__
    return v


def plot(result, path):
    """Left: top-1 vs whole-net MAC reduction per scheme. Right: top-1 vs sparsity per pruning row."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lrprune_caffe.fileutil import atomic_write_bytes
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    base = result["rows"][0]["top1"] * 100
    by = {}
    for r in result["rows"][1:]:
        if "error" not in r:
            by.setdefault(r["method"], []).append((r["macs_reduction"], 100 * r["top1"]))
    colors = {"channel": "tab:blue", "spatial": "tab:orange", "tucker2": "tab:green", "prune": "black"}

    def color(label):  # the same scheme gets the same color in both panels
        return colors.get(label.split("/")[0].split(" ")[0], None)

    def style(label):  # data-aware rows dashed, with open markers
        return dict(ls="--", mfc="none") if label.endswith(CALIB) else dict(ls="-")
    for method, pts in by.items():
        ax.plot(*zip(*[(1.0, base)] + pts), marker="o", label=method, color=color(method), **style(method))
    ax.set_xlabel("whole-net MAC reduction (x)")
    ax.set_ylabel("top-1, no fine-tuning (%)")
    ax.set_title("low-rank schemes (dashed: calibrated on unlabeled digits)")
    ax.legend(fontsize=7)
    pr = {}
    for r in result.get("prune_rows", []):
        pr.setdefault(r["method"], []).append((100 * r["sparsity_target"], 100 * r["top1"]))
    for method, pts in pr.items():
        bx.plot(*zip(*pts), marker="o", label=method, color=color(method), **style(method))
    bx.axhline(base, ls="--", color="gray", lw=1)
    bx.set_xlabel("weights pruned per layer (%)")
    bx.set_title("magnitude pruning, alone and after factorizing")
    bx.legend(fontsize=7)
    fig.suptitle(f"real-Caffe LeNet, 1,000 test digits ({result['engine']}), no fine-tuning"
                 + (f"; calibration: {result['calib']} training digits, no labels" if result.get("calib") else ""),
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="1.5,2,3,4", help="MAC reduction factors (default 1.5,2,3,4)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(METHODS)} "
                    f"(default {DEFAULT_METHODS}; /e: plain discarded-energy budget criterion)")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95",
                    help="pruning rows: fractions of each layer's weights zeroed ('' for none)")
    ap.add_argument("--prune-after", default="channel@2,spatial@2",
                    help="pruning rows also after factorizing with SCHEME@SPEEDUP, comma list ('' for none)")
    ap.add_argument("--calib", type=int, default=512, metavar="N",
                    help="data-aware rows next to the data-free ones: calibrate on N of the split's training "
                         "digits, no labels (default 512; 0: none)")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds (median reported)")
    ap.add_argument("--iters", type=int, default=200, help="inferences per round")
    ap.add_argument("--engine", choices=["auto", "onnxruntime", "opencv"], default="auto")
    ap.add_argument("--plot", help="also draw top-1 against MAC reduction and against sparsity (PNG; needs "
                    "matplotlib, the [plot] extra)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (GOLDEN / "model.prototxt").exists():
        print(f"no golden LeNet at {GOLDEN}", file=sys.stderr)
        return 2

    from lrprune_caffe.ir.analysis import layer_stats, totals
    from lrprune_caffe.io.caffe import load_net
    prototxt, weights = str(GOLDEN / "model.prototxt"), str(GOLDEN / "model.caffemodel")
    x = _load(GOLDEN / "inputs.npz")["data"]
    labels = _load(GOLDEN / "labels.npz")
    labels = labels[next(iter(labels))].reshape(-1)
    base = load_net(prototxt, weights)
    t = totals(layer_stats(base))
    engine = pick_engine(base, args.engine)
    base_acc = accuracy(base, x, labels, engine)
    base_runner = Runner(base, engine)
    x1 = np.ascontiguousarray(x[:1])
    rows = [{"method": "original", "target": 1.0, "macs": t["macs"], "params": t["params"],
             "macs_reduction": 1.0, "top1": base_acc, "latency_ms": None, "orig_latency_ms": None}]
    methods = {m: METHODS[m] for m in [m.strip() for m in args.methods.split(",") if m.strip()]}
    calib = None
    if args.calib:
        if not SPLIT.exists():
            print(f"no {SPLIT}: no data-aware rows", file=sys.stderr)
        else:
            with np.load(SPLIT) as z:
                calib = {"data": z["x_train"][:args.calib, None].astype(np.float32) / 256}
            for m in list(methods):
                if "/" not in m:
                    methods[m + CALIB] = _calibrated(m, calib)
    for method, fn in methods.items():
        for target in [float(s) for s in args.targets.split(",")]:
            try:
                net, info = fn(prototxt, weights, target)
            except Exception as e:
                rows.append({"method": method, "target": target, "error": " ".join(str(e).split())})
                continue
            acc = accuracy(net, x, labels, engine)
            t_orig, t_new = side_by_side(base_runner, Runner(net, engine), x1, args.rounds, args.iters)
            rows.append({"method": method, "target": target, "macs": info["macs"], "params": info["params"],
                         "macs_reduction": t["macs"] / info["macs"], "top1": acc,
                         "latency_ms": t_new * 1e3, "orig_latency_ms": t_orig * 1e3,
                         "measured_speedup": t_orig / t_new, "ranks": info.get("ranks")})
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    prows = prune_rows(prototxt, weights, sparsities, args.prune_after or None, x, labels, engine) \
        if sparsities else []
    if sparsities and calib is not None:
        prows += calib_prune_rows(prototxt, weights, sparsities, args.prune_after or None, x, labels, engine,
                                  calib)
    result = {"versions": versions(engine), "engine": engine, "threads": 1, "batch_latency": 1,
              "rounds": args.rounds, "iters": args.iters, "caffe_top1": 0.973, "rows": rows,
              "prune_rows": prows, "calib": len(calib["data"]) if calib is not None else 0}
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    v = result["versions"]
    print("  ".join(f"{k} {v[k]}" for k in v if k != "platform") + f"  ({v['platform']})")
    print(f"LeNet (real Caffe top-1 97.3% on the 1,000 held-out digits); no fine-tuning; latency: {engine}, "
          f"1 thread, batch 1, median of {args.rounds} rounds x {args.iters} runs, original timed alongside"
          + (f"; '{CALIB.strip()}' rows: calibrated on {result['calib']} training digits, no labels"
             if result["calib"] else ""))
    hdr = f"{'method':<18} {'target':>6} {'MACs':>10} {'MACs red.':>9} {'params':>8} {'top-1':>7} " \
          f"{'orig ms':>8} {'new ms':>8} {'speedup':>7}  ranks"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<18} {r['target']:>6.1f}  error: {r['error']}")
            continue
        lat = "" if r["latency_ms"] is None else \
            f"{r['orig_latency_ms']:8.4f} {r['latency_ms']:8.4f} {r['measured_speedup']:6.2f}x"
        ranks = ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in (r.get("ranks") or {}).items())
        print(f"{r['method']:<18} {r['target']:>6.1f} {r['macs']:>10,} {r['macs_reduction']:>8.2f}x "
              f"{r['params']:>8,} {100 * r['top1']:>6.1f}% {lat:>25}  {ranks}")
    if prows:
        print(f"\nPruning (magnitude, per layer; no fine-tuning; accuracy with {engine}):")
        hdr = f"{'method':<30} {'sparsity':>8} {'MACs':>10} {'params':>8} {'nonzero':>8} {'CSR bytes':>10} {'top-1':>7}"
        print(hdr)
        print("-" * len(hdr))
        for r in prows:
            print(f"{r['method']:<30} {100 * r['sparsity_target']:>7.0f}% {r['macs']:>10,} {r['params']:>8,} "
                  f"{r['nonzero_params']:>8,} {r['csr_bytes']:>10,} {100 * r['top1']:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
