"""InnerProduct (fully connected), with Caffe's ``axis`` and ``transpose``."""

from __future__ import annotations

from .base import LayerSpec, ShapeError, canon_axis, prod, register


def ip_dims(layer, in_shape):
    """(axis, M outer rows, K inputs, N outputs) of an InnerProduct layer."""
    ip = layer.param_msg("inner_product_param")
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
        ip = layer.param_msg("inner_product_param")
        _, _, k, n = ip_dims(layer, in_shapes[0])
        shapes = [(k, n) if ip.transpose else (n, k)]
        if ip.bias_term:
            shapes.append((n,))
        return shapes

    def macs(self, layer, in_shapes, out_shapes):
        _, m, k, n = ip_dims(layer, in_shapes[0])
        return m * k * n

    def to_onnx(self, layer, ctx):
        """Flatten(axis) to (M, K), Gemm with W (N, K) (transB=1; ``transpose: true``
        stores (K, N): transB=0), then a Reshape to bottom.shape[:axis] + (N,) unless
        that is already (M, N)."""
        from .base import NoLowering
        ip = layer.param_msg("inner_product_param")
        s = ctx.in_shapes[0]
        axis, _, _, _ = ip_dims(layer, s)
        if len(layer.blobs) != (2 if ip.bias_term else 1):
            raise NoLowering(f"needs its weights{' and bias' if ip.bias_term else ''} "
                             f"(got {len(layer.blobs)} blobs; give the caffemodel)")
        x = ctx.bottom(0)
        if not (len(s) == 2 and axis == 1):
            x = ctx.node("Flatten", [x], suffix="flatten", axis=axis)
        ins = [x, ctx.const("weight", layer.blobs[0])]
        if ip.bias_term:
            ins.append(ctx.const("bias", layer.blobs[1]))
        if axis == 1:
            ctx.node("Gemm", ins, ctx.top(0), transB=0 if ip.transpose else 1)
        else:
            y = ctx.node("Gemm", ins, transB=0 if ip.transpose else 1)
            ctx.reshape(y, ctx.out_shapes[0], ctx.out_shapes2[0], out=ctx.top(0), suffix="unflatten")
