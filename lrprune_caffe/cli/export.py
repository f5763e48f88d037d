"""``export-onnx`` and ``bench`` sub-commands (registered by :mod:`lrprune_caffe.cli.main`; never imports it).

They parse arguments and call :mod:`lrprune_caffe.export.onnx` /
:mod:`lrprune_caffe.engines.bench`; nothing else.
"""

from __future__ import annotations

import json
import sys

from lrprune_caffe.errors import UserError
from .common import add_output


def _shape(s) -> str:
    return "x".join(str(d) for d in s) if s else "?"


def cmd_export_onnx(args) -> int:
    reduced = args.precision != "fp32" or args.quantize or args.calib or args.inputs or args.labels
    if reduced:
        from lrprune_caffe.engines.model import export_onnx_files
        rep = export_onnx_files(args.net, args.weights, args.output, precision=args.precision,
                                quantize=args.quantize, calib=args.calib, inputs=args.inputs, labels=args.labels,
                                phase=args.phase, opset=args.opset, dynamic_batch=args.dynamic_batch,
                                fold_bn=args.fold_bn, cut=args.cut)
    else:
        from lrprune_caffe.export.onnx import export_files
        rep = export_files(args.net, args.weights, args.output, phase=args.phase, opset=args.opset,
                           dynamic_batch=args.dynamic_batch, fold_bn=args.fold_bn, cut=args.cut)
    if args.json:
        from lrprune_caffe.engines.compare import json_safe
        rep = json_safe(rep)
        print(json.dumps(rep, indent=2))
        return 0
    print(f"wrote {rep['path']}: opset {rep['opset']} (IR {rep['ir_version']}), {rep['nodes']} nodes, "
          f"{rep['params']:,} weights, {rep['bytes']:,} bytes"
          + (", dynamic batch N" if rep["dynamic_batch"] else ""))
    print(f"inputs: {', '.join(rep['inputs'])}   outputs: {', '.join(rep['outputs'])}")
    _print_precision(rep)
    fb = rep.get("fold_bn")
    if fb is not None:
        folded = [d for d in fb["details"] if d.get("folded")]
        kept = [d for d in fb["details"] if not d.get("folded")]
        if folded:
            print(f"fold-bn: folded {len(folded)} BatchNorm layer(s) into their convolutions")
        else:
            print(f"fold-bn: nothing folded ({fb['reason']})")
        for d in kept:
            print(f"fold-bn: kept '{d['layer']}': {d['reason']}")
    for note in rep.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _print_precision(rep) -> None:
    prec, check = rep.get("precision"), rep.get("check")
    if prec:
        what = "int8 QDQ" if prec["quantize"] else prec["precision"]
        print(f"{what}: {prec['bytes']:,} bytes, {prec['size_ratio']:.3f}x the fp32 file "
              f"({prec['bytes_fp32']:,} bytes), by {prec['tool'] or 'no conversion'}")
        cal = prec.get("calibration")
        if cal:
            print(f"int8: weights {prec['weights']}; activations {prec['activations']}, {cal['method']} "
                  f"calibration on {cal['samples']} sample(s)")
        if prec.get("kept_fp32"):
            print(f"kept fp32: {len(prec['kept_fp32'])} node(s) after the last weight op "
                  f"({', '.join(prec['kept_fp32'][:4])}{' ...' if len(prec['kept_fp32']) > 4 else ''})")
    if check:
        line = f"check against the fp32 export on {check['n']} input(s) ({check['inputs']}): "
        parts = []
        for name, v in check["blobs"].items():
            p = f"{name} max abs {v['max_abs']:.3g}, rel L2 {v['rel_l2']:.3g}"
            if v.get("top1_agreement") is not None:
                p += f", top-1 agreement {100 * v['top1_agreement']:.2f}%"
            if "top1_ref" in v:
                p += f", top-1 accuracy {100 * v['top1_ref']:.2f}% (fp32) -> {100 * v['top1_test']:.2f}%"
            parts.append(p)
        for name, m in check.get("detections", {}).items():
            p = f"{name} recall {100 * m['recall']:.1f}%, precision {100 * m['precision']:.1f}% at IoU 0.5"
            if m["mean_iou"] is not None:
                p += f", mean IoU {m['mean_iou']:.4f}, largest score change {m['max_score_change']:.3g}"
            parts.append(p)
        print(line + "; ".join(parts))


def cmd_bench(args) -> int:
    from lrprune_caffe.engines.bench import bench_nets
    from lrprune_caffe.engines.model import open_model, split_model_paths
    pairs = split_model_paths(args.files)
    if len(pairs) not in (1, 2):
        raise UserError(f"bench takes one model or two (NET WEIGHTS or MODEL.onnx each), got {len(pairs)}")
    if args.plot:  # before the timing: a refused output costs nothing
        from lrprune_caffe.core.plots import _plt
        from lrprune_caffe.fileutil import check_output_file
        check_output_file(args.plot)
        _plt()
    nets = [open_model(p, w) for p, w in pairs]
    labels = [p for p, _ in pairs]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"A:{labels[0]}", f"B:{labels[1]}"]
    res = bench_nets(nets, runtime=args.runtime, threads=args.threads, runs=args.runs, warmup=args.warmup,
                     labels=labels)
    if args.plot:
        from lrprune_caffe.core.plots import bench_png
        from lrprune_caffe.fileutil import atomic_write_bytes
        atomic_write_bytes(args.plot, bench_png(res))
        res["plot"] = args.plot
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    v = res["versions"]
    rt_version = v.get("onnxruntime") or v.get("opencv")
    print(f"runtime {res['runtime']} {rt_version}, threads {res['threads']}, batch 1, "
          f"{res['runs']} runs after {res['warmup']} warmup; python {v['python']}, numpy {v['numpy']}, "
          f"{v['machine']} with {v['cpu_count']} cpus")
    for n in res["nets"]:
        print(f"{n['label']}: median {n['median_ms']:.3f} ms (min {n['min_ms']:.3f}, "
              f"p90 {n['p90_ms']:.3f})")
    if "ratio" in res:
        print(f"ratio B/A {res['ratio']:.3f} (paired median {res['paired_ratio']:.3f}); "
              f"speedup A/B {res['speedup']:.2f}x")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def add_precision_args(p, check=False, calib=True) -> None:
    """--precision / --quantize (/ --calib: export-onnx; compress has its own) (export-onnx and compress --onnx)."""
    g = p.add_argument_group("reduced precision (onnxruntime's converters)")
    g.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: fp16 weights and compute, fp32 inputs and outputs (default fp32)")
    g.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: static QDQ, per-channel int8 weights, activations calibrated on --calib")
    if calib:
        g.add_argument("--calib", metavar="NPZ",
                       help="calibration inputs for --quantize int8: arrays keyed by input name, x, or an "
                            "MNIST-style split's x_train (default: the --inputs)")
    if check:
        g.add_argument("--inputs", metavar="INPUTS.npz",
                       help="inputs on which the written file is checked against the fp32 export "
                            "(default: seeded random)")
        g.add_argument("--labels", metavar="LABELS.npz", help="labels of the --inputs: top-1 accuracy of both")


def _blob_list(text):
    import argparse
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give blob names separated by commas")
    return names


def register(sub) -> None:
    from lrprune_caffe.export.onnx import DEFAULT_OPSET, MIN_OPSET
    p = sub.add_parser("export-onnx", help="write an ONNX model (Caffe semantics exactly)",
                       description="Export a Caffe net to ONNX for onnxruntime, MNN and other mobile runtimes.")
    p.add_argument("net", metavar="NET.prototxt", help="deploy net definition")
    p.add_argument("weights", metavar="WEIGHTS.caffemodel", help="trained weights")
    add_output(p, "file", "MODEL.onnx", "ONNX file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset to pin (default {DEFAULT_OPSET}; {MIN_OPSET} up to what the installed onnx knows)")
    p.add_argument("--dynamic-batch", action="store_true", help="make dim 0 of inputs and outputs symbolic ('N')")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm (+Scale) into the preceding convolutions first")
    p.add_argument("--phase", choices=["TEST", "TRAIN"], default="TEST", help="view of a net with phase rules")
    p.add_argument("--cut", type=_blob_list, default=None, metavar="BLOB,...",
                   help="export up to these blobs only (e.g. an SSD net's loc, conf and priors, for a runtime "
                        "with its own post-processing): they become the outputs; the layers they do not need "
                        "are dropped")
    add_precision_args(p, check=True)
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("bench", help="median batch-1 latency of one net, or two side by side",
                       description="Time NET (and NET2, interleaved with it) on a real runtime; "
                                   "reports the median latency, the ratio, versions and threads.")
    p.add_argument("files", nargs="+", metavar="NET WEIGHTS | MODEL.onnx",
                   help="one model or two to compare, each a prototxt + caffemodel or an .onnx file "
                        "(run as written)")
    p.add_argument("--runtime", choices=["onnxruntime", "opencv"], default="onnxruntime",
                   help="onnxruntime (a Caffe net via our ONNX export) or OpenCV (its Caffe reader for a "
                        "Caffe net, its ONNX reader for an .onnx file)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per net (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per net first (default 5)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the latency bars (median, min .. p90) to FILE.png (the plot extra, matplotlib)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)
