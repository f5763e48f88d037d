"""A runnable model from either a Caffe pair (NET WEIGHTS) or an ONNX file, so that the
file that ships is the file checked.

* :func:`open_model` / :func:`open_models`: ``MODEL.onnx`` takes one path, a
  Caffe net two (prototxt, caffemodel). A Caffe net is an IR ``Net`` (the
  engines export it as before); an ONNX file is an :class:`OnnxModel`: its
  bytes as written, its input and output names and shapes, and an
  onnxruntime session on those bytes (or OpenCV's ONNX reader on the file).
* :func:`load_arrays`: input arrays from an .npz (keyed by input name, or
  ``x``, or an MNIST-style split's ``x_train``/``x_test`` as pixels / 256).
* :func:`compare_models`: two ONNX models on the same inputs, through
  onnxruntime, compared by :mod:`lrprune_caffe.engines.compare`.
* :func:`export_onnx_files`: ``export-onnx`` with ``--precision`` /
  ``--quantize``: export, convert (:mod:`lrprune_caffe.export.precision`),
  write, and check the written bytes against the fp32 export.
"""

from __future__ import annotations

import os

import numpy as np

from lrprune_caffe.errors import BadFileError, EngineError, LrpruneError, UserError, engine_message


def is_onnx(path) -> bool:
    return str(path).lower().endswith(".onnx")


class OnnxModel:
    """An ONNX file as written: ``data`` (bytes), ``input_names``/``output_names``,
    ``shapes`` ({input: tuple, None for a symbolic dim}), ``output_shapes``."""

    def __init__(self, data: bytes, source: str = "model.onnx"):
        import onnx
        self.data = data
        self.source = str(source)
        self.notes = []
        try:
            model = onnx.load_from_string(data)
        except Exception as e:  # onnx's DecodeError and friends
            raise BadFileError(f"not an ONNX model ({type(e).__name__}: {e})", path=source) from None
        self.name = model.graph.name or os.path.basename(self.source)
        init = {t.name for t in model.graph.initializer}
        ins = [i for i in model.graph.input if i.name not in init]
        self.input_names = [i.name for i in ins]
        self.output_names = [o.name for o in model.graph.output]
        self.shapes = {i.name: _dims(i) for i in ins}
        self.output_shapes = {o.name: _dims(o) for o in model.graph.output}
        self.producers = {out: n.op_type for n in model.graph.node for out in n.output}
        self.quantized = any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in model.graph.node)
        self._sessions = {}

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise BadFileError("no such file", path=path)
        with open(path, "rb") as f:
            return cls(f.read(), path)

    # the Net-like surface the engines use
    def inputs(self) -> list:
        return list(self.input_names)

    def outputs(self) -> list:
        return list(self.output_names)

    def input_shapes(self) -> dict:
        return dict(self.shapes)

    def fixed_batch(self):
        dims = [s[0] for s in self.shapes.values() if s]
        return dims[0] if dims and dims[0] is not None else None

    def session(self, threads=None):
        if threads not in self._sessions:
            from .runtime import ort_session
            try:
                self._sessions[threads] = ort_session(self.data, threads)
            except LrpruneError:
                raise
            except Exception as e:  # onnxruntime's own error types
                raise EngineError(f"{self.source}: onnxruntime cannot load it: {engine_message(e)}") from None
        return self._sessions[threads]

    def run(self, feeds: dict, outputs=None, threads=None) -> dict:
        """Outputs for any batch size: a file with a fixed batch b runs in chunks of b."""
        outputs = list(outputs or self.output_names)
        sess = self.session(threads)
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        b = self.fixed_batch() or n
        if n % b:
            raise UserError(f"{self.source} takes batches of {b}; {n} inputs do not divide into them")
        parts = []
        try:
            for s in range(0, n, b):
                parts.append(sess.run(outputs, {k: v[s:s + b] for k, v in feeds.items()}))
        except Exception as e:
            raise EngineError(f"{self.source}: onnxruntime cannot run it: {engine_message(e)}") from None
        return {o: np.concatenate([p[i] for p in parts], axis=0) for i, o in enumerate(outputs)}

    def opencv(self):
        """The file through OpenCV's ONNX reader (cv2.dnn.readNetFromONNX)."""
        try:
            import cv2
        except ImportError:
            raise UserError("the opencv engine needs opencv-python-headless<5") from None
        try:
            return cv2.dnn.readNetFromONNX(np.frombuffer(self.data, np.uint8))
        except cv2.error as e:
            raise EngineError(f"{self.source}: OpenCV's ONNX reader cannot load it: {engine_message(e)}") from None


def _dims(value_info):
    shape = value_info.type.tensor_type.shape
    if not value_info.type.tensor_type.HasField("shape"):
        return None
    return tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in shape.dim)


def open_model(net, weights=None, phase="TEST"):
    """An :class:`OnnxModel` for ``MODEL.onnx`` (no weights), else the Caffe pair as an IR Net."""
    if is_onnx(net):
        if weights is not None:
            raise UserError(f"{net} is an ONNX file and holds its weights; drop '{weights}'")
        return OnnxModel.load(net)
    if weights is None:
        raise UserError(f"{net}: a Caffe net needs its WEIGHTS.caffemodel after it (or give MODEL.onnx)")
    from lrprune_caffe.io.caffe import load_net
    return load_net(net, weights, phase=phase)


def split_model_paths(paths) -> list:
    """[(net, weights or None)] from 'NET WEIGHTS' pairs and 'MODEL.onnx' singles in any order."""
    out, i, paths = [], 0, [str(p) for p in paths]
    while i < len(paths):
        if is_onnx(paths[i]):
            out.append((paths[i], None))
            i += 1
        elif i + 1 < len(paths) and not is_onnx(paths[i + 1]):
            out.append((paths[i], paths[i + 1]))
            i += 2
        else:
            raise UserError(f"{paths[i]}: a Caffe net needs its WEIGHTS.caffemodel after it (or give MODEL.onnx)")
    return out


def open_models(paths, phase="TEST") -> list:
    return [open_model(n, w, phase=phase) for n, w in split_model_paths(paths)]


# ---- input arrays ----------------------------------------------------------------------------------

def load_arrays(path, input_names, split="train") -> dict:
    """{input: float32 array} from an .npz keyed by input name, or holding ``x``, or an MNIST-style
    split (``x_train``/``x_test`` uint8 digits: N x 1 x 28 x 28 = pixels / 256; ``split`` picks one)."""
    from lrprune_caffe.fileutil import read_npz
    arrays = read_npz(path, "an .npz of input arrays keyed by input name")
    names = list(input_names)
    if len(names) == 1 and names[0] not in arrays:
        if "x" in arrays:
            arrays[names[0]] = arrays["x"]
        elif f"x_{split}" in arrays:
            from lrprune_caffe.data.datasets import load_mnist_split
            train, test = load_mnist_split(path)
            arrays[names[0]] = (train if split == "train" else test).x
    out = {}
    for name in names:
        if name not in arrays:
            raise BadFileError(f"has no array '{name}' for the model's input (it holds: "
                               f"{', '.join(arrays) or 'nothing'})", path=path)
        out[name] = np.ascontiguousarray(arrays[name], dtype=np.float32)
        if not np.all(np.isfinite(out[name])):
            raise BadFileError(f"array '{name}' holds NaN or infinite values", path=path)
    return out


def load_labels(path):
    """Labels from an .npz: its array 'y' or 'labels' (or 'y_test' of a split), else its first array."""
    from lrprune_caffe.fileutil import read_npz
    arrays = read_npz(path, "an .npz of labels")
    if not arrays:
        raise BadFileError("holds no array (expected labels)", path=path)
    key = next((k for k in ("y", "labels", "y_test") if k in arrays), next(iter(arrays)))
    return arrays[key].reshape(-1)


# ---- checks --------------------------------------------------------------------------------------

def compare_models(ref: OnnxModel, test: OnnxModel, feeds: dict, labels=None, threads=None) -> dict:
    """Run both on ``feeds`` with onnxruntime; :func:`compare_outputs` of their common outputs, each
    by its kind (a detection list is matched box by box, never a tensor distance)."""
    from .compare import compare_outputs, output_kinds
    outs = [o for o in ref.output_names if o in test.output_names]
    n = int(len(next(iter(feeds.values()))))
    a, t = ref.run(feeds, outs, threads), test.run(feeds, outs, threads)
    res = compare_outputs(a, t, labels=labels, blobs=outs, kinds=output_kinds(ref, outs))
    res["n"] = n
    return res


def run_model(model, inputs: dict, outputs=None, engine: str = "onnxruntime", threads=None) -> dict:
    """{blob: array} of an IR Net (:func:`~lrprune_caffe.engines.runtime.run_net`) or an
    :class:`OnnxModel` (onnxruntime on its bytes, or OpenCV's ONNX reader with ``engine="opencv"``)."""
    if not isinstance(model, OnnxModel):
        from .runtime import run_net
        return run_net(model, inputs, outputs, engine=engine, threads=threads)
    outputs = list(outputs or model.output_names)
    unknown = [o for o in outputs if o not in model.output_names]
    if unknown:
        raise UserError(f"{model.source} has no output named {', '.join(repr(u) for u in unknown)} "
                        f"(its outputs: {', '.join(model.output_names)})")
    if engine == "onnxruntime":
        return model.run(inputs, outputs, threads)
    import cv2
    cvnet = model.opencv()
    if threads:
        cv2.setNumThreads(int(threads))
    for k, v in inputs.items():
        cvnet.setInput(np.ascontiguousarray(v, dtype=np.float32), k)
    try:
        res = cvnet.forward(outputs)
    except cv2.error as e:
        raise EngineError(f"{model.source}: OpenCV's ONNX reader cannot run it: {engine_message(e)}") from None
    return {o: np.array(r, copy=True) for o, r in zip(outputs, res)}


def export_onnx_files(prototxt, weights, output, precision="fp32", quantize=None, calib=None, inputs=None,
                      labels=None, phase="TEST", threads=None, seed=0, **export_kw) -> dict:
    """``export-onnx`` with reduced precision: the report of
    :func:`lrprune_caffe.export.onnx.save_onnx` plus ``precision`` (what
    :func:`~lrprune_caffe.export.precision.reduce_precision` reports) and
    ``check``: the written file against the fp32 export on ``inputs`` (or
    ``calib``'s held-out split, or seeded random), with accuracy when ``labels``."""
    from lrprune_caffe.export.onnx import check_opset, export_model
    from lrprune_caffe.export.precision import check_options, reduce_precision
    from lrprune_caffe.fileutil import atomic_write_bytes, check_output_file
    from lrprune_caffe.io.caffe import load_net
    check_options(precision, quantize, calib)
    if quantize and calib is None and inputs is None:
        raise UserError("--quantize int8 needs calibration inputs: --calib NPZ (or --inputs NPZ)")
    if "opset" in export_kw:
        check_opset(export_kw["opset"])
    check_output_file(output)
    net = load_net(prototxt, weights, phase=phase)
    report = {}
    fp32 = export_model(net, report=report, **export_kw)
    ref = OnnxModel(fp32.SerializeToString(), f"{output} (fp32)")
    check_in = load_arrays(inputs, ref.input_names, split="test") if inputs else None
    if labels and check_in is None:
        raise UserError("--labels are the labels of --inputs NPZ: give --inputs too")
    cal, notes = None, []
    if quantize:
        cal = load_arrays(calib, ref.input_names, split="train") if calib else check_in
        if not calib:
            notes.append("int8: calibrated on the --inputs themselves, which the check then runs on too: "
                         "give --calib with other samples for an unbiased check")
    model, prec = reduce_precision(fp32, precision=precision, quantize=quantize, calib=cal)
    del fp32
    data = model.SerializeToString()
    report["nodes"], report["initializers"] = len(model.graph.node), len(model.graph.initializer)
    del model
    test = OnnxModel(data, str(output))
    if check_in is None:
        rng = np.random.default_rng(seed)
        b = ref.fixed_batch() or 1
        check_in = {k: rng.standard_normal((b, *s[1:])).astype(np.float32) for k, s in ref.shapes.items()}
        desc = f"seeded standard-normal inputs (seed {seed})"
    else:
        desc = str(inputs)
    lab = load_labels(labels) if labels else None
    check = compare_models(ref, test, check_in, labels=lab, threads=threads)
    check["inputs"] = desc
    atomic_write_bytes(output, data)
    report.update({"path": str(output), "bytes": len(data), "precision": prec, "check": check,
                   "notes": list(net.notes) + notes + prec.pop("notes")})
    return report


__all__ = ["OnnxModel", "open_model", "open_models", "split_model_paths", "is_onnx", "load_arrays",
           "load_labels", "compare_models", "run_model", "export_onnx_files"]
