"""report.json's readable twin: report.md (Markdown tables), and the CLI's short summary (:func:`summary_lines`,
which report.md also holds) and per-layer table."""

from __future__ import annotations

from lrprune_caffe.engines.compare import describe


UNKNOWN = "?"  # a value we could not count (unknown shapes): never printed as 0
NA = "-"  # a field that means nothing for this row


def _count(v) -> str:
    if v is None:
        return UNKNOWN
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
        return UNKNOWN
    if isinstance(v, str):
        return v
    return fmt.format(v)


def _rank(r) -> str:
    if r is None:
        return NA
    if isinstance(r, (list, tuple)):
        return "x".join(str(x) for x in r)
    return str(r)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else UNKNOWN


def _int(v) -> str:
    return UNKNOWN if v is None else f"{int(v):,}"


def change(before, after, fewer="fewer", more="more") -> str:
    """'(2.03x fewer)', '(unchanged)', '(1.20x more)' or '' when a side is unknown (None or 0)."""
    if not before or not after:
        return ""
    if before == after:
        return " (unchanged)"
    r = before / after
    if r >= 1.005:
        return f" ({r:.2f}x {fewer})"
    if r <= 1 / 1.005:
        return f" ({after / before:.2f}x {more})"
    return f" ({100 * (after - before) / before:+.1f}%)"


def _factorized(r) -> bool:
    return "new_layers" in r or str(r.get("action", "")).startswith("factorized")


def layer_table(report) -> tuple:
    """The per-layer table (report.md, ``compress --verbose``). Fields that mean nothing for a
    row's action are '-': scheme, rank, energy kept and weight error belong to factorized layers;
    nonzero and sparsity appear when something was pruned."""
    sparse = any("nonzero_params" in r for r in report["layers"]) and bool(report.get("prune"))
    headers = ["layer", "type", "action", "scheme", "rank", "params", "params_after", "MACs", "macs_after",
               "energy kept", "weight err"] + (["nonzero", "sparsity"] if sparse else []) + ["reason"]
    rows = []
    for r in report["layers"]:
        fac = _factorized(r)
        row = [r["name"], r["type"], r["action"], (r.get("scheme") or NA) if fac else NA,
               _rank(r.get("rank")) if fac else NA,
               _count(r["params_before"]), _count(r["params_after"]),
               _count(r["macs_before"] or None), _count(r["macs_after"] or None),
               _number(r.get("energy_kept"), "{:.4f}") if fac else NA,
               _number(r.get("weight_rel_error"), "{:.4f}") if fac else NA]
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


def _wrap(text, width=100) -> list:
    import textwrap
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False) or [""]


def _actions(report) -> str:
    counts: dict = {}
    for r in report["layers"]:
        counts[r["action"]] = counts.get(r["action"], 0) + 1
    order = ["factorized+pruned", "factorized", "pruned", "shrunk", "kept"]
    parts = [f"{counts[a]} {a}" for a in order if a in counts]
    parts += [f"{n} {a}" for a, n in counts.items() if a not in order]
    return ", ".join(parts)


def check_lines(ver) -> list:
    """The check in one or two lines per output: accuracy (with labels) and agreement."""
    if not ver:
        return []
    if ver.get("skipped"):
        return [f"check: not run: {ver['reason']}" if ver.get("reason") else "check: skipped (--no-verify)"]
    lines = [f"check: original vs compressed on {ver.get('inputs')} (batch {ver.get('batch')}), "
             f"engine {ver.get('engine')}"]
    for name, v in ver.get("blobs", {}).items():
        if "error" in v:
            lines.append(f"  {name}: {v['error']}")
            continue
        if "top1_ref" in v:
            lines.append(f"  {name}: top-1 accuracy {100 * v['top1_ref']:.2f}% (original) -> "
                         f"{100 * v['top1_test']:.2f}% (compressed)")
        parts = []
        if v.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {100 * v['top1_agreement']:.1f}%"
                         + (f" (over only {v['samples']} samples)" if v.get("few_samples") else ""))
        parts.append(f"relative L2 error {_number(v.get('rel_l2'), '{:.3g}')}")
        snr = v.get("snr_db")
        parts.append("identical outputs" if snr is None and v.get("rel_l2") == 0 else
                     f"SNR {_number(snr, '{:.1f}')} dB")
        lines.append(f"  {name}: " + ", ".join(parts))
    for name, v in ver.get("detections", {}).items():
        lines.append("  " + describe(name, v))
    return lines


def summary_lines(report, width=100) -> list:
    """compress's short summary (the console; report.md's first section): totals, files, the
    outcome, the check (accuracy or agreement), warnings; every line at most ``width`` columns."""
    t = report["totals"]
    macs_b, macs_a = t.get("macs_before") or None, t.get("macs_after") or None
    out = [f"{report.get('net') or 'net'}: {len(report['layers'])} conv/FC layers: {_actions(report)}",
           f"params {_int(t['params_before'])} -> {_int(t['params_after'])}"
           + change(t["params_before"], t["params_after"], "fewer")
           + (f"; nonzero {_int(t['nonzero_params'])} ({100 * (t.get('sparsity') or 0):.1f}% zeros)"
              if report.get("prune") and t.get("nonzero_params") is not None else ""),
           f"MACs {_int(macs_b)} -> {_int(macs_a)}" + change(macs_b, macs_a, "fewer")]
    files = []
    if t.get("caffemodel_bytes") is not None:
        files.append(f"model.caffemodel {t['caffemodel_bytes']:,} bytes")
    if t.get("onnx_bytes"):
        sp = report.get("sparse_onnx") or {}
        files.append(f"model.onnx {t['onnx_bytes']:,} bytes"
                     + (f" ({sp['sparse_initializers']} sparse initializer"
                        f"{'s' if sp['sparse_initializers'] != 1 else ''})" if sp.get("sparse_initializers")
                        else ""))
    if files:
        out += _wrap("files: " + ", ".join(files), width)
    if report.get("outcome"):
        out += _wrap(f"outcome: {report['outcome']['summary']}", width)
    for line in check_lines(report.get("verification")):
        out += _wrap(line, width)
    for w in report.get("warnings") or []:
        out += _wrap(f"warning: {w.get('message', w) if isinstance(w, dict) else w}", width)
    return out


def _md_table(headers, rows) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def gate_lines(report: dict) -> list:
    """The quality gate's verdict, first (the warnings are in the summary)."""
    g = report.get("gate")
    if g is None:
        return []
    return (["", "## Quality gate: " + ("passed" if g["passed"] else "FAILED (no model files written)"), ""]
            + ([f"- {f['text']}" for f in g["failures"]] or [f"- limits: {g['limits']}"]))


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
             f"- tool: {report.get('tool')}", *gate_lines(report)]
    lines += ["", "## Summary", ""]
    for line in summary_lines(report, width=10**6):
        lines.append(("  - " + line.strip()) if line.startswith("  ") else f"- {line}")
    if report.get("plot"):
        lines += ["", f"![Per layer: MACs and params before and after, energy kept or output error]"
                      f"({report['plot']})"]
    lines += ["", "## Totals", "",
             _md_table(["", "before", "after", "reduction"], [
                 ["params", f"{t['params_before']:,}", f"{t['params_after']:,}",
                  _ratio(t["params_before"], t["params_after"])],
                 ["MACs", _int(t["macs_before"] or None), _int(t["macs_after"] or None),
                  _ratio(t["macs_before"], t["macs_after"])],
             ] + ([["nonzero params", f"{t.get('nonzero_params_before', t['params_before']):,}",
                    f"{t['nonzero_params']:,}",
                    _ratio(t.get("nonzero_params_before", t["params_before"]), t["nonzero_params"])]]
                  if t.get("nonzero_params") is not None else []))]
    st = report.get("storage")
    if st and st.get("totals"):
        s_t = st["totals"]
        lines += ["", f"Weight storage: dense {s_t.get('dense_bytes', 0):,} bytes, CSR with 8-bit relative indices "
                  f"{s_t.get('csr_bytes', 0):,} bytes."]
    s = report.get("selected_totals")
    if s:
        lines += ["", f"Selected layers ({s['layers']}): MACs {_int(s['macs_before'] or None)} -> "
                      f"{_int(s['macs_after'] or None)} "
                      f"({_ratio(s['macs_before'], s['macs_after'])})."]
    b = report.get("budget")
    if b and b.get("cost") == "latency":
        lines += [f"Budget: measured latency on {b['target']}: {b['total_ms']:.2f} ms / {b['speedup']} = "
                  f"{b['target_ms']:.2f} ms ({b['fixed_ms']:.2f} ms fixed); predicted {b['predicted_ms']:.2f} ms "
                  f"({b['predicted_speedup']:.2f}x); tables {b['tables']['seconds']:.1f} s "
                  f"({b['tables']['graphs_timed']} graphs timed)."]
    elif b:
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
        lines += [""] + [f"- {line.strip()}" for line in check_lines(ver)[1:] if "accuracy" in line]
        for n in ver.get("notes", []):
            lines.append(f"\n> note: {n}")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


__all__ = ["report_markdown", "layer_table", "verification_rows", "summary_lines", "check_lines", "change"]
