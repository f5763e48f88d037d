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
from .latency_graphs import (Flush, layer_model, measure_model, ort_options, overhead_model, session,  # noqa: F401
                             time_runs)

RUNTIMES = ("onnxruntime",)
GRID_VERSION = 2  # bump when the grid or the timing method changes: old cache entries are ignored


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
    overhead_ms: float = 0.0  # per-run cost of any graph, subtracted from the table entries
    complete: bool = True  # False: the time budget ran out first (what was measured is cached)
    cache_path: str = ""
    notes: list = field(default_factory=list)


def run_overhead(cache: Cache, counter: list) -> float:
    """ms one session.run of a graph costs beyond its ops (an Identity on one value), measured once per
    target; subtracted from every table entry, since a layer inside a net does not pay it."""
    ms = cache.get("nets", "__run_overhead__")
    if ms is None:
        model, feeds = overhead_model()
        ms = measure_model(model, feeds, cache_target(cache), external=False)["ms"]
        cache.put("nets", "__run_overhead__", ms)
        counter[0] += 1
    return float(ms)


def _measure_layer(geo, scheme, axes, cache: Cache, counter: list, overhead: float = 0.0) -> LayerTable:
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
    floor = 1e-4  # ms: a layer never costs nothing
    ms = np.maximum(ms - overhead, floor)
    orig = max(float(orig) - overhead, floor)
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
        out.overhead_ms = run_overhead(cache, counter)
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
                table = _measure_layer(geometry(info, target.batch), s, axes, cache, counter, out.overhead_ms)
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
