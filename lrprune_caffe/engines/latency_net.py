"""The whole net on the target: a runner, its interleaved speed-up against another net, and each layer's
time inside it from onnxruntime's profiler (the calibration of the latency tables).

A layer timed alone in a loop (:mod:`lrprune_caffe.engines.latency_graphs`) is not the same layer inside
the net: there its weights were evicted by the layers run since, its input may still be cached, and
onnxruntime fuses its activation / BatchNorm / Scale into it and keeps the blocked (NCHWc) layout
between neighbours. Timed hot and alone, ResNet-50's convs at 112x112 summed to 24 ms against a 51 ms
net; timed with the caches flushed before each run, VGG-16's summed to 875 ms against a 635 ms net.

So the whole original net is run once with ``SessionOptions.enable_profiling``; the profiler records
one event per executed kernel (``<node name>_kernel_time``, ``dur`` in us) and one ``model_run`` per
run. Node names come from our exporter (:mod:`lrprune_caffe.export.onnx`: the Caffe layer's name, or
``layer/suffix`` for helper nodes) and onnxruntime keeps the first node's name when it fuses
(``conv1/conv1_relu_nchwc``, ``fused fc6``): a kernel belongs to the longest Caffe layer name it starts with (followed
by ``/``, ``_`` or nothing). Kernels of no layer (layout reorders onnxruntime inserts) count towards
the fixed part. Per run, each layer's kernels are summed; its in-net time is its median share of a
run times the run's time (the lower quartile over the runs after warm-up, the statistic of the
tables; with one thread in CPU time, as the tables are timed:
:func:`lrprune_caffe.engines.latency_graphs.cpu_clock`), see :func:`parse_profile`.

:func:`lrprune_caffe.lowrank.latency_budget.calibrate` then scales each layer's table by
in-net ms / alone ms of the layer left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
import weakref

import numpy as np

from .latency_graphs import low


def net_signature(net, batch: int) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted((k, tuple(v) if v else None) for k, v in net.input_shapes().items())).encode())
    h.update(f"batch{batch}".encode())
    for layer in net.layers:
        h.update(repr((layer.name, layer.type, layer.bottoms, layer.tops,
                       [tuple(b.shape) for b in layer.blobs])).encode())
        h.update(layer.msg.SerializeToString(deterministic=True))
    return h.hexdigest()[:24]


class _ExternalWeights:
    """Writes each large float weight of an export straight into one file next to the model (ONNX
    external data, page-aligned): a VGG-16 export then copies its 553 MB once instead of three times
    (array -> TensorProto -> graph -> serialized bytes) and onnxruntime reads them from the file; on
    this machine that is 3 s instead of 10-19 s. The time of a run does not depend on where the
    weights came from (interleaved CPU times equal within 3%)."""

    MIN_BYTES = 1 << 16
    FILE = "weights.bin"

    def __init__(self, directory: str):
        self.fh = open(os.path.join(directory, self.FILE), "wb")
        self.offset = 0

    def __call__(self, name, arr):
        from lrprune_caffe.export.onnx import external_tensor
        if arr.dtype != np.float32 or arr.nbytes < self.MIN_BYTES:
            return None
        t = external_tensor(name, arr.dtype, arr.shape, self.FILE, self.offset, arr.nbytes)
        arr.tofile(self.fh)
        self.offset += arr.nbytes
        pad = -self.offset % 4096
        self.fh.write(b"\0" * pad)
        self.offset += pad
        return t

    def close(self):
        self.fh.close()


def _exported(net, target, directory: str):
    """(path of ``net`` exported by our ONNX exporter into ``directory``, its large weights beside it;
    feeds at the target batch)."""
    from lrprune_caffe.export.onnx import export_model

    from .runtime import default_inputs
    feeds = default_inputs(net, seed=0, batch=target.batch)
    dynamic = any(s and s[0] != target.batch for s in net.input_shapes().values())
    external = _ExternalWeights(directory)
    try:
        model = export_model(net, dynamic_batch=dynamic, external=external)
    finally:
        external.close()
    path = os.path.join(directory, "model.onnx")
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
    return path, feeds


def _session(path, threads: int, profile_prefix: str = None):
    import onnxruntime as ort

    from .latency_graphs import ort_options
    so = ort_options(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def net_runner(net, target):
    """A callable running ``net`` once at the target batch (exported by our ONNX exporter; its weight
    file lives as long as the callable)."""
    tmp = tempfile.TemporaryDirectory(prefix="lrprune-net-")
    path, feeds = _exported(net, target, tmp.name)
    sess = _session(path, target.threads)
    outs = [o.name for o in sess.get_outputs()]

    def run():
        return sess.run(outs, feeds)
    # the weight file goes with the callable, cleaned up explicitly (an implicit clean-up warns)
    weakref.finalize(run, tmp.cleanup)
    return run


def measured_speedup(net_a, net_b, target, rounds: int = 20, warmup: int = 2) -> dict:
    """End-to-end speed-up of ``net_b`` over ``net_a``: interleaved (ABBA) rounds on the target.

    Either net may be a :func:`net_runner` already built (a VGG-16 export takes seconds).
    Returns medians of each net, the ratio of the medians (``speedup``), and
    the median and the 10th-90th percentiles of the per-round ratios.
    """
    runs = [n if callable(n) else net_runner(n, target) for n in (net_a, net_b)]
    for r in runs:
        for _ in range(int(warmup)):
            r()
    clock, cpu = time.perf_counter, time.process_time
    times, cpus = [[], []], [[], []]
    for rnd in range(int(rounds)):
        for i in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            t0, c0 = clock(), cpu()
            runs[i]()
            times[i].append((clock() - t0) * 1e3)
            cpus[i].append((cpu() - c0) * 1e3)
    ratios = np.asarray(times[0]) / np.asarray(times[1])
    a, b = statistics.median(times[0]), statistics.median(times[1])
    out = {"a_ms": a, "b_ms": b, "speedup": a / b, "paired_median": float(np.median(ratios)),
           "paired_p10": float(np.percentile(ratios, 10)), "paired_p90": float(np.percentile(ratios, 90)),
           "rounds": int(rounds), "target": target.key()}
    if int(target.threads) == 1:  # CPU time: what the other jobs on a shared machine took is not in it
        c = np.asarray(cpus[0]) / np.maximum(np.asarray(cpus[1]), 1e-9)
        out.update({"cpu_a_ms": statistics.median(cpus[0]), "cpu_b_ms": statistics.median(cpus[1]),
                    "cpu_paired_median": float(np.median(c)), "cpu_paired_p10": float(np.percentile(c, 10)),
                    "cpu_paired_p90": float(np.percentile(c, 90))})
    return out


def checked_speedup(run_a, run_b, target, budget_s: float = 3.0, min_rounds: int = 8, max_rounds: int = 30,
                    warmup_s: float = 0.3) -> dict:
    """The speed-up of ``run_b`` over ``run_a`` (two :func:`net_runner` callables) measured the way the
    report measures it: both warmed up alike (at least 3 runs and ``warmup_s`` each, so neither is timed
    cold), then ``min_rounds``..``max_rounds`` interleaved ABBA rounds filling about ``budget_s``
    (:func:`measured_speedup`). ``"speedup"`` is the median of the per-round wall-time ratios, with one
    thread the lower of that and the CPU-time one: the budget's check of a choice, so a choice is taken
    to meet S only when both medians say so (not on one lucky reading)."""
    clock, each = time.perf_counter, []
    for r in (run_a, run_b):
        n, t0 = 0, clock()
        while n < 3 or clock() - t0 < warmup_s:
            r()
            n += 1
        each.append((clock() - t0) / n)
    rounds = int(np.clip(budget_s / max(sum(each), 1e-6), min_rounds, max_rounds))
    m = measured_speedup(run_a, run_b, target, rounds=rounds, warmup=0)
    s = m["paired_median"]
    if "cpu_paired_median" in m:
        s = min(s, m["cpu_paired_median"])
    return {**m, "speedup_checked": float(s)}


# ---------------------------------------------------------------------------
# profile

def owner(node_name: str, layer_names) -> str:
    """The Caffe layer a profiled kernel belongs to ('' for none); ``layer_names`` longest first.

    onnxruntime names a fused node after its first node (``conv1/conv1_relu_nchwc``), or prefixes it
    (``fused fc6``: Gemm + Relu)."""
    tries = [node_name] + ([node_name.split(" ", 1)[1]] if " " in node_name else [])
    for name in tries:
        for c in layer_names:
            if name == c or name.startswith(c + "/") or name.startswith(c + "_"):
                return c
    return ""


def parse_profile(events: list, layer_names, warmup: int = 1, totals=None) -> dict:
    """{"runs": n, "run_ms": model_run ms, "total_ms": the run's ms, "layers": {name: ms in a run},
    "other_ms": ms of kernels of no layer} from onnxruntime profiler events (runs after ``warmup`` ones).

    Each layer gets its median share of the kernel time of a run (shares renormalized to 1) times the
    run's ms: the lower quartile (:func:`lrprune_caffe.engines.latency_graphs.low`) of ``totals`` (one
    per run after warm-up: e.g. CPU times) or else of the ``model_run`` durations. Shares, because a
    run preempted by another job is preempted in some layer: that layer's share in that run is an
    outlier the median drops, while its ms, or its ms scaled by the run's CPU / wall time, would not
    be (a layer run clean in a run preempted elsewhere would look faster than it is)."""
    names = sorted(set(layer_names), key=len, reverse=True)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs = runs[int(warmup):] if len(runs) > warmup else runs
    if not runs:
        return {"runs": 0, "run_ms": None, "total_ms": None, "layers": {}, "other_ms": 0.0}
    starts = np.asarray([r[0] for r in runs])
    per_run = [dict() for _ in runs]
    cache = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # a warm-up run
        node = e["name"][:-len("_kernel_time")]
        who = cache.get(node)
        if who is None:
            who = cache[node] = owner(node, names)
        per_run[i][who] = per_run[i].get(who, 0.0) + float(e["dur"]) / 1e3
    keys = sorted({n for r in per_run for n in r})
    shares = {}
    for n in keys:
        shares[n] = float(np.median([r.get(n, 0.0) / max(sum(r.values()), 1e-12) for r in per_run]))
    norm = sum(shares.values()) or 1.0
    run_ms = low([(b - a) / 1e3 for a, b in runs])
    total = low(list(totals)[:len(runs)]) if totals is not None and len(totals) else run_ms
    layers = {n: shares[n] / norm * total for n in keys if n}
    return {"runs": len(runs), "run_ms": run_ms, "total_ms": float(total), "layers": layers,
            "other_ms": shares.get("", 0.0) / norm * total}


def profile_net(net, target, budget_s: float = 1.0, min_runs: int = 5, max_runs: int = 30, warmup: int = 2) -> dict:
    """Profile ``net`` (an IR Net) on the target: :func:`parse_profile` of about ``budget_s`` of runs
    (``min_runs``..``max_runs``) after ``warmup``, and ``wall_ms``, the lower quartile of their wall
    times (the profiler's cost is one event per kernel: ~1% of ResNet-50's time)."""
    with tempfile.TemporaryDirectory(prefix="lrprune-profile-") as d:
        path, feeds = _exported(net, target, d)
        sess = _session(path, target.threads, profile_prefix=os.path.join(d, "net"))
        outs = [o.name for o in sess.get_outputs()]
        clock = time.perf_counter
        t0 = clock()
        for _ in range(int(warmup)):
            sess.run(outs, feeds)
        each = (clock() - t0) / max(1, int(warmup))
        wall, cpu = [], []
        for _ in range(int(min(max_runs, max(min_runs, round(budget_s / max(each, 1e-6)))))):
            t0, c0 = clock(), time.process_time()
            sess.run(outs, feeds)
            wall.append((clock() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        path = sess.end_profiling()
        with open(path) as fh:
            events = json.load(fh)
    # one thread: the layers' shares of the run's CPU time (as the tables are timed); else of its wall time
    totals = cpu if int(target.threads) == 1 else wall
    return {**parse_profile(events, [layer.name for layer in net.layers], warmup=warmup, totals=totals),
            "wall_ms": low(wall), "cpu_ms": low(cpu)}


def in_net_ms(profile: dict) -> dict:
    """{layer: ms} of a :func:`parse_profile` result."""
    return dict(profile["layers"])


def profile_total(profile: dict) -> float:
    """The net's ms as the profile splits it: its layers' in-net ms plus the kernels of no layer."""
    return float(sum(profile["layers"].values()) + profile.get("other_ms", 0.0))


__all__ = ["net_signature", "net_runner", "measured_speedup", "checked_speedup", "owner",
           "parse_profile", "profile_net", "in_net_ms",
           "profile_total"]
