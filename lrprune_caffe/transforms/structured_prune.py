"""Pass ``structured_prune``: remove whole output filters (or rank components) and shrink their consumers.

**Before**::

    x -> P(W: N outputs, b) -> y -> [per-channel / pass-through layers] -> C(W2: reads N channels)

**After**::

    x -> P(W[keep], b[keep]: N' outputs) -> y -> [their blobs[keep]] -> C(W2[:, keep...])

``P`` is a ``Convolution`` (``group: 1``, axis 1) or an ``InnerProduct``
(axis 1) named by the spec; ``keep`` are its outputs minus the
``round(f * N)`` with the smallest score (at least one output is kept).
What lies between ``P`` and the consumers is shrunk to match:

* per-channel blobs: ``BatchNorm`` (mean, variance; the factor stays),
  ``Scale`` / ``Bias`` (one bottom, ``axis: 1``, ``num_axes: 1``), ``PReLU``
  (unless ``channel_shared``);
* pass-through (nothing to change): element-wise activations, ``Dropout``,
  ``Pooling``, ``LRN`` (ACROSS_CHANNELS is not exact: a channel's window of
  neighbours changes; noted in ``details``), ``MVN`` (not across channels),
  ``Split`` (every branch is followed), ``Flatten`` (axis 1 to the end: a
  channel becomes a block of ``H*W`` features), ``Silence``;
* consumers: ``Convolution`` / ``Deconvolution`` with ``group: 1`` (their
  input channels), ``InnerProduct`` with axis 1 (its input columns, grouped
  per channel: channel ``c`` of a ``C x H x W`` bottom owns columns
  ``c*H*W ... (c+1)*H*W - 1``, Caffe's row-major flattening).

**Preconditions** (checked for every selected layer before anything changes):
``P`` has one bottom, one top and its weights; every path from its output
ends in a consumer above; no blob on the way is a net output. A layer the
spec names explicitly (``per_layer``) that fails raises :class:`UserError`
naming the layer, the consumer that cannot be shrunk and its type (e.g.
``Eltwise``, ``Concat``, ``Slice``, a depthwise / grouped convolution,
``Softmax``, ``Reshape``, an unknown type, a net output); a layer selected
only by the default fraction is skipped and the reason is recorded in
``details``. When nothing can be pruned the pass raises
:class:`Precondition` and the net is untouched.

**Formula**: the score of output ``i`` is ``||W_i||_2`` (its filter: all
weights producing output ``i``; Li, Kadav, Durdanovic, Samet & Graf 2017,
"Pruning Filters for Efficient ConvNets", ICLR, sec. 3.1, use the L1 norm;
L2 ranks the same way in their experiments). For a *rank component* - ``P``
has no bias and its output is read directly by exactly one Convolution /
InnerProduct, i.e. the first half of a low-rank pair - the score is
``||W_i||_2 * ||W2[:, i]||_2``, the size of the rank-one term it adds (for an
SVD split this is the singular value). Layers are processed in net order and
a layer's scores are computed after its own inputs were shrunk by earlier
layers (Li et al.'s "greedy" variant: removed input channels do not count).

Removing output ``i`` also removes its bias, i.e. the result equals the dense
net in which filter ``i`` and its bias are zeroed, whenever the layers in
between map 0 to 0 (ReLU, MAX/AVE pooling, no BatchNorm/Scale shift): then
the consumer sees an all-zero channel, which contributes nothing. Otherwise
the constant the removed channel carried is dropped (not compensated).
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.errors import UserError
from . import PassResult, Precondition, graph_pass

#: layers that map each channel to itself, shape-preserving, no blobs
_ELEMENTWISE = {"ReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold",
                "Dropout", "ELU", "Clip", "Swish", "ReLU6", "HardSigmoid"}


class _Cannot(Exception):
    """The selected layer's outputs cannot be removed; the message says why."""



def _writes_later(net, blob, index):
    return any(blob in layer.tops for layer in net.layers[index + 1:])


def _cannot(reader, why=""):
    return _Cannot(f"its consumer '{reader.name}' ({reader.type}) cannot be shrunk"
                   + (f": {why}" if why else ""))


def _producer_check(layer, shapes):
    """(number of outputs, out-channel axis of blob 0) or raise _Cannot."""
    from lrprune_caffe.ir.layers.conv import conv_geometry
    from lrprune_caffe.ir.layers.dense import ip_dims
    if len(layer.bottoms) != 1 or len(layer.tops) != 1:
        raise _Cannot("it has several bottoms or tops")
    if layer.in_place:
        raise _Cannot("it works in place")
    in_shape = shapes.inputs[layer.name][0]
    if in_shape is None:
        raise _Cannot("its input shape is unknown")
    if layer.type == "Convolution":
        g = conv_geometry(layer, len(in_shape) - 2)
        if g.group != 1:
            raise _Cannot(f"it is a grouped convolution (group {g.group})")
        if g.axis != 1:
            raise _Cannot(f"it convolves axis {g.axis}, not 1")
        if len(layer.blobs) != (2 if g.bias else 1):
            raise _Cannot("its weights are not loaded")
        return g.num_output, 0
    if layer.type == "InnerProduct":
        axis, _, _, n = ip_dims(layer, in_shape)
        ip = layer.param_msg("inner_product_param")
        if axis != 1:
            raise _Cannot(f"its axis is {axis}: its outputs are not channels (axis 1)")
        if len(layer.blobs) != (2 if ip.bias_term else 1):
            raise _Cannot("its weights are not loaded")
        return n, 1 if ip.transpose else 0
    raise _Cannot(f"only Convolution and InnerProduct outputs can be removed, not {layer.type}")


def _plan(net, index, shapes):
    """Edits (layer, blob index, axis, block) that removing outputs of layer ``index``
    implies downstream, the notes, and the direct consumer (for rank-pair scoring)."""
    from lrprune_caffe.ir.layers.conv import conv_geometry
    from lrprune_caffe.ir.layers.dense import ip_dims
    producer = net.layers[index]
    n_out, _ = _producer_check(producer, shapes)
    outputs = set(net.outputs())
    edits, notes, weight_consumers = [], [], []
    direct = net.version_readers(producer.tops[0], index)
    stack = [(producer.tops[0], index, 1)]  # (blob, writer index, features per channel on axis 1)
    visited = set()
    while stack:
        blob, wi, block = stack.pop()
        if (blob, wi) in visited:
            continue
        visited.add((blob, wi))
        readers = net.version_readers(blob, wi)
        if not any(blob in r.tops for r in readers) and not _writes_later(net, blob, wi) and blob in outputs:
            raise _Cannot(f"its output reaches '{blob}', which is a net output")
        for r in readers:
            ri = net.index(r.name)
            shape = shapes.inputs[r.name][r.bottoms.index(blob)]
            if shape is None:
                raise _cannot(r, "its input shape is unknown")
            if len(r.bottoms) > 1:
                raise _cannot(r, "it has several bottoms")
            in_place = blob in r.tops
            t = r.type
            if t in ("Convolution", "Deconvolution") and not in_place:
                g = conv_geometry(r, len(shape) - 2)
                if g.group != 1:
                    raise _cannot(r, f"it is a grouped{' (depthwise)' if g.group == shape[1] else ''} "
                                     f"convolution, group {g.group}")
                if g.axis != 1 or block != 1:
                    raise _cannot(r, "it does not convolve the channel axis")
                if not r.blobs:
                    raise _cannot(r, "its weights are not loaded")
                edits.append((r, 0, 1 if t == "Convolution" else 0, 1))
                weight_consumers.append((r, 1))
                continue
            if t == "InnerProduct" and not in_place:
                axis, _, k, _ = ip_dims(r, shape)
                if axis != 1:
                    raise _cannot(r, f"its axis is {axis}, not 1")
                if not r.blobs:
                    raise _cannot(r, "its weights are not loaded")
                per_channel = block * int(np.prod(shape[2:], dtype=np.int64))
                ip = r.param_msg("inner_product_param")
                edits.append((r, 0, 0 if ip.transpose else 1, per_channel))
                weight_consumers.append((r, per_channel))
                continue
            if t in _ELEMENTWISE:
                pass
            elif t == "Pooling":
                if block != 1:
                    raise _cannot(r, "it pools a flattened blob")
            elif t == "LRN":
                lp = r.param_msg("lrn_param")
                if lp.norm_region == lp.ACROSS_CHANNELS:
                    notes.append(f"LRN '{r.name}' normalizes across channels: removing channels changes "
                                 f"its neighbourhoods (not exact)")
            elif t == "MVN":
                if r.param_msg("mvn_param").across_channels:
                    raise _cannot(r, "it normalizes across channels")
            elif t == "BatchNorm":
                if len(r.blobs) == 3:
                    edits.extend([(r, 0, 0, block), (r, 1, 0, block)])
            elif t in ("Scale", "Bias"):
                p = r.param_msg("scale_param" if t == "Scale" else "bias_param")
                if len(r.bottoms) != 1:
                    raise _cannot(r, "its operand is a second bottom")
                if int(p.axis) not in (1, 1 - len(shape)) or int(p.num_axes) != 1:
                    raise _cannot(r, f"axis {p.axis}, num_axes {p.num_axes} (needs axis 1, num_axes 1)")
                edits.extend((r, j, 0, block) for j in range(len(r.blobs)))
            elif t == "PReLU":
                if not r.param_msg("prelu_param").channel_shared and r.blobs:
                    edits.append((r, 0, 0, block))
            elif t == "Split" and not in_place:
                for top in r.tops:
                    stack.append((top, ri, block))
                continue
            elif t == "Flatten" and not in_place:
                fp = r.param_msg("flatten_param")
                nd = len(shape)
                a, e = int(fp.axis) % nd, int(fp.end_axis) % nd
                if a != 1 or e != nd - 1:
                    raise _cannot(r, f"it flattens axes {fp.axis}..{fp.end_axis}, not 1 to the end")
                stack.append((r.tops[0], ri, block * int(np.prod(shape[2:], dtype=np.int64))))
                continue
            elif t == "Silence":
                continue
            else:
                raise _cannot(r)
            # a pass-through / per-channel layer: follow what it writes
            if len(r.tops) != 1:
                raise _cannot(r, "it has several tops")
            stack.append((r.tops[0], ri, block))
    pair = None
    if (len(producer.blobs) == 1 and len(direct) == 1 and len(weight_consumers) == 1
            and direct[0] is weight_consumers[0][0] and weight_consumers[0][1] == 1
            and direct[0].type in ("Convolution", "InnerProduct")):
        pair = direct[0]
    return {"n_out": n_out, "edits": edits, "notes": notes, "pair": pair}


def _expand(keep, block):
    keep = np.asarray(keep, dtype=np.int64)
    if block == 1:
        return keep
    return (keep[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)


def _scores(producer, plan):
    """Score per output (see the module formula)."""
    w = np.asarray(producer.blobs[0], dtype=np.float64)
    if producer.type == "InnerProduct" and producer.param_msg("inner_product_param").transpose:
        w = w.T
    s = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))
    pair = plan["pair"]
    if pair is not None:
        w2 = np.asarray(pair.blobs[0], dtype=np.float64)
        if pair.type == "InnerProduct" and pair.param_msg("inner_product_param").transpose:
            cols = w2  # (K, N): row i
        else:
            cols = np.moveaxis(w2, 1, 0)  # (K or C, N, ...)
        s = s * np.sqrt((cols.reshape(cols.shape[0], -1) ** 2).sum(axis=1))
    return s


def _take(arr, axis, index):
    return np.ascontiguousarray(np.take(arr, index, axis=axis)).astype(np.float32, copy=False)


@graph_pass("structured_prune")
def prune_structured(net, spec) -> PassResult:
    """Remove the lowest-scoring outputs of the layers ``spec`` selects (see the module header)."""
    from lrprune_caffe.ir.analysis import infer_shapes
    from .prune import check_spec, resolve_targets

    check_spec(net, spec)  # UserError before anything changes
    if spec.method != "magnitude" or spec.scope != "layer":
        raise UserError("structured pruning works per layer by filter norm (magnitude, scope layer)")
    targets = resolve_targets(net, spec)
    if not targets:
        raise Precondition("no layer is selected for pruning")
    shapes = infer_shapes(net)
    plans, skipped = [], []
    for name, f in targets.items():
        i = net.index(name)
        layer = net.layers[i]
        try:
            plan = _plan(net, i, shapes)
        except _Cannot as e:
            if name in spec.per_layer:
                raise UserError(f"--prune-structured: cannot remove outputs of layer '{name}' "
                                f"({layer.type}): {e}") from None
            skipped.append({"layer": name, "structured": False, "reason": str(e)})
            continue
        n_rm = min(int(round(f * plan["n_out"])), plan["n_out"] - 1)
        if n_rm <= 0:
            skipped.append({"layer": name, "structured": False,
                            "reason": f"fraction {f} of {plan['n_out']} outputs removes none"})
            continue
        plans.append((layer, f, n_rm, plan))
    if not plans:
        raise Precondition("no layer's outputs can be removed: "
                           + "; ".join(f"'{s['layer']}': {s['reason']}" for s in skipped))
    # all checks done: now change the net (in net order, greedy scores)
    details = []
    for layer, f, n_rm, plan in plans:
        scores = _scores(layer, plan)
        order = np.argsort(scores, kind="stable")
        removed = np.sort(order[:n_rm])
        keep = np.sort(order[n_rm:])
        axis_w = 1 if (layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose) else 0
        layer.blobs[0] = _take(layer.blobs[0], axis_w, keep)
        if len(layer.blobs) > 1:
            layer.blobs[1] = _take(layer.blobs[1], 0, keep)
        param = layer.param_msg("convolution_param" if layer.type == "Convolution" else "inner_product_param")
        param.num_output = int(keep.size)
        for consumer, j, axis, block in plan["edits"]:
            consumer.blobs[j] = _take(consumer.blobs[j], axis, _expand(keep, block))
        details.append({"layer": layer.name, "structured": True, "target": f,
                        "outputs_before": int(plan["n_out"]), "outputs_after": int(keep.size),
                        "removed": [int(x) for x in removed],
                        "score": "rank-component" if plan["pair"] is not None else "filter-l2",
                        "shrunk": sorted({c.name for c, *_ in plan["edits"]}),
                        "notes": list(plan["notes"])})
    return PassResult("structured_prune", changed=True, details=details + skipped)


__all__ = ["prune_structured"]
