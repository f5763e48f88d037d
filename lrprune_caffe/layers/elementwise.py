"""Element-wise activations and Dropout: output shape = input shape."""

from __future__ import annotations

import numpy as np

from .base import LayerSpec, ShapeError, register


@register("ReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold",
          "Dropout", "ELU", "Clip", "Swish", "ReLU6", "HardSigmoid", "Silence")
class ElementwiseSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        return [in_shapes[0]] * len(layer.tops)

    def to_onnx(self, layer, ctx):
        """ReLU (LeakyRelu with negative_slope), Sigmoid, TanH, AbsVal, ELU (alpha),
        Power ((shift + scale*x)^power, trivial steps skipped), Dropout (removed: the
        identity at test time, its top is its bottom's value), Silence (nothing)."""
        from .base import NoLowering
        t = layer.type
        if t == "Silence":
            return
        x, y = ctx.bottom(0), ctx.top(0)
        if t == "ReLU":
            slope = float(layer.p("relu_param").negative_slope)
            if slope:
                ctx.node("LeakyRelu", [x], y, alpha=slope)
            else:
                ctx.node("Relu", [x], y)
        elif t in ("Sigmoid", "TanH", "AbsVal"):
            ctx.node({"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs"}[t], [x], y)
        elif t == "ELU":
            ctx.node("Elu", [x], y, alpha=float(layer.p("elu_param").alpha))
        elif t == "Power":
            pp = layer.p("power_param")
            power, scale, shift = float(pp.power), float(pp.scale), float(pp.shift)
            steps = []
            if scale != 1.0:
                steps.append(("Mul", "scale", scale, "scaled"))
            if shift != 0.0:
                steps.append(("Add", "shift", shift, "shifted"))
            if power != 1.0:
                steps.append(("Pow", "power", power, "pow"))
            if not steps:
                ctx.node("Identity", [x], y)
            for i, (op, what, value, step) in enumerate(steps):
                last = i == len(steps) - 1
                x = ctx.node(op, [x, ctx.scalar(what, value)], y if last else None,
                             suffix=None if last else step)
        elif t == "Dropout":
            ctx.alias(0, x)
        else:
            raise NoLowering(f"no ONNX lowering for layer type '{t}'")


@register("PReLU")
class PReLUSpec(ElementwiseSpec):
    def weight_shapes(self, layer, in_shapes):
        s = in_shapes[0]
        if layer.p("prelu_param").channel_shared:
            return [(1,)]
        if len(s) < 2:
            raise ShapeError(f"needs a channel axis, input shape {tuple(s)}")
        return [(s[1],)]

    def to_onnx(self, layer, ctx):
        """PRelu; the slope (C,) is shaped (C, 1, ...) to broadcast over channels."""
        from .base import NoLowering
        if len(layer.blobs) != 1:
            raise NoLowering("needs its slope blob (give the caffemodel)")
        slope = np.asarray(layer.blobs[0], dtype=np.float32).reshape(-1)
        nd = len(ctx.in_shapes[0])
        if slope.size > 1:
            slope = slope.reshape((slope.size,) + (1,) * (nd - 2))
        ctx.node("PRelu", [ctx.bottom(0), ctx.const("slope", slope)], ctx.top(0))


@register("Eltwise")
class EltwiseSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        ep = layer.p("eltwise_param")
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
        ep = layer.p("eltwise_param")
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
