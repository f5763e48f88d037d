"""Pass ``fold_factors``: fold a low-rank factor into the neighbouring linear layer where that is exact.

A factorized layer (:mod:`lrprune_caffe.transforms.factorize`: ``L_lr1 -> L_lr2 [-> L_lr3]``) ends in a
linear layer; when the next layer is linear too, the two are one linear map and can be one layer, with
no approximation: fewer layers to run, and (case b) fewer multiply-adds.

**Before / after**, case (a), a factor followed by BatchNorm [+ Scale]::

    x -> F (Convolution, a factor) -> BatchNorm -> [Scale] -> y     =>     x -> F' -> y

case (b), a pointwise linear layer P feeding a linear layer C, one of them a factor::

    x -> P (1x1 Convolution or InnerProduct) -> t -> C (Convolution or InnerProduct) -> y
      =>   x -> C' -> y          (C' keeps C's name, geometry and top; P's input channels)

**Preconditions** (checked per candidate; one that fails leaves those layers as they are, and the
reason is recorded in ``details`` when it is informative):

* (a): those of :mod:`lrprune_caffe.transforms.fold_bn` (the BatchNorm is the factor's only reader,
  the Scale the BatchNorm's, axis 1, blobs loaded), and the Convolution is a factor;
* (b): P and C each have one bottom and one top and their weights loaded; P's top is read by C alone
  (no in-place layer between, so no nonlinearity) and C does not write it; P is an InnerProduct
  (axis 1) or a 1x1 Convolution with stride 1, pad 0, dilation 1, group 1 (a per-pixel matrix);
  C is an InnerProduct (axis 1) or a Convolution with group 1, axis 1, and pad 0 unless P has no bias
  (zero padding of t is P applied to zero padding only when P's bias is 0); an InnerProduct P feeds
  an InnerProduct C; the merged layer has fewer MACs than P and C together (else merging would undo
  the factorization's saving);
* at least one of the layers is a factor (``*_lrK``), unless ``any_layer`` is set; no layer named in
  ``protect`` (e.g. masked layers, whose masks a merge would void) is changed.

When nothing can be folded the pass raises :class:`Precondition` and the net is untouched. Layers are
replaced by new ones (never changed in place: a net may share layers with the original).

**Formula** (float64, stored float32). (a): the BatchNorm formula of ``fold_bn``. (b), with P's
weights as an (n, c) matrix ``Wp`` and bias ``bp`` (0 when absent), C's weights ``Wc`` and bias ``bc``::

    conv C (m, n, kh, kw):  W'[m, c, i, j] = sum_n Wc[m, n, i, j] Wp[n, c]
                            b'[m] = bc[m] + sum_{n, i, j} Wc[m, n, i, j] bp[n]
    IP C after a 1x1 conv P (C reads t flattened as (n, h, w)):
                            W'[m, (c, h, w)] = sum_n Wc[m, (n, h, w)] Wp[n, c]
                            b'[m] = bc[m] + sum_{n, h, w} Wc[m, (n, h, w)] bp[n]
    IP C after an IP P:     W' = Wc Wp,  b' = bc + Wc bp

(associativity of the linear maps; C's zero padding is exact when bp = 0, as required above).
"""

from __future__ import annotations

import re

import numpy as np

from . import PassResult, Precondition, graph_pass
from .fold_bn import _fold_plan, fold_weights

FACTOR = re.compile(r".+_lr\d+$")


def is_factor(name: str) -> bool:
    return bool(FACTOR.fullmatch(name))


def _as_matrix(layer):
    """(W (out, in...) float64, bias (out,) float64) of a Convolution / InnerProduct (IP un-transposed)."""
    w = np.asarray(layer.blobs[0], dtype=np.float64)
    if layer.type == "InnerProduct":
        ip = layer.param_msg("inner_product_param")
        w = w.reshape(w.shape[-2], w.shape[-1])
        if ip.transpose:
            w = w.T
        has_bias = bool(ip.bias_term)
    else:
        has_bias = bool(layer.param_msg("convolution_param").bias_term)
    b = np.asarray(layer.blobs[1], dtype=np.float64).reshape(-1) if has_bias and len(layer.blobs) > 1 else None
    return w, b


def _conv_geometry(layer):
    """(kernel (kh, kw), stride, pad, dilation, group, axis) of a Convolution, Caffe's defaults applied."""
    cp = layer.param_msg("convolution_param")

    def pair(rep, h, w, default):
        if cp.HasField(h) or cp.HasField(w):
            return int(getattr(cp, h)), int(getattr(cp, w))
        vals = list(rep) or [default]
        return (int(vals[0]), int(vals[-1]))
    return (pair(cp.kernel_size, "kernel_h", "kernel_w", 1), pair(cp.stride, "stride_h", "stride_w", 1),
            pair(cp.pad, "pad_h", "pad_w", 0), tuple((list(map(int, cp.dilation)) or [1]) * 2)[:2],
            int(cp.group), int(cp.axis))


def _loaded(layer) -> bool:
    if layer.type == "InnerProduct":
        return len(layer.blobs) == (2 if layer.param_msg("inner_product_param").bias_term else 1)
    return len(layer.blobs) == (2 if layer.param_msg("convolution_param").bias_term else 1)


def _pointwise(layer):
    """Why ``layer`` is not a per-pixel (or per-sample) matrix, or None."""
    if layer.type == "InnerProduct":
        ip = layer.param_msg("inner_product_param")
        return None if int(ip.axis) == 1 else f"InnerProduct '{layer.name}' has axis {ip.axis}, not 1"
    k, s, p, d, g, axis = _conv_geometry(layer)
    if (k, s, p, d, g, axis) != ((1, 1), (1, 1), (0, 0), (1, 1), 1, 1):
        return f"Convolution '{layer.name}' is not a 1x1, stride 1, pad 0, group 1 convolution"
    return None


def _linear_plan(net, i, shapes, protect, any_layer):
    """(P, C, W', b', macs before, macs after) for P = net.layers[i], or a reason string, or None."""
    p = net.layers[i]
    if p.type not in ("Convolution", "InnerProduct") or len(p.bottoms) != 1 or len(p.tops) != 1:
        return None
    if not _loaded(p) or _pointwise(p):
        return None
    readers = net.version_readers(p.tops[0], i)
    if len(readers) != 1:
        return None
    c = readers[0]
    if c.type not in ("Convolution", "InnerProduct"):
        return None
    if not (any_layer or is_factor(p.name) or is_factor(c.name)):
        return None
    if p.name in protect or c.name in protect:
        return f"'{p.name}' -> '{c.name}': a protected (masked) layer"
    if len(c.bottoms) != 1 or len(c.tops) != 1 or p.tops[0] in c.tops or not _loaded(c):
        return f"'{p.name}' -> '{c.name}': '{c.name}' has several bottoms / tops, writes its input or has no weights"
    if p.type == "InnerProduct" and c.type != "InnerProduct":
        return f"'{p.name}' -> '{c.name}': an InnerProduct feeds a Convolution"
    wp, bp = _as_matrix(p)
    wp = wp.reshape(wp.shape[0], -1)  # (n, c)
    wc, bc = _as_matrix(c)
    t_shape, y_shape = shapes.outputs[p.name][0], shapes.outputs[c.name][0]
    spatial_t = int(np.prod(t_shape[2:])) if len(t_shape) > 2 else 1
    spatial_y = int(np.prod(y_shape[2:])) if len(y_shape) > 2 else 1
    n, cin, m = wp.shape[0], wp.shape[1], wc.shape[0]
    macs_p = n * cin * spatial_t
    if c.type == "Convolution":
        k, s, pad, d, g, axis = _conv_geometry(c)
        if g != 1 or axis != 1:
            return f"'{p.name}' -> '{c.name}': '{c.name}' is grouped or convolves axis {axis}"
        if pad != (0, 0) and bp is not None and np.any(bp != 0):
            return f"'{p.name}' -> '{c.name}': '{c.name}' pads its input and '{p.name}' has a bias"
        w4 = wc  # (m, n, kh, kw)
        w_new = np.einsum("mnij,nc->mcij", w4, wp)
        b_new = (bc if bc is not None else np.zeros(m)) + (0 if bp is None else np.einsum("mnij,n->m", w4, bp))
        macs_c, macs_new = m * n * k[0] * k[1] * spatial_y, m * cin * k[0] * k[1] * spatial_y
    else:
        ip = c.param_msg("inner_product_param")
        if int(ip.axis) != 1:
            return f"'{p.name}' -> '{c.name}': InnerProduct '{c.name}' has axis {ip.axis}, not 1"
        if wc.shape[1] != n * spatial_t:
            return f"'{p.name}' -> '{c.name}': '{c.name}' reads {wc.shape[1]} values, '{p.name}' writes {n * spatial_t}"
        w3 = wc.reshape(m, n, spatial_t)
        w_new = np.einsum("mns,nc->mcs", w3, wp).reshape(m, cin * spatial_t)
        b_new = (bc if bc is not None else np.zeros(m)) + (0 if bp is None else np.einsum("mns,n->m", w3, bp))
        macs_c, macs_new = m * n * spatial_t, m * cin * spatial_t
    if not macs_new < macs_p + macs_c:
        return f"'{p.name}' -> '{c.name}': merged they would cost {macs_new:,} MACs, apart {macs_p + macs_c:,}"
    return p, c, w_new, b_new, macs_p + macs_c, macs_new


def _merged_layer(p, c, w, b):
    new = c.copy()
    new.bottoms = list(p.bottoms)
    new.blobs = [w.astype(np.float32), b.astype(np.float32)]
    if c.type == "InnerProduct":
        ip = new.param_msg("inner_product_param")
        ip.transpose = False
        ip.bias_term = True
    else:
        new.param_msg("convolution_param").bias_term = True
    return new


@graph_pass("fold_factors")
def fold_factors(net, protect=(), any_layer: bool = False) -> PassResult:
    """Fold factors into neighbouring linear layers where exact (see the module header)."""
    from lrprune_caffe.ir.analysis import infer_shapes
    protect = set(protect)
    details, skipped = [], []
    replace, removed = {}, set()
    # (a) BatchNorm [+ Scale] after a factor
    for i, layer in enumerate(net.layers):
        if layer.type != "BatchNorm":
            continue
        plan = _fold_plan(net, i)
        if isinstance(plan, str):
            continue
        conv, bn, scale, final = plan
        if not (any_layer or is_factor(conv.name)) or conv.name in replace:
            continue
        if conv.name in protect:
            skipped.append({"layer": bn.name, "folded": False, "reason": f"'{conv.name}' is protected (masked)"})
            continue
        w, b = fold_weights(conv, bn, scale)
        new = conv.copy()
        new.param_msg("convolution_param").bias_term = True
        new.blobs, new.tops = [w, b], [final]
        replace[conv.name] = new
        removed.update(x.name for x in (bn, scale) if x is not None)
        details.append({"kind": "batchnorm", "into": conv.name, "removed": [x.name for x in (bn, scale) if x]})
    if replace:  # case (b) sees the net with (a) applied
        net.layers = [replace.get(x.name, x) for x in net.layers if x.name not in removed]
    # (b) pointwise linear layer -> linear layer
    shapes = infer_shapes(net)
    merged = {}
    taken = set()
    for i in range(len(net.layers)):
        p = net.layers[i]
        if p.name in taken:
            continue
        plan = _linear_plan(net, i, shapes, protect, any_layer)
        if plan is None:
            continue
        if isinstance(plan, str):
            skipped.append({"layer": p.name, "folded": False, "reason": plan})
            continue
        p, c, w, b, before, after = plan
        if c.name in taken:
            continue
        merged[c.name] = _merged_layer(p, c, w, b)
        taken.update((p.name, c.name))
        details.append({"kind": "linear", "into": c.name, "removed": [p.name], "macs_before": int(before),
                        "macs_after": int(after)})
    if not details:
        raise Precondition("no factor is followed by a BatchNorm or a linear layer it can be folded into" +
                               (": " + "; ".join(s["reason"] for s in skipped) if skipped else ""))
    gone = {d["removed"][0] for d in details if d["kind"] == "linear"}
    net.layers = [merged.get(x.name, x) for x in net.layers if x.name not in gone]
    return PassResult("fold_factors", changed=True, details=details + skipped)


__all__ = ["fold_factors", "is_factor"]
