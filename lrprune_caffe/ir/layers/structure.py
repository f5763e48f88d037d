"""Layers that move data around: Input, Concat, Slice, Split, Flatten, Reshape, Crop, Softmax, ArgMax."""

from __future__ import annotations

from .base import CannotShrink, ChannelShrink, LayerSpec, ShapeError, canon_axis, prod, register


@register("Input")
class InputSpec(LayerSpec):
    min_bottoms = 0

    def infer(self, layer, in_shapes):
        ip = layer.param_msg("input_param")
        n = len(ip.shape)
        if n == 0:
            return [None] * len(layer.tops)  # Caffe allows it: shaped later by the caller
        if n not in (1, len(layer.tops)):
            raise ShapeError(f"{n} input shapes for {len(layer.tops)} tops")
        out = []
        for i in range(len(layer.tops)):
            dims = tuple(int(d) for d in ip.shape[i if n > 1 else 0].dim)
            if not dims or any(d <= 0 for d in dims):
                raise ShapeError(f"input shape {dims} must have positive dimensions")
            out.append(dims)
        return out


@register("Split")
class SplitSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        return [in_shapes[0]] * len(layer.tops)

    def to_onnx(self, layer, ctx):
        """One Identity per top."""
        for i in range(len(layer.tops)):
            ctx.node("Identity", [ctx.bottom(0)], ctx.top(i), suffix=None if i == 0 else f"top{i}")

    def to_torch(self, layer):
        def fn(bottoms, blobs, training):
            return [bottoms[0]] * len(layer.tops)
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        """Every branch carries the channels on."""
        if in_place:
            raise CannotShrink()
        return ChannelShrink(follow=tuple((top, block) for top in layer.tops))


@register("Softmax")
class SoftmaxSpec(LayerSpec):
    """``exp(x) / sum exp(x)`` over one axis."""

    #: the ONNX op (same name and ``axis`` semantics from opset 13)
    onnx_op = "Softmax"

    def infer(self, layer, in_shapes):
        canon_axis(int(layer.param_msg("softmax_param").axis), len(in_shapes[0]))
        return [in_shapes[0]]

    def to_onnx(self, layer, ctx):
        """Caffe normalizes over one axis. Opset >= 13 Softmax does too; before 13 it
        normalizes over all axes from ``axis`` on, so unless those after it are all 1
        the axis is moved last by a Transpose and back."""
        s = ctx.in_shapes[0]
        axis = canon_axis(int(layer.param_msg("softmax_param").axis), len(s))
        op = self.onnx_op
        x, y = ctx.bottom(0), ctx.top(0)
        if ctx.opset >= 13 or prod(s[axis + 1:]) == 1:
            ctx.node(op, [x], y, axis=axis)
            return
        perm = [i for i in range(len(s)) if i != axis] + [axis]
        inverse = [perm.index(i) for i in range(len(s))]
        t = ctx.node("Transpose", [x], suffix="to_last", perm=perm)
        t = ctx.node(op, [t], axis=len(s) - 1)
        ctx.node("Transpose", [t], y, suffix="from_last", perm=inverse)

    def torch_fn(self):
        import torch.nn.functional as F
        return F.softmax

    def to_torch(self, layer):
        f = self.torch_fn()

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            return [f(x, dim=canon_axis(int(layer.param_msg("softmax_param").axis), x.dim()))]
        return fn


@register("LogSoftmax")
class LogSoftmaxSpec(SoftmaxSpec):
    """``log(softmax(x))`` over one axis."""

    onnx_op = "LogSoftmax"

    def torch_fn(self):
        import torch.nn.functional as F
        return F.log_softmax


def _concat_axis(layer):
    cp = layer.param_msg("concat_param")
    return int(cp.concat_dim) if cp.HasField("concat_dim") else int(cp.axis)


@register("Concat")
class ConcatSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s0 = in_shapes[0]
        axis = canon_axis(_concat_axis(layer), len(s0))
        total = 0
        for s in in_shapes:
            if len(s) != len(s0) or any(a != b for i, (a, b) in enumerate(zip(s, s0)) if i != axis):
                raise ShapeError(f"bottom shapes {[tuple(x) for x in in_shapes]} differ off axis {axis}")
            total += s[axis]
        out = list(s0)
        out[axis] = total
        return [tuple(out)]

    def to_onnx(self, layer, ctx):
        xs = [ctx.bottom(i) for i in range(ctx.n_bottoms)]
        if len(xs) == 1:
            ctx.node("Identity", xs, ctx.top(0))
            return
        ctx.node("Concat", xs, ctx.top(0), axis=canon_axis(_concat_axis(layer), len(ctx.in_shapes[0])))

    def to_torch(self, layer):
        import torch

        def fn(bottoms, blobs, training):
            return [torch.cat(bottoms, dim=canon_axis(_concat_axis(layer), bottoms[0].dim()))]
        return fn


def slice_sizes(layer, in_shape):
    sp = layer.param_msg("slice_param")
    axis = canon_axis(int(sp.slice_dim) if sp.HasField("slice_dim") else int(sp.axis), len(in_shape))
    n, k = in_shape[axis], len(layer.tops)
    points = [int(p) for p in sp.slice_point]
    if points:
        if len(points) != k - 1:
            raise ShapeError(f"{len(points)} slice points for {k} tops (need {k - 1})")
        edges = [0, *points, n]
        sizes = [b - a for a, b in zip(edges, edges[1:])]
        if any(s <= 0 for s in sizes):
            raise ShapeError(f"slice points {points} do not split axis {axis} of size {n}")
    else:
        if n % k:
            raise ShapeError(f"axis {axis} of size {n} does not split evenly into {k} tops")
        sizes = [n // k] * k
    return axis, sizes


@register("Slice")
class SliceSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        axis, sizes = slice_sizes(layer, s)
        return [tuple(s[:axis]) + (n,) + tuple(s[axis + 1:]) for n in sizes]

    def to_onnx(self, layer, ctx):
        """Split with explicit sizes (an input from opset 13, an attribute before)."""
        axis, sizes = slice_sizes(layer, ctx.in_shapes[0])
        if ctx.in_shapes[0][axis] != ctx.in_shapes2[0][axis]:
            raise ShapeError(f"slicing axis {axis}, which follows the batch, cannot be exported "
                             f"with a dynamic batch")
        outs = [ctx.top(i) for i in range(len(layer.tops))]
        if len(outs) == 1:
            ctx.node("Identity", [ctx.bottom(0)], outs[0])
        elif ctx.opset >= 13:
            ctx.node("Split", [ctx.bottom(0), ctx.ints("split", sizes)], outs, axis=axis)
        else:
            ctx.node("Split", [ctx.bottom(0)], outs, axis=axis, split=list(sizes))

    def to_torch(self, layer):
        import torch

        def fn(bottoms, blobs, training):
            x = bottoms[0]
            axis, sizes = slice_sizes(layer, tuple(int(d) for d in x.shape))
            return list(torch.split(x, sizes, dim=axis))
        return fn


@register("Flatten")
class FlattenSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        fp = layer.param_msg("flatten_param")
        a = canon_axis(int(fp.axis), len(s))
        e = canon_axis(int(fp.end_axis), len(s))
        return [tuple(s[:a]) + (prod(s[a:e + 1]),) + tuple(s[e + 1:])]

    def to_onnx(self, layer, ctx):
        """ONNX Flatten when Caffe's is (N, rest) (axis 1 to the end), else a Reshape."""
        s = ctx.in_shapes[0]
        fp = layer.param_msg("flatten_param")
        a, e = canon_axis(int(fp.axis), len(s)), canon_axis(int(fp.end_axis), len(s))
        if a == 1 and e == len(s) - 1:
            ctx.node("Flatten", [ctx.bottom(0)], ctx.top(0), axis=1)
        else:
            ctx.reshape(ctx.bottom(0), ctx.out_shapes[0], ctx.out_shapes2[0], out=ctx.top(0))

    def to_torch(self, layer):
        def fn(bottoms, blobs, training):
            x = bottoms[0]
            return [x.reshape(self.infer(layer, [tuple(int(d) for d in x.shape)])[0])]
        return fn

    def shrink_input(self, layer, shape, block, in_place):
        """Axis 1 to the end: channel ``c`` becomes a block of ``H*W`` features."""
        if in_place:
            raise CannotShrink()
        fp = layer.param_msg("flatten_param")
        nd = len(shape)
        a, e = int(fp.axis) % nd, int(fp.end_axis) % nd
        if a != 1 or e != nd - 1:
            raise CannotShrink(f"it flattens axes {fp.axis}..{fp.end_axis}, not 1 to the end")
        return ChannelShrink(follow=((layer.tops[0], block * prod(shape[2:])),))


def reshape_target(layer, in_shape):
    """Caffe's Reshape: ``0`` copies the bottom's dim, ``-1`` is inferred."""
    rp = layer.param_msg("reshape_param")
    dims = [int(d) for d in rp.shape.dim]
    nd = len(in_shape)
    axis = int(rp.axis)
    start = axis + nd + 1 if axis < 0 else axis
    if not 0 <= start <= nd:
        raise ShapeError(f"reshape axis {axis} is out of range for a {nd}-D input")
    num_axes = int(rp.num_axes)
    end = nd if num_axes == -1 else start + num_axes
    if num_axes < -1 or end > nd:
        raise ShapeError(f"reshape num_axes {num_axes} does not fit a {nd}-D input")
    new = []
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= nd:
                raise ShapeError(f"dim 0 at position {i} copies a missing input axis")
            new.append(int(in_shape[start + i]))
        else:
            new.append(d)
    if sum(1 for d in new if d == -1) > 1:
        raise ShapeError("at most one -1 is allowed in reshape_param.shape")
    if any(d < -1 for d in new):
        raise ShapeError(f"reshape dims {dims} must be >= -1")
    out = list(in_shape[:start]) + new + list(in_shape[end:])
    total = prod(in_shape)
    if -1 in out:
        known = prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise ShapeError(f"cannot reshape {tuple(in_shape)} to {dims}")
        out[out.index(-1)] = total // known
    if prod(out) != total:
        raise ShapeError(f"cannot reshape {tuple(in_shape)} ({total} values) to {tuple(out)}")
    return tuple(out)


@register("Reshape")
class ReshapeSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        return [reshape_target(layer, in_shapes[0])]

    def to_onnx(self, layer, ctx):
        """Reshape to the inferred shape (Caffe's 0 / -1 / axis / num_axes resolved)."""
        ctx.reshape(ctx.bottom(0), ctx.out_shapes[0], ctx.out_shapes2[0], out=ctx.top(0))

    def to_torch(self, layer):
        def fn(bottoms, blobs, training):
            x = bottoms[0]
            return [x.reshape(reshape_target(layer, tuple(int(d) for d in x.shape)))]
        return fn


@register("Crop")
class CropSpec(LayerSpec):
    min_bottoms = 2

    def infer(self, layer, in_shapes):
        if len(in_shapes) != 2:
            raise ShapeError(f"needs 2 bottoms, got {len(in_shapes)}")
        a, b = in_shapes
        cp = layer.param_msg("crop_param")
        axis = canon_axis(int(cp.axis), len(a))
        offs = [int(o) for o in cp.offset]
        if offs and len(offs) not in (1, len(a) - axis):
            raise ShapeError(f"{len(offs)} offsets for {len(a) - axis} cropped axes")
        out = list(a)
        for i in range(axis, len(a)):
            o = offs[0] if len(offs) == 1 else (offs[i - axis] if offs else 0)
            if b[i] + o > a[i]:
                raise ShapeError(f"crop of axis {i} to {b[i]} at offset {o} exceeds the input size {a[i]}")
            out[i] = b[i]
        return [tuple(out)]

    def to_onnx(self, layer, ctx):
        """Slice bottom 0 to bottom 1's size on the axes from ``axis``, at the offsets."""
        a, b = ctx.in_shapes
        a2, b2 = ctx.in_shapes2
        cp = layer.param_msg("crop_param")
        axis = canon_axis(int(cp.axis), len(a))
        offs = [int(o) for o in cp.offset]
        axes, starts, ends = [], [], []
        for i in range(axis, len(a)):
            o = offs[0] if len(offs) == 1 else (offs[i - axis] if offs else 0)
            if o == 0 and a[i] == b[i] and a2[i] == b2[i]:
                continue  # nothing to crop on this axis
            if a[i] != a2[i] or b[i] != b2[i]:
                raise ShapeError(f"cropping axis {i}, which follows the batch, cannot be exported "
                                 f"with a dynamic batch")
            axes.append(i)
            starts.append(o)
            ends.append(o + b[i])
        if not axes:
            ctx.node("Identity", [ctx.bottom(0)], ctx.top(0))
            return
        ctx.node("Slice", [ctx.bottom(0), ctx.ints("starts", starts), ctx.ints("ends", ends),
                           ctx.ints("axes", axes)], ctx.top(0))

    def to_torch(self, layer):
        cp = layer.param_msg("crop_param")

        def fn(bottoms, blobs, training):
            a, b = bottoms
            axis = canon_axis(int(cp.axis), a.dim())
            offs = [int(o) for o in cp.offset]
            idx = [slice(None)] * a.dim()
            for i in range(axis, a.dim()):
                o = offs[0] if len(offs) == 1 else (offs[i - axis] if offs else 0)
                idx[i] = slice(o, o + int(b.shape[i]))
            return [a[tuple(idx)]]
        return fn


@register("ArgMax")
class ArgMaxSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        ap = layer.param_msg("argmax_param")
        k = int(ap.top_k)
        if ap.HasField("axis"):
            axis = canon_axis(int(ap.axis), len(s))
            out = list(s)
            out[axis] = k
            return [tuple(out)]
        return [(s[0], 2 if ap.out_max_val else 1, k)]
