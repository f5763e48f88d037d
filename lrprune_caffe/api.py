"""The importable API at the level of files: read, call the core, write all or nothing. The CLI only
parses arguments and calls these."""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import UserError
from .fileutil import check_outdir
from .io.caffe import load_net
from .io.inputs import load_inputs, load_labels
from .io.output import write_net
from .io.train_net import read_train_net
from .ir.analysis import layer_stats, totals, validate


def inspect_net(prototxt, weights=None, phase="TEST", stages=(), level=0) -> dict:
    """Per-layer table (name, type, bottoms, tops, output shapes, params, MACs) and totals."""
    net = load_net(prototxt, weights, phase=phase, stages=stages, level=level)
    shapes = validate(net)
    rows = layer_stats(net, shapes)
    unknown_macs, unknown_params = _unknown_counts(net, shapes)
    return {
        "net": net.name,
        "inputs": {k: list(v) if v else None for k, v in net.input_shapes().items()},
        "outputs": net.outputs(),
        "layers": [
            {"name": r.name, "type": r.type, "bottoms": r.bottoms, "tops": r.tops,
             "output_shapes": r.output_shapes, "params": None if r.name in unknown_params else r.params,
             "macs": None if r.name in unknown_macs else r.macs}
            for r in rows
        ],
        # None where a layer's count is unknown (its shapes are): a sum would pass for a number
        "totals": {"params": None if unknown_params else totals(rows)["params"],
                   "macs": None if unknown_macs else totals(rows)["macs"]},
        "notes": list(net.notes),
    }


def _unknown_counts(net, shapes) -> tuple:
    """(layers whose MACs are unknown, layers whose params are unknown): a shape is unknown
    (``?``), and for params the layer type has weights but the file holds none."""
    from .ir.layers import get_spec
    from .ir.layers.base import LayerSpec
    macs, params = set(), set()
    for layer in net.layers:
        ins, outs = shapes.inputs[layer.name], shapes.outputs[layer.name]
        if any(s is None for s in ins) or any(s is None for s in outs):
            macs.add(layer.name)
            spec = get_spec(layer.type)
            if not layer.blobs and type(spec).weight_shapes is not LayerSpec.weight_shapes:
                params.add(layer.name)
    return macs, params


def convert(prototxt, weights=None, outdir="out", phase="TEST", all_phases=False, stages=(), level=0) -> dict:
    """Upgrade a net (V1, input headers) to the current format without Caffe.

    Default: the ``phase`` view (TEST = deploy), validated. ``all_phases``: every layer
    kept with its phase rules, as Caffe's upgrade_net_proto_text does for a train_val
    net (not validated: it holds Data layers); weights merge by layer name."""
    if not all_phases:
        net = load_net(prototxt, weights, phase=phase, stages=stages, level=level)
        written = write_net(net, outdir, with_weights=weights is not None)
        return {"written": written, "notes": list(net.notes)}
    from .io.caffe import merge_weights, read_caffemodel
    net = read_train_net(prototxt)
    if weights is not None:
        merge_weights(net, read_caffemodel(weights), path=weights, strict=False)
    written = write_net(net, outdir, with_weights=weights is not None, check=False)
    return {"written": written, "notes": list(net.notes)}


def compress_files(prototxt, weights, outdir=None, *, inputs=None, labels=None, train_net=None, phase="TEST",
                   calib=None, preprocess=None, plot=False, **options):
    """Read a Caffe net, :func:`lrprune_caffe.core.compress.compress` it, and (with ``outdir``) write
    OUTDIR/model.prototxt, model.caffemodel, report.json, report.md (+ train_val.prototxt with
    ``train_net``, model.onnx with ``onnx``, masks.npz when pruning) all or nothing.
    ``inputs``: an .npz of verification inputs; ``labels``: an .npz (or an array) of their labels;
    ``calib``: unlabeled calibration data (``calib_n`` samples of an .npz, an image folder, a Caffe
    data source or a train_val prototxt: :func:`lrprune_caffe.data.calib.load_calib`; or a dict
    {input: array}): fits the compressed layers, is the check's held-out data without ``inputs``,
    and calibrates ``quantize="int8"`` (default there: ``inputs``); ``preprocess``: a
    :class:`lrprune_caffe.data.datasets.Preprocess` for image folders / data sources;
    ``plot``: also draw OUTDIR/report.png (:mod:`lrprune_caffe.core.plots`; report.md embeds it);
    ``options``: the fields of :class:`CompressOptions`. Returns ``(report, new net)``; when the
    quality gate fails, only report.json and report.md are written (``report["gate"]``)."""
    # the core (scipy, the exporter) loads on first use: "inspect" and "convert" start fast
    from .core.compress import CompressData, CompressOptions, compress
    from .core.markdown import report_markdown
    from .engines.compare import json_safe
    o = CompressOptions.from_kwargs(**options)
    compress_checks(o, outdir, inputs, labels)
    if plot:
        from .core.plots import _plt
        _plt()  # matplotlib missing: say so before the work
    if weights is None:
        raise UserError("compress needs the trained weights (WEIGHTS.caffemodel)")
    net = load_net(prototxt, weights, phase=phase)
    data = CompressData(original_weights_bytes=os.path.getsize(weights) if os.path.exists(weights) else None)
    if inputs is not None:
        data.inputs, data.inputs_desc = load_inputs(inputs, net), str(inputs)
    if labels is not None:
        data.labels = labels if isinstance(labels, np.ndarray) else load_labels(labels)
    if train_net is not None:
        data.train_net = read_train_net(train_net)
    if calib is not None:
        if isinstance(calib, dict):
            data.calib, data.calib_desc = dict(calib), f"{len(next(iter(calib.values())))} calibration samples"
        else:
            from .data.calib import load_calib
            shapes = net.input_shapes()
            cs = load_calib(calib, net.inputs(), shapes.get(net.inputs()[0]) if len(shapes) == 1 else None,
                            n=o.calib_n, pre=preprocess, seed=o.seed)
            data.calib, data.calib_desc = cs.arrays, cs.desc
            net.notes.extend(cs.notes)
    if preprocess is not None and (preprocess.mean is not None or preprocess.scale != 1.0):
        data.preprocessing = (preprocess.mean, preprocess.scale)
    result = compress(net, o, data)
    report = result.report
    if outdir is not None:
        extra = {}
        if plot:
            from .core.plots import report_png
            report["plot"] = "report.png"
            extra["report.png"] = report_png(json_safe(report))
        safe = json_safe(report)
        extra.update({"report.json": json.dumps(safe, indent=2) + "\n", "report.md": report_markdown(safe)})
        if result.passed:
            extra.update(result.files)
            report["written"] = write_net(result.net, outdir, extra=extra)
        else:
            report["written"] = _write_reports(outdir, extra)
    return report, result.net


def _write_reports(outdir, files: dict) -> dict:
    """A failed quality gate: OUTDIR holds the reports only (report.json, report.md, report.png), all or nothing."""
    from .fileutil import OutputSet
    written = {}
    try:
        with OutputSet(outdir) as out:
            for name, content in files.items():
                (out.write_text if isinstance(content, str) else out.write_bytes)(name, content)
                written[name] = str(out.final(name))
    except OSError as e:
        raise UserError(f"{outdir}: cannot write the report: {e.strerror or e}") from e
    return written


def compress_checks(o, outdir=None, inputs=None, labels=None):
    """Before reading anything: the options, the output folder, --labels without --inputs."""
    from .core.options import check_options
    spec = check_options(o)
    if outdir is not None:
        check_outdir(outdir)  # missing folders are created at the end (and only then)
    if labels is not None and inputs is None:
        raise UserError("--labels are the labels of --inputs: give --inputs too")
    if o.max_drop is not None and labels is None:
        raise UserError("--max-drop limits the fall of top-1 accuracy: give --inputs and their --labels")
    return spec


def verify_files(prototxt, weights, prototxt2, weights2, inputs=None, engine="onnxruntime", seed=0, threads=None,
                 phase="TEST", labels=None) -> dict:
    """Run two models on the same inputs (an .npz, or seeded random of the first model's input shape)
    and compare every output blob of the first, each by its kind (see
    :mod:`lrprune_caffe.engines.compare`). Either model may be ``MODEL.onnx`` with its weights
    ``None``: the file that ships is the file checked (Caffe vs ONNX side by side)."""
    from .core.verify import verify_nets
    from .engines.model import open_model
    from .engines.runtime import ENGINES
    if engine not in ENGINES:
        raise UserError(f"--engine: unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    a = open_model(prototxt, weights, phase=phase)
    b = open_model(prototxt2, weights2, phase=phase)
    data = desc = None
    if inputs is not None:
        data, desc = load_inputs(inputs, a), str(inputs)
    if labels is not None and not isinstance(labels, np.ndarray):
        labels = load_labels(labels)
    return verify_nets(a, b, data, desc, engine=engine, seed=seed, threads=threads, labels=labels,
                       name_a=str(prototxt), name_b=str(prototxt2))


def verify_paths(paths, **kw) -> dict:
    """:func:`verify_files` on two models given as 'NET WEIGHTS' pairs and 'MODEL.onnx' singles."""
    from .engines.model import split_model_paths
    pairs = split_model_paths(paths)
    if len(pairs) != 2:
        raise UserError(f"verify takes two models (NET WEIGHTS or MODEL.onnx each), got {len(pairs)}")
    (n1, w1), (n2, w2) = pairs
    return verify_files(n1, w1, n2, w2, **kw)


__all__ = ["inspect_net", "convert", "write_net", "load_net", "compress_files", "verify_files", "verify_paths"]
