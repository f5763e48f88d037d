"""compress with calibration data (unlabeled inputs): the held-out split, the fits, the data-aware scores.

* :func:`split_calib`: a held-out part of the calibration set (the last
  1/8, at least 64 samples when the set has 128 or more) that no fit sees;
  it is the check's data when there are no ``--inputs``;
* :func:`fit_factorized` / :func:`fit_pruned`: the passes of
  :mod:`lrprune_caffe.transforms.calibrate` on the new net (sequential,
  asymmetric: each layer is fit on the inputs the already compressed layers
  below it produce), with a report record;
* :func:`response_energies`: per layer, the eigenvalues of the covariance of
  its output responses on the calibration data: Zhang et al. 2015 (TPAMI,
  "Accelerating Very Deep Convolutional Networks for Classification and
  Detection", Sec. 3.3 and Eq. 14) choose ranks by these, since the
  response-reconstruction error at rank r is the sum of the discarded
  eigenvalues. ``--speedup`` spends its budget on them instead of the
  weights' singular values (channel scheme and FC layers);

Global pruning with calibration data keeps one |w| threshold over the
(calibrated) layers, then re-solves the kept weights: on the real-Caffe LeNet
(512 digits, top-1 on the 1,000 held-out) that beat every data-aware
allocation tried (Wanda-style ``|w| sqrt(E[x^2])``, the same normalized by
each layer's output energy, OBS ``w^2 / [H^-1]_jj`` normalized): 97.0 / 96.9%
at 90 / 95% global against 96.6 / 96.1% for the best of them.

The forward is :mod:`lrprune_caffe.transforms.forward` (numpy), on batches of
images; activations are freed as soon as their last reader has run.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.ir.net import Net
from lrprune_caffe.lowrank import datafit as df
from lrprune_caffe.transforms import run_pass
from lrprune_caffe.transforms.calibrate import calibrate_factorized, calibrate_pruned
from lrprune_caffe.transforms.forward import SUPPORTED, run_layer

#: columns (positions x images) sampled per layer for the data-aware scores
SCORE_COLUMNS = 8192
#: the scores' walk reads at most this many input values (float32) of the calibration set, and no fewer
#: than MIN_SCORE_IMAGES images (VGG-16's 224x224: 16 images; LeNet: every digit)
SCORE_VALUES = 1 << 21
MIN_SCORE_IMAGES = 16
#: the scores' walk runs batches of about this many input values (float32), at most MAX_BATCH images
BATCH_VALUES = 1 << 20
MAX_BATCH = 256


#: nets under this many MACs per sample calibrate with one BLAS thread (small matrices: threads cost more
#: than they give, and stall on a busy machine; LeNet's 512-digit compress: 20 s -> 10 s wall at load 14)
SMALL_NET_MACS = 100_000_000


def blas_threads_for(total_macs: int):
    """A context: one BLAS thread for a small net, the library's default otherwise (or for None)."""
    import contextlib
    if total_macs is not None and total_macs < SMALL_NET_MACS:
        from lrprune_caffe.lowrank.svd_methods import _one_blas_thread
        return _one_blas_thread()
    return contextlib.nullcontext()


#: images per onnxruntime call of the layer runner (4: its buffers for VGG-16's 224x224 layers stay ~0.15 GB)
ORT_BATCH = 4
#: layer types the onnxruntime runner computes (the rest, cheap or in place, stay on the numpy forward;
#: InnerProduct too: a few hundred vectors are cheap in numpy, and a session would copy VGG's 0.5 GB of FC weights)
ORT_TYPES = ("Convolution",)


def ort_runner(threads=None):
    """A ``(layer, bottoms) -> tops`` callable for the calibration passes (their ``run=``): each
    Convolution runs as a one-layer ONNX model in onnxruntime (MLAS kernels,
    float32), the other layers in the numpy forward. Sessions are cached per layer and
    weights (a refit layer gets new blob arrays, hence a new session). The sessions have no
    memory arena (an arena keeps each session's peak buffers: VGG-16 on 52 images grew past
    16 GB), and run :data:`ORT_BATCH` images at a time."""
    import numpy as np
    import onnxruntime as ort
    from lrprune_caffe.export.onnx import export_model
    from lrprune_caffe.ir.net import Layer
    cache = {}

    def session(data):
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])

    def run(layer, bottoms):
        if layer.type not in ORT_TYPES or len(bottoms) != 1 or layer.tops[0] in layer.bottoms:
            return run_layer(layer, bottoms)
        x = np.ascontiguousarray(bottoms[0], dtype=np.float32)
        key = (id(layer), tuple(id(b) for b in layer.blobs), x.shape[1:])
        hit = cache.get(key)
        if hit is None:
            for k in [k for k in cache if k[0] == id(layer)]:
                del cache[k]  # the layer's old weights: never asked for again
            inp = Layer(f"{layer.name}__input", "Input", [], [layer.bottoms[0]])
            inp.msg.input_param.shape.add().dim.extend([1, *(int(d) for d in x.shape[1:])])
            one = Net(layer.name, [inp, layer])
            data = export_model(one, dynamic_batch=True).SerializeToString()
            hit = cache[key] = (list(layer.blobs), session(data))
        sess, name, top = hit[1], layer.bottoms[0], layer.tops[0]
        if x.shape[0] <= ORT_BATCH:
            return sess.run([top], {name: x})
        first = sess.run([top], {name: x[:ORT_BATCH]})[0]
        out = np.empty((x.shape[0], *first.shape[1:]), np.float32)
        out[:ORT_BATCH] = first
        io = sess.io_binding()  # the rest straight into ``out`` (no copy of each batch's result)
        for i in range(ORT_BATCH, x.shape[0], ORT_BATCH):
            ob = out[i:i + ORT_BATCH]
            io.bind_cpu_input(name, x[i:i + ORT_BATCH])
            io.bind_output(top, "cpu", 0, np.float32, list(ob.shape), ob.ctypes.data)
            sess.run_with_iobinding(io)
        return [out]

    return run


#: the held-out check runs both nets on at most this many multiply-adds each (VGG-16: 12 images of 224x224;
#: LeNet: every held-out digit), never fewer than MIN_CHECK samples
CHECK_MACS = 2e11
MIN_CHECK = 8


def split_calib(arrays: dict, holdout: bool, macs_per_sample: int = 0) -> tuple:
    """(fit part, held-out part or None): the last max(n // 8, min(64, n // 2)) samples held out,
    fewer when the check would cost more than CHECK_MACS per net (a large net)."""
    n = int(next(iter(arrays.values())).shape[0])
    if not holdout or n < 2:
        return arrays, None
    k = max(n // 8, min(64, n // 2))
    if macs_per_sample > 0:
        k = min(k, max(MIN_CHECK, int(CHECK_MACS // macs_per_sample)))
    return {a: v[:n - k] for a, v in arrays.items()}, {a: v[n - k:] for a, v in arrays.items()}


def runner_for(net, total_macs, threads=None):
    """The ``run=`` of the calibration passes: onnxruntime for the convolutions and FC layers of a
    large net (:func:`ort_runner`), the numpy forward (None) for a small one or one the numpy
    forward cannot run whole (the passes then say why they leave it)."""
    if total_macs < SMALL_NET_MACS or any(layer.type not in SUPPORTED for layer in net.layers):
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return ort_runner(threads)


def trim_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; elsewhere nothing): after
    the statistics walk ~0.35 GB of VGG-16's freed activations stayed resident, raising the peak of
    the fits that follow."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def count(arrays) -> int:
    return int(next(iter(arrays.values())).shape[0]) if arrays else 0


def fit_factorized(net, new, plan, fit: dict, o, run=None) -> tuple:
    """(record, notes): calibrate_factorized on ``new`` (in place)."""
    trim_memory()
    res = run_pass(calibrate_factorized, new, original=net, plan=plan, calib_inputs=fit,
                   damping=float(o.calib_damping), seed=int(o.seed), run=run)
    if not res.changed:
        return {"skipped": res.reason}, [f"calibration: the factorized layers were not fit ({res.reason})"]
    return {"method": "Zhang et al. 2015 response reconstruction + least-squares re-fit of the last factor, "
                      "sequential (asymmetric)", "layers": res.details}, []


def fit_pruned(net, new, dense, masks: dict, fit: dict, o, run=None) -> tuple:
    """(record, notes): calibrate_pruned on ``new`` (in place; ``masks`` updated for sparsegpt)."""
    method = "sparsegpt" if o.prune_method == "sparsegpt" else "resolve"
    trim_memory()
    res = run_pass(calibrate_pruned, new, original=net, masks=masks, calib_inputs=fit, dense=dense,
                   damping=float(o.calib_damping), seed=int(o.seed), prune_method=method, run=run)
    if not res.changed:
        return {"skipped": res.reason or "no masked layer"}, \
            [f"calibration: the pruned layers were not re-solved ({res.reason or 'no masked layer'})"]
    text = ("SparseGPT (Frantar & Alistarh 2023) masks at each layer's sparsity, then" if method == "sparsegpt"
            else "the masks kept;")
    return {"method": f"{text} kept weights re-solved by masked least squares, sequential", "layers": res.details}, []


def dense_copy(new: Net) -> Net:
    """The net as it is (blobs copied): the dense reference of calibrate_pruned."""
    return Net(new.name, [layer.copy() for layer in new.layers], new.header, new.source, new.weights_source)


# ---------------------------------------------------------------------------
# data-aware scores: one walk over the original net, statistics at the named layers

def _responses(layer, y, per_image, rng):
    """Outputs (N, n) of a conv / IP layer at sampled positions."""
    if layer.type == "Convolution" and y.ndim == 4:
        pos = df.sample_positions(y.shape[0], y.shape[2], y.shape[3], per_image, int(rng.integers(1 << 30)))
        return df.responses(y, pos)
    ip = layer.param_msg("inner_product_param") if layer.type == "InnerProduct" else None
    axis = int(ip.axis) % y.ndim if ip is not None else 1
    return y.reshape(int(np.prod(y.shape[:axis])), -1).T


def layer_statistics(net, names, inputs: dict, max_columns=SCORE_COLUMNS, seed=0, run=None) -> dict:
    """{layer: {"cov": centered output covariance (N, N), "out_sq": E||y||^2}} of the named
    Convolution / InnerProduct layers of ``net`` on ``inputs``, at sampled output positions."""
    run = run or run_layer
    names = set(names)
    if any(layer.type not in SUPPORTED for layer in net.layers):
        return {}
    per = max(int(np.prod(v.shape[1:])) for v in inputs.values())
    n = min(count(inputs), max(MIN_SCORE_IMAGES, SCORE_VALUES // max(1, per)))  # a subsample of large images
    inputs = {k: v[:n] for k, v in inputs.items()}
    batch = max(1, min(MAX_BATCH, BATCH_VALUES // max(1, per)))
    rng = np.random.default_rng(seed)
    last = {}
    for i, layer in enumerate(net.layers):
        for b in layer.bottoms:
            last[b] = i
    acc = {}
    for start in range(0, n, batch):
        blobs = {k: np.asarray(v[start:start + batch], np.float32) for k, v in inputs.items()}
        for i, layer in enumerate(net.layers):
            if layer.type == "Input":
                continue
            outs = run(layer, [blobs[b] for b in layer.bottoms])
            if layer.name in names:
                y = outs[0]
                spatial = y.shape[2] * y.shape[3] if y.ndim == 4 and layer.type == "Convolution" else 1
                per_image = max(1, min(spatial, max_columns // max(1, n)))
                Y = _responses(layer, y, per_image, rng).astype(np.float64)
                a = acc.setdefault(layer.name, {"s": 0.0, "ss": 0.0, "n": 0, "cols": []})
                a["s"] = a["s"] + Y.sum(axis=1)
                a["ss"] = a["ss"] + Y @ Y.T
                a["n"] += Y.shape[1]
                if a["cols"] is not None:  # fewer samples than outputs (FC layers): kept for response_energies
                    a["cols"] = a["cols"] + [Y] if a["n"] < Y.shape[0] else None
            for t, v in zip(layer.tops, outs):
                blobs[t] = v
            for b in layer.bottoms:
                if last.get(b) == i and b not in layer.tops:
                    blobs.pop(b, None)
        del blobs
    out = {}
    for name, a in acc.items():
        m = a["s"] / a["n"]
        second = a["ss"] / a["n"]
        out[name] = {"cov": second - np.outer(m, m), "out_sq": float(np.trace(second))}
        if a["cols"]:
            out[name]["centered"] = np.concatenate(a["cols"], axis=1) - m[:, None]
    return out


def response_energies(stats: dict) -> dict:
    """{layer: eigenvalues of its centered response covariance, descending} (Zhang et al. 2015).

    With fewer samples n than outputs N (an FC layer on a few large images) the covariance
    ``Yc Yc^T / n`` has the nonzero eigenvalues of the n x n ``Yc^T Yc / n``: those, then zeros
    (VGG-16's fc6 / fc7: 16 x 16 instead of 4096 x 4096 eigenproblems)."""
    from lrprune_caffe.lowrank.svd_methods import _sym_eig_desc
    out = {}
    for name, s in stats.items():
        Yc = s.get("centered")
        if Yc is not None and Yc.shape[1] < Yc.shape[0]:
            e = _sym_eig_desc(Yc.T @ Yc / Yc.shape[1], vectors=False)[0] ** 2
            out[name] = np.concatenate([e, np.zeros(Yc.shape[0] - e.size)])
        else:
            out[name] = _sym_eig_desc(np.array(s["cov"]), vectors=False)[0] ** 2
    return out


__all__ = ["ort_runner", "runner_for", "ORT_TYPES", "blas_threads_for", "split_calib", "fit_factorized",
           "fit_pruned", "dense_copy", "layer_statistics", "response_energies", "count"]
