"""Per-layer latency tables on the target runtime, for a budget in milliseconds.

For each factorizable layer (its real geometry: channels, kernel, stride,
pad, dilation, group, bias, and its real input shape at the target batch)
we time, on the target runtime:

- the layer **left alone** (one Conv / Gemm);
- its **factorized chains** (the layers :mod:`lrprune_caffe.transforms.factorize`
  builds: channel = kxk conv to g*r channels then 1x1; spatial = kx1 then
  1xk; tucker2 = 1x1, kxk, 1x1; fc = two Gemms) on a coarse rank grid
  (:func:`rank_grid`: ~8 ranks over 1..the rank where the chain's MACs reach
  the layer's; Tucker-2: a 5 x 5 grid of (r_in, r_out)).

Each candidate is a tiny ONNX graph (onnx.helper; seeded weights of the right
shapes: the time does not depend on their values) run by onnxruntime with the
target's session options (:func:`ort_options`: ``intra_op_num_threads`` =
threads, ``inter_op_num_threads`` 1, sequential, ``ORT_ENABLE_ALL``, as the
exported net runs). Time = the median of repeated runs after warm-up; the
repeat count adapts (:func:`time_runs`: up to 12 runs for small layers, 3 for big
ones), and every timed run starts with cold caches (:class:`Flush`: in a net a
layer's weights are not in cache when it runs; timed hot, ResNet-50's layers
add up to half the net's time). :class:`lrprune_caffe.lowrank.latency_budget.LayerTable` interpolates
between the measured ranks.

The whole original net is measured once too (:func:`net_ms`, exported by
:func:`lrprune_caffe.export.onnx.export_model`): the budget's fixed part is
that total minus the tabled layers left alone.

Everything measured is cached on disk (JSON; ``$LRPRUNE_CACHE/latency`` or
``~/.cache/lrprune-caffe/latency``), one file per target key (runtime and its
version, threads, batch, machine = platform.machine + CPU model + core
count, and :data:`GRID_VERSION`), one entry per layer geometry: a second run
measures nothing.

This is measurement, not a test; unit tests replace :func:`time_runs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrprune_caffe.errors import UserError
from lrprune_caffe.lowrank.latency_budget import LayerTable

RUNTIMES = ("onnxruntime",)
GRID_VERSION = 2  # bump when the grid or the timing method changes: old cache entries are ignored
OPSET = 13


# ---------------------------------------------------------------------------
# target and cache key

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime
        return onnxruntime.__version__
    raise UserError(f"--engine: no latency tables for runtime '{runtime}' (choose from {', '.join(RUNTIMES)})")


@dataclass(frozen=True)
class Target:
    """Where the net will run: the runtime, its intra-op threads, the batch."""

    runtime: str = "onnxruntime"
    threads: int = 1
    batch: int = 1

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise UserError(f"--engine: no latency tables for runtime '{self.runtime}' "
                            f"(choose from {', '.join(RUNTIMES)})")
        if int(self.threads) < 1:
            raise UserError(f"--threads {self.threads} must be at least 1")
        if int(self.batch) < 1:
            raise UserError(f"--batch {self.batch} must be at least 1")

    def key(self) -> dict:
        return {"runtime": self.runtime, "version": runtime_version(self.runtime), "threads": int(self.threads),
                "batch": int(self.batch), "machine": platform.machine(), "cpu": cpu_model(),
                "cores": os.cpu_count(), "grid": GRID_VERSION}

    def describe(self) -> str:
        k = self.key()
        return (f"{k['runtime']} {k['version']}, {k['threads']} thread(s), batch {k['batch']}, "
                f"{k['cpu']} ({k['cores']} cores, {k['machine']})")


def cache_dir(path=None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("LRPRUNE_CACHE")
    if env:
        return Path(env) / "latency"
    return Path.home() / ".cache" / "lrprune-caffe" / "latency"


class Cache:
    """One JSON file per target key: {"target": key, "layers": {signature: entry}, "nets": {sig: ms}}."""

    def __init__(self, target: Target, directory=None):
        self.key = target.key()
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir(directory) / f"{self.key['runtime']}-t{self.key['threads']}-b{self.key['batch']}-" \
                                           f"{digest}.json"
        self.data = self._read()
        self.hits = 0
        self.misses = 0

    def _read(self) -> dict:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
            if data.get("target") == self.key:
                data.setdefault("layers", {})
                data.setdefault("nets", {})
                return data
        except (OSError, ValueError):
            pass
        return {"target": self.key, "layers": {}, "nets": {}}

    def get(self, section: str, sig: str, part: str = None):
        entry = self.data[section].get(sig)
        if entry is not None and part is not None:
            entry = entry.get(part) if isinstance(entry, dict) else None
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, section: str, sig: str, value, part: str = None):
        if part is None:
            self.data[section][sig] = value
        else:
            self.data[section].setdefault(sig, {})[part] = value

    def save(self):
        """Merge with what another process may have written meanwhile, then replace atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        disk = self._read()
        for section in ("layers", "nets"):
            for sig, entry in self.data[section].items():
                if isinstance(entry, dict) and isinstance(disk[section].get(sig), dict):
                    disk[section][sig].update(entry)
                else:
                    disk[section][sig] = entry
        self.data = disk
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(disk, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


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
    from onnx import TensorProto, numpy_helper
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape))
    if count < _EXTERNAL_MIN:
        return numpy_helper.from_array(_fill(shape), name)
    _WEIGHTS.ensure(count)
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", str(4 * count))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


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


def session(model_bytes: bytes, target: Target, external: bool = False):
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


def time_runs(run, budget_s: float = 0.05, min_runs: int = 3, max_runs: int = 40, flush=None) -> dict:
    """Median ms of ``run()`` after warm-up; about ``budget_s`` of timed runs (``min_runs``..``max_runs``).

    ``flush``: called (untimed) before each timed run, e.g. :class:`Flush`."""
    clock = time.perf_counter
    t0 = clock()
    run()  # the first run allocates and may pack weights
    first = clock() - t0
    if first < 0.02:  # small layers: a few more warm-up runs, the last one estimates the cost
        for _ in range(3):
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
    ms = sorted(t * 1e3 for t in times)
    return {"ms": statistics.median(ms), "runs": n, "min": ms[0], "max": ms[-1]}


def measure_model(model_bytes: bytes, feeds: dict, target: Target, external: bool = True) -> dict:
    """Time one ONNX model (by default a :func:`layer_model`, which may point into the weight file),
    each run with cold caches (:class:`Flush`)."""
    sess = session(model_bytes, target, external)
    outs = [o.name for o in sess.get_outputs()]
    return time_runs(lambda: sess.run(outs, feeds), max_runs=12, flush=_flush())


# ---------------------------------------------------------------------------
# tables

@dataclass
class Tables:
    """Latency tables of a net's layers on one target, and how they were obtained."""

    target: Target
    scheme: str
    tables: dict = field(default_factory=dict)  # name -> LayerTable
    total_ms: float = None  # the whole original net
    seconds: float = 0.0  # wall time spent here (measuring, or reading the cache)
    cpu_seconds: float = 0.0  # CPU time of this process meanwhile (~ the wall time on an idle machine)
    measured: int = 0  # graphs timed now (0 on a full cache hit)
    complete: bool = True  # False: the time budget ran out first (what was measured is cached)
    cache_path: str = ""
    notes: list = field(default_factory=list)


def _measure_layer(geo, scheme, axes, cache: Cache, counter: list) -> LayerTable:
    """The layer's table. Left alone is timed before and after its chains and the faster median kept:
    noise only adds time, and a left-alone time inflated by a neighbour's burst would make every
    chain look like a saving."""
    sig = signature(geo)
    target = cache_target(cache)
    orig = cache.get("layers", sig, "orig")
    part = f"{scheme}:" + ";".join(",".join(str(r) for r in a) for a in axes)
    stored = cache.get("layers", sig, part)
    if orig is None:
        model, feeds = layer_model(geo)
        orig = measure_model(model, feeds, target)["ms"]
        counter[0] += 1
    if stored is None:
        if len(axes) == 1:
            points = [(r,) for r in axes[0]]
        else:
            points = [(a, b) for a in axes[0] for b in axes[1]]
        stored = []
        for ranks in points:
            model, feeds = layer_model(geo, scheme, ranks)
            stored.append(measure_model(model, feeds, target)["ms"])
            counter[0] += 1
        model, feeds = layer_model(geo)
        orig = min(orig, measure_model(model, feeds, target)["ms"])
        counter[0] += 1
        cache.put("layers", sig, stored, part)
    cache.put("layers", sig, orig, "orig")
    ms = np.asarray(stored, dtype=np.float64).reshape(tuple(len(a) for a in axes))
    return LayerTable("", float(orig), scheme, tuple(np.asarray(a, np.int64) for a in axes), ms)


def cache_target(cache: Cache) -> Target:
    k = cache.key
    return Target(k["runtime"], k["threads"], k["batch"])


def layer_tables(infos: dict, scheme: str, target: Target, net=None, directory=None, progress: bool = False,
                 time_budget_s: float = None) -> Tables:
    """Tables for ``infos`` ({name: factorize.LayerInfo}) under ``scheme``; with ``net``, also its total ms.

    Stops after the layer that exceeds ``time_budget_s`` (``complete`` False);
    what was measured stays cached.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cache = Cache(target, directory)
    out = Tables(target, scheme, cache_path=str(cache.path))
    counter = [0]
    saved = 0
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(infos) + (net is not None), desc="latency tables", unit="layer", file=sys.stderr,
                   leave=False, disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        if net is not None:
            out.total_ms = net_ms(net, target, cache=cache, counter=counter)
            if bar is not None:
                bar.update(1)
        for name, info in infos.items():
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                out.complete = False
                out.notes.append(f"latency tables: the {time_budget_s:.0f} s budget ran out after "
                                 f"{len(out.tables)} of {len(infos)} layers (what was measured is cached)")
                break
            s = info.scheme_for(scheme)
            axes = rank_grid(info, s)
            if not axes:
                out.notes.append(f"layer {name}: no {s} rank cuts its MACs; not tabled")
            else:
                table = _measure_layer(geometry(info, target.batch), s, axes, cache, counter)
                table.name = name
                out.tables[name] = table
            if bar is not None:
                bar.update(1)
            if counter[0] != saved:
                cache.save()
                saved = counter[0]
    finally:
        if bar is not None:
            bar.close()
        if counter[0] != saved:
            cache.save()
    out.measured = counter[0]
    out.seconds = time.perf_counter() - t_start
    out.cpu_seconds = time.process_time() - cpu_start
    return out


def net_infos(net, names=None) -> tuple:
    """({name: factorize.LayerInfo} of the factorizable layers among ``names`` (all when None),
    {name: why not} for the others)."""
    from lrprune_caffe.ir.analysis import infer_shapes
    from lrprune_caffe.transforms import Precondition
    from lrprune_caffe.transforms.factorize import FACTORIZABLE, layer_info
    shapes = infer_shapes(net)
    infos, skipped = {}, {}
    for layer in net.layers:
        if layer.type not in FACTORIZABLE or (names is not None and layer.name not in names):
            continue
        ins, outs = shapes.inputs.get(layer.name), shapes.outputs.get(layer.name)
        try:
            infos[layer.name] = layer_info(layer, ins[0] if ins else None, outs[0] if outs else None)
        except Precondition as e:
            skipped[layer.name] = str(e)
    return infos, skipped


# ---------------------------------------------------------------------------
# whole nets

def net_signature(net, batch: int) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted((k, tuple(v) if v else None) for k, v in net.input_shapes().items())).encode())
    h.update(f"batch{batch}".encode())
    for layer in net.layers:
        h.update(repr((layer.name, layer.type, layer.bottoms, layer.tops,
                       [tuple(b.shape) for b in layer.blobs])).encode())
        h.update(layer.msg.SerializeToString(deterministic=True))
    return h.hexdigest()[:24]


def net_runner(net, target: Target):
    """A callable running ``net`` once at the target batch (exported by our ONNX exporter)."""
    from lrprune_caffe.export.onnx import export_model
    from .runtime import default_inputs
    feeds = default_inputs(net, seed=0, batch=target.batch)
    dynamic = any(s and s[0] != target.batch for s in net.input_shapes().values())
    data = export_model(net, dynamic_batch=dynamic).SerializeToString()
    sess = session(data, target)
    del data
    outs = [o.name for o in sess.get_outputs()]
    return lambda: sess.run(outs, feeds)


def net_ms(net, target: Target, cache: Cache = None, directory=None, counter: list = None) -> float:
    """Median ms of the whole net on the target (cached by the net's structure and shapes)."""
    cache = cache or Cache(target, directory)
    sig = net_signature(net, target.batch)
    ms = cache.get("nets", sig)
    if ms is None:
        ms = time_runs(net_runner(net, target), budget_s=0.5)["ms"]
        cache.put("nets", sig, ms)
        if counter is not None:
            counter[0] += 1
        else:
            cache.save()
    return float(ms)


def measured_speedup(net_a, net_b, target: Target, rounds: int = 20, warmup: int = 2) -> dict:
    """End-to-end speed-up of ``net_b`` over ``net_a``: interleaved (ABBA) rounds on the target.

    Either net may be a :func:`net_runner` already built (a VGG-16 export takes seconds).
    Returns medians of each net, the ratio of the medians (``speedup``), and
    the median and the 10th-90th percentiles of the per-round ratios.
    """
    runs = [n if callable(n) else net_runner(n, target) for n in (net_a, net_b)]
    for r in runs:
        for _ in range(int(warmup)):
            r()
    clock = time.perf_counter
    times = [[], []]
    for rnd in range(int(rounds)):
        for i in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            t0 = clock()
            runs[i]()
            times[i].append((clock() - t0) * 1e3)
    ratios = np.asarray(times[0]) / np.asarray(times[1])
    a, b = statistics.median(times[0]), statistics.median(times[1])
    return {"a_ms": a, "b_ms": b, "speedup": a / b, "paired_median": float(np.median(ratios)),
            "paired_p10": float(np.percentile(ratios, 10)), "paired_p90": float(np.percentile(ratios, 90)),
            "rounds": int(rounds), "target": target.key()}


__all__ = ["Target", "Cache", "Tables", "RUNTIMES", "geometry", "signature", "rank_grid", "break_even",
           "layer_model", "time_runs", "measure_model", "layer_tables", "net_ms", "net_runner",
           "measured_speedup", "cache_dir", "ort_options", "net_infos"]
