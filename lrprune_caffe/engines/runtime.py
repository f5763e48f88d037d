"""Run a net on real engines: onnxruntime (via our ONNX exporter) or OpenCV's Caffe reader.

Both are independent consumers of what we write: OpenCV reads the Caffe
files, onnxruntime the ONNX file. Nothing here computes a layer itself.

``run_net(net, inputs, outputs=None, engine="onnxruntime")`` returns
{blob name: np.ndarray}. ``outputs`` defaults to the net's output blobs and
may name any intermediate blob.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from lrprune_caffe.errors import EngineError, LrpruneError, UserError, engine_message

ENGINES = ("onnxruntime", "opencv")


def default_inputs(net, seed: int = 0, batch: int = None) -> dict:
    """Seeded standard-normal inputs of the net's input shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in net.input_shapes().items():
        if shape is None:
            raise UserError(f"input '{name}' has no shape; give --inputs")
        shape = tuple(shape)
        if batch is not None:
            shape = (batch, *shape[1:])
        out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def run_opencv(net, inputs: dict, outputs=None, threads: int = None) -> dict:
    """Forward with OpenCV's Caffe reader (opencv-python-headless<5) on written files."""
    try:
        import cv2
    except ImportError:
        raise UserError("the opencv engine needs opencv-python-headless<5 "
                        "(pip install 'opencv-python-headless<5')") from None
    try:
        return _run_opencv(cv2, net, inputs, outputs, threads)
    except cv2.error as e:
        where = net.source or net.name or "the net"
        raise EngineError(f"{where}: OpenCV's Caffe reader cannot run it: {engine_message(e)}") from None


def _run_opencv(cv2, net, inputs, outputs, threads):
    from lrprune_caffe.io.caffe import save_net
    outputs = list(outputs or net.outputs())
    with tempfile.TemporaryDirectory() as d:
        proto, model = os.path.join(d, "m.prototxt"), os.path.join(d, "m.caffemodel")
        save_net(net, proto, model)
        cvnet = cv2.dnn.readNetFromCaffe(proto, model)
    if threads:
        cv2.setNumThreads(int(threads))
    for k, v in inputs.items():
        cvnet.setInput(np.ascontiguousarray(v, dtype=np.float32), k)
    # OpenCV's forward() looks names up as LAYER names: ask for the last layer
    # writing each blob (a factorized conv2's top is written by conv2_lr2)
    writer = {}
    for layer in net.layers:
        if layer.type != "Input" and layer.tops:
            writer[layer.tops[0]] = layer.name
    if set(outputs) <= set(net.outputs()):
        res = cvnet.forward([writer.get(o, o) for o in outputs])
        return {name: np.array(r, copy=True) for name, r in zip(outputs, res)}
    # Intermediate blobs: OpenCV's layer fusion rewrites them, and one forward
    # asking for many may hand back reused buffers; ask for each alone, unfused.
    cvnet.enableFusion(False)
    return {name: np.array(cvnet.forward(writer.get(name, name)), copy=True) for name in outputs}


def ort_session(model_bytes: bytes, threads: int = None, external: dict = None):
    """An onnxruntime CPU session; ``external``: {initializer name: array} for a model exported with
    ``export_model(..., external=)`` (the weights handed over from memory, not through protobuf)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if external:
        names = list(external)
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(external[n]) for n in names])
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _external_weights() -> bool:
    """True when onnxruntime takes initializers from memory (``add_external_initializers``, 1.15+)."""
    import onnxruntime as ort
    return hasattr(ort.SessionOptions, "add_external_initializers")


def run_onnxruntime(net, inputs: dict, outputs=None, threads: int = None) -> dict:
    """Export with our exporter, then forward with onnxruntime. The weights go to onnxruntime from
    memory (external initializers), not through a serialized ModelProto: VGG-16's check of both
    nets (export + sessions) fell from 33 s to ~4 s and its peak by ~0.8 GB (tools/bench_compress.py).
    Files (``compress --onnx``, ``export-onnx``) are still exported whole."""
    from lrprune_caffe.export.onnx import InMemoryWeights, export_model
    outputs = list(outputs or net.outputs())
    batch = {k: int(v.shape[0]) for k, v in inputs.items()}
    external = InMemoryWeights() if _external_weights() else None
    model = export_model(net, extra_outputs=[o for o in outputs if o not in net.outputs()],
                         dynamic_batch=any(b != 1 for b in batch.values()), external=external)
    data = model.SerializeToString()
    del model  # a VGG-sized ModelProto is ~0.5 GB (without external weights): not held while the session copies
    feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
    produced = [o for o in outputs if o not in feed]  # an input blob is not a graph output
    try:
        sess = ort_session(data, threads, external)
        del data
        res = dict(zip(produced, sess.run(produced, feed)))  # ``external`` alive until here: the session may read it
    except LrpruneError:
        raise
    except Exception as e:  # onnxruntime's own error types (InvalidArgument, Fail, ...)
        where = net.source or net.name or "the net"
        raise EngineError(f"{where}: onnxruntime cannot run it: {engine_message(e)}") from None
    return {o: res[o] if o in res else feed[o] for o in outputs}


def run_net(net, inputs: dict, outputs=None, engine: str = "onnxruntime", threads: int = None) -> dict:
    if engine == "onnxruntime":
        return run_onnxruntime(net, inputs, outputs, threads)
    if engine == "opencv":
        return run_opencv(net, inputs, outputs, threads)
    raise UserError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
