"""Layers of the SSD fork (Wei Liu et al. 2016): Permute, Normalize, PriorBox, DetectionOutput.

Shapes follow the fork's Reshape(); the ONNX lowerings follow its Forward_cpu()
(weiliu89/caffe, branch ssd: ``normalize_layer.cpp``, ``prior_box_layer.cpp``,
``detection_output_layer.cpp``, ``util/bbox_util.cpp``). OpenCV 4.x's dnn
module implements the same layers and is the test oracle; where the two differ
we follow the fork and say so:

* PriorBox: the fork truncates ``min_size`` / ``max_size`` to int
  (``int min_size_ = min_sizes_[s]``) and honours ``img_size`` / ``img_h`` /
  ``img_w``; OpenCV keeps fractional sizes and always takes the image size
  from bottom 1. An unset ``clip`` is false in the fork, true in OpenCV.
* DetectionOutput: the fork lists detections by label, then by score within
  a label; OpenCV sorts them all by score. An unset ``confidence_threshold``
  lets every score through in the fork (-FLT_MAX), only scores > 0 in OpenCV.
  No detection at all is one row ``[i, -1, -1, -1, -1, -1, -1]`` per image in
  the fork. OpenCV decodes CORNER_SIZE as CORNER.

The DetectionOutput lowering lives in :mod:`.ssd_detection` (it is long).
"""

from __future__ import annotations

import numpy as np

from .base import LayerSpec, NoLowering, ShapeError, register


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


def reduce_sum(ctx, x, axes, suffix):
    """ReduceSum keeping dims: axes an input from opset 13, an attribute before."""
    if ctx.opset >= 13:
        return ctx.node("ReduceSum", [x, ctx.ints(f"{suffix}_axes", axes)], suffix=suffix, keepdims=1)
    return ctx.node("ReduceSum", [x], suffix=suffix, axes=list(axes), keepdims=1)


@register("Normalize")
class NormalizeSpec(LayerSpec):
    def weight_shapes(self, layer, in_shapes):
        np_ = layer.param_msg("norm_param")
        return [(1,)] if np_.channel_shared else [(in_shapes[0][1],)]

    def to_onnx(self, layer, ctx):
        """y = x / sqrt(sum x^2 + eps) * scale, the sum over C,H,W of each sample
        (across_spatial) or over C at each position; scale one value
        (channel_shared) or one per channel (blob 0)."""
        p = layer.param_msg("norm_param")
        s = ctx.in_shapes[0]
        if len(s) < 2:
            raise ShapeError(f"expects an input of at least 2 dims, got {tuple(s)}")
        if len(layer.blobs) != 1:
            raise NoLowering(f"needs its scale blob (got {len(layer.blobs)} blobs; give the caffemodel)")
        scale = np.asarray(layer.blobs[0], dtype=np.float32).reshape(-1)
        x = ctx.bottom(0)
        sq = ctx.node("Mul", [x, x], suffix="square")
        axes = list(range(1, len(s))) if p.across_spatial else [1]
        total = reduce_sum(ctx, sq, axes, "sum")
        total = ctx.node("Add", [total, ctx.scalar("eps", float(p.eps))], suffix="add_eps")
        norm = ctx.node("Sqrt", [total], suffix="norm")
        y = ctx.node("Div", [x, norm], suffix="normalized")
        if p.channel_shared:
            if scale.size != 1:
                raise ShapeError(f"channel_shared wants 1 scale, the blob has {scale.size}")
            k = ctx.scalar("scale", float(scale[0]))
        else:
            if scale.size != s[1]:
                raise ShapeError(f"{s[1]} channels, but the scale blob has {scale.size} values")
            k = ctx.const("scale", scale.reshape((1, -1) + (1,) * (len(s) - 2)))
        ctx.node("Mul", [y, k], ctx.top(0))


# ---- PriorBox ----------------------------------------------------------------------------------

def aspect_ratios(pp) -> list:
    """The fork's list: 1, then each new ratio (and 1/ratio with flip), duplicates within 1e-6 dropped."""
    ars = [1.0]
    for ar in pp.aspect_ratio:
        ar = float(np.float32(ar))
        if any(abs(ar - a) < 1e-6 for a in ars):
            continue
        ars.append(ar)
        if pp.flip:
            ars.append(float(np.float32(1.0 / ar)))
    return ars


def prior_count(layer) -> int:
    pp = layer.param_msg("prior_box_param")
    return len(aspect_ratios(pp)) * len(pp.min_size) + len(pp.max_size)


def _check_prior_params(pp):
    if not pp.min_size:
        raise ShapeError("must provide min_size")
    if any(m <= 0 for m in pp.min_size):
        raise ShapeError("min_size must be positive")
    if pp.max_size:
        if len(pp.max_size) != len(pp.min_size):
            raise ShapeError(f"{len(pp.max_size)} max_size for {len(pp.min_size)} min_size (need as many)")
        if any(mx <= mn for mn, mx in zip(pp.min_size, pp.max_size)):
            raise ShapeError("max_size must be greater than min_size")
    if len(pp.variance) not in (0, 1, 4):
        raise ShapeError(f"{len(pp.variance)} variances: give 1 or 4")
    if any(v <= 0 for v in pp.variance):
        raise ShapeError("variances must be positive")
    if (pp.HasField("img_h") or pp.HasField("img_w")) and pp.HasField("img_size"):
        raise ShapeError("either img_size or img_h/img_w, not both")
    if (pp.HasField("step_h") or pp.HasField("step_w")) and pp.HasField("step"):
        raise ShapeError("either step or step_h/step_w, not both")


def prior_boxes(pp, layer_hw, image_hw) -> np.ndarray:
    """PriorBox's output (1, 2, H*W*priors*4) for a feature map and image of those sizes.

    The fork's PriorBoxLayer::Forward_cpu: per cell (h, w) the centre
    ((w + offset) * step_w, (h + offset) * step_h); per min_size (truncated to
    int, as the fork does) a square of that side, a square of side
    sqrt(min * max) when max_size is given, then min * sqrt(ar) by
    min / sqrt(ar) for each aspect ratio other than 1; corners divided by the
    image size; clipped to [0, 1] with ``clip``. Channel 1 holds the variances.
    """
    _check_prior_params(pp)
    lh, lw = int(layer_hw[0]), int(layer_hw[1])
    if pp.HasField("img_h") or pp.HasField("img_w"):
        ih, iw = int(pp.img_h), int(pp.img_w)
        if ih <= 0 or iw <= 0:
            raise ShapeError("img_h and img_w must both be positive")
    elif pp.HasField("img_size"):
        ih = iw = int(pp.img_size)
        if ih <= 0:
            raise ShapeError("img_size must be positive")
    else:
        ih, iw = int(image_hw[0]), int(image_hw[1])
    f32 = np.float32
    if pp.HasField("step_h") or pp.HasField("step_w"):
        step_h, step_w = f32(pp.step_h), f32(pp.step_w)
        if step_h <= 0 or step_w <= 0:
            raise ShapeError("step_h and step_w must both be positive")
    elif pp.HasField("step"):
        step_h = step_w = f32(pp.step)
    else:
        step_h, step_w = f32(f32(ih) / f32(lh)), f32(f32(iw) / f32(lw))
    sides = []  # (width, height) of each prior at one cell, in the fork's order
    ars = aspect_ratios(pp)
    for s, mn in enumerate(pp.min_size):
        mn = int(mn)
        sides.append((mn, mn))
        if pp.max_size:
            side = np.sqrt(float(mn * int(pp.max_size[s])))
            sides.append((side, side))
        for ar in ars:
            if abs(ar - 1.0) < 1e-6:
                continue
            sides.append((mn * np.sqrt(ar), mn / np.sqrt(ar)))
    bw = np.array([f32(w) for w, _ in sides], dtype=np.float64)
    bh = np.array([f32(h) for _, h in sides], dtype=np.float64)
    offset = f32(pp.offset)
    cx = (np.arange(lw, dtype=np.float32) + offset) * step_w  # float, as the fork computes it
    cy = (np.arange(lh, dtype=np.float32) + offset) * step_h
    cx = cx.astype(np.float64)[None, :, None]
    cy = cy.astype(np.float64)[:, None, None]
    boxes = np.stack(np.broadcast_arrays((cx - bw / 2.0) / iw, (cy - bh / 2.0) / ih,
                                         (cx + bw / 2.0) / iw, (cy + bh / 2.0) / ih), axis=-1)
    coords = boxes.astype(np.float32).reshape(-1)
    if pp.clip:
        coords = np.clip(coords, 0.0, 1.0)
    var = [float(v) for v in pp.variance] or [0.1]
    variances = np.resize(np.asarray(var, dtype=np.float32), coords.size) if len(var) == 4 \
        else np.full(coords.size, var[0], dtype=np.float32)
    return np.stack([coords, variances])[None].astype(np.float32)


@register("PriorBox")
class PriorBoxSpec(LayerSpec):
    min_bottoms = 2

    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        if len(s) != 4:
            raise ShapeError(f"expects a 4-D feature map, got {tuple(s)}")
        return [(1, 2, s[2] * s[3] * prior_count(layer) * 4)]

    def to_onnx(self, layer, ctx):
        """A constant: the priors depend only on the feature map's and image's sizes."""
        feat, image = ctx.in_shapes[0], ctx.in_shapes[1]
        if len(image) != 4:
            raise ShapeError(f"expects a 4-D image as bottom 1, got {tuple(image)}")
        priors = prior_boxes(layer.param_msg("prior_box_param"), feat[2:], image[2:])
        ctx.alias(0, ctx.const("priors", priors))


@register("DetectionOutput")
class DetectionOutputSpec(LayerSpec):
    min_bottoms = 3

    def infer(self, layer, in_shapes):
        return [None]  # the number of detections is data-dependent

    def to_onnx(self, layer, ctx):
        from .ssd_detection import lower_detection_output
        lower_detection_output(layer, ctx)

