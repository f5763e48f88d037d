"""Pass ``calibrate_pruned``: re-solve the kept weights of masked layers on calibration data (no labels).

**Before**: ``net_new`` with pruning masks (``{"<layer>/0": keep}``,
:mod:`lrprune_caffe.ir.masks`) applied to its conv / InnerProduct weights,
possibly factorized (and calibrated) first; ``dense``: the same net before the
masks; a few hundred calibration inputs.

**After**: the same graph; every masked layer, in net order, keeps its mask
and re-solves the kept weights of each output row (and the bias) by masked
least squares (``prune_method="resolve"``), or first re-chooses the mask at
the layer's sparsity by SparseGPT saliency (``"sparsegpt"``; the masks dict is
updated). The target of a layer whose output the original net has is the
original output; the target of an inner factor (``conv2_lr1``) is its dense
version applied to the original net's input of the chain. The fit inputs are
what the already re-solved layers below produce (sequential, asymmetric).
Convolutions are fit at sampled positions as in :mod:`.calibrate`; both nets
stop after the last masked layer. ``calib_rel_l2_before`` / ``_after``: the
layer's relative L2 error at the sampled positions (masked dense weights /
re-solved).

**Preconditions** (else ``Precondition``, nothing changed): every layer of both
nets has a numpy forward unless a ``run`` is given, the inputs cover every net
input, and every mask names index-0 weights of a layer of ``net_new``. A
layer with more than ``max_inputs`` inputs per group is left as it is (said
in its details: the K x K Gram matrix would not fit).

**Formula**: :mod:`lrprune_caffe.lowrank.prunefit` (masked ridge per output row,
pulled toward the dense weights with ``prior="dense"``; SparseGPT's
``w^2 / [H^-1]_jj`` saliency), damping ``lambda = d * mean(diag(sum x x^T))``.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.ir.masks import mask_key, split_key
from lrprune_caffe.lowrank import datafit as df, prunefit as pf
from . import PassResult, Precondition, graph_pass
from .calib_run import (Cols, Runner, affine, check_nets, col_rel, conv_group, feeds_relu, lockstep, own,
                        reference, relu_refine, set_weights, weights)
from .forward import run_layer


def _masked(layer, masks):
    return mask_key(layer.name, 0) in masks and layer.type in ("Convolution", "InnerProduct")


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
    in :func:`~.calibrate.calibrate_factorized`.
    """
    net_orig = original
    if prune_method not in ("resolve", "sparsegpt"):
        raise ValueError(f"unknown prune_method {prune_method!r}")
    check_nets((net_orig, net_new), calib_inputs, numpy_forward=run is None)
    run = run or run_layer
    names = {layer.name for layer in net_new.layers}
    for name, idx in map(split_key, masks):
        if name not in names or idx != 0:
            raise Precondition(f"mask for '{name}/{idx}': no such weights in the new net")
    if dense is None:
        dense = type(net_new)(net_new.name, [layer.copy() for layer in net_new.layers])
    dense_by_name = {layer.name: layer for layer in dense.layers}
    ref = reference(net_orig, net_new, dense=dense)
    R = Runner(ref, calib_inputs, run)
    N = Runner(net_new.layers, calib_inputs, run, peer=R)
    details = []
    end = max((i for i, layer in enumerate(net_new.layers) if _masked(layer, masks)), default=-1)
    for i, layer in enumerate(net_new.layers):
        if i > end:  # above the last masked layer: nothing to fit, neither net runs
            for later in net_new.layers[i:]:
                if mask_key(later.name, 0) in masks:
                    details.append({"name": later.name, "skipped": f"{later.type} weights are not re-solved"})
            break
        key = mask_key(layer.name, 0)
        if not _masked(layer, masks):
            if key in masks:
                details.append({"name": layer.name, "skipped": f"{layer.type} weights are not re-solved"})
            lockstep(R, N, ref, net_new, i)
            continue
        R.step(i)
        layer = own(net_new, net_orig, i)
        Wd, bd = weights(dense_by_name.get(layer.name, layer))
        if Wd.shape[1] > max_inputs:
            N.step(i, layer)
            details.append({"name": layer.name, "skipped": f"{Wd.shape[1]} inputs per group > {max_inputs}"})
            continue
        mask = np.asarray(masks[key], bool)
        transpose = layer.type == "InnerProduct" and layer.param_msg("inner_product_param").transpose
        M = (mask.T if transpose else mask).reshape(Wd.shape[0], -1)
        cols = Cols(layer, N.blobs[layer.bottoms[0]], R.blobs[layer.tops[0]], max_positions, seed + i)
        g = conv_group(layer)
        before = col_rel(cols.chunks(), affine(weights(layer), group=g))
        W, c, M = _prune_fit(cols, M, Wd, bd, g, damping, prune_method, prior, relu_aware and feeds_relu(net_new, i))
        set_weights(layer, W, c)
        masks[key] = (M.T if transpose else M).reshape(mask.shape)
        after = col_rel(cols.chunks(), affine(weights(layer), group=g))
        del cols
        N.step(i, layer)
        details.append({"name": layer.name, "calib_rel_l2_before": before, "calib_rel_l2_after": after,
                        "kept": float(np.mean(masks[key]))})
        if progress is not None:
            progress(layer.name)
    return PassResult("calibrate_pruned", changed=any("skipped" not in d for d in details), details=details)


def _prune_fit(cols, M, Wd, bd, g, damping, method, prior, relu):
    """(W, bias or None, mask) of one layer from its sampled columns: per group, masked least squares
    (the mask first re-chosen by SparseGPT with ``method="sparsegpt"``), ReLU-aware when ``relu``."""
    M = M.copy()
    N_, kg = Wd.shape
    ng = N_ // g
    if relu:
        X, Y = cols.gather()
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
            W[rows], c[rows] = relu_refine(ms[j], Xj, Yj, fit, lambda A, b, Xj=Xj: A @ Xj + b[:, None])
        else:
            W[rows], c[rows] = fit(ms[j])
        M[rows] = Mj
    return W, (c if intercept else None), M


__all__ = ["calibrate_pruned"]
