"""LeNet top-1 with and without calibration, for issue 10's "Done when" rows.

Data-free: ``compress`` (the same rank selection and pruning masks as the
CLI). Data-aware: the same plan, then ``calibrate_factorized`` on 512 of the
split's training digits (labels unused), then the same global magnitude
masks on the calibrated factors and ``calibrate_pruned``. Top-1 on the 1,000
held-out digits, by the numpy forward (checked against real Caffe's blobs in
tests/test_calibrate.py) and, with ``--onnx``, by onnxruntime on the exported
nets. No fine-tuning.

    PYTHONPATH=. python tools/calib_lenet.py [--n 512] [--onnx] [--sparsegpt]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np

from lrprune_caffe.api import compress_files as compress
from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.transforms.calibrate import calibrate_factorized, calibrate_pruned
from lrprune_caffe.transforms.forward import forward
from lrprune_caffe.ir.masks import apply_masks
from lrprune_caffe.transforms.prune import PruneSpec, compute_masks

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden" / "lenet_mnist"
SPLIT = ROOT.parent / "shared" / "data" / "mnist5k_split.npz"

ROWS = [
    ("channel 3x", dict(speedup=3, scheme="channel"), None),
    ("prune 90% global", dict(), 0.9),
    ("prune 95% global", dict(), 0.95),
    ("channel 2x + 80% global", dict(speedup=2, scheme="channel"), 0.8),
    ("spatial 3x + 90% global", dict(speedup=3, scheme="spatial"), 0.9),
    ("tucker2 3x", dict(speedup=3, scheme="tucker2"), None),
    ("spatial 3x", dict(speedup=3, scheme="spatial"), None),
]


def top1(net, x, y):
    return float(np.mean(forward(net, {"data": x})["prob"].argmax(1) == y))


def onnx_top1(net, x, y):
    from lrprune_caffe.engines.runtime import run_onnxruntime
    out = run_onnxruntime(net, {"data": x}, outputs=["prob"])["prob"]
    return float(np.mean(out.reshape(len(x), -1).argmax(1) == y))


def plan_of(report):
    return {r["name"]: r["scheme"] for r in report["layers"] if r.get("action") == "factorized"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="calibration digits (default 512)")
    ap.add_argument("--onnx", action="store_true", help="also score with onnxruntime")
    ap.add_argument("--sparsegpt", action="store_true", help="choose masks by SparseGPT saliency")
    ap.add_argument("--prior", default="dense", choices=("dense", "zero"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled conv positions")
    args = ap.parse_args(argv)
    proto, weights = str(GOLDEN / "model.prototxt"), str(GOLDEN / "model.caffemodel")
    with np.load(SPLIT) as z:
        cal = {"data": z["x_train"][:args.n, None].astype(np.float32) / 256}
        x_test, y_test = z["x_test"][:, None].astype(np.float32) / 256, z["y_test"]
    orig = load_net(proto, weights)
    print(f"original: top-1 {top1(orig, x_test, y_test):.3f}")
    print(f"| setting | data-free | calibrated ({args.n} digits) | factorize + calibrate time |")
    print("| --- | --- | --- | --- |")
    for label, fopts, frac in ROWS:
        kw = dict(fopts)
        if frac is not None:
            kw.update(prune=frac, prune_scope="global")
        report, free = compress(proto, weights, verify=False, **kw)
        t0 = time.perf_counter()
        if fopts:
            rep_f, net = compress(proto, weights, verify=False, **fopts)
            net = copy.deepcopy(net)
            calibrate_factorized(net, original=orig, plan=plan_of(rep_f), calib_inputs=cal, seed=args.seed)
        else:
            net = copy.deepcopy(orig)
        if frac is not None:
            dense = copy.deepcopy(net)
            masks = compute_masks(net, PruneSpec(fraction=frac, scope="global"))
            apply_masks(net, masks)
            calibrate_pruned(net, original=orig, masks=masks, calib_inputs=cal, dense=dense, prior=args.prior,
                             seed=args.seed, prune_method="sparsegpt" if args.sparsegpt else "resolve")
        dt = time.perf_counter() - t0
        a, b = top1(free, x_test, y_test), top1(net, x_test, y_test)
        extra = ""
        if args.onnx:
            extra = f" (onnxruntime: {onnx_top1(free, x_test, y_test):.3f} / {onnx_top1(net, x_test, y_test):.3f})"
        print(f"| {label} | {a:.3f} | {b:.3f}{extra} | {dt:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
