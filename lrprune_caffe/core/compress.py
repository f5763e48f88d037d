"""``compress(net, options, data=None)``: low-rank factorization and pruning of a net, in memory.

One sequence, each step a function with its inputs and outputs::

    plan_ranks -> factorize -> prune -> check -> export (with --onnx) -> report

* :func:`lrprune_caffe.core.ranks.plan_ranks`: report rows, the layers to
  factorize and their ranks;
* :func:`factorize_net`: the ``factorize`` pass on a new net that shares the
  unchanged layers with the original (+ the training net rewritten alike);
* :func:`prune_new`: the ``prune`` / ``structured_prune`` passes on the
  layers of the new net (copied first: the original is verification's reference);
* :func:`lrprune_caffe.core.verify.check_compressed`: both nets on one engine;
* :func:`export_onnx`: model.onnx (sparse initializers with ``sparse``);
* :func:`lrprune_caffe.core.report.build_report`: report.json's dict; with ``--speedup``,
  :func:`lrprune_caffe.core.latency_cost.report_speed` adds the written net's measured speed-up.

Nothing here reads or writes a file: the result holds the new net and the
other files' contents; :func:`lrprune_caffe.api.compress_files` is the file-level wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.analysis import validate
from lrprune_caffe.ir.masks import masks_npz
from lrprune_caffe.ir.net import Layer, Net, clone_msg
from lrprune_caffe.transforms import run_pass
from lrprune_caffe.transforms.factorize import factorize, rewrite_train_net
from lrprune_caffe.transforms.prune import PruneSpec, prune_net

from . import calib as cb
from .latency_cost import report_speed
from .options import CompressOptions, check_options
from .ranks import RankPlan, data_aware_names, plan_ranks, progress_bar
from .report import STANDARD_FILES, PruneRecord, rank_value, build_report
from .verify import check_compressed, check_data, declared_preprocessing, gate, warnings_of


@dataclass
class CompressData:
    """What ``compress`` may use besides the net and the options."""

    inputs: Optional[dict] = None  # verification inputs {input name: array}; None: seeded standard-normal
    inputs_desc: Optional[str] = None  # how the report names them
    labels: Optional[np.ndarray] = None  # labels of ``inputs`` (top-1 accuracy of both nets)
    train_net: Optional[Net] = None  # a training net (every phase) to rewrite as the net is
    original_weights_bytes: Optional[int] = None  # size of the caffemodel read (for the report's outcome)
    calib: Optional[dict] = None  # calibration inputs {input name: array}, no labels: data-aware ranks, fits and
    #                               masks, the check's held-out data, int8 calibration (default there: ``inputs``)
    calib_desc: Optional[str] = None  # how the report names them
    preprocessing: Optional[tuple] = None  # (mean per channel or None, scale) the net's inputs expect, if known


@dataclass
class CompressResult:
    net: Net  # the compressed net
    masks: dict  # {"<layer>/<idx>": keep bool array} held at zero by fine-tuning (unstructured pruning)
    report: dict  # report.json's content
    files: dict = field(default_factory=dict)  # other outputs {file name: bytes | str}: train_val.prototxt,
    #                                             model.onnx, masks.npz
    passed: bool = True  # the quality gate (--max-drop / --min-agree / --max-rel-l2): False -> write no model



def factorize_net(net: Net, rp: RankPlan, o: CompressOptions, train_net: Optional[Net] = None) -> tuple:
    """(new net, notes): ``net`` with the planned layers factorized (``rp.rows`` updated);
    the unchanged layers are shared with ``net``. ``train_net`` is rewritten the same way, in place."""
    new = Net(net.name, list(net.layers), clone_msg(net.header), net.source, net.weights_source, list(net.notes))
    if not rp.plan:
        structured = any("structured" in v for v in ((rp.budget or {}).get("layers") or {}).values())
        why = ("no layer was factorized: the --speedup budget pruned filters instead (see each layer's reason)"
               if structured else "no layer was factorized (see each layer's reason)")
        return new, ([why] if o.factorizing else [])
    with progress_bar(len(rp.plan), "factorize", o.progress) as bar:
        res = run_pass(factorize, new, plan=rp.plan, method=o.svd, seed=o.seed, hooi_iters=o.hooi,
                       caches=rp.caches, progress=lambda name: bar.update(1))
    if not res.changed:
        raise UserError(f"cannot factorize: {res.reason}")
    rp.caches.clear()
    for d in res.details:
        row = rp.rows[d["name"]]
        row.action, row.scheme, row.rank = "factorized", d["scheme"], rank_value(d["rank"])
        row.energy_kept, row.weight_rel_error = d["energy_kept"], d["weight_rel_error"]
        row.new_layers, row.reason = list(d["new_layers"]), None
    if train_net is not None:
        rewrite_train_net(train_net, rp.plan, path=train_net.source)
    return new, []


def _map_factorized(spec: PruneSpec, rows: dict) -> PruneSpec:
    """Names of factorized layers -> their new layers (structured: all but the last,
    whose outputs are the original layer's; i.e. the rank components)."""
    def targets(name):
        row = rows.get(name)
        if row is None or not row.factorized:
            return [name]
        return row.new_layers[:-1] if spec.structured else list(row.new_layers)
    spec.per_layer = {n: f for name, f in spec.per_layer.items() for n in targets(name)}
    spec.exclude = tuple(n for name in spec.exclude for n in targets(name))
    spec.per_layer_quality = {n: q for name, q in spec.per_layer_quality.items() for n in targets(name)}
    return spec


def prune_new(net: Net, new: Net, spec: PruneSpec, rows: dict) -> tuple:
    """(masks, PruneRecord): prune ``new`` as ``spec`` says, in place. Layers named by their
    original name after factorization mean their new layers. The layers ``new`` shares with
    ``net`` are copied first (``net`` stays verification's reference)."""
    spec = _map_factorized(spec, rows)
    originals = {id(layer) for layer in net.layers}
    new.layers = [Layer(l.name, l.type, list(l.bottoms), list(l.tops), clone_msg(l.msg), list(l.blobs))
                  if id(l) in originals else l for l in new.layers]
    masks, prune_rows = prune_net(new, spec)
    return masks, PruneRecord(spec, "masks.npz" if masks else None,
                              [r for r in prune_rows if r.get("pruned") or "structured" in r or r.get("kept_dense")])


def allocation_notes(pruned) -> list:
    """The console's word on what ``--prune-scope erk`` gave each layer (its fraction is the net's)."""
    rows = [r for r in pruned.layers if r.get("scope") == "erk"]
    if not rows:
        return []
    share = ", ".join(f"{r['name']} {'dense' if r.get('kept_dense') else format(r['target'], '.1%')}" for r in rows)
    zero = sum(r["params"] - r["nonzero_params"] for r in rows) / max(1, sum(r["params"] for r in rows))
    return [f"pruning: {rows[0]['net_target']:.0%} of these layers' weights over the net (--prune-scope erk, the "
            f"default: small layers and few weights per output keep more; --prune-scope layer prunes each "
            f"layer to it): {share}; {zero:.1%} of their params (biases too) zero"]


def export_onnx(new: Net, o: CompressOptions, calib: Optional[dict] = None) -> tuple:
    """(ModelProto, its bytes, precision record or None) of the compressed net: sparse
    initializers with ``o.sparse``; fp16 / int8 QDQ with ``o.precision`` / ``o.quantize``
    (:func:`lrprune_caffe.export.precision.reduce_precision`, calibrated on ``calib``)."""
    from lrprune_caffe.export.onnx import export_model
    reduced = o.precision not in (None, "fp32") or o.quantize is not None
    model = export_model(new, opset=int(o.opset), sparse=bool(o.sparse) and not reduced)
    record = None
    if reduced:
        from lrprune_caffe.export.precision import reduce_precision
        model, record = reduce_precision(model, o.precision or "fp32", o.quantize, calib, sparse=bool(o.sparse))
    return model, model.SerializeToString(), record


def _check_data(o: CompressOptions, data: CompressData, spec):
    if data.labels is not None and data.inputs is None:
        raise UserError("--labels are the labels of --inputs: give --inputs too")
    if o.max_drop is not None and data.labels is None:
        raise UserError("--max-drop limits the fall of top-1 accuracy: give --inputs and their --labels")
    if o.prune_method == "sparsegpt" and (data.calib is None or not o.calib_fit):
        raise UserError("--prune-method sparsegpt chooses masks from calibration data: give --calib SRC")


def _data_aware_energies(net, shapes, o, calib, notes, run=None):
    """--speedup with calibration data: {layer: response eigenvalues} of the candidate layers."""
    from .ranks import _rows, _select, parse_rank_spec
    default_rank, layer_ranks = parse_rank_spec(o.rank)
    _, infos = _rows(net, shapes, o, _select(net, o, layer_ranks, default_rank))
    names = data_aware_names(infos, list(infos), o.scheme)
    if len(names) < len(infos):  # one criterion for every layer: never response eigenvalues beside weight spectra
        notes.append(f"calibration: --speedup spent its budget by weight energy: the {o.scheme} scheme's spectra "
                     f"(or grouped layers') have no response-eigenvalue form")
        return None
    stats = cb.layer_statistics(net, names, calib, seed=o.seed, run=run)
    if not stats:
        notes.append("calibration: no numpy forward for every layer; --speedup spent its budget by weight energy")
        return None
    return cb.response_energies(stats)


def _macs(net, shapes) -> int:
    """Multiply-adds per sample (the declared batch divided out)."""
    from lrprune_caffe.ir.analysis import layer_stats, totals
    batch = max([int(s[0]) for s in net.input_shapes().values() if s] or [1])
    return int(totals(layer_stats(net, shapes))["macs"]) // max(1, batch)


def _compress_steps(net, shapes, o, data, spec, fit, held, notes, run=None) -> tuple:
    """plan_ranks -> factorize (-> calibrate) -> prune (-> calibrate): (rank plan, new net, masks,
    PruneRecord or None, calibration record or None); ``notes`` extended. ``run``: the
    calibration passes' layer forward (None: numpy)."""
    energies = _data_aware_energies(net, shapes, o, fit, notes, run) if fit is not None and o.speedup else None
    rp = plan_ranks(net, shapes, o, data_energies=energies)
    notes += rp.notes
    if spec is None and rp.structured:  # the latency budget chose structured pruning for some layers
        from .latency_cost import prune_spec
        spec = prune_spec(net, rp.structured)
    new, more = factorize_net(net, rp, o, data.train_net)
    notes += more
    calibration = None
    if fit is not None:
        calibration = {"source": data.calib_desc, "samples": cb.count(fit),
                       "held_out": cb.count(held), "damping": float(o.calib_damping),
                       "forward": "onnxruntime (convolutions) + numpy" if run is not None else "numpy"}
        if rp.plan:
            calibration["factorized"], more = cb.fit_factorized(net, new, rp.plan, fit, o, run)
            notes += more
    if spec is not None:
        dense = cb.dense_copy(new) if fit is not None else None
        masks, pruned = prune_new(net, new, spec, rp.rows)
        notes += allocation_notes(pruned)
        if fit is not None and masks:
            calibration["pruned"], more = cb.fit_pruned(net, new, dense, masks, fit, o, run)
            notes += more
        elif fit is not None and spec.structured:
            notes.append("calibration: structured pruning is not re-fit (only factorized and masked layers are)")
        del dense
    else:
        masks, pruned = {}, None
    if rp.plan:
        notes += fold_new(new, masks, rp.rows, data.train_net)
    return rp, new, masks, pruned, calibration


def fold_new(new: Net, masks: dict, rows: dict, train_net=None) -> list:
    """Fold the factors of ``new`` into their linear neighbours where exact (:mod:`lrprune_caffe.transforms.
    fold_factors`; after every fit, so each fit saw the layers it was planned for); masked layers stay as
    they are. Not with a training net, whose BatchNorm layers would then apply twice. Returns notes."""
    from lrprune_caffe.transforms.fold_factors import fold_factors
    if train_net is not None:
        return []
    res = run_pass(fold_factors, new, protect={k.split("/")[0] for k in masks})
    done = [d for d in res.details if d.get("kind")] if res.changed else []
    gone = {n for d in done for n in d["removed"]}
    for row in rows.values():
        if row.new_layers:
            row.new_layers = [n for n in row.new_layers if n not in gone]
    if not done:
        return []
    what = [f"{', '.join(d['removed'])} into {d['into']}" for d in done]
    return [f"folded {len(done)} factor neighbour(s) exactly (fold_factors): " + "; ".join(what[:6]) +
            (" ..." if len(what) > 6 else "")]


def compress(net: Net, options: CompressOptions = None, data: CompressData = None) -> CompressResult:
    """Factorize and/or prune ``net`` (an IR net with weights; not changed) as ``options`` say.

    With ``data.calib`` (unlabeled inputs) the ranks, the factors and the kept weights are
    fit to the original net's outputs (:mod:`lrprune_caffe.core.calib`). The check runs on
    ``data.inputs``, else on a held-out part of the calibration set, else on random inputs
    (a weak check, said in the report). ``result.passed`` is the quality gate's verdict.

    Raises UserError for a request that cannot be met (before anything is computed where the
    options alone show it). See :class:`CompressOptions` and the CLI help for the options."""
    o = options or CompressOptions()
    data = data or CompressData()
    spec = check_options(o)
    _check_data(o, data, spec)
    shapes = validate(net)
    notes = list(net.notes)
    fit = held = None
    macs = _macs(net, shapes) if data.calib is not None else None
    if data.calib is not None and o.calib_fit:
        fit, held = cb.split_calib(data.calib, holdout=o.verify and data.inputs is None, macs_per_sample=macs)
    elif data.calib is not None:
        held = data.calib
    pre = data.preprocessing or declared_preprocessing(data.train_net)
    if o.verify:
        held_desc = None if held is None else (
            f"{cb.count(held)} held-out calibration samples (never used for fitting) of "
            f"{data.calib_desc or 'the calibration set'}")
        inputs, inputs_desc, weak = check_data(net, data.inputs, data.inputs_desc, held, held_desc, pre, o.seed)

    run = cb.runner_for(net, macs, o.threads) if fit is not None else None
    with cb.blas_threads_for(macs if fit is not None else None):
        rp, new, masks, pruned, calibration = _compress_steps(net, shapes, o, data, spec, fit, held, notes, run)
    if o.verify:
        verification, more = check_compressed(net, new, inputs, inputs_desc or "", o.engine, o.threads, data.labels)
        verification["weak"] = weak
        notes += more
    else:
        inputs = data.inputs
        verification = {"skipped": True}
    int8_calib = data.calib if data.calib is not None else inputs
    model, onnx_bytes, precision = export_onnx(new, o, int8_calib) if o.onnx else (None, None, None)

    files = {}
    if data.train_net is not None:
        from lrprune_caffe.io.caffe import net_to_prototxt
        files["train_val.prototxt"] = net_to_prototxt(data.train_net)
    if onnx_bytes is not None:
        files["model.onnx"] = onnx_bytes
    if masks:
        files["masks.npz"] = masks_npz(masks)
    names = STANDARD_FILES + [f for f in ("train_val.prototxt", "model.onnx", "masks.npz") if f in files]
    report = build_report(net=net, new=new, shapes=shapes, options=o, rows=rp.rows, selected=rp.selected,
                          budget=rp.budget, pruned=pruned, verification=verification, notes=notes, files=names,
                          onnx_model=model, onnx_bytes=None if onnx_bytes is None else len(onnx_bytes),
                          original_bytes=data.original_weights_bytes)
    if model is not None:  # what MNN / OpenCV will not take in the written file, and what to use instead
        from lrprune_caffe.export.precision import consumer_notes
        report.setdefault("onnx", {})["consumer_notes"] = consumer_notes(model)
        if precision is None:
            report["notes"] += [f"model.onnx: {n}" for n in report["onnx"]["consumer_notes"]]
    if calibration is not None:
        report["calibration"] = calibration
    if precision is not None:
        report["precision"] = precision
        notes_of = precision.get("notes") or []
        report["notes"] += [f"model.onnx: {n}" for n in notes_of]
    report_speed(net, new, o, report)  # --speedup: measured against the original on the target
    report["warnings"] = warnings_of(verification) if o.verify else []
    if o.quantize and data.calib is None and data.inputs is None and precision is not None:
        report["warnings"].append("model.onnx: int8 scales were calibrated on random inputs, not on images of the "
                                  "kind the net sees: its accuracy may fall (give --calib)")
    passed = True
    if any(getattr(o, k) is not None for k in ("max_drop", "min_agree", "max_rel_l2")):
        report["gate"] = gate(verification, o.max_drop, o.min_agree, o.max_rel_l2)
        passed = report["gate"]["passed"]
        if not passed:
            report["files"] = ["report.json", "report.md"]
    return CompressResult(new, masks, report, files, passed)


__all__ = ["compress", "CompressOptions", "CompressData", "CompressResult", "factorize_net", "prune_new",
           "export_onnx"]
