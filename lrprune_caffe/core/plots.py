"""Pictures of the reports (matplotlib, the ``plot`` extra): each function takes a report dict and
returns PNG bytes; the caller writes them with the rest of its outputs (all or nothing).

- :func:`report_png`: ``compress --plot`` -> report.png, per layer: MACs and params before / after
  (nonzero after, when pruned) and the energy kept / weight error of each factorized layer.
- :func:`rounds_png`: ``pipeline`` -> rounds.png: top-1 per step with the epochs it took, and the
  size and speed of each method as a share of the original. Takes one pipeline report or several
  methods (``tools/reproduce_paper.py``).
- :func:`bench_png`: ``bench --plot``: median latency bars with the min..p90 range.

Layout rules, for readable pictures: horizontal bars with layer names on the y axis (long names
never collide), one value axis per panel, a legend wherever there is more than one series, and a
figure height that grows with the number of rows.
"""

from __future__ import annotations

import io

from lrprune_caffe.errors import UserError


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'lrprune-caffe[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def _hbars(ax, names, series, colors, xlabel, log=False):
    """Grouped horizontal bars: ``series`` = [(label, values)], one group per name."""
    k = len(series)
    h = 0.8 / k
    for j, ((label, vals), color) in enumerate(zip(series, colors)):
        ys = [i - 0.4 + h * (j + 0.5) for i in range(len(names))]
        vals = [v if v is not None else 0 for v in vals]
        ax.barh(ys, vals, height=h, color=color, label=label)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_short(n) for n in names], fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    if k > 1:  # above the panel, outside the bars
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=k, frameon=False)


def report_png(report: dict) -> bytes:
    """compress's report.png (see the module doc)."""
    plt = _plt()
    layers = report["layers"]
    names = [r["name"] for r in layers]
    pruned = bool(report.get("prune"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.2 + 0.32 * max(len(names), 3)), sharey=True,
                             gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    macs_known = any(r.get("macs_before") for r in layers)
    _hbars(axes[0], names, [("before", [r.get("macs_before") or None for r in layers]),
                            ("after", [r.get("macs_after") or None for r in layers])],
           ["0.65", "tab:blue"], "MACs per layer (log)" if macs_known else "MACs unknown", log=macs_known)
    series = [("before", [r["params_before"] for r in layers]), ("after", [r["params_after"] for r in layers])]
    colors = ["0.65", "tab:green"]
    if pruned:
        series.append(("nonzero after", [r.get("nonzero_params") for r in layers]))
        colors.append("tab:olive")
    _hbars(axes[1], names, series, colors, "weights per layer (log)", log=True)
    fac = ["new_layers" in r for r in layers]
    ek = [r.get("energy_kept") if f else None for r, f in zip(layers, fac)]
    we = [r.get("weight_rel_error") if f else None for r, f in zip(layers, fac)]
    if any(fac):
        _hbars(axes[2], names, [("energy kept", ek), ("weight rel. error", we)], ["tab:purple", "tab:red"],
               "factorized layers: energy kept, weight rel. error")
        axes[2].set_xlim(0, 1.05)
    else:
        axes[2].set_xlabel("no layer factorized", fontsize=9)
        axes[2].set_xticks([])
    for i, f in enumerate(fac):
        if not f:
            axes[2].text(0.02, i, "not factorized", va="center", fontsize=7, color="0.4")
    t = report["totals"]
    acc = ""
    for name, v in ((report.get("verification") or {}).get("blobs") or {}).items():
        if "top1_ref" in v:
            acc = f"; {name} top-1 {100 * v['top1_ref']:.1f}% -> {100 * v['top1_test']:.1f}%"
            break
        if v.get("top1_agreement") is not None:
            acc = f"; {name} top-1 agreement {100 * v['top1_agreement']:.1f}%"
            break
    macs = (f"MACs {t['macs_before']:,} -> {t['macs_after']:,}" if t.get("macs_before") and t.get("macs_after")
            else "MACs ?")
    fig.suptitle(f"{report.get('net') or 'net'}: {macs}, params {t['params_before']:,} -> "
                 f"{t['params_after']:,}{acc}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ---- rounds -------------------------------------------------------------------------------------

def _step_key(step: str) -> str:
    """'factorize (spatial, 2x MACs)' -> 'factorize'; 'prune to 50% over the net' -> '50%'."""
    if step.startswith("factorize"):
        return "factorize"
    for word in step.split():
        if word.endswith("%"):
            return word
    return step


def methods_of_pipeline(report: dict, label: str = None) -> dict:
    """One pipeline report as :func:`rounds_png`'s input."""
    o, f = report["original"], report["final"]
    label = label or report.get("schedule", "pipeline")
    return {"original": {"top1": o["top1"], "MACs": o["macs"], "nonzero weights": o["nonzero_params"]},
            "goal": report.get("goal_top1"),
            "methods": [{"label": label, "rounds": report["rounds"],
                         "size": {"MACs": f["macs"], "nonzero weights": f["nonzero_params"]}}]}


def rounds_png(data: dict, title: str = None) -> bytes:
    """Top-1 per step (left, above: after the step open, after its fine-tuning filled), epochs per
    step (left, below), and each method's size / speed as a share of the original (right).

    ``data``: {"original": {"top1": t, metric: value...}, "goal": top-1 goal or None,
    "methods": [{"label", "rounds": [{"step", "top1_after_step", "top1", "epochs"}...],
    "size": {metric: value}}]}; or a pipeline report (converted by :func:`methods_of_pipeline`)."""
    if "rounds" in data:
        data = methods_of_pipeline(data)
    plt = _plt()
    methods = data["methods"]
    keys: list = []
    for m in methods:
        for r in m["rounds"]:
            k = _step_key(r["step"])
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (k != "factorize", float(k[:-1]) if k.endswith("%") else 0.0))
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    markers = ["o", "s", "^", "D", "v", "P"]
    fig = plt.figure(figsize=(12, 5.2))
    gs = fig.add_gridspec(2, 2, height_ratios=[2.3, 1], width_ratios=[1.5, 1], hspace=0.08, wspace=0.35)
    ax = fig.add_subplot(gs[0, 0])
    ex = fig.add_subplot(gs[1, 0], sharex=ax)
    bx = fig.add_subplot(gs[:, 1])
    n = len(methods)
    width = 0.8 / max(n, 1)
    for j, m in enumerate(methods):
        c, mk = colors[j % len(colors)], markers[j % len(markers)]
        dx = (j - (n - 1) / 2) * width  # methods side by side: no line hides another
        xs, after, before, eps = [], [], [], []
        for r in m["rounds"]:
            xs.append(keys.index(_step_key(r["step"])) + dx)
            before.append(100 * r["top1_after_step"])
            after.append(100 * r["top1"])
            eps.append(r["epochs"])
        total = sum(eps)
        ft = sum(1 for e in eps if e)
        counts = f"{ft} ft round{'s' if ft != 1 else ''}, {total} epoch{'s' if total != 1 else ''}"
        ax.plot(xs, after, "-", color=c, marker=mk, label=f"{m['label']}: after fine-tuning ({counts})")
        tuned = [i for i, e in enumerate(eps) if e]  # a round without epochs: one point
        ax.plot([xs[i] for i in tuned], [before[i] for i in tuned], linestyle="none", marker=mk, mfc="white",
                color=c)
        ax.vlines([xs[i] for i in tuned], [before[i] for i in tuned], [after[i] for i in tuned], colors=c,
                  linestyles=":", lw=1)
        ex.bar(xs, eps, width=width * 0.9, color=c)
    ax.plot([], [], linestyle="none", marker="o", mfc="white", color="0.3", label="right after the step")
    orig = data["original"]
    ax.axhline(100 * orig["top1"], color="0.5", lw=1, label=f"original {100 * orig['top1']:.1f}%")
    if data.get("goal") is not None:
        ax.axhline(100 * data["goal"], color="0.5", lw=1, ls="--", label=f"goal {100 * data['goal']:.1f}%")
    ax.set_ylabel("val top-1 (%)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False, labelsize=8)
    ex.set_xticks(range(len(keys)))
    ex.set_xticklabels(keys, fontsize=8)
    ex.set_xlabel("step (factorize, or prune to this share of zeros)", fontsize=9)
    ex.set_ylabel("epochs", fontsize=9)
    ex.yaxis.get_major_locator().set_params(integer=True)
    ex.tick_params(labelsize=8)
    ex.grid(axis="y", alpha=0.3)
    metrics = [k for k in orig if k != "top1"]
    labels = ["original"] + [m["label"] for m in methods]
    series = [(metric, [100.0] + [100.0 * m["size"][metric] / orig[metric] if orig.get(metric) else None
                                  for m in methods]) for metric in metrics]
    _hbars(bx, labels, series, ["tab:cyan", "tab:olive", "tab:pink", "tab:gray"][:len(series)] or ["tab:cyan"],
           "at the end: % of the original (smaller is better)")
    for j, (_, vals) in enumerate(series):
        h = 0.8 / len(series)
        for i, v in enumerate(vals):
            if v is not None:
                bx.text(v, i - 0.4 + h * (j + 0.5), f" {v:.0f}%", va="center", fontsize=7)
    bx.set_xlim(0, 125)
    if len(series) == 1:
        bx.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title or "top-1 per step; epochs of fine-tuning below", fontsize=10)
    return _png(fig)


# ---- bench -------------------------------------------------------------------------------------

def bench_png(res: dict) -> bytes:
    """``bench --plot``: median latency per net, whiskers from min to p90."""
    plt = _plt()
    nets = res["nets"]
    names = [_short(n["label"], 40) for n in nets]
    med = [n["median_ms"] for n in nets]
    lo = [n["median_ms"] - n["min_ms"] for n in nets]
    hi = [max(n["p90_ms"] - n["median_ms"], 0) for n in nets]
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.5 * len(nets)))
    ax.barh(range(len(nets)), med, xerr=[lo, hi], color="tab:blue", capsize=4, height=0.6,
            label="median (whiskers: min .. p90)")
    for i, (m, n) in enumerate(zip(med, nets)):  # right of the whisker: never on it
        ax.text(max(n["p90_ms"], m), i, f"  {m:.3f} ms", va="center", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_yticks(range(len(nets)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(len(nets) - 0.5, -0.7)
    ax.set_xlabel("latency per batch-1 run (ms)", fontsize=9)
    ax.set_xlim(0, max(n["p90_ms"] for n in nets) * 1.35)
    ax.legend(fontsize=7, loc="lower right")
    v = res.get("versions", {})
    rt = v.get("onnxruntime") or v.get("opencv") or ""
    title = f"{res.get('runtime')} {rt}, {res.get('threads')} thread(s), {res.get('runs')} runs"
    if "speedup" in res:
        title += f"; A/B {res['speedup']:.2f}x"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


__all__ = ["available", "report_png", "rounds_png", "methods_of_pipeline", "bench_png"]
