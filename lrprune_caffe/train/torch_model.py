"""A ``torch.nn.Module`` built from our IR that computes what Caffe computes.

``build_torch_model(net)`` turns every layer into a small functional op (no
layer is re-derived from a torch ``nn`` module, so Caffe's own conventions are
explicit here). Weights become ``nn.Parameter`` objects, one per Caffe blob,
keyed ``"<layer>/<blob index>"`` (the key pruning masks use); BatchNorm's
statistics are buffers (Caffe itself forces their lr_mult to 0). Layers whose
ParamSpecs share a ``name`` share one Parameter, as in Caffe.

Caffe conventions reproduced (source: BVLC Caffe 1.0 ``src/caffe/layers``):

* Pooling (``pooling_layer.cpp``): output size with ceil rounding and the
  "last window starts inside the image" clip (from ``pool_geometry``); the
  input is padded explicitly (-inf for MAX, 0 for AVE, extra rows/columns on
  the bottom/right for ceil mode). AVE divides by the window clipped to the
  *padded* input, ``(min(start + k, H + pad) - start)`` per axis, not by the
  number of real pixels and not by ``k*k``.
* LRN (``lrn_layer.cpp``): ACROSS_CHANNELS ``x * (k + alpha/n * sum x^2)^-beta``
  over a zero-padded channel window starting at ``c - (n-1)/2``;
  WITHIN_CHANNEL ``x * (1 + alpha * AVEpool_n,pad=(n-1)/2(x^2))^-beta``
  (Caffe uses shift 1 there, not k, and its own AVE divisor).
* BatchNorm (``batch_norm_layer.cpp``): ``f = 0 if blob2 == 0 else 1/blob2``,
  ``(x - f*mean) / sqrt(f*var + eps)``. Statistics are frozen (global) in
  training and testing, unless the layer sets ``use_global_stats: false``,
  when the forward uses batch statistics (biased variance) and the stored
  statistics are left as they are.
* Scale/Bias with ``axis``/``num_axes`` and a second bottom; Eltwise SUM with
  coefficients / PROD / MAX; InnerProduct with ``axis`` and ``transpose``;
  Deconvolution weights ``(C_in, N/g, kh, kw)`` = torch's conv_transpose
  layout; Dropout is inverted dropout in training, identity in testing.
* In-place layers (top == bottom) rebind the blob name to a new tensor, so
  after a forward each blob name holds its final value, as Caffe's does.

The forward is float32 throughout; tests check it against blobs computed by
real Caffe within 1e-4 of the largest magnitude.
"""

from __future__ import annotations

import math

import numpy as np

from . import require_torch
from lrprune_caffe.errors import UserError, layer_error
from lrprune_caffe.ir.layers.base import canon_axis
from lrprune_caffe.ir.layers.conv import conv_geometry
from lrprune_caffe.ir.layers.pooling import pool_geometry
from lrprune_caffe.ir.layers.structure import FlattenSpec, reshape_target, slice_sizes, _concat_axis
from lrprune_caffe.schema.proto import pb

torch = require_torch()
nn = torch.nn
F = torch.nn.functional

#: layer types with trainable blobs
TRAINABLE = {"Convolution", "Deconvolution", "InnerProduct", "PReLU", "Scale", "Bias"}


def blob_key(layer_name: str, index: int) -> str:
    """The key of a layer's blob, as pruning masks name it: ``"<layer>/<blob idx>"``."""
    return f"{layer_name}/{index}"


def _unsupported(layer, why=""):
    return layer_error(UserError, layer, f"the PyTorch model does not support this layer type{why}")


# ---- Caffe pooling -----------------------------------------------------------

_DIV_CACHE: dict = {}


def _ave_divisor(n, k, s, p, out):
    """Caffe's AVE pool divisor along one axis: window clipped to the padded input."""
    starts = np.arange(out) * s - p
    ends = np.minimum(starts + k, n + p)
    return (ends - starts).astype(np.float32)


def caffe_pool2d(x, method, kernel, stride, pad, out):
    """Caffe's MAX / AVE pooling of a 4-D tensor to the given output size."""
    h, w = int(x.shape[2]), int(x.shape[3])
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, pad, out
    extra_h = max(0, (oh - 1) * sh + kh - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + kw - (w + 2 * pw))
    if method == "MAX":
        if ph or pw or extra_h or extra_w:
            x = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=-math.inf)
        y = F.max_pool2d(x, (kh, kw), (sh, sw))
        return y[:, :, :oh, :ow]
    # AVE: sum over the zero-padded window, divided by Caffe's clipped window size
    if ph or pw or extra_h or extra_w:
        x = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=0.0)
    y = F.avg_pool2d(x, (kh, kw), (sh, sw), divisor_override=1)[:, :, :oh, :ow]
    key = (h, w, kh, kw, sh, sw, ph, pw, oh, ow)
    div = _DIV_CACHE.get(key)
    if div is None:
        dh = _ave_divisor(h, kh, sh, ph, oh)
        dw = _ave_divisor(w, kw, sw, pw, ow)
        div = torch.from_numpy(np.outer(dh, dw).astype(np.float32)).reshape(1, 1, oh, ow)
        _DIV_CACHE[key] = div
    return y / div.to(y.device)


# ---- the ops ---------------------------------------------------------------
# Each op: fn(bottoms: list[Tensor], blobs: list[Tensor], training: bool) -> list[Tensor]


def _bcast(t, ndim, axis):
    """View a parameter of shape bottom.shape[axis:axis+k] for broadcasting over ``ndim`` axes."""
    shape = (1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim())
    return t.reshape(shape)


def _op_convolution(layer):
    g0 = conv_geometry(layer, 2)  # validates the parameters early
    if layer.param_msg("convolution_param").axis != 1:
        raise _unsupported(layer, " with axis != 1")
    deconv = layer.type == "Deconvolution"
    funcs = ({1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d} if deconv
             else {1: F.conv1d, 2: F.conv2d, 3: F.conv3d})
    cache = {2: g0}

    def fn(bottoms, blobs, training):
        outs = []
        for x in bottoms:
            nsp = x.dim() - 2
            if nsp not in funcs:
                raise _unsupported(layer, f" on a {x.dim()}-D input")
            g = cache.get(nsp) or cache.setdefault(nsp, conv_geometry(layer, nsp))
            w = blobs[0]
            b = blobs[1] if g.bias and len(blobs) > 1 else None
            if deconv:
                outs.append(funcs[nsp](x, w, b, stride=g.stride, padding=g.pad, groups=g.group,
                                       dilation=g.dilation))
            else:
                outs.append(funcs[nsp](x, w, b, stride=g.stride, padding=g.pad, dilation=g.dilation,
                                       groups=g.group))
        return outs
    return fn


def _op_pooling(layer):
    pp = layer.param_msg("pooling_param")
    if pp.pool == pb.PoolingParameter.STOCHASTIC:
        raise _unsupported(layer, " with pool: STOCHASTIC")
    if len(layer.tops) > 1:
        raise _unsupported(layer, " with a second (mask) top")
    cache = {}

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        shape = tuple(int(d) for d in x.shape)
        g = cache.get(shape[1:])
        if g is None:
            g = cache.setdefault(shape[1:], pool_geometry(layer, shape))
        return [caffe_pool2d(x, g.method, g.kernel, g.stride, g.pad, g.out)]
    return fn


def _op_inner_product(layer):
    ip = layer.param_msg("inner_product_param")

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        axis = canon_axis(int(ip.axis), x.dim())
        lead = tuple(x.shape[:axis])
        x2 = x.reshape(int(np.prod(lead)) if lead else 1, -1)
        w = blobs[0]
        y = x2 @ w if ip.transpose else x2 @ w.t()
        if ip.bias_term and len(blobs) > 1:
            y = y + blobs[1]
        return [y.reshape(*lead, y.shape[-1])]
    return fn


def _op_lrn(layer):
    lp = layer.param_msg("lrn_param")
    n, alpha, beta, k = int(lp.local_size), float(lp.alpha), float(lp.beta), float(lp.k)
    if n % 2 == 0:
        raise layer_error(UserError, layer, f"LRN local_size must be odd (Caffe requires it), got {n}")
    pre = (n - 1) // 2
    within = lp.norm_region == pb.LRNParameter.WITHIN_CHANNEL

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        sq = x * x
        if within:
            h, w = int(x.shape[2]), int(x.shape[3])
            oh = math.ceil((h + 2 * pre - n) / 1) + 1
            ow = math.ceil((w + 2 * pre - n) / 1) + 1
            avg = caffe_pool2d(sq, "AVE", (n, n), (1, 1), (pre, pre), (oh, ow))
            scale = 1.0 + alpha * avg
        else:
            padded = F.pad(sq, (0, 0, 0, 0, pre, n - pre - 1))
            win = F.avg_pool3d(padded.unsqueeze(1), (n, 1, 1), stride=1).squeeze(1)  # sum / n
            scale = k + alpha * win
        return [x * scale.pow(-beta)]
    return fn


def _op_batchnorm(layer):
    bp = layer.param_msg("batch_norm_param")
    eps = float(bp.eps)
    batch_stats = bp.HasField("use_global_stats") and not bp.use_global_stats

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        c = int(x.shape[1]) if x.dim() > 1 else 1
        view = (1, c) + (1,) * (x.dim() - 2)
        if batch_stats:
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        else:
            f = blobs[2].reshape(-1)[0]
            sf = torch.where(f == 0, torch.zeros_like(f), 1.0 / f)
            mean = (blobs[0] * sf).reshape(view)
            var = (blobs[1] * sf).reshape(view)
        return [(x - mean) / torch.sqrt(var + eps)]
    return fn


def _op_scale(layer):
    is_scale = layer.type == "Scale"
    sp = layer.param_msg("scale_param") if is_scale else layer.param_msg("bias_param")
    bias_term = is_scale and sp.bias_term

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        axis = canon_axis(int(sp.axis), x.dim()) if x.dim() else 0
        if len(bottoms) > 1:
            p = bottoms[1]
            rest = list(blobs)
        else:
            p, rest = blobs[0], list(blobs[1:])
        p = _bcast(p, x.dim(), axis) if p.dim() else p
        if not is_scale:
            return [x + p]
        y = x * p
        if bias_term and rest:
            b = rest[-1]
            y = y + (_bcast(b, x.dim(), axis) if b.dim() else b)
        return [y]
    return fn


def _op_eltwise(layer):
    ep = layer.param_msg("eltwise_param")
    op = ep.operation
    coeff = [float(c) for c in ep.coeff]

    def fn(bottoms, blobs, training):
        if op == pb.EltwiseParameter.PROD:
            y = bottoms[0]
            for b in bottoms[1:]:
                y = y * b
        elif op == pb.EltwiseParameter.MAX:
            y = bottoms[0]
            for b in bottoms[1:]:
                y = torch.maximum(y, b)
        else:
            cs = coeff or [1.0] * len(bottoms)
            y = bottoms[0] if cs[0] == 1.0 else bottoms[0] * cs[0]
            for b, c in zip(bottoms[1:], cs[1:]):
                y = y + (b if c == 1.0 else b * c)
        return [y]
    return fn


def _op_concat(layer):
    def fn(bottoms, blobs, training):
        return [torch.cat(bottoms, dim=canon_axis(_concat_axis(layer), bottoms[0].dim()))]
    return fn


def _op_slice(layer):
    def fn(bottoms, blobs, training):
        x = bottoms[0]
        axis, sizes = slice_sizes(layer, tuple(int(d) for d in x.shape))
        return list(torch.split(x, sizes, dim=axis))
    return fn


def _op_split(layer):
    def fn(bottoms, blobs, training):
        return [bottoms[0]] * len(layer.tops)
    return fn


def _op_flatten(layer):
    spec = FlattenSpec()

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        return [x.reshape(spec.infer(layer, [tuple(int(d) for d in x.shape)])[0])]
    return fn


def _op_reshape(layer):
    def fn(bottoms, blobs, training):
        x = bottoms[0]
        return [x.reshape(reshape_target(layer, tuple(int(d) for d in x.shape)))]
    return fn


def _op_softmax(layer):
    log = layer.type == "LogSoftmax"

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        axis = canon_axis(int(layer.param_msg("softmax_param").axis), x.dim())
        return [F.log_softmax(x, dim=axis) if log else F.softmax(x, dim=axis)]
    return fn


def _op_dropout(layer):
    ratio = float(layer.param_msg("dropout_param").dropout_ratio)

    def fn(bottoms, blobs, training):
        return [F.dropout(bottoms[0], p=ratio, training=training)]
    return fn


def _op_relu(layer):
    slope = float(layer.param_msg("relu_param").negative_slope)

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        return [F.relu(x) if slope == 0 else F.leaky_relu(x, slope)]
    return fn


def _op_prelu(layer):
    def fn(bottoms, blobs, training):
        x = bottoms[0]
        a = blobs[0]
        a = a.reshape(-1)[0] if a.numel() == 1 else _bcast(a.reshape(-1), x.dim(), 1)
        return [torch.clamp(x, min=0) + a * torch.clamp(x, max=0)]
    return fn


def _op_elu(layer):
    alpha = float(layer.param_msg("elu_param").alpha)

    def fn(bottoms, blobs, training):
        return [F.elu(bottoms[0], alpha=alpha)]
    return fn


def _simple(f):
    def make(layer):
        def fn(bottoms, blobs, training):
            return [f(bottoms[0])]
        return fn
    return make


def _op_power(layer):
    pp = layer.param_msg("power_param")
    power, scale, shift = float(pp.power), float(pp.scale), float(pp.shift)

    def fn(bottoms, blobs, training):
        x = bottoms[0]
        y = x if scale == 1.0 else x * scale
        if shift != 0.0:
            y = y + shift
        if power == 1.0:
            return [y]
        if power == 2.0:
            return [y * y]
        return [torch.pow(y, power)]
    return fn


def _op_exp(layer):
    ep = layer.param_msg("exp_param")
    base, scale, shift = float(ep.base), float(ep.scale), float(ep.shift)
    ln_base = 1.0 if base == -1 else math.log(base)

    def fn(bottoms, blobs, training):
        return [torch.exp((shift + scale * bottoms[0]) * ln_base)]
    return fn


def _op_log(layer):
    lp = layer.param_msg("log_param")
    base, scale, shift = float(lp.base), float(lp.scale), float(lp.shift)
    inv_ln_base = 1.0 if base == -1 else 1.0 / math.log(base)

    def fn(bottoms, blobs, training):
        return [torch.log(shift + scale * bottoms[0]) * inv_ln_base]
    return fn


def _op_threshold(layer):
    t = float(layer.param_msg("threshold_param").threshold)

    def fn(bottoms, blobs, training):
        return [(bottoms[0] > t).to(bottoms[0].dtype)]
    return fn


def _op_clip(layer):
    cp = layer.param_msg("clip_param")

    def fn(bottoms, blobs, training):
        return [torch.clamp(bottoms[0], min=float(cp.min), max=float(cp.max))]
    return fn


def _op_crop(layer):
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


def _op_silence(layer):
    def fn(bottoms, blobs, training):
        return []
    return fn


OPS = {
    "Convolution": _op_convolution, "Deconvolution": _op_convolution,
    "Pooling": _op_pooling, "InnerProduct": _op_inner_product, "LRN": _op_lrn,
    "BatchNorm": _op_batchnorm, "Scale": _op_scale, "Bias": _op_scale,
    "Eltwise": _op_eltwise, "Concat": _op_concat, "Slice": _op_slice, "Split": _op_split,
    "Flatten": _op_flatten, "Reshape": _op_reshape, "Softmax": _op_softmax, "LogSoftmax": _op_softmax,
    "Dropout": _op_dropout, "ReLU": _op_relu, "PReLU": _op_prelu, "ELU": _op_elu,
    "Sigmoid": _simple(torch.sigmoid), "TanH": _simple(torch.tanh), "AbsVal": _simple(torch.abs),
    "BNLL": _simple(F.softplus), "Power": _op_power, "Exp": _op_exp, "Log": _op_log,
    "Threshold": _op_threshold, "Clip": _op_clip, "Crop": _op_crop, "Silence": _op_silence,
}


def supported_types() -> list:
    return sorted(OPS) + ["Input"]


# ---- the module ------------------------------------------------------------

class _Op:
    __slots__ = ("layer", "fn", "blob_refs")

    def __init__(self, layer, fn, blob_refs):
        self.layer = layer
        self.fn = fn
        self.blob_refs = blob_refs  # list of ("p", index) / ("b", buffer name)


class CaffeTorchNet(nn.Module):
    """The net as a torch module. ``forward(inputs, outputs=None)`` -> {blob: tensor}.

    ``inputs`` is a tensor (single-input nets) or {input blob: tensor};
    ``outputs`` names the blobs to return (default: the net's outputs); the
    forward stops after the last layer any of them needs.

    ``self.keys[i]`` is the ``"<layer>/<blob idx>"`` key of ``self.params[i]``
    (a shared Parameter lists its first owner); ``self.blob_param`` maps every
    trainable blob key to its Parameter index.
    """

    def __init__(self, net):
        super().__init__()
        self.net_name = net.name
        self.input_names = net.inputs()
        self.default_outputs = net.outputs()
        self.params = nn.ParameterList()
        self.keys: list = []
        self.blob_param: dict = {}
        self.specs: dict = {}  # param index -> (lr_mult, decay_mult)
        self._ops: list = []
        self._producer: dict = {}  # blob -> index of the last op writing it
        shared: dict = {}
        for li, layer in enumerate(net.layers):
            if layer.type == "Input":
                continue
            make = OPS.get(layer.type)
            if make is None:
                raise _unsupported(layer)
            fn = make(layer)
            refs = []
            for bi, arr in enumerate(layer.blobs):
                t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
                key = blob_key(layer.name, bi)
                if layer.type in TRAINABLE:
                    spec = layer.msg.param[bi] if bi < len(layer.msg.param) else pb.ParamSpec()
                    if spec.name and spec.name in shared:
                        pi = shared[spec.name]
                        if tuple(self.params[pi].shape) != tuple(t.shape):
                            raise layer_error(UserError, layer,
                                              f"shares param '{spec.name}' but blob {bi} has shape "
                                              f"{tuple(t.shape)}, not {tuple(self.params[pi].shape)}")
                    else:
                        pi = len(self.params)
                        self.params.append(nn.Parameter(t, requires_grad=float(spec.lr_mult) != 0.0))
                        self.keys.append(key)
                        self.specs[pi] = (float(spec.lr_mult), float(spec.decay_mult))
                        if spec.name:
                            shared[spec.name] = pi
                    self.blob_param[key] = pi
                    refs.append(("p", pi))
                else:
                    bname = f"buf{li}_{bi}"
                    self.register_buffer(bname, t)
                    refs.append(("b", bname))
            if layer.type in {"Convolution", "Deconvolution", "InnerProduct", "PReLU"} and not layer.blobs:
                raise layer_error(UserError, layer, "has no weights (give a caffemodel, or initialize it)")
            op = _Op(layer, fn, refs)
            for t in layer.tops:
                self._producer[t] = len(self._ops)
            self._ops.append(op)

    # -- running --
    def _blobs_of(self, op):
        return [self.params[i] if kind == "p" else getattr(self, i) for kind, i in op.blob_refs]

    def forward(self, inputs, outputs=None, all_blobs=False):
        if not isinstance(inputs, dict):
            if len(self.input_names) != 1:
                raise UserError(f"the net has inputs {self.input_names}: pass a dict")
            inputs = {self.input_names[0]: inputs}
        env = dict(inputs)
        wanted = list(outputs or self.default_outputs)
        if all_blobs:
            last = len(self._ops) - 1
        else:
            missing = [o for o in wanted if o not in self._producer and o not in env]
            if missing:
                raise UserError(f"blob(s) {missing} are not produced by the net")
            last = max((self._producer[o] for o in wanted if o in self._producer), default=-1)
        for op in self._ops[: last + 1]:
            bottoms = [env[b] for b in op.layer.bottoms]
            tops = op.fn(bottoms, self._blobs_of(op), self.training)
            for name, t in zip(op.layer.tops, tops):
                env[name] = t
        if all_blobs:
            return env
        return {o: env[o] for o in wanted}

    # -- weights back to the IR --
    def named_blob_tensors(self):
        """(key, tensor) of every blob of every layer, trainable or not."""
        for op in self._ops:
            for bi, t in enumerate(self._blobs_of(op)):
                yield blob_key(op.layer.name, bi), t

    def write_back(self, net):
        """Copy the (trained) blobs into ``net``'s layers as float32 arrays of their shapes."""
        by_key = {k: t for k, t in self.named_blob_tensors()}
        for layer in net.layers:
            for bi, old in enumerate(layer.blobs):
                t = by_key.get(blob_key(layer.name, bi))
                if t is None:
                    continue
                arr = t.detach().cpu().numpy().astype(np.float32, copy=True)
                layer.blobs[bi] = arr.reshape(np.shape(old))
        return net


def build_torch_model(net) -> CaffeTorchNet:
    """The torch module of ``net`` (weights copied; the net is not modified)."""
    return CaffeTorchNet(net)


def run_torch(net, inputs: dict, outputs=None, all_blobs=False, batch_size=None) -> dict:
    """Forward in eval mode without gradients; numpy in, numpy out (for tests and checks)."""
    model = build_torch_model(net).eval()
    n = int(next(iter(inputs.values())).shape[0])
    step = batch_size or n
    parts = {}
    with torch.no_grad():
        for s in range(0, n, step):
            feed = {k: torch.from_numpy(np.ascontiguousarray(v[s:s + step], dtype=np.float32))
                    for k, v in inputs.items()}
            res = model(feed, outputs=outputs, all_blobs=all_blobs)
            for k, v in res.items():
                parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v, axis=0) if len(v) > 1 else v[0] for k, v in parts.items()}


__all__ = ["CaffeTorchNet", "build_torch_model", "run_torch", "blob_key", "caffe_pool2d",
           "supported_types", "TRAINABLE"]
