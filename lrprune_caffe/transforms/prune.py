"""Pass ``prune``: zero the weights of smallest magnitude (unstructured pruning).

**Before**: a net whose ``Convolution`` / ``Deconvolution`` / ``InnerProduct``
layers hold dense weights (blob 0).

**After**: the same net, same shapes, with the pruned weights exactly +0.0;
:func:`prune_net` also returns the masks (``{"<layer>/<idx>": keep bool
array}``, :mod:`lrprune_caffe.ir.masks`) and per-layer rows. Biases,
BatchNorm, Scale, Bias and PReLU blobs are never touched.

**Preconditions** (:func:`check_spec`, before anything changes; a failure is a
:class:`UserError` and the net is untouched): known scope and method,
fractions in [0, 1), every named layer exists and has prunable weights, no
layer both given a fraction and excluded; ``method="std"`` needs a quality
Q >= 0.

**Formula** (:class:`PruneSpec`; the masks are planned by :func:`plan_masks`
without changing the net, then applied by :func:`lrprune_caffe.ir.masks.apply_masks`):

* ``method="magnitude"`` (default), ``scope="layer"``: in each selected layer
  the ``round(f * size)`` weights of smallest ``|w|`` are zeroed (exactly that
  many; ties broken by position in C order);
* ``method="magnitude"``, ``scope="global"``: one threshold over all layers
  that use the default fraction: the ``round(f * total)`` smallest ``|w|`` of
  their concatenation (layer order, then C order, for ties). Layers with a
  per-layer override are pruned on their own at their own fraction;
* ``method="magnitude"``, ``scope="erk"`` (Erdos-Renyi-kernel allocation, Evci,
  Gale, Menick, Castro & Elsen 2020, "Rigging the Lottery", sec. 3; RigL's
  ``sparse_utils.get_sparsities``): the layers that use the default fraction
  together keep ``(1 - f) * total`` weights, layer ``l`` a density
  ``eps * sum(shape_l) / prod(shape_l)`` of its blob 0 (out, in, kh, kw: more
  for small layers and few weights per output), ``eps`` shared; a layer whose
  density would exceed 1 is left dense (the one with the largest ratio first,
  then ``eps`` is solved again). Each layer is then pruned on its own to
  ``round((1 - density) * size)`` weights of smallest ``|w|``. Overrides as for
  global;
* ``method="std"`` (Han, Pool, Tran & Dally 2015, "Learning both Weights and
  Connections for Efficient Neural Networks", NIPS, sec. 3: "the pruning
  threshold is chosen as a quality parameter multiplied by the standard
  deviation of a layer's weights"): weights with ``|w| < Q * std(W)`` are
  zeroed (``std`` over the layer, or over the pooled layers for
  ``scope="global"``). The fraction only selects layers here (0 = leave out,
  ``None`` = every prunable layer); ``per_layer_quality`` overrides Q per layer.

Structured pruning (whole output filters / rank components) is the graph pass
:func:`lrprune_caffe.transforms.structured_prune.prune_structured`; :func:`prune_net`
dispatches to it when ``spec.structured``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.analysis import sparsity_rows
from lrprune_caffe.ir.layers import prunable_types
from lrprune_caffe.ir.masks import apply_masks, mask_key

from . import PassResult, graph_pass, run_pass

#: layer types whose blob 0 (the weights) may be pruned (``LayerSpec.prunable``)
PRUNABLE_TYPES = prunable_types()
SCOPES = ("layer", "global", "erk")
METHODS = ("magnitude", "std")


@dataclass
class PruneSpec:
    """What to prune.

    ``fraction``: default fraction of each prunable layer's weights to zero
    (``None``: only the layers named in ``per_layer``; with ``method="std"``,
    ``None`` means every prunable layer). ``per_layer``: {layer: fraction}
    overrides (0 leaves the layer out). ``exclude``: layers never pruned.
    ``scope``: "layer" | "global" | "erk". ``method``: "magnitude" | "std" (needs
    ``quality``). ``structured``: remove whole output filters / rank
    components instead of single weights (per layer, magnitude only).
    """

    fraction: Optional[float] = None
    per_layer: dict = field(default_factory=dict)
    exclude: tuple = ()
    scope: str = "layer"
    method: str = "magnitude"
    quality: Optional[float] = None
    per_layer_quality: dict = field(default_factory=dict)
    structured: bool = False


def _fraction(value, what) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}: '{value}' is not a number (expected a fraction in [0, 1))") from None
    if not (0.0 <= f < 1.0):  # also rejects NaN
        raise UserError(f"{what}: fraction {value} is outside [0, 1)")
    return f


def parse_prune_arg(text: str):
    """``"0.5"`` -> (0.5, {}); ``"conv1=0.3,ip1=0.9"`` -> (None, {"conv1": 0.3, "ip1": 0.9});
    ``"0.5,ip2=0"`` -> (0.5, {"ip2": 0.0}). A layer given ``0`` (or ``skip``) is left out.
    Fractions must lie in [0, 1) (UserError otherwise). Layer names are checked
    against the net later (:func:`resolve_targets`)."""
    default, overrides = None, {}
    if text is None or not str(text).strip():
        raise UserError("--prune: empty value (expected FRACTION or LAYER=FRACTION,...)")
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            name, value = part.rsplit("=", 1)
            name = name.strip()
            if not name:
                raise UserError(f"--prune: '{part}' has no layer name before '='")
            if name in overrides:
                raise UserError(f"--prune: layer '{name}' is given twice")
            value = value.strip()
            overrides[name] = 0.0 if value.lower() in ("skip", "none", "off") else \
                _fraction(value, f"--prune {name}")
        else:
            if default is not None:
                raise UserError(f"--prune: two default fractions ('{default}' and '{part}')")
            default = _fraction(part, "--prune")
    return default, overrides


def parse_layer_list(text) -> tuple:
    """``"conv1,ip2"`` -> ("conv1", "ip2")."""
    if not text:
        return ()
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def prunable_layers(net) -> list:
    """Layers whose weights can be pruned (right type, weights loaded)."""
    return [layer for layer in net.layers if layer.type in PRUNABLE_TYPES and layer.blobs]


def _check_names(net, names, what):
    prunable = {layer.name for layer in prunable_layers(net)}
    for name in names:
        if name not in net:
            listing = ", ".join(sorted(prunable)) or "none"
            raise UserError(f"{what}: no layer named '{name}' in the net (prunable layers: {listing})")
        if name not in prunable:
            layer = net.layer(name)
            why = "has no weights loaded" if layer.type in PRUNABLE_TYPES else "has no weights to prune"
            raise UserError(f"{what}: layer '{name}' ({layer.type}) {why} "
                            f"(prunable types: {', '.join(PRUNABLE_TYPES)})")


def check_spec(net, spec: PruneSpec) -> None:
    """Raise UserError for an impossible request (before anything is changed)."""
    if spec.scope not in SCOPES:
        raise UserError(f"--prune-scope: '{spec.scope}' is not one of {', '.join(SCOPES)}")
    if spec.method not in METHODS:
        raise UserError(f"--prune-method: '{spec.method}' is not one of {', '.join(METHODS)}")
    if spec.fraction is not None:
        _fraction(spec.fraction, "--prune")
    for name, f in spec.per_layer.items():
        _fraction(f, f"--prune {name}")
    _check_names(net, list(spec.per_layer), "--prune")
    _check_names(net, list(spec.exclude), "--prune-exclude")
    both = [n for n in spec.per_layer if n in spec.exclude and spec.per_layer[n]]
    if both:
        raise UserError(f"--prune: layer '{both[0]}' is both given a fraction and excluded")
    if spec.method == "std":
        if spec.quality is None:
            raise UserError("--prune-method std needs --quality Q (threshold = Q x the layer's weight std)")
        for name, q in [("--quality", spec.quality), *spec.per_layer_quality.items()]:
            try:
                ok = float(q) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UserError(f"{name}: quality {q} must be a number >= 0")
        _check_names(net, list(spec.per_layer_quality), "--quality")
    if spec.structured:
        if spec.method != "magnitude":
            raise UserError("--prune-structured removes whole filters by their norm; "
                            "it cannot be combined with --prune-method std")
        if spec.scope != "layer":
            raise UserError("--prune-structured works per layer; it cannot be combined with "
                            f"--prune-scope {spec.scope}")
    if spec.method == "std" and spec.scope == "erk":
        raise UserError("--prune-scope erk allocates a fraction (--prune) over the layers; --prune-method std "
                        "takes no fraction (use --prune-scope layer or global)")


def resolve_targets(net, spec: PruneSpec) -> dict:
    """{layer name: fraction} of the layers to prune (fraction > 0), in net order.
    Under ``method="std"`` the value is the layer's selecting fraction (1.0 when all)."""
    check_spec(net, spec)
    if spec.method == "std" and spec.fraction is None:
        default = 1.0  # std: every prunable layer; LAYER=0 (or --prune-exclude) leaves one out
    else:
        default = float(spec.fraction or 0.0)
    out = {}
    for layer in prunable_layers(net):
        if layer.name in spec.exclude:
            continue
        f = float(spec.per_layer.get(layer.name, default))
        if f > 0:
            out[layer.name] = f
    if not out and prunable_layers(net):
        raise UserError("the pruning options leave no layer to prune (every one is excluded or given 0): "
                        "nothing would change")
    return out


# ---------------------------------------------------------------------------
# masks

def smallest_k_masks(arrays, k: int) -> list:
    """Keep-masks for ``arrays`` such that exactly the ``k`` entries of smallest
    ``|value|`` over all of them are pruned (False). Ties at the threshold are
    pruned in order (array order, then C order), so the count is exact."""
    arrays = [np.asarray(a) for a in arrays]
    total = sum(a.size for a in arrays)
    k = int(max(0, min(k, total)))
    if k == 0:
        return [np.ones(a.shape, dtype=bool) for a in arrays]
    flat = np.concatenate([np.abs(a.ravel()).astype(np.float32, copy=False) for a in arrays])
    flat.partition(k - 1)
    t = flat[k - 1]
    del flat
    masks = []
    n_less = sum(int(np.count_nonzero(np.abs(a) < t)) for a in arrays)
    need_eq = k - n_less  # how many entries equal to t are pruned, first ones first
    for a in arrays:
        absa = np.abs(a)
        keep = absa > t
        eq = np.flatnonzero(absa.ravel() == t)
        if eq.size:
            take = min(need_eq, eq.size)
            keep.reshape(-1)[eq[take:]] = True  # ties beyond the k-th stay
            need_eq -= take
        masks.append(keep)
    return masks


def _std_mask(w, threshold):
    return np.abs(w) >= threshold


def compute_masks(net, spec: PruneSpec) -> dict:
    """{"<layer>/0": keep bool array} for every layer the spec prunes (unstructured).
    Nothing in ``net`` is changed. See the module docstring for the rules."""
    masks, _ = plan_masks(net, spec)
    return masks


def plan_masks(net, spec: PruneSpec):
    """(masks, {layer: {"threshold": t, "target": f or "quality": q, "scope": ...}}); the net is
    not changed. Raises UserError (:func:`check_spec`) for an impossible request."""
    return _compute(net, spec, resolve_targets(net, spec))


def erk_fractions(shapes: dict, fraction: float) -> dict:
    """{layer: fraction to prune} of the Erdos-Renyi-kernel allocation (module doc) of ``fraction`` over
    layers with blob-0 ``shapes`` ({layer: shape}): ``(1 - fraction) x total`` weights kept in all."""
    size = {n: int(np.prod(s)) for n, s in shapes.items()}
    ratio = {n: float(sum(s)) / size[n] for n, s in shapes.items() if size[n]}
    keep = (1.0 - float(fraction)) * sum(size.values())
    dense = set()
    while True:
        rest = [n for n in ratio if n not in dense]
        budget = keep - sum(size[n] for n in dense)
        denom = sum(ratio[n] * size[n] for n in rest)
        if not rest or budget <= 0 or denom <= 0:
            eps = 0.0
            break
        eps = budget / denom
        top = max(rest, key=lambda n: ratio[n])
        if eps * ratio[top] <= 1.0:
            break
        dense.add(top)
    return {n: 0.0 if n in dense else float(min(1.0, max(0.0, 1.0 - eps * ratio.get(n, 0.0)))) for n in shapes}


def _compute(net, spec, targets):
    """(masks, {layer: {"threshold": t, "target": f}})."""
    masks, info = {}, {}
    if not targets:
        return masks, info
    weights = {name: net.layer(name).blobs[0] for name in targets}
    if spec.scope == "erk" and spec.method == "magnitude":
        pooled = [n for n in targets if n not in spec.per_layer]
        alloc = erk_fractions({n: weights[n].shape for n in pooled}, float(spec.fraction or 0.0)) if pooled else {}
        for n in targets:
            f = alloc.get(n, targets[n])
            k = int(round(f * weights[n].size))
            if n in alloc and k == 0:  # the allocation leaves it dense: no mask, nothing to hold
                info[n] = {"target": 0.0, "scope": "erk", "net_target": float(spec.fraction), "kept_dense": True}
                continue
            masks[mask_key(n, 0)] = smallest_k_masks([weights[n]], k)[0]
            info[n] = {"target": f, "threshold": _threshold_of(weights, masks, [n]),
                       "scope": "erk" if n in alloc else "layer"}
            if n in alloc:
                info[n]["net_target"] = float(spec.fraction)
        return masks, info
    pooled = [n for n in targets if spec.scope == "global" and n not in spec.per_layer]
    single = [n for n in targets if n not in pooled]
    if spec.method == "magnitude":
        if pooled:
            f = float(spec.fraction)
            total = sum(weights[n].size for n in pooled)
            k = int(round(f * total))
            for n, m in zip(pooled, smallest_k_masks([weights[n] for n in pooled], k)):
                masks[mask_key(n, 0)] = m
            t = _threshold_of(weights, masks, pooled)
            for n in pooled:
                info[n] = {"target": f, "threshold": t, "scope": "global"}
        for n in single:
            f = targets[n]
            k = int(round(f * weights[n].size))
            masks[mask_key(n, 0)] = smallest_k_masks([weights[n]], k)[0]
            info[n] = {"target": f, "threshold": _threshold_of(weights, masks, [n]), "scope": "layer"}
    else:  # std (Han et al. 2015)
        q = float(spec.quality)
        pooled_std = [n for n in pooled if n not in spec.per_layer_quality]
        if pooled_std:
            allw = np.concatenate([weights[n].ravel().astype(np.float64) for n in pooled_std])
            t = q * float(np.std(allw))
            del allw
            for n in pooled_std:
                masks[mask_key(n, 0)] = _std_mask(weights[n], t)
                info[n] = {"quality": q, "threshold": t, "scope": "global"}
        for n in targets:
            if n in pooled_std:
                continue
            qn = float(spec.per_layer_quality.get(n, q))
            t = qn * float(np.std(weights[n], dtype=np.float64))
            masks[mask_key(n, 0)] = _std_mask(weights[n], t)
            info[n] = {"quality": qn, "threshold": t, "scope": "layer"}
    return masks, info


def _threshold_of(weights, masks, names):
    """Largest pruned |w| (the effective threshold), or None when nothing was pruned."""
    t = None
    for n in names:
        pruned = np.abs(weights[n][~masks[mask_key(n, 0)]])
        if pruned.size:
            v = float(pruned.max())
            t = v if t is None else max(t, v)
    return t


def prune_net(net, spec: PruneSpec):
    """Prune ``net`` in place as ``spec`` says; returns (masks, rows).

    Unstructured: masks = {"<layer>/0": keep array} (also what to save as
    masks.npz), the weights are zeroed. Structured: runs the
    ``structured_prune`` pass (the net gets smaller); masks = {} (nothing
    is zero that fine-tuning must hold). ``rows``: :func:`sparsity_rows` with,
    per pruned layer, ``target``/``quality``, ``threshold`` (unstructured) or
    ``outputs_before``/``outputs_after``/``removed`` (structured).
    Raises UserError (net untouched) for an impossible request.
    """
    check_spec(net, spec)
    if spec.structured:
        from .structured_prune import prune_structured
        result = run_pass(prune_structured, net, spec=spec)
        if not result.changed:  # the user asked for it: say why nothing happened
            raise UserError(f"--prune-structured: nothing can be removed: {result.reason}")
        info = {d["layer"]: {k: v for k, v in d.items() if k != "layer"} for d in result.details}
        return {}, sparsity_rows(net, info)
    masks, info = plan_masks(net, spec)
    prune(net, masks)
    for n in info:
        if mask_key(n, 0) in masks:
            info[n]["pruned"] = True
    return masks, sparsity_rows(net, info)


@graph_pass("prune")
def prune(net, masks: dict) -> PassResult:
    """Zero the weights whose mask (planned by :func:`plan_masks`) is False; see the module
    docstring. ``details``: per masked blob, its key and how many entries it zeroed."""
    apply_masks(net, masks)
    return PassResult("prune", changed=bool(masks),
                      details=[{"mask": k, "zeroed": int(m.size - np.count_nonzero(m))} for k, m in masks.items()])


__all__ = ["PruneSpec", "PRUNABLE_TYPES", "parse_prune_arg", "parse_layer_list", "prunable_layers",
           "check_spec", "resolve_targets", "compute_masks", "erk_fractions", "plan_masks", "smallest_k_masks",
           "prune_net", "prune"]
