"""Layers of the SSD fork (Wei Liu et al. 2016): Permute, Normalize, PriorBox, DetectionOutput.

They parse and pass through unchanged; shapes follow the fork's Reshape().
"""

from __future__ import annotations

from .base import LayerSpec, ShapeError, register


@register("Permute")
class PermuteSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        order = [int(o) for o in layer.param_msg("permute_param").order]
        # the fork fills in the axes not named, in their original order
        full = list(order) + [i for i in range(len(s)) if i not in order]
        if sorted(full) != list(range(len(s))):
            raise ShapeError(f"permute order {order} is not a permutation of {len(s)} axes")
        return [tuple(s[i] for i in full)]

    def to_onnx(self, layer, ctx):
        """Transpose, the axes not named following in their order."""
        order = [int(o) for o in layer.param_msg("permute_param").order]
        full = list(order) + [i for i in range(len(ctx.in_shapes[0])) if i not in order]
        ctx.node("Transpose", [ctx.bottom(0)], ctx.top(0), perm=full)


@register("Normalize")
class NormalizeSpec(LayerSpec):
    def weight_shapes(self, layer, in_shapes):
        np_ = layer.param_msg("norm_param")
        return [(1,)] if np_.channel_shared else [(in_shapes[0][1],)]


def prior_count(layer) -> int:
    pp = layer.param_msg("prior_box_param")
    ars = [1.0]
    for ar in pp.aspect_ratio:
        if any(abs(ar - a) < 1e-6 for a in ars):
            continue
        ars.append(ar)
        if pp.flip:
            ars.append(1.0 / ar)
    return len(ars) * len(pp.min_size) + len(pp.max_size)


@register("PriorBox")
class PriorBoxSpec(LayerSpec):
    min_bottoms = 2

    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        if len(s) != 4:
            raise ShapeError(f"expects a 4-D feature map, got {tuple(s)}")
        return [(1, 2, s[2] * s[3] * prior_count(layer) * 4)]


@register("DetectionOutput")
class DetectionOutputSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        return [None]  # the number of detections is data-dependent
