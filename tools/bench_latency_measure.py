"""The measuring and writing side of ``tools/bench_latency.py``: nets on onnxruntime or MNN, all variants of a
net interleaved in one run, versions and load, the markdown table and the plot."""

from __future__ import annotations

import io
import os
import platform
import statistics
import subprocess
import time

import numpy as np


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {loadavg()}"


def mnn_available() -> bool:
    try:
        import _tools  # noqa: F401  (MNN's converter)
        import MNN  # noqa: F401
    except ImportError:
        return False
    return True


def versions(engines) -> dict:
    import onnx
    import onnxruntime

    from lrprune_caffe.engines.latency import cpu_model
    from lrprune_caffe.version import __version__
    v = {"lrprune_caffe": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
         "numpy": np.__version__, "python": platform.python_version(), "cpu": cpu_model(), "cores": os.cpu_count(),
         "platform": platform.platform(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}
    if "mnn" in engines:
        import MNN
        v["mnn"] = MNN.version()
    return v


# ---------------------------------------------------------------------------
# runners

def ort_runner(net, threads: int):
    from lrprune_caffe.engines import latency as L
    return L.net_runner(net, L.Target("onnxruntime", int(threads), 1))


def _quiet(fn, *args):
    """``fn(*args)`` with file descriptor 1 sent to /dev/null (MNN's converter prints its progress there)."""
    import sys
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return fn(*args)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def mnn_runner(net, threads: int, workdir: str, label: str):
    """A callable running ``net`` once on MNN's CPU backend (the dense ONNX export, MNN's own converter;
    the output is read, since MNN may compute lazily)."""
    import _tools
    import MNN
    import MNN.expr as F

    from lrprune_caffe.engines.runtime import default_inputs
    from lrprune_caffe.export.onnx import save_onnx
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"{label}.mnn")
    if not os.path.exists(path):
        onnx_path = os.path.join(workdir, f"{label}.onnx")
        save_onnx(net, onnx_path)  # dense: MNN refuses sparse initializers
        tmp = path + ".tmp"
        if not _quiet(_tools.mnnconvert, ["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", tmp,
                                          "--bizCode", "lrprune-caffe"]):
            raise RuntimeError(f"MNN's converter failed on {onnx_path}")
        os.replace(tmp, path)
        os.remove(onnx_path)
    rt = MNN.nn.create_runtime_manager(({"backend": "CPU", "numThread": int(threads)},))
    (name, x), = default_inputs(net, seed=0, batch=1).items()
    outs = list(net.outputs())
    mod = MNN.nn.load_module_from_file(path, [name], outs, runtime_manager=rt)
    var = F.const(np.ascontiguousarray(x, np.float32), list(x.shape), F.NCHW)

    def run():
        ys = mod.forward([var])
        return [np.asarray(F.convert(y, F.NCHW).read()) for y in ys]
    return run


def interleaved(engine: str, nets: list, threads: int, rounds: int, mnn_dir: str = None, warmup: int = 2) -> dict:
    """``nets[0]`` (the original) and the others run interleaved: each round runs them all, in forward
    order on even rounds and reversed on odd ones. Each variant's ``measured`` speed-up is the median
    of its per-round ratios original / variant (``p10``, ``p90``: their 10th-90th percentiles;
    ``ratio_of_medians`` too); with 1 thread also in CPU time (``cpu_measured``), which other jobs on
    the machine do not inflate."""
    if engine == "onnxruntime":
        runs = [ort_runner(n, threads) for n in nets]
    elif engine == "mnn":
        # one conversion per net object (the same variant at another thread count reuses it)
        runs = [mnn_runner(n, threads, mnn_dir, f"net{id(n)}") for n in nets]
    else:
        raise ValueError(f"unknown engine {engine!r}")
    for r in runs:
        for _ in range(int(warmup)):
            r()
    wall, cpu = [[] for _ in runs], [[] for _ in runs]
    for rnd in range(int(rounds)):
        order = range(len(runs)) if rnd % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            t0, c0 = time.perf_counter(), time.process_time()
            runs[i]()
            wall[i].append((time.perf_counter() - t0) * 1e3)
            cpu[i].append((time.process_time() - c0) * 1e3)
    out = {"orig_ms": statistics.median(wall[0]), "variants": []}
    for i in range(1, len(runs)):
        ratios = np.asarray(wall[0]) / np.asarray(wall[i])
        v = {"measured": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
             "p90": float(np.percentile(ratios, 90)), "ratio_of_medians": statistics.median(wall[0]) /
             statistics.median(wall[i]), "new_ms": statistics.median(wall[i])}
        if int(threads) == 1:
            c = np.asarray(cpu[0]) / np.maximum(np.asarray(cpu[i]), 1e-9)
            v["cpu_measured"] = float(np.median(c))
        out["variants"].append(v)
    return out


# ---------------------------------------------------------------------------
# writing

def _fmt(v, spec=".2f", suffix="x"):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def short_error(text: str) -> str:
    """A compress error as a table cell: an unreachable target as what the tables predict at most."""
    import re
    m = re.search(r"predict at most ([0-9.]+x)", text)
    if m:
        return f"unreachable: the tables predict at most {m.group(1)}"
    return text.replace("|", "/").splitlines()[0][:100] if text else "failed"


def markdown(result: dict, plot: str = None) -> str:
    v = result["versions"]
    lines = ["# Requested vs measured speed-up: MAC budget vs latency budget", "",
             f"Run {result['started']} by `tools/bench_latency.py` (channel scheme unless stated: "
             f"`{result['scheme']}`), batch 1, {result['rounds']} interleaved rounds per engine and thread count "
             "(the original and all its variants in one run); measured = median of the per-round ratios "
             "original / variant (p10-p90 beside it); CPU = the same in CPU time (1 thread only).", "",
             f"- onnxruntime {v['onnxruntime']}" + (f", MNN {v['mnn']}" if "mnn" in v else "")
             + f", numpy {v['numpy']}, onnx {v['onnx']}, Python {v['python']}, lrprune-caffe {v['lrprune_caffe']}",
             f"- {v['cpu']}, {v['cores']} cores; engine threads {', '.join(map(str, result['threads']))} "
             f"(onnxruntime intra-op, MNN numThread); OMP_NUM_THREADS {v.get('OMP_NUM_THREADS')} (numpy's SVDs)",
             f"- `uptime` at start: {result['uptime_start']}", f"- `uptime` at end: {result['uptime_end']}"]
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    lines += ["", "## Latency tables, first time (empty cache)", "",
              "| net | threads | timing | wall s | CPU s | graphs | net ms | load before -> after |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for t in result["tables"]:
        lines.append(f"| {t['net']} | {t['threads']} | {t['timing']} | {t['seconds']:.1f} | {t['cpu_seconds']:.1f} | "
                     f"{t['graphs']} | {_fmt(t['total_ms'], '.1f', '')} | {t['load_before']} -> {t['load_after']} |")
    lines += ["", "## Speed-ups", "",
              "| net | S | cost | engine | thr | MAC cut | predicted | measured | p10-p90 | CPU | met? |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    engines = list(result.get("engines", []))
    key = lambda r: (r["net"], engines.index(r["engine"]) if r.get("engine") in engines else -1,  # noqa: E731
                     r.get("threads") or 0, r["requested"], r["cost"] != "macs", r["cost"])
    for r in sorted(result["rows"], key=key):
        cost = r["cost"] + (f" (t={r['threads']})" if r["cost"] != "macs" and r.get("threads") else "")
        if "error" in r:
            lines.append(f"| {r['net']} | {r['requested']:g} | {cost} | | | | | | | | {short_error(r['error'])} |")
            continue
        met = "yes" if r["measured"] >= r["requested"] else f"no ({r['measured'] / r['requested']:.0%})"
        lines.append(f"| {r['net']} | {r['requested']:g} | {cost} | {r['engine']} | {r['threads']} | "
                     f"{r['macs_cut']:.2f}x | {_fmt(r.get('predicted'))} | **{r['measured']:.2f}x** | "
                     f"{r['p10']:.2f}-{r['p90']:.2f} | {_fmt(r.get('cpu_measured'))} | {met} |")
    if plot:
        lines += ["", f"![measured speed-up against MAC cut]({plot})"]
    return "\n".join(lines) + "\n"


def plot_png(result: dict) -> bytes:
    """Measured speed-up (p10-p90 whiskers) against whole-net MAC cut, one panel per engine and thread
    count; hollow circles: the MAC budget, filled triangles: the latency budget; dotted: measured = MAC cut."""
    from lrprune_caffe.core.plots import _plt
    plt = _plt()
    rows = [r for r in result["rows"] if "error" not in r]
    engines = [e for e in result.get("engines", ["onnxruntime"]) if any(r["engine"] == e for r in rows)] or ["-"]
    threads = sorted({r["threads"] for r in rows}) or [1]
    fig, axes = plt.subplots(len(engines), len(threads), figsize=(5.2 * len(threads), 4.4 * len(engines)),
                             squeeze=False)
    nets = sorted({r["net"] for r in rows})
    colors = dict(zip(nets, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    v = result["versions"]
    top = max([1.0] + [max(r["macs_cut"], r["measured"]) for r in rows]) * 1.15
    for ax, (engine, t) in zip(axes.ravel(), [(e, t) for e in engines for t in threads]):
        for r in (r for r in rows if (r["engine"], r["threads"]) == (engine, t)):
            macs = r["cost"] == "macs"
            ax.errorbar(r["macs_cut"], r["measured"], yerr=[[max(r["measured"] - r["p10"], 0)],
                                                            [max(r["p90"] - r["measured"], 0)]],
                        fmt="o" if macs else "^", color=colors[r["net"]], mfc="none" if macs else colors[r["net"]],
                        capsize=2, ms=6)
        ax.plot([1, top], [1, top], "k:", lw=1, label="measured = MAC cut")
        ax.set_xlim(0.9, top)
        ax.set_ylim(0.5, top)  # whiskers of a noisy round may run off: the p10-p90 are in RESULTS.md
        for n in nets:
            ax.plot([], [], "s", color=colors[n], label=n)
        ax.plot([], [], "ko", mfc="none", label="macs budget")
        ax.plot([], [], "k^", label="latency budget")
        ax.set_xlabel("whole-net MAC cut (x)")
        ax.set_ylabel("measured speed-up (x)")
        ver = v.get("mnn") if engine == "mnn" else v.get("onnxruntime")
        ax.set_title(f"{engine} {ver}, {t} thread(s), batch 1", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
