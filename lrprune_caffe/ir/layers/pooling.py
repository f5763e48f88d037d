"""Pooling with Caffe's ceil rounding (and its clip of the last window)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import CannotShrink, LayerSpec, ShapeError, follow_channels, no_torch, register


@dataclass(frozen=True)
class PoolGeometry:
    method: str  # "MAX", "AVE" or "STOCHASTIC"
    kernel: tuple
    stride: tuple
    pad: tuple
    out: tuple  # output spatial size
    global_pooling: bool
    ceil: bool


def pool_geometry(layer, in_shape) -> PoolGeometry:
    pp = layer.param_msg("pooling_param")
    if len(in_shape) != 4:
        raise ShapeError(f"expects a 4-D input, got shape {tuple(in_shape)}")
    h, w = in_shape[2], in_shape[3]
    if pp.global_pooling:
        kernel = (h, w)
        if pp.HasField("kernel_size") or pp.HasField("kernel_h"):
            raise ShapeError("global_pooling cannot be combined with a kernel size")
    elif pp.HasField("kernel_h") or pp.HasField("kernel_w"):
        kernel = (int(pp.kernel_h), int(pp.kernel_w))
    elif pp.HasField("kernel_size"):
        kernel = (int(pp.kernel_size),) * 2
    else:
        raise ShapeError("pooling_param has no kernel_size (nor kernel_h/kernel_w, nor global_pooling)")
    pad = (int(pp.pad_h), int(pp.pad_w)) if (pp.HasField("pad_h") or pp.HasField("pad_w")) else (int(pp.pad),) * 2
    stride = ((int(pp.stride_h), int(pp.stride_w)) if (pp.HasField("stride_h") or pp.HasField("stride_w"))
              else (int(pp.stride),) * 2)
    if pp.global_pooling:
        pad, stride = (0, 0), (1, 1)
    if min(kernel) < 1 or min(stride) < 1 or min(pad) < 0:
        raise ShapeError(f"kernel {kernel}, stride {stride}, pad {pad} are not valid")
    if any(p >= k for p, k in zip(pad, kernel)):
        raise ShapeError(f"pad {pad} must be smaller than kernel {kernel}")
    ceil = True
    if pp.DESCRIPTOR.fields_by_name.get("round_mode") is not None and pp.HasField("round_mode"):
        ceil = pp.round_mode == 0  # CEIL = 0, FLOOR = 1
    out = []
    for n, k, s, p in zip((h, w), kernel, stride, pad):
        if n + 2 * p < k:
            raise ShapeError(f"kernel {kernel[0]}x{kernel[1]} is larger than the padded input "
                             f"{h + 2 * pad[0]}x{w + 2 * pad[1]} (input {tuple(in_shape)})")
        o = (math.ceil if ceil else math.floor)((n + 2 * p - k) / s) + 1
        if p and (o - 1) * s >= n + p:
            o -= 1  # Caffe: the last window must start inside the image
        out.append(int(o))
    method = pp.PoolMethod.Name(pp.pool)
    return PoolGeometry(method, kernel, stride, pad, tuple(out), bool(pp.global_pooling), ceil)


# ---- Caffe pooling in torch (also LRN's WITHIN_CHANNEL average) ------------------

_DIV_CACHE: dict = {}


def _ave_divisor(n, k, s, p, out):
    """Caffe's AVE pool divisor along one axis: window clipped to the padded input."""
    import numpy as np
    starts = np.arange(out) * s - p
    ends = np.minimum(starts + k, n + p)
    return (ends - starts).astype(np.float32)


def caffe_pool2d(x, method, kernel, stride, pad, out):
    """Caffe's MAX / AVE pooling of a 4-D torch tensor to the given output size.

    The input is padded explicitly (-inf for MAX, 0 for AVE, extra rows/columns on
    the bottom/right for ceil mode). AVE divides by the window clipped to the
    *padded* input, ``(min(start + k, H + pad) - start)`` per axis, not by the
    number of real pixels and not by ``k*k`` (``pooling_layer.cpp``).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    h, w = int(x.shape[2]), int(x.shape[3])
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out
    extra_h = max(0, (oh - 1) * sh + kh - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + kw - (w + 2 * pw))
    if method == "MAX":
        if ph or pw or extra_h or extra_w:
            x = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=-math.inf)
        y = F.max_pool2d(x, (kh, kw), (sh, sw))
        return y[:, :, :oh, :ow]
    # AVE: sum over the zero-padded window, divided by Caffe's clipped window size
    if ph or pw or extra_h or extra_w:
        x = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=0.0)
    y = F.avg_pool2d(x, (kh, kw), (sh, sw), divisor_override=1)[:, :, :oh, :ow]
    key = (h, w, kh, kw, sh, sw, ph, pw, oh, ow)
    div = _DIV_CACHE.get(key)
    if div is None:
        dh = _ave_divisor(h, kh, sh, ph, oh)
        dw = _ave_divisor(w, kw, sw, pw, ow)
        div = torch.from_numpy(np.outer(dh, dw).astype(np.float32)).reshape(1, 1, oh, ow)
        _DIV_CACHE[key] = div
    return y / div.to(y.device)


@register("Pooling")
class PoolingSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        g = pool_geometry(layer, s)
        shape = (s[0], s[1], *g.out)
        return [shape] * len(layer.tops)  # a second top (MAX mask) has the same shape

    def to_onnx(self, layer, ctx):
        """MaxPool / AveragePool with Caffe's window rule, written as explicit pads.

        Caffe's output size is ceil((H + 2p - k) / s) + 1, less one when the last
        window would start in the right padding. With ``ceil_mode=0`` that is an
        end pad of ``p + e``, e = max(0, (o-1)*s + k - (H + 2p)) (< k).
        MAX ignores pads. Caffe's AVE divides by the window clipped to the
        *padded* input [-p, H + p): with e == 0 that is count_include_pad=1; with
        p == 0 it is count_include_pad=0 (the valid part); with both, the p zeros
        are made real by a Pad node and the pool (pads 0, e) counts only them.
        """
        from .base import NoLowering
        s = ctx.in_shapes[0]
        g = pool_geometry(layer, s)
        if len(layer.tops) > 1:
            raise NoLowering("the second top (MAX pooling's argmax mask) has no ONNX lowering")
        if g.method == "STOCHASTIC":
            raise NoLowering("STOCHASTIC pooling has no ONNX lowering")
        x, y = ctx.bottom(0), ctx.top(0)
        if g.global_pooling:
            ctx.node("GlobalMaxPool" if g.method == "MAX" else "GlobalAveragePool", [x], y)
            return
        extra = []
        for n, k, st, p, o in zip(s[2:], g.kernel, g.stride, g.pad, g.out):
            e = max(0, (o - 1) * st + k - (n + 2 * p))
            if p + e >= k:  # only when stride > kernel and pad == 0
                raise NoLowering(f"Caffe's last window (input {n}, kernel {k}, stride {st}, no pad) "
                                 f"lies wholly past the input; ONNX has no empty window")
            if (n + 2 * p + e - k) // st + 1 != o:
                raise NoLowering(f"cannot express Caffe's pooled size {o} (input {n}, kernel {k}, "
                                 f"stride {st}, pad {p}) with explicit pads")
            extra.append(e)
        attrs = dict(kernel_shape=list(g.kernel), strides=list(g.stride))
        pad, ends = list(g.pad), [p + e for p, e in zip(g.pad, extra)]
        if g.method == "MAX":
            ctx.node("MaxPool", [x], y, pads=pad + ends, **attrs)
        elif not any(extra):
            ctx.node("AveragePool", [x], y, pads=pad + pad, count_include_pad=1, **attrs)
        elif not any(pad):
            ctx.node("AveragePool", [x], y, pads=pad + extra, count_include_pad=0, **attrs)
        else:
            zeros = ctx.ints("pad_pads", [0, 0, *pad, 0, 0, *pad])
            xp = ctx.node("Pad", [x, zeros], suffix="pad", mode="constant")
            ctx.node("AveragePool", [xp], y, pads=[0, 0] + extra, count_include_pad=0, **attrs)

    def to_torch(self, layer):
        """:func:`caffe_pool2d` with the geometry of each input shape."""
        pp = layer.param_msg("pooling_param")
        if pp.pool == pp.STOCHASTIC:
            raise no_torch(layer, " with pool: STOCHASTIC")
        if len(layer.tops) > 1:
            raise no_torch(layer, " with a second (mask) top")
        cache = {}

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            shape = tuple(int(d) for d in x.shape)
            g = cache.get(shape[1:])
            if g is None:
                g = cache.setdefault(shape[1:], pool_geometry(layer, shape))
            return [caffe_pool2d(x, g.method, g.kernel, g.stride, g.pad, g.out)]
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        """Pools each channel by itself (not a flattened blob)."""
        if block != 1:
            raise CannotShrink("it pools a flattened blob")
        return follow_channels(layer, block)
