"""Latency of one or two nets on a real runtime, measured side by side.

``bench_nets(nets, runtime, threads, runs, warmup)`` times batch-1 forwards:
``warmup`` untimed runs of each net, then ``runs`` timed rounds. With two
nets the rounds interleave A and B (ABBA: A,B then B,A ...) so that drift
(frequency scaling, a noisy neighbour) hits both alike. It reports each net's
median (and min, mean, p90) latency, the ratio of the medians, and the median
of the per-round ratios, with the versions and thread count used, since a
number without those means little.

This is measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from lrprune_caffe.errors import UserError

RUNTIMES = ("onnxruntime", "opencv")


def _versions(runtime: str) -> dict:
    from lrprune_caffe.version import __version__
    v = {"lrprune_caffe": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if runtime == "onnxruntime":
        import onnx
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
        v["onnx"] = onnx.__version__
    else:
        import cv2
        v["opencv"] = cv2.__version__
    return v


def _batch1_inputs(net, seed: int) -> dict:
    from .runtime import default_inputs
    fixed = net.fixed_batch() if hasattr(net, "fixed_batch") else None  # an ONNX file may fix its batch
    return default_inputs(net, seed=seed, batch=fixed or 1)


class _OrtRunner:
    def __init__(self, net, threads, opset):
        from lrprune_caffe.export.onnx import export_model
        from .model import OnnxModel
        from .runtime import ort_session
        self.inputs = _batch1_inputs(net, 0)
        if isinstance(net, OnnxModel):  # the file as written
            self.sess = net.session(threads)
            self.outputs = net.outputs()
            return
        dynamic = any(s and s[0] != 1 for s in net.input_shapes().values())
        model = export_model(net, opset=opset, dynamic_batch=dynamic)
        self.sess = ort_session(model.SerializeToString(), threads)
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def __call__(self):
        return self.sess.run(self.outputs, self.inputs)


class _OpenCVRunner:
    def __init__(self, net, threads, opset=None):
        try:
            import cv2
        except ImportError:
            raise UserError("the opencv runtime needs opencv-python-headless<5") from None
        from lrprune_caffe.io.caffe import save_net
        from lrprune_caffe.errors import EngineError, engine_message
        from .model import OnnxModel
        if isinstance(net, OnnxModel):  # the file as written, through OpenCV's ONNX reader
            self.inputs, self.outputs = _batch1_inputs(net, 0), net.outputs()
            self.net = net.opencv()
            try:
                self()
            except cv2.error as e:
                raise EngineError(f"{net.source}: OpenCV's ONNX reader cannot run it: {engine_message(e)}") from None
            return
        with tempfile.TemporaryDirectory() as d:
            proto, model = os.path.join(d, "m.prototxt"), os.path.join(d, "m.caffemodel")
            save_net(net, proto, model)
            self.inputs = _batch1_inputs(net, 0)
            self.outputs = list(net.outputs())
            try:  # OpenCV builds its layers on the first forward: fail here, not mid-benchmark
                self.net = cv2.dnn.readNetFromCaffe(proto, model)
                self()
            except cv2.error as e:
                raise EngineError(f"{net.source or net.name or 'the net'}: OpenCV's Caffe reader cannot run "
                                  f"it: {engine_message(e)}") from None

    def __call__(self):
        for k, v in self.inputs.items():
            self.net.setInput(v, k)
        return self.net.forward(self.outputs)


def _stats(times_s: list) -> dict:
    ms = sorted(t * 1e3 for t in times_s)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "mean_ms": statistics.fmean(ms),
            "p90_ms": ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))],
            "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0, "runs": len(ms)}


def bench_nets(nets, runtime: str = "onnxruntime", threads: int = 1, runs: int = 50, warmup: int = 5,
               labels=None, opset: int = 13, progress: bool = None) -> dict:
    """Median batch-1 latency of one or more nets (IR ``Net`` objects or ONNX files as
    :class:`~lrprune_caffe.engines.model.OnnxModel`; the CLI takes two), interleaved.

    Returns {"runtime", "threads", "runs", "warmup", "batch", "versions",
    "nets": [{"label", "median_ms", "min_ms", "mean_ms", "p90_ms", "stdev_ms", "runs"}],
    and for two nets "ratio" (median B / median A), "speedup" (A / B) and
    "paired_ratio" (median over rounds of B/A)}.
    """
    nets = list(nets)
    if not nets:
        raise UserError("bench needs at least one net")
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}' (choose from {', '.join(RUNTIMES)})")
    if int(runs) < 1 or int(warmup) < 0:
        raise UserError(f"runs must be >= 1 and warmup >= 0 (got runs {runs}, warmup {warmup})")
    if threads is not None and int(threads) < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    labels = list(labels) if labels else [n.name or f"net{i + 1}" for i, n in enumerate(nets)]
    if runtime == "opencv":
        import cv2
        if threads:
            cv2.setNumThreads(int(threads))
    runner_cls = _OrtRunner if runtime == "onnxruntime" else _OpenCVRunner
    runners = [runner_cls(net, threads, opset) for net in nets]
    for r in runners:
        for _ in range(int(warmup)):
            r()
    times = [[] for _ in runners]
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        from tqdm import tqdm
        rounds = tqdm(range(int(runs)), desc="bench", unit="round", file=sys.stderr, disable=not progress)
    except ImportError:  # pragma: no cover
        rounds = range(int(runs))
    clock = time.perf_counter
    for rnd in rounds:
        order = range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            t0 = clock()
            runners[i]()
            times[i].append(clock() - t0)
    result = {
        "runtime": runtime,
        "threads": int(threads) if threads else "runtime default",
        "runs": int(runs), "warmup": int(warmup), "batch": 1,
        "versions": _versions(runtime),
        "nets": [{"label": lab, **_stats(t)} for lab, t in zip(labels, times)],
    }
    if len(runners) == 2:
        a, b = result["nets"]
        result["ratio"] = b["median_ms"] / a["median_ms"]
        result["speedup"] = a["median_ms"] / b["median_ms"]
        result["paired_ratio"] = statistics.median(tb / ta for ta, tb in zip(*times))
    return result


__all__ = ["bench_nets", "RUNTIMES"]
