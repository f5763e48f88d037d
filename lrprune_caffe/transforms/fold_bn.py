"""Pass ``fold_bn``: fold BatchNorm (and the Scale after it) into the convolution before it.

**Before**::

    x -> Convolution(W, b?) -> c -> BatchNorm(mean, var, factor) -> [Scale(gamma, beta?)] -> y

**After**::

    x -> Convolution(W', b') -> y          (BatchNorm and Scale layers removed)

**Preconditions** (checked per BatchNorm; one that fails is left as it is and
the reason is recorded in ``details``):

* the BatchNorm has one bottom, produced by a ``Convolution`` with one bottom,
  one top, convolving axis 1, with its weights loaded;
* the BatchNorm is the only reader of the convolution's output (nothing else
  sees the un-normalized value) and has its 3 blobs;
* a ``Scale`` is folded too when it is the only reader of the BatchNorm's
  output, has one bottom, ``axis: 1``, ``num_axes: 1`` and its blobs;
* when the layers are not in place, the last folded top is not read or
  written by any layer between the convolution and it (the convolution then
  writes that blob directly).

When no BatchNorm can be folded the pass raises :class:`Precondition` and
the net is untouched.

**Formula** (per output channel ``n``; Caffe's BatchNorm with global stats,
``f = 1 / blob2`` or 0 when blob2 == 0)::

    mean = blob0 * f,  var = blob1 * f
    a[n] = gamma[n] / sqrt(var[n] + eps)        (gamma = 1 without Scale)
    W'[n] = W[n] * a[n]
    b'[n] = (b[n] - mean[n]) * a[n] + beta[n]   (b = 0 without bias, beta = 0 without Scale bias)

computed in float64, stored float32 (Ioffe & Szegedy 2015, eq. in Alg. 2, and
the conv/BN folding used by e.g. TensorRT and onnxoptimizer's
``fuse_bn_into_conv``).
"""

from __future__ import annotations

import numpy as np

from . import PassResult, Precondition, graph_pass



def _fold_plan(net, bn_index):
    """(conv, bn, scale or None, final top) for the BatchNorm at ``bn_index``, or a reason string."""
    bn = net.layers[bn_index]
    if len(bn.bottoms) != 1 or len(bn.tops) != 1:
        return "BatchNorm does not have exactly one bottom and one top"
    if len(bn.blobs) != 3:
        return f"BatchNorm has {len(bn.blobs)} blobs, not its 3 (mean, variance, factor)"
    conv = net.producer(bn.bottoms[0], before=bn_index)
    if conv is None or conv.type != "Convolution":
        return f"its bottom '{bn.bottoms[0]}' is not produced by a Convolution"
    ci = net.index(conv.name)
    if len(conv.bottoms) != 1 or len(conv.tops) != 1:
        return f"Convolution '{conv.name}' has several bottoms or tops"
    cp = conv.param_msg("convolution_param")
    if int(cp.axis) != 1:
        return f"Convolution '{conv.name}' convolves axis {cp.axis}, not 1"
    if len(conv.blobs) != (2 if cp.bias_term else 1):
        return f"Convolution '{conv.name}' has no weights loaded"
    readers = net.version_readers(conv.tops[0], ci)
    if [r.name for r in readers] != [bn.name]:
        return (f"the output of Convolution '{conv.name}' is also read by "
                f"{', '.join(repr(r.name) for r in readers if r.name != bn.name)}")
    if bn.blobs[0].size != int(cp.num_output):
        return f"BatchNorm has {bn.blobs[0].size} channels, the Convolution {cp.num_output}"
    chain = [conv, bn]
    scale = None
    after_bn = net.version_readers(bn.tops[0], bn_index)
    if len(after_bn) == 1 and after_bn[0].type == "Scale":
        s = after_bn[0]
        sp = s.param_msg("scale_param")
        if (len(s.bottoms) == 1 and len(s.tops) == 1 and int(sp.axis) == 1 and int(sp.num_axes) == 1
                and len(s.blobs) == (2 if sp.bias_term else 1) and s.blobs[0].size == bn.blobs[0].size):
            scale = s
            chain.append(s)
    final = chain[-1].tops[0]
    if final != conv.tops[0]:
        last = net.index(chain[-1].name)
        chain_names = {layer.name for layer in chain}
        for layer in net.layers[ci + 1:last]:
            if layer.name not in chain_names and (final in layer.bottoms or final in layer.tops):
                return f"blob '{final}' is used by layer '{layer.name}' between the Convolution and the BatchNorm"
    return conv, bn, scale, final


def fold_weights(conv, bn, scale=None):
    """(W', b') of ``conv`` with ``bn`` (and ``scale``) folded in; see the module formula."""
    from lrprune_caffe.ir.layers.normalization import bn_statistics
    mean, var = bn_statistics(bn)
    eps = float(bn.param_msg("batch_norm_param").eps)
    a = 1.0 / np.sqrt(var + eps)
    beta = np.zeros_like(a)
    if scale is not None:
        a = a * np.asarray(scale.blobs[0], dtype=np.float64).reshape(-1)
        if scale.param_msg("scale_param").bias_term:
            beta = np.asarray(scale.blobs[1], dtype=np.float64).reshape(-1)
    w = np.asarray(conv.blobs[0], dtype=np.float64)
    b = (np.asarray(conv.blobs[1], dtype=np.float64).reshape(-1) if len(conv.blobs) > 1
         else np.zeros(w.shape[0]))
    w2 = w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    b2 = (b - mean) * a + beta
    return w2.astype(np.float32), b2.astype(np.float32)


@graph_pass("fold_bn")
def fold_bn(net) -> PassResult:
    """Fold every foldable BatchNorm (+ Scale) into its Convolution (see the module header)."""
    plans, skipped = [], []
    for i, layer in enumerate(net.layers):
        if layer.type != "BatchNorm":
            continue
        plan = _fold_plan(net, i)
        if isinstance(plan, str):
            skipped.append({"layer": layer.name, "folded": False, "reason": plan})
        else:
            plans.append(plan)
    if not plans:
        if not skipped:
            raise Precondition("the net has no BatchNorm layer")
        raise Precondition("no BatchNorm can be folded: " +
                           "; ".join(f"'{s['layer']}': {s['reason']}" for s in skipped))
    # all checks done: now change the net
    removed = set()
    details = []
    for conv, bn, scale, final in plans:
        w, b = fold_weights(conv, bn, scale)
        cp = conv.param_msg("convolution_param")
        cp.bias_term = True
        conv.blobs = [w, b]
        conv.tops = [final]
        removed.add(bn.name)
        if scale is not None:
            removed.add(scale.name)
        details.append({"layer": bn.name, "folded": True, "into": conv.name,
                        "scale": scale.name if scale is not None else None})
    net.layers = [layer for layer in net.layers if layer.name not in removed]
    return PassResult("fold_bn", changed=True, details=details + skipped)


__all__ = ["fold_bn", "fold_weights"]
