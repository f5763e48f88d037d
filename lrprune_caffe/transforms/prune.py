"""Weight pruning: which weights to zero (masks), zeroing them, and the numbers.

Only the *weights* (blob 0) of ``Convolution``, ``Deconvolution`` and
``InnerProduct`` layers are ever pruned. Biases, BatchNorm, Scale, Bias and
PReLU blobs are never touched.

A mask is a bool array shaped like the blob, ``True`` = keep. Masks are keyed
``(layer name, blob index)``; on disk (``masks.npz``) the key is the string
``"<layer>/<blob index>"`` (e.g. ``conv1/0``; the index is after the *last*
slash, so layer names with slashes work).

Rules (:class:`PruneSpec`):

* ``method="magnitude"`` (default), ``scope="layer"``: in each selected layer
  the ``round(f * size)`` weights of smallest ``|w|`` are zeroed (exactly that
  many; ties broken by position in C order);
* ``method="magnitude"``, ``scope="global"``: one threshold over all layers
  that use the default fraction: the ``round(f * total)`` smallest ``|w|`` of
  their concatenation (layer order, then C order, for ties). Layers with a
  per-layer override are pruned on their own at their own fraction;
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

``compress`` integration: :func:`compress_prune_step` (after ``factorize``) and
:func:`compress_sizes_step` (after ``report``), registered by
:func:`install_compress_steps`; options come from ``compress(..., prune=...,
prune_scope=..., prune_method=..., quality=..., prune_structured=...,
prune_exclude=..., sparse=...)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.ir.layers import prunable_types

#: layer types whose blob 0 (the weights) may be pruned (``LayerSpec.prunable``)
PRUNABLE_TYPES = prunable_types()
SCOPES = ("layer", "global")
METHODS = ("magnitude", "std")


@dataclass
class PruneSpec:
    """What to prune.

    ``fraction``: default fraction of each prunable layer's weights to zero
    (``None``: only the layers named in ``per_layer``; with ``method="std"``,
    ``None`` means every prunable layer). ``per_layer``: {layer: fraction}
    overrides (0 leaves the layer out). ``exclude``: layers never pruned.
    ``scope``: "layer" | "global". ``method``: "magnitude" | "std" (needs
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
                            "--prune-scope global")


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
    """{(layer, 0): keep bool array} for every layer the spec prunes (unstructured).
    Nothing in ``net`` is changed. See the module docstring for the rules."""
    targets = resolve_targets(net, spec)
    masks, info = _compute(net, spec, targets)
    return masks


def _compute(net, spec, targets):
    """(masks, {layer: {"threshold": t, "target": f}})."""
    masks, info = {}, {}
    if not targets:
        return masks, info
    weights = {name: net.layer(name).blobs[0] for name in targets}
    pooled = [n for n in targets if spec.scope == "global" and n not in spec.per_layer]
    single = [n for n in targets if n not in pooled]
    if spec.method == "magnitude":
        if pooled:
            f = float(spec.fraction)
            total = sum(weights[n].size for n in pooled)
            k = int(round(f * total))
            for n, m in zip(pooled, smallest_k_masks([weights[n] for n in pooled], k)):
                masks[(n, 0)] = m
            t = _threshold_of(weights, masks, pooled)
            for n in pooled:
                info[n] = {"target": f, "threshold": t, "scope": "global"}
        for n in single:
            f = targets[n]
            k = int(round(f * weights[n].size))
            masks[(n, 0)] = smallest_k_masks([weights[n]], k)[0]
            info[n] = {"target": f, "threshold": _threshold_of(weights, masks, [n]), "scope": "layer"}
    else:  # std (Han et al. 2015)
        q = float(spec.quality)
        pooled_std = [n for n in pooled if n not in spec.per_layer_quality]
        if pooled_std:
            allw = np.concatenate([weights[n].ravel().astype(np.float64) for n in pooled_std])
            t = q * float(np.std(allw))
            del allw
            for n in pooled_std:
                masks[(n, 0)] = _std_mask(weights[n], t)
                info[n] = {"quality": q, "threshold": t, "scope": "global"}
        for n in targets:
            if n in pooled_std:
                continue
            qn = float(spec.per_layer_quality.get(n, q))
            t = qn * float(np.std(weights[n], dtype=np.float64))
            masks[(n, 0)] = _std_mask(weights[n], t)
            info[n] = {"quality": qn, "threshold": t, "scope": "layer"}
    return masks, info


def _threshold_of(weights, masks, names):
    """Largest pruned |w| (the effective threshold), or None when nothing was pruned."""
    t = None
    for n in names:
        pruned = np.abs(weights[n][~masks[(n, 0)]])
        if pruned.size:
            v = float(pruned.max())
            t = v if t is None else max(t, v)
    return t


def apply_masks(net, masks: dict) -> None:
    """Zero (exactly, +0.0) every weight whose mask is False, in place.
    Raises ValueError when a mask does not fit its blob."""
    for (name, idx), mask in masks.items():
        layer = net.layer(name)
        blob = layer.blobs[idx]
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != blob.shape:
            raise ValueError(f"mask for layer '{name}' blob {idx} has shape {mask.shape}, "
                             f"the blob {blob.shape}")
        layer.blobs[idx] = np.where(mask, blob, np.float32(0)).astype(np.float32, copy=False)


def mask_key(name: str, idx: int) -> str:
    return f"{name}/{int(idx)}"


def save_masks(masks: dict) -> bytes:
    """An ``.npz`` (bytes) of bool arrays keyed ``"<layer>/<blob index>"``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{mask_key(n, i): np.asarray(m, dtype=bool) for (n, i), m in masks.items()})
    return buf.getvalue()


def load_masks(path, net=None) -> dict:
    """{(layer, blob index): bool array} from a masks.npz; with ``net``, checks that each
    mask fits (layer exists, blob exists, same shape) and raises BadFileError otherwise."""
    from lrprune_caffe.fileutil import read_npz
    items = read_npz(path, "a masks .npz")
    masks = {}
    for key, arr in items.items():
        name, sep, idx = key.rpartition("/")
        if not sep or not idx.isdigit() or not name:
            raise BadFileError(f"mask key '{key}' is not '<layer>/<blob index>'", path=path)
        if arr.dtype != np.bool_:
            if arr.dtype.kind in "iuf" and np.isin(arr, (0, 1)).all():
                arr = arr.astype(bool)
            else:
                raise BadFileError(f"mask '{key}' holds {arr.dtype} values, expected bool", path=path)
        masks[(name, int(idx))] = arr
    if net is not None:
        for (name, idx), arr in masks.items():
            if name not in net:
                raise BadFileError(f"mask file is for another net: no layer '{name}' in the net", path=path)
            layer = net.layer(name)
            if idx >= len(layer.blobs):
                raise BadFileError(f"mask file is for another net: layer {name} ({layer.type}) has "
                                   f"{len(layer.blobs)} blobs, the mask is for blob {idx}", path=path)
            shape = tuple(layer.blobs[idx].shape)
            if tuple(arr.shape) != shape:
                raise BadFileError(f"mask file is for another net: layer {name} blob {idx} shape "
                                   f"{tuple(arr.shape)} vs {shape}", path=path)
    return masks


# ---------------------------------------------------------------------------
# numbers

def sparsity_rows(net, info: dict = None) -> list:
    """Per layer with blobs: name, type, params, nonzero_params, sparsity (zeros / params,
    counted over all of its blobs, as they are in the caffemodel), plus ``info[name]``."""
    rows = []
    for layer in net.layers:
        if not layer.blobs:
            continue
        params = sum(int(b.size) for b in layer.blobs)
        nonzero = sum(int(np.count_nonzero(b)) for b in layer.blobs)
        row = {"name": layer.name, "type": layer.type, "params": params, "nonzero_params": nonzero,
               "sparsity": (1.0 - nonzero / params) if params else 0.0}
        if info and layer.name in info:
            row.update(info[layer.name])
        rows.append(row)
    return rows


def sparsity_totals(rows) -> dict:
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero_params"] for r in rows)
    return {"params": params, "nonzero_params": nonzero,
            "sparsity": (1.0 - nonzero / params) if params else 0.0}


def prune_net(net, spec: PruneSpec):
    """Prune ``net`` in place as ``spec`` says; returns (masks, rows).

    Unstructured: masks = {(layer, 0): keep array} (also what to save as
    masks.npz), the weights are zeroed. Structured: runs the
    ``structured_prune`` pass (the net gets smaller); masks = {} (nothing
    is zero that fine-tuning must hold). ``rows``: :func:`sparsity_rows` with,
    per pruned layer, ``target``/``quality``, ``threshold`` (unstructured) or
    ``outputs_before``/``outputs_after``/``removed`` (structured).
    Raises UserError (net untouched) for an impossible request.
    """
    check_spec(net, spec)
    if spec.structured:
        from . import run_pass
        from .structured_prune import prune_structured
        result = run_pass(prune_structured, net, spec=spec)
        if not result.changed:  # the user asked for it: say why nothing happened
            raise UserError(f"--prune-structured: nothing can be removed: {result.reason}")
        info = {d["layer"]: {k: v for k, v in d.items() if k != "layer"} for d in result.details}
        return {}, sparsity_rows(net, info)
    targets = resolve_targets(net, spec)
    masks, info = _compute(net, spec, targets)
    apply_masks(net, masks)
    for n in info:
        info[n]["pruned"] = True
    return masks, sparsity_rows(net, info)


# ---------------------------------------------------------------------------
# compress integration: two pipeline steps (see lrprune_caffe.core.compress.add_step)

#: job.extra_options keys read by the steps (the compress CLI flags, dashes -> underscores)
COMPRESS_OPTIONS = ("prune", "prune_scope", "prune_method", "quality", "prune_structured", "prune_exclude",
                    "sparse")


def spec_from_options(opts: dict):
    """A PruneSpec from compress's keyword options, or None when no pruning is asked for.

    ``prune``: "0.5" / "conv1=0.3,ip1=0.9" / a float; ``prune_scope``; ``prune_method``;
    ``quality``; ``prune_structured``; ``prune_exclude``: "a,b" or a list."""
    prune = opts.get("prune")
    method = opts.get("prune_method") or "magnitude"
    if prune is None and method != "std":
        for k in ("prune_scope", "prune_structured", "prune_exclude", "quality"):
            if opts.get(k) not in (None, False, "", ()):
                raise UserError(f"--{k.replace('_', '-')} needs --prune FRACTION (or --prune-method std)")
        return None
    if prune is None:
        default, per = None, {}
    elif isinstance(prune, (int, float)) and not isinstance(prune, bool):
        default, per = _fraction(prune, "--prune"), {}
    else:
        default, per = parse_prune_arg(prune)
    if method == "std" and (default is not None or any(f > 0 for f in per.values())):
        raise UserError("--prune-method std zeroes |w| < Q x std(W) with Q from --quality: --prune takes no "
                        "fraction with it (leave layers out with LAYER=0 or --prune-exclude)")
    if method != "std" and opts.get("quality") is not None:
        raise UserError("--quality is the Q of --prune-method std (|w| < Q x std(W)); magnitude pruning "
                        "takes the fraction from --prune: drop --quality or add --prune-method std")
    if method != "std" and not default and not any(f > 0 for f in per.values()):
        raise UserError(f"--prune {prune}: every fraction is 0, so nothing would be pruned")
    exclude = opts.get("prune_exclude") or ()
    exclude = parse_layer_list(exclude) if isinstance(exclude, str) else tuple(exclude)
    quality = opts.get("quality")
    return PruneSpec(fraction=default, per_layer=per, exclude=exclude, scope=opts.get("prune_scope") or "layer",
                     method=method, quality=None if quality is None else float(quality),
                     structured=bool(opts.get("prune_structured")))


def _map_factorized(spec, rows):
    """Names of factorized layers -> their new layers (structured: all but the last,
    whose outputs are the original layer's; i.e. the rank components)."""
    def targets(name):
        row = rows.get(name)
        if row is None or row.get("action") != "factorized":
            return [name]
        new = list(row["new_layers"])
        return new[:-1] if spec.structured else new
    per = {}
    for name, f in spec.per_layer.items():
        for n in targets(name):
            per[n] = f
    spec.per_layer = per
    spec.exclude = tuple(n for name in spec.exclude for n in targets(name))
    spec.per_layer_quality = {n: q for name, q in spec.per_layer_quality.items() for n in targets(name)}
    return spec


def compress_prune_step(job) -> None:
    """compress step ``prune`` (after ``factorize``): prune ``job.new`` as the options say.

    Layers named by their original name after factorization mean their new
    layers. The layers touched are copied first (``job.new`` shares unchanged
    layers with ``job.net``, which verification uses as the reference).
    Adds ``masks.npz`` to the outputs and a ``prune`` section to the report."""
    from lrprune_caffe.ir.net import Layer, clone_msg
    spec = spec_from_options(job.extra_options)
    if spec is None:
        return
    spec = _map_factorized(spec, job.rows)
    originals = {id(layer) for layer in job.net.layers}
    job.new.layers = [Layer(l.name, l.type, list(l.bottoms), list(l.tops), clone_msg(l.msg), list(l.blobs))
                      if id(l) in originals else l for l in job.new.layers]
    masks, rows = prune_net(job.new, spec)
    if masks:
        job.extra["masks.npz"] = save_masks(masks)
    job.sections["prune"] = {
        "fraction": spec.fraction, "per_layer": dict(spec.per_layer), "exclude": list(spec.exclude),
        "scope": spec.scope, "method": spec.method, "quality": spec.quality, "structured": spec.structured,
        "masks": "masks.npz" if masks else None,
        "layers": [r for r in rows if r.get("pruned") or "structured" in r],
    }


def _drop_no_factorization_reason(row):
    if str(row.get("reason", "")).startswith("no factorization asked for"):
        row.pop("reason")


def compress_sizes_step(job) -> None:
    """compress step ``sizes`` (after ``report``): what the written files hold.

    Per report row (a factorized layer: summed over its new layers): ``nonzero_params``,
    ``sparsity``, ``dense_bytes`` (4 per param), ``caffemodel_bytes`` (its share of
    the written caffemodel), ``onnx_bytes`` (its initializers in model.onnx, with
    ``--onnx``) and ``csr_bytes`` (Han et al.'s CSR with 8-bit relative indices).
    Totals gain ``nonzero_params``, ``sparsity``, ``dense_bytes``, ``csr_bytes``,
    ``caffemodel_bytes`` (the exact file size) and ``onnx_bytes`` (the exact file
    size, or None without ``--onnx``). With ``--onnx`` the model is exported here
    (as sparse initializers with ``sparse``) and handed to the write step in
    ``job.extra["model.onnx"]``. The full per-new-layer table is ``report["storage"]``."""
    from lrprune_caffe.export.sparse import sparsify_model, storage_report
    if job.report is None or job.new is None:
        return
    sparse = bool(job.extra_options.get("sparse"))  # step_check refused --sparse without --onnx
    model = data = None
    if job.opts.onnx:
        from lrprune_caffe.export.onnx import export_model
        model = export_model(job.new, opset=int(job.opts.opset))
        if sparse:
            model = sparsify_model(model)
        data = model.SerializeToString()
        job.extra["model.onnx"] = data
        job.report["onnx"] = {"opset": int(job.opts.opset), "ir_version": int(model.ir_version),
                              "bytes": len(data), "sparse": sparse}
        if sparse:
            job.report["sparse_onnx"] = {"sparse_initializers": len(model.graph.sparse_initializer),
                                         "dense_initializers": len(model.graph.initializer)}
    storage = storage_report(job.new, model)
    by_layer = {r["name"]: r for r in storage["layers"]}
    keys = ("params", "nonzero_params", "dense_bytes", "caffemodel_bytes", "csr_bytes") + \
        (("onnx_bytes",) if model is not None else ())
    pr = job.sections.get("prune") or {}
    touched = {r["name"] for r in pr.get("layers", []) if r.get("pruned") or r.get("structured")}
    structured = {r["name"] for r in pr.get("layers", []) if r.get("structured")}
    excluded = set(pr.get("exclude", []))
    for name, row in job.rows.items():
        factorized = row.get("action") == "factorized"
        names = row.get("new_layers") if factorized else [name]
        parts = [by_layer[n] for n in names if n in by_layer]
        sums = {k: sum(p[k] for p in parts) for k in keys}
        params = sums.pop("params")
        row.update(sums)
        row["sparsity"] = (1.0 - sums["nonzero_params"] / params) if params else 0.0
        if not pr:
            continue
        reason = row.pop("reason", None)
        if reason and reason.startswith("no factorization asked for"):
            reason = None
        if touched & set(names):
            row["action"] = "factorized+pruned" if factorized else "pruned"
            if reason:
                row["reason"] = f"not factorized: {reason}"
        elif not factorized and row["params_after"] != row["params_before"]:
            row["action"] = "shrunk"
            row["reason"] = "its inputs were removed by structured pruning of the layer before it"
        elif not factorized:
            why = ("excluded from pruning (--prune-exclude)" if name in excluded
                   else "not selected for pruning (--prune names other layers, or LAYER=0)")
            row["reason"] = f"not factorized: {reason}; {why}" if reason else why
        elif reason:
            row["reason"] = reason
        if factorized and structured & set(names[:-1]):
            # rank components were removed: the rank is what the written layers have now
            new = tuple(int(job.new.layer(n).blobs[0].shape[0]) for n in names[:-1])
            row["rank_factorized"] = row["rank"]
            row["rank"] = new[0] if len(new) == 1 else list(new)
            row["note"] = ("energy_kept and weight_rel_error are those of the factorization (rank_factorized), "
                           "before structured pruning removed rank components")
    st = storage["totals"]
    job.report["totals"].update({"nonzero_params_before": sparsity_totals(sparsity_rows(job.net))["nonzero_params"],
                                 "nonzero_params": st["nonzero_params"], "sparsity": st["sparsity"],
                                 "dense_bytes": st["dense_bytes"], "csr_bytes": st["csr_bytes"],
                                 "caffemodel_bytes": st["caffemodel_bytes"],
                                 "onnx_bytes": len(data) if data is not None else None})
    job.report["storage"] = storage
    job.report["outcome"] = outcome(job.report, job.weights, sparse=sparse,
                                    dense_onnx_bytes=_dense_onnx_bytes(model) if sparse else None)
    if "masks.npz" in job.extra and "masks.npz" not in job.report.get("files", []):
        job.report.setdefault("files", []).append("masks.npz")


def _dense_onnx_bytes(model) -> int:
    """What model.onnx would take with every initializer dense: the file minus what the sparse
    initializers take, plus their dense bytes."""
    dense_extra = 0
    for st in model.graph.sparse_initializer:
        n = 1
        for d in st.dims:
            n *= int(d)
        dense_extra += 4 * n - st.ByteSize()
    return model.ByteSize() + dense_extra


def outcome(report, weights_path=None, sparse=False, dense_onnx_bytes=None) -> dict:
    """Whether the written net is really faster (fewer dense MACs) and its files really smaller,
    in words: zeros kept in dense tensors save neither time nor bytes."""
    import os
    t = report["totals"]
    faster = bool(t["macs_after"] < t["macs_before"])
    orig_bytes = os.path.getsize(weights_path) if weights_path and os.path.exists(weights_path) else None
    cm_ratio = orig_bytes / t["caffemodel_bytes"] if orig_bytes and t.get("caffemodel_bytes") else None
    smaller_cm = cm_ratio is not None and cm_ratio > 1.01
    parts = [f"faster: {t['macs_before'] / t['macs_after']:.2f}x fewer multiply-adds in any dense runtime"
             if faster else "not faster: the same multiply-adds (zeros in dense tensors cost a dense runtime "
                            "the same time; factorize or use --prune-structured for speed)"]
    if cm_ratio is not None:
        parts.append(f"model.caffemodel {cm_ratio:.2f}x smaller than the original" if smaller_cm else
                     "model.caffemodel not smaller (Caffe stores every blob dense, zeros included)")
    onnx_ratio = None
    if t.get("onnx_bytes") and dense_onnx_bytes:
        onnx_ratio = t["onnx_bytes"] / dense_onnx_bytes
        parts.append(f"model.onnx is {onnx_ratio:.2f}x the size of its dense form (sparse initializers)")
    elif t.get("sparsity", 0) > 0.05 and not sparse:
        parts.append(f"the zeros could be stored compactly: --onnx --sparse (layers above about 67% zeros), "
                     f"or CSR {t['csr_bytes']:,} bytes vs {t['dense_bytes']:,} dense")
    return {"faster": faster, "caffemodel_smaller": smaller_cm, "caffemodel_ratio": cm_ratio,
            "original_caffemodel_bytes": orig_bytes, "onnx_vs_dense": onnx_ratio, "summary": "; ".join(parts)}


def install_compress_steps() -> None:
    """Register the two steps in compress's pipeline (idempotent)."""
    from lrprune_caffe.core.compress import add_step
    add_step("prune", compress_prune_step, after="factorize")
    add_step("sizes", compress_sizes_step, after="report")


__all__ = ["PruneSpec", "PRUNABLE_TYPES", "parse_prune_arg", "parse_layer_list", "prunable_layers",
           "check_spec", "resolve_targets", "compute_masks", "smallest_k_masks", "apply_masks",
           "save_masks", "load_masks", "mask_key", "sparsity_rows", "sparsity_totals", "prune_net",
           "spec_from_options", "compress_prune_step", "compress_sizes_step", "install_compress_steps",
           "COMPRESS_OPTIONS"]
