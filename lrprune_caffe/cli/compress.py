"""Sub-commands ``compress`` and ``verify`` (registered by :mod:`lrprune_caffe.cli.main`; never imports it)."""

from __future__ import annotations

import json
import sys

from lrprune_caffe.engines.compare import describe, json_safe
from .common import add_output


def _print_summary(report, file=None, verbose=False):
    """The short summary (at most 100 columns); ``verbose``: the per-layer and check tables first."""
    from .common import print_table
    from lrprune_caffe.core.markdown import layer_table, summary_lines, verification_rows
    file = file or sys.stdout
    if verbose:
        print_table(*layer_table(report), file=file)
        ver = report.get("verification") or {}
        if ver.get("blobs"):
            print(file=file)
            print_table(*verification_rows(ver), file=file)
        print(file=file)
    for line in summary_lines(report):
        print(line, file=file)
    for n in (report.get("verification") or {}).get("notes", []):
        print(f"note: {n}", file=sys.stderr)


def _print_written(written, file=None):
    """'wrote DIR/: a, b, c' (one folder), else one line per file."""
    import os
    file = file or sys.stdout
    paths = [str(p) for p in written.values()]
    dirs = {os.path.dirname(p) for p in paths}
    if len(dirs) == 1 and len(paths) > 1:
        d = dirs.pop()
        from lrprune_caffe.core.markdown import _wrap
        for line in _wrap(f"wrote {d}{os.sep}: " + ", ".join(os.path.basename(p) for p in paths)):
            print(line, file=file)
    else:
        for p in paths:
            print(f"wrote {p}", file=file)


def _precision_options(args) -> dict:
    """--precision/--quantize for compress --onnx, passed on only when given (the core
    converts model.onnx with lrprune_caffe.export.precision.reduce_precision)."""
    opts = {"precision": args.precision if args.precision != "fp32" else None, "quantize": args.quantize}
    return {k: v for k, v in opts.items() if v is not None}


def _calib_options(args) -> dict:
    """--calib and its preprocessing, --calib-n, --calib-damping, and the quality gate's limits."""
    from .train import _preprocess
    return {"calib": args.calib, "preprocess": _preprocess(args), "calib_n": args.calib_n,
            "calib_damping": args.calib_damping, "max_drop": args.max_drop, "min_agree": args.min_agree,
            "max_rel_l2": args.max_rel_l2}


def cmd_compress(args) -> int:
    from lrprune_caffe.api import compress_files
    report, _ = compress_files(args.net, args.weights, args.output, scheme=args.scheme, rank=args.rank,
                         energy=args.energy, speedup=args.speedup, rank_method=args.rank_method,
                         layers=args.layers, inputs=args.inputs, train_net=args.train_net, onnx=args.onnx,
                         engine=args.engine, verify=not args.no_verify, svd=args.svd, seed=args.seed,
                         hooi=args.hooi, threads=args.threads, progress=not (args.json or args.quiet), phase=args.phase,
                         criterion=args.criterion, prune=args.prune, prune_scope=args.prune_scope,
                         prune_method=args.prune_method, quality=args.quality,
                         prune_structured=args.prune_structured, prune_exclude=args.prune_exclude,
                         sparse=args.sparse, labels=args.labels, opset=args.opset, plot=args.plot,
                         cost=args.cost, batch=args.batch, table_time=args.table_time,
                         measure_rounds=args.measure_rounds,
                         **_precision_options(args), **_calib_options(args))
    failed = report.get("gate", {}).get("passed") is False
    if args.json:
        print(json.dumps(json_safe(report), indent=2))
        return 1 if failed else 0
    _print_summary(report, verbose=args.verbose)
    if not args.verbose:
        print("per-layer table: report.md, or --verbose" if report.get("written") else
              "per-layer table: --verbose")
    _print_written(report.get("written", {}))
    for n in report.get("notes", []):
        print(f"note: {n}", file=sys.stderr)
    if failed:
        for f in report["gate"]["failures"]:
            print(f"FAIL: {f['text']}", file=sys.stderr)
        print("the quality gate failed: no model files written (only report.json, report.md)", file=sys.stderr)
    return 1 if failed else 0


def cmd_verify(args) -> int:
    from .common import print_table
    from lrprune_caffe.api import verify_paths
    from lrprune_caffe.core.markdown import verification_rows
    from lrprune_caffe.engines.model import split_model_paths
    res = verify_paths(args.files, inputs=args.inputs, engine=args.engine,
                       seed=args.seed, threads=args.threads, phase=args.phase, labels=args.labels)
    (name_a, _), (name_b, _) = split_model_paths(args.files)
    worst = res.get("worst_rel_l2")
    failed = bool(res["errors"] or res["missing"]) or (
        args.max_rel_l2 is not None and worst is not None and worst > args.max_rel_l2)
    res["passed"] = not failed if args.max_rel_l2 is not None else None
    if args.json:
        print(json.dumps(json_safe(res), indent=2))
    else:
        runs = res.get("runs")
        engine = f"{runs['a']} vs {runs['b']}" if runs else res["engine"]
        print(f"{name_a} vs {name_b}: engine {engine}, {res['inputs']}, batch {res['batch']}")
        if res["blobs"]:
            print_table(*verification_rows(res))
        for name, v in res["blobs"].items():
            if v.get("few_samples"):
                print(describe(name, v))
            if "top1_ref" in v:
                print(f"{name}: top-1 accuracy {100 * v['top1_ref']:.2f}% -> {100 * v['top1_test']:.2f}%")
        for name, v in res.get("detections", {}).items():
            print(describe(name, v))
        for n in res["notes"]:
            print(f"note: {n}", file=sys.stderr)
        if args.max_rel_l2 is not None:
            print(f"{'FAIL' if failed else 'OK'}: worst relative L2 error {worst} "
                  f"(limit {args.max_rel_l2})")
    return 1 if failed else 0


def _positive_int(text):
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def register(sub):
    from lrprune_caffe.core.options import RANK_METHODS, SCHEMES, SVD_METHODS
    from lrprune_caffe.engines.runtime import ENGINES

    p = sub.add_parser(
        "compress", help="factorize conv / FC layers into low-rank pairs and/or prune; write Caffe files and a report",
        description="Factorize Convolution and InnerProduct layers into low-rank chains (SVD channel or "
                    "spatial scheme, Tucker-2; FC -> two FCs), check the result against the original on "
                    "real engines, and write OUTDIR/model.prototxt, model.caffemodel, report.json and "
                    "report.md (all or nothing). New layers are named LAYER_lr1, LAYER_lr2 (, LAYER_lr3); "
                    "the last keeps the original top.")
    p.add_argument("net", metavar="NET.prototxt", help="deploy net definition")
    p.add_argument("weights", metavar="WEIGHTS.caffemodel", help="trained weights")
    add_output(p, "dir", "OUTDIR", "output folder")
    p.add_argument("--scheme", choices=SCHEMES, default="channel",
                   help="conv factorization: channel (KxK C->r, 1x1 r->N), spatial (Kx1 then 1xK), "
                        "tucker2 (1x1, KxK core, 1x1). InnerProduct layers always become two FCs "
                        "(default: channel)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank", metavar="R|LAYER=R,...",
                     help="fixed rank per group: '16' for every selected layer, 'conv2=16,ip1=64' per layer "
                          "(or both: '16,conv2=8'); tucker2 takes 'R' or 'RinxRout' (e.g. 8x16)")
    how.add_argument("--energy", type=float, metavar="E",
                     help="smallest rank keeping this share (0..1] of the squared singular values")
    how.add_argument("--speedup", type=float, metavar="S",
                     help="whole-net budget: the net runs S times faster on --engine (--cost latency) or its "
                          "selected layers' MACs fall by S (--cost macs); components are cut where they cost "
                          "least per ms or MAC saved (see --criterion); the report gives the measured speed-up")
    p.add_argument("--rank-method", choices=RANK_METHODS, default="svd",
                   help="svd: ranks from --rank/--energy/--speedup; vbmf: Kim et al.'s rank choice by "
                        "empirical VBMF (Nakajima et al. 2013) on each unfolding (default: svd)")
    p.add_argument("--criterion", choices=["log-energy", "energy"], default="log-energy",
                   help="--speedup cost of a cut: log-energy = -log(share of the layer's energy kept), "
                        "Zhang et al. 2015 (default); energy = discarded share of sigma^2")
    p.add_argument("--cost", choices=["latency", "macs"], default=None,
                   help="what --speedup counts: latency = milliseconds from per-layer latency tables measured on "
                        "--engine with --threads/--batch (cached on disk; a layer is never made slower than left "
                        "alone); macs = multiply-adds. Default: latency when its tables take at most --table-time, "
                        "the net runs at least 1 ms and the target is reachable; else macs, with a note why")
    p.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                   help="--speedup: the batch the net will run at on --engine (default 1)")
    p.add_argument("--table-time", type=float, default=None, metavar="SECONDS",
                   help="--speedup: the most the latency tables may take to measure before macs is used "
                        "instead (default 60; with --cost latency: no limit, and running out is an error; what "
                        "was measured is cached)")
    p.add_argument("--measure-rounds", type=int, default=None, metavar="N",
                   help="--speedup: interleaved rounds of the original and the written net on --engine for the "
                        "report's measured speed-up (default 20; 0 skips)")
    p.add_argument("--layers", metavar="NAMES|REGEX",
                   help="comma-separated layer names or regular expressions (full match); default: every "
                        "Convolution and InnerProduct layer")
    g = p.add_argument_group("pruning (after factorizing, or alone)")
    g.add_argument("--prune", metavar="F|LAYER=F,...",
                   help="zero this fraction [0, 1) of the weights of every conv/FC layer ('0.9'), or per layer "
                        "('conv1=0.3,ip1=0.9', or '0.8,conv1=0.3'); a factorized layer's name means its new "
                        "layers. Biases, BatchNorm and Scale blobs are never pruned. Writes OUTDIR/masks.npz")
    g.add_argument("--prune-scope", choices=["layer", "global", "erk"], default=None,
                   help="erk (default): the fraction over the net, allocated Erdos-Renyi-kernel style (Evci et "
                        "al. 2020): small layers and layers with few weights per output keep more, the "
                        "largest keep less (report.md lists each layer's share); layer: the fraction in each "
                        "layer (the default with --prune-structured or --prune-method std); global: one "
                        "magnitude threshold over all layers")
    g.add_argument("--prune-method", choices=["magnitude", "std", "sparsegpt"], default=None,
                   help="magnitude: smallest |w| (default; with --calib and --prune-scope global: smallest "
                        "data-aware saliency); std: Han et al. 2015, zero |w| < Q x std(W); sparsegpt (needs "
                        "--calib): each layer's mask re-chosen by SparseGPT saliency (Frantar & Alistarh 2023)")
    g.add_argument("--quality", type=float, metavar="Q", help="--prune-method std: the quality parameter Q")
    g.add_argument("--prune-structured", action="store_true",
                   help="remove whole output filters / rank components with the smallest norms and shrink "
                        "their consumers: a smaller dense net")
    g.add_argument("--prune-exclude", metavar="NAMES", help="comma-separated layers never to prune")
    g.add_argument("--sparse", action="store_true",
                   help="with --onnx: store pruned weights as ONNX sparse_initializers (values + int64 "
                        "indices) where that is smaller")
    p.add_argument("--inputs", metavar="INPUTS.npz",
                   help="inputs for the check, keyed by input blob name (default: seeded random)")
    p.add_argument("--labels", metavar="LABELS.npz",
                   help="labels of the --inputs (first array): the check also reports top-1 accuracy of both")
    p.add_argument("--train-net", metavar="TRAIN_VAL.prototxt",
                   help="also rewrite this training net the same way -> OUTDIR/train_val.prototxt")
    p.add_argument("--onnx", action="store_true", help="also export OUTDIR/model.onnx")
    p.add_argument("--opset", type=int, default=13, metavar="N",
                   help="with --onnx: the ONNX opset (default 13; 11 to the installed onnx's newest)")
    from .export import add_precision_args
    add_precision_args(p, calib=False)  # with --onnx; int8 is calibrated on --calib, else the --inputs
    g = p.add_argument_group("calibration data (unlabeled: fit the compressed layers to the original's outputs)")
    g.add_argument("--calib", metavar="SRC",
                   help="a few hundred inputs of the kind the net sees, labels never needed: an .npz (arrays "
                        "keyed by input name, or x, or an MNIST-style split's x_train), an image folder "
                        "(preprocessed with the flags below), an LMDB/LevelDB/ImageData list/HDF5 source, or "
                        "a train_val prototxt (its TRAIN data layer). Ranks (--speedup), factors and pruned "
                        "weights are fit to the original net's outputs; without --inputs, a held-out 1/8 "
                        "(at least 64) is the check's data; --quantize int8 is calibrated on it")
    g.add_argument("--calib-n", type=_positive_int, default=512, metavar="N",
                   help="read the first N samples of --calib (default 512)")
    g.add_argument("--calib-damping", type=float, default=0.01, metavar="D",
                   help="ridge damping of every fit, relative to mean(diag H) (default 0.01)")
    from .evaluate import add_preprocess_args
    add_preprocess_args(g, mean_help="image preprocessing: per-channel mean in the net's channel order, e.g. "
                                     "104,117,123 (also scales the random inputs of a check without data)")
    g = p.add_argument_group("quality gate (exit 1 and no model files when the check shows worse)")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="most top-1 percentage points the compressed net may lose on --inputs with --labels")
    g.add_argument("--min-agree", type=float, metavar="F",
                   help="least top-1 agreement (0..1) of every class-score output with the original")
    g.add_argument("--max-rel-l2", type=float, metavar="X", help="largest relative L2 error of any output")
    p.add_argument("--engine", choices=ENGINES, default="onnxruntime",
                   help="the runtime the net is meant for: the check runs there (default onnxruntime; falls back "
                        "to opencv with a note when the net cannot be exported), and with --speedup the latency "
                        "tables (onnxruntime only) and the measured speed-up")
    p.add_argument("--no-verify", action="store_true", help="skip running the nets")
    p.add_argument("--svd", choices=SVD_METHODS, default="auto",
                   help="SVD back end: auto/gram (eigh of the smaller Gram matrix), exact (LAPACK gesdd), "
                        "randomized (Halko et al. 2011, seeded; fixed --rank only)")
    p.add_argument("--hooi", type=int, default=0, metavar="N", help="tucker2: N HOOI refinement sweeps (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs and randomized SVD (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="--engine threads: for the check (default: the engine's), and with --speedup for the "
                        "latency tables and the measured speed-up (default 1)")
    p.add_argument("--phase", choices=["TEST", "TRAIN"], default="TEST", help=__import__("argparse").SUPPRESS)
    p.add_argument("--plot", action="store_true",
                   help="also draw OUTDIR/report.png (per layer: MACs and params before/after, energy kept "
                        "or output error; needs the plot extra, matplotlib), embedded in report.md")
    p.add_argument("--verbose", action="store_true",
                   help="also print the per-layer table and the check's table (report.md always has them)")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "verify", help="run two nets on the same inputs and compare their outputs",
        description="Run two models (NET WEIGHTS or MODEL.onnx each) on the same inputs (an .npz, or seeded "
                    "random of the first's input shape) and compare every output by its kind: class scores "
                    "(Softmax) by top-1 / top-5 agreement and KL, DetectionOutput lists by recall, precision, "
                    "mean IoU and the largest score change at IoU 0.5, anything else by max abs error, "
                    "relative L2 error and SNR in dB.")
    p.add_argument("files", nargs="+", metavar="NET WEIGHTS | MODEL.onnx",
                   help="two models: a Caffe pair (NET.prototxt WEIGHTS.caffemodel) or MODEL.onnx each, "
                        "so a Caffe net and the ONNX file that ships can be checked side by side")
    p.add_argument("--inputs", metavar="INPUTS.npz", help="inputs keyed by input blob name")
    p.add_argument("--labels", metavar="LABELS.npz",
                   help="labels for top-1 accuracy of both: the array y (or labels, else the first array) of an .npz")
    p.add_argument("--engine", choices=ENGINES, default="onnxruntime",
                   help="engine for the Caffe nets (default onnxruntime, through our exporter; falls back to "
                        "opencv with a note when a net cannot be exported); a MODEL.onnx always runs on "
                        "onnxruntime, so '--engine opencv' checks OpenCV's Caffe reader against it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--max-rel-l2", type=float, default=None, metavar="X",
                   help="exit 1 when an output's relative L2 error exceeds X")
    p.add_argument("--phase", choices=["TEST", "TRAIN"], default="TEST", help=__import__("argparse").SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verify)
