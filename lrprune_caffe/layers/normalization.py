"""LRN, BatchNorm, Scale and Bias (and MVN): shape-preserving, per-channel blobs."""

from __future__ import annotations

from .base import LayerSpec, ShapeError, canon_axis, register


@register("LRN")
class LRNSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        if len(in_shapes[0]) != 4:
            raise ShapeError(f"expects a 4-D input, got shape {tuple(in_shapes[0])}")
        return [in_shapes[0]]


@register("MVN")
class MVNSpec(LayerSpec):
    pass


@register("BatchNorm")
class BatchNormSpec(LayerSpec):
    def weight_shapes(self, layer, in_shapes):
        c = in_shapes[0][1] if len(in_shapes[0]) > 1 else 1
        return [(c,), (c,), (1,)]


def scale_param_shape(layer, in_shapes, param_field):
    """Shape of Scale's / Bias's parameter blob: bottom.shape[axis : axis + num_axes]."""
    p = layer.p(param_field)
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
        if layer.p("scale_param").bias_term:
            if shape is None:
                return None
            shapes.append(shape)
        return shapes


@register("Bias")
class BiasSpec(LayerSpec):
    def weight_shapes(self, layer, in_shapes):
        shape = scale_param_shape(layer, in_shapes, "bias_param")
        return [] if shape is None else [shape]
