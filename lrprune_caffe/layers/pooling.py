"""Pooling with Caffe's ceil rounding (and its clip of the last window)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import LayerSpec, ShapeError, register


@dataclass(frozen=True)
class PoolGeometry:
    method: str  # "MAX", "AVE" or "STOCHASTIC"
    kernel: tuple
    stride: tuple
    pad: tuple
    out: tuple  # output spatial size
    global_pooling: bool
    ceil: bool


def pool_geometry(layer, in_shape) -> PoolGeometry:
    pp = layer.p("pooling_param")
    if len(in_shape) != 4:
        raise ShapeError(f"expects a 4-D input, got shape {tuple(in_shape)}")
    h, w = in_shape[2], in_shape[3]
    if pp.global_pooling:
        kernel = (h, w)
        if pp.HasField("kernel_size") or pp.HasField("kernel_h"):
            raise ShapeError("global_pooling cannot be combined with a kernel size")
    elif pp.HasField("kernel_h") or pp.HasField("kernel_w"):
        kernel = (int(pp.kernel_h), int(pp.kernel_w))
    elif pp.HasField("kernel_size"):
        kernel = (int(pp.kernel_size),) * 2
    else:
        raise ShapeError("pooling_param has no kernel_size (nor kernel_h/kernel_w, nor global_pooling)")
    pad = (int(pp.pad_h), int(pp.pad_w)) if (pp.HasField("pad_h") or pp.HasField("pad_w")) else (int(pp.pad),) * 2
    stride = ((int(pp.stride_h), int(pp.stride_w)) if (pp.HasField("stride_h") or pp.HasField("stride_w"))
              else (int(pp.stride),) * 2)
    if pp.global_pooling:
        pad, stride = (0, 0), (1, 1)
    if min(kernel) < 1 or min(stride) < 1 or min(pad) < 0:
        raise ShapeError(f"kernel {kernel}, stride {stride}, pad {pad} are not valid")
    if any(p >= k for p, k in zip(pad, kernel)):
        raise ShapeError(f"pad {pad} must be smaller than kernel {kernel}")
    ceil = True
    if pp.DESCRIPTOR.fields_by_name.get("round_mode") is not None and pp.HasField("round_mode"):
        ceil = pp.round_mode == 0  # CEIL = 0, FLOOR = 1
    out = []
    for n, k, s, p in zip((h, w), kernel, stride, pad):
        if n + 2 * p < k:
            raise ShapeError(f"kernel {kernel[0]}x{kernel[1]} is larger than the padded input "
                             f"{h + 2 * pad[0]}x{w + 2 * pad[1]} (input {tuple(in_shape)})")
        o = (math.ceil if ceil else math.floor)((n + 2 * p - k) / s) + 1
        if p and (o - 1) * s >= n + p:
            o -= 1  # Caffe: the last window must start inside the image
        out.append(int(o))
    method = pp.PoolMethod.Name(pp.pool)
    return PoolGeometry(method, kernel, stride, pad, tuple(out), bool(pp.global_pooling), ceil)


@register("Pooling")
class PoolingSpec(LayerSpec):
    def infer(self, layer, in_shapes):
        s = in_shapes[0]
        g = pool_geometry(layer, s)
        shape = (s[0], s[1], *g.out)
        return [shape] * len(layer.tops)  # a second top (MAX mask) has the same shape
