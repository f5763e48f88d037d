"""What the calibration passes (:mod:`.calibrate`, :mod:`.calibrate_prune`) share: two nets run side by
side on the calibration data, a layer at a time, and the sampled columns a layer is fit on.

* :class:`Runner` runs a list of layers one at a time on the whole fit set,
  freeing each blob after its last reader; a plain in-place ReLU (slope 0)
  overwrites its input when no other live blob of either net (nor an input)
  shares that memory, so that the original net's and the new net's
  activations at the current layer are all that is held (a ReLU both nets
  share, on the same array, is rewritten once for both: :func:`lockstep`);
* :func:`fused_reference`: a reference convolution whose whole output would be
  large (VGG-16's conv1_2 on 52 images: 0.67 GB) runs a chunk of images at a
  time with the per-image layers after it (ReLU, pooling) and keeps only the
  fit's sampled target columns (:class:`Tapped`);
* :class:`Cols`: the inputs (im2col) and outputs of one conv / InnerProduct
  layer at sampled positions, as ``(K, n)``, ``(N, n)`` matrices, gathered once
  (kept when they fit in :data:`CACHE_BYTES`) and handed out in chunks;
* :func:`col_rel`: a chain's relative L2 error on those columns (the passes'
  before / after numbers: no second forward of the whole fit set);
* :func:`reference`: for each layer of the new net, the layer whose output is its target.

Nothing here changes a net except :func:`own` (copy-on-write of a layer shared with the original) and
:func:`set_weights`.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.ir.layers.conv import conv_geometry
from lrprune_caffe.lowrank import datafit as df
from . import Precondition
from .forward import SUPPORTED, run_layer

CHUNK = 8192  # columns per moment accumulation step
#: at most this many sampled columns (positions x images) per layer fit, whatever the number of images
MAX_COLUMNS = 16384
#: a layer's gathered columns are kept between the passes over them (Zhang's moments, the re-fit, the errors)
#: when they take at most this many bytes; else they are gathered again, a chunk at a time
CACHE_BYTES = 512 << 20


# ---------------------------------------------------------------------------
# running two nets side by side

def _plain_relu(layer) -> bool:
    return layer.type == "ReLU" and not float(layer.param_msg("relu_param").negative_slope)


class Runner:
    """Runs a list of layers one at a time, freeing blobs after their last use (``None`` entries: skipped).

    ``peer``: the other net's runner; its blobs (and the inputs) are never written in place."""

    def __init__(self, layers, inputs, run=run_layer, peer=None):
        self.layers = layers
        self.run = run
        self.inputs = list(inputs.values())
        self.blobs = dict(inputs)
        self.peer = peer
        if peer is not None:
            peer.peer = self
        self.done = set()  # layers already run (by fused_reference)
        self.last = {}
        for i, layer in enumerate(layers):
            if layer is None:
                continue
            for b in layer.bottoms:
                self.last[b] = i

    def _exclusive(self, name, shared=False) -> bool:
        """True when no blob but ``name`` (of this runner or its peer) nor an input shares its memory.
        ``shared``: the peer's blob ``name`` is this one and takes the result too (:func:`lockstep`)."""
        arr = self.blobs[name]
        if not isinstance(arr, np.ndarray) or not arr.flags.writeable or not arr.flags.owndata:
            return False
        peer = {} if self.peer is None else self.peer.blobs
        others = [v for k, v in self.blobs.items() if k != name] + self.inputs + \
            [v for k, v in peer.items() if not (shared and k == name and v is arr)]
        return not any(isinstance(v, np.ndarray) and np.may_share_memory(v, arr) for v in others)

    def step(self, i, layer=None, shared=False):
        layer = layer or self.layers[i]
        if layer is None or layer.type == "Input":
            return None
        if _plain_relu(layer) and layer.tops == layer.bottoms and self._exclusive(layer.bottoms[0], shared):
            x = self.blobs[layer.bottoms[0]]
            np.maximum(x, np.zeros((), x.dtype), out=x)  # what run_layer computes, without a second copy
            outs = [x]
        else:
            outs = self.run(layer, [self.blobs[b] for b in layer.bottoms])
        for t, v in zip(layer.tops, outs):
            self.blobs[t] = v
        self.free(i)
        return outs

    def free(self, i):
        layer = self.layers[i]
        if layer is None:
            return
        for b in layer.bottoms:
            if self.last.get(b) == i and b not in layer.tops:
                self.blobs.pop(b, None)


def lockstep(R, N, ref, net_new, i):
    """Step both runners over layer i (not fit); a layer both nets share on the same inputs runs once."""
    layer = net_new.layers[i]
    if i in R.done:  # run already (fused_reference)
        N.step(i, layer)
        return
    shared = ref[i] is layer and all(N.blobs.get(b) is R.blobs.get(b) for b in layer.bottoms)
    R.step(i, shared=shared)
    if shared and layer.type != "Input":
        for t in layer.tops:
            N.blobs[t] = R.blobs[t]
        N.free(i)
    else:
        N.step(i, layer)


def check_nets(nets, inputs, numpy_forward=True):
    """The passes' preconditions on the nets and the calibration inputs (``Precondition`` when not met)."""
    for net in nets:
        for layer in net.layers:
            if numpy_forward and layer.type not in SUPPORTED:
                raise Precondition(f"layer '{layer.name}' ({layer.type}) has no numpy forward for calibration")
            if layer.type == "Input":
                missing = [t for t in layer.tops if t not in inputs]
                if missing:
                    raise Precondition(f"no calibration values for the net input(s) {', '.join(missing)}")


def reference(net_orig, net_new, dense=None, inner=True):
    """For each layer of ``net_new``, the layer whose output is its target (None: no target)."""
    by_name = {layer.name: layer for layer in net_orig.layers}
    producer = {}
    for layer in net_orig.layers:
        for t in layer.tops:
            if t not in layer.bottoms:
                producer.setdefault(t, layer)
    new_names_set = {layer.name for layer in net_new.layers}
    dense_by_name = {} if dense is None else {layer.name: layer for layer in dense.layers}
    out = []
    for layer in net_new.layers:
        o = by_name.get(layer.name)
        if o is not None and o.type == layer.type:
            out.append(o)
            continue
        p = producer.get(layer.tops[0]) if len(layer.tops) == 1 else None
        if p is not None and p.name not in new_names_set:
            out.append(p)  # the last layer of a chain: the original layer
        elif inner:
            out.append((dense_by_name.get(layer.name) or layer).copy())
        else:
            out.append(None)
    return out


def own(net_new, net_orig, i):
    """net_new.layers[i], copied first when it is shared with net_orig (never write into the original)."""
    layer = net_new.layers[i]
    if any(layer is o for o in net_orig.layers):
        layer = layer.copy()
        net_new.layers[i] = layer
    return layer


def feeds_relu(net, i) -> bool:
    """True when every reader of layer i's output sees it through a ReLU (slope 0) only."""
    t = net.layers[i].tops[0]
    readers = []
    for layer in net.layers[i + 1:]:
        if t in layer.bottoms:
            readers.append(layer)
            if t in layer.tops:  # rewritten in place: nobody later sees the pre-activation
                break
    return bool(readers) and all(_plain_relu(r) for r in readers)


#: Zhang et al. 2015 (Sec. 3.2) raise the penalty mu from 0.01 to 1 over their iterations
RELU_MUS = (0.01, 0.03, 0.1, 0.3, 1.0)


def relu_refine(m, X, Y, fit, predict):
    """Fit ``fit(moments) -> (A, c)`` to the ReLU-aware targets of Zhang et al. 2015 (Sec. 3.2):
    alternate the element-wise auxiliary step with the linear fit, mu rising."""
    A, c = fit(m)
    for mu in RELU_MUS:
        A, c = fit(df.retarget(m, X, df.relu_targets(Y, predict(A, c), mu)))
    return A, c


#: a reference convolution whose output over the fit set would take more than this many bytes runs a chunk
#: of images at a time, fused with the per-image layers right after it (:func:`fused_reference`)
FUSE_BYTES = 256 << 20
#: bytes of the reference convolution's output per chunk of images there
FUSE_CHUNK_BYTES = 96 << 20
#: layer types that act on each image alone and may run in a fused chunk
PER_IMAGE = ("ReLU", "Pooling", "Dropout")


class Tapped:
    """A conv layer's output over the fit set, kept only at sampled positions: ``shape`` (the whole
    output's), ``pos`` (:func:`sampled_positions`), ``cols`` = ``responses(y, pos)`` (N, n)."""

    def __init__(self, shape, pos, cols):
        self.shape, self.pos, self.cols = tuple(shape), pos, cols


def sampled_positions(y_shape, max_positions, seed, max_columns=None):
    """The output positions a conv layer's fit samples (flat indices into (images, height, width))."""
    max_columns = MAX_COLUMNS if max_columns is None else int(max_columns)
    per_image = max(1, min(int(max_positions), max_columns // max(1, y_shape[0])))
    return df.sample_positions(y_shape[0], y_shape[2], y_shape[3], per_image, seed)


def _out_bytes(layer, x) -> int:
    g = conv_geometry(layer)
    hw = [df.conv_out_size(s, k, st, p, d) for s, k, st, p, d in zip(x.shape[2:], g.kernel, g.stride, g.pad,
                                                                      g.dilation)]
    return int(x.shape[0]) * int(g.num_output) * int(np.prod(hw)) * np.dtype(x.dtype).itemsize


def fusable(R, layers, k, blocked=()):
    """The indices after ``k`` that :func:`fused_reference` may run with layer k of ``R`` (each a per-image
    layer both nets share, reading the previous one's output only, not in ``blocked``)."""
    out, t = [], R.layers[k].tops[0]
    for j in range(k + 1, len(layers)):
        layer = layers[j]
        if (j in blocked or R.layers[j] is not layer or layer.type not in PER_IMAGE or layer.bottoms != [t]
                or len(layer.tops) != 1 or (layer.tops[0] != t and R.last.get(t) != j)):
            break
        if layer.type == "ReLU" and layer.tops[0] != t:
            break
        out.append(j)
        t = layer.tops[0]
    return out


def fused_reference(R, k, follow, max_positions, seed):
    """Run layer k of ``R`` (a convolution) and the layers ``follow`` after it a chunk of images at a time,
    keeping layer k's output only at the fit's sampled positions. Returns that output as a :class:`Tapped`
    (None, nothing run: the output is small enough to hold whole, or k is not a convolution); the last
    layer's output is stored in ``R`` and the layers are marked done (:func:`lockstep` skips them there).
    The values are those of the whole-batch forward (the same layers, per image)."""
    layer = R.layers[k]
    if layer is None or layer.type != "Convolution" or len(layer.bottoms) != 1:
        return None
    x = R.blobs[layer.bottoms[0]]
    if not isinstance(x, np.ndarray) or x.ndim != 4 or _out_bytes(layer, x) <= FUSE_BYTES:
        return None
    n = int(x.shape[0])
    per = max(1, _out_bytes(layer, x) // n)
    step = max(1, FUSE_CHUNK_BYTES // per)
    step = step - step % 4 if step >= 8 else step  # whole batches of the onnxruntime runner
    out = tapped = None
    for a in range(0, n, step):
        y = R.run(layer, [x[a:a + step]])[0]
        if tapped is None:
            shape = (n, *y.shape[1:])
            pos = sampled_positions(shape, max_positions, seed)
            tapped = Tapped(shape, pos, np.empty((shape[1], pos.size), y.dtype))
            hw = int(np.prod(shape[2:]))
        lo, hi = np.searchsorted(pos, [a * hw, min(n, a + step) * hw])
        tapped.cols[:, lo:hi] = df.responses(y, pos[lo:hi] - a * hw)
        for j in follow:
            f = R.layers[j]
            if f.type == "ReLU" and not float(f.param_msg("relu_param").negative_slope):
                np.maximum(y, np.zeros((), y.dtype), out=y)  # y is this chunk's own array
            elif f.type != "Dropout":
                y = R.run(f, [y])[0]
        if out is None:
            out = np.empty((n, *y.shape[1:]), y.dtype)
        out[a:a + step] = y
        del y
    last = R.layers[follow[-1]] if follow else layer
    R.blobs[last.tops[0]] = out
    for j in [k, *follow]:
        R.free(j)
        R.done.add(j)
    return tapped


# ---------------------------------------------------------------------------
# columns: (inputs, targets) as (K, n), (N, n) matrices

class Cols:
    """The sampled columns of one conv / InnerProduct layer's inputs and outputs."""

    def __init__(self, layer, x, y, max_positions, seed, max_columns=None):
        self.conv = layer.type == "Convolution"
        max_columns = MAX_COLUMNS if max_columns is None else int(max_columns)
        if self.conv:
            g = conv_geometry(layer)
            self.geo = (g.kernel, g.stride, g.pad, g.dilation)
            self.pos = y.pos if isinstance(y, Tapped) else sampled_positions(y.shape, max_positions, seed, max_columns)
            k = int(np.prod(g.kernel)) * x.shape[1]
        else:
            ip = layer.param_msg("inner_product_param")
            axis = int(ip.axis) % x.ndim
            self.xm = x.reshape(int(np.prod(x.shape[:axis])), -1)
            n = self.xm.shape[0]
            self.pos = np.arange(n) if n <= max_columns else \
                np.sort(np.random.default_rng(seed).choice(n, max_columns, replace=False))
            k = self.xm.shape[1]
        self.x, self.y = x, y
        size = (k + y.shape[1]) * self.pos.size * np.dtype(x.dtype).itemsize
        self._cache = [] if size <= CACHE_BYTES else None
        self._done = False

    def _gather(self):
        for i in range(0, self.pos.size, CHUNK):
            p = self.pos[i:i + CHUNK]
            if self.conv:
                Y = self.y.cols[:, i:i + CHUNK] if isinstance(self.y, Tapped) else df.responses(self.y, p)
                yield df.im2col(self.x, *self.geo, positions=p), Y
            else:
                yield self.xm[p].T, self.y.reshape(self.xm.shape[0], -1)[p].T

    def chunks(self):
        """(X (K, c), Y (N, c)) chunks of the columns, in order."""
        if self._done:
            yield from self._cache
            return
        if self._cache is not None:
            self._cache = []  # a pass stopped early leaves a partial list: start again
        for pair in self._gather():
            if self._cache is not None:
                self._cache.append(pair)
            yield pair
        if self._cache is not None:
            self._done = True
            self.x = self.y = self.xm = None  # every column is kept: the activations are not needed again

    def gather(self):
        """All columns at once: (X (K, n), Y (N, n))."""
        Xs, Ys = zip(*self.chunks())
        return np.concatenate(Xs, axis=1), np.concatenate(Ys, axis=1)


def col_rel(chunks, predict) -> float:
    """``||predict(X) - Y|| / ||Y||`` over (X, Y) chunks (float64 sums)."""
    num = den = 0.0
    for X, Y in chunks:
        d = predict(X) - Y
        num += float(np.square(d, dtype=np.float64).sum())
        den += float(np.square(Y, dtype=np.float64).sum())
    return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def grouped(W, X, group):
    """Block-diagonal product: W (N, K/g) on X (K, n)."""
    N, kg = W.shape
    ng = N // group
    return np.vstack([W[j * ng:(j + 1) * ng] @ X[j * kg:(j + 1) * kg] for j in range(group)])


def affine(*layers, group=1):
    """``X -> W_k (... (W_1 X + b_1) ...) + b_k`` for ``layers`` = (W, b or None) pairs, block-diagonal
    over ``group``, in float32 as the nets compute (for :func:`col_rel`'s error figures)."""
    ws = [(np.asarray(W, np.float32), None if b is None else np.asarray(b, np.float32)[:, None]) for W, b in layers]

    def predict(X):
        Z = np.asarray(X, np.float32)
        for W, b in ws:
            Z = grouped(W, Z, group)
            if b is not None:
                Z += b
        return Z
    return predict


def conv_group(layer):
    return conv_geometry(layer).group if layer.type == "Convolution" else 1


def weights(layer):
    """(W (N, K/g) float64, bias or None) of a conv / InnerProduct layer."""
    W = np.asarray(layer.blobs[0], np.float64)
    if layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose:
        W = W.T
    b = np.asarray(layer.blobs[1], np.float64) if len(layer.blobs) > 1 else None
    return W.reshape(W.shape[0], -1), b


def set_weights(layer, W, b):
    shape = layer.blobs[0].shape
    if layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose:
        W = np.asarray(W).T
    layer.blobs = [np.ascontiguousarray(W, dtype=np.float32).reshape(shape)] + \
        ([np.asarray(b, np.float32).reshape(layer.blobs[1].shape)] if b is not None and len(layer.blobs) > 1 else [])


__all__ = ["Runner", "lockstep", "fused_reference", "fusable", "Tapped", "sampled_positions", "check_nets",
           "reference", "own", "feeds_relu", "relu_refine", "Cols", "col_rel", "grouped", "affine", "conv_group",
           "weights", "set_weights", "CHUNK", "MAX_COLUMNS", "CACHE_BYTES", "FUSE_BYTES", "FUSE_CHUNK_BYTES",
           "RELU_MUS"]
