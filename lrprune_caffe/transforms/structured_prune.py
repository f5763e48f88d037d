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

Each layer type's rules live in its spec (``LayerSpec.removable_outputs`` for
``P``, ``LayerSpec.shrink_input`` for what reads the channels; see
:mod:`lrprune_caffe.ir.layers.base`); this pass walks the graph and asks them.

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
from lrprune_caffe.ir.layers import CannotShrink, get_spec
from . import PassResult, Precondition, graph_pass



def _writes_later(net, blob, index):
    return any(blob in layer.tops for layer in net.layers[index + 1:])


def _cannot(reader, why=""):
    return CannotShrink(f"its consumer '{reader.name}' ({reader.type}) cannot be shrunk"
                        + (f": {why}" if why else ""))


def _producer_check(layer, shapes):
    """(number of outputs, out-channel axis of blob 0) or raise CannotShrink."""
    if len(layer.bottoms) != 1 or len(layer.tops) != 1:
        raise CannotShrink("it has several bottoms or tops")
    if layer.in_place:
        raise CannotShrink("it works in place")
    in_shape = shapes.inputs[layer.name][0]
    if in_shape is None:
        raise CannotShrink("its input shape is unknown")
    return get_spec(layer.type).removable_outputs(layer, in_shape)


def _plan(net, index, shapes):
    """Edits (layer, blob index, axis, block) that removing outputs of layer ``index``
    implies downstream (each reader's spec says how it follows: ``LayerSpec.shrink_input``),
    the notes, and the second half of a rank pair with its input axis (for scoring)."""
    producer = net.layers[index]
    n_out, out_axis = _producer_check(producer, shapes)
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
            raise CannotShrink(f"its output reaches '{blob}', which is a net output")
        for r in readers:
            ri = net.index(r.name)
            shape = shapes.inputs[r.name][r.bottoms.index(blob)]
            if shape is None:
                raise _cannot(r, "its input shape is unknown")
            if len(r.bottoms) > 1:
                raise _cannot(r, "it has several bottoms")
            try:
                rule = get_spec(r.type).shrink_input(r, shape, block, blob in r.tops)
            except CannotShrink as e:
                raise _cannot(r, str(e)) from None
            edits.extend((r, j, axis, b) for j, axis, b in rule.edits)
            if rule.consumes:
                weight_consumers.append((r, *rule.edits[0][1:]))
            if rule.note:
                notes.append(rule.note)
            stack.extend((top, ri, b) for top, b in rule.follow)
    pair = None
    # a rank pair: P (no bias) read by exactly one layer of a factorizable type, with whole channels
    if (len(producer.blobs) == 1 and len(direct) == 1 and len(weight_consumers) == 1
            and direct[0] is weight_consumers[0][0] and weight_consumers[0][2] == 1
            and get_spec(direct[0].type).factorizable):
        pair = weight_consumers[0][:2]
    return {"n_out": n_out, "out_axis": out_axis, "edits": edits, "notes": notes, "pair": pair}


def _expand(keep, block):
    keep = np.asarray(keep, dtype=np.int64)
    if block == 1:
        return keep
    return (keep[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)


def _scores(producer, plan):
    """Score per output (see the module formula)."""
    w = np.moveaxis(np.asarray(producer.blobs[0], dtype=np.float64), plan["out_axis"], 0)
    s = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))
    if plan["pair"] is not None:
        pair, in_axis = plan["pair"]
        cols = np.moveaxis(np.asarray(pair.blobs[0], dtype=np.float64), in_axis, 0)  # input i first
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
        except CannotShrink as e:
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
        layer.blobs[0] = _take(layer.blobs[0], plan["out_axis"], keep)
        if len(layer.blobs) > 1:
            layer.blobs[1] = _take(layer.blobs[1], 0, keep)
        get_spec(layer.type).set_num_output(layer, keep.size)
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
