"""report.json's readable twin: report.md (Markdown tables), and the tables of the CLI's text summary."""

from __future__ import annotations


def _count(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    v = int(v)
    if abs(v) >= 10**9:
        return f"{v / 1e9:.2f}G"
    if abs(v) >= 10**6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 10**4:
        return f"{v / 1e3:.1f}K"
    return str(v)


def _number(v, fmt="{:.4g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return fmt.format(v)


def _rank(r) -> str:
    if r is None:
        return "-"
    if isinstance(r, (list, tuple)):
        return "x".join(str(x) for x in r)
    return str(r)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def layer_table(report) -> tuple:
    sparse = any("nonzero_params" in r for r in report["layers"])
    headers = ["layer", "type", "action", "scheme", "rank", "params", "params_after", "MACs", "macs_after",
               "energy kept", "weight err"] + (["nonzero", "sparsity"] if sparse else []) + ["reason"]
    rows = []
    for r in report["layers"]:
        row = [r["name"], r["type"], r["action"], r.get("scheme") or "-", _rank(r.get("rank")),
               _count(r["params_before"]), _count(r["params_after"]), _count(r["macs_before"]), _count(r["macs_after"]),
               _number(r.get("energy_kept"), "{:.4f}"), _number(r.get("weight_rel_error"), "{:.4f}")]
        if sparse:
            row += [_count(r.get("nonzero_params")), _number(r.get("sparsity"), "{:.1%}")]
        rows.append(row + [r.get("reason", "")])
    return headers, rows


def verification_rows(ver) -> tuple:
    headers = ["output", "shape", "max abs err", "rel L2 err", "SNR dB", "top-1 agree"]
    rows = []
    for name, v in (ver or {}).get("blobs", {}).items():
        if "error" in v:
            rows.append([name, "x".join(map(str, v["shape"])), v["error"], "", "", ""])
            continue
        snr = v.get("snr_db")
        rows.append([name, "x".join(map(str, v["shape"])), _number(v["max_abs"], "{:.3g}"),
                     _number(v["rel_l2"], "{:.3g}"),
                     "inf (identical)" if snr is None else _number(snr, "{:.1f}"),
                     "-" if v.get("top1_agreement") is None else f"{100 * v['top1_agreement']:.1f}%"])
    return headers, rows


def _md_table(headers, rows) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def report_markdown(report: dict) -> str:
    t = report["totals"]
    o = report.get("options", {})
    factorized = bool(o.get("rank") or o.get("energy") or o.get("speedup") or o.get("rank_method") == "vbmf")
    rule = (f"rank {o['rank']}" if o.get("rank") else f"energy {o['energy']}" if o.get("energy")
            else f"speed-up {o['speedup']}x" if o.get("speedup") else
            f"rank method {o.get('rank_method')}" if factorized else "no factorization")
    pr = report.get("prune")
    if pr:
        what = (f"{pr['method']} pruning" + (f", Q={pr['quality']}" if pr.get("quality") is not None else "")
                + (f", fraction {pr['fraction']}" if pr.get("fraction") is not None else "")
                + (f", per layer {pr['per_layer']}" if pr.get("per_layer") else "")
                + f", scope {pr['scope']}" + (", structured" if pr.get("structured") else ""))
        rule += "; " + what
    scheme_prefix = o.get("scheme") + ", " if factorized else ""
    lines = [f"# Compression of {report.get('net') or 'the net'}", "",
             f"- source: `{report['source']['prototxt']}` + `{report['source']['weights']}`",
             f"- scheme: {scheme_prefix}{rule}" + (", VBMF" if o.get("rank_method") == "vbmf" and o.get("rank")
                                                   else "") + f"; SVD: {o.get('svd')}",
             f"- tool: {report.get('tool')}", "", "## Totals", "",
             _md_table(["", "before", "after", "reduction"], [
                 ["params", f"{t['params_before']:,}", f"{t['params_after']:,}",
                  _ratio(t["params_before"], t["params_after"])],
                 ["MACs", f"{t['macs_before']:,}", f"{t['macs_after']:,}", _ratio(t["macs_before"], t["macs_after"])],
             ] + ([["nonzero params", f"{t.get('nonzero_params_before', t['params_before']):,}",
                    f"{t['nonzero_params']:,}",
                    _ratio(t.get("nonzero_params_before", t["params_before"]), t["nonzero_params"])]]
                  if t.get("nonzero_params") is not None else []))]
    if t.get("caffemodel_bytes") is not None:
        lines += ["", f"Written: model.caffemodel {t['caffemodel_bytes']:,} bytes"
                  + (f", model.onnx {t['onnx_bytes']:,} bytes" if t.get("onnx_bytes") else "")
                  + (" (sparse initializers)" if report.get("sparse_onnx") else "") + "."]
    if report.get("outcome"):
        lines += ["", f"**Outcome**: {report['outcome']['summary']}."]
    st = report.get("storage")
    if st and st.get("totals"):
        s_t = st["totals"]
        lines += [f"Weight storage: dense {s_t.get('dense_bytes', 0):,} bytes, CSR with 8-bit relative indices "
                  f"{s_t.get('csr_bytes', 0):,} bytes."]
    s = report.get("selected_totals")
    if s:
        lines += ["", f"Selected layers ({s['layers']}): MACs {s['macs_before']:,} -> {s['macs_after']:,} "
                      f"({_ratio(s['macs_before'], s['macs_after'])})."]
    b = report.get("budget")
    if b:
        lines += [f"Budget: MACs of the selected layers / {b['speedup']} = {b['target_macs']:,}; "
                  f"criterion: {b.get('criterion_text', b['criterion'])}."]
    lines += ["", "## Layers", "", _md_table(*layer_table(report))]
    if st and st.get("layers"):
        has_onnx = "onnx_bytes" in st["totals"]
        rows = [[r["name"], _count(r["params"]), _count(r["nonzero_params"]), f"{r['sparsity']:.1%}",
                 f"{r['dense_bytes']:,}", f"{r['caffemodel_bytes']:,}"]
                + ([f"{r.get('onnx_bytes', 0):,}"] if has_onnx else []) + [f"{r['csr_bytes']:,}"]
                for r in st["layers"]]
        tt = st["totals"]
        rows.append(["**total**", _count(tt["params"]), _count(tt["nonzero_params"]), f"{tt['sparsity']:.1%}",
                     f"{tt['dense_bytes']:,}", f"{tt['caffemodel_bytes']:,} (file)"]
                    + ([f"{tt['onnx_bytes']:,} (file)"] if has_onnx else []) + [f"{tt['csr_bytes']:,}"])
        lines += ["", "## Storage", "", "Bytes per layer of the written net (factorized layers appear as their "
                  "new layers). CSR: Han et al.'s layout, 8-bit relative indices, 4-byte values.", "",
                  _md_table(["layer", "params", "nonzero", "sparsity", "dense", "caffemodel"]
                            + (["onnx"] if has_onnx else []) + ["CSR"], rows)]
    ver = report.get("verification") or {}
    lines += ["", "## Verification", ""]
    if ver.get("skipped"):
        lines.append(f"Not run: {ver['reason']}." if ver.get("reason") else "Skipped (--no-verify).")
    else:
        lines.append(f"Original vs compressed on {ver.get('inputs')} (batch {ver.get('batch')}), "
                     f"engine {ver.get('engine')}.")
        lines += ["", _md_table(*verification_rows(ver))]
        for n in ver.get("notes", []):
            lines.append(f"\n> note: {n}")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


__all__ = ["report_markdown", "layer_table", "verification_rows"]
