"""Two nets, the same inputs, every output compared: compress's check, and the ``verify`` command's.

The nets run on a real engine (onnxruntime through our exporter, or
OpenCV's Caffe reader); :mod:`lrprune_caffe.engines.compare` computes the
errors. Nothing here reads or writes files.
"""

from __future__ import annotations

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


__all__ = ["run_pair", "compare_nets", "check_compressed", "check_comparable", "verify_nets", "seeded_inputs",
           "is_onnx_model"]
