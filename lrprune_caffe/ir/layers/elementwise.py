"""Element-wise activations and Dropout: output shape = input shape."""

from __future__ import annotations

import numpy as np

from .base import LayerSpec, ShapeError, register


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
    from .base import NoLowering
    if base == -1.0:
        return np.float32(1.0)
    if not base > 0:
        raise NoLowering(f"{field}.base must be strictly positive (or -1 for e), got {base:g}")
    return np.float32(np.log(np.float32(base)))


@register("ReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold",
          "Dropout", "ELU", "Clip", "Swish", "ReLU6", "HardSigmoid", "Silence")
class ElementwiseSpec(LayerSpec):
    #: HardSigmoid comes from forks; caffe.proto has no parameter message for it, so its
    #: slope and offset are not defined by any field we can read
    unlowered_types = {"HardSigmoid": "caffe.proto defines no parameters for it (its slope and "
                                      "offset come from forks)"}

    def infer(self, layer, in_shapes):
        return [in_shapes[0]] * len(layer.tops)

    def to_onnx(self, layer, ctx):
        """Caffe's formulas (BVLC ``src/caffe/layers/*_layer.cpp``, forward pass):

        * ReLU: LeakyRelu with negative_slope (Relu when 0); Sigmoid, TanH, AbsVal; ELU (alpha);
        * Power: ``(shift + scale*x)^power``, trivial steps skipped;
        * Exp: ``base^(shift + scale*x)`` (base -1: e) as exp_layer.cpp computes it,
          ``exp(ln(base)*scale * x) * base^shift``;
        * Log: ``log_base(shift + scale*x)`` as log_layer.cpp, ``ln(shift + scale*x) / ln(base)``;
        * BNLL: ``log(1 + exp(x))``, Softplus;
        * Threshold: ``x > threshold ? 1 : 0`` (strict), Greater then Cast;
        * Clip: ``max(min, min(x, max))``, ONNX Clip with min/max as inputs (opset >= 11);
          when min > max Caffe's result is ``min`` everywhere, so the upper bound becomes min;
        * Swish: ``x * sigmoid(beta*x)``;
        * ReLU6 (forks' relu6_layer.cpp): ``min(max(x, 0), 6)``, Clip(0, 6);
        * Dropout: removed (the identity at test time, its top is its bottom's value);
        * Silence: nothing.

        HardSigmoid is not lowered (see ``unlowered_types``).
        """
        from .base import NoLowering
        t = layer.type
        if t in self.unlowered_types:
            raise NoLowering(f"no ONNX lowering for layer type '{t}': {self.unlowered_types[t]}")
        if t == "Silence":
            return
        x, y = ctx.bottom(0), ctx.top(0)
        if t == "ReLU":
            slope = float(layer.param_msg("relu_param").negative_slope)
            if slope:
                ctx.node("LeakyRelu", [x], y, alpha=slope)
            else:
                ctx.node("Relu", [x], y)
        elif t in ("Sigmoid", "TanH", "AbsVal"):
            ctx.node({"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs"}[t], [x], y)
        elif t == "ELU":
            ctx.node("Elu", [x], y, alpha=float(layer.param_msg("elu_param").alpha))
        elif t == "Power":
            pp = layer.param_msg("power_param")
            power, scale, shift = float(pp.power), float(pp.scale), float(pp.shift)
            steps = []
            if scale != 1.0:
                steps.append(("Mul", "scale", scale, "scaled"))
            if shift != 0.0:
                steps.append(("Add", "shift", shift, "shifted"))
            if power != 1.0:
                steps.append(("Pow", "power", power, "pow"))
            _chain(ctx, x, y, steps)
        elif t == "Exp":
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
            _chain(ctx, x, y, steps)
        elif t == "Log":
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
            _chain(ctx, x, y, steps)
        elif t == "BNLL":
            ctx.node("Softplus", [x], y)
        elif t == "Threshold":
            th = float(layer.param_msg("threshold_param").threshold)
            above = ctx.node("Greater", [x, ctx.scalar("threshold", th)], suffix="above")
            ctx.node("Cast", [above], y, to=1)  # TensorProto.FLOAT
        elif t in ("Clip", "ReLU6"):
            if t == "ReLU6":
                lo, hi = 0.0, 6.0
            else:
                cp = layer.param_msg("clip_param")
                if not (layer.has("clip_param") and cp.HasField("min") and cp.HasField("max")):
                    raise NoLowering("clip_param needs both min and max (required fields in caffe.proto)")
                lo, hi = float(cp.min), float(cp.max)
                hi = max(lo, hi)  # min > max: Caffe's max(min, min(x, max)) is min everywhere
            ctx.node("Clip", [x, ctx.scalar("min", lo), ctx.scalar("max", hi)], y)
        elif t == "Swish":
            beta = float(layer.param_msg("swish_param").beta)
            z = x if beta == 1.0 else ctx.node("Mul", [x, ctx.scalar("beta", beta)], suffix="scaled")
            s = ctx.node("Sigmoid", [z], suffix="sigmoid")
            ctx.node("Mul", [x, s], y)
        elif t == "Dropout":
            ctx.alias(0, x)
        else:
            raise NoLowering(f"no ONNX lowering for layer type '{t}'")


@register("PReLU")
class PReLUSpec(ElementwiseSpec):
    def weight_shapes(self, layer, in_shapes):
        s = in_shapes[0]
        if layer.param_msg("prelu_param").channel_shared:
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
