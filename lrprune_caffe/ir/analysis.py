"""Whole-net checks and numbers: shape inference, validation, params and MACs.

``infer_shapes`` walks the layers in order, as Caffe's Net::Init does, asking
each layer's spec (the registry) for its output shapes. A layer whose inputs
are unknown gets unknown outputs; nothing downstream crashes.

``validate`` is run after loading and after every pass: unique layer names,
every bottom produced earlier, geometry that fits, blobs shaped as the layer
expects. Problems raise :class:`BadFileError` naming the file and the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lrprune_caffe.errors import BadFileError
from .layers import ShapeError, get_spec
from lrprune_caffe.ir.layers.base import prod


@dataclass
class NetShapes:
    blobs: dict = field(default_factory=dict)  # blob name -> final shape (or None)
    inputs: dict = field(default_factory=dict)  # layer name -> list of bottom shapes
    outputs: dict = field(default_factory=dict)  # layer name -> list of top shapes


def _err(net, layer, message):
    return BadFileError(message, path=net.source, layer=layer.name, layer_type=layer.type)


def check_structure(net):
    """Unique names, bottoms produced before use, a non-empty net."""
    if not net.layers:
        raise BadFileError("the net has no layers", path=net.source)
    seen_names = set()
    produced = set()
    for layer in net.layers:
        if not layer.name:
            raise BadFileError(f"a layer of type {layer.type} has no name", path=net.source)
        if layer.name in seen_names:
            raise _err(net, layer, "duplicate layer name (layer names must be unique)")
        seen_names.add(layer.name)
        for b in layer.bottoms:
            if b not in produced:
                raise _err(net, layer, f"bottom '{b}' is not produced by any earlier layer or input")
        produced.update(layer.tops)


def infer_shapes(net, input_shapes=None) -> NetShapes:
    """Shapes of every blob. ``input_shapes`` overrides the Input layers' shapes."""
    shapes = NetShapes()
    for layer in net.layers:
        spec = get_spec(layer.type)
        ins = [shapes.blobs.get(b) for b in layer.bottoms]
        shapes.inputs[layer.name] = ins
        if layer.type == "Input" and input_shapes:
            outs = [tuple(input_shapes[t]) if t in input_shapes else None for t in layer.tops]
            if any(o is None for o in outs):
                outs = [o if o is not None else s for o, s in zip(outs, _safe_infer(net, layer, spec, ins))]
        elif len(ins) < spec.min_bottoms or any(s is None for s in ins):
            outs = [None] * len(layer.tops)
        else:
            outs = _safe_infer(net, layer, spec, ins)
        outs = list(outs) + [None] * (len(layer.tops) - len(outs))
        for t, s in zip(layer.tops, outs):
            if s is not None and any(int(d) <= 0 for d in s):
                raise _err(net, layer, f"output '{t}' would have non-positive shape {tuple(s)}")
            if s is not None:
                _check_size(net, layer, t, s)
            shapes.blobs[t] = None if s is None else tuple(int(d) for d in s)
        shapes.outputs[layer.name] = [shapes.blobs[t] for t in layer.tops]
    return shapes


INT64_MAX = 2**63 - 1


def machine_memory() -> int:
    """Bytes of physical memory (0 where unknown)."""
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_size(net, layer, top, shape):
    """A blob whose element count overflows int64, or whose float32 data alone exceeds the
    machine's memory, is refused here: before anything allocates it."""
    count = prod(shape)
    if count > INT64_MAX:
        raise _err(net, layer, f"output '{top}' of shape {tuple(shape)} has {count:.3g} elements, "
                               f"more than a 64-bit count holds")
    mem = machine_memory()
    if mem and 4 * count > mem:
        raise _err(net, layer, f"output '{top}' of shape {tuple(shape)} needs {4 * count / 2**30:,.1f} GB "
                               f"as float32, more than this machine's {mem / 2**30:,.1f} GB of memory")


def _blob_role(layer, i) -> str:
    if layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        return {0: " (weights)", 1: " (bias)"}.get(i, "")
    return ""


def _shape_hint(layer, i, got, want) -> str:
    if layer.type == "InnerProduct" and i == 0 and len(got) == 2 and tuple(got) == tuple(want)[::-1]:
        return ("; it is the transpose: the weights were stored K x N (set inner_product_param "
                "{ transpose: true } if the model was trained so)")
    return ""


def _safe_infer(net, layer, spec, ins):
    try:
        return spec.infer(layer, ins)
    except ShapeError as e:
        raise _err(net, layer, str(e)) from None


def expected_weight_shapes(net, layer, shapes: NetShapes):
    ins = shapes.inputs[layer.name]
    if any(s is None for s in ins):
        return None
    spec = get_spec(layer.type)
    if len(ins) < spec.min_bottoms:
        if not layer.blobs:
            return None
        raise _err(net, layer, f"has {len(ins)} bottom(s); a layer of its type with weights needs "
                               f"at least {spec.min_bottoms}")
    try:
        return spec.weight_shapes(layer, ins)
    except ShapeError as e:
        raise _err(net, layer, str(e)) from None


def check_weights(net, shapes: NetShapes):
    """Every layer's blobs have the shapes its parameters imply."""
    for layer in net.layers:
        if not layer.blobs:
            continue
        expected = expected_weight_shapes(net, layer, shapes)
        if expected is None:
            continue
        if len(layer.blobs) != len(expected):
            hint = ""
            if (layer.type in ("Convolution", "Deconvolution", "InnerProduct") and len(layer.blobs) == 1
                    and len(expected) == 2):
                hint = " (the bias is missing: the prototxt says bias_term: true, the default)"
            raise _err(net, layer, f"has {len(layer.blobs)} blobs, expected {len(expected)} "
                                   f"of shapes {[tuple(e) for e in expected]}{hint}")
        for i, (b, e) in enumerate(zip(layer.blobs, expected)):
            if tuple(b.shape) != tuple(e):
                raise _err(net, layer, f"blob {i}{_blob_role(layer, i)} has shape {tuple(b.shape)}, "
                                       f"the layer's parameters need {tuple(e)}"
                                       f"{_shape_hint(layer, i, b.shape, e)}")


def validate(net, input_shapes=None, weights=True) -> NetShapes:
    check_structure(net)
    shapes = infer_shapes(net, input_shapes)
    if weights:
        check_weights(net, shapes)
    return shapes


@dataclass
class LayerStats:
    name: str
    type: str
    bottoms: list
    tops: list
    output_shapes: list
    params: int
    macs: int


def layer_stats(net, shapes: NetShapes = None) -> list:
    """Per-layer params (from the blobs, or the expected shapes without weights) and MACs."""
    shapes = shapes or infer_shapes(net)
    rows = []
    for layer in net.layers:
        spec = get_spec(layer.type)
        ins, outs = shapes.inputs[layer.name], shapes.outputs[layer.name]
        if layer.blobs:
            params = sum(int(b.size) for b in layer.blobs)
        else:
            ws = expected_weight_shapes(net, layer, shapes)
            params = sum(prod(s) for s in ws) if ws else 0
        known = all(s is not None for s in ins) and all(s is not None for s in outs)
        macs = spec.macs(layer, ins, outs) if known else 0
        rows.append(LayerStats(layer.name, layer.type, list(layer.bottoms), list(layer.tops),
                               [None if s is None else list(s) for s in outs], int(params), int(macs)))
    return rows


def totals(rows) -> dict:
    return {"params": sum(r.params for r in rows), "macs": sum(r.macs for r in rows)}


def sparsity_rows(net, info: dict = None) -> list:
    """Per layer with blobs: name, type, params, nonzero_params, sparsity (zeros / params,
    counted over all of its blobs, as they are in the caffemodel), plus ``info[name]``."""
    import numpy as np
    rows = []
    for layer in net.layers:
        if not layer.blobs:
            continue
        params = sum(int(b.size) for b in layer.blobs)
        nonzero = sum(int(np.count_nonzero(b)) for b in layer.blobs)
        row = {"name": layer.name, "type": layer.type, "params": params, "nonzero_params": nonzero,
               "sparsity": (1.0 - nonzero / params) if params else 0.0}
        if info and layer.name in info:
            row.update(info[layer.name])
        rows.append(row)
    return rows


def sparsity_totals(rows) -> dict:
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero_params"] for r in rows)
    return {"params": params, "nonzero_params": nonzero,
            "sparsity": (1.0 - nonzero / params) if params else 0.0}
