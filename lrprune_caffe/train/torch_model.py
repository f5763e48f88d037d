"""A ``torch.nn.Module`` built from our IR that computes what Caffe computes.

``build_torch_model(net)`` turns every layer into a small functional op, the
one its layer spec builds (``LayerSpec.to_torch`` in :mod:`lrprune_caffe.ir.layers`:
no layer is re-derived from a torch ``nn`` module, so Caffe's own conventions are
explicit there); this module holds the model-building machinery. Weights become
``nn.Parameter`` objects, one per Caffe blob, keyed ``"<layer>/<blob index>"`` (the key pruning masks use); BatchNorm's
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

import numpy as np

from . import require_torch
from lrprune_caffe.errors import UserError, layer_error
from lrprune_caffe.ir.layers import get_spec, known_types, torch_types
from lrprune_caffe.ir.layers.pooling import caffe_pool2d
from lrprune_caffe.schema.proto import pb

torch = require_torch()
nn = torch.nn

#: layer types with trainable blobs (``LayerSpec.trainable``)
TRAINABLE = frozenset(t for t in known_types() if get_spec(t).trainable)


def blob_key(layer_name: str, index: int) -> str:
    """The key of a layer's blob, as pruning masks name it: ``"<layer>/<blob idx>"``."""
    return f"{layer_name}/{index}"


# ---- the ops ---------------------------------------------------------------
# Each layer type's op is its spec's ``to_torch(layer)`` (lrprune_caffe.ir.layers):
# fn(bottoms: list[Tensor], blobs: list[Tensor], training: bool) -> list[Tensor]


def supported_types() -> list:
    return sorted(torch_types()) + ["Input"]


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
            spec = get_spec(layer.type)
            fn = spec.to_torch(layer)
            refs = []
            for bi, arr in enumerate(layer.blobs):
                t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
                key = blob_key(layer.name, bi)
                if spec.trainable:
                    ps = layer.msg.param[bi] if bi < len(layer.msg.param) else pb.ParamSpec()
                    if ps.name and ps.name in shared:
                        pi = shared[ps.name]
                        if tuple(self.params[pi].shape) != tuple(t.shape):
                            raise layer_error(UserError, layer,
                                              f"shares param '{ps.name}' but blob {bi} has shape "
                                              f"{tuple(t.shape)}, not {tuple(self.params[pi].shape)}")
                    else:
                        pi = len(self.params)
                        self.params.append(nn.Parameter(t, requires_grad=float(ps.lr_mult) != 0.0))
                        self.keys.append(key)
                        self.specs[pi] = (float(ps.lr_mult), float(ps.decay_mult))
                        if ps.name:
                            shared[ps.name] = pi
                    self.blob_param[key] = pi
                    refs.append(("p", pi))
                else:
                    bname = f"buf{li}_{bi}"
                    self.register_buffer(bname, t)
                    refs.append(("b", bname))
            if spec.torch_needs_blobs and not layer.blobs:
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
