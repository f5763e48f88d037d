"""Element-wise activations, Dropout and Silence: output shape = input shape, one class per type.

The formulas are Caffe's (BVLC ``src/caffe/layers/*_layer.cpp``, forward pass);
each class's ``to_onnx`` / ``to_torch`` computes its own. All of them map
channel ``c`` to channel ``c``, so structured pruning passes through them.
"""

from __future__ import annotations

import math

import numpy as np

from .base import ChannelShrink, LayerSpec, NoLowering, ShapeError, broadcast_from, follow_channels, register


def _chain(ctx, x, y, steps):
    """Nodes applied one after the other to ``x``, the last one writing ``y``.

    ``steps``: ``(op, const_suffix, value, out_suffix)``; ``const_suffix`` None
    is a unary op, else the second input is the float scalar ``value``. No
    steps: an Identity.
    """
    if not steps:
        ctx.node("Identity", [x], y)
    for i, (op, what, value, step) in enumerate(steps):
        last = i == len(steps) - 1
        inputs = [x] if what is None else [x, ctx.scalar(what, value)]
        x = ctx.node(op, inputs, y if last else None, suffix=None if last else step)
    return y


def _log_base(field: str, base: float) -> np.float32:
    """ln(base) as Caffe's exp/log layers take it: base -1 means e (exactly 1)."""
    if base == -1.0:
        return np.float32(1.0)
    if not base > 0:
        raise NoLowering(f"{field}.base must be strictly positive (or -1 for e), got {base:g}")
    return np.float32(np.log(np.float32(base)))


def _unary_torch(f):
    """The torch op applying ``f`` to the one bottom."""
    def fn(bottoms, blobs, training):
        return [f(bottoms[0])]
    return fn


class ActivationSpec(LayerSpec):
    """Shape-preserving, channel by channel: structured pruning follows its top."""

    def shrink_input(self, layer, shape, block, in_place):
        return follow_channels(layer, block)


class UnaryOpSpec(ActivationSpec):
    """An activation that is one parameter-free ONNX op and one torch function."""

    #: the ONNX op computing the same formula
    onnx_op = ""

    def torch_fn(self):
        """The torch function of one tensor (torch imported here)."""
        raise NotImplementedError

    def to_onnx(self, layer, ctx):
        ctx.node(self.onnx_op, [ctx.bottom(0)], ctx.top(0))

    def to_torch(self, layer):
        return _unary_torch(self.torch_fn())


@register("ReLU")
class ReLUSpec(ActivationSpec):
    """``max(x, 0) + negative_slope * min(x, 0)``: Relu, or LeakyRelu when the slope is not 0."""

    def to_onnx(self, layer, ctx):
        slope = float(layer.param_msg("relu_param").negative_slope)
        if slope:
            ctx.node("LeakyRelu", [ctx.bottom(0)], ctx.top(0), alpha=slope)
        else:
            ctx.node("Relu", [ctx.bottom(0)], ctx.top(0))

    def to_torch(self, layer):
        import torch.nn.functional as F
        slope = float(layer.param_msg("relu_param").negative_slope)
        return _unary_torch(F.relu if slope == 0 else (lambda x: F.leaky_relu(x, slope)))


@register("Sigmoid")
class SigmoidSpec(UnaryOpSpec):
    onnx_op = "Sigmoid"

    def torch_fn(self):
        import torch
        return torch.sigmoid


@register("TanH")
class TanHSpec(UnaryOpSpec):
    onnx_op = "Tanh"

    def torch_fn(self):
        import torch
        return torch.tanh


@register("AbsVal")
class AbsValSpec(UnaryOpSpec):
    onnx_op = "Abs"

    def torch_fn(self):
        import torch
        return torch.abs


@register("BNLL")
class BNLLSpec(UnaryOpSpec):
    """``log(1 + exp(x))``: Softplus."""

    onnx_op = "Softplus"

    def torch_fn(self):
        import torch.nn.functional as F
        return F.softplus


@register("ELU")
class ELUSpec(ActivationSpec):
    """``x > 0 ? x : alpha * (exp(x) - 1)``."""

    def to_onnx(self, layer, ctx):
        ctx.node("Elu", [ctx.bottom(0)], ctx.top(0), alpha=float(layer.param_msg("elu_param").alpha))

    def to_torch(self, layer):
        import torch.nn.functional as F
        alpha = float(layer.param_msg("elu_param").alpha)
        return _unary_torch(lambda x: F.elu(x, alpha=alpha))


@register("Power")
class PowerSpec(ActivationSpec):
    """``(shift + scale * x) ^ power``, trivial steps skipped."""

    def to_onnx(self, layer, ctx):
        pp = layer.param_msg("power_param")
        power, scale, shift = float(pp.power), float(pp.scale), float(pp.shift)
        steps = []
        if scale != 1.0:
            steps.append(("Mul", "scale", scale, "scaled"))
        if shift != 0.0:
            steps.append(("Add", "shift", shift, "shifted"))
        if power != 1.0:
            steps.append(("Pow", "power", power, "pow"))
        _chain(ctx, ctx.bottom(0), ctx.top(0), steps)

    def to_torch(self, layer):
        import torch
        pp = layer.param_msg("power_param")
        power, scale, shift = float(pp.power), float(pp.scale), float(pp.shift)

        def f(x):
            y = x if scale == 1.0 else x * scale
            if shift != 0.0:
                y = y + shift
            if power == 1.0:
                return y
            if power == 2.0:
                return y * y
            return torch.pow(y, power)
        return _unary_torch(f)


@register("Exp")
class ExpSpec(ActivationSpec):
    """``base ^ (shift + scale * x)`` (base -1: e), as exp_layer.cpp computes it:
    ``exp(ln(base) * scale * x) * base ^ shift``."""

    def to_onnx(self, layer, ctx):
        ep = layer.param_msg("exp_param")
        base, scale, shift = np.float32(ep.base), np.float32(ep.scale), np.float32(ep.shift)
        inner = _log_base("exp_param", float(base)) * scale
        if shift == 0:
            outer = np.float32(1.0)
        elif base == -1:
            outer = np.float32(np.exp(shift))
        else:
            outer = np.float32(np.power(base, shift))
        steps = [("Mul", "inner_scale", float(inner), "scaled")] if inner != 1 else []
        steps.append(("Exp", None, None, "exp"))
        if outer != 1:
            steps.append(("Mul", "outer_scale", float(outer), "outer"))
        _chain(ctx, ctx.bottom(0), ctx.top(0), steps)

    def to_torch(self, layer):
        import torch
        ep = layer.param_msg("exp_param")
        base, scale, shift = float(ep.base), float(ep.scale), float(ep.shift)
        ln_base = 1.0 if base == -1 else math.log(base)
        return _unary_torch(lambda x: torch.exp((shift + scale * x) * ln_base))


@register("Log")
class LogSpec(ActivationSpec):
    """``log_base(shift + scale * x)`` as log_layer.cpp: ``ln(shift + scale * x) / ln(base)``."""

    def to_onnx(self, layer, ctx):
        lp = layer.param_msg("log_param")
        base, scale, shift = float(lp.base), float(lp.scale), float(lp.shift)
        log_base = _log_base("log_param", base)
        if log_base == 0:
            raise NoLowering("log_param.base 1 has no logarithm (Caffe refuses it: 1/log(1) is inf)")
        base_scale = np.float32(1.0) / log_base
        steps = []
        if scale != 1.0:
            steps.append(("Mul", "scale", scale, "scaled"))
        if shift != 0.0:
            steps.append(("Add", "shift", shift, "shifted"))
        steps.append(("Log", None, None, "log"))
        if base_scale != 1:
            steps.append(("Mul", "base_scale", float(base_scale), "rebased"))
        _chain(ctx, ctx.bottom(0), ctx.top(0), steps)

    def to_torch(self, layer):
        import torch
        lp = layer.param_msg("log_param")
        base, scale, shift = float(lp.base), float(lp.scale), float(lp.shift)
        inv_ln_base = 1.0 if base == -1 else 1.0 / math.log(base)
        return _unary_torch(lambda x: torch.log(shift + scale * x) * inv_ln_base)


@register("Threshold")
class ThresholdSpec(ActivationSpec):
    """``x > threshold ? 1 : 0`` (strict): Greater, then Cast."""

    def to_onnx(self, layer, ctx):
        th = float(layer.param_msg("threshold_param").threshold)
        above = ctx.node("Greater", [ctx.bottom(0), ctx.scalar("threshold", th)], suffix="above")
        ctx.node("Cast", [above], ctx.top(0), to=1)  # TensorProto.FLOAT

    def to_torch(self, layer):
        t = float(layer.param_msg("threshold_param").threshold)
        return _unary_torch(lambda x: (x > t).to(x.dtype))


def _clip_onnx(ctx, lo: float, hi: float):
    """ONNX Clip with min/max as inputs (opset >= 11)."""
    ctx.node("Clip", [ctx.bottom(0), ctx.scalar("min", lo), ctx.scalar("max", hi)], ctx.top(0))


@register("Clip")
class ClipSpec(ActivationSpec):
    """``max(min, min(x, max))``; when min > max Caffe's result is ``min`` everywhere,
    so the ONNX upper bound becomes min."""

    def to_onnx(self, layer, ctx):
        cp = layer.param_msg("clip_param")
        if not (layer.has("clip_param") and cp.HasField("min") and cp.HasField("max")):
            raise NoLowering("clip_param needs both min and max (required fields in caffe.proto)")
        lo, hi = float(cp.min), float(cp.max)
        _clip_onnx(ctx, lo, max(lo, hi))

    def to_torch(self, layer):
        import torch
        cp = layer.param_msg("clip_param")
        return _unary_torch(lambda x: torch.clamp(x, min=float(cp.min), max=float(cp.max)))


@register("ReLU6")
class ReLU6Spec(ActivationSpec):
    """Forks' relu6_layer.cpp: ``min(max(x, 0), 6)``, Clip(0, 6)."""

    def to_onnx(self, layer, ctx):
        _clip_onnx(ctx, 0.0, 6.0)


@register("Swish")
class SwishSpec(ActivationSpec):
    """``x * sigmoid(beta * x)``."""

    def to_onnx(self, layer, ctx):
        x = ctx.bottom(0)
        beta = float(layer.param_msg("swish_param").beta)
        z = x if beta == 1.0 else ctx.node("Mul", [x, ctx.scalar("beta", beta)], suffix="scaled")
        s = ctx.node("Sigmoid", [z], suffix="sigmoid")
        ctx.node("Mul", [x, s], ctx.top(0))


@register("HardSigmoid")
class HardSigmoidSpec(ActivationSpec):
    #: HardSigmoid comes from forks; caffe.proto has no parameter message for it, so its
    #: slope and offset are not defined by any field we can read
    no_lowering = ("caffe.proto defines no parameters for it (its slope and "
                   "offset come from forks)")


@register("Dropout")
class DropoutSpec(ActivationSpec):
    """The identity at test time (removed from ONNX: its top is its bottom's value);
    inverted dropout in torch training."""

    def to_onnx(self, layer, ctx):
        ctx.alias(0, ctx.bottom(0))

    def to_torch(self, layer):
        import torch.nn.functional as F
        ratio = float(layer.param_msg("dropout_param").dropout_ratio)

        def fn(bottoms, blobs, training):
            return [F.dropout(bottoms[0], p=ratio, training=training)]
        return fn


@register("Silence")
class SilenceSpec(LayerSpec):
    """Consumes its bottoms, computes nothing."""

    def to_onnx(self, layer, ctx):
        return

    def to_torch(self, layer):
        def fn(bottoms, blobs, training):
            return []
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        return ChannelShrink()  # the path ends here


@register("PReLU")
class PReLUSpec(ActivationSpec):
    """``max(x, 0) + a_c * min(x, 0)``, one slope per channel (or one shared)."""

    trainable = True
    torch_needs_blobs = True

    def weight_shapes(self, layer, in_shapes):
        s = in_shapes[0]
        if layer.param_msg("prelu_param").channel_shared:
            return [(1,)]
        if len(s) < 2:
            raise ShapeError(f"needs a channel axis, input shape {tuple(s)}")
        return [(s[1],)]

    def to_onnx(self, layer, ctx):
        """PRelu; the slope (C,) is shaped (C, 1, ...) to broadcast over channels."""
        if len(layer.blobs) != 1:
            raise NoLowering("needs its slope blob (give the caffemodel)")
        slope = np.asarray(layer.blobs[0], dtype=np.float32).reshape(-1)
        nd = len(ctx.in_shapes[0])
        if slope.size > 1:
            slope = slope.reshape((slope.size,) + (1,) * (nd - 2))
        ctx.node("PRelu", [ctx.bottom(0), ctx.const("slope", slope)], ctx.top(0))

    def to_torch(self, layer):
        import torch

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            a = blobs[0]
            a = a.reshape(-1)[0] if a.numel() == 1 else broadcast_from(a.reshape(-1), x.dim(), 1)
            return [torch.clamp(x, min=0) + a * torch.clamp(x, max=0)]
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        """Its slopes shrink with the channels (unless one is shared)."""
        per_channel = not layer.param_msg("prelu_param").channel_shared and layer.blobs
        return follow_channels(layer, block, [(0, 0, block)] if per_channel else ())


@register("Eltwise")
class EltwiseSpec(LayerSpec):
    """PROD / MAX / SUM (with coefficients) of its bottoms."""

    def infer(self, layer, in_shapes):
        ep = layer.param_msg("eltwise_param")
        if len(in_shapes) < 2:
            raise ShapeError(f"needs at least 2 bottoms, got {len(in_shapes)}")
        for s in in_shapes[1:]:
            if tuple(s) != tuple(in_shapes[0]):
                raise ShapeError(f"bottom shapes differ: {[tuple(x) for x in in_shapes]}")
        if len(ep.coeff) and len(ep.coeff) != len(in_shapes):
            raise ShapeError(f"{len(ep.coeff)} coeffs for {len(in_shapes)} bottoms")
        return [in_shapes[0]]

    def to_onnx(self, layer, ctx):
        """PROD: a Mul chain; MAX: Max; SUM: sum of coeff_i * x_i (Mul skipped for 1)."""
        ep = layer.param_msg("eltwise_param")
        op = ep.EltwiseOp.Name(ep.operation)
        xs = [ctx.bottom(i) for i in range(ctx.n_bottoms)]
        if op == "MAX":
            ctx.node("Max", xs, ctx.top(0))
            return
        if op == "SUM" and len(ep.coeff):
            xs = [x if float(c) == 1.0 else
                  ctx.node("Mul", [x, ctx.scalar(f"coeff{i}", float(c))], suffix=f"scaled{i}")
                  for i, (x, c) in enumerate(zip(xs, ep.coeff))]
        binop = "Mul" if op == "PROD" else "Add"
        if len(xs) == 1:
            ctx.node("Identity", xs, ctx.top(0))
            return
        acc = xs[0]
        for i, x in enumerate(xs[1:], start=1):
            last = i == len(xs) - 1
            acc = ctx.node(binop, [acc, x], ctx.top(0) if last else None, suffix=None if last else f"acc{i}")

    def to_torch(self, layer):
        import torch
        ep = layer.param_msg("eltwise_param")
        op = ep.EltwiseOp.Name(ep.operation)
        coeff = [float(c) for c in ep.coeff]

        def fn(bottoms, blobs, training):
            if op == "PROD":
                y = bottoms[0]
                for b in bottoms[1:]:
                    y = y * b
            elif op == "MAX":
                y = bottoms[0]
                for b in bottoms[1:]:
                    y = torch.maximum(y, b)
            else:
                cs = coeff or [1.0] * len(bottoms)
                y = bottoms[0] if cs[0] == 1.0 else bottoms[0] * cs[0]
                for b, c in zip(bottoms[1:], cs[1:]):
                    y = y + (b if c == 1.0 else b * c)
            return [y]
        return fn
