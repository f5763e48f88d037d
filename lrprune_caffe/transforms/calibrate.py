"""Pass ``calibrate_factorized``: fit the factorized layers to the original net's outputs on
calibration data (no labels). (Masked layers: :mod:`.calibrate_prune`; the runners and sampled
columns both passes use: :mod:`.calib_run`.)

**Before**: ``net_new`` = ``net_orig`` after :func:`~.factorize.factorize` (data-free
factors); a few hundred calibration inputs.

**After**: the same graph; only blob values change: every factorized chain, in
net order, is refit to the original layer's output ``y = W x + b`` on the
inputs ``x^`` that the already calibrated layers below produce (asymmetric,
sequential):

- channel / FC: Zhang et al. 2015's response reconstruction (first factor
  ``Q W``, second ``P``, bias corrected), then a least-squares re-fit of the
  last factor on the first factor's actual outputs, then the two factors
  balanced (equal norms per rank component, as the data-free factors are,
  so that magnitude pruning afterwards treats both layers alike);
- Tucker-2: the first 1x1 is kept; the core and the last 1x1 are fit as a
  channel pair by Zhang's method on the first 1x1's outputs, then the last
  re-fit;
- spatial: least-squares re-fit of the last (1 x kw) factor.

Convolutions are fit at ``max_positions`` output positions per image
(seeded; fewer when the images times that exceed
:data:`~.calib_run.MAX_COLUMNS`), so the cost stays bounded on large images
and many images; all fits work on float64 second moments accumulated over
chunks of positions. Both nets run on the whole fit set a layer at a time
(:class:`~.calib_run.Runner`) and stop after the last chain: the layers above
it have no target. A large target (VGG-16's conv1_2 on 52 images: 0.67 GB) is
computed a chunk of images at a time with the per-image layers after it
(ReLU, pooling) and kept only at the sampled positions
(:func:`~.calib_run.fused_reference`; the same values). The details' ``calib_rel_l2_before`` / ``_after`` are the
chain's relative L2 error at the sampled positions (data-free / fitted).

**Preconditions** (checked before anything changes; else ``Precondition``):
every layer of both nets has a numpy forward (:mod:`.forward`) unless a
``run`` is given, the inputs cover every net input, and each layer in
``plan`` has its chain in ``net_new``.

**Formula**: :mod:`lrprune_caffe.lowrank.datafit`. Damping
``lambda = d * mean(diag(sum x x^T))``, d = ``damping`` (0.01), pulling toward
the data-free factors rather than 0.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.lowrank import datafit as df
from . import PassResult, Precondition, graph_pass
from .calib_run import (CHUNK, MAX_COLUMNS, Cols, Runner, affine, check_nets, col_rel, conv_group, feeds_relu,
                        fusable, fused_reference, grouped, lockstep, own, reference, relu_refine, set_weights,
                        weights)
from .calibrate_prune import calibrate_pruned
from .factorize import new_names
from .forward import run_layer

_reference = reference  # the names tests and older callers use
_Cols = Cols


# ---------------------------------------------------------------------------
# fitting one chain: each returns (relative L2 error at the sampled columns before, after)

def _pair_fit(first, last, W, b, x, y, opts, seed):
    """Zhang + re-fit of (first: conv/IP computing ``Q W``, last: 1x1 / IP) to the target y on inputs x.

    ``W``/``b``: the dense layer the pair replaces (``(N, K/g)``), in ``first``'s geometry."""
    g = conv_group(first)
    W1, (W2, b2) = weights(first)[0], weights(last)
    r = W1.shape[0] // g
    cols = Cols(first, x, y, opts["max_positions"], seed)
    del x, y
    intercept = b is not None
    before = col_rel(cols.chunks(), affine((W1, None), (W2, b2), group=g))
    if opts["zhang"]:
        m = df.Moments()
        W32 = W.astype(np.float32)  # products in float32, as the nets compute them; the moments in float64
        for X, Y in cols.chunks():
            Yh = grouped(W32, X, g) + (b[:, None] if intercept else 0)
            m.add(Yh, Y)
        W1, W2, b2 = df.zhang_fit(W, b, m, r, opts["damping"], group=g, intercept=intercept)
    if opts["refit"]:
        W1_32 = W1.astype(np.float32)
        W2, b2 = _refit(((grouped(W1_32, X, g), Y) for X, Y in cols.chunks()), W2, g, intercept, opts)
    W1, W2 = df.balance(W1, W2, g)
    set_weights(first, W1, None)
    set_weights(last, W2, b2 if intercept else None)
    return before, col_rel(cols.chunks(), affine(weights(first), weights(last), group=g))


def _last_fit(prev_layers, last, x, y, opts, seed):
    """Least-squares re-fit of ``last`` on the outputs of ``prev_layers`` (run on x)."""
    z = x
    for layer in prev_layers:
        z = opts["run"](layer, [z])[0]
    del x
    W2, b2 = weights(last)
    g = conv_group(last)
    cols = Cols(last, z, y, opts["max_positions"], seed)
    del z, y
    before = col_rel(cols.chunks(), affine((W2, b2), group=g))
    A, c = _refit(cols.chunks(), W2, g, b2 is not None, opts)
    set_weights(last, A, c if b2 is not None else None)
    return before, col_rel(cols.chunks(), affine(weights(last), group=g))


def _refit(chunks, prior, g, intercept, opts):
    """Ridge re-fit of a last factor on (inputs, target) chunks; ReLU-aware when its output feeds one."""
    def fit(mm):
        return df.ridge_fit(mm, opts["damping"], prior=prior, group=g, intercept=intercept)

    if opts.get("relu"):
        Xs, Ys = zip(*chunks)
        X, Y = np.concatenate(Xs, axis=1), np.concatenate(Ys, axis=1)
        return relu_refine(df.Moments.of(X, Y), X, Y, fit, lambda A, c: grouped(A, X, g) + c[:, None])
    m = df.Moments()
    for X, Y in chunks:
        m.add(X, Y)
    return fit(m)


def _fit_chain(scheme, chain, orig, x, y, opts, seed):
    W, b = weights(orig)
    if scheme in ("channel", "fc"):
        return _pair_fit(chain[0], chain[1], W, b, x, y, opts, seed)
    if scheme == "spatial":
        return _last_fit(chain[:1], chain[1], x, y, opts, seed)
    # tucker2: the core and the last 1x1 are a channel pair on the first 1x1's outputs
    z = opts["run"](chain[0], [x])[0]
    del x
    g = conv_group(chain[1])
    W2, W3 = weights(chain[1])[0], weights(chain[2])[0]
    r2, n = W2.shape[0] // g, W3.shape[0] // g
    D = np.vstack([W3[j * n:(j + 1) * n] @ W2[j * r2:(j + 1) * r2] for j in range(g)])
    return _pair_fit(chain[1], chain[2], D, b, z, y, opts, seed)


# ---------------------------------------------------------------------------
# the pass

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
    Returns a PassResult whose details hold, per layer, the output's relative
    L2 error on the calibration inputs (at the sampled positions) before and after.
    """
    net_orig = original
    check_nets((net_orig, net_new), calib_inputs, numpy_forward=run is None)
    run = run or run_layer
    chains = _chains(net_new, plan, net_orig)
    opts = dict(damping=damping, max_positions=max_positions, zhang=zhang, refit=refit, run=run)
    ref = reference(net_orig, net_new, inner=False)
    R = Runner(ref, calib_inputs, run)
    N = Runner(net_new.layers, calib_inputs, run, peer=R)
    details, i = [], 0
    end = max((idx[-1] for _, _, idx in chains.values()), default=-1)
    while i <= end:  # the layers above the last chain have no target: neither net runs them
        if i not in chains:
            lockstep(R, N, ref, net_new, i)
            i += 1
            continue
        name, scheme, idx = chains[i]
        for j in idx[:-1]:
            R.step(j)  # nothing: the chain's inner layers have no reference
        # the target: the reference layer's output, only at the sampled positions when it is large
        y = fused_reference(R, idx[-1], fusable(R, net_new.layers, idx[-1], chains), max_positions, seed + i)
        if y is None:
            R.step(idx[-1])
            y = R.blobs[net_new.layers[idx[-1]].tops[0]]
        chain = [own(net_new, net_orig, j) for j in idx]
        opts["relu"] = relu_aware and feeds_relu(net_new, idx[-1])
        before, after = _fit_chain(scheme, chain, ref[idx[-1]], N.blobs[net_new.layers[i].bottoms[0]],
                                   y, opts, seed + i)
        del y
        for j in idx:
            N.step(j, net_new.layers[j])
        details.append({"name": name, "scheme": scheme, "calib_rel_l2_before": before,
                        "calib_rel_l2_after": after})
        if progress is not None:
            progress(name)
        i = idx[-1] + 1
    return PassResult("calibrate_factorized", changed=bool(details), details=details)


__all__ = ["calibrate_factorized", "calibrate_pruned", "feeds_relu", "CHUNK", "MAX_COLUMNS"]
