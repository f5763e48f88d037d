"""compress's report: one typed row per layer, the byte counts of what is written, the outcome.

:class:`LayerRow` is what each step fills in (planning: scheme, ranks,
reason; factorization: errors, new layers; pruning and sizes: nonzeros and
bytes). :func:`build_report` turns the rows and the steps' records into
report.json's dict (``report.md`` is :mod:`lrprune_caffe.core.markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lrprune_caffe.export.sparse import dense_onnx_bytes, storage_report
from lrprune_caffe.ir.analysis import layer_stats, sparsity_rows, sparsity_totals, totals
from lrprune_caffe.version import __version__

STANDARD_FILES = ["model.prototxt", "model.caffemodel", "report.json", "report.md"]


@dataclass
class LayerRow:
    """One reported layer (a Convolution / InnerProduct / Deconvolution with weights)."""

    name: str
    type: str
    params_before: int
    macs_before: int
    action: str = "kept"  # kept | factorized | pruned | factorized+pruned | shrunk
    scheme: Optional[str] = None
    rank: object = None  # int, or [r1, r2] for tucker2
    max_rank: object = None
    energy_kept: float = 1.0
    weight_rel_error: float = 0.0
    params_after: int = None
    macs_after: int = None
    reason: Optional[str] = None  # why the layer was not (fully) compressed
    new_layers: Optional[list] = None  # factorized: the layers that replace it
    storage: dict = field(default_factory=dict)  # nonzero_params, sparsity, *_bytes (sizes of the written files)
    rank_factorized: object = None  # structured pruning removed rank components: the rank before that
    note: Optional[str] = None

    def __post_init__(self):
        if self.params_after is None:
            self.params_after = self.params_before
        if self.macs_after is None:
            self.macs_after = self.macs_before

    @property
    def factorized(self) -> bool:
        return self.new_layers is not None

    def as_dict(self) -> dict:
        d = {"name": self.name, "type": self.type, "action": self.action, "scheme": self.scheme,
             "rank": self.rank, "max_rank": self.max_rank, "energy_kept": self.energy_kept,
             "params_before": self.params_before, "params_after": self.params_after,
             "macs_before": self.macs_before, "macs_after": self.macs_after,
             "weight_rel_error": self.weight_rel_error}
        if self.reason is not None:
            d["reason"] = self.reason
        if self.new_layers is not None:
            d["new_layers"] = list(self.new_layers)
        d.update(self.storage)
        if self.rank_factorized is not None:
            d["rank_factorized"] = self.rank_factorized
        if self.note is not None:
            d["note"] = self.note
        return d


def rank_value(ranks):
    """A rank as the report holds it: an int, or a list for two ranks."""
    ranks = [int(r) for r in ranks]
    return ranks[0] if len(ranks) == 1 else ranks


@dataclass
class PruneRecord:
    """What pruning did (report.json's ``prune`` section)."""

    spec: object  # the PruneSpec, with factorized layers' names mapped to their new layers
    masks_file: Optional[str]  # "masks.npz", or None (structured: nothing to hold at zero)
    layers: list  # sparsity rows of the pruned (or shrunk) layers

    def touched(self) -> set:
        return {r["name"] for r in self.layers if r.get("pruned") or r.get("structured")}

    def structured(self) -> set:
        return {r["name"] for r in self.layers if r.get("structured")}

    def as_dict(self) -> dict:
        s = self.spec
        return {"fraction": s.fraction, "per_layer": dict(s.per_layer), "exclude": list(s.exclude),
                "scope": s.scope, "method": s.method, "quality": s.quality, "structured": s.structured,
                "masks": self.masks_file, "layers": self.layers}


def count_after(rows: dict, new) -> list:
    """Fill ``params_after`` / ``macs_after`` of each row from the new net; returns its layer stats."""
    new_stats = layer_stats(new)
    by_name = {r.name: r for r in new_stats}
    for name, row in rows.items():
        if row.factorized:
            parts = [by_name[n] for n in row.new_layers]
            row.params_after = sum(p.params for p in parts)
            row.macs_after = sum(p.macs for p in parts)
        elif name in by_name:
            row.params_after, row.macs_after = by_name[name].params, by_name[name].macs
    return new_stats


def count_storage(rows: dict, new, model, pruned: Optional[PruneRecord], by_budget: bool = False) -> dict:
    """What the written files hold, per row (a factorized layer: summed over its new layers):
    ``nonzero_params``, ``sparsity``, ``dense_bytes`` (4 per param), ``caffemodel_bytes`` (its
    share of the written caffemodel), ``onnx_bytes`` (its initializers in ``model``, when given)
    and ``csr_bytes`` (Han et al.'s CSR with 8-bit relative indices). With pruning, each row's
    action and reason say what pruning did to it (``by_budget``: the --speedup budget chose
    the structured pruning; no --prune was given). Returns the storage table (report["storage"])."""
    storage = storage_report(new, model)
    by_layer = {r["name"]: r for r in storage["layers"]}
    keys = ("params", "nonzero_params", "dense_bytes", "caffemodel_bytes", "csr_bytes") + \
        (("onnx_bytes",) if model is not None else ())
    touched = pruned.touched() if pruned else set()
    dense = {r["name"] for r in pruned.layers if r.get("kept_dense")} if pruned else set()
    structured = pruned.structured() if pruned else set()
    excluded = set(pruned.spec.exclude) if pruned else set()
    for name, row in rows.items():
        names = row.new_layers if row.factorized else [name]
        parts = [by_layer[n] for n in names if n in by_layer]
        sums = {k: sum(p[k] for p in parts) for k in keys}
        params = sums.pop("params")
        row.storage = {**sums, "sparsity": (1.0 - sums["nonzero_params"] / params) if params else 0.0}
        if pruned is not None:
            _say_what_pruning_did(row, names, touched, structured, excluded, new, dense, by_budget)
    return storage


def _say_what_pruning_did(row, names, touched, structured, excluded, new, dense=frozenset(), by_budget=False):
    reason, row.reason = row.reason, None
    if touched & set(names):
        row.action = "factorized+pruned" if row.factorized else "pruned"
        if reason:
            row.reason = f"not factorized: {reason}"
    elif not row.factorized and row.params_after != row.params_before:
        row.action = "shrunk"
        row.reason = "its inputs were removed by structured pruning of the layer before it"
    elif not row.factorized and row.name in dense:
        row.reason = ((f"not factorized: {reason}; " if reason else "")
                      + "kept dense by --prune-scope erk (small, or few weights per output)")
    elif not row.factorized:
        why = ("the --speedup budget did not prune it" if by_budget
               else "excluded from pruning (--prune-exclude)" if row.name in excluded
               else "not selected for pruning (--prune names other layers, or LAYER=0)")
        row.reason = f"not factorized: {reason}; {why}" if reason else why
    else:
        row.reason = reason
    if row.factorized and structured & set(names[:-1]):
        # rank components were removed: the rank is what the written layers have now
        row.rank_factorized = row.rank
        row.rank = rank_value(int(new.layer(n).blobs[0].shape[0]) for n in names[:-1])
        row.note = ("energy_kept and weight_rel_error are those of the factorization (rank_factorized), "
                    "before structured pruning removed rank components")


def outcome(t: dict, original_bytes: Optional[int] = None, sparse=False, dense_onnx_size=None,
            sparse_written: Optional[int] = None) -> dict:
    """Whether the written net is really faster (fewer dense MACs) and its files really smaller,
    in words: zeros kept in dense tensors save neither time nor bytes. ``t``: the report's totals;
    ``sparse_written``: how many sparse initializers model.onnx holds (None: not counted)."""
    known = bool(t["macs_after"] and t["macs_before"])
    faster = bool(known and t["macs_after"] < t["macs_before"])
    ratio = t["macs_before"] / t["macs_after"] if known else None
    cm_ratio = original_bytes / t["caffemodel_bytes"] if original_bytes and t.get("caffemodel_bytes") else None
    smaller_cm = cm_ratio is not None and cm_ratio > 1.01
    parts = ["speed unknown: the multiply-adds could not be counted (unknown shapes)" if not known else
             f"faster: {ratio:.2f}x fewer multiply-adds in any dense runtime" if ratio >= 1.005 else
             f"barely faster: {100 * (1 - 1 / ratio):.1f}% fewer multiply-adds" if faster
             else "not faster: the same multiply-adds (zeros in dense tensors cost a dense runtime "
                            "the same time; factorize or use --prune-structured for speed)"]
    if cm_ratio is not None:
        parts.append(f"model.caffemodel {cm_ratio:.2f}x smaller than the original" if smaller_cm else
                     "model.caffemodel not smaller (Caffe stores every blob dense, zeros included)")
    onnx_ratio = None
    if t.get("onnx_bytes") and dense_onnx_size and sparse_written:
        onnx_ratio = t["onnx_bytes"] / dense_onnx_size
        parts.append(f"model.onnx is {onnx_ratio:.2f}x the size of its dense form ({sparse_written} "
                     f"sparse initializer{'s' if sparse_written != 1 else ''})")
    elif sparse and t.get("onnx_bytes") and sparse_written == 0:
        parts.append("model.onnx stays dense: no layer has enough zeros for a smaller sparse initializer "
                     "(above about 67%)")
    elif t.get("sparsity", 0) > 0.05 and not sparse:
        parts.append(f"the zeros could be stored compactly: --onnx --sparse (layers above about 67% zeros), "
                     f"or CSR {t['csr_bytes']:,} bytes vs {t['dense_bytes']:,} dense")
    return {"faster": faster, "caffemodel_smaller": smaller_cm, "caffemodel_ratio": cm_ratio,
            "original_caffemodel_bytes": original_bytes, "onnx_vs_dense": onnx_ratio, "summary": "; ".join(parts)}


def build_report(*, net, new, shapes, options, rows: dict, selected: list, budget: Optional[dict],
                 pruned: Optional[PruneRecord], verification: dict, notes: list, files: list,
                 onnx_model=None, onnx_bytes: Optional[int] = None, original_bytes: Optional[int] = None) -> dict:
    """report.json's dict from the steps' records (every number counted on the nets themselves)."""
    new_stats = count_after(rows, new)
    by_budget = any("structured" in v for v in ((budget or {}).get("layers") or {}).values())  # not --prune
    storage = count_storage(rows, new, onnx_model, pruned, by_budget=by_budget)
    before = totals(layer_stats(net, shapes))
    after = totals(new_stats)
    chosen = set(selected)
    sel = [r for n, r in rows.items() if n in chosen]
    sel_before = sum(r.macs_before for r in sel)
    sel_after = sum(r.macs_after for r in sel)
    st = storage["totals"]
    t = {"params_before": before["params"], "params_after": after["params"],
         "macs_before": before["macs"], "macs_after": after["macs"],
         "macs_reduction": before["macs"] / after["macs"] if after["macs"] else None,
         "params_reduction": before["params"] / after["params"] if after["params"] else None,
         "nonzero_params_before": sparsity_totals(sparsity_rows(net))["nonzero_params"],
         "nonzero_params": st["nonzero_params"], "sparsity": st["sparsity"], "dense_bytes": st["dense_bytes"],
         "csr_bytes": st["csr_bytes"], "caffemodel_bytes": st["caffemodel_bytes"], "onnx_bytes": onnx_bytes}
    report = {
        "tool": f"lrprune-caffe {__version__}",
        "net": net.name,
        "source": {"prototxt": net.source, "weights": net.weights_source},
        "options": options.as_report(),
        "layers": [r.as_dict() for r in rows.values()],
        "totals": t,
        "selected_totals": {"layers": len(sel), "macs_before": sel_before, "macs_after": sel_after,
                            "macs_reduction": sel_before / sel_after if sel_after else None},
    }
    if budget is not None:
        report["budget"] = budget
    if pruned is not None:
        report["prune"] = pruned.as_dict()
    report.update({"verification": verification, "notes": list(notes), "files": list(files)})
    if onnx_model is not None:
        report["onnx"] = {"opset": int(options.opset), "ir_version": int(onnx_model.ir_version),
                          "bytes": onnx_bytes, "sparse": bool(options.sparse)}
        if options.sparse:
            report["sparse_onnx"] = {"sparse_initializers": len(onnx_model.graph.sparse_initializer),
                                     "dense_initializers": len(onnx_model.graph.initializer)}
    report["storage"] = storage
    report["outcome"] = outcome(t, original_bytes, sparse=bool(options.sparse),
                                dense_onnx_size=dense_onnx_bytes(onnx_model) if options.sparse else None,
                                sparse_written=len(onnx_model.graph.sparse_initializer)
                                if onnx_model is not None else None)
    return report


__all__ = ["LayerRow", "PruneRecord", "rank_value", "count_after", "count_storage", "outcome", "build_report",
           "STANDARD_FILES"]
