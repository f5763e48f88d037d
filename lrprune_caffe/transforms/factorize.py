"""Pass ``factorize``: replace Convolution / InnerProduct layers by low-rank chains.

**Before**::

    bottom -> [conv2: Convolution kxk, C->N, stride s, pad p, dilation d, group g, bias] -> conv2

**After** (new layers and their blobs are named after the old layer, so the
names are predictable; the *last* new layer keeps the original top, so
nothing downstream changes)::

    channel:  bottom -> conv2_lr1 (kxk C->g*r, s, p, d, group g, no bias)
                     -> conv2_lr2 (1x1 g*r->N, group g, bias)               -> conv2
    spatial:  bottom -> conv2_lr1 (kh x 1, C->g*r, vertical s/p/d, no bias)
                     -> conv2_lr2 (1 x kw, g*r->N, horizontal s/p/d, bias)  -> conv2
    tucker2:  bottom -> conv2_lr1 (1x1 C->g*r1, no bias)
                     -> conv2_lr2 (kxk g*r1->g*r2, s, p, d, group g, no bias)
                     -> conv2_lr3 (1x1 g*r2->N, bias)                       -> conv2
    InnerProduct ip1 (K->N, axis a, transpose t):
              bottom -> ip1_lr1 (K->r, axis a, t, no bias) -> ip1_lr2 (r->N, t, bias) -> ip1

Intermediate blobs are named like the layer that writes them (``conv2_lr1``).
ParamSpecs (lr_mult / decay_mult) of the weights go to every new layer, the
bias's to the last; weight fillers to every new layer, the bias filler to the
last; phase rules to all; ``propagate_down`` stays on the first.

**Preconditions** (checked for every requested layer before anything
changes; on failure the net is untouched and the reason says why): the layer
exists and is a Convolution (2-D, one bottom, one top, axis 1, not in place,
not depthwise) or an InnerProduct, has weights, shares none (no ParamSpec
``name``), its rank(s) lie in 1..max, and the new names are free.

**Formula**: see :mod:`lrprune_caffe.lowrank.decompose` (each scheme cites its
source); the new layers compute exactly the reconstructed weight ``W^``, so
at full rank the chain computes the original layer.

The same layer builders rewrite a training net (:func:`rewrite_train_net`),
without weights, so a user can fine-tune the result in Caffe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrprune_caffe.ir.analysis import infer_shapes
from lrprune_caffe.ir.net import Layer, clone_msg
from lrprune_caffe.ir.layers import ShapeError, factorizable_types, get_spec
from lrprune_caffe.ir.layers.base import canon_axis, prod
from lrprune_caffe.ir.layers.conv import conv_geometry, set_conv_geometry
from lrprune_caffe.lowrank import decompose as dec
from . import PassResult, Precondition, graph_pass

#: types with a ``LayerSpec.factorize_kind`` (the registry says how each is factorized)
FACTORIZABLE = factorizable_types()
SUFFIX = "_lr"


# ---------------------------------------------------------------------------
# what a layer is, and what factorizing it costs

@dataclass
class LayerInfo:
    """Everything the factorization of one layer depends on (from its params and shapes)."""

    name: str
    type: str
    kind: str  # "conv" or "ip"
    n_out: int
    c_in: int  # conv: input channels; ip: K (flattened inputs)
    group: int = 1
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    pad: tuple = (0, 0)
    dilation: tuple = (1, 1)
    bias: bool = True
    in_shape: tuple = ()
    out_shape: tuple = ()
    axis: int = 1  # ip: canonical axis
    outer: int = 1  # ip: rows (product of the dims before axis)
    transpose: bool = False
    macs: int = 0
    params: int = 0

    def scheme_for(self, scheme: str) -> str:
        return "fc" if self.kind == "ip" else scheme

    def max_ranks(self, scheme: str) -> tuple:
        """Largest useful rank(s) per group: above them the factorization is not low-rank."""
        if self.kind == "ip":
            return (min(self.n_out, self.c_in),)
        n, c = self.n_out // self.group, self.c_in // self.group
        kh, kw = self.kernel
        if scheme == "channel":
            return (min(n, c * kh * kw),)
        if scheme == "spatial":
            return (min(c * kh, kw * n),)
        if scheme == "tucker2":
            return (c, n)
        raise ValueError(f"unknown scheme {scheme!r}")

    def cost(self, scheme: str, ranks):
        """(MACs, params) of the factorized chain; ``ranks`` may hold numpy arrays (vectorized).

        Equals what the layer registry counts on the new layers (``layer_stats``)."""
        bias = self.n_out if self.bias else 0
        if self.kind == "ip":
            r = np.asarray(ranks[0], dtype=np.int64)
            return self.outer * r * (self.c_in + self.n_out), r * (self.c_in + self.n_out) + bias
        b = int(self.out_shape[0])
        ho, wo = int(self.out_shape[2]), int(self.out_shape[3])
        h, w = int(self.in_shape[2]), int(self.in_shape[3])
        kh, kw = self.kernel
        C, N, g = self.c_in, self.n_out, self.group
        if scheme == "channel":
            r = np.asarray(ranks[0], dtype=np.int64)
            return b * ho * wo * r * (C * kh * kw + N), r * (C * kh * kw + N) + bias
        if scheme == "spatial":
            r = np.asarray(ranks[0], dtype=np.int64)
            return b * ho * r * (w * C * kh + wo * N * kw), r * (C * kh + N * kw) + bias
        if scheme == "tucker2":
            r1, r2 = (np.asarray(x, dtype=np.int64) for x in ranks)
            macs = b * (h * w * r1 * C + ho * wo * g * r2 * r1 * kh * kw + ho * wo * N * r2)
            return macs, r1 * C + g * r1 * r2 * kh * kw + N * r2 + bias
        raise ValueError(f"unknown scheme {scheme!r}")

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.group > 1 and self.c_in // self.group == 1


def layer_info(layer, in_shape, out_shape) -> LayerInfo:
    """A :class:`LayerInfo`, or raise :class:`Precondition` saying why the layer cannot be factorized."""
    kind = get_spec(layer.type).factorize_kind
    if kind is None:
        raise Precondition(f"layer type {layer.type} is not factorized (only {' and '.join(FACTORIZABLE)})")
    if not layer.blobs:
        raise Precondition("has no weights")
    if len(layer.bottoms) != 1 or len(layer.tops) != 1:
        raise Precondition(f"has {len(layer.bottoms)} bottoms and {len(layer.tops)} tops "
                           f"(weights shared across inputs); only one of each is factorized")
    if layer.tops[0] == layer.bottoms[0]:
        raise Precondition("works in place (top == bottom)")
    shared = [p.name for p in layer.msg.param if p.name]
    if shared:
        raise Precondition(f"shares its weights with other layers (param name '{shared[0]}')")
    if in_shape is None or out_shape is None:
        raise Precondition("its input shape is unknown")
    if kind == "ip":
        ip = layer.param_msg("inner_product_param")
        axis = canon_axis(int(ip.axis), len(in_shape))
        k = prod(in_shape[axis:])
        n = int(ip.num_output)
        return LayerInfo(layer.name, layer.type, "ip", n, k, bias=bool(ip.bias_term), in_shape=tuple(in_shape),
                         out_shape=tuple(out_shape), axis=axis, outer=prod(in_shape[:axis]),
                         transpose=bool(ip.transpose), macs=prod(in_shape[:axis]) * k * n,
                         params=sum(int(b.size) for b in layer.blobs))
    if len(in_shape) != 4:
        raise Precondition(f"is a {len(in_shape) - 2}-D convolution; only 2-D ones are factorized")
    try:
        g = conv_geometry(layer)
    except ShapeError as e:
        raise Precondition(str(e)) from None
    if g.axis != 1:
        raise Precondition(f"uses convolution_param.axis {g.axis}; only axis 1 is factorized")
    info = LayerInfo(layer.name, layer.type, "conv", g.num_output, int(in_shape[1]), g.group, g.kernel,
                     g.stride, g.pad, g.dilation, g.bias, tuple(in_shape), tuple(out_shape),
                     macs=prod(out_shape) * (int(in_shape[1]) // g.group) * prod(g.kernel),
                     params=sum(int(b.size) for b in layer.blobs))
    if info.depthwise:
        raise Precondition("is a depthwise convolution (one input channel per group): "
                           "there is no channel redundancy to factorize")
    return info


# ---------------------------------------------------------------------------
# building the new layers (no weights): shared by deploy and training nets

def new_names(name: str, scheme: str) -> list:
    n = 3 if scheme == "tucker2" else 2
    return [f"{name}{SUFFIX}{i}" for i in range(1, n + 1)]


def _base_msg(layer, keep_propagate_down: bool):
    msg = clone_msg(layer.msg)
    msg.ClearField("param")
    if not keep_propagate_down:
        msg.ClearField("propagate_down")
    msg.ClearField("loss_weight")
    return msg


def _param_specs(layer, msg, with_bias: bool):
    specs = list(layer.msg.param)
    for i, spec in enumerate(specs[:2 if with_bias else 1]):
        p = msg.param.add()
        p.CopyFrom(spec)
        p.ClearField("name")


def build_layers(layer, info: LayerInfo, scheme: str, ranks) -> list:
    """The new layers (without blobs) that replace ``layer``; see the module docstring."""
    scheme = info.scheme_for(scheme)
    names = new_names(layer.name, scheme)
    bottom, top = layer.bottoms[0], layer.tops[0]
    blobs = [bottom] + names[:-1] + [top]
    out = []
    for i, name in enumerate(names):
        first, last = i == 0, i == len(names) - 1
        msg = _base_msg(layer, keep_propagate_down=first)
        if last and len(layer.msg.loss_weight):
            msg.loss_weight.extend(layer.msg.loss_weight)
        _param_specs(layer, msg, with_bias=last and info.bias)
        if info.kind == "ip":
            ip = msg.inner_product_param
            ip.num_output = int(ranks[0]) if first else info.n_out
            ip.bias_term = bool(info.bias and last)
            if not first:  # canonical axis: the r-wide blob has axis+1 dims
                if info.axis == 1:
                    ip.ClearField("axis")
                else:
                    ip.axis = info.axis
            if not (info.bias and last):
                ip.ClearField("bias_filler")
        else:
            cp = msg.convolution_param
            g = info.group
            one = (1, 1)
            if scheme == "channel":
                geo = [(info.kernel, info.stride, info.pad, info.dilation), (one, one, (0, 0), one)]
                widths = [g * int(ranks[0]), info.n_out]
            elif scheme == "spatial":
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = info.kernel, info.stride, info.pad, info.dilation
                geo = [((kh, 1), (sh, 1), (ph, 0), (dh, 1)), ((1, kw), (1, sw), (0, pw), (1, dw))]
                widths = [g * int(ranks[0]), info.n_out]
            else:
                geo = [(one, one, (0, 0), one), (info.kernel, info.stride, info.pad, info.dilation),
                       (one, one, (0, 0), one)]
                widths = [g * int(ranks[0]), g * int(ranks[1]), info.n_out]
            cp.num_output = widths[i]
            set_conv_geometry(cp, *geo[i])
            if g > 1:
                cp.group = g
            else:
                cp.ClearField("group")
            cp.bias_term = bool(info.bias and last)
            if not (info.bias and last):
                cp.ClearField("bias_filler")
        out.append(Layer(name, layer.type, [blobs[i]], [blobs[i + 1]], msg, []))
    return out


def factor_blobs(layer, info: LayerInfo, scheme: str, ranks, method="auto", seed=0, hooi_iters=0,
                 cache=None):
    """(list of blob lists for the new layers, record) for one layer."""
    scheme = info.scheme_for(scheme)
    W = layer.blobs[0]
    bias = [layer.blobs[1]] if info.bias and len(layer.blobs) > 1 else []
    if scheme == "fc":
        Wn = W.T if info.transpose else W  # (N, K)
        W1, W2, rec = dec.fc_decompose(Wn, int(ranks[0]), method=method, seed=seed, cache=cache)
        factors = (W1, W2)
        blobs = ([W1.T.copy()], [W2.T.copy()] + bias) if info.transpose else ([W1], [W2] + bias)
        W_hat = dec.reconstruct("fc", factors)
        err = dec.relative_error(Wn, W_hat)
    elif scheme in ("channel", "spatial"):
        fn = dec.channel_decompose if scheme == "channel" else dec.spatial_decompose
        W1, W2, rec = fn(W, int(ranks[0]), group=info.group, method=method, seed=seed, cache=cache)
        blobs = ([W1], [W2] + bias)
        err = dec.relative_error(W, dec.reconstruct(scheme, (W1, W2), info.group))
    else:
        W1, W2, W3, rec = dec.tucker2_decompose(W, (int(ranks[0]), int(ranks[1])), group=info.group,
                                                hooi_iters=hooi_iters, method=method, seed=seed, cache=cache)
        blobs = ([W1], [W2], [W3] + bias)
        err = dec.relative_error(W, dec.reconstruct("tucker2", (W1, W2, W3), info.group))
    record = {"energy_kept": float(rec["energy_kept"]), "weight_rel_error": float(err)}
    return [list(b) for b in blobs], record


# ---------------------------------------------------------------------------
# the pass

@dataclass
class LayerPlan:
    scheme: str  # channel / spatial / tucker2 (ignored for InnerProduct: always "fc")
    ranks: tuple  # (r,) or (r1, r2) for tucker2
    info: LayerInfo = None


def check_ranks(info: LayerInfo, scheme: str, ranks) -> str:
    """'' when the ranks fit the layer, else why not."""
    s = info.scheme_for(scheme)
    maxr = info.max_ranks(s)
    if len(ranks) != len(maxr):
        return f"the {s} scheme needs {len(maxr)} rank(s), got {len(ranks)}"
    for r, m in zip(ranks, maxr):
        if not 1 <= int(r) <= m:
            return f"rank {format_ranks(ranks)} is outside 1..{format_ranks(maxr)} for the {s} scheme"
    return ""


def format_ranks(ranks) -> str:
    return "x".join(str(int(r)) for r in ranks)


@graph_pass("factorize")
def factorize(net, plan: dict, method: str = "auto", seed: int = 0, hooi_iters: int = 0, caches: dict = None,
              progress=None) -> PassResult:
    """Replace every layer named in ``plan`` ({name: LayerPlan}) by its low-rank chain.

    See the module docstring for before / after / preconditions / formula.
    ``caches`` ({name: dict}) holds SVDs computed during rank selection.
    ``progress``: an optional callable(name) called after each layer.
    """
    shapes = infer_shapes(net)
    index = net.index_by_name()
    names_in_use = set(index.position) | set(index.writers)
    infos = {}
    for name, lp in plan.items():
        if name not in index:
            raise Precondition(f"no layer named '{name}'")
        layer = index.layer(name)
        try:
            info = layer_info(layer, shapes.inputs[name][0] if shapes.inputs[name] else None,
                              shapes.outputs[name][0] if shapes.outputs[name] else None)
        except Precondition as e:
            raise Precondition(f"layer '{name}' ({layer.type}) {e}") from None
        why = check_ranks(info, lp.scheme, lp.ranks)
        if why:
            raise Precondition(f"layer '{name}' ({layer.type}): {why}")
        for new in new_names(name, info.scheme_for(lp.scheme)):
            if new in names_in_use:
                raise Precondition(f"layer '{name}': the name '{new}' for its factor is already in use")
        infos[name] = info
    details = []
    chains = {}
    for layer in net.layers:  # net order: the progress and the details follow it
        lp = plan.get(layer.name)
        if lp is None:
            continue
        info = infos[layer.name]
        scheme = info.scheme_for(lp.scheme)
        built = build_layers(layer, info, scheme, lp.ranks)
        blobs, record = factor_blobs(layer, info, scheme, lp.ranks, method=method, seed=seed,
                                     hooi_iters=hooi_iters, cache=(caches or {}).get(layer.name))
        for new, b in zip(built, blobs):
            new.blobs = b
        chains[layer.name] = built
        details.append({"name": layer.name, "scheme": scheme, "rank": [int(r) for r in lp.ranks],
                        "new_layers": [b.name for b in built], **record})
        if progress is not None:
            progress(layer.name)
    net.replace_layers(chains)
    return PassResult("factorize", changed=bool(details), details=details)


# ---------------------------------------------------------------------------
# training nets

def rewrite_train_net(train_net, plan: dict, path=None):
    """Rewrite a training net (every phase, no weights) as the deploy net was.

    Every layer named in ``plan`` is replaced by the same chain (same names,
    ranks and geometry); a layer of the same name that differs from the
    deploy one (type, num_output, kernel, group, bias) is an error, as is a
    factorized layer the training net lacks. Returns the list of notes.
    """
    from lrprune_caffe.errors import UserError
    where = f"{path}: " if path else ""
    found = set()
    out = []
    for layer in train_net.layers:
        lp = plan.get(layer.name)
        if lp is None:
            out.append(layer)
            continue
        info = lp.info
        if layer.type != info.type or len(layer.bottoms) != 1 or len(layer.tops) != 1:
            raise UserError(f"{where}layer '{layer.name}' ({layer.type}) differs from the deploy net's "
                            f"({info.type}); cannot rewrite it the same way")
        if info.kind == "conv":
            try:
                g = conv_geometry(layer)
            except ShapeError as e:
                raise UserError(f"{where}layer '{layer.name}' ({layer.type}): {e}") from None
            same = (g.num_output, g.group, g.kernel, g.stride, g.pad, g.dilation, g.bias) == (
                info.n_out, info.group, info.kernel, info.stride, info.pad, info.dilation, info.bias)
        else:
            ip = layer.param_msg("inner_product_param")
            same = (int(ip.num_output), bool(ip.bias_term), bool(ip.transpose)) == (
                info.n_out, info.bias, info.transpose)
        if not same:
            raise UserError(f"{where}layer '{layer.name}' ({layer.type}) has other parameters than in the "
                            f"deploy net (num_output / kernel / stride / pad / group / bias); "
                            f"cannot rewrite it the same way")
        found.add(layer.name)
        out.extend(build_layers(layer, info, lp.scheme, lp.ranks))
    missing = [n for n in plan if n not in found]
    if missing:
        raise UserError(f"{where}has no layer named {', '.join(repr(m) for m in missing)} "
                        f"(factorized in the deploy net); is it the matching training net?")
    train_net.layers[:] = out


__all__ = ["LayerInfo", "LayerPlan", "layer_info", "build_layers", "factor_blobs", "factorize",
           "check_ranks", "format_ranks", "new_names", "rewrite_train_net", "FACTORIZABLE"]
