"""Passes ``calibrate_factorized`` and ``calibrate_pruned``: fit compressed layers to the original
net's outputs on calibration data (no labels).

**Before**: ``net_new`` = ``net_orig`` after :func:`~.factorize.factorize` (data-free
factors) and/or with pruning masks; a few hundred calibration inputs.

**After**: the same graph; only blob values change:

* every factorized chain, in net order, is refit to the original layer's
  output ``y = W x + b`` on the inputs ``x^`` that the already calibrated
  layers below produce (asymmetric, sequential):

  - channel / FC: Zhang et al. 2015's response reconstruction (first factor
    ``Q W``, second ``P``, bias corrected), then a least-squares re-fit of the
    last factor on the first factor's actual outputs, then the two factors
    balanced (equal norms per rank component, as the data-free factors are,
    so that magnitude pruning afterwards treats both layers alike);
  - Tucker-2: the first 1x1 is kept; the core and the last 1x1 are fit as a
    channel pair by Zhang's method on the first 1x1's outputs, then the last
    re-fit;
  - spatial: least-squares re-fit of the last (1 x kw) factor;

* every masked layer (``calibrate_pruned``) keeps its mask and re-solves the
  kept weights of each output row (and the bias) by masked least squares
  (``prune_method="resolve"``), or first re-chooses the mask at the layer's
  sparsity by SparseGPT saliency (``"sparsegpt"``). The target of a layer
  whose output the original net has is the original output; the target of an
  inner factor (``conv2_lr1``) is its dense version (``dense``: the net
  before pruning) applied to the original net's input of the chain.

Convolutions are fit at ``max_positions`` output positions per image
(seeded; fewer when the images times that exceed :data:`MAX_COLUMNS`), so
the cost stays bounded on large images and many images; all fits work on
float64 second moments accumulated over chunks of positions.

**Preconditions** (checked before anything changes; else ``Precondition``):
every layer of both nets has a numpy forward (:mod:`.forward`), the inputs
cover every net input, and each layer in ``plan`` has its chain in
``net_new``.

**Formula**: :mod:`lrprune_caffe.lowrank.datafit`, :mod:`lrprune_caffe.lowrank.prunefit`.
Damping ``lambda = d * mean(diag(sum x x^T))``, d = ``damping`` (0.01), pulling
toward the data-free factors / the dense weights (``prior``) rather than 0.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.ir.layers.conv import conv_geometry
from lrprune_caffe.ir.masks import mask_key, split_key
from lrprune_caffe.lowrank import datafit as df, prunefit as pf
from . import PassResult, Precondition, graph_pass
from .factorize import new_names
from .forward import SUPPORTED, run_layer

CHUNK = 8192  # columns per moment accumulation step
#: at most this many sampled columns (positions x images) per layer fit, whatever the number of images
MAX_COLUMNS = 16384


# ---------------------------------------------------------------------------
# running two nets side by side

class _Runner:
    """Runs a list of layers one at a time, freeing blobs after their last use."""

    def __init__(self, layers, inputs, run=run_layer):
        self.layers = layers
        self.run = run
        self.blobs = dict(inputs)
        self.last = {}
        for i, layer in enumerate(layers):
            if layer is None:
                continue
            for b in layer.bottoms:
                self.last[b] = i

    def step(self, i, layer=None):
        layer = layer or self.layers[i]
        if layer is None or layer.type == "Input":
            return None
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


def _check(nets, inputs, numpy_forward=True):
    for net in nets:
        for layer in net.layers:
            if numpy_forward and layer.type not in SUPPORTED:
                raise Precondition(f"layer '{layer.name}' ({layer.type}) has no numpy forward for calibration")
            if layer.type == "Input":
                missing = [t for t in layer.tops if t not in inputs]
                if missing:
                    raise Precondition(f"no calibration values for the net input(s) {', '.join(missing)}")


def _reference(net_orig, net_new, dense=None, inner=True):
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


def _own(net_new, net_orig, i):
    """net_new.layers[i], copied first when it is shared with net_orig (never write into the original)."""
    layer = net_new.layers[i]
    if any(layer is o for o in net_orig.layers):
        layer = layer.copy()
        net_new.layers[i] = layer
    return layer


def _rel(a, b) -> float:
    d = float(np.linalg.norm(np.asarray(a, np.float64) - b))
    n = float(np.linalg.norm(np.asarray(b, np.float64)))
    return d / n if n else d


def feeds_relu(net, i) -> bool:
    """True when every reader of layer i's output sees it through a ReLU (slope 0) only."""
    t = net.layers[i].tops[0]
    readers = []
    for layer in net.layers[i + 1:]:
        if t in layer.bottoms:
            readers.append(layer)
            if t in layer.tops:  # rewritten in place: nobody later sees the pre-activation
                break
    return bool(readers) and all(r.type == "ReLU" and not float(r.param_msg("relu_param").negative_slope)
                                 for r in readers)


#: Zhang et al. 2015 (Sec. 3.2) raise the penalty mu from 0.01 to 1 over their iterations
RELU_MUS = (0.01, 0.03, 0.1, 0.3, 1.0)


def _relu_refine(m, X, Y, fit, predict):
    """Fit ``fit(moments) -> (A, c)`` to the ReLU-aware targets of Zhang et al. 2015 (Sec. 3.2):
    alternate the element-wise auxiliary step with the linear fit, mu rising."""
    A, c = fit(m)
    for mu in RELU_MUS:
        A, c = fit(df.retarget(m, X, df.relu_targets(Y, predict(A, c), mu)))
    return A, c


def _gather(cols):
    Xs, Ys = zip(*cols.chunks())
    return np.concatenate(Xs, axis=1), np.concatenate(Ys, axis=1)


# ---------------------------------------------------------------------------
# columns: (inputs, targets) as (K, n), (N, n) matrices

class _Cols:
    """The sampled columns of one conv / InnerProduct layer's inputs and outputs."""

    def __init__(self, layer, x, y, max_positions, seed, max_columns=None):
        self.conv = layer.type == "Convolution"
        max_columns = MAX_COLUMNS if max_columns is None else int(max_columns)
        if self.conv:
            g = conv_geometry(layer)
            self.geo = (g.kernel, g.stride, g.pad, g.dilation)
            per_image = max(1, min(int(max_positions), max_columns // max(1, y.shape[0])))
            self.pos = df.sample_positions(y.shape[0], y.shape[2], y.shape[3], per_image, seed)
        else:
            ip = layer.param_msg("inner_product_param")
            axis = int(ip.axis) % x.ndim
            self.xm = x.reshape(int(np.prod(x.shape[:axis])), -1)
            n = self.xm.shape[0]
            self.pos = np.arange(n) if n <= max_columns else \
                np.sort(np.random.default_rng(seed).choice(n, max_columns, replace=False))
        self.x, self.y = x, y

    def chunks(self):
        for i in range(0, self.pos.size, CHUNK):
            p = self.pos[i:i + CHUNK]
            if self.conv:
                yield df.im2col(self.x, *self.geo, positions=p), df.responses(self.y, p)
            else:
                yield self.xm[p].T, self.y.reshape(self.xm.shape[0], -1)[p].T


def _grouped(W, X, group):
    """Block-diagonal product: W (N, K/g) on X (K, n)."""
    N, kg = W.shape
    ng = N // group
    return np.vstack([W[j * ng:(j + 1) * ng] @ X[j * kg:(j + 1) * kg] for j in range(group)])


def _conv_group(layer):
    return conv_geometry(layer).group if layer.type == "Convolution" else 1


def _weights(layer):
    """(W (N, K/g) float64, bias or None) of a conv / InnerProduct layer."""
    W = np.asarray(layer.blobs[0], np.float64)
    if layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose:
        W = W.T
    b = np.asarray(layer.blobs[1], np.float64) if len(layer.blobs) > 1 else None
    return W.reshape(W.shape[0], -1), b


def _set_weights(layer, W, b):
    shape = layer.blobs[0].shape
    if layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose:
        W = np.asarray(W).T
    layer.blobs = [np.ascontiguousarray(W, dtype=np.float32).reshape(shape)] + \
        ([np.asarray(b, np.float32).reshape(layer.blobs[1].shape)] if b is not None and len(layer.blobs) > 1 else [])


# ---------------------------------------------------------------------------
# fitting one chain

def _pair_fit(first, last, W, b, x, y, opts, seed):
    """Zhang + re-fit of (first: conv/IP computing ``Q W``, last: 1x1 / IP) to the target y on inputs x.

    ``W``/``b``: the dense layer the pair replaces (``(N, K/g)``), in ``first``'s geometry."""
    g = _conv_group(first)
    r = _weights(first)[0].shape[0] // g
    cols = _Cols(first, x, y, opts["max_positions"], seed)
    intercept = b is not None
    if opts["zhang"]:
        m = df.Moments()
        for X, Y in cols.chunks():
            Yh = _grouped(W, X, g) + (b[:, None] if intercept else 0)
            m.add(Yh, Y)
        W1, W2, b2 = df.zhang_fit(W, b, m, r, opts["damping"], group=g, intercept=intercept)
    else:
        W1, (W2, b2) = _weights(first)[0], _weights(last)
    if opts["refit"]:
        W2, b2 = _refit(((_grouped(W1, X, g), Y) for X, Y in cols.chunks()), W2, g, intercept, opts)
    W1, W2 = df.balance(W1, W2, g)
    _set_weights(first, W1, None)
    _set_weights(last, W2, b2 if intercept else None)


def _last_fit(prev_layers, last, x, y, opts, seed):
    """Least-squares re-fit of ``last`` on the outputs of ``prev_layers`` (run on x)."""
    z = x
    for layer in prev_layers:
        z = opts["run"](layer, [z])[0]
    W2, b2 = _weights(last)
    cols = _Cols(last, z, y, opts["max_positions"], seed)
    A, c = _refit(cols.chunks(), W2, _conv_group(last), b2 is not None, opts)
    _set_weights(last, A, c if b2 is not None else None)


def _refit(chunks, prior, g, intercept, opts):
    """Ridge re-fit of a last factor on (inputs, target) chunks; ReLU-aware when its output feeds one."""
    def fit(mm):
        return df.ridge_fit(mm, opts["damping"], prior=prior, group=g, intercept=intercept)

    if opts.get("relu"):
        Xs, Ys = zip(*chunks)
        X, Y = np.concatenate(Xs, axis=1), np.concatenate(Ys, axis=1)
        return _relu_refine(df.Moments.of(X, Y), X, Y, fit, lambda A, c: _grouped(A, X, g) + c[:, None])
    m = df.Moments()
    for X, Y in chunks:
        m.add(X, Y)
    return fit(m)


def _fit_chain(scheme, chain, orig, x, y, opts, seed):
    W, b = _weights(orig)
    if scheme in ("channel", "fc"):
        _pair_fit(chain[0], chain[1], W, b, x, y, opts, seed)
    elif scheme == "spatial":
        _last_fit(chain[:1], chain[1], x, y, opts, seed)
    else:  # tucker2: the core and the last 1x1 are a channel pair on the first 1x1's outputs
        z = opts["run"](chain[0], [x])[0]
        g = _conv_group(chain[1])
        W2, W3 = _weights(chain[1])[0], _weights(chain[2])[0]
        r2, n = W2.shape[0] // g, W3.shape[0] // g
        D = np.vstack([W3[j * n:(j + 1) * n] @ W2[j * r2:(j + 1) * r2] for j in range(g)])
        _pair_fit(chain[1], chain[2], D, b, z, y, opts, seed)


# ---------------------------------------------------------------------------
# the passes

def _chains(net_new, plan, net_orig):
    index = {layer.name: i for i, layer in enumerate(net_new.layers)}
    orig = {layer.name: layer for layer in net_orig.layers}
    out = {}
    for name, lp in plan.items():
        scheme = getattr(lp, "scheme", lp)
        if name not in orig:
            raise Precondition(f"no layer named '{name}' in the original net")
        scheme = "fc" if orig[name].type == "InnerProduct" else scheme
        names = new_names(name, scheme)
        if any(n not in index for n in names):
            raise Precondition(f"layer '{name}': its factors {', '.join(names)} are not in the new net")
        out[index[names[0]]] = (name, scheme, [index[n] for n in names])
    return out


@graph_pass("calibrate_factorized")
def calibrate_factorized(net_new, *, original, plan: dict, calib_inputs: dict, damping=df.DEFAULT_DAMPING,
                         max_positions=256, seed=0, zhang=True, refit=True, relu_aware=True, run=None,
                         progress=None) -> PassResult:
    """Refit every chain of ``plan`` ({original name: LayerPlan or scheme}) in ``net_new`` in place.

    See the module docstring. ``original``: the net before factorizing (never
    changed; layers ``net_new`` shares with it are copied before a write).
    ``calib_inputs``: {input blob: array}. ``zhang=False``: keep the data-free
    first factors; ``refit=False``: no last-factor re-fit; ``relu_aware``: a
    layer whose output only a ReLU reads is re-fit to Zhang et al.'s
    ReLU-aware targets (Sec. 3.2, the auxiliary-variable iteration), so the
    fit is not spent on values the ReLU cuts. ``run``: a
    ``(layer, bottom arrays) -> top arrays`` callable to use instead of the
    numpy forward (e.g. an engine's, injected by a caller above transforms/).
    Returns a PassResult
    whose details hold, per layer, the output's relative L2 error on the
    calibration inputs before and after.
    """
    net_orig = original
    _check((net_orig, net_new), calib_inputs, numpy_forward=run is None)
    run = run or run_layer
    chains = _chains(net_new, plan, net_orig)
    opts = dict(damping=damping, max_positions=max_positions, zhang=zhang, refit=refit, run=run)
    ref = _reference(net_orig, net_new, inner=False)
    R, N = _Runner(ref, calib_inputs, run), _Runner(net_new.layers, calib_inputs, run)
    details, i = [], 0
    while i < len(net_new.layers):
        if i not in chains:
            _lockstep(R, N, ref, net_new, i)
            i += 1
            continue
        name, scheme, idx = chains[i]
        for j in idx:
            R.step(j)
        y = R.blobs[net_new.layers[idx[-1]].tops[0]]
        x = N.blobs[net_new.layers[i].bottoms[0]]
        chain = [_own(net_new, net_orig, j) for j in idx]
        before = _run_chain(chain, x, run)
        opts["relu"] = relu_aware and feeds_relu(net_new, idx[-1])
        _fit_chain(scheme, chain, ref[idx[-1]], x, y, opts, seed + i)
        for j in idx:
            N.step(j, net_new.layers[j])
        after = N.blobs[chain[-1].tops[0]]
        details.append({"name": name, "scheme": scheme, "calib_rel_l2_before": _rel(before, y),
                        "calib_rel_l2_after": _rel(after, y)})
        if progress is not None:
            progress(name)
        i = idx[-1] + 1
    return PassResult("calibrate_factorized", changed=bool(details), details=details)


def _run_chain(chain, x, run=run_layer):
    for layer in chain:
        x = run(layer, [x])[0]
    return x


def _lockstep(R, N, ref, net_new, i):
    layer = net_new.layers[i]
    shared = ref[i] is layer and all(N.blobs.get(b) is R.blobs.get(b) for b in layer.bottoms)
    R.step(i)
    if shared and layer.type != "Input":
        for t in layer.tops:
            N.blobs[t] = R.blobs[t]
        N.free(i)
    else:
        N.step(i, layer)


@graph_pass("calibrate_pruned")
def calibrate_pruned(net_new, *, original, masks: dict, calib_inputs: dict, dense=None,
                     damping=df.DEFAULT_DAMPING, max_positions=256, seed=0, prune_method="resolve",
                     prior="dense", max_inputs=8192, relu_aware=True, run=None, progress=None) -> PassResult:
    """Re-solve the kept weights of every masked layer of ``net_new``, sequentially (see the module docstring).

    ``masks``: {"<layer>/0": bool array like the weights, True = keep} (:mod:`lrprune_caffe.ir.masks`); with
    ``prune_method="sparsegpt"`` the entries are replaced by the new masks.
    ``dense``: the net before the masks were applied (default: ``net_new`` as
    it is now), the source of the dense weights for inner-factor targets and
    for ``prior="dense"`` (pull the kept weights toward their dense values;
    ``"zero"``: plain ridge). Layers with more than ``max_inputs`` inputs per
    group are left as they are (the K x K Gram matrix would not fit).
    ``original``: the uncompressed net (targets; never changed). ``run``: as
    in :func:`calibrate_factorized`.
    """
    net_orig = original
    if prune_method not in ("resolve", "sparsegpt"):
        raise ValueError(f"unknown prune_method {prune_method!r}")
    _check((net_orig, net_new), calib_inputs, numpy_forward=run is None)
    run = run or run_layer
    names = {layer.name for layer in net_new.layers}
    for name, idx in map(split_key, masks):
        if name not in names or idx != 0:
            raise Precondition(f"mask for '{name}/{idx}': no such weights in the new net")
    if dense is None:
        dense = type(net_new)(net_new.name, [layer.copy() for layer in net_new.layers])
    dense_by_name = {layer.name: layer for layer in dense.layers}
    ref = _reference(net_orig, net_new, dense=dense)
    R, N = _Runner(ref, calib_inputs, run), _Runner(net_new.layers, calib_inputs, run)
    details = []
    for i, layer in enumerate(net_new.layers):
        key = mask_key(layer.name, 0)
        if key not in masks or layer.type not in ("Convolution", "InnerProduct"):
            if key in masks:
                details.append({"name": layer.name, "skipped": f"{layer.type} weights are not re-solved"})
            _lockstep(R, N, ref, net_new, i)
            continue
        R.step(i)
        y = R.blobs[layer.tops[0]]
        x = N.blobs[layer.bottoms[0]]
        layer = _own(net_new, net_orig, i)
        g = _conv_group(layer)
        Wd, bd = _weights(dense_by_name.get(layer.name, layer))
        if Wd.shape[1] > max_inputs:
            N.step(i, layer)
            details.append({"name": layer.name, "skipped": f"{Wd.shape[1]} inputs per group > {max_inputs}"})
            continue
        before = run(layer, [x])[0]
        mask = np.asarray(masks[key], bool)
        transpose = layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose
        M = (mask.T if transpose else mask).reshape(Wd.shape[0], -1)
        W, c, M = _prune_fit(layer, x, y, M, Wd, bd, g, damping, max_positions, seed + i, prune_method, prior,
                             relu_aware and feeds_relu(net_new, i))
        _set_weights(layer, W, c)
        masks[key] = (M.T if transpose else M).reshape(mask.shape)
        N.step(i, layer)
        details.append({"name": layer.name, "calib_rel_l2_before": _rel(before, y),
                        "calib_rel_l2_after": _rel(N.blobs[layer.tops[0]], y),
                        "kept": float(np.mean(masks[key]))})
        if progress is not None:
            progress(layer.name)
    return PassResult("calibrate_pruned", changed=any("skipped" not in d for d in details), details=details)


def _prune_fit(layer, x, y, M, Wd, bd, g, damping, max_positions, seed, method, prior, relu):
    cols = _Cols(layer, x, y, max_positions, seed)
    M = M.copy()
    N_, kg = Wd.shape
    ng = N_ // g
    if relu:
        X, Y = _gather(cols)
        chunks = [(X, Y)]
    else:
        chunks = cols.chunks()
    ms = [df.Moments() for _ in range(g)]
    for X, Y in chunks:
        for j in range(g):
            ms[j].add(X[j * kg:(j + 1) * kg], Y[j * ng:(j + 1) * ng])
    W = np.zeros_like(Wd)
    c = np.zeros(N_)
    intercept = bd is not None
    for j in range(g):
        rows = slice(j * ng, (j + 1) * ng)
        Mj = M[rows]
        if method == "sparsegpt":
            k = int(np.sum(~Mj))
            _, _, Mj = pf.sparsegpt(ms[j], sparsity=k / Mj.size, damping=damping, intercept=intercept)
        p = Wd[rows] if prior == "dense" else None

        def fit(mm, Mj=Mj, p=p):
            return pf.masked_fit(mm, Mj, damping, prior=p, intercept=intercept)

        if relu:
            Xj, Yj = X[j * kg:(j + 1) * kg], Y[rows]
            W[rows], c[rows] = _relu_refine(ms[j], Xj, Yj, fit, lambda A, b, Xj=Xj: A @ Xj + b[:, None])
        else:
            W[rows], c[rows] = fit(ms[j])
        M[rows] = Mj
    return W, (c if intercept else None), M


__all__ = ["calibrate_factorized", "calibrate_pruned", "feeds_relu", "CHUNK", "MAX_COLUMNS"]
