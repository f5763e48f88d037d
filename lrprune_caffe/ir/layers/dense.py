"""InnerProduct (fully connected), with Caffe's ``axis`` and ``transpose``."""

from __future__ import annotations

from .base import CannotShrink, ChannelShrink, LayerSpec, ShapeError, canon_axis, prod, register


def ip_dims(layer, in_shape):
    """(axis, M outer rows, K inputs, N outputs) of an InnerProduct layer."""
    ip = layer.param_msg("inner_product_param")
    axis = canon_axis(int(ip.axis), len(in_shape))
    if ip.num_output < 1:
        raise ShapeError(f"num_output must be >= 1, got {ip.num_output}")
    return axis, prod(in_shape[:axis]), prod(in_shape[axis:]), int(ip.num_output)


@register("InnerProduct")
class InnerProductSpec(LayerSpec):
    trainable = True
    torch_needs_blobs = True
    factorize_kind = "ip"
    prunable = True

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

    def to_torch(self, layer):
        """x flattened from ``axis`` to (M, K), times W^T (or W when ``transpose``), plus bias."""
        ip = layer.param_msg("inner_product_param")

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            axis = canon_axis(int(ip.axis), x.dim())
            lead = tuple(x.shape[:axis])
            x2 = x.reshape(prod(lead) if lead else 1, -1)
            w = blobs[0]
            y = x2 @ w if ip.transpose else x2 @ w.t()
            if ip.bias_term and len(blobs) > 1:
                y = y + blobs[1]
            return [y.reshape(*lead, y.shape[-1])]
        return fn

    # -- structured pruning --
    def removable_outputs(self, layer, in_shape):
        """Its rows of W (columns when ``transpose``) and biases, when its axis is 1."""
        axis, _, _, n = ip_dims(layer, in_shape)
        ip = layer.param_msg("inner_product_param")
        if axis != 1:
            raise CannotShrink(f"its axis is {axis}: its outputs are not channels (axis 1)")
        if len(layer.blobs) != (2 if ip.bias_term else 1):
            raise CannotShrink("its weights are not loaded")
        return n, 1 if ip.transpose else 0

    def num_output(self, layer):
        return int(layer.param_msg("inner_product_param").num_output)

    def set_num_output(self, layer, n):
        layer.param_msg("inner_product_param").num_output = int(n)

    def shrink_input(self, layer, shape, block, in_place):
        """Axis 1: its input columns, grouped per channel (channel ``c`` of a C x H x W bottom
        owns columns ``c*H*W ... (c+1)*H*W - 1``, Caffe's row-major flattening)."""
        if in_place:
            raise CannotShrink()
        axis, _, _, _ = ip_dims(layer, shape)
        if axis != 1:
            raise CannotShrink(f"its axis is {axis}, not 1")
        if not layer.blobs:
            raise CannotShrink("its weights are not loaded")
        per_channel = block * prod(shape[2:])
        transpose = layer.param_msg("inner_product_param").transpose
        return ChannelShrink(edits=((0, 0 if transpose else 1, per_channel),), consumes=True)
