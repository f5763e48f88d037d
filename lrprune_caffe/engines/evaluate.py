"""Top-1 / top-5 accuracy of a net on labelled data, run by a real engine (no torch).

``evaluate(net, data)`` exports the net to ONNX once (dynamic batch) and runs
it with onnxruntime in batches; if the net cannot be exported (no exporter,
a layer without lowering) it runs OpenCV's Caffe reader on the written Caffe
files instead, and says so in the result (``engine``, ``notes``).

Which blob holds the class scores: the net's single output, or ``output=``.
Scores are N x C, or N x C x 1 x 1 (a 1x1 conv classifier); for a Softmax
output the class axis is the Softmax's axis. Ties rank the lower class first.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from lrprune_caffe.ir.analysis import validate
from lrprune_caffe.data.datasets import Dataset, as_dataset, check_against_net
from lrprune_caffe.data.sources import ArraySource
from lrprune_caffe.data.stream import StreamDataset, as_stream
from lrprune_caffe.errors import BadFileError, LrpruneError, UserError

ENGINES = ("onnxruntime", "opencv")


@dataclass
class ScoreBlob:
    blob: str  # where the class scores are read
    logits: str  # the blob to train on (the Softmax's bottom when blob is a Softmax output)
    softmax: bool  # blob is a Softmax output (train with log_softmax + NLL on logits)
    axis: int  # class axis
    classes: int
    input: str  # the net's (single) input blob
    input_shape: tuple


def single_input(net):
    names = net.inputs()
    if len(names) != 1:
        raise UserError(f"{net.source or 'the net'}: evaluate and finetune need a net with one input, "
                        f"this one has {len(names)}: {', '.join(names) or '(none)'}")
    return names[0], net.input_shapes()[names[0]]


def resolve_scores(net, output=None) -> ScoreBlob:
    """Find the class-score blob (the single net output, or ``output``) and its class count."""
    from .model import OnnxModel
    if isinstance(net, OnnxModel):
        return _onnx_scores(net, output)
    where = net.source or "the net"
    inp, in_shape = single_input(net)
    if output is None:
        outs = net.outputs()
        if len(outs) != 1:
            raise UserError(f"{where}: the net has {len(outs)} outputs ({', '.join(outs)}); "
                            f"choose the class scores with --output-blob BLOB (evaluate, finetune)")
        output = outs[0]
    idx = None
    for i, layer in enumerate(net.layers):
        if output in layer.tops:
            idx = i
    if idx is None:
        raise UserError(f"{where}: no layer produces blob '{output}'")
    layer = net.layers[idx]
    shapes = validate(net, input_shapes={inp: (1, *in_shape[1:])} if in_shape else None, weights=False)
    shape = shapes.blobs.get(output)
    softmax = layer.type == "Softmax" and len(layer.bottoms) == 1
    axis = 1
    if softmax:
        from lrprune_caffe.ir.layers.base import canon_axis
        axis = canon_axis(int(layer.param_msg("softmax_param").axis), len(shape)) if shape else 1
    if shape is None:
        raise UserError(f"{where}: the shape of output '{output}' is unknown")
    rest = [d for i, d in enumerate(shape) if i not in (0, axis)]
    if len(shape) < 2 or any(d != 1 for d in rest):
        raise UserError(f"{where}: output '{output}' has shape {tuple(shape)}, not N x classes "
                        f"(class axis {axis}); choose the class scores with --output-blob BLOB (evaluate, finetune)")
    logits = layer.bottoms[0] if softmax else output
    return ScoreBlob(output, logits, softmax, axis, int(shape[axis]), inp, tuple(in_shape) if in_shape else None)


def _onnx_scores(model, output=None) -> ScoreBlob:
    """resolve_scores for an ONNX file: a graph output, N x C (x 1 x 1), classes on axis 1."""
    inp, in_shape = single_input(model)
    outs = model.outputs()
    if output is None:
        if len(outs) != 1:
            raise UserError(f"{model.source}: the model has {len(outs)} outputs ({', '.join(outs)}); "
                            f"choose the class scores with --output NAME")
        output = outs[0]
    if output not in outs:
        raise UserError(f"{model.source}: '{output}' is not an output of the ONNX graph "
                        f"(outputs: {', '.join(outs)})")
    shape = model.output_shapes.get(output)
    if not shape or len(shape) < 2 or shape[1] is None or any(d != 1 for d in shape[2:]):
        raise UserError(f"{model.source}: output '{output}' has shape {shape}, not N x classes")
    softmax = model.producers.get(output) == "Softmax"
    return ScoreBlob(output, output, softmax, 1, int(shape[1]), inp, tuple(in_shape) if in_shape else None)


def class_scores(arr, axis: int = 1) -> np.ndarray:
    """(N, C) scores from an output blob whose other axes are all 1."""
    arr = np.asarray(arr)
    arr = np.moveaxis(arr, axis, 1)
    return arr.reshape(arr.shape[0], arr.shape[1])


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is the label among the k best scores? (ties: lower class first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.any(order == labels[:, None], axis=1)


# ---- batched runners ---------------------------------------------------------

class _OrtRunner:
    def __init__(self, net, blob, threads):
        from lrprune_caffe.export.onnx import export_model  # may be absent: ImportError
        from .runtime import ort_session
        extra = [] if blob in net.outputs() else [blob]
        model = export_model(net, extra_outputs=extra, dynamic_batch=True)
        self.sess = ort_session(model.SerializeToString(), threads)
        self.input = self.sess.get_inputs()[0].name
        self.blob = blob

    def __call__(self, x):
        return self.sess.run([self.blob], {self.input: x})[0]


class _OpenCVRunner:
    def __init__(self, net, blob, threads):
        try:
            import cv2
        except ImportError:
            raise UserError("the opencv engine needs opencv-python-headless<5 "
                            "(pip install 'opencv-python-headless<5')") from None
        from lrprune_caffe.io.caffe import save_net
        self.cv2 = cv2
        with tempfile.TemporaryDirectory() as d:
            proto, model = os.path.join(d, "m.prototxt"), os.path.join(d, "m.caffemodel")
            save_net(net, proto, model)
            self.net = cv2.dnn.readNetFromCaffe(proto, model)
        if threads:
            cv2.setNumThreads(int(threads))
        self.input = net.inputs()[0]
        self.blob = blob

    def __call__(self, x):
        self.net.setInput(x, self.input)
        return np.asarray(self.net.forward(self.blob)).copy()


class _OnnxFileRunner:
    """An ONNX file as written: onnxruntime on its bytes, or OpenCV's ONNX reader."""

    def __init__(self, model, blob, engine, threads):
        self.model, self.blob, self.engine, self.threads = model, blob, engine, threads
        self.input = model.inputs()[0]
        if engine == "opencv":
            import cv2
            self.cv = model.opencv()
            if threads:
                cv2.setNumThreads(int(threads))

    def __call__(self, x):
        if self.engine == "onnxruntime":
            return self.model.run({self.input: x}, [self.blob], self.threads)[self.blob]
        # OpenCV 4.x computes int8 QDQ files wrongly at batch > 1 (LeNet: 64% top-1 agreement with
        # onnxruntime at batch 64, 100% one at a time): feed those one sample at a time
        b = self.model.fixed_batch() or (1 if self.model.quantized else len(x))
        parts = []
        for s in range(0, len(x), b):
            self.cv.setInput(np.ascontiguousarray(x[s:s + b]), self.input)
            parts.append(np.asarray(self.cv.forward(self.blob)).copy())
        return np.concatenate(parts, axis=0)


def make_runner(net, blob, engine="onnxruntime", threads=None):
    """(runner, engine used, notes). onnxruntime falls back to opencv when export is unavailable."""
    from .model import OnnxModel
    notes = []
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    if isinstance(net, OnnxModel):
        if engine == "opencv" and net.quantized and not net.fixed_batch():
            notes.append("OpenCV's ONNX reader computes int8 QDQ files wrongly at batch > 1: ran one sample "
                         "at a time")
        return _OnnxFileRunner(net, blob, engine, threads), engine, notes
    if engine == "onnxruntime":
        try:
            return _OrtRunner(net, blob, threads), "onnxruntime", notes
        except (ImportError, NotImplementedError, LrpruneError) as e:
            notes.append(f"ONNX export not available ({type(e).__name__}: {e}); evaluated with OpenCV's "
                         f"Caffe reader instead")
    return _OpenCVRunner(net, blob, threads), "opencv", notes


def predict_scores(net, x, output=None, batch_size=256, engine="onnxruntime", threads=None,
                   progress=False):
    """(N, C) class scores of ``x`` in batches; returns (scores, ScoreBlob, engine, notes)."""
    sb = resolve_scores(net, output)
    runner, used, notes = make_runner(net, sb.blob, engine, threads)
    parts = []
    bar = _bar(len(x), "evaluate", progress)
    for s in range(0, len(x), batch_size):
        xb = np.ascontiguousarray(x[s:s + batch_size], dtype=np.float32)
        parts.append(class_scores(runner(xb), sb.axis))
        bar.update(len(xb))
    bar.close()
    return np.concatenate(parts, axis=0), sb, used, notes


def _bar(total, desc, progress):
    from tqdm import tqdm
    import sys
    disable = (not progress) if progress is not None else not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False, file=sys.stderr)


def _check_stream(ds, input_shape, input_name):
    if input_shape is None:
        return
    want = tuple(int(d) for d in input_shape[1:])
    got = tuple(ds.sample_shape)
    if got != want:
        raise BadFileError(f"samples have shape {got} after preprocessing, but the net's input "
                           f"'{input_name}' takes {want} per sample", path=ds.source)


def _check_labels(y, classes, source):
    bad = (y < 0) | (y >= classes)
    if bad.any():
        raise BadFileError(f"label {int(y[bad][0])} out of range: the net has {classes} classes, so labels "
                           f"must be 0..{classes - 1}", path=source)


def evaluate(net, data, output=None, batch_size=256, engine="onnxruntime", threads=None,
             progress=None, iterations=None) -> dict:
    """Top-1 (and top-5 with more than 5 classes) accuracy of ``net`` on ``data``.

    ``data``: a :class:`~lrprune_caffe.data.stream.StreamDataset` (streamed: one batch in
    memory at a time), a :class:`~lrprune_caffe.data.datasets.Dataset`, an (x, y) pair or
    {'x', 'y'}. ``iterations``: that many batches of ``batch_size``, wrapping around the data
    at its end (Caffe's ``caffe test --iterations``); default one pass.
    Returns {"n", "classes", "top1", "top5"?, "correct_top1", "correct_top5"?,
    "output", "engine", "batch_size", "notes", "images_per_s"}.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if iterations is not None and iterations < 1:
        raise UserError(f"iterations must be >= 1, got {iterations}")
    sb = resolve_scores(net, output)
    if isinstance(data, StreamDataset) and not isinstance(data.records, ArraySource):
        stream = data
        _check_stream(stream, sb.input_shape, sb.input)
    elif isinstance(data, StreamDataset):  # arrays in memory: check them whole
        stream = data
        check_against_net(Dataset(data.records.x, data.records.y, data.source), sb.input_shape,
                          sb.classes, sb.input)
    else:
        ds = as_dataset(data)
        check_against_net(ds, sb.input_shape, sb.classes, sb.input)
        stream = as_stream(ds)
    runner, used, notes = make_runner(net, sb.blob, engine, threads)
    total = len(stream) if iterations is None else int(iterations) * int(batch_size)
    bar = _bar(total, "evaluate", progress)
    n = c1 = c5 = 0
    t0 = time.perf_counter()
    try:
        for xb, yb in stream.batches(batch_size, iterations):
            _check_labels(yb, sb.classes, stream.source)
            scores = class_scores(runner(np.ascontiguousarray(xb, dtype=np.float32)), sb.axis)
            c1 += int(topk_correct(scores, yb, 1).sum())
            if sb.classes > 5:
                c5 += int(topk_correct(scores, yb, 5).sum())
            n += len(yb)
            bar.update(len(yb))
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    res = {"n": n, "classes": sb.classes, "output": sb.blob, "engine": used,
           "batch_size": int(batch_size), "data": stream.source}
    if iterations is not None:
        res["iterations"] = int(iterations)
    res["correct_top1"] = c1
    res["top1"] = c1 / n
    if sb.classes > 5:
        res["correct_top5"] = c5
        res["top5"] = c5 / n
    res["images_per_s"] = round(n / elapsed, 1) if elapsed > 0 else None
    res["notes"] = notes
    return res


def load_train_val(prototxt, weights, phase="TEST", seed=0):
    """(deploy net, PhaseData, score blob) from a train_val prototxt with a data layer in ``phase``."""
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.data.trainval import deploy_view, phase_data
    full = load_net(prototxt, weights, phase=phase)
    pdata = phase_data(full, phase, seed)
    net, scores = deploy_view(full, pdata)
    return net, pdata, scores


def evaluate_files(prototxt, weights, data_path=None, output=None, batch_size=256, engine="onnxruntime",
                   threads=None, preprocess=None, phase="TEST", progress=None, iterations=None) -> dict:
    """Load a net and its weights (or a MODEL.onnx, weights None) and a data file/folder, then :func:`evaluate`.

    Without ``data_path`` the net must be a train_val whose ``phase`` data layer gives the
    data, its preprocessing and the batch size (``batch_size`` is then ignored)."""
    from lrprune_caffe.data.stream import open_data
    from lrprune_caffe.data.datasets import Preprocess
    if data_path is None:
        net, pdata, scores = load_train_val(prototxt, weights, phase)
        res = evaluate(net, pdata.dataset, output or scores, pdata.batch_size, engine, threads, progress,
                       iterations)
        res["notes"] = list(net.notes) + pdata.notes + res["notes"]
        res["data_layer"] = pdata.layer
        return res
    from .model import open_model
    net = open_model(prototxt, weights, phase=phase)
    _, in_shape = single_input(net)
    ds = open_data(data_path, input_shape=in_shape, pre=preprocess or Preprocess())
    res = evaluate(net, ds, output, batch_size, engine, threads, progress, iterations)
    res["notes"] = list(net.notes) + ds.notes + res["notes"]
    return res


__all__ = ["evaluate", "evaluate_files", "resolve_scores", "class_scores", "topk_correct",
           "predict_scores", "make_runner", "load_train_val", "ScoreBlob", "single_input", "ENGINES"]
