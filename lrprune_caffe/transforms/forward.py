"""A small numpy forward over the IR, for data-aware passes (calibration).

It computes what Caffe computes at test time for the layer types of
LeNet / VGG / AlexNet / GoogLeNet / ResNet-style deploy nets (checked against
../shared/golden, real Caffe's blobs): Input (given), Convolution (pad,
stride, dilation, group), InnerProduct (axis, transpose), ReLU (negative
slope), PReLU, ELU, Sigmoid, TanH, AbsVal, Power, Pooling (MAX / AVE with Caffe's ceil rounding,
clipped last window and pad counting; global), LRN (across / within
channels), Softmax, Dropout / Split (identity), Slice, Concat, Eltwise (SUM with
coefficients, PROD, MAX), Flatten, Reshape, BatchNorm (global statistics),
Scale, Bias. Anything else raises :class:`~lrprune_caffe.transforms.Precondition`
naming the layer, so a calibration pass leaves the net untouched and says why.

The transforms layer sits below the engines (onnxruntime, OpenCV) in the
import contract, hence this forward rather than an export; callers that have
an engine may inject their own (see :mod:`.calibrate`).
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.ir.layers import ShapeError
from lrprune_caffe.ir.layers.base import canon_axis
from lrprune_caffe.ir.layers.conv import conv_geometry
from lrprune_caffe.ir.layers.normalization import bn_statistics
from lrprune_caffe.ir.layers.pooling import pool_geometry
from lrprune_caffe.ir.layers.structure import reshape_target, slice_sizes
from lrprune_caffe.lowrank.datafit import conv2d
from . import Precondition


def _conv(layer, x):
    g = conv_geometry(layer)
    if x.ndim != 4:
        raise Precondition(f"layer '{layer.name}' ({layer.type}): only 2-D convolutions run in the numpy forward")
    b = layer.blobs[1] if g.bias and len(layer.blobs) > 1 else None
    return conv2d(x, layer.blobs[0], b, g.stride, g.pad, g.dilation, g.group).astype(x.dtype, copy=False)


def _ip(layer, x):
    ip = layer.param_msg("inner_product_param")
    axis = canon_axis(int(ip.axis), x.ndim)
    W = layer.blobs[0]
    X = x.reshape(int(np.prod(x.shape[:axis])), -1)
    y = X @ (W if ip.transpose else W.T)
    if ip.bias_term and len(layer.blobs) > 1:
        y = y + layer.blobs[1].reshape(1, -1)
    return y.reshape(*x.shape[:axis], -1).astype(x.dtype, copy=False)


def _pool(layer, x):
    try:
        g = pool_geometry(layer, x.shape)
    except ShapeError as e:
        raise Precondition(f"layer '{layer.name}' (Pooling): {e}") from None
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = g.kernel, g.stride, g.pad, g.out
    B, C, H, W = x.shape
    need_h, need_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    pad = ((0, 0), (0, 0), (ph, max(0, need_h - H - ph)), (pw, max(0, need_w - W - pw)))
    if g.method == "MAX":
        xp = np.pad(x, pad, constant_values=-np.inf)
        out = np.full((B, C, oh, ow), -np.inf, dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                np.maximum(out, xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw], out=out)
        return out
    if g.method != "AVE":
        raise Precondition(f"layer '{layer.name}' (Pooling): {g.method} pooling has no numpy forward")
    xp = np.pad(x, pad)
    out = np.zeros((B, C, oh, ow), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out += xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]

    def count(o, s, k, p, n):  # Caffe: the window clipped to the padded input, pads counted
        start = np.arange(o) * s - p
        return np.minimum(start + k, n + p) - start

    area = count(oh, sh, kh, ph, H)[:, None] * count(ow, sw, kw, pw, W)[None, :]
    return (out / area).astype(x.dtype)


def _lrn(layer, x):
    lp = layer.param_msg("lrn_param")
    n, alpha, beta, k = int(lp.local_size), float(lp.alpha), float(lp.beta), float(lp.k)
    sq = np.asarray(x, np.float64) ** 2
    h = (n - 1) // 2
    if lp.norm_region == lp.ACROSS_CHANNELS:
        padded = np.pad(sq, ((0, 0), (h, n - 1 - h), (0, 0), (0, 0)))
        csum = np.cumsum(padded, axis=1)
        csum = np.concatenate([np.zeros_like(csum[:, :1]), csum], axis=1)
        window = csum[:, n:] - csum[:, :-n]
        scale = k + alpha / n * window
    else:
        padded = np.pad(sq, ((0, 0), (0, 0), (h, h), (h, h)))
        acc = np.zeros_like(sq)
        for i in range(n):
            for j in range(n):
                acc += padded[:, :, i:i + x.shape[2], j:j + x.shape[3]]
        scale = 1.0 + alpha * acc / (n * n)
    return (x * scale ** -beta).astype(x.dtype)


def _softmax(layer, x):
    axis = canon_axis(int(layer.param_msg("softmax_param").axis), x.ndim)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return np.log(y) if layer.type == "LogSoftmax" else y


def _channel_operand(layer, field, blob, x):
    p = layer.param_msg(field)
    axis = canon_axis(int(p.axis), x.ndim)
    blob = np.asarray(blob)
    trailing = x.ndim - axis - blob.ndim
    return blob.reshape((1,) * axis + blob.shape + (1,) * trailing)


def _scale(layer, xs):
    sp = layer.param_msg("scale_param")
    x = xs[0]
    gamma = xs[1] if len(xs) > 1 else layer.blobs[0]
    y = x * _channel_operand(layer, "scale_param", gamma, x)
    if sp.bias_term:
        y = y + _channel_operand(layer, "scale_param", layer.blobs[-1], x)
    return y


def _eltwise(layer, xs):
    ep = layer.param_msg("eltwise_param")
    op = ep.EltwiseOp.Name(ep.operation)
    if op == "PROD":
        return np.prod(xs, axis=0)
    if op == "MAX":
        return np.max(xs, axis=0)
    coeff = list(ep.coeff) or [1.0] * len(xs)
    return sum(float(c) * x for c, x in zip(coeff, xs))


def _bn(layer, x):
    mean, var = bn_statistics(layer)
    eps = float(layer.param_msg("batch_norm_param").eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)).astype(x.dtype)


def _flatten(layer, x):
    fp = layer.param_msg("flatten_param")
    a, e = canon_axis(int(fp.axis), x.ndim), canon_axis(int(fp.end_axis), x.ndim)
    return x.reshape(*x.shape[:a], -1, *x.shape[e + 1:])


def _power(pp, x):
    return (float(pp.shift) + float(pp.scale) * x) ** float(pp.power)


def _relu(slope, x, out=None):
    """Caffe's ReLU ``max(x, 0) + slope min(x, 0)``; one pass and no temporaries at slope 0 (``out``: in place)."""
    if slope == 0.0:
        return np.maximum(x, np.zeros((), x.dtype), out=out)
    return np.where(x > 0, x, slope * x)


def _prelu(layer, x):
    a = np.asarray(layer.blobs[0]).reshape(-1)
    a = a.reshape((1, -1) + (1,) * (x.ndim - 2)) if a.size > 1 else a[0]
    return np.where(x > 0, x, a * x)


UNARY = {
    "Convolution": _conv, "InnerProduct": _ip, "Pooling": _pool, "LRN": _lrn, "Softmax": _softmax,
    "LogSoftmax": _softmax, "BatchNorm": _bn, "Flatten": _flatten, "PReLU": _prelu,
    "ReLU": lambda layer, x: _relu(float(layer.param_msg("relu_param").negative_slope), x),
    "Sigmoid": lambda layer, x: 1.0 / (1.0 + np.exp(-x)),
    "TanH": lambda layer, x: np.tanh(x),
    "Dropout": lambda layer, x: x,
    "AbsVal": lambda layer, x: np.abs(x),
    "ELU": lambda layer, x: np.where(x > 0, x, float(layer.param_msg("elu_param").alpha) * np.expm1(np.minimum(x, 0))),
    "Power": lambda layer, x: _power(layer.param_msg("power_param"), x),
    "Reshape": lambda layer, x: x.reshape(reshape_target(layer, x.shape)),
    "Bias": lambda layer, x: x + _channel_operand(layer, "bias_param", layer.blobs[0], x),
}


SUPPORTED = tuple(sorted(set(UNARY) | {"Split", "Slice", "Concat", "Eltwise", "Scale", "Input"}))


def run_layer(layer, bottoms: list) -> list:
    """The layer's top values (a list) from its bottom values."""
    t = layer.type
    if t == "Split":
        return [bottoms[0]] * len(layer.tops)
    if t == "Concat":
        cp = layer.param_msg("concat_param")
        axis = int(cp.concat_dim) if cp.HasField("concat_dim") else int(cp.axis)
        return [np.concatenate(bottoms, axis=canon_axis(axis, bottoms[0].ndim))]
    if t == "Slice":
        axis, sizes = slice_sizes(layer, bottoms[0].shape)
        return np.split(bottoms[0], np.cumsum(sizes)[:-1], axis=axis)
    if t == "Eltwise":
        return [_eltwise(layer, bottoms)]
    if t == "Scale":
        return [_scale(layer, bottoms)]
    fn = UNARY.get(t)
    if fn is None or len(bottoms) != 1 or len(layer.tops) != 1:
        raise Precondition(f"layer '{layer.name}' ({t}) has no numpy forward (supported: "
                           f"{', '.join(SUPPORTED)})")
    return [fn(layer, bottoms[0])]


def forward(net, inputs: dict, dtype=np.float32) -> dict:
    """Every blob's final value (in-place layers overwrite) for ``inputs`` ({input blob: NCHW array})."""
    blobs = {k: np.asarray(v, dtype=dtype) for k, v in inputs.items()}
    for layer in net.layers:
        if layer.type == "Input":
            missing = [t for t in layer.tops if t not in blobs]
            if missing:
                raise Precondition(f"no values for the net input(s) {', '.join(missing)}")
            continue
        for top, val in zip(layer.tops, run_layer(layer, [blobs[b] for b in layer.bottoms])):
            blobs[top] = val
    return blobs


__all__ = ["forward", "run_layer", "SUPPORTED"]
