"""LRN, BatchNorm, Scale and Bias (and MVN): shape-preserving, per-channel blobs."""

from __future__ import annotations

import numpy as np

from .base import LayerSpec, ShapeError, canon_axis, register


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


@register("MVN")
class MVNSpec(LayerSpec):
    pass


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


@register("Scale")
class ScaleSpec(LayerSpec):
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


@register("Bias")
class BiasSpec(LayerSpec):
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
