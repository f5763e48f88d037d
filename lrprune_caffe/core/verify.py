"""Two nets, the same inputs, every output compared: compress's check, and the ``verify`` command's.

The nets run on a real engine (onnxruntime through our exporter, or
OpenCV's Caffe reader); :mod:`lrprune_caffe.engines.compare` computes the
errors. Nothing here reads or writes files.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.engines.compare import compare_outputs, output_kinds
from lrprune_caffe.engines.model import OnnxModel, run_model
from lrprune_caffe.engines.runtime import ENGINES, default_inputs
from lrprune_caffe.errors import EngineError, LrpruneError, UserError


def is_onnx_model(net) -> bool:
    return isinstance(net, OnnxModel)


def seeded_inputs(net, seed: int = 0) -> tuple:
    """(inputs, description): seeded standard-normal inputs of the net's input shapes (batch 1 where
    an ONNX file's batch is symbolic)."""
    batch = None
    if is_onnx_model(net) and net.fixed_batch() is None:
        batch = 1
    return (default_inputs(net, seed=seed, batch=batch),
            f"seeded standard-normal inputs (seed {seed}) of the input shape")


def _engine_of(net, engine):
    return "onnxruntime" if is_onnx_model(net) else engine


#: the report warns when an output's relative L2 error passes this, or its top-1 agreement falls under WARN_AGREE
WARN_REL_L2 = 0.5
WARN_AGREE = 0.90
#: top-1 agreement over fewer samples than this is reported with its count
FEW_SAMPLES = 100


def declared_preprocessing(train_net):
    """(mean per channel or None, scale) of a training net's first data layer's transform_param, or None."""
    if train_net is None:
        return None
    for layer in train_net.layers:
        if layer.type in ("Data", "ImageData") and layer.has("transform_param"):
            tp = layer.msg.transform_param
            mean = tuple(float(v) for v in tp.mean_value) or None
            return mean, float(np.float32(tp.scale))
    return None


def scaled_inputs(net, pre, seed=0) -> tuple:
    """(inputs, description): seeded uniform 0..255 pixels, then (pixel - mean) * scale, of the input shapes."""
    mean, scale = pre
    rng = np.random.default_rng(seed)
    out = {}
    for name, x in default_inputs(net, seed=seed).items():
        px = rng.uniform(0, 255, size=x.shape).astype(np.float32)
        if mean:
            m = np.asarray(mean, np.float32)
            if x.ndim == 4 and m.size in (1, x.shape[1]):
                px = px - m.reshape(1, -1, 1, 1)
        out[name] = (px * np.float32(scale)).astype(np.float32)
    what = f"mean {','.join(f'{v:g}' for v in mean)}, " if mean else ""
    return out, f"seeded uniform 0..255 pixels ({what}scale {scale:g}: the declared preprocessing, seed {seed})"


def check_data(net, inputs=None, desc=None, held=None, held_desc=None, pre=None, seed=0) -> tuple:
    """(inputs, description, weak): ``--inputs``, else the held-out calibration part, else random
    inputs (scaled to the declared preprocessing ``pre`` = (mean, scale) when known): a weak check."""
    if inputs is not None:
        return inputs, desc, False
    if held is not None:
        return held, held_desc, False
    if pre is not None:
        return (*scaled_inputs(net, pre, seed), True)
    return (*seeded_inputs(net, seed), True)


def warnings_of(verification: dict) -> list:
    """One line per output whose error passes WARN_REL_L2 or whose top-1 agreement is under WARN_AGREE;
    and one when the check was weak (random inputs)."""
    out = []
    if verification.get("skipped"):
        return out
    batch = verification.get("batch")
    for name, v in (verification.get("blobs") or {}).items():
        rel = v.get("rel_l2")
        if rel is not None and rel > WARN_REL_L2:
            out.append(f"output '{name}': relative L2 error {rel:.3g} > {WARN_REL_L2} against the original")
        agree = v.get("top1_agreement")
        if agree is not None and agree < WARN_AGREE:
            n = v.get("samples", batch)
            few = f" (over only {n} samples)" if n is not None and n < FEW_SAMPLES else ""
            out.append(f"output '{name}': top-1 agreement with the original {agree:.1%} < {WARN_AGREE:.0%}{few}")
    for name, v in (verification.get("detections") or {}).items():
        if v.get("recall") is not None and v["recall"] < WARN_AGREE:
            out.append(f"output '{name}': {v['recall']:.1%} of the original's detections found (recall < "
                       f"{WARN_AGREE:.0%})")
    if verification.get("weak"):
        out.append("the check is weak: it ran on random inputs, not on images of the kind the net sees "
                   "(give --inputs or --calib)")
    return out


def gate(verification: dict, max_drop=None, min_agree=None, max_rel_l2=None) -> dict:
    """The quality gate's record: {"passed", "limits", "failures": [{output, measure, value, limit, by}]}."""
    limits = {k: v for k, v in (("max_drop", max_drop), ("min_agree", min_agree), ("max_rel_l2", max_rel_l2))
              if v is not None}
    failures = []
    if verification.get("skipped"):
        failures.append({"output": None, "measure": "check", "value": None, "limit": None, "by": None,
                         "text": f"the check did not run ({verification.get('reason', 'skipped')}), so the gate "
                                 f"cannot pass"})
        return {"passed": False, "limits": limits, "failures": failures}

    def fail(name, measure, value, limit, by, text):
        failures.append({"output": name, "measure": measure, "value": value, "limit": limit, "by": by,
                         "text": f"output '{name}': {text}"})

    drop_checked = False
    for name, v in (verification.get("blobs") or {}).items():
        if "error" in v:
            fail(name, "error", None, None, None, v["error"])
            continue
        if max_rel_l2 is not None and v.get("rel_l2") is not None and not v["rel_l2"] <= max_rel_l2:
            fail(name, "rel_l2", v["rel_l2"], max_rel_l2, v["rel_l2"] - max_rel_l2,
                 f"relative L2 error {v['rel_l2']:.4g} > --max-rel-l2 {max_rel_l2:g} "
                 f"(by {v['rel_l2'] - max_rel_l2:.4g})")
        agree = v.get("top1_agreement")
        if min_agree is not None and agree is not None and agree < min_agree:
            fail(name, "top1_agreement", agree, min_agree, min_agree - agree,
                 f"top-1 agreement {agree:.2%} < --min-agree {min_agree:.2%} (by {100 * (min_agree - agree):.2f} "
                 f"points, over {v.get('samples', verification.get('batch'))} samples)")
        if max_drop is not None and "top1_ref" in v:
            drop_checked = True
            drop = 100 * (v["top1_ref"] - v["top1_test"])
            if drop > max_drop:
                fail(name, "top1_drop", drop, max_drop, drop - max_drop,
                     f"top-1 accuracy fell {drop:.2f} points ({100 * v['top1_ref']:.2f}% -> "
                     f"{100 * v['top1_test']:.2f}%) > --max-drop {max_drop:g} (by {drop - max_drop:.2f})")
    if min_agree is not None and not any(v.get("top1_agreement") is not None
                                         for v in (verification.get("blobs") or {}).values()):
        failures.append({"output": None, "measure": "top1_agreement", "value": None, "limit": min_agree, "by": None,
                         "text": "--min-agree: no output is class scores, so top-1 agreement cannot be measured"})
    if max_drop is not None and not drop_checked:
        failures.append({"output": None, "measure": "top1_drop", "value": None, "limit": max_drop, "by": None,
                         "text": "--max-drop: no top-1 accuracy was measured (it needs --labels of the --inputs "
                                 "and a class-score output)"})
    return {"passed": not failures, "limits": limits, "failures": failures}


def run_pair(net_a, net_b, inputs, engine="onnxruntime", outputs=None, threads=None):
    """Forward both nets on the same inputs: ({blob: a}, {blob: b}, engine used, notes).

    ``engine`` runs the Caffe nets; an ONNX file (:class:`~lrprune_caffe.engines.model.OnnxModel`)
    always runs on onnxruntime, so ``engine="opencv"`` puts OpenCV's Caffe reader on the Caffe
    files next to onnxruntime on the ONNX file. With ``onnxruntime``, a Caffe net our exporter
    cannot lower (or an exporter that is missing) falls back to OpenCV's Caffe reader, with a
    note saying why."""
    notes = []
    if engine == "onnxruntime":
        try:
            a = run_model(net_a, inputs, outputs, engine="onnxruntime", threads=threads)
            b = run_model(net_b, inputs, outputs, engine="onnxruntime", threads=threads)
            return a, b, "onnxruntime", notes
        except (ImportError, NotImplementedError, LrpruneError) as e:
            if is_onnx_model(net_a) and is_onnx_model(net_b):
                raise
            msg = " ".join(str(e).split())
            notes.append(f"onnxruntime could not run the nets ({type(e).__name__}: {msg}); "
                         f"verified with OpenCV's Caffe reader instead")
    a = run_model(net_a, inputs, outputs, engine=_engine_of(net_a, "opencv"), threads=threads)
    b = run_model(net_b, inputs, outputs, engine=_engine_of(net_b, "opencv"), threads=threads)
    return a, b, "opencv", notes


def compare_nets(net_a, net_b, inputs, inputs_desc, engine="onnxruntime", threads=None, labels=None) -> dict:
    """Run both nets (:func:`run_pair`) and compare every output blob of ``net_a``, each by its kind
    (the producing layers of either net say which; see :mod:`lrprune_caffe.engines.compare`):
    the verification record (engine, inputs, batch, per-blob errors, detections, notes)."""
    outputs = net_a.outputs()
    ref, test, used, notes = run_pair(net_a, net_b, inputs, engine, outputs, threads)
    ka, kb = output_kinds(net_a, outputs), output_kinds(net_b, outputs)
    kinds = {o: ka.get(o) or kb.get(o) for o in outputs}
    res = {"engine": used, "requested_engine": engine, "inputs": inputs_desc,
           "batch": int(next(iter(inputs.values())).shape[0]) if inputs else None,
           **compare_outputs(ref, test, labels=labels, blobs=outputs, kinds=kinds), "notes": notes}
    if is_onnx_model(net_a) or is_onnx_model(net_b):
        res["runs"] = {"a": _engine_of(net_a, used), "b": _engine_of(net_b, used)}
    return res


def check_compressed(net, new, inputs, inputs_desc, engine, threads=None, labels=None) -> tuple:
    """compress's check of ``new`` against the original ``net``: (verification record, notes).
    When no engine can run the nets, the record says so and the files are still written."""
    from .calib import trim_memory
    trim_memory()  # what the calibration freed: not resident while both sessions hold the weights
    try:
        return compare_nets(net, new, inputs, inputs_desc, engine, threads, labels), []
    except EngineError as e:  # e.g. a layer type no engine knows
        return {"skipped": True, "reason": str(e)}, [f"not verified: no engine could run the nets ({e})"]


def check_comparable(a, b, name_a="the first net", name_b="the second net") -> None:
    """UserError unless ``b`` takes ``a``'s inputs and produces each of ``a``'s outputs."""
    ia, ib = a.input_shapes(), b.input_shapes()
    if set(ia) != set(ib):
        raise UserError(f"the nets have different inputs: {', '.join(ia)} vs {', '.join(ib)}")
    for k in ia:
        if ia[k] is not None and ib[k] is not None and tuple(ia[k][1:]) != tuple(ib[k][1:]):
            raise UserError(f"input '{k}' is {tuple(ia[k])} in {name_a} but {tuple(ib[k])} in {name_b}: "
                            f"the nets cannot take the same inputs")
    blobs_b = set(b.outputs()) if is_onnx_model(b) else {t for layer in b.layers for t in layer.tops}
    missing = [o for o in a.outputs() if o not in blobs_b]
    if missing:
        raise UserError(f"{name_b} produces no blob named {', '.join(repr(m) for m in missing)} "
                        f"(an output of {name_a})")


def verify_nets(a, b, inputs=None, inputs_desc=None, engine="onnxruntime", seed=0, threads=None,
                labels=None, name_a=None, name_b=None) -> dict:
    """Run two nets on the same inputs (given, or seeded random of ``a``'s input shape) and
    compare every output blob of ``a``."""
    if engine not in ENGINES:
        raise UserError(f"--engine: unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    check_comparable(a, b, name_a or a.source or "the first net", name_b or b.source or "the second net")
    if inputs is None:
        inputs, inputs_desc = seeded_inputs(a, seed)
    res = compare_nets(a, b, inputs, inputs_desc, engine, threads, labels)
    res["notes"] = res["notes"] + a.notes + b.notes
    return res


__all__ = ["check_data", "warnings_of", "gate", "declared_preprocessing", "scaled_inputs", "WARN_REL_L2",
           "WARN_AGREE", "run_pair", "compare_nets", "check_compressed", "check_comparable", "verify_nets",
           "seeded_inputs", "is_onnx_model"]
