"""compress, step 1: which layers to factorize, and at which ranks.

:func:`plan_ranks` reads the net (never changes it) and returns a
:class:`RankPlan`: one report row per Convolution / InnerProduct /
Deconvolution layer with weights, the ``LayerPlan`` of each layer to
factorize, the SVDs computed on the way (reused by the factorization) and
the budget record with ``--speedup``. The rank rules: fixed (``--rank``),
energy (``--energy``), VBMF (``--rank-method vbmf``,
:mod:`lrprune_caffe.lowrank.rank`), or a whole-net budget (``--speedup``) in MACs
(:mod:`lrprune_caffe.lowrank.budget`) or in measured milliseconds (``--cost latency``,
:mod:`lrprune_caffe.core.latency_cost`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import numpy as np

from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.analysis import layer_stats
from lrprune_caffe.lowrank import budget as bg, decompose as dec, rank as rk
from lrprune_caffe.transforms import Precondition
from lrprune_caffe.transforms.factorize import FACTORIZABLE, LayerPlan, check_ranks, format_ranks, layer_info

from .options import CompressOptions, _as_list, parse_rank_spec
from .report import LayerRow, rank_value

REPORTED_TYPES = FACTORIZABLE + ("Deconvolution",)


@dataclass
class RankPlan:
    rows: dict  # name -> LayerRow, in net order
    selected: list  # names of the selected Convolution / InnerProduct layers
    plan: dict = field(default_factory=dict)  # name -> LayerPlan (the layers to factorize)
    caches: dict = field(default_factory=dict)  # name -> SVDs computed for the spectra
    budget: dict = None  # --speedup: the budget record for the report
    notes: list = field(default_factory=list)
    data_energies: dict = None  # --speedup with calibration data: {layer: response eigenvalues}
    structured: dict = field(default_factory=dict)  # --speedup, latency: {layer: outputs kept} (structured pruning)


def progress_bar(total, desc, progress):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False,
                disable=True if not progress else None)


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
    index = net.index_by_name()
    for item in items:
        if item in cands:
            chosen.add(item)
            continue
        if item in index:
            raise UserError(f"--layers: layer '{item}' of {where} is a {index.layer(item).type}, not a "
                            f"Convolution or InnerProduct layer")
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


def _select(net, o: CompressOptions, layer_ranks, default_rank) -> list:
    cands = [l.name for l in net.layers if l.type in FACTORIZABLE]
    index = net.index_by_name()
    for name in layer_ranks:
        if name not in cands:
            if name in index:
                raise UserError(f"--rank: layer '{name}' is a {index.layer(name).type}, not a Convolution "
                                f"or InnerProduct layer")
            raise UserError(f"--rank: {net.source} has no layer named '{name}'")
    if o.layers is not None:
        selected = select_layers(net, o.layers, cands)
        outside = [n for n in layer_ranks if n not in selected]
        if outside:
            raise UserError(f"--rank names layer '{outside[0]}', which --layers does not select")
        return selected
    if layer_ranks and default_rank is None:
        return [n for n in cands if n in layer_ranks]
    return list(cands)


def _rows(net, shapes, o: CompressOptions, selected) -> tuple:
    """(rows, {name: LayerInfo} of the selected layers that can be factorized)."""
    stats = {r.name: r for r in layer_stats(net, shapes)}
    chosen = set(selected)
    rows, infos = {}, {}
    for layer in net.layers:
        if layer.type not in REPORTED_TYPES or not layer.blobs:
            continue
        s = stats[layer.name]
        row = rows[layer.name] = LayerRow(layer.name, layer.type, s.params, s.macs)
        if layer.type == "Deconvolution":
            row.reason = "Deconvolution layers are not factorized"
            continue
        if layer.name not in chosen:
            row.reason = "not selected (--layers / per-layer --rank)"
            continue
        try:
            info = layer_info(layer, shapes.inputs[layer.name][0], shapes.outputs[layer.name][0])
        except Precondition as e:
            row.reason = str(e)
            continue
        scheme = info.scheme_for(o.scheme)
        row.scheme = scheme
        row.max_rank = rank_value(info.max_ranks(scheme))
        infos[layer.name] = info
    return rows, infos


def _spectra(net, infos, names, o: CompressOptions, caches) -> dict:
    out = {}
    index = net.index_by_name()
    with progress_bar(len(names), "spectra", o.progress) as bar:
        for name in names:
            info = infos[name]
            W = index.layer(name).blobs[0]
            if info.kind == "ip" and info.transpose:
                W = W.T
            out[name] = dec.scheme_spectra(W, info.scheme_for(o.scheme), group=info.group, method=o.svd,
                                           cache=caches.setdefault(name, {}))
            bar.update(1)
    return out


def _fixed_ranks(net, name, info, scheme, layer_ranks, default_rank) -> tuple:
    ranks = layer_ranks.get(name, default_rank)
    if scheme == "tucker2" and len(ranks) == 1:
        ranks = (ranks[0], ranks[0])
    why = check_ranks(info, scheme, ranks)
    if why:
        hint = "" if name in layer_ranks else f"; give it its own rank ({name}=R) or leave it out with --layers"
        raise UserError(f"--rank: layer '{name}' ({info.type}): {why}{hint}")
    return tuple(int(r) for r in ranks)


def _vbmf_note(name, ranks, spectra):
    if not any(m.energies.sum() > 0 for m in spectra):
        return None
    kept = min(float(m.energies[:r].sum() / m.energies.sum()) for m, r in zip(spectra, ranks)
               if m.energies.sum() > 0)
    if kept >= 0.5:
        return None
    return (f"layer {name}: VBMF judged most of its spectrum to be noise (rank {format_ranks(ranks)} keeps "
            f"{kept:.1%} of the energy); an under-trained layer (weights near their random initialization) "
            f"looks like this, and accuracy may fall: consider --energy or --speedup")


def _per_layer_ranks(net, rp: RankPlan, infos, names, o, layer_ranks, default_rank):
    spectra = _spectra(net, infos, names, o, rp.caches) if o.rank is None else {}  # energy / vbmf: all values
    for name in names:
        info, row = infos[name], rp.rows[name]
        scheme = info.scheme_for(o.scheme)
        if o.rank is not None:
            ranks = _fixed_ranks(net, name, info, scheme, layer_ranks, default_rank)
            rule = f"rank {format_ranks(ranks)}"
        elif o.energy is not None:
            ranks = rk.energy_ranks(spectra[name], float(o.energy))
            rule = f"energy {o.energy}: rank {format_ranks(ranks)}"
        else:
            ranks = rk.vbmf_ranks(spectra[name])
            rule = f"VBMF rank {format_ranks(ranks)}"
            note = _vbmf_note(name, ranks, spectra[name])
            if note:
                rp.notes.append(note)
        macs, _ = info.cost(scheme, ranks)
        if int(macs) >= info.macs:
            row.reason = f"{rule} would not cut MACs ({info.macs:,} -> {int(macs):,})"
            row.rank = rank_value(ranks)
            continue
        rp.plan[name] = LayerPlan(scheme, ranks, info)


#: --speedup leaves alone a layer under this share of the selected layers' MACs (negligible saving)
NEGLIGIBLE_SHARE = 0.01


def budget_energies(info, scheme, spectra, data=None) -> tuple:
    """What a --speedup budget spends by, per rank dimension, under either cost (macs or latency): the
    response eigenvalues on calibration data (``data``; one SVD factor only), else the weights' squared
    singular values. The criteria normalize them by their sum, so a cut's error is its share lost."""
    energies = tuple(m.energies for m in spectra)
    if data is not None and len(energies) == 1:
        r = info.max_ranks(scheme)[0]
        energies = (np.concatenate([data[:r], np.zeros(max(0, r - data.size))]),)
    return energies


def _budget_layer(info, scheme, spectra, data=None) -> bg.BudgetLayer:
    energies = budget_energies(info, scheme, spectra, data)
    return bg.BudgetLayer(info.name, info.macs, energies, info.max_ranks(scheme),
                          lambda ranks, info=info, scheme=scheme: info.cost(scheme, ranks)[0])


def negligible(info, macs_selected: int):
    """Why a --speedup budget should leave the layer alone (None: it may be factorized)."""
    if info.n_out // info.group <= 2:
        return f"left alone: {info.n_out} outputs (a rank-1 cut of so few outputs saves next to nothing)"
    if macs_selected and info.macs < NEGLIGIBLE_SHARE * macs_selected:
        return (f"left alone: {info.macs:,} MACs, under {NEGLIGIBLE_SHARE:.0%} of the selected layers' "
                f"{macs_selected:,} (a negligible saving)")
    return None


def data_aware_names(infos, names, scheme) -> list:
    """The layers whose budget cost may be their response eigenvalues (one SVD factor, no groups)."""
    return [n for n in names if infos[n].scheme_for(scheme) in ("channel", "fc") and infos[n].group == 1]


def _budget_ranks(net, rp: RankPlan, infos, names, o: CompressOptions):
    macs_before = sum(rp.rows[n].macs_before for n in rp.selected if n in rp.rows)
    small = {n: negligible(infos[n], macs_before) for n in names}
    for n, why in small.items():
        if why:
            rp.rows[n].reason = why
    names = [n for n in names if not small[n]]
    # spectra only of the layers the budget may cut (VGG-16's fc6-fc8, 4096^2 eigenproblems, are left alone)
    spectra = _spectra(net, infos, names, o, rp.caches)
    data = rp.data_energies or {}
    from . import latency_cost
    if latency_cost.cost_of(o) != "macs":
        energies = {n: budget_energies(infos[n], infos[n].scheme_for(o.scheme), spectra[n], data.get(n))
                    for n in names}
        # structured pruning competes with factorizing only when the user asked for no pruning, and only
        # by weight energy (a data-aware layer's error is its response eigenvalues, not comparable)
        prunable = [] if (o.prune is not None or o.prune_structured) else [n for n in names if n not in data]
        if latency_cost.budget_latency(net, rp, infos, names, energies, o, prunable=prunable):
            _data_aware_record(rp, names, data)
            # say so when the latency budget cut far deeper than the MAC budget would
            _compare_with_macs(rp, infos, names, spectra, data, o, macs_before)
            return  # --cost latency (or its default): milliseconds measured on the target runtime
    fixed = sum(rp.rows[n].macs_before for n in rp.selected if n in rp.rows and n not in names)
    layers = [_budget_layer(infos[n], infos[n].scheme_for(o.scheme), spectra[n], data.get(n)) for n in names]
    try:
        alloc = bg.allocate(layers, float(o.speedup), o.criterion, macs_before, fixed)
    except bg.Unreachable as e:
        best_factor = macs_before / e.best_macs if e.best_macs > 0 else float("inf")
        raise UserError(f"--speedup {o.speedup} cannot be reached with the {o.scheme} scheme: the selected "
                        f"layers' MACs can fall at most {best_factor:.2f}x ({macs_before:,} -> "
                        f"{int(e.best_macs):,}) even at rank 1") from None
    for name in names:
        info, row, ranks = infos[name], rp.rows[name], alloc.ranks[name]
        if ranks is None:
            least = alloc.min_macs[name]
            row.reason = (f"no rank cuts its MACs (rank 1 costs {int(least):,}, the layer {info.macs:,})"
                          if not least < info.macs else
                          "the --speedup budget was met at less error in other layers")
            continue
        rp.plan[name] = LayerPlan(info.scheme_for(o.scheme), ranks, info)
    rp.budget = {"cost": "macs", "speedup": float(o.speedup), "macs_before": int(macs_before),
                 "target_macs": int(alloc.target_macs), "criterion": o.criterion,
                 "criterion_text": bg.CRITERION_TEXT[o.criterion]}
    _data_aware_record(rp, names, data)


#: the latency budget is flagged (a note; budget["versus_macs"] always holds both) when its summed per-layer
#: error is at least this many times the MAC budget's at the same --speedup and at least MUCH_WORSE_BY above
#: it (the criterion's units: -log of the kept energy share; 2.0 = a further e^2-fold of energy lost).
#: GoogLeNet at 112 (per-op overhead a large share of many small layers): latency 13.5 with rank 1 on 8
#: layers, 0.91 relative L2 on the logits; macs 0.44, 0.19. ResNet-50 at 112 (2.4-2.6 against 0.85: logits
#: 0.49 against 0.48) is not flagged
MUCH_WORSE_RATIO = 5.0
MUCH_WORSE_BY = 2.0


def _compare_with_macs(rp: RankPlan, infos, names, spectra, data, o, macs_before):
    """The MAC budget's summed error at the same --speedup (pure arithmetic: nothing is measured); a note
    when the latency budget's is much larger."""
    lat = rp.budget.get("error")
    fixed = sum(rp.rows[n].macs_before for n in rp.selected if n in rp.rows and n not in names)
    layers = [_budget_layer(infos[n], infos[n].scheme_for(o.scheme), spectra[n], data.get(n)) for n in names]
    try:
        alloc = bg.allocate(layers, float(o.speedup), o.criterion, macs_before, fixed)
    except bg.Unreachable:
        return
    macs_err = 0.0
    for layer in layers:
        ranks = alloc.ranks[layer.name]
        if ranks is None:
            continue
        c = bg.layer_choices(layer, o.criterion)
        hit = np.nonzero(np.all(np.atleast_2d(c.ranks) == np.asarray(ranks)[None, :], axis=1))[0]
        macs_err += float(c.err[hit[0]]) if hit.size else 0.0
    if lat is None:
        return
    rp.budget["versus_macs"] = {"latency_error": float(lat), "macs_error": macs_err}
    if lat >= MUCH_WORSE_RATIO * macs_err and lat - macs_err >= MUCH_WORSE_BY:
        deep = sum(1 for n, p in rp.plan.items() if max(p.ranks) <= 2)
        rp.notes.append(
            f"the latency budget cut much deeper than --cost macs would: summed {o.criterion} error "
            f"{lat:.2f} against {macs_err:.2f} for the MAC budget at the same --speedup {o.speedup:g}"
            + (f" ({deep} layer(s) at rank 2 or less)" if deep else "")
            + "; the output may be far from the original's (see the check). Per-op overhead makes the "
            "target costly on this net; --cost macs keeps more of each layer but is slower than asked")


def _data_aware_record(rp: RankPlan, names, data: dict):
    used = sorted(n for n in names if n in data)
    if used:
        rp.budget["data_aware"] = {
            "layers": used, "energies": "eigenvalues of each layer's centered output-response covariance on the "
            "calibration data (Zhang et al. 2015, Eq. 14) instead of the weights' squared singular values"}


def plan_ranks(net, shapes, o: CompressOptions, data_energies=None) -> RankPlan:
    """Rows, selection and the factorization plan of ``net`` (see the module docstring).
    ``data_energies``: {layer: response eigenvalues} (:func:`lrprune_caffe.core.calib.response_energies`)
    for ``--speedup`` to spend its budget on, in place of the weights' spectra."""
    default_rank, layer_ranks = parse_rank_spec(o.rank)
    selected = _select(net, o, layer_ranks, default_rank)
    rows, infos = _rows(net, shapes, o, selected)
    rp = RankPlan(rows, selected, data_energies=data_energies)
    if not o.factorizing:
        for name in selected:
            if name in rows and rows[name].action == "kept":
                rows[name].scheme = None
        return rp
    names = [n for n in selected if n in infos]
    if o.speedup is not None:
        _budget_ranks(net, rp, infos, names, o)
    else:
        _per_layer_ranks(net, rp, infos, names, o, layer_ranks, default_rank)
    return rp


__all__ = ["RankPlan", "plan_ranks", "negligible", "budget_energies", "data_aware_names", "NEGLIGIBLE_SHARE",
           "select_layers", "progress_bar", "REPORTED_TYPES"]
