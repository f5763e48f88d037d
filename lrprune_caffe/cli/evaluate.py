"""``evaluate`` sub-command and the data flags that evaluate, finetune and pipeline share
(registered by :mod:`lrprune_caffe.cli.main`; never imports it)."""

from __future__ import annotations

import json
import sys

from lrprune_caffe.errors import UserError
from .common import _add_net_args


def _add_data_args(p, what="labelled data"):
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DATA", help=f"{what}: an .npz with x (N x C x H x W float32, already "
                   "preprocessed) and y (N int labels), an image folder with one subfolder per class, an "
                   "LMDB/LevelDB folder of Caffe Datum records, an ImageData list (.txt of 'path label' "
                   "lines), or an HDF5 file / HDF5 source list. Not needed with a train_val NET: its "
                   "data layer gives the data and the preprocessing")
    g.add_argument("--data-split", metavar="SPLIT.npz",
                   help="an MNIST-style split (x_train/y_train/x_test/y_test uint8 digits) read as "
                        "pixels / 256; evaluate uses x_test, finetune trains on x_train and validates "
                        "on x_test (unless --val)")
    add_preprocess_args(p.add_argument_group("image folder preprocessing (Caffe style: (pixel - mean) * scale)"))


def add_preprocess_args(g, mean_help="per-channel mean in the net's channel order, e.g. 104,117,123 (BGR)"):
    """--mean --scale --bgr/--rgb --resize --gray: how images are turned into the net's input
    (evaluate, finetune, pipeline, compress --calib)."""
    g.add_argument("--mean", help=mean_help)
    g.add_argument("--scale", type=float, default=None, help="multiply after subtracting the mean, e.g. 0.017")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--bgr", dest="bgr", action="store_true", default=True,
                       help="feed channels as BGR (default, as Caffe models expect)")
    order.add_argument("--rgb", dest="bgr", action="store_false", help="feed channels as RGB")
    g.add_argument("--resize", type=int, metavar="N",
                   help="resize the shorter side to N, then center-crop to the net's input size")
    g.add_argument("--gray", action="store_true", help="read images as one gray channel")


def _preprocess(args):
    from lrprune_caffe.data.datasets import Preprocess, parse_mean
    return Preprocess(mean=parse_mean(args.mean), scale=1.0 if args.scale is None else args.scale,
                      bgr=args.bgr, resize=args.resize, gray=args.gray)


def _net_input_shape(net):
    from lrprune_caffe.engines.evaluate import single_input
    return single_input(net)[1]


def _load_eval_data(args, net):
    from lrprune_caffe.data.datasets import load_mnist_split
    from lrprune_caffe.data.stream import open_data
    if bool(args.data) == bool(args.data_split):
        raise UserError("give the data with exactly one of --data DATA or --data-split SPLIT.npz "
                        "(or a train_val NET with a data layer)")
    if args.data_split:
        if getattr(args, "labels", None):
            raise UserError("--labels goes with --data INPUTS.npz; --data-split holds its own labels")
        return load_mnist_split(args.data_split)[1]
    if getattr(args, "labels", None):
        return _inputs_with_labels(args.data, args.labels, net)
    return open_data(args.data, input_shape=_net_input_shape(net), pre=_preprocess(args))


def _inputs_with_labels(data, labels, net):
    """--data INPUTS.npz --labels LABELS.npz, as compress and verify take them: the inputs keyed by
    the net's input name (or x), the labels the array y / labels (else the first) of LABELS.npz."""
    import numpy as np
    from lrprune_caffe.data.stream import from_arrays
    from lrprune_caffe.engines.evaluate import single_input
    from lrprune_caffe.errors import BadFileError
    from lrprune_caffe.fileutil import read_npz
    from lrprune_caffe.io.inputs import load_labels
    name, shape = single_input(net)
    arrays = read_npz(data, "an .npz of input arrays keyed by input name")
    key = name if name in arrays else "x" if "x" in arrays else next(iter(arrays)) if len(arrays) == 1 else None
    if key is None:
        raise BadFileError(f"has no array '{name}' (or x) for the net's input (it holds: "
                           f"{', '.join(arrays) or 'nothing'})", path=data)
    x = np.ascontiguousarray(arrays[key], dtype=np.float32)
    if shape is not None and (x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:])):
        raise BadFileError(f"array '{key}' has shape {tuple(x.shape)}; the net's input is {tuple(shape)} "
                           f"(any batch size)", path=data)
    y = load_labels(labels)
    if len(y) != len(x):
        raise BadFileError(f"holds {len(y)} labels for the {len(x)} inputs of {data}", path=labels)
    return from_arrays(x, y.astype(np.int64), source=f"{data} + {labels}")


def _uses_data_layer(args) -> bool:
    """No data flags and the net's phase view has a data layer: a train_val gives the data."""
    from lrprune_caffe.engines.model import is_onnx
    if args.data or args.data_split or is_onnx(args.net):
        return False
    from lrprune_caffe.io.caffe import read_net
    from lrprune_caffe.data.trainval import has_data_layer
    return has_data_layer(read_net(args.net, phase=args.phase))


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- evaluate -----------------------------------------------------------------

def cmd_evaluate(args):
    from lrprune_caffe.engines.evaluate import evaluate, evaluate_files
    from lrprune_caffe.engines.model import open_model
    progress = False if args.json else None
    if _uses_data_layer(args):
        res = evaluate_files(args.net, args.weights, None, output=args.output_blob, engine=args.engine,
                             threads=args.threads, phase=args.phase, progress=progress,
                             iterations=args.iterations)
        if args.batch_size is not None and args.batch_size != res["batch_size"]:
            res["notes"].append(f"--batch-size {args.batch_size} ignored: the data layer's batch_size "
                                f"{res['batch_size']} is used")
    else:
        net = open_model(args.net, args.weights, phase=args.phase)  # NET WEIGHTS or MODEL.onnx
        ds = _load_eval_data(args, net)
        res = evaluate(net, ds, output=args.output_blob, batch_size=args.batch_size or 256, engine=args.engine,
                       threads=args.threads, progress=progress, iterations=args.iterations)
        res["notes"] = list(net.notes) + list(getattr(ds, "notes", [])) + res["notes"]
    res["net"] = args.net
    res["weights"] = args.weights
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    line = f"top-1 {res['top1']:.4f} ({res['correct_top1']}/{res['n']})"
    if "top5" in res:
        line += f"   top-5 {res['top5']:.4f} ({res['correct_top5']}/{res['n']})"
    print(line)
    print(f"{res['n']} samples, {res['classes']} classes, scores from '{res['output']}', "
          f"engine {res['engine']}")
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---- finetune -------------------------------------------------------------------


def register(sub):
    p = sub.add_parser("evaluate", help="top-1 / top-5 accuracy on labelled data (onnxruntime or OpenCV)",
                       description="NET WEIGHTS (a Caffe net) or MODEL.onnx (the file as shipped: onnxruntime "
                                   "or OpenCV's ONNX reader run it as written).")
    _add_net_args(p)
    _add_data_args(p)
    p.add_argument("--output-blob", metavar="BLOB", help="blob holding the class scores (default: the net's output)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per engine call (default 256; a train_val's data layer gives its own)")
    p.add_argument("--iterations", type=int, default=None, metavar="K",
                   help="K batches, wrapping around the data at its end, as Caffe's caffe test "
                        "--iterations K (default: one pass over the data)")
    p.add_argument("--engine", choices=["onnxruntime", "opencv"], default="onnxruntime",
                   help="onnxruntime (default; falls back to opencv if the net cannot be exported) or opencv")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's)")
    p.add_argument("--labels", metavar="LABELS.npz",
                   help="with --data INPUTS.npz (arrays keyed by input name, or x): the labels, the array y "
                        "(or labels, else the first) of this .npz, as compress and verify take them")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_evaluate)
