"""Reduced precision for an exported ONNX model: fp16, or int8 static QDQ.

Both conversions are onnxruntime's own tools; nothing here quantizes or
rounds a weight itself:

* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16``
  (onnxconverter-common's float16 converter, as onnxruntime ships it), with
  ``keep_io_types=True``: fp16 weights and compute inside, fp32 inputs and
  outputs (a ``Cast`` at each end). Ops in its default block list
  (``NonMaxSuppression``, ``TopK``, ``Range`` ...) and the *tail* (below)
  stay fp32 behind ``Cast`` nodes.
* ``int8``: ``onnxruntime.quantization.quantize_static``: QDQ format
  (``QuantizeLinear``/``DequantizeLinear`` pairs a runtime fuses into int8
  kernels), per-channel symmetric int8 weights, int8 activations whose ranges
  come from MinMax calibration on the given arrays. The tail is excluded.

Before: a float32 ``ModelProto`` (what :mod:`lrprune_caffe.export.onnx`
writes; sparse initializers are densified first). After: a new ModelProto
(the input is not changed) and a report dict: bytes before/after, the tool
and its settings, which nodes stayed fp32, the calibration used.

The tail: nodes that neither are a weight op (Conv, ConvTranspose, Gemm,
MatMul) nor feed one - a classifier's Softmax, an SSD's Permute/Concat/
Softmax/DetectionOutput decoding. It holds no weights (nothing to save) and
is where reduced precision hurts: probabilities, box arithmetic, NMS.

``sparse=True`` stores the converted weights as ONNX sparse initializers
where that is smaller (:func:`lrprune_caffe.export.sparse.sparsify_model` for
fp16; int8 weights likewise, values + int64 indices, worth it only above 8/9
= 89 % zeros). Pruned zeros stay exact zeros in both: fp16 has an exact 0 and
symmetric int8 quantization has zero point 0.

Preconditions: int8 needs opset >= 13 (per-channel ``axis``) and calibration
arrays for every graph input; either fails with a :class:`UserError` saying so.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager

import numpy as np

from lrprune_caffe.errors import UserError

PRECISIONS = ("fp32", "fp16")
QUANTIZE = ("int8",)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_CALIB_SAMPLES = 1000
#: bytes per nonzero of an int8 sparse initializer: int8 value + int64 linear index
INT8_SPARSE_BYTES_PER_NONZERO = 9


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def opset_of(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def tail_nodes(model) -> list:
    """Names of the nodes that are no weight op and feed none (see the module docstring)."""
    g = model.graph
    producer = {}
    for n in g.node:
        for o in n.output:
            producer[o] = n
    feeds = set()
    stack = [n for n in g.node if n.op_type in WEIGHT_OPS]
    while stack:
        n = stack.pop()
        if n.name in feeds:
            continue
        feeds.add(n.name)
        stack.extend(producer[i] for i in n.input if i in producer)
    return [n.name for n in g.node if n.name not in feeds]


def topo_sort(model) -> None:
    """Put the nodes in dependency order, in place (the fp16 converter appends its input/output
    Casts at the end; onnxruntime sorts for itself, OpenCV's ONNX reader does not)."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    ready |= {t.values.name for t in g.sparse_initializer}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise UserError(f"the ONNX graph has a cycle or an undefined input at node '{rest[0].name}'")
        pending = rest
    copies = [type(n)() for n in order]
    for c, n in zip(copies, order):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def densify(model):
    """A copy of ``model`` with its sparse initializers as dense ones (the converters read dense only)."""
    import onnx
    from onnx import numpy_helper
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for st in g.sparse_initializer:
        values = numpy_helper.to_array(st.values)
        idx = numpy_helper.to_array(st.indices).reshape(-1)
        dense = np.zeros(int(np.prod(st.dims)), dtype=values.dtype)
        dense[idx] = values.reshape(-1)
        g.initializer.append(numpy_helper.from_array(dense.reshape(tuple(st.dims)), st.values.name))
    del g.sparse_initializer[:]
    return out


@contextmanager
def _quiet_ort_logs():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static warns about pre-processing on every call
    try:
        yield
    finally:
        root.setLevel(level)


# ---- fp16 ----------------------------------------------------------------------------------------

def to_fp16(model, keep_io_types: bool = True):
    """(fp16 ModelProto, details) through onnxruntime's float16 converter; the tail stays fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    tail = tail_nodes(model)
    out = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=False,
                                   op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=tail)
    topo_sort(out)
    blocked = sorted({n.op_type for n in model.graph.node if n.op_type in DEFAULT_OP_BLOCK_LIST})
    return out, {"tool": f"onnxruntime.transformers.float16.convert_float_to_float16 (onnxruntime "
                         f"{_ort_version()})", "keep_io_types": bool(keep_io_types),
                 "kept_fp32": tail, "kept_fp32_op_types": blocked}


# ---- int8 ----------------------------------------------------------------------------------------

def _batches(model, calib: dict, max_samples: int):
    """Calibration feeds: the arrays cut into the model's batch size (its fixed dim 0, else 16)."""
    inputs = [i for i in model.graph.input]
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in inputs if i.name not in init]
    missing = [i.name for i in inputs if i.name not in calib]
    if missing:
        raise UserError(f"the calibration data has no array for input(s) {', '.join(missing)} "
                        f"(it holds {', '.join(calib) or 'nothing'})")
    n = min(len(calib[i.name]) for i in inputs)
    if n < 1:
        raise UserError("the calibration data holds no samples")
    used = min(n, int(max_samples)) if max_samples else n
    dim0 = inputs[0].type.tensor_type.shape.dim[0] if inputs[0].type.tensor_type.shape.dim else None
    bs = int(dim0.dim_value) if dim0 is not None and dim0.dim_value > 0 else 16
    if used < bs:
        raise UserError(f"the calibration data holds {used} sample(s), fewer than the model's batch of {bs}")
    used -= used % bs
    feeds = [{i.name: np.ascontiguousarray(calib[i.name][s:s + bs], dtype=np.float32) for i in inputs}
             for s in range(0, used, bs)]
    return feeds, used, n, bs


def quantize_int8(model, calib: dict, max_samples: int = DEFAULT_CALIB_SAMPLES, per_channel: bool = True):
    """(int8 QDQ ModelProto, details) through ``onnxruntime.quantization.quantize_static``."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    opset = opset_of(model)
    if opset < 13:
        raise UserError(f"--quantize int8 needs opset 13 or later (per-channel QuantizeLinear takes "
                        f"'axis' from opset 13); this model is opset {opset}: export with --opset 13")
    feeds, used, available, bs = _batches(model, calib, max_samples)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    tail = tail_nodes(model)
    # errstate: ORT divides by a zero range for an all-zero (pruned) channel and then handles it
    with tempfile.TemporaryDirectory() as d, _quiet_ort_logs(), np.errstate(invalid="ignore", divide="ignore"):
        src, path = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        onnx.save(model, src)  # a path, not the ModelProto: ORT then keeps all weights inside the file
        quantize_static(src, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=tail,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        out = onnx.load(path)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string = model.doc_string
    details = {"tool": f"onnxruntime.quantization.quantize_static (onnxruntime {_ort_version()})",
               "format": "QDQ", "weights": "int8, symmetric, " + ("per channel" if per_channel else "per tensor"),
               "activations": "int8, asymmetric", "kept_fp32": tail,
               "calibration": {"method": "MinMax", "samples": used, "available": available, "batch": bs}}
    return out, details


def sparsify_int8(model):
    """(copy, count): int8 initializers smaller as sparse initializers (above 8/9 zeros) become them."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from .sparse import to_sparse_tensor
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep, sparse = [], []
    for t in g.initializer:
        if t.data_type == TensorProto.INT8 and len(t.dims) > 0:
            arr = numpy_helper.to_array(t)
            nnz = int(np.count_nonzero(arr))
            if nnz * INT8_SPARSE_BYTES_PER_NONZERO < arr.size:
                st = to_sparse_tensor(t)
                if st.ByteSize() < t.ByteSize():
                    sparse.append(st)
                    continue
        keep.append(t)
    if sparse:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.sparse_initializer.extend(sparse)
    return out, len(sparse)


# ---- the one entry point -------------------------------------------------------------------------

def check_options(precision=None, quantize=None, calib=None):
    """Fail early (before any export) on an impossible combination."""
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize}: choose from {', '.join(QUANTIZE)}")
    if quantize and precision != "fp32":
        raise UserError(f"--quantize {quantize} and --precision {precision} exclude each other: int8 QDQ "
                        f"keeps fp32 where it does not quantize")
    if calib is not None and not quantize:
        raise UserError("--calib is calibration data for --quantize int8; give --quantize int8 too")
    return precision


def reduce_precision(model, precision="fp32", quantize=None, calib=None, sparse=False,
                     max_samples: int = DEFAULT_CALIB_SAMPLES):
    """(converted ModelProto, report dict) of a float32 ``model``; see the module docstring.

    ``calib``: {input name: float32 array (N, ...)} for ``quantize="int8"``.
    The report: {"precision", "quantize", "bytes_fp32", "bytes", "size_ratio",
    "tool", "kept_fp32", "calibration"?, "sparse_initializers", "notes"}.
    """
    precision = check_options(precision, quantize, None)
    if quantize and calib is None:
        raise UserError("--quantize int8 needs calibration inputs: --calib NPZ (or --inputs NPZ), "
                        "arrays keyed by input name; a few hundred real samples")
    dense = densify(model) if len(model.graph.sparse_initializer) else model
    before = len(dense.SerializeToString())
    notes = []
    if quantize == "int8":
        out, details = quantize_int8(dense, calib, max_samples=max_samples)
        cal = details["calibration"]
        if cal["samples"] < cal["available"]:
            notes.append(f"int8: calibrated on the first {cal['samples']} of {cal['available']} samples")
    elif precision == "fp16":
        out, details = to_fp16(dense)
    else:
        out, details = dense, {"tool": None, "kept_fp32": []}
    n_sparse = 0
    if sparse:
        from .sparse import sparsify_model
        out = sparsify_model(out)  # float initializers (fp32 / fp16)
        if quantize == "int8":
            out, n_int8 = sparsify_int8(out)
            if not n_int8:
                notes.append("--sparse with int8: every int8 weight stays dense (a sparse int8 tensor costs "
                             "1 + 8 bytes per nonzero, smaller only above 89% zeros)")
        n_sparse = len(out.graph.sparse_initializer)
    data_len = len(out.SerializeToString())
    report = {"precision": precision, "quantize": quantize, "bytes_fp32": before, "bytes": data_len,
              "size_ratio": data_len / before if before else None, **details,
              "sparse_initializers": n_sparse, "notes": notes + consumer_notes(out)}
    return out, report


def consumer_notes(model) -> list:
    """What MNN 3.x and OpenCV 4.x's ONNX reader will not take (a note saying "not take") or get
    wrong in ``model``, and what to use instead (found by the test matrix, tests/test_mobile_matrix.py)."""
    notes = []
    ops = {n.op_type for n in model.graph.node}
    if len(model.graph.sparse_initializer):
        notes.append("MNN and OpenCV's ONNX reader do not take sparse initializers (MNN's converter fails "
                     "'may be some node is not const'): for them use the dense file (without --sparse)")
    if "NonMaxSuppression" in ops:
        notes.append("OpenCV 4.x's ONNX reader does not take NonMaxSuppression (the DetectionOutput lowering): "
                     "for OpenCV run the Caffe files with its Caffe reader, which implements DetectionOutput")
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        notes.append("MNN 3.x does not take this int8 QDQ file (its converter aborts on a quantized Gemm and "
                     "mis-shapes what follows a quantized Conv): for MNN convert the fp32 file with "
                     "'mnnconvert --weightQuantBits 8' (int8 weights, about the same size)")
        notes.append("OpenCV 4.x's ONNX reader runs this int8 QDQ file right only at batch 1 (LeNet at batch 64: "
                     "64% top-1 agreement with onnxruntime): feed it one sample at a time")
    elif any(t.data_type == 10 for t in model.graph.initializer):  # FLOAT16
        notes.append("MNN converts this fp16 file but stores its weights as fp32 again; for fp16 in MNN "
                     "convert the fp32 file with 'mnnconvert --fp16'")
    return notes


__all__ = ["reduce_precision", "check_options", "consumer_notes", "to_fp16", "quantize_int8", "tail_nodes",
           "topo_sort", "densify", "sparsify_int8", "PRECISIONS", "QUANTIZE"]
