"""Convolution and Deconvolution: geometry, shapes, weights, MACs."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CannotShrink, ChannelShrink, LayerSpec, ShapeError, no_torch, prod, register


@dataclass(frozen=True)
class ConvGeometry:
    """Per spatial axis kernel / stride / pad / dilation of a conv layer."""

    num_output: int
    group: int
    bias: bool
    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple
    axis: int = 1

    @property
    def extent(self) -> tuple:
        """Effective kernel size with dilation: d*(k-1)+1."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))


def _per_axis(repeated, h, w, has_hw, n, default, what, layer):
    if has_hw:
        if n != 2:
            raise ShapeError(f"{what}_h/{what}_w need 2 spatial axes, the input has {n}")
        return (int(h), int(w))
    vals = [int(v) for v in repeated]
    if not vals:
        return (default,) * n
    if len(vals) == 1:
        return (vals[0],) * n
    if len(vals) != n:
        raise ShapeError(f"{what} has {len(vals)} values for {n} spatial axes")
    return tuple(vals)


def conv_geometry(layer, num_spatial: int = 2) -> ConvGeometry:
    cp = layer.param_msg("convolution_param")
    has_kh = cp.HasField("kernel_h") or cp.HasField("kernel_w")
    if not has_kh and len(cp.kernel_size) == 0:
        raise ShapeError("convolution_param has no kernel_size (nor kernel_h/kernel_w)")
    kernel = _per_axis(cp.kernel_size, cp.kernel_h, cp.kernel_w, has_kh, num_spatial, 1, "kernel", layer)
    stride = _per_axis(cp.stride, cp.stride_h, cp.stride_w,
                       cp.HasField("stride_h") or cp.HasField("stride_w"), num_spatial, 1, "stride", layer)
    pad = _per_axis(cp.pad, cp.pad_h, cp.pad_w,
                    cp.HasField("pad_h") or cp.HasField("pad_w"), num_spatial, 0, "pad", layer)
    dilation = _per_axis(cp.dilation, 0, 0, False, num_spatial, 1, "dilation", layer)
    for name, vals, lo in (("kernel", kernel, 1), ("stride", stride, 1), ("dilation", dilation, 1), ("pad", pad, 0)):
        if any(v < lo for v in vals):
            raise ShapeError(f"{name} {vals} must be >= {lo}")
    if cp.num_output < 1:
        raise ShapeError(f"num_output must be >= 1, got {cp.num_output}")
    if cp.group < 1:
        raise ShapeError(f"group must be >= 1, got {cp.group}")
    return ConvGeometry(int(cp.num_output), int(cp.group), bool(cp.bias_term), kernel, stride, pad,
                        dilation, int(cp.axis))


def set_conv_geometry(cp, kernel, stride, pad, dilation):
    """Write 2-D geometry into a ConvolutionParameter in Caffe's plainest form."""
    for f in ("kernel_size", "stride", "pad", "dilation"):
        cp.ClearField(f)
    for f in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"):
        cp.ClearField(f)
    if kernel[0] == kernel[1]:
        cp.kernel_size.append(kernel[0])
    else:
        cp.kernel_h, cp.kernel_w = kernel
    if stride != (1, 1):
        if stride[0] == stride[1]:
            cp.stride.append(stride[0])
        else:
            cp.stride_h, cp.stride_w = stride
    if pad != (0, 0):
        if pad[0] == pad[1]:
            cp.pad.append(pad[0])
        else:
            cp.pad_h, cp.pad_w = pad
    if dilation != (1, 1):
        cp.dilation.extend(dilation if dilation[0] != dilation[1] else dilation[:1])


def _check_input(in_shape, g: ConvGeometry):
    if len(in_shape) < 3:
        raise ShapeError(f"expects an N x C x spatial input, got shape {in_shape}")
    c = in_shape[1]
    if c % g.group:
        raise ShapeError(f"input channels {c} are not divisible by group {g.group}")
    if g.num_output % g.group:
        raise ShapeError(f"num_output {g.num_output} is not divisible by group {g.group}")


@register("Convolution")
class ConvolutionSpec(LayerSpec):
    trainable = True
    torch_needs_blobs = True
    factorize_kind = "conv"
    prunable = True
    #: the torch functions per number of spatial axes
    torch_funcs = ("conv1d", "conv2d", "conv3d")
    #: the axis of blob 0 indexed by input channel
    input_axis = 1

    def geometry(self, layer, in_shape):
        return conv_geometry(layer, len(in_shape) - 2)

    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        g = self.geometry(layer, s)
        _check_input(s, g)
        spatial = []
        for i, (n, k, st, p) in enumerate(zip(s[2:], g.extent, g.stride, g.pad)):
            out = (n + 2 * p - k) // st + 1
            if n + 2 * p < k or out < 1:
                raise ShapeError(
                    f"kernel {'x'.join(map(str, g.extent))} (with dilation) is larger than the padded input "
                    f"{'x'.join(str(d + 2 * q) for d, q in zip(s[2:], g.pad))} (input {tuple(s)})")
            spatial.append(out)
        return [(s[0], g.num_output, *spatial)] * len(layer.tops)

    def weight_shapes(self, layer, in_shapes):
        g = self.geometry(layer, in_shapes[0])
        shapes = [(g.num_output, in_shapes[0][1] // g.group, *g.kernel)]
        if g.bias:
            shapes.append((g.num_output,))
        return shapes

    def macs(self, layer, in_shapes, out_shapes):
        g = self.geometry(layer, in_shapes[0])
        return prod(out_shapes[0]) * (in_shapes[0][1] // g.group) * prod(g.kernel) * max(1, len(layer.bottoms))

    #: the ONNX op this type lowers to
    onnx_op = "Conv"

    def to_onnx(self, layer, ctx):
        """Conv / ConvTranspose: Caffe's weight layout is ONNX's ((N, C/g, k...) for Conv,
        (C, N/g, k...) for ConvTranspose); symmetric pads, group, dilation. Caffe applies
        the same weights to every bottom, giving one top each."""
        from .base import NoLowering
        g = self.geometry(layer, ctx.in_shapes[0])
        if g.axis != 1:
            raise NoLowering(f"convolution over axis {g.axis} (ONNX convolves axis 1)")
        if len(layer.blobs) != (2 if g.bias else 1):
            raise NoLowering(f"needs its {'weights and bias' if g.bias else 'weights'} "
                             f"(got {len(layer.blobs)} blobs; give the caffemodel)")
        params = [ctx.const("weight", layer.blobs[0])]
        if g.bias:
            params.append(ctx.const("bias", layer.blobs[1]))
        for i in range(len(layer.bottoms)):
            ctx.node(self.onnx_op, [ctx.bottom(i), *params], ctx.top(i), suffix=None if i == 0 else f"bottom{i}",
                     kernel_shape=list(g.kernel), strides=list(g.stride), pads=list(g.pad) * 2,
                     dilations=list(g.dilation), group=g.group)

    def to_torch(self, layer):
        """F.conv{n}d / F.conv_transpose{n}d (same weight layouts as Caffe's), 1 to 3 spatial axes."""
        import torch.nn.functional as F
        g0 = conv_geometry(layer, 2)  # validates the parameters early
        if layer.param_msg("convolution_param").axis != 1:
            raise no_torch(layer, " with axis != 1")
        funcs = {i + 1: getattr(F, name) for i, name in enumerate(self.torch_funcs)}
        cache = {2: g0}

        def fn(bottoms, blobs, training):
            outs = []
            for x in bottoms:
                nsp = x.dim() - 2
                if nsp not in funcs:
                    raise no_torch(layer, f" on a {x.dim()}-D input")
                g = cache.get(nsp) or cache.setdefault(nsp, conv_geometry(layer, nsp))
                b = blobs[1] if g.bias and len(blobs) > 1 else None
                outs.append(funcs[nsp](x, blobs[0], b, stride=g.stride, padding=g.pad, dilation=g.dilation,
                                       groups=g.group))
            return outs
        return fn

    # -- structured pruning --
    def removable_outputs(self, layer, in_shape):
        """Its filters (blob 0 axis 0) and biases, when it is ungrouped over axis 1."""
        g = conv_geometry(layer, len(in_shape) - 2)
        if g.group != 1:
            raise CannotShrink(f"it is a grouped convolution (group {g.group})")
        if g.axis != 1:
            raise CannotShrink(f"it convolves axis {g.axis}, not 1")
        if len(layer.blobs) != (2 if g.bias else 1):
            raise CannotShrink("its weights are not loaded")
        return g.num_output, 0

    def num_output(self, layer):
        return int(layer.param_msg("convolution_param").num_output)

    def set_num_output(self, layer, n):
        layer.param_msg("convolution_param").num_output = int(n)

    def shrink_input(self, layer, shape, block, in_place):
        """Ungrouped: the kept channels of blob 0 along its input axis; the path ends here."""
        if in_place:
            raise CannotShrink()
        g = conv_geometry(layer, len(shape) - 2)
        if g.group != 1:
            raise CannotShrink(f"it is a grouped{' (depthwise)' if g.group == shape[1] else ''} "
                               f"convolution, group {g.group}")
        if g.axis != 1 or block != 1:
            raise CannotShrink("it does not convolve the channel axis")
        if not layer.blobs:
            raise CannotShrink("its weights are not loaded")
        return ChannelShrink(edits=((0, self.input_axis, 1),), consumes=True)


@register("Deconvolution")
class DeconvolutionSpec(ConvolutionSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        g = self.geometry(layer, s)
        _check_input(s, g)
        spatial = [st * (n - 1) + k - 2 * p for n, k, st, p in zip(s[2:], g.extent, g.stride, g.pad)]
        if any(d < 1 for d in spatial):
            raise ShapeError(f"output spatial size {spatial} is not positive")
        return [(s[0], g.num_output, *spatial)] * len(layer.tops)

    def weight_shapes(self, layer, in_shapes):
        g = self.geometry(layer, in_shapes[0])
        shapes = [(in_shapes[0][1], g.num_output // g.group, *g.kernel)]
        if g.bias:
            shapes.append((g.num_output,))
        return shapes

    def macs(self, layer, in_shapes, out_shapes):
        g = self.geometry(layer, in_shapes[0])
        return prod(in_shapes[0]) * (g.num_output // g.group) * prod(g.kernel)

    onnx_op = "ConvTranspose"
    factorize_kind = None
    torch_funcs = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
    input_axis = 0

    #: its outputs are not removed (only its inputs shrink)
    removable_outputs = LayerSpec.removable_outputs
    num_output = LayerSpec.num_output
    set_num_output = LayerSpec.set_num_output
