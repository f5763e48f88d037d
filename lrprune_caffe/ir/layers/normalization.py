"""LRN, BatchNorm, Scale and Bias (and MVN): shape-preserving, per-channel blobs."""

from __future__ import annotations

import math

import numpy as np

from .base import (CannotShrink, LayerSpec, ShapeError, broadcast_from, canon_axis, follow_channels,
                   register)


@register("LRN")
class LRNSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        if len(in_shapes[0]) != 4:
            raise ShapeError(f"expects a 4-D input, got shape {tuple(in_shapes[0])}")
        return [in_shapes[0]]

    def to_onnx(self, layer, ctx):
        """ACROSS_CHANNELS: ONNX LRN (same formula: x / (k + alpha/n * sum x^2)^beta).
        WITHIN_CHANNEL: Caffe's own composite, x * (1 + alpha * avgpool_n(x^2))^-beta,
        with an n x n AVE pool padded (n-1)/2 that counts the pads (Caffe's power
        layer there uses shift 1, not k)."""
        from .base import NoLowering
        lp = layer.param_msg("lrn_param")
        n, alpha, beta, k = int(lp.local_size), float(lp.alpha), float(lp.beta), float(lp.k)
        if n % 2 == 0:
            raise NoLowering(f"local_size {n} must be odd (Caffe requires it)")
        x, y = ctx.bottom(0), ctx.top(0)
        if lp.norm_region == lp.ACROSS_CHANNELS:
            ctx.node("LRN", [x], y, size=n, alpha=alpha, beta=beta, bias=k)
            return
        pad = (n - 1) // 2
        sq = ctx.node("Mul", [x, x], suffix="square")
        avg = ctx.node("AveragePool", [sq], suffix="pool", kernel_shape=[n, n], strides=[1, 1],
                       pads=[pad] * 4, count_include_pad=1)
        t = ctx.node("Mul", [avg, ctx.scalar("alpha", alpha)], suffix="scale")
        t = ctx.node("Add", [t, ctx.scalar("one", 1.0)], suffix="shift")
        t = ctx.node("Pow", [t, ctx.scalar("neg_beta", -beta)], suffix="pow")
        ctx.node("Mul", [x, t], y)

    def to_torch(self, layer):
        """ACROSS_CHANNELS ``x * (k + alpha/n * sum x^2)^-beta`` over a zero-padded channel
        window starting at ``c - (n-1)/2``; WITHIN_CHANNEL ``x * (1 + alpha *
        AVEpool_n,pad=(n-1)/2(x^2))^-beta`` (Caffe's shift 1 there, not k, and its AVE divisor)."""
        import torch.nn.functional as F
        from lrprune_caffe.errors import UserError, layer_error
        from .pooling import caffe_pool2d
        lp = layer.param_msg("lrn_param")
        n, alpha, beta, k = int(lp.local_size), float(lp.alpha), float(lp.beta), float(lp.k)
        if n % 2 == 0:
            raise layer_error(UserError, layer, f"LRN local_size must be odd (Caffe requires it), got {n}")
        pre = (n - 1) // 2
        within = lp.norm_region == lp.WITHIN_CHANNEL

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            sq = x * x
            if within:
                h, w = int(x.shape[2]), int(x.shape[3])
                oh = math.ceil((h + 2 * pre - n) / 1) + 1
                ow = math.ceil((w + 2 * pre - n) / 1) + 1
                avg = caffe_pool2d(sq, "AVE", (n, n), (1, 1), (pre, pre), (oh, ow))
                scale = 1.0 + alpha * avg
            else:
                padded = F.pad(sq, (0, 0, 0, 0, pre, n - pre - 1))
                win = F.avg_pool3d(padded.unsqueeze(1), (n, 1, 1), stride=1).squeeze(1)  # sum / n
                scale = k + alpha * win
            return [x * scale.pow(-beta)]
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        """Passes channels through; ACROSS_CHANNELS is not exact (a channel's neighbours change)."""
        lp = layer.param_msg("lrn_param")
        note = ""
        if lp.norm_region == lp.ACROSS_CHANNELS:
            note = (f"LRN '{layer.name}' normalizes across channels: removing channels changes "
                    f"its neighbourhoods (not exact)")
        return follow_channels(layer, block, note=note)


@register("MVN")
class MVNSpec(LayerSpec):
    def shrink_input(self, layer, shape, block, in_place):
        if layer.param_msg("mvn_param").across_channels:
            raise CannotShrink("it normalizes across channels")
        return follow_channels(layer, block)


@register("BatchNorm")
class BatchNormSpec(LayerSpec):
    def weight_shapes(self, layer, in_shapes):
        c = in_shapes[0][1] if len(in_shapes[0]) > 1 else 1
        return [(c,), (c,), (1,)]

    def to_onnx(self, layer, ctx):
        """BatchNormalization with Caffe's stored statistics: mean = blob0 * f,
        var = blob1 * f, f = 1 / blob2 (0 when blob2 == 0); scale 1, bias 0;
        eps from batch_norm_param. Global statistics, as at test time."""
        from .base import NoLowering
        if len(layer.blobs) != 3:
            raise NoLowering("needs its mean, variance and factor blobs (give the caffemodel)")
        mean, var = bn_statistics(layer)
        c = mean.size
        ctx.node("BatchNormalization",
                 [ctx.bottom(0), ctx.const("scale", np.ones(c)), ctx.const("bias", np.zeros(c)),
                  ctx.const("mean", mean), ctx.const("var", var)],
                 ctx.top(0), epsilon=float(layer.param_msg("batch_norm_param").eps))

    def to_torch(self, layer):
        """``f = 0 if blob2 == 0 else 1/blob2``, ``(x - f*mean) / sqrt(f*var + eps)``; frozen
        statistics unless ``use_global_stats: false`` (then batch statistics, biased variance)."""
        import torch
        bp = layer.param_msg("batch_norm_param")
        eps = float(bp.eps)
        batch_stats = bp.HasField("use_global_stats") and not bp.use_global_stats

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            c = int(x.shape[1]) if x.dim() > 1 else 1
            view = (1, c) + (1,) * (x.dim() - 2)
            if batch_stats:
                dims = [d for d in range(x.dim()) if d != 1]
                mean = x.mean(dim=dims, keepdim=True)
                var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
            else:
                f = blobs[2].reshape(-1)[0]
                sf = torch.where(f == 0, torch.zeros_like(f), 1.0 / f)
                mean = (blobs[0] * sf).reshape(view)
                var = (blobs[1] * sf).reshape(view)
            return [(x - mean) / torch.sqrt(var + eps)]
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        """Its mean and variance shrink with the channels (the factor stays)."""
        edits = [(0, 0, block), (1, 0, block)] if len(layer.blobs) == 3 else []
        return follow_channels(layer, block, edits)


def bn_statistics(layer):
    """(mean, var) of a Caffe BatchNorm layer, un-scaled by its moving-average factor."""
    factor = float(np.asarray(layer.blobs[2]).reshape(-1)[0])
    f = 0.0 if factor == 0 else 1.0 / factor
    mean = np.asarray(layer.blobs[0], dtype=np.float64).reshape(-1) * f
    var = np.asarray(layer.blobs[1], dtype=np.float64).reshape(-1) * f
    return mean, var


def _broadcast_operand(layer, ctx, param_field, blob):
    """(ONNX value) of Scale's / Bias's operand shaped param_shape + (1,) * trailing,
    from a blob or, in the two-bottom form, from bottom 1."""
    p = layer.param_msg(param_field)
    s = ctx.in_shapes[0]
    axis = canon_axis(int(p.axis), len(s))
    if blob is None:  # two-bottom form: bottom 1 is the operand
        s1, s1b = ctx.in_shapes[1], ctx.in_shapes2[1]
        trailing = len(s) - axis - len(s1)
        if trailing == 0:
            return ctx.bottom(1)
        return ctx.reshape(ctx.bottom(1), (*s1, *(1,) * trailing), (*s1b, *(1,) * trailing),
                           suffix="operand")
    shape = scale_param_shape(layer, ctx.in_shapes, param_field)
    trailing = len(s) - axis - len(shape)
    return np.asarray(blob, dtype=np.float32).reshape((*shape, *(1,) * trailing))


def scale_param_shape(layer, in_shapes, param_field):
    """Shape of Scale's / Bias's parameter blob: bottom.shape[axis : axis + num_axes]."""
    p = layer.param_msg(param_field)
    s = in_shapes[0]
    if len(layer.bottoms) > 1:
        return None
    num_axes = int(p.num_axes)
    axis = canon_axis(int(p.axis), len(s)) if len(s) else 0
    if num_axes == -1:
        return tuple(s[axis:])
    if num_axes < -1 or axis + num_axes > len(s):
        raise ShapeError(f"axis {p.axis} + num_axes {num_axes} do not fit a {len(s)}-D input")
    return tuple(s[axis:axis + num_axes])


class _AffineSpec(LayerSpec):
    """Scale / Bias: a per-axis operand from a blob or from a second bottom."""

    trainable = True
    #: its parameter message
    param_field = ""

    def shrink_input(self, layer, shape, block, in_place):
        """With one bottom, ``axis: 1``, ``num_axes: 1``: its blobs shrink with the channels."""
        p = layer.param_msg(self.param_field)
        if len(layer.bottoms) != 1:
            raise CannotShrink("its operand is a second bottom")
        if int(p.axis) not in (1, 1 - len(shape)) or int(p.num_axes) != 1:
            raise CannotShrink(f"axis {p.axis}, num_axes {p.num_axes} (needs axis 1, num_axes 1)")
        return follow_channels(layer, block, [(j, 0, block) for j in range(len(layer.blobs))])


def _operand(bottoms, blobs):
    """(operand, the remaining blobs) of Scale / Bias in torch: bottom 1 or blob 0."""
    if len(bottoms) > 1:
        return bottoms[1], list(blobs)
    return blobs[0], list(blobs[1:])


@register("Scale")
class ScaleSpec(_AffineSpec):
    param_field = "scale_param"

    def weight_shapes(self, layer, in_shapes):
        shape = scale_param_shape(layer, in_shapes, "scale_param")
        shapes = [] if shape is None else [shape]
        if layer.param_msg("scale_param").bias_term:
            if shape is None:
                return None
            shapes.append(shape)
        return shapes

    def to_onnx(self, layer, ctx):
        """Mul by the scale (blob 0, or bottom 1) shaped to broadcast from ``axis``
        over ``num_axes`` axes, then Add the bias blob when bias_term."""
        from .base import NoLowering
        sp = layer.param_msg("scale_param")
        two = len(layer.bottoms) > 1
        need = (0 if two else 1) + (1 if sp.bias_term else 0)
        if len(layer.blobs) != need:
            raise NoLowering(f"needs {need} blob(s), got {len(layer.blobs)} (give the caffemodel)")
        gamma = _broadcast_operand(layer, ctx, "scale_param", None if two else layer.blobs[0])
        if not isinstance(gamma, str):
            gamma = ctx.const("scale", gamma)
        if not sp.bias_term:
            ctx.node("Mul", [ctx.bottom(0), gamma], ctx.top(0))
            return
        bshape = np.asarray(layer.blobs[-1]).shape
        axis = canon_axis(int(sp.axis), len(ctx.in_shapes[0]))
        trailing = len(ctx.in_shapes[0]) - axis - len(bshape)
        beta = ctx.const("bias", np.asarray(layer.blobs[-1]).reshape((*bshape, *(1,) * trailing)))
        y = ctx.node("Mul", [ctx.bottom(0), gamma])
        ctx.node("Add", [y, beta], ctx.top(0), suffix="bias")

    def to_torch(self, layer):
        """``x * scale`` (+ bias when bias_term), broadcast from ``axis``."""
        sp = layer.param_msg("scale_param")
        bias_term = sp.bias_term

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            axis = canon_axis(int(sp.axis), x.dim()) if x.dim() else 0
            p, rest = _operand(bottoms, blobs)
            y = x * (broadcast_from(p, x.dim(), axis) if p.dim() else p)
            if bias_term and rest:
                b = rest[-1]
                y = y + (broadcast_from(b, x.dim(), axis) if b.dim() else b)
            return [y]
        return fn


@register("Bias")
class BiasSpec(_AffineSpec):
    param_field = "bias_param"

    def weight_shapes(self, layer, in_shapes):
        shape = scale_param_shape(layer, in_shapes, "bias_param")
        return [] if shape is None else [shape]

    def to_onnx(self, layer, ctx):
        """Add the bias (blob 0, or bottom 1) shaped to broadcast from ``axis``."""
        from .base import NoLowering
        two = len(layer.bottoms) > 1
        if len(layer.blobs) != (0 if two else 1):
            raise NoLowering(f"needs {0 if two else 1} blob(s), got {len(layer.blobs)}")
        beta = _broadcast_operand(layer, ctx, "bias_param", None if two else layer.blobs[0])
        if not isinstance(beta, str):
            beta = ctx.const("bias", beta)
        ctx.node("Add", [ctx.bottom(0), beta], ctx.top(0))

    def to_torch(self, layer):
        """``x + bias``, broadcast from ``axis``."""
        bp = layer.param_msg("bias_param")

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            axis = canon_axis(int(bp.axis), x.dim()) if x.dim() else 0
            p, _ = _operand(bottoms, blobs)
            return [x + (broadcast_from(p, x.dim(), axis) if p.dim() else p)]
        return fn
