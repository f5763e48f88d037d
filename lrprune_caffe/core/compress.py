"""API: ``compress`` (low-rank factorization and pruning end to end) and ``verify`` (two nets, same inputs).

``compress`` is a pipeline of named steps over one :class:`CompressJob`::

    check -> load -> select -> rank -> factorize -> prune -> verify -> report -> sizes -> write

Each step is a function ``step(job)``; :data:`PIPELINE` holds them in order
and :func:`add_step` inserts another one. ``prune`` and ``sizes`` (nonzero
counts, bytes of the written files, the ONNX export) live in
:mod:`lrprune_caffe.transforms.prune`, which registers them; their options arrive in
``job.extra_options``, e.g. ``compress(..., prune=0.5)``. A step may add
per-layer fields to ``job.rows``, notes to ``job.notes``, sections to
``job.sections`` (they land in report.json) and files to ``job.extra``.
Everything is written at the end, all or nothing, by ``api.write_net``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from lrprune_caffe.version import __version__
from lrprune_caffe.ir.analysis import layer_stats, totals, validate
from lrprune_caffe.io.caffe import load_net, net_to_prototxt, parse_prototxt, upgrade_net
from lrprune_caffe.engines.compare import compare_outputs, json_safe
from lrprune_caffe.errors import BadFileError, EngineError, LrpruneError, UserError
from lrprune_caffe.ir.net import Layer, Net
from lrprune_caffe.lowrank import decompose as dec, rank as rk
from lrprune_caffe.transforms import Precondition, run_pass
from lrprune_caffe.transforms.factorize import (FACTORIZABLE, LayerPlan, check_ranks, factorize, format_ranks,
                                               layer_info, rewrite_train_net)
from lrprune_caffe.engines.runtime import ENGINES, default_inputs, run_net

SCHEMES = dec.SCHEMES
RANK_METHODS = ("svd", "vbmf")
SVD_METHODS = dec.METHODS
REPORTED_TYPES = FACTORIZABLE + ("Deconvolution",)


# ---------------------------------------------------------------------------
# options

@dataclass
class CompressOptions:
    scheme: str = "channel"
    rank: object = None  # int, "16", "conv2=16,ip1=64", "8x16" (tucker2: r_in x r_out)
    energy: float = None
    speedup: float = None
    rank_method: str = "svd"
    layers: object = None  # "conv2,ip.*" or a list of names / regexes
    inputs: str = None
    train_net: str = None
    onnx: bool = False
    opset: int = 13  # with onnx: the pinned ONNX opset (onnx_export.DEFAULT_OPSET)
    engine: str = "onnxruntime"
    verify: bool = True
    svd: str = "auto"
    seed: int = 0
    hooi: int = 0
    criterion: str = "log-energy"  # --speedup: rk.CRITERIA
    threads: int = None
    progress: bool = False
    phase: str = "TEST"


@dataclass
class CompressJob:
    prototxt: str
    weights: str
    outdir: object
    opts: CompressOptions
    extra_options: dict = field(default_factory=dict)
    net: Net = None  # the original
    new: Net = None  # the result
    shapes: object = None
    selected: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # name -> report row, in net order
    infos: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # name -> LayerPlan
    caches: dict = field(default_factory=dict)
    default_rank: tuple = None
    layer_ranks: dict = field(default_factory=dict)
    inputs: dict = None
    inputs_desc: str = ""
    labels: object = None
    train: Net = None
    verification: dict = None
    sections: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    report: dict = None
    prune_spec: object = None  # a prune.PruneSpec, or None when not pruning
    factorizing: bool = True
    written: dict = field(default_factory=dict)


def _as_list(spec) -> list:
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        items = []
        for s in spec:
            items.extend(_as_list(s))
        return items
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def _parse_one_rank(text: str, what: str) -> tuple:
    t = text.strip().lower()
    parts = t.split("x") if "x" in t else [t]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"--rank: '{what}' is not a rank (expected R, R1xR2 for tucker2, or LAYER=R)") from None
    if len(vals) not in (1, 2):
        raise UserError(f"--rank: '{what}' is not a rank (expected R, R1xR2 for tucker2, or LAYER=R)")
    for v in vals:
        if v < 1:
            raise UserError(f"--rank: rank {text} must be at least 1")
    return vals


def parse_rank_spec(spec):
    """(default ranks or None, {layer: ranks}) from ``16`` / ``conv2=16,ip1=64`` / ``8x16``."""
    if spec is None:
        return None, {}
    if isinstance(spec, (int, np.integer)):
        if spec < 1:
            raise UserError(f"--rank: rank {spec} must be at least 1")
        return (int(spec),), {}
    default, per = None, {}
    for item in _as_list(spec):
        if "=" in item:
            name, r = item.rsplit("=", 1)
            name = name.strip()
            if not name:
                raise UserError(f"--rank: '{item}' has no layer name before '='")
            per[name] = _parse_one_rank(r, item)
        else:
            if default is not None:
                raise UserError(f"--rank: two default ranks ('{format_ranks(default)}' and '{item}')")
            default = _parse_one_rank(item, item)
    if default is None and not per:
        raise UserError("--rank: no rank given")
    return default, per


def _check_options(o: CompressOptions, pruning: bool = False):
    if o.scheme not in SCHEMES:
        raise UserError(f"--scheme: unknown scheme '{o.scheme}' (choose from {', '.join(SCHEMES)})")
    if o.rank_method not in RANK_METHODS:
        raise UserError(f"--rank-method: unknown method '{o.rank_method}' (choose from {', '.join(RANK_METHODS)})")
    if o.svd not in SVD_METHODS:
        raise UserError(f"--svd: unknown SVD method '{o.svd}' (choose from {', '.join(SVD_METHODS)})")
    if o.engine not in ENGINES:
        raise UserError(f"--engine: unknown engine '{o.engine}' (choose from {', '.join(ENGINES)})")
    chosen = [n for n, v in (("--rank", o.rank), ("--energy", o.energy), ("--speedup", o.speedup)) if v is not None]
    if o.rank_method == "vbmf":
        if chosen:
            raise UserError(f"--rank-method vbmf chooses the ranks itself; drop {chosen[0]}")
    elif not chosen:
        if not pruning:
            raise UserError("say what to do: choose ranks (--rank R, --energy E, --speedup S or --rank-method "
                            "vbmf), or prune (--prune F, --prune-method std --quality Q), or both")
    elif len(chosen) > 1:
        raise UserError(f"choose one of {' / '.join(chosen)}")
    if o.energy is not None and not 0 < float(o.energy) <= 1:
        raise UserError(f"--energy {o.energy} must be in (0, 1] (the share of squared singular values kept)")
    if o.speedup is not None and not float(o.speedup) > 1:
        raise UserError(f"--speedup {o.speedup} cannot be reached: it must be above 1 (a MAC reduction factor)")
    if o.hooi is not None and int(o.hooi) < 0:
        raise UserError(f"--hooi {o.hooi} must be >= 0")
    if o.hooi and o.scheme != "tucker2":
        raise UserError(f"--hooi refines Tucker-2 factors; it has no effect with --scheme {o.scheme}: "
                        f"drop it or use --scheme tucker2")
    if o.criterion not in rk.CRITERIA:
        raise UserError(f"unknown budget criterion '{o.criterion}' (choose from {', '.join(rk.CRITERIA)})")
    if o.svd == "randomized" and o.rank is None:
        raise UserError("--svd randomized needs fixed ranks (--rank): the other rank rules need every "
                        "singular value")


# ---------------------------------------------------------------------------
# steps

def step_check(job: CompressJob):
    """Options that are wrong whatever the files hold; output folder; --onnx availability."""
    from lrprune_caffe.transforms.prune import spec_from_options
    job.prune_spec = spec_from_options(job.extra_options)  # also checks the pruning flags
    job.factorizing = (job.opts.rank is not None or job.opts.energy is not None or job.opts.speedup is not None
                       or job.opts.rank_method == "vbmf")
    _check_options(job.opts, pruning=job.prune_spec is not None)
    if job.extra_options.get("sparse") and not job.opts.onnx:
        raise UserError("--sparse writes sparse ONNX initializers: it needs --onnx")
    unknown = sorted(set(job.extra_options) - set(EXTRA_OPTIONS))
    if unknown:
        raise UserError(f"compress: unknown option(s) {', '.join(unknown)}")
    job.default_rank, job.layer_ranks = parse_rank_spec(job.opts.rank)
    if job.outdir is not None:
        from lrprune_caffe.fileutil import check_outdir
        check_outdir(job.outdir)  # missing folders are created at the end (and only then)
    if job.opts.onnx:
        try:
            from lrprune_caffe.export.onnx import check_opset
        except ImportError as e:
            raise UserError(f"--onnx needs the ONNX exporter (lrprune_caffe.export.onnx): {e}") from None
        check_opset(int(job.opts.opset))  # fail before the work, not after
    elif job.opts.opset != CompressOptions.opset:
        raise UserError("--opset applies to the ONNX file: add --onnx")
    if job.labels is not None and job.opts.inputs is None:
        raise UserError("--labels are the labels of --inputs: give --inputs too")


def load_inputs(path, net) -> dict:
    """Arrays of an .npz keyed by the net's input names, checked against the input shapes."""
    from lrprune_caffe.fileutil import read_npz
    arrays = read_npz(path, "an .npz of input arrays keyed by input name")
    shapes = net.input_shapes()
    out = {}
    if len(shapes) == 1 and next(iter(shapes)) not in arrays and "x" in arrays:
        arrays[next(iter(shapes))] = arrays["x"]  # a DATA.npz (x, y) as evaluate/finetune take it
    for name, shape in shapes.items():
        if name not in arrays:
            raise BadFileError(f"has no array '{name}' for the net's input (it holds: "
                               f"{', '.join(arrays) or 'nothing'})", path=path)
        a = arrays[name]
        if shape is not None and (a.ndim != len(shape) or tuple(a.shape[1:]) != tuple(shape[1:])):
            raise BadFileError(f"array '{name}' has shape {tuple(a.shape)}; the net's input is "
                               f"{tuple(shape)} (any batch size)", path=path)
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
        if not np.all(np.isfinite(out[name])):
            raise BadFileError(f"array '{name}' holds NaN or infinite values", path=path)
    return out


def step_load(job: CompressJob):
    o = job.opts
    if job.weights is None:
        raise UserError("compress needs the trained weights (WEIGHTS.caffemodel)")
    job.net = load_net(job.prototxt, job.weights, phase=o.phase)
    job.shapes = validate(job.net)
    job.notes.extend(job.net.notes)
    if o.inputs is not None:
        job.inputs = load_inputs(o.inputs, job.net)
        job.inputs_desc = str(o.inputs)
    elif o.verify:
        job.inputs = default_inputs(job.net, seed=o.seed)
        job.inputs_desc = f"seeded standard-normal inputs (seed {o.seed}) of the input shape"
    if o.train_net is not None:
        job.train = read_train_net(o.train_net)


def read_train_net(path) -> Net:
    """A training net as written: every phase kept, upgraded, not validated (it has Data layers)."""
    msg = parse_prototxt(path)
    upgrade_net(msg, path)
    header = type(msg)()
    header.CopyFrom(msg)
    for f in ("layer", "layers", "name"):
        header.ClearField(f)
    return Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], header=header, source=str(path))


def select_layers(net, patterns, candidates=None) -> list:
    """Names of the Convolution / InnerProduct layers ``patterns`` picks (all when None).

    Each comma-separated item is an exact layer name or else a regular
    expression that must match a whole name. An item matching nothing is an error.
    """
    cands = candidates if candidates is not None else [l.name for l in net.layers if l.type in FACTORIZABLE]
    items = _as_list(patterns)
    if not items:
        return list(cands)
    chosen = set()
    where = f"{net.source}" if net.source else "the net"
    for item in items:
        if item in cands:
            chosen.add(item)
            continue
        if item in net:
            t = net.layer(item).type
            raise UserError(f"--layers: layer '{item}' of {where} is a {t}, not a Convolution or "
                            f"InnerProduct layer")
        try:
            rx = re.compile(item)
        except re.error as e:
            raise UserError(f"--layers: '{item}' is neither a layer name nor a valid regular expression ({e})") \
                from None
        hits = [n for n in cands if rx.fullmatch(n)]
        if not hits:
            shown = ", ".join(cands[:12]) + ("..." if len(cands) > 12 else "")
            raise UserError(f"--layers: '{item}' matches no Convolution or InnerProduct layer of {where} "
                            f"(they are: {shown or 'none'})")
        chosen.update(hits)
    return [n for n in cands if n in chosen]


def _row(layer, stats_row) -> dict:
    return {"name": layer.name, "type": layer.type, "action": "kept", "scheme": None, "rank": None,
            "max_rank": None, "energy_kept": 1.0, "params_before": stats_row.params,
            "params_after": stats_row.params, "macs_before": stats_row.macs, "macs_after": stats_row.macs,
            "weight_rel_error": 0.0}


def step_select(job: CompressJob):
    net = job.net
    stats = {r.name: r for r in layer_stats(net, job.shapes)}
    cands = [l.name for l in net.layers if l.type in FACTORIZABLE]
    for name in job.layer_ranks:
        if name not in cands:
            if name in net:
                raise UserError(f"--rank: layer '{name}' is a {net.layer(name).type}, not a Convolution "
                                f"or InnerProduct layer")
            raise UserError(f"--rank: {job.prototxt} has no layer named '{name}'")
    if job.opts.layers is not None:
        job.selected = select_layers(net, job.opts.layers, cands)
        outside = [n for n in job.layer_ranks if n not in job.selected]
        if outside:
            raise UserError(f"--rank names layer '{outside[0]}', which --layers does not select")
    elif job.layer_ranks and job.default_rank is None:
        job.selected = [n for n in cands if n in job.layer_ranks]
    else:
        job.selected = list(cands)
    selected = set(job.selected)
    for layer in net.layers:
        if layer.type not in REPORTED_TYPES or not layer.blobs:
            continue
        row = _row(layer, stats[layer.name])
        job.rows[layer.name] = row
        if layer.type == "Deconvolution":
            row["reason"] = "Deconvolution layers are not factorized"
            continue
        if layer.name not in selected:
            row["reason"] = "not selected (--layers / per-layer --rank)"
            continue
        try:
            info = layer_info(layer, job.shapes.inputs[layer.name][0], job.shapes.outputs[layer.name][0])
        except Precondition as e:
            row["reason"] = str(e)
            continue
        scheme = info.scheme_for(job.opts.scheme)
        row["scheme"] = scheme
        row["max_rank"] = _rank_value(info.max_ranks(scheme))
        job.infos[layer.name] = info


def _rank_value(ranks):
    ranks = [int(r) for r in ranks]
    return ranks[0] if len(ranks) == 1 else ranks


def _bar(total, desc, progress):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False,
                disable=True if not progress else None)


def _spectra(job, names, desc="spectra"):
    out = {}
    with _bar(len(names), desc, job.opts.progress) as bar:
        for name in names:
            info = job.infos[name]
            layer = job.net.layer(name)
            scheme = info.scheme_for(job.opts.scheme)
            W = layer.blobs[0]
            if info.kind == "ip" and info.transpose:
                W = W.T
            cache = job.caches.setdefault(name, {})
            out[name] = dec.scheme_spectra(W, scheme, group=info.group, method=job.opts.svd, cache=cache)
            bar.update(1)
    return out


def _fixed_ranks(job, name, info, scheme):
    ranks = job.layer_ranks.get(name, job.default_rank)
    if scheme == "tucker2" and len(ranks) == 1:
        ranks = (ranks[0], ranks[0])
    why = check_ranks(info, scheme, ranks)
    if why:
        layer = job.net.layer(name)
        hint = ""
        if name not in job.layer_ranks:
            hint = f"; give it its own rank ({name}=R) or leave it out with --layers"
        raise UserError(f"--rank: layer '{name}' ({layer.type}): {why}{hint}")
    return tuple(int(r) for r in ranks)


def _leave(row, reason):
    row["reason"] = reason


def step_rank(job: CompressJob):
    o = job.opts
    if not job.factorizing:
        for name in job.selected:
            if name in job.rows and job.rows[name]["action"] == "kept":
                job.rows[name]["scheme"] = None
                job.rows[name].setdefault("reason", "no factorization asked for (no --rank/--energy/--speedup)")
        return
    names = [n for n in job.selected if n in job.infos]
    if o.speedup is not None:
        _budget_ranks(job, names)
        return
    spectra = {}
    if o.rank is None:  # energy / vbmf need every singular value
        spectra = _spectra(job, names)
    for name in names:
        info, row = job.infos[name], job.rows[name]
        scheme = info.scheme_for(o.scheme)
        if o.rank is not None:
            ranks = _fixed_ranks(job, name, info, scheme)
            rule = f"rank {format_ranks(ranks)}"
        elif o.energy is not None:
            ranks = rk.energy_ranks(spectra[name], float(o.energy))
            rule = f"energy {o.energy}: rank {format_ranks(ranks)}"
        else:
            ranks = rk.vbmf_ranks(spectra[name])
            rule = f"VBMF rank {format_ranks(ranks)}"
            kept = min(float(m.energies[:r].sum() / m.energies.sum()) for m, r in zip(spectra[name], ranks)
                       if m.energies.sum() > 0) if any(m.energies.sum() > 0 for m in spectra[name]) else 1.0
            if kept < 0.5:
                job.notes.append(f"layer {name}: VBMF judged most of its spectrum to be noise (rank "
                                 f"{format_ranks(ranks)} keeps {kept:.1%} of the energy); an under-trained "
                                 f"layer (weights near their random initialization) looks like this, and "
                                 f"accuracy may fall: consider --energy or --speedup")
        macs, _ = info.cost(scheme, ranks)
        if int(macs) >= info.macs:
            _leave(row, f"{rule} would not cut MACs ({info.macs:,} -> {int(macs):,})")
            row["rank"] = _rank_value(ranks)
            continue
        job.plan[name] = LayerPlan(scheme, ranks, info)


def _grid(maxr: int, cap: int = 1024) -> np.ndarray:
    if maxr <= cap:
        return np.arange(1, maxr + 1)
    return np.unique(np.linspace(1, maxr, cap).round().astype(np.int64))


CRITERION_TEXT = {
    "log-energy": "least -log(share of energy kept) per MAC saved, summed over layers (Zhang et al. 2015, "
                  "Eq. 14: maximize the product of the layers' kept energies), greedy on each layer's "
                  "lower convex hull",
    "energy": "least relative discarded energy (sum of discarded sigma^2 / ||W||^2) per MAC saved, greedy "
              "on each layer's lower convex hull",
}


def _budget_ranks(job, names):
    o = job.opts
    spectra = _spectra(job, names)
    cost_fn = rk.CRITERIA[o.criterion]
    options, fixed = [], 0
    total_before = 0
    for name in job.selected:
        row = job.rows.get(name)
        if row is None:
            continue
        total_before += row["macs_before"]
        if name not in job.infos:
            fixed += row["macs_before"]
    for name in names:
        info = job.infos[name]
        scheme = info.scheme_for(o.scheme)
        sp = spectra[name]
        if scheme == "tucker2":
            g1, g2 = _grid(info.max_ranks(scheme)[0]), _grid(info.max_ranks(scheme)[1])
            t1, t0 = cost_fn(sp[0].energies), cost_fn(sp[1].energies)
            R1, R2 = np.meshgrid(g1, g2, indexing="ij")
            R1, R2 = R1.ravel(), R2.ravel()
            err = t1[R1 - 1] + t0[R2 - 1]
            macs, _ = info.cost(scheme, (R1, R2))
            ranks = np.stack([R1, R2], axis=1)
        else:
            r = np.arange(1, info.max_ranks(scheme)[0] + 1)
            err = cost_fn(sp[0].energies)[:r.size]
            macs, _ = info.cost(scheme, (r,))
            ranks = r[:, None]
        options.append(rk.Options(name, info.macs, np.asarray(macs, np.float64), err, ranks))
    target = total_before / float(o.speedup)
    try:
        choice = rk.budget_allocation(options, target, fixed)
    except ValueError as e:
        best = float(e.args[0])
        best_factor = total_before / best if best > 0 else float("inf")
        raise UserError(f"--speedup {o.speedup} cannot be reached with the {o.scheme} scheme: the selected "
                        f"layers' MACs can fall at most {best_factor:.2f}x ({total_before:,} -> {int(best):,}) "
                        f"even at rank 1") from None
    for opt in options:
        info, row = job.infos[opt.name], job.rows[opt.name]
        scheme = info.scheme_for(o.scheme)
        k = choice[opt.name]
        if k is None:
            if not np.any(opt.macs < info.macs):
                _leave(row, f"no rank cuts its MACs (rank 1 costs {int(opt.macs.min()):,}, "
                            f"the layer {info.macs:,})")
            else:
                _leave(row, "left alone: the --speedup budget was met at less error in other layers")
            continue
        job.plan[opt.name] = LayerPlan(scheme, tuple(int(x) for x in opt.ranks[k]), info)
    job.sections["budget"] = {"speedup": float(o.speedup), "macs_before": int(total_before),
                              "target_macs": int(target),
                              "criterion": o.criterion, "criterion_text": CRITERION_TEXT[o.criterion]}


def step_factorize(job: CompressJob):
    o = job.opts
    new = Net(job.net.name, list(job.net.layers), _copy_header(job.net.header), job.net.source,
              job.net.weights_source, list(job.net.notes))
    job.new = new
    if not job.plan:
        if job.factorizing:
            job.notes.append("no layer was factorized (see each layer's reason)")
        return
    with _bar(len(job.plan), "factorize", o.progress) as bar:
        res = run_pass(factorize, new, plan=job.plan, method=o.svd, seed=o.seed, hooi_iters=o.hooi,
                       caches=job.caches, progress=lambda name: bar.update(1))
    if not res.changed:
        raise UserError(f"cannot factorize: {res.reason}")
    job.caches.clear()
    for d in res.details:
        row = job.rows[d["name"]]
        row.update({"action": "factorized", "scheme": d["scheme"], "rank": _rank_value(d["rank"]),
                    "energy_kept": d["energy_kept"], "weight_rel_error": d["weight_rel_error"],
                    "new_layers": d["new_layers"]})
        row.pop("reason", None)
    if job.train is not None:
        rewrite_train_net(job.train, job.plan, path=job.opts.train_net)
        job.extra["train_val.prototxt"] = net_to_prototxt(job.train)


def _copy_header(h):
    c = type(h)()
    c.CopyFrom(h)
    return c


def run_pair(net_a, net_b, inputs, engine="onnxruntime", outputs=None, threads=None):
    """Forward both nets on the same inputs: ({blob: a}, {blob: b}, engine used, notes).

    With ``onnxruntime``, a net our exporter cannot lower (or an exporter that
    is missing) falls back to OpenCV's Caffe reader, with a note saying why."""
    notes = []
    if engine == "onnxruntime":
        try:
            a = run_net(net_a, inputs, outputs, engine="onnxruntime", threads=threads)
            b = run_net(net_b, inputs, outputs, engine="onnxruntime", threads=threads)
            return a, b, "onnxruntime", notes
        except (ImportError, NotImplementedError, LrpruneError) as e:
            msg = " ".join(str(e).split())
            notes.append(f"onnxruntime could not run the nets ({type(e).__name__}: {msg}); "
                         f"verified with OpenCV's Caffe reader instead")
    a = run_net(net_a, inputs, outputs, engine="opencv", threads=threads)
    b = run_net(net_b, inputs, outputs, engine="opencv", threads=threads)
    return a, b, "opencv", notes


def step_verify(job: CompressJob):
    o = job.opts
    if not o.verify:
        job.verification = {"skipped": True}
        return
    outputs = job.net.outputs()
    try:
        ref, test, used, notes = run_pair(job.net, job.new, job.inputs, o.engine, outputs, o.threads)
    except EngineError as e:  # e.g. a layer type no engine knows: the files are still written
        job.verification = {"skipped": True, "reason": str(e)}
        job.notes.append(f"not verified: no engine could run the nets ({e})")
        return
    job.verification = {
        "engine": used, "requested_engine": o.engine, "inputs": job.inputs_desc,
        "batch": int(next(iter(job.inputs.values())).shape[0]) if job.inputs else None,
        **compare_outputs(ref, test, labels=job.labels, blobs=outputs), "notes": notes}


def step_report(job: CompressJob):
    new_stats = layer_stats(job.new)
    by_name = {r.name: r for r in new_stats}
    for name, row in job.rows.items():
        if row["action"] == "factorized":
            parts = [by_name[n] for n in row["new_layers"]]
            row["params_after"] = sum(p.params for p in parts)
            row["macs_after"] = sum(p.macs for p in parts)
        elif name in by_name:
            row["params_after"], row["macs_after"] = by_name[name].params, by_name[name].macs
    before = totals(layer_stats(job.net, job.shapes))
    after = totals(new_stats)
    sel = [r for n, r in job.rows.items() if n in set(job.selected)]
    sel_before = sum(r["macs_before"] for r in sel)
    sel_after = sum(r["macs_after"] for r in sel)
    o = job.opts
    job.report = {
        "tool": f"lrprune-caffe {__version__}",
        "net": job.net.name,
        "source": {"prototxt": str(job.prototxt), "weights": str(job.weights)},
        "options": {"scheme": o.scheme, "rank": None if o.rank is None else str(o.rank), "energy": o.energy,
                    "speedup": o.speedup, "rank_method": o.rank_method, "layers": o.layers, "svd": o.svd,
                    "hooi": o.hooi, "seed": o.seed, **{k: v for k, v in job.extra_options.items()
                                                       if isinstance(v, (int, float, str, bool, type(None)))}},
        "layers": list(job.rows.values()),
        "totals": {"params_before": before["params"], "params_after": after["params"],
                   "macs_before": before["macs"], "macs_after": after["macs"],
                   "macs_reduction": before["macs"] / after["macs"] if after["macs"] else None,
                   "params_reduction": before["params"] / after["params"] if after["params"] else None},
        "selected_totals": {"layers": len(sel), "macs_before": sel_before, "macs_after": sel_after,
                            "macs_reduction": sel_before / sel_after if sel_after else None},
        **job.sections,
        "verification": job.verification,
        "notes": list(job.notes),
        "files": ["model.prototxt", "model.caffemodel", "report.json", "report.md"]
                 + (["train_val.prototxt"] if job.train is not None else [])
                 + (["model.onnx"] if o.onnx else []),
    }


def step_write(job: CompressJob):
    if job.outdir is None:
        return
    from lrprune_caffe.api import write_net
    from .report import report_markdown
    # model.onnx (with --onnx) is already in job.extra: the sizes step exported it to count its bytes
    safe = json_safe(job.report)
    extra = {"report.json": json.dumps(safe, indent=2) + "\n", "report.md": report_markdown(safe)}
    extra.update(job.extra)
    job.written = write_net(job.new, job.outdir, extra=extra)


PIPELINE = [("check", step_check), ("load", step_load), ("select", step_select), ("rank", step_rank),
            ("factorize", step_factorize), ("verify", step_verify), ("report", step_report),
            ("write", step_write)]

#: keyword options of compress() that belong to added steps (pruning: lrprune_caffe.transforms.prune)
EXTRA_OPTIONS = ("prune", "prune_scope", "prune_method", "quality", "prune_structured", "prune_exclude", "sparse")


def add_step(name: str, fn, after: str = "factorize"):
    """Insert ``fn(job)`` as step ``name`` after step ``after`` (replacing a step of that name)."""
    for i, (n, _) in enumerate(PIPELINE):
        if n == name:
            PIPELINE[i] = (name, fn)
            return
    idx = [n for n, _ in PIPELINE].index(after)
    PIPELINE.insert(idx + 1, (name, fn))


def compress(prototxt, weights, outdir=None, *, scheme="channel", rank=None, energy=None, speedup=None,
             rank_method="svd", layers=None, inputs=None, train_net=None, onnx=False, engine="onnxruntime",
             verify=True, svd="auto", seed=0, hooi=0, threads=None, progress=False, phase="TEST",
             labels=None, criterion="log-energy", opset=13, **extra_options):
    """Factorize a Caffe net; returns ``(report, new_net)``.

    Writes OUTDIR/model.prototxt, model.caffemodel, report.json, report.md
    (+ train_val.prototxt with ``train_net``, model.onnx with ``onnx``) all or
    nothing when ``outdir`` is given. See :class:`CompressOptions` and the CLI
    help for the options; ``extra_options`` go to added steps (pruning).
    """
    opts = CompressOptions(scheme=scheme, rank=rank, energy=energy, speedup=speedup, rank_method=rank_method,
                           layers=layers, inputs=inputs, train_net=train_net, onnx=onnx, engine=engine,
                           verify=verify, svd=svd, seed=seed, hooi=hooi, threads=threads, progress=progress,
                           phase=phase, criterion=criterion, opset=opset)
    job = CompressJob(str(prototxt), None if weights is None else str(weights), outdir, opts,
                      extra_options=dict(extra_options))
    job.labels = labels
    from lrprune_caffe.transforms.prune import install_compress_steps
    install_compress_steps()
    for _, step in list(PIPELINE):
        step(job)
    if job.written:
        job.report["written"] = job.written
    return job.report, job.new


# ---------------------------------------------------------------------------
# verify

def verify(prototxt, weights, prototxt2, weights2, inputs=None, engine="onnxruntime", seed=0, threads=None,
           phase="TEST", labels=None) -> dict:
    """Run two nets on the same inputs (an .npz, or seeded random of the first net's input shape)
    and compare every output blob of the first (see :mod:`lrprune_caffe.engines.compare`)."""
    if engine not in ENGINES:
        raise UserError(f"--engine: unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    a = load_net(prototxt, weights, phase=phase)
    b = load_net(prototxt2, weights2, phase=phase)
    ia, ib = a.input_shapes(), b.input_shapes()
    if set(ia) != set(ib):
        raise UserError(f"the nets have different inputs: {', '.join(ia)} vs {', '.join(ib)}")
    for k in ia:
        if ia[k] is not None and ib[k] is not None and tuple(ia[k][1:]) != tuple(ib[k][1:]):
            raise UserError(f"input '{k}' is {tuple(ia[k])} in {prototxt} but {tuple(ib[k])} in {prototxt2}: "
                            f"the nets cannot take the same inputs")
    if inputs is not None:
        data = load_inputs(inputs, a)
        desc = str(inputs)
    else:
        data = default_inputs(a, seed=seed)
        desc = f"seeded standard-normal inputs (seed {seed}) of the input shape"
    outputs = a.outputs()
    blobs_b = {t for layer in b.layers for t in layer.tops}
    missing = [o for o in outputs if o not in blobs_b]
    if missing:
        raise UserError(f"{prototxt2} produces no blob named {', '.join(repr(m) for m in missing)} "
                        f"(an output of {prototxt})")
    ref, test, used, notes = run_pair(a, b, data, engine, outputs, threads)
    if labels is not None and not isinstance(labels, np.ndarray):
        labels = _load_labels(labels)
    res = {"engine": used, "requested_engine": engine, "inputs": desc,
           "batch": int(next(iter(data.values())).shape[0]),
           **compare_outputs(ref, test, labels=labels, blobs=outputs), "notes": notes + a.notes + b.notes}
    return res


def _load_labels(path):
    """Labels from an .npz: its array 'y' or 'labels' if present (a DATA.npz), else its first array."""
    from lrprune_caffe.fileutil import read_npz
    arrays = read_npz(path, "an .npz of labels")
    if not arrays:
        raise BadFileError("holds no array (expected labels)", path=path)
    key = next((k for k in ("y", "labels") if k in arrays), next(iter(arrays)))
    return arrays[key].reshape(-1)


__all__ = ["compress", "verify", "CompressOptions", "CompressJob", "PIPELINE", "add_step", "parse_rank_spec",
           "select_layers", "load_inputs", "run_pair", "read_train_net"]
