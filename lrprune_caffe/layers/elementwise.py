"""Element-wise activations and Dropout: output shape = input shape."""

from __future__ import annotations

from .base import LayerSpec, ShapeError, register


@register("ReLU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold",
          "Dropout", "ELU", "Clip", "Swish", "ReLU6", "HardSigmoid", "Silence")
class ElementwiseSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        return [in_shapes[0]] * len(layer.tops)


@register("PReLU")
class PReLUSpec(ElementwiseSpec):
    def weight_shapes(self, layer, in_shapes):
        s = in_shapes[0]
        if layer.p("prelu_param").channel_shared:
            return [(1,)]
        if len(s) < 2:
            raise ShapeError(f"needs a channel axis, input shape {tuple(s)}")
        return [(s[1],)]


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
