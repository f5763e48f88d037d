"""The timed side of :mod:`lrprune_caffe.engines.latency`: each layer's geometry and rank grid, tiny ONNX
graphs of one layer (left alone or factorized), onnxruntime sessions on the target's options, and their
timing (hot, or cold: caches flushed before each run).

Large weights of the tiny graphs all point into one file of seeded values (ONNX external data), so a
400 MB FC weight is neither generated nor serialized per graph; the time does not depend on values.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

OPSET = 13
#: two fastest timed runs of a table graph within this fraction of each other: its time is known
AGREE = 0.03


# ---------------------------------------------------------------------------
# geometry and rank grids

def geometry(info, batch: int) -> dict:
    """What a layer's latency depends on, at the target batch (from a factorize.LayerInfo)."""
    if info.kind == "ip":
        rows = info.outer
        if info.axis >= 1 and info.in_shape:
            rows = info.outer // max(1, int(info.in_shape[0])) * int(batch)
        return {"kind": "fc", "rows": int(rows), "k": int(info.c_in), "n": int(info.n_out), "bias": bool(info.bias),
                "transpose": bool(info.transpose)}
    _, c, h, w = (int(x) for x in info.in_shape)
    return {"kind": "conv", "batch": int(batch), "c": c, "h": h, "w": w, "n": int(info.n_out),
            "group": int(info.group), "kernel": list(info.kernel), "stride": list(info.stride),
            "pad": list(info.pad), "dilation": list(info.dilation), "bias": bool(info.bias)}


def signature(geo: dict) -> str:
    if geo["kind"] == "fc":
        return f"fc:m{geo['rows']}:k{geo['k']}:n{geo['n']}:b{int(geo['bias'])}:t{int(geo['transpose'])}"
    xy = lambda v: "x".join(str(int(a)) for a in v)  # noqa: E731
    return (f"conv:b{geo['batch']}:c{geo['c']}:h{geo['h']}:w{geo['w']}:n{geo['n']}:g{geo['group']}:"
            f"k{xy(geo['kernel'])}:s{xy(geo['stride'])}:p{xy(geo['pad'])}:d{xy(geo['dilation'])}:"
            f"b{int(geo['bias'])}")


def _spread(cap: int, points: int) -> list:
    """~``points`` ranks over 1..cap, multiples of 8 above 16 (SIMD widths), always 1 and cap."""
    if cap <= points:
        return list(range(1, cap + 1))
    raw = np.linspace(1, cap, points)
    out = {1, int(cap)}
    for r in raw[1:-1]:
        r = int(round(r))
        if r > 16:
            r = max(16, int(round(r / 8.0)) * 8)
        out.add(min(max(1, r), cap))
    return sorted(out)


def break_even(info, scheme: str) -> tuple:
    """Per rank dimension, the largest rank whose chain's MACs stay at or below the layer's (0: none)."""
    maxr = info.max_ranks(scheme)
    if scheme == "tucker2":
        caps = []
        for d in range(2):
            r = np.arange(1, maxr[d] + 1)
            other = np.ones_like(r)
            macs, _ = info.cost(scheme, (r, other) if d == 0 else (other, r))
            ok = np.nonzero(np.asarray(macs) <= info.macs)[0]
            caps.append(int(r[ok[-1]]) if ok.size else 0)
        return tuple(caps)
    r = np.arange(1, maxr[0] + 1)
    macs, _ = info.cost(scheme, (r,))
    ok = np.nonzero(np.asarray(macs) <= info.macs)[0]
    return (int(r[ok[-1]]) if ok.size else 0,)


def grid_points(left_alone_ms: float) -> tuple:
    """(points, points_2d) of the rank grid for a layer that takes ``left_alone_ms`` alone: fewer for
    slow layers, whose curves are long straight lines and whose every chain costs a lot to time."""
    if left_alone_ms >= 30:
        return 5, 4
    if left_alone_ms >= 8:
        return 6, 4
    return 8, 5


def rank_grid(info, scheme: str, points: int = 8, points_2d: int = 5) -> tuple:
    """The measured ranks: one ascending list per rank dimension (empty when no rank cuts MACs)."""
    scheme = info.scheme_for(scheme)
    caps = break_even(info, scheme)
    if any(c < 1 for c in caps):
        return ()
    if scheme == "tucker2":
        return tuple(_spread(c, points_2d) for c in caps)
    return (_spread(caps[0], points),)


# ---------------------------------------------------------------------------
# tiny ONNX graphs

_SMALL = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32) * np.float32(0.05)
_EXTERNAL_MIN = 1 << 18  # weights of at least this many values are read from a shared file, not copied


class _WeightFile:
    """One file of seeded values that every large weight of every tiny graph points into
    (ONNX external data): a 400 MB FC weight is then neither generated nor serialized per graph."""

    def __init__(self):
        self.dir = None
        self.size = 0

    def ensure(self, count: int) -> str:
        import tempfile
        if self.dir is None:
            self.dir = tempfile.TemporaryDirectory(prefix="lrprune-latency-")
        if count > self.size:
            count = max(count, 2 * self.size)
            with open(os.path.join(self.dir.name, "weights.bin"), "wb") as fh:
                for start in range(0, count, _SMALL.size):
                    fh.write(_SMALL[:min(_SMALL.size, count - start)].tobytes())
            self.size = count
        return self.dir.name


_WEIGHTS = _WeightFile()


def _fill(shape) -> np.ndarray:
    return np.resize(_SMALL, tuple(int(s) for s in shape))


def _tensor(name: str, shape):
    from onnx import numpy_helper

    from lrprune_caffe.export.onnx import external_tensor
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape))
    if count < _EXTERNAL_MIN:
        return numpy_helper.from_array(_fill(shape), name)
    _WEIGHTS.ensure(count)
    return external_tensor(name, np.float32, shape, "weights.bin", 0, 4 * count)


def _conv(nodes, inits, x, y, c_in, c_out, group, kernel, stride, pad, dilation, bias, tag):
    w = f"{tag}_w"
    inits.append(_tensor(w, (c_out, c_in // group, *kernel)))
    ins = [x, w]
    if bias:
        inits.append(_tensor(f"{tag}_b", (c_out,)))
        ins.append(f"{tag}_b")
    from onnx import helper
    nodes.append(helper.make_node("Conv", ins, [y], name=tag, kernel_shape=list(kernel), strides=list(stride),
                                  pads=list(pad) * 2, dilations=list(dilation), group=int(group)))


def _gemm(nodes, inits, x, y, k, n, bias, transpose, tag):
    from onnx import helper
    shape = (k, n) if transpose else (n, k)
    inits.append(_tensor(f"{tag}_w", shape))
    ins = [x, f"{tag}_w"]
    if bias:
        inits.append(_tensor(f"{tag}_b", (n,)))
        ins.append(f"{tag}_b")
    nodes.append(helper.make_node("Gemm", ins, [y], name=tag, transB=0 if transpose else 1))


def layer_model(geo: dict, scheme: str = None, ranks=()):
    """(ONNX model bytes, feeds) of the layer left alone (``scheme`` None) or factorized."""
    from onnx import TensorProto, helper
    nodes, inits = [], []
    if geo["kind"] == "fc":
        x_shape = [geo["rows"], geo["k"]]
        if scheme is None:
            _gemm(nodes, inits, "x", "y", geo["k"], geo["n"], geo["bias"], geo["transpose"], "orig")
        else:
            r = int(ranks[0])
            _gemm(nodes, inits, "x", "t1", geo["k"], r, False, geo["transpose"], "lr1")
            _gemm(nodes, inits, "t1", "y", r, geo["n"], geo["bias"], geo["transpose"], "lr2")
    else:
        x_shape = [geo["batch"], geo["c"], geo["h"], geo["w"]]
        k, s, p, d, g = geo["kernel"], geo["stride"], geo["pad"], geo["dilation"], geo["group"]
        one, zero = (1, 1), (0, 0)
        C, N, b = geo["c"], geo["n"], geo["bias"]
        if scheme is None:
            _conv(nodes, inits, "x", "y", C, N, g, k, s, p, d, b, "orig")
        elif scheme == "channel":
            r = g * int(ranks[0])
            _conv(nodes, inits, "x", "t1", C, r, g, k, s, p, d, False, "lr1")
            _conv(nodes, inits, "t1", "y", r, N, g, one, one, zero, one, b, "lr2")
        elif scheme == "spatial":
            r = g * int(ranks[0])
            _conv(nodes, inits, "x", "t1", C, r, g, (k[0], 1), (s[0], 1), (p[0], 0), (d[0], 1), False, "lr1")
            _conv(nodes, inits, "t1", "y", r, N, g, (1, k[1]), (1, s[1]), (0, p[1]), (1, d[1]), b, "lr2")
        elif scheme == "tucker2":
            r1, r2 = g * int(ranks[0]), g * int(ranks[1])
            _conv(nodes, inits, "x", "t1", C, r1, g, one, one, zero, one, False, "lr1")
            _conv(nodes, inits, "t1", "t2", r1, r2, g, k, s, p, d, False, "lr2")
            _conv(nodes, inits, "t2", "y", r2, N, g, one, one, zero, one, b, "lr3")
        else:
            raise ValueError(f"unknown scheme {scheme!r}")
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    feeds = {"x": _fill(x_shape).copy()}
    return model.SerializeToString(), feeds


# ---------------------------------------------------------------------------
# timing

def ort_options(threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def session(model_bytes: bytes, target, external: bool = False):
    """An onnxruntime session on the target's options. ``external``: the model's large weights live in
    the shared weight file (:func:`layer_model`), so it is loaded from a path next to that file."""
    import onnxruntime as ort
    so = ort_options(target.threads)
    if external:
        path = os.path.join(_WEIGHTS.ensure(0), "model.onnx")
        with open(path, "wb") as fh:
            fh.write(model_bytes)
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def llc_bytes() -> int:
    """The largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in base.glob("index*"):
            text = (d / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


class Flush:
    """Evicts the caches between timed runs by updating a buffer twice the last-level cache.

    Inside a net, a layer's weights were evicted by the layers run since its
    last use; timed alone in a loop they stay cached, and small layers then
    look twice as fast as they run in the net (ResNet-50 at batch 1). So every
    timed run starts cold (the input too, which in a net is often still
    cached: a small overestimate)."""

    def __init__(self, nbytes: int = None):
        self.buf = np.zeros((nbytes or 2 * llc_bytes()) // 4, np.float32)

    def __call__(self):
        np.add(self.buf, 1.0, out=self.buf)


_FLUSH = []


def _flush():
    if not _FLUSH:
        _FLUSH.append(Flush())
    return _FLUSH[0]


def cpu_clock(threads: int):
    """The clock a target's runs are timed by: with one intra-op thread onnxruntime runs every kernel on
    the calling thread, so the process's CPU time is the run's time without the time other jobs took
    the core (on the shared 2-core machine at load 6: 9 ms CPU in 40 ms wall); with more threads, whose
    pool spins while waiting, wall time."""
    return time.process_time if int(threads) == 1 else time.perf_counter


def time_runs(run, budget_s: float = 0.05, min_runs: int = 3, max_runs: int = 40, flush=None,
              clock=time.perf_counter, warmups: int = 3, agree: float = None) -> dict:
    """Median ms of ``run()`` after warm-up; about ``budget_s`` of timed runs (``min_runs``..``max_runs``).

    The first run allocates and may pack weights; a run under 20 ms gets ``warmups`` more (untimed).
    ``agree``: stop early, after ``min_runs``, once the two fastest runs are within that fraction of
    each other (noise only adds time, so two agreeing fastest runs are the run's time; on a busy
    machine this halves the runs of the latency tables). ``flush``: called (untimed) before each
    timed run, e.g. :class:`Flush`; ``clock``: e.g. :func:`cpu_clock`."""
    t0 = clock()
    run()  # the first run allocates and may pack weights
    first = clock() - t0
    if first < 0.02:  # small layers: a few more warm-up runs, the last one estimates the cost
        for _ in range(int(warmups)):
            if flush is not None:
                flush()
            t0 = clock()
            run()
            first = clock() - t0
    n = int(min(max_runs, max(min_runs, round(budget_s / max(first, 1e-6)))))
    times = []
    for _ in range(n):
        if flush is not None:
            flush()
        t0 = clock()
        run()
        times.append(clock() - t0)
        if agree is not None and len(times) >= min_runs:
            a, b = sorted(times)[:2]
            if b <= a * (1.0 + agree):
                break
    ms = sorted(t * 1e3 for t in times)
    agreed = agree is not None and len(ms) >= 2 and ms[1] <= ms[0] * (1.0 + agree)
    return {"ms": statistics.median(ms), "low": low(ms), "runs": len(ms), "min": ms[0], "max": ms[-1],
            "agreed": agreed}


def low(values) -> float:
    """The lower quartile (the minimum of 3 or fewer): on a shared machine noise only adds time, and a
    few runs' median still carries a neighbour's burst."""
    v = sorted(values)
    return float(v[(len(v) - 1) // 4])


def overhead_model():
    """(model bytes, feeds) of an Identity on one value: what a run of any graph costs beyond its ops."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    return model.SerializeToString(), {"x": np.zeros(1, np.float32)}


def measure_model(model_bytes: bytes, feeds: dict, target, external: bool = True, cold: bool = False) -> dict:
    """Time one ONNX model (by default a :func:`layer_model`, which may point into the weight file).

    ``ms`` is the lower quartile of the runs (:func:`low`) by :func:`cpu_clock`: one extra warm-up
    under 20 ms, then 2 to 12 timed runs, stopping once the two fastest agree within
    :data:`AGREE` (the table of VGG-16 at 224: 101 graphs, ~4 runs each). Hot by default (the
    tables are calibrated against the profiled net, :mod:`lrprune_caffe.engines.latency_net`);
    ``cold``: each run after a :class:`Flush`."""
    sess = session(model_bytes, target, external)
    outs = [o.name for o in sess.get_outputs()]
    res = time_runs(lambda: sess.run(outs, feeds), min_runs=2, max_runs=12, flush=_flush() if cold else None,
                    clock=cpu_clock(target.threads), warmups=1, agree=AGREE)
    return {**res, "ms": res["low"]}


__all__ = ["geometry", "signature", "break_even", "rank_grid", "grid_points", "layer_model", "overhead_model",
           "ort_options", "session", "time_runs", "measure_model", "low", "cpu_clock", "Flush", "llc_bytes", "OPSET"]
