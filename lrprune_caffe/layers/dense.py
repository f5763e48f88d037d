"""InnerProduct (fully connected), with Caffe's ``axis`` and ``transpose``."""

from __future__ import annotations

from .base import LayerSpec, ShapeError, canon_axis, prod, register


def ip_dims(layer, in_shape):
    """(axis, M outer rows, K inputs, N outputs) of an InnerProduct layer."""
    ip = layer.p("inner_product_param")
    axis = canon_axis(int(ip.axis), len(in_shape))
    if ip.num_output < 1:
        raise ShapeError(f"num_output must be >= 1, got {ip.num_output}")
    return axis, prod(in_shape[:axis]), prod(in_shape[axis:]), int(ip.num_output)


@register("InnerProduct")
class InnerProductSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        axis, _, _, n = ip_dims(layer, s)
        return [(*s[:axis], n)]

    def weight_shapes(self, layer, in_shapes):
        ip = layer.p("inner_product_param")
        _, _, k, n = ip_dims(layer, in_shapes[0])
        shapes = [(k, n) if ip.transpose else (n, k)]
        if ip.bias_term:
            shapes.append((n,))
        return shapes

    def macs(self, layer, in_shapes, out_shapes):
        _, m, k, n = ip_dims(layer, in_shapes[0])
        return m * k * n
